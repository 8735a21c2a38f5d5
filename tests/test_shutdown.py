"""SIGTERM with streams open and calls running: the server stops taking requests, ends the streams
cleanly, lets calls finish within SHUTDOWN_GRACE or answers them with an error, and exits within the
grace; the SDK's own Client carries on once the server is back."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client

from tests.conftest import EventStream, assert_no_traceback, eventually, mcp_headers, open_session, start_server

pytestmark = pytest.mark.anyio
GRACE_S = 4
MODERN = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def call(steps: int, request_id: int) -> dict[str, Any]:
    arguments = {"steps": steps, "step_seconds": 0.5}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": "long_task", "arguments": arguments, "_meta": {"progressToken": request_id}}}


async def test_sigterm_drains_streams_and_calls_then_clients_carry_on(tmp_path: Path) -> None:
    server = start_server(tmp_path, env={"SHUTDOWN_GRACE": str(GRACE_S)})
    with httpx2.Client() as http:
        session = open_session(http, server.mcp_url)
    legacy = mcp_headers(session_id=session, **{"mcp-protocol-version": "2025-11-25"})
    modern = mcp_headers("2026-07-28", **{"mcp-method": "subscriptions/listen"})
    get_stream = EventStream(server.mcp_url, {**legacy, "accept": "text/event-stream"})
    listen = EventStream(server.mcp_url, modern, method="POST", body={
        "jsonrpc": "2.0", "id": 5, "method": "subscriptions/listen",
        "params": {"notifications": {"resourcesListChanged": True}, "_meta": MODERN}})
    short_call = EventStream(server.mcp_url, legacy, method="POST", body=call(2, 7))
    long_call = EventStream(server.mcp_url, legacy, method="POST", body=call(40, 8))
    async with Client(server.mcp_url, mode="2026-07-28") as client:
        await anyio.to_thread.run_sync(get_stream.wait_until_answered)  # open
        for stream in (short_call, long_call, listen):
            await anyio.to_thread.run_sync(stream.wait_for, 1)  # running: a first step, or the acknowledgement
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        await anyio.to_thread.run_sync(lambda: eventually(
            lambda: refuses_connections(server.port), awaiting="the server to close its listening socket"))
        with pytest.raises(httpx2.ConnectError):  # no new request is taken: the listening socket is closed
            await anyio.to_thread.run_sync(lambda: httpx2.post(
                server.mcp_url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers=mcp_headers()))
        code = await anyio.to_thread.run_sync(server.process.wait, 20)
        took = time.monotonic() - started
        log = server.log()
        for stream in (get_stream, listen, short_call, long_call):
            stream.join(5)
        restarted = start_server(tmp_path, port=server.port, env={"SHUTDOWN_GRACE": str(GRACE_S)})
        try:
            after = await client.call_tool("add", {"a": 1, "b": 2})
        finally:
            restarted.stop()
    assert code == 0 and took < GRACE_S, f"exited {took:.2f} s after SIGTERM"
    assert get_stream.ending == listen.ending == "clean", (get_stream.ending, listen.ending)
    assert short_call.ending == long_call.ending == "clean"
    assert short_call.messages[-1]["result"]["structuredContent"]["steps_completed"] == 2, "finished in the grace"
    assert long_call.messages[-1]["error"]["code"] == -32000 and "shutting down" in long_call.messages[-1]["error"][
        "message"], long_call.messages[-1]
    says = f"draining: 2 open streams end now, 2 calls in flight get {GRACE_S - 1.5:.1f} s (SHUTDOWN_GRACE {GRACE_S} s"
    assert says in log, "the log says how long calls get, and they get that long"
    assert f"stopped 1 calls still running after {GRACE_S - 1.5:.1f} s of shutdown" in log
    assert "ASGI callable returned without completing response" not in log
    assert_no_traceback(log)
    assert after.structured_content == {"result": 3.0}, "the 2026-07-28 client carries on once the server is back"
