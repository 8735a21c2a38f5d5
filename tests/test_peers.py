"""Third-party peers against real server processes: the official conformance suite, the Inspector
(CLI, and the web app `mcp dev` launches), mcp-remote (Claude Desktop's route), the SDK's Client over
stdio through `mcp run`, and the seed's trailing-slash URL."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client, StdioServerParameters

import server as server_module
from tests.conftest import (
    MODES,
    REPO,
    EventStream,
    Peers,
    ServerProcess,
    eventually,
    free_port,
    install_peers,
    running_server,
)

CONFORMANCE = "@modelcontextprotocol/conformance/dist/index.js"
INSPECTOR = "@modelcontextprotocol/inspector/clients/launcher/build/index.js"
MCP_REMOTE = "mcp-remote/dist/proxy.js"
NODE20_PEERS = REPO / "tests" / "peers" / "node20"  # the Inspector npx gives Node 20 (0.15), for `mcp dev`


def start_conformance_server(workdir: Path, mode: str) -> ServerProcess:
    """tests/conformance_server.py: server.py plus the suite's test tools, started with the same flags."""
    from tests import conftest

    port = free_port()
    log_path = workdir / "conformance-server.log"
    env = {**os.environ, "DATA_DIR": str(workdir / "data")}
    for name in conftest.SETTING_NAMES - {"DATA_DIR"}:
        env.pop(name, None)
    workdir.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, str(REPO / "tests" / "conformance_server.py"), "--port",
                                    str(port), *MODES[mode]], cwd=workdir, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    server = ServerProcess(process, port, workdir, log_path, f"http://localhost:{port}", env)
    conftest.wait_for_port(port)
    return server


def conformance_totals(output: str) -> tuple[int, int]:
    totals = re.search(r"Total: (\d+) passed, (\d+) failed", output)
    assert totals is not None, output[-3000:]
    return int(totals.group(1)), int(totals.group(2))


@pytest.mark.parametrize("mode", list(MODES))
def test_conformance_suite_passes_every_active_server_scenario(peers: Peers, tmp_path: Path, mode: str) -> None:
    server = start_conformance_server(tmp_path, mode)
    baseline = REPO / "tests" / "conformance" / f"expected-failures-{mode}.yaml"
    try:
        result = peers.run(CONFORMANCE, "server", "--url", server.mcp_url, "--suite", "active",
                           "--expected-failures", str(baseline), timeout_s=300, cwd=tmp_path)
    finally:
        server.stop()
    summary = result.stdout[result.stdout.find("=== SUMMARY ==="):]
    print(summary)  # the totals go into the test log for the closing note
    assert result.returncode == 0, summary + result.stderr[-2000:]
    passed, failed = conformance_totals(summary)
    expected = {line.strip()[2:] for line in baseline.read_text().splitlines() if line.strip().startswith("- ")}
    failing = set(re.findall(r"✗ ([\w-]+):", summary))
    assert failing <= expected, f"unexpected failures: {failing - expected}"
    assert passed >= 24  # 30 active scenarios, less the baseline
    if expected:
        assert "Baseline check passed: all failures are expected." in result.stdout
    else:
        assert failed == 0
    assert "Traceback" not in server.log()


def test_conformance_pending_scenarios_have_no_failed_check(peers: Peers, tmp_path: Path) -> None:
    """The suite's pending scenarios: JSON Schema 2020-12 passes; SSE polling ends with warnings only,
    because it POSTs with MCP-Protocol-Version 2025-03-26, for which the SDK rightly sends no priming
    event (older clients cannot parse one) and so cannot resume a closed stream."""
    server = start_conformance_server(tmp_path, "stateful")
    try:
        result = peers.run(CONFORMANCE, "server", "--url", server.mcp_url, "--suite", "pending",
                           timeout_s=300, cwd=tmp_path)
    finally:
        server.stop()
    summary = result.stdout[result.stdout.find("=== SUMMARY ==="):]
    print(summary)
    assert "✓ json-schema-2020-12: 4 passed, 0 failed" in summary
    assert "server-sse-polling: 0 passed, 0 failed" in summary
    assert conformance_totals(summary)[1] == 0


