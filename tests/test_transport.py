"""The HTTP layer: bad input gets a specific answer and changes nothing; host, origin and CORS
checks; limits; health; shutdown; binding rules. Each against a real server process."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import server as server_module
from tests.conftest import (
    INITIALIZE,
    REPO,
    TIME_FOR_A_TRACEBACK_S,
    ServerProcess,
    first_json,
    mcp_headers,
    open_session,
    running_server,
    start_server,
)

MODERN = "2026-07-28"
MODERN_META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
PING = {"jsonrpc": "2.0", "id": 9, "method": "ping"}


def post(server: ServerProcess, body: bytes | str | Any, headers: dict[str, str] | None = None,
         **kwargs: Any) -> httpx2.Response:
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    return httpx2.post(server.mcp_url, content=content, headers=headers or mcp_headers(), timeout=10, **kwargs)


def assert_error(response: httpx2.Response, status: int, code: int, words: str) -> None:
    assert response.status_code == status, response.text
    error = first_json(response.text)["error"]
    assert error["code"] == code, error
    assert words in error["message"], error


@pytest.mark.parametrize(("body", "status", "code", "words"), [
    (b'{"jsonrpc": "2.0", "id": 1, "method": "ping"', 400, -32700, "not valid JSON"),
    (b"\xff\xfe not even text", 400, -32700, "not valid JSON"),
    ([PING, PING], 400, -32600, "Batches are not supported"),
    ({"hello": "world"}, 400, -32600, '"jsonrpc": "2.0"'),
    ({"jsonrpc": "1.0", "id": 1, "method": "ping"}, 400, -32600, '"jsonrpc": "2.0"'),
    ({"jsonrpc": "2.0", "id": 1, "method": 42}, 400, -32600, '"method" must be a non-empty string'),
    ({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": [1, 2]}, 400, -32600, '"params" must be an object'),
    ({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}, 400, -32600, '"id" must be a string or an integer'),
    ({"jsonrpc": "2.0", "id": True, "method": "ping"}, 400, -32600, '"id" must be a string or an integer'),
    ({"jsonrpc": "2.0", "id": 1}, 400, -32600, 'needs "method", "result" or "error"'),
    ("[]", 400, -32600, "Batches are not supported"),
    ("null", 400, -32600, '"jsonrpc": "2.0"'),
])
def test_malformed_bodies_get_parse_or_invalid_request_errors(server: ServerProcess, body: Any, status: int,
                                                               code: int, words: str) -> None:
    assert_error(post(server, body), status, code, words)


def test_wrong_content_type_is_415(server: ServerProcess) -> None:
    response = post(server, PING, headers={**mcp_headers(), "content-type": "text/plain"})
    assert_error(response, 415, -32600, "Content-Type must be application/json")


def test_wrong_accept_is_406(server: ServerProcess) -> None:
    html_only = post(server, INITIALIZE, headers={**mcp_headers(), "accept": "text/html"})
    assert_error(html_only, 406, -32600, "Accept must include")
    json_only = post(server, INITIALIZE, headers={**mcp_headers(), "accept": "application/json"})
    if server.env["MODE"] == "stateless-json":
        assert json_only.status_code == 200, "a JSON-response server needs only application/json"
    else:
        assert_error(json_only, 406, -32600, "Accept must include application/json and text/event-stream")


def test_oversized_bodies_are_413_whether_declared_or_streamed(server: ServerProcess) -> None:
    big = json.dumps({**INITIALIZE, "params": {**INITIALIZE["params"], "pad": "x" * (1 << 20)}})
    assert_error(post(server, big), 413, -32600, "larger than 1048576 bytes")

    def chunks() -> Any:
        for _ in range(2048):
            yield b" " * 1024  # 2 MiB with no Content-Length

    chunked = httpx2.post(server.mcp_url, content=chunks(), headers=mcp_headers(), timeout=10)
    assert_error(chunked, 413, -32600, "larger than 1048576 bytes")


def test_foreign_host_is_421_and_foreign_origin_403(server: ServerProcess) -> None:
    rebinding = post(server, INITIALIZE, headers={**mcp_headers(), "host": "evil.example:80"})
    assert_error(rebinding, 421, -32600, "Host 'evil.example:80' is not served here")
    cross_site = post(server, INITIALIZE, headers={**mcp_headers(), "origin": "https://evil.example"})
    assert_error(cross_site, 403, -32600, "Origin 'https://evil.example' is not allowed")
    local_tool = post(server, INITIALIZE, headers={**mcp_headers(), "origin": "http://localhost:6274"})
    assert local_tool.status_code == 200


def test_unknown_method_is_method_not_found(server: ServerProcess) -> None:
    with httpx2.Client() as http:
        session = open_session(http, server.mcp_url) if server.env["MODE"] == "stateful" else None
        legacy = http.post(server.mcp_url, json={"jsonrpc": "2.0", "id": 3, "method": "no/such"},
                           headers=mcp_headers(session_id=session))
    assert legacy.status_code == 200
    assert first_json(legacy.text)["error"]["code"] == -32601
    modern = post(server, {"jsonrpc": "2.0", "id": 3, "method": "no/such", "params": {"_meta": MODERN_META}},
                  headers=mcp_headers(MODERN, **{"mcp-method": "no/such"}))
    assert_error(modern, 404, -32601, "Method not found")


def test_modern_requests_need_their_envelope_and_matching_headers(server: ServerProcess) -> None:
    call = {"jsonrpc": "2.0", "id": 4, "method": "tools/list", "params": {}}
    no_meta = post(server, call, headers=mcp_headers(MODERN, **{"mcp-method": "tools/list"}))
    assert_error(no_meta, 400, -32602, "params._meta")
    mismatch = post(server, {**call, "params": {"_meta": MODERN_META}},
                    headers=mcp_headers(MODERN, **{"mcp-method": "tools/call"}))
    assert_error(mismatch, 400, -32020, "does not match")
    future = post(server, {**call, "params": {"_meta": {**MODERN_META,
                                                         "io.modelcontextprotocol/protocolVersion": "2099-01-01"}}},
                  headers=mcp_headers("2099-01-01", **{"mcp-method": "tools/list"}))
    assert future.status_code == 400
    assert "Unsupported protocol version" in first_json(future.text)["error"]["message"]


@pytest.mark.parametrize("mode", [("--stateless",), ("--stateless", "--json-response")])
def test_stateless_servers_have_no_get_stream_or_session_to_delete(tmp_path: Path, mode: tuple[str, ...]) -> None:
    with running_server(tmp_path, *mode) as server:
        for method in ("GET", "DELETE"):
            response = httpx2.request(method, server.mcp_url, headers={"accept": "text/event-stream",
                                                                       "last-event-id": "0"})
            assert_error(response, 405, -32600, "this server is stateless")
            assert response.headers["allow"] == "POST"


def test_session_rules_in_stateful_mode(stateful_server: ServerProcess) -> None:
    unknown = post(stateful_server, PING, headers=mcp_headers(session_id="0" * 32))
    assert_error(unknown, 404, -32600, "Session not found")
    missing = post(stateful_server, PING)
    assert missing.status_code == 400
    assert "session" in first_json(missing.text)["error"]["message"].lower()
    put = httpx2.put(stateful_server.mcp_url, json=PING, headers=mcp_headers())
    assert put.status_code == 405


def test_rejected_requests_change_nothing(tmp_path: Path) -> None:
    """With room for one session, a flood of bad requests must leave that room free."""
    with running_server(tmp_path, env={"MAX_SESSIONS": "1"}) as server:
        for bad in (b"{", json.dumps([INITIALIZE]).encode(), json.dumps({**INITIALIZE, "jsonrpc": "1"}).encode()):
            assert post(server, bad).status_code == 400
        assert post(server, INITIALIZE, headers={**mcp_headers(), "content-type": "text/plain"}).status_code == 415
        assert post(server, INITIALIZE, headers={**mcp_headers(), "host": "evil.example"}).status_code == 421
        with httpx2.Client() as http:
            open_session(http, server.mcp_url)


def test_cors_lets_local_browser_tools_in_and_exposes_the_mcp_headers(server: ServerProcess) -> None:
    preflight = httpx2.options(server.mcp_url, headers={
        "origin": "http://localhost:6274", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type, mcp-protocol-version, mcp-session-id, "
                                          "mcp-method, mcp-name, last-event-id"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:6274"
    allowed = preflight.headers["access-control-allow-headers"].lower()
    for header in ("authorization", "mcp-session-id", "mcp-protocol-version", "mcp-method", "mcp-name",
                   "last-event-id"):
        assert header in allowed
    response = post(server, INITIALIZE, headers={**mcp_headers(), "origin": "http://localhost:6274"})
    exposed = response.headers["access-control-expose-headers"].lower()
    assert "mcp-session-id" in exposed and "www-authenticate" in exposed
    foreign = httpx2.options(server.mcp_url, headers={"origin": "https://evil.example",
                                                      "access-control-request-method": "POST"})
    assert foreign.status_code == 400 and "access-control-allow-origin" not in foreign.headers


def test_configured_origins_are_allowed_for_cors_and_rebinding_checks(tmp_path: Path) -> None:
    with running_server(tmp_path, "--stateless", env={"CORS_ORIGINS": "https://inspector.example.com"}) as server:
        response = post(server, INITIALIZE, headers={**mcp_headers(), "origin": "https://inspector.example.com"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://inspector.example.com"


def test_extra_allowed_hosts_are_served(tmp_path: Path) -> None:
    env = {"ALLOWED_HOSTS": "mcp.internal:*,gateway.example"}
    with running_server(tmp_path, "--stateless", env=env) as server:
        assert post(server, INITIALIZE, headers={**mcp_headers(), "host": "mcp.internal:9000"}).status_code == 200
        assert post(server, INITIALIZE, headers={**mcp_headers(), "host": "gateway.example"}).status_code == 200
        assert post(server, INITIALIZE, headers={**mcp_headers(), "host": "gateway.example:1"}).status_code == 421


def test_healthz_says_the_process_is_up_and_readyz_that_it_can_serve(server: ServerProcess) -> None:
    health = httpx2.get(server.base_url + "/healthz")
    assert health.status_code == 200
    body = health.json()
    sessions = {} if "stateless" in server.env["MODE"] else {"sessions": body.get("sessions")}
    assert body == {"status": "ok", "version": server_module.VERSION,
                    "mode": server.env["MODE"].replace("-", "+"), **sessions}
    assert "stateless" in server.env["MODE"] or isinstance(body["sessions"], int)
    ready = httpx2.get(server.base_url + "/readyz")
    assert ready.status_code == 200
    store_mode = "standalone" if "STORE_URL" in server.env else "sqlite"
    assert ready.json() == {"status": "ready", "checks": {"store": "ok", "shutdown": "no"}, "store_mode": store_mode}
    assert len(ready.headers["x-request-id"]) == 16 and ready.headers["x-request-id"] != health.headers["x-request-id"]


def test_sigterm_shuts_down_cleanly_with_streams_open(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    with httpx2.Client(timeout=30) as http:
        session = open_session(http, server.mcp_url)
        with http.stream("GET", server.mcp_url, headers={"accept": "text/event-stream", "mcp-session-id": session}):
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = server.process.wait(20)
    assert code == 0
    assert time.monotonic() - started < 10
    log = server.log()
    assert "Application shutdown complete" in log and "Traceback" not in log


def test_non_loopback_without_sign_in_is_refused_unless_overridden(tmp_path: Path) -> None:
    refused = subprocess.run([sys.executable, str(REPO / "server.py"), "--host", "0.0.0.0", "--port", "0"],
                             capture_output=True, text=True, timeout=30, cwd=tmp_path, check=False)
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0 without sign-in" in refused.stderr
    assert "GOOGLE_CLIENT_ID" in refused.stderr and "--allow-unauthenticated" in refused.stderr
    with running_server(tmp_path, "--host", "0.0.0.0", "--allow-unauthenticated") as server:
        log = server.log()
    assert "WITHOUT sign-in (ALLOW_UNAUTHENTICATED)" in log


def test_bad_configuration_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "server.py"), "--port", "http"],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "LOG_LEVEL": "LOUD", "MAX_SESSIONS": "0"}, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    for problem in ("PORT='http' is not a whole number", "LOG_LEVEL='LOUD' is not one of", "MAX_SESSIONS=0"):
        assert problem in result.stderr


def test_a_request_method_sent_as_a_notification_is_dropped_quietly(tmp_path: Path) -> None:
    """Found by the fuzz below: `logging/setLevel` without an id, with a bad level, logged a traceback."""
    with running_server(tmp_path, "--stateless") as server:
        response = httpx2.post(server.mcp_url, headers=mcp_headers(), json={
            "jsonrpc": "2.0", "method": "logging/setLevel", "params": {"level": "loud"}})
        time.sleep(TIME_FOR_A_TRACEBACK_S)  # the notification is handled after the 202
        log = server.log()
    assert response.status_code == 202
    assert "Traceback" not in log and "raised" not in log


# --- property-based fuzzing: whatever arrives, never a 500 or a traceback

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
METHODS = st.sampled_from(["initialize", "ping", "tools/list", "tools/call", "resources/read", "resources/list",
                           "prompts/get", "completion/complete", "subscriptions/listen", "server/discover",
                           "notifications/initialized", "logging/setLevel"]) | st.text(max_size=15)
MESSAGES = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "1.0"]), "method": METHODS},
    optional={"id": st.integers() | st.text(max_size=8) | st.none(), "params": JSON_VALUES,
              "result": JSON_VALUES},
)
BODIES = MESSAGES.map(json.dumps).map(str.encode) | JSON_VALUES.map(json.dumps).map(str.encode) | st.binary(max_size=64)
HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=15)
HEADERS = st.fixed_dictionaries({}, optional={
    "content-type": st.sampled_from(["application/json", "text/plain", "application/json; charset=utf-8", ""]),
    "accept": st.sampled_from(["application/json, text/event-stream", "application/json", "*/*", "text/html", ""]),
    "mcp-protocol-version": st.sampled_from(["2025-11-25", "2025-06-18", MODERN, "1999-01-01", ""]),
    "mcp-session-id": st.sampled_from(["", "nonsense", "0" * 32]),
    "mcp-method": HEADER_TEXT | st.sampled_from(["tools/list", "tools/call"]),
    "mcp-name": HEADER_TEXT,
    "last-event-id": st.text(alphabet="abcxyz-_0123456789", max_size=20),
})


@dataclass
class Fuzzed:
    """The server (one per mode) the fuzz below sends its requests to, and how many it has sent it."""

    server: ServerProcess
    sent: int = 0


@pytest.fixture(scope="module")
def fuzzed(server: ServerProcess) -> Fuzzed:
    return Fuzzed(server)


@given(body=BODIES, headers=HEADERS, method=st.sampled_from(["POST", "POST", "POST", "GET", "DELETE"]))
@settings(max_examples=300, deadline=None)
def fuzz_requests(fuzzed: Fuzzed, body: bytes, headers: dict[str, str], method: str) -> None:
    fuzzed.sent += 1
    with httpx2.Client(timeout=10) as http:
        try:
            response = http.request(method, fuzzed.server.mcp_url, content=body if method == "POST" else None,
                                    headers=headers)
        except httpx2.ReadTimeout:
            return  # a GET that was accepted as an event stream stays open, which is correct
    assert response.status_code < 500, (response.status_code, response.text)
    assert "Traceback" not in response.text


def test_fuzzed_requests_never_get_a_500(fuzzed: Fuzzed) -> None:
    fuzz_requests(fuzzed)


def test_the_fuzzed_servers_logged_no_traceback(fuzzed: Fuzzed) -> None:
    """Whichever tests ran before it, and in whatever order: if the fuzz has not yet hit this mode's server,
    it runs here first, so the log checked is always that of a fuzzed server."""
    if not fuzzed.sent:
        fuzz_requests(fuzzed)
    assert fuzzed.sent
    time.sleep(TIME_FOR_A_TRACEBACK_S)
    assert "Traceback" not in fuzzed.server.log()


def test_a_client_that_leaves_mid_body_costs_no_traceback(tmp_path: Path) -> None:
    """A load generator stopping, or a client timing out, leaves requests half-sent: the server drops them
    quietly and keeps serving."""
    with running_server(tmp_path) as server:
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Accept: application/json, text/event-stream\r\nContent-Length: 1000\r\n\r\n"
                             b'{"jsonrpc": "2.0",')
                time.sleep(0.05)
        time.sleep(TIME_FOR_A_TRACEBACK_S)
        session = open_session(httpx2.Client(), server.mcp_url)
        answer = post(server, PING, mcp_headers(session_id=session))
        assert answer.status_code == 200 and first_json(answer.text)["result"] == {}
        assert "Exception in ASGI application" not in server.log()
        assert "Traceback" not in server.log()
