"""README's commands work as README writes them, for a newcomer: `uv run` in front of every `mcp` command
(the `mcp` program lives in the project's .venv), the server's command installs only what the server
needs, and the stdio and install routes run exactly as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters

from tests.conftest import REPO, SETTING_NAMES

README = (REPO / "README.md").read_text()
pytestmark = pytest.mark.store_of_its_own


def readme_commands(pattern: str) -> list[str]:
    """Every command line in README's sh blocks and `code` spans that matches `pattern`."""
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    spans = re.findall(r"`([^`\n]+)`", README)
    return [command for command in (*lines, *spans) if re.search(pattern, command)]


def clean_env(**extra: str) -> dict[str, str]:
    return {**{key: value for key, value in os.environ.items() if key not in SETTING_NAMES}, **extra}


def test_every_mcp_command_readme_gives_runs_through_uv() -> None:
    """`mcp dev server.py` on its own is `mcp: command not found` outside an activated .venv."""
    commands = readme_commands(r"\bmcp (dev|run|install) server\.py")
    assert {"uv run mcp dev server.py", "uv run mcp run server.py", "uv run mcp install server.py"} <= set(commands)
    bare = [command for command in commands if re.match(r"mcp (dev|run|install)", command)]
    assert bare == [], f"README tells a newcomer to run these without uv: {bare}"


@pytest.mark.anyio
async def test_the_stdio_route_runs_as_readme_writes_it(tmp_path: Path) -> None:
    assert "uv run mcp run server.py" in readme_commands(r"mcp run")
    parameters = StdioServerParameters(command=shutil.which("uv") or "uv", args=["run", "mcp", "run", "server.py"],
                                       cwd=str(REPO), env=clean_env(DATA_DIR=str(tmp_path / "data")))
    async with Client(parameters, mode="legacy") as stdio:
        added = await stdio.call_tool("add", {"a": 2, "b": 3})
    assert added.structured_content == {"result": 5.0}


@pytest.mark.anyio
async def test_mcp_install_runs_as_readme_writes_it_and_its_entry_starts(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".config" / "Claude").mkdir(parents=True)
    env = clean_env(HOME=str(home))
    env.pop("XDG_CONFIG_HOME", None)
    done = await anyio.to_thread.run_sync(lambda: subprocess.run(
        ["uv", "run", "mcp", "install", "server.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
        check=False))
    assert done.returncode == 0, done.stdout + done.stderr
    entry = json.loads((home / ".config" / "Claude" / "claude_desktop_config.json").read_text())["mcpServers"][
        "stream-http"]
    parameters = StdioServerParameters(command=entry["command"], args=entry["args"], cwd=str(tmp_path),
                                       env={**clean_env(DATA_DIR=str(tmp_path / "data")), **entry.get("env", {})})
    async with Client(parameters, mode="legacy") as claude:
        added = await claude.call_tool("add", {"a": 40, "b": 2})
    assert added.structured_content == {"result": 42.0}


def test_the_servers_command_installs_only_what_the_server_needs(tmp_path: Path) -> None:
    """`uv run server.py` on a fresh clone: the server's packages, none of the test tools (pytest,
    playwright, matplotlib, ruff), as README says; the test command brings those."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", f"file://{REPO}", str(clone)], check=True)
    for changed in ("pyproject.toml", "uv.lock", "server.py"):  # the working tree's, committed or not
        shutil.copy(REPO / changed, clone / changed)
    venv = tmp_path / "venv"
    done = subprocess.run(["uv", "run", "--frozen", "server.py", "--help"], cwd=clone, capture_output=True, text=True,
                          env=clean_env(UV_PROJECT_ENVIRONMENT=str(venv)), timeout=600, check=False)
    assert done.returncode == 0 and "MCP_STATELESS" in done.stdout, done.stderr
    installed = {path.name.split("-")[0].lower() for path in (venv / "lib").glob("python*/site-packages/*.dist-info")}
    assert {"mcp", "authlib", "uvicorn", "redis"} <= installed
    assert not installed & {"pytest", "playwright", "matplotlib", "ruff", "hypothesis", "fastapi"}, installed
    size_mb = sum(path.stat().st_size for path in venv.rglob("*") if path.is_file()) / 1e6
    print(f"uv run server.py on a fresh clone: {len(installed)} packages, {size_mb:.0f} MB in its environment")
