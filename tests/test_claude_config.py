"""`server.py claude-config`: the Claude Desktop entry, printed or merged into the config file, and run
exactly as Claude Desktop runs it (npx starting mcp-remote)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

from tests.conftest import PEERS, Peers, ServerProcess, assert_no_traceback, run_python

EXISTING = {"globalShortcut": "Ctrl+Space",
            "mcpServers": {"filesystem": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem"]}}}


def claude_config(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    done = run_python("server.py", "claude-config", *args, env=env)
    assert_no_traceback(done.stdout, done.stderr)
    return done.returncode, done.stdout, done.stderr


def test_it_prints_the_entry_for_the_public_url() -> None:
    status, out, err = claude_config(env={"PUBLIC_URL": "https://mcp.example.com"})
    assert status == 0
    assert json.loads(out) == {"mcpServers": {"stream-http": {
        "command": "npx", "args": ["-y", "mcp-remote", "https://mcp.example.com/mcp"]}}}
    assert "restart Claude Desktop" in err


def test_plain_http_beyond_localhost_is_allowed_explicitly() -> None:
    status, out, _ = claude_config("--url", "http://mcp.internal:8000/mcp", "--name", "team notes")
    assert status == 0
    assert json.loads(out)["mcpServers"]["team notes"]["args"] == [
        "-y", "mcp-remote", "http://mcp.internal:8000/mcp", "--allow-http"]


def test_write_merges_keeps_the_rest_and_a_backup(tmp_path: Path) -> None:
    config = tmp_path / "Claude" / "claude_desktop_config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(EXISTING))
    status, out, _ = claude_config("--write", "--config-file", str(config), "--url", "http://127.0.0.1:8000/mcp")
    assert status == 0 and "Restart Claude Desktop" in out
    merged = json.loads(config.read_text())
    assert merged["globalShortcut"] == "Ctrl+Space"
    assert merged["mcpServers"]["filesystem"] == EXISTING["mcpServers"]["filesystem"]
    assert merged["mcpServers"]["stream-http"] == {"command": "npx",
                                                   "args": ["-y", "mcp-remote", "http://127.0.0.1:8000/mcp"]}
    backups = list(config.parent.glob("claude_desktop_config.json.*.bak"))
    assert len(backups) == 1 and json.loads(backups[0].read_text()) == EXISTING
    assert str(backups[0]) in out


def test_write_creates_a_missing_file(tmp_path: Path) -> None:
    config = tmp_path / "new" / "claude_desktop_config.json"
    status, _, _ = claude_config("--write", "--config-file", str(config), "--url", "http://localhost:8000/mcp")
    assert status == 0
    assert list(json.loads(config.read_text())["mcpServers"]) == ["stream-http"]
    assert [p.name for p in config.parent.iterdir()] == ["claude_desktop_config.json"]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"mcpServers": []}'])
def test_a_broken_config_is_left_as_it_is(tmp_path: Path, content: str) -> None:
    config = tmp_path / "claude_desktop_config.json"
    config.write_text(content)
    status, _, err = claude_config("--write", "--config-file", str(config), "--url", "http://127.0.0.1:8000/mcp")
    assert status == 1
    assert str(config) in err and err.count("\n") == 1, "one clear line"
    assert config.read_text() == content, "nothing written"
    assert [p.name for p in tmp_path.iterdir()] == ["claude_desktop_config.json"], "no backup, no temp file"


@pytest.mark.anyio
async def test_the_written_entry_connects_as_claude_desktop_would(peers: Peers, stateful_server: ServerProcess,
                                                                 tmp_path: Path) -> None:
    config = tmp_path / "claude_desktop_config.json"
    assert claude_config("--write", "--config-file", str(config), "--url", stateful_server.mcp_url)[0] == 0
    entry = json.loads(config.read_text())["mcpServers"]["stream-http"]
    npx = shutil.which("npx")
    assert npx, "Claude Desktop's entry runs npx"
    # Run from tests/peers so npx finds the locked mcp-remote instead of downloading one.
    claude = StdioServerParameters(command=npx, args=entry["args"], cwd=str(PEERS),
                                   env=peers.node_env(MCP_REMOTE_CONFIG_DIR=str(tmp_path), HOME=str(tmp_path)))
    async with Client(claude, mode="legacy") as client:
        result = await client.call_tool("add", {"a": 2, "b": 3})
    assert result.structured_content == {"result": 5.0}