def test_inspector_cli_lists_and_calls_tools(peers: Peers, server: ServerProcess, tmp_path: Path) -> None:
    env = peers.node_env(HOME=str(tmp_path))
    listed = peers.run(INSPECTOR, "--cli", server.mcp_url, "--transport", "http", "--method", "tools/list",
                       env=env, timeout_s=60)
    assert listed.returncode == 0, listed.stderr
    assert {tool["name"] for tool in json.loads(listed.stdout)["tools"]} >= {"add", "add_note", "delete_note"}
    called = peers.run(INSPECTOR, "--cli", server.mcp_url, "--transport", "http", "--method", "tools/call",
                       "--tool-name", "add", "--tool-arg", "a=40", "--tool-arg", "b=2", env=env, timeout_s=60)
    assert called.returncode == 0, called.stderr
    result = json.loads(called.stdout)
    assert result["structuredContent"] == {"result": 42}
    assert result["isError"] is False


def mcp_remote(peers: Peers, url: str, config_dir: Path) -> StdioServerParameters:
    """Claude Desktop's route: a stdio server that is mcp-remote proxying to our HTTP endpoint."""
    return StdioServerParameters(command=peers.node22, args=[peers.bin(MCP_REMOTE), url],
                                 env=peers.node_env(MCP_REMOTE_CONFIG_DIR=str(config_dir), HOME=str(config_dir)))


@pytest.mark.anyio
async def test_a_stdio_session_through_mcp_remote(peers: Peers, server: ServerProcess, tmp_path: Path) -> None:
    async with Client(mcp_remote(peers, server.mcp_url, tmp_path), mode="legacy") as claude:
        assert claude.server_info is not None
        assert claude.server_info.name == "stream-http"
        tools = {tool.name for tool in (await claude.list_tools()).tools}
        added = await claude.call_tool("add_note", {"title": "via mcp-remote"})
        summed = await claude.call_tool("add", {"a": 1, "b": 2})
    assert "search_notes" in tools
    assert added.structured_content["title"] == "via mcp-remote"
    assert summed.structured_content == {"result": 3}


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["stateful", "stateless"])
async def test_the_seeds_trailing_slash_url(peers: Peers, tmp_path: Path, mode: str, era: str) -> None:
    """The seed's Claude Desktop snippet: mcp-remote at http://localhost:8080/mcp/ (the localhost name, the
    slash), on a port of the test's own rather than 8080, which may be someone's own server."""
    port = free_port()
    url = f"http://localhost:{port}/mcp/"
    with running_server(tmp_path, *MODES[mode], port=port):
        async with Client(mcp_remote(peers, url, tmp_path), mode="legacy") as claude:
            through_remote = await claude.call_tool("echo", {"message": "hello from mcp-remote"})
        async with Client(url, mode=era) as sdk:
            direct = await sdk.call_tool("echo", {"message": "hello from the SDK"})
    assert through_remote.structured_content == {"result": "hello from mcp-remote"}
    assert direct.structured_content == {"result": "hello from the SDK"}


@pytest.mark.anyio
async def test_stdio_through_mcp_run(tmp_path: Path, era: str) -> None:
    mcp_cli = str(Path(sys.executable).with_name("mcp"))
    parameters = StdioServerParameters(command=mcp_cli, args=["run", str(REPO / "server.py")], cwd=str(tmp_path),
                                       env={**os.environ, "DATA_DIR": str(tmp_path / "data")})
    async with Client(parameters, mode=era) as stdio:
        note = await stdio.call_tool("add_note", {"title": "over stdio", "tags": ["local"]})
        found = await stdio.call_tool("search_notes", {"tag": "local"})
        info = json.loads((await stdio.read_resource("server://info")).contents[0].text)
    assert found.structured_content["notes"][0]["id"] == note.structured_content["id"]
    assert info["name"] == "stream-http"
    assert (tmp_path / "data" / "stream-http.db").exists()


@pytest.mark.anyio
async def test_stdio_clients_hear_their_list_changes(tmp_path: Path) -> None:
    import anyio
    import mcp_types as types

    heard: list[str] = []
    both = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceListChangedNotification | types.ResourceUpdatedNotification):
            heard.append(message.method)
            if len(heard) == 2:
                both.set()

    mcp_cli = str(Path(sys.executable).with_name("mcp"))
    parameters = StdioServerParameters(command=mcp_cli, args=["run", str(REPO / "server.py")], cwd=str(tmp_path),
                                       env={**os.environ, "DATA_DIR": str(tmp_path / "data")})
    async with Client(parameters, mode="legacy", message_handler=on_message) as stdio:
        await stdio.subscribe_resource("notes://index")
        await stdio.call_tool("add_note", {"title": "announced over stdio"})
        with anyio.fail_after(10):
            await both.wait()
    assert sorted(heard) == ["notifications/resources/list_changed", "notifications/resources/updated"]


# --- `mcp dev server.py`: the Inspector web app, driven through its own API


