"""Sign-in through real third-party clients: the TypeScript SDK, mcp-remote (Claude Desktop's route),
the Inspector CLI's headless OAuth, the official conformance suite's authorization scenarios, and the
SDK client across refresh and a server restart."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import Client

from tests.conftest import Peers, ServerProcess, free_port
from tests.headless_browser import Browser
from tests.signin import ALICE, GoogleStandIn, SdkSignIn, auth_server, browser_program, mcp_remote


def test_the_typescript_sdk_client_signs_in(peers: Peers, signin_server: ServerProcess,
                                            google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    node = subprocess.Popen([peers.node22, str(peers.root / "ts_client.mjs"), signin_server.mcp_url],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=peers.node_env())
    assert node.stdout is not None and node.stdin is not None
    line = node.stdout.readline()
    assert line.startswith("AUTHORIZE "), line + (node.stderr.read() if node.stderr else "")
    end = Browser(stop_at="http://127.0.0.1:6888/callback").go(line.split(" ", 1)[1].strip())
    node.stdin.write(end.url + "\n")
    node.stdin.flush()
    output, errors = node.communicate(timeout=60)
    result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
    assert node.returncode == 0, errors
    assert "add_note" in result["tools"]
    assert result["whoami"]["email"] == ALICE["email"]
    assert result["note"]["title"] == "from TypeScript"
    assert result["scope"] == "mcp"


@pytest.mark.anyio
async def test_mcp_remote_signs_in_and_carries_a_stdio_session(peers: Peers, signin_server: ServerProcess,
                                                               google: GoogleStandIn, tmp_path: Path) -> None:
    google.next_login(ALICE)
    claude, visits = mcp_remote(peers, signin_server.mcp_url, tmp_path)
    with anyio.fail_after(90):
        async with Client(claude, mode="legacy") as remote:
            me = (await remote.call_tool("whoami", {})).structured_content
            tools = {tool.name for tool in (await remote.list_tools()).tools}
    assert me["email"] == ALICE["email"]
    assert "search_notes" in tools
    log = visits.read_text()
    assert "/consent?txn=" in log and "/oauth/google/callback" in log
    assert re.search(r"GET 200 http://(localhost|127\.0\.0\.1):\d+/oauth/callback\?code=", log), log
    stored = list((tmp_path / "auth").rglob("*_tokens.json"))
    assert stored, "mcp-remote keeps the tokens this server issued"
    assert "access_token" in json.loads(stored[0].read_text())


def test_the_inspector_cli_signs_in_headlessly(peers: Peers, signin_server: ServerProcess, google: GoogleStandIn,
                                               tmp_path: Path) -> None:
    google.next_login(ALICE)
    browser, visits = browser_program(tmp_path)
    env = peers.node_env(HOME=str(tmp_path), MCP_AUTO_OPEN_ENABLED="true", BROWSER=browser)
    result = peers.run("@modelcontextprotocol/inspector/clients/launcher/build/index.js", "--cli",
                       signin_server.mcp_url, "--transport", "http", "--method", "tools/call",
                       "--tool-name", "whoami", env=env, timeout_s=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads(result.stdout)["structuredContent"]["email"] == ALICE["email"]
    assert "/consent?txn=" in visits.read_text()


@pytest.mark.anyio
async def test_the_sdk_client_refreshes_silently_and_survives_a_restart(google: GoogleStandIn,
                                                                        tmp_path: Path) -> None:
    google.next_login(ALICE)
    # A lifetime long enough that the token cannot expire between sign-in and the first call on a busy
    # machine (the SDK would answer that 401 with a second sign-in).
    with auth_server(google, tmp_path, env={"ACCESS_TOKEN_TTL": "5"}) as server:
        signin = SdkSignIn(server.mcp_url)
        auth = signin.provider()  # one client process: it remembers when its token expires
        async with httpx2.AsyncClient(auth=auth) as http, signin.client(http, "2026-07-28") as mcp:
            await mcp.call_tool("add_note", {"title": "before the restart"})
        port = server.port
    await anyio.sleep(5.5)  # the access token expires while the server is down
    with auth_server(google, tmp_path, env={"ACCESS_TOKEN_TTL": "5"}, port=port) as restarted:
        async with httpx2.AsyncClient(auth=auth) as http, signin.client(http, "2026-07-28") as mcp:
            found = await mcp.call_tool("search_notes", {"query": "restart"})
        log = restarted.log()
    assert signin.sign_ins == 1, "neither the restart nor the expired token needed a new sign-in"
    assert len(signin.storage.history) == 2, "one silent refresh"
    assert found.structured_content["total"] == 1
    assert '"event": "token_refreshed"' in log


def test_conformance_authorization_scenarios_pass(peers: Peers, signin_server: ServerProcess,
                                                  google: GoogleStandIn, tmp_path: Path) -> None:
    """`conformance authorization` (0.2.0-alpha): metadata, and the authorization-code grant with PKCE
    and `iss`, completed through the consent page and the Google stand-in."""
    google.next_login(ALICE)
    port = free_port()
    registered = httpx2.post(signin_server.base_url + "/register", json={
        "client_name": "conformance", "redirect_uris": [f"http://127.0.0.1:{port}/callback"],
        "token_endpoint_auth_method": "none"}).json()
    process = subprocess.Popen(
        [peers.node22, peers.bin("conformance-alpha/dist/index.js"), "authorization", "--url",
         signin_server.base_url, "--client-id", registered["client_id"], "--port", str(port),
         "--resource", signin_server.mcp_url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=peers.node_env(), cwd=tmp_path)
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line)
        if match := re.search(r"^(http://127\.0\.0\.1:\d+/authorize\?\S+)", line):
            end = Browser().go(match.group(1))
            assert end.url.startswith(f"http://127.0.0.1:{port}/callback?code="), end.url
            break
    output = "".join(lines) + process.communicate(timeout=120)[0]
    summary = output[output.find("=== SUMMARY ==="):]
    print(summary)
    assert process.returncode == 0, output[-4000:]
    assert "✓ authorization-server-metadata-endpoint: 2 passed, 0 failed" in summary
    assert "✓ authorization-code-grant: 1 passed, 0 failed" in summary
