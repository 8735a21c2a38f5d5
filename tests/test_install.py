"""`mcp install server.py`, the original description's Claude Desktop route, done as Claude Desktop does it:
the SDK's installer writes an entry into a Claude config under a temporary HOME, and the entry's exact
command runs, with its environment, from another working directory, speaking MCP over stdio."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

import server
from tests.conftest import REPO, SETTING_NAMES

pytestmark = pytest.mark.anyio


def test_the_servers_own_package_list_is_pyprojects() -> None:
    """`mcp install` and `mcp dev` install what MCPServer(dependencies=...) lists: it must be everything
    pyproject.toml names, or the installed entry dies on an import."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert sorted(server.mcp.dependencies) == sorted(project["dependencies"])
    shell_operators = set("<>|&;$`'\"()*?")
    assert not [spec for spec in server.mcp.dependencies if shell_operators & set(spec)], \
        "the Inspector on Node 20 shell-parses `mcp dev`'s --with arguments: bound versions with ~="


def install(app: Path, home: Path, *args: str) -> dict[str, object]:
    """Run `mcp install` in `app` as a user would; return the mcpServers entries it wrote."""
    (home / ".config" / "Claude").mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key not in SETTING_NAMES and key != "XDG_CONFIG_HOME"}
    mcp_command = str(Path(sys.executable).with_name("mcp"))
    result = subprocess.run([mcp_command, "install", "server.py", *args], cwd=app, env={**env, "HOME": str(home)},
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    config = json.loads((home / ".config" / "Claude" / "claude_desktop_config.json").read_text())
    return config["mcpServers"]


async def call_add(entry: dict[str, object], cwd: Path, errlog: Path) -> dict[str, object]:
    """Start the entry as Claude Desktop does (its command, its args, its env over the user's) and call add."""
    inherited = {key: value for key, value in os.environ.items() if key not in SETTING_NAMES}
    inherited["COLUMNS"] = "400"  # the SDK logs through rich, which wraps at 80 columns when not on a terminal
    params = StdioServerParameters(command=str(entry["command"]), args=list(entry["args"]),  # type: ignore[call-overload]
                                   env={**inherited, **entry.get("env", {})}, cwd=str(cwd))  # type: ignore[dict-item]
    with errlog.open("w") as stderr:
        async with Client(stdio_client(params, errlog=stderr), mode="legacy") as client:
            result = await client.call_tool("add", {"a": 2, "b": 40})
    return dict(result.structured_content or {})


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """A copy of the project's server.py in a folder of its own, as a user keeps theirs."""
    folder = tmp_path / "my-server"
    folder.mkdir()
    shutil.copy(REPO / "server.py", folder / "server.py")
    return folder


async def test_the_entry_mcp_install_writes_starts_from_any_directory(app: Path, tmp_path: Path) -> None:
    entries = install(app, tmp_path / "home")
    entry = entries["stream-http"]
    assert isinstance(entry, dict) and "redis~=8.1" in entry["args"] and entry["args"][-3:] == [
        "mcp", "run", str(app / "server.py")]
    elsewhere = tmp_path / "somewhere-else"
    elsewhere.mkdir()
    assert await call_add(entry, elsewhere, tmp_path / "stderr.log") == {"result": 42.0}
    assert (app / "data" / "stream-http.db").exists(), "data goes beside server.py, not into the working directory"
    assert not (elsewhere / "data").exists()
    log = (tmp_path / "stderr.log").read_text()
    assert f"keeping data in {app / 'data'} (beside server.py" in log, log
    assert "Traceback" not in log


async def test_with_a_name_variables_and_an_env_file_the_entry_still_starts(app: Path, tmp_path: Path) -> None:
    """With --name the installer does not import the server, so it adds none of its packages: server.py must
    start with the SDK alone (sign-in off, SQLite), and take its settings from -v and -f as given."""
    chosen = tmp_path / "chosen-data"
    (app / ".env").write_text(f"DATA_DIR={chosen}\n")
    store = tmp_path / "notes.db"
    entries = install(app, tmp_path / "home", "--name", "My notes", "-v", f"STORE_URL=sqlite:///{store}",
                      "-f", ".env")
    entry = entries["My notes"]
    assert isinstance(entry, dict) and entry["env"] == {"DATA_DIR": str(chosen), "STORE_URL": f"sqlite:///{store}"}
    assert not any("redis" in arg for arg in entry["args"]), entry["args"]  # the installer's behaviour with --name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert await call_add(entry, elsewhere, tmp_path / "stderr.log") == {"result": 42.0}
    assert store.exists()
    assert f"keeping data in {chosen} (DATA_DIR)" in (tmp_path / "stderr.log").read_text()


def test_where_server_py_cannot_write_data_goes_to_the_per_user_folder(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert server.default_data_dir(tmp_path / "app", writable=lambda path: True) == tmp_path / "app" / "data"
    assert server.default_data_dir(tmp_path / "app", writable=lambda path: False) == tmp_path / "xdg" / "stream-http"