def response_to(events: EventStream, request_id: int, timeout_s: float = 30) -> dict[str, Any]:
    """The response to `request_id` among the MCP messages the Inspector relays on its /api/mcp/events stream."""
    def answered() -> dict[str, Any] | None:
        return next((relayed["data"] for relayed in events.messages if isinstance(relayed.get("data"), dict)
                     and relayed["data"].get("id") == request_id and "result" in relayed["data"]), None)

    return eventually(answered, timeout_s, awaiting=f"the Inspector to relay the response to {request_id}",
                      interval_s=0.1, showing=lambda: events.messages[-5:])


@dataclass
class McpDev:
    """A running `uv run mcp dev server.py`: its process (which leads a session of its own, so every process
    it starts is found by that session) and everything it has printed so far."""

    process: subprocess.Popen[str]
    output: list[str]

    def printed(self) -> str:
        return "".join(self.output)

    def commands(self) -> list[list[str]]:
        """The command line of every process `mcp dev` started, and of the processes they started."""
        commands = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):  # a process that has just ended
                if int(stat.read_text().rpartition(")")[2].split()[3]) == self.process.pid:
                    commands.append((stat.parent / "cmdline").read_bytes().decode().split("\0")[:-1])
        return commands


@contextlib.contextmanager
def running_mcp_dev(cwd: Path, env: dict[str, str], ready: str) -> Iterator[tuple[McpDev, re.Match[str]]]:
    """`uv run mcp dev server.py` as README says, run from `cwd` so that npx finds the Inspector pinned there,
    once it has printed what `ready` matches (and that match). Its output is read on a thread of its own, so
    it never waits for the test to read it."""
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    process = subprocess.Popen([uv, "run", "--project", str(REPO), "mcp", "dev", str(REPO / "server.py")],
                               cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    dev = McpDev(process, [])

    def read() -> None:
        for line in process.stdout or ():
            dev.output.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def printed() -> re.Match[str] | None:
        exited = process.poll() is not None
        if exited:
            reader.join(5)  # all it printed before it ended
        found = re.search(ready, dev.printed())
        assert found or not exited, "`mcp dev` exited:\n" + dev.printed()
        return found

    try:
        yield dev, eventually(printed, 120, awaiting=f"`mcp dev` to print {ready!r}", interval_s=0.1,
                              showing=dev.printed)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)


@pytest.fixture
def mcp_dev(peers: Peers, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """`mcp dev server.py`, run from the peers directory so npx finds the pinned Inspector (2.12, on Node 22)."""
    env = peers.node_env(HOME=str(tmp_path), MCP_AUTO_OPEN_ENABLED="false", CLIENT_PORT=str(free_port()),
                         DATA_DIR=str(tmp_path / "data"), MCP_INSPECTOR_SECRET_STORE="memory")
    address = r"(http://127\.0\.0\.1:\d+)\?MCP_INSPECTOR_API_TOKEN=(\w+)"
    with running_mcp_dev(peers.root, env, address) as (_, url):
        yield url.group(1), {"x-mcp-remote-auth": f"Bearer {url.group(2)}"}


def test_mcp_dev_opens_the_inspector_on_this_server_over_stdio(mcp_dev: tuple[str, dict[str, str]]) -> None:
    base, headers = mcp_dev
    config = httpx2.get(f"{base}/api/config", headers=headers).json()
    assert config["defaultTransport"] == "stdio"
    assert config["defaultArgs"][-3:] == ["mcp", "run", str(REPO / "server.py")], config
    data_dir = str(Path(config["defaultCwd"]).parent / "mcp-dev-data")
    server_config = {"type": "stdio", "command": config["defaultCommand"], "args": config["defaultArgs"],
                     "cwd": config["defaultCwd"], "env": {**config["defaultEnvironment"], "DATA_DIR": data_dir}}
    connected = httpx2.post(f"{base}/api/mcp/connect", headers=headers, json={"config": server_config}, timeout=60)
    assert connected.status_code == 200, connected.text
    session_id = connected.json()["sessionId"]
    events = EventStream(f"{base}/api/mcp/events", headers, params={"sessionId": session_id}, timeout_s=60)
    assert events.wait_until_answered() == 200  # listening before anything is sent
    try:
        def send(message: dict[str, Any]) -> None:
            sent = httpx2.post(f"{base}/api/mcp/send", headers=headers, timeout=60,
                               json={"sessionId": session_id, "message": message})
            assert sent.json().get("ok") is True, sent.text

        send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "inspector", "version": "2"}}})
        assert response_to(events, 1)["result"]["serverInfo"]["name"] == "stream-http"
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "add", "arguments": {"a": 1,
                                                                                                     "b": 1}}})
        assert response_to(events, 2)["result"]["structuredContent"] == {"result": 2}
    finally:
        events.stop()


# --- `mcp dev server.py` on Node 20, where npx takes the Inspector 0.15, driven through its proxy's own API


@pytest.fixture
def mcp_dev_on_node20(tmp_path: Path) -> Iterator[tuple[McpDev, str, dict[str, str]]]:
    """`mcp dev server.py` as a Node 20 user runs it: the system's node and npx (not tests/peers' Node 22),
    from tests/peers/node20, where npx finds the Inspector that Node 20 gets (0.15), pinned. Its cli starts
    the proxy on SERVER_PORT and the web app on CLIENT_PORT; the proxy prints the token its API asks for."""
    node = shutil.which("node")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip() if node else ""
    if not version.startswith("v20."):
        pytest.skip(f"this runs `mcp dev` on the system's Node 20; the system's node is {version or 'missing'}")
    install_peers(NODE20_PEERS)
    proxy_port = free_port()
    env = {**os.environ, "HOME": str(tmp_path), "MCP_AUTO_OPEN_ENABLED": "false", "SERVER_PORT": str(proxy_port),
           "CLIENT_PORT": str(free_port()), "DATA_DIR": str(tmp_path / "data")}
    with running_mcp_dev(NODE20_PEERS, env, r"Session token: (\w+)") as (dev, token):
        yield dev, f"http://127.0.0.1:{proxy_port}", {"x-mcp-proxy-auth": f"Bearer {token.group(1)}"}


def test_mcp_dev_on_node20_opens_inspector_0_15_on_this_server_with_its_packages_whole(
        mcp_dev_on_node20: tuple[McpDev, str, dict[str, str]], tmp_path: Path) -> None:
    """0.15's proxy gets `mcp dev`'s `uv run --with PACKAGE ... mcp run server.py` as one string and splits it
    with a shell parser when it starts the server: a `<` or `>` in server.py's package list would reach uv as
    `[object Object]` ("Failed to spawn: [object Object]"). The test connects as 0.15's web app does: the
    proxy's defaults from /config, an SSE stream from /stdio, messages POSTed to the endpoint it names."""
    dev, base, headers = mcp_dev_on_node20
    config = httpx2.get(f"{base}/config", headers=headers).json()
    assert config["defaultCommand"] == "uv", config
    assert config["defaultArgs"].endswith(f" mcp run {REPO / 'server.py'}"), config
    query = {"transportType": "stdio", "command": config["defaultCommand"], "args": config["defaultArgs"],
             "env": json.dumps({**config["defaultEnvironment"], "DATA_DIR": str(tmp_path / "data")})}
    events = EventStream(f"{base}/stdio", headers, params=query, timeout_s=60)
    try:
        assert events.wait_until_answered() == 200
        endpoint = events.wait_for(1)[0]
        assert endpoint.event == "endpoint", endpoint

        def relayed() -> list[dict[str, Any]]:
            return [json.loads(event.data) for event in events.carrying() if event.event == "message"]

        def seen() -> str:
            return f"the proxy relayed: {relayed()[-10:]}\n`mcp dev` printed:\n{dev.printed()[-3000:]}"

        def started() -> list[list[str]]:
            return [command for command in dev.commands() if Path(command[0]).name == "uv" and "--with" in command]

        spawned = eventually(started, awaiting="the proxy's `uv run --with ... mcp run server.py`", showing=seen)
        assert len(spawned) == 1, spawned
        packages = [spawned[0][at + 1] for at, arg in enumerate(spawned[0]) if arg == "--with"]
        assert set(server_module.mcp.dependencies) <= set(packages), spawned[0]
        assert spawned[0][-3:] == ["mcp", "run", str(REPO / "server.py")], spawned[0]

        def send(message: dict[str, Any]) -> None:
            sent = httpx2.post(base + endpoint.data, headers=headers, json=message, timeout=60)
            assert sent.status_code == 202, f"{sent.text}\n{seen()}"

        def answer_to(request_id: int) -> dict[str, Any]:
            return eventually(lambda: next((message for message in relayed() if message.get("id") == request_id),
                                           None),
                              120, awaiting=f"the proxy to relay the answer to {request_id}", interval_s=0.1,
                              showing=seen)

        send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "inspector", "version": "0"}}})
        assert answer_to(1)["result"]["serverInfo"]["name"] == "stream-http"
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "add", "arguments": {"a": 1,
                                                                                                     "b": 1}}})
        assert answer_to(2)["result"]["structuredContent"] == {"result": 2}
    finally:
        events.stop()
