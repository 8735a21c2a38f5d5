"""What a hostile review of the running server found, each with the request and the answer it must get:
request-head limits, clients that leave mid-body, the PKCE verifier's format, unsupported registration
metadata and repeated parameters, hashed client secrets (and registrations from before), private data
files, 405 for wrong methods, and rate limits."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx2
import pytest

from tests.conftest import (
    REPO,
    TIME_FOR_A_TRACEBACK_S,
    ServerProcess,
    StoreUnderTest,
    current_store,
    free_port,
    mcp_headers,
    running_server,
)
from tests.headless_browser import Browser
from tests.signin import ALICE, GoogleStandIn, RawClient, auth_server, mcp_call, pkce_pair

PREVIOUS_RELEASE = "ac5fdad"  # the last commit of version 0.1: its stores are upgraded in place


def raw(port: int, request: bytes) -> bytes:
    """Write `request` on a fresh connection and read what comes back (or how the connection ended)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request)
        except OSError as exc:  # the server closed the connection while the request was still arriving
            return f"closed: {exc}".encode()
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError as exc:
            return answer or f"closed: {exc}".encode()
    return answer


# --- the request head


@pytest.mark.parametrize(("shape", "headers"), [
    ("one 64 KB header", b"X-Big: " + b"a" * 65_536 + b"\r\n"),
    ("one 8 MiB header", b"X-Big: " + b"a" * (8 * 1024 * 1024) + b"\r\n"),
    ("200 headers of 1 KB", b"".join(b"X-H%d: %s\r\n" % (n, b"b" * 1000) for n in range(200))),
    ("150 small headers", b"".join(b"X-H%d: v\r\n" % n for n in range(150))),
    ("20,000 tiny headers", b"".join(b"h%d:v\r\n" % n for n in range(20_000))),
])
def test_an_oversized_request_head_is_refused_before_any_work(stateful_server: ServerProcess, shape: str,
                                                              headers: bytes) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n"
    answer = raw(stateful_server.port, head)
    assert answer.startswith((b"HTTP/1.1 431 ", b"closed:")), (shape, answer[:200])
    healthy = raw(stateful_server.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert healthy.startswith(b"HTTP/1.1 200 "), "the server stays healthy for everyone else"
    assert "Traceback" not in stateful_server.log()


def test_what_arrives_with_a_head_is_not_counted_as_head(stateful_server: ServerProcess) -> None:
    """A body of 2,000 lines, or a second request, sent in the same packet as a head is not taken for head
    lines (the first read of a request behind nginx or from curl holds both)."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"_meta": {
        f"k{n}": n for n in range(2_000)}}}, indent=1).encode()
    assert body.count(b"\n") > 2_000
    head = (b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json, "
            b"text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(body))
    answer = raw(stateful_server.port, head + body + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Connection: close\r\n\r\n")
    first, _, rest = answer.partition(b"\r\n")
    assert first.startswith(b"HTTP/1.1 400 ") and b"session" in rest.lower(), answer[:300]  # no session: the SDK's 400
    assert rest.count(b"HTTP/1.1 200 ") == 1, "the pipelined request after it is served too"


def test_a_head_over_the_limit_is_refused_when_it_arrives_in_pieces(stateful_server: ServerProcess) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Big: " + b"d" * 40_000 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", stateful_server.port), timeout=10) as sock:
        try:
            for start in range(0, len(head), 4_000):
                sock.sendall(head[start:start + 4_000])
                time.sleep(0.01)
            answer = sock.recv(65536)
        except OSError as exc:
            answer = f"closed: {exc}".encode()
    assert answer.startswith((b"HTTP/1.1 431 ", b"closed:")), answer[:200]


def test_a_request_head_within_the_limit_is_served(stateful_server: ServerProcess) -> None:
    headers = b"".join(b"X-H%d: %s\r\n" % (n, b"c" * 200) for n in range(60))  # 60 headers, 12 KB
    answer = raw(stateful_server.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers +
                 b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")


# --- clients that leave mid-body


def test_a_client_that_leaves_mid_body_on_any_oauth_route_costs_no_traceback(signin_server: ServerProcess) -> None:
    for method, path in (("POST", "/register"), ("POST", "/token"), ("POST", "/revoke"), ("POST", "/authorize"),
                         ("POST", "/consent")):
        content_type = b"application/json" if path == "/register" else b"application/x-www-form-urlencoded"
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", signin_server.port)) as sock:
                sock.sendall(b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: %s\r\nContent-Length: 1000\r\n\r\n"
                             b"client_id=abc&" % (method.encode(), path.encode(), content_type))
                time.sleep(0.05)
    time.sleep(TIME_FOR_A_TRACEBACK_S)
    assert httpx2.get(signin_server.base_url + "/healthz").status_code == 200
    log = signin_server.log()
    assert "Exception in ASGI application" not in log and "ClientDisconnect" not in log
    assert "Traceback" not in log


# --- PKCE


@pytest.mark.parametrize("verifier", ["abc", "a" * 42, "a" * 129, "a" * 42 + "+", "a" * 42 + "/", "a" * 42 + "=",
                                      "a" * 42 + "é", "a" * 21 + " " + "a" * 21])
def test_a_malformed_code_verifier_gets_invalid_grant_and_uses_up_the_code(signin_server: ServerProcess,
                                                                          google: GoogleStandIn,
                                                                          verifier: str) -> None:
    """RFC 7636 §4.1: 43 to 128 characters of A-Z a-z 0-9 - . _ ~, even when it hashes to the challenge."""
    import base64
    import hashlib

    google.next_login(ALICE)
    client = RawClient.register(signin_server)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    query, _ = client.authorize(challenge)
    refused = client.exchange(query["code"], verifier)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant", refused.text
    assert "RFC 7636" in refused.json()["error_description"]
    good = client.exchange(query["code"], pkce_pair()[0])
    assert good.json()["error"] == "invalid_grant", "the code was used up by the failed attempt"


@pytest.mark.parametrize("challenge", ["a" * 44, "a" * 42 + ".", "a" * 42 + "~", "a" * 128])
def test_a_challenge_that_is_no_s256_hash_is_refused_at_authorize(signin_server: ServerProcess, challenge: str) -> None:
    query, _ = RawClient.register(signin_server).authorize(challenge)
    assert query["error"] == "invalid_request" and "RFC 7636 §4.2" in query["error_description"]


# --- registration metadata and repeated parameters


@pytest.mark.parametrize(("metadata", "words"), [
    ({"grant_types": ["authorization_code", "password"]}, "grant_types may only be"),
    ({"grant_types": ["client_credentials"]}, "grant_types may only be"),
    ({"response_types": ["code", "token"]}, "response_types may only be code"),
])
def test_registration_refuses_what_the_server_does_not_support(signin_server: ServerProcess,
                                                               metadata: dict[str, object], words: str) -> None:
    response = httpx2.post(signin_server.base_url + "/register", json={
        "redirect_uris": ["http://127.0.0.1:7000/cb"], "token_endpoint_auth_method": "none", **metadata})
    assert response.status_code == 400 and response.json()["error"] == "invalid_client_metadata"
    assert words in response.json()["error_description"]


def test_a_registration_with_a_member_given_twice_is_refused(signin_server: ServerProcess) -> None:
    body = b'{"redirect_uris": ["http://127.0.0.1:7000/a"], "redirect_uris": ["https://evil.example/b"]}'
    response = httpx2.post(signin_server.base_url + "/register", content=body,
                           headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"] == "invalid_client_metadata"
    assert "redirect_uris is given more than once" in response.json()["error_description"]


def test_a_public_client_registering_the_same_metadata_again_gets_the_same_registration(
        signin_server: ServerProcess) -> None:
    body = {"client_name": "Reconnecting app", "redirect_uris": ["http://127.0.0.1:7001/cb"],
            "token_endpoint_auth_method": "none"}
    first, again = (httpx2.post(signin_server.base_url + "/register", json=body) for _ in range(2))
    other = httpx2.post(signin_server.base_url + "/register", json={**body, "client_name": "Another app"})
    assert first.status_code == again.status_code == other.status_code == 201
    assert first.json()["client_id"] == again.json()["client_id"] != other.json()["client_id"]


def test_repeated_parameters_are_invalid_requests(signin_server: ServerProcess) -> None:
    client = RawClient.register(signin_server)
    _, challenge = pkce_pair()
    twice = client.authorize_url(challenge) + "&redirect_uri=http%3A%2F%2F127.0.0.1%3A6777%2Fother"
    page = httpx2.get(twice)
    assert page.status_code == 400 and "location" not in page.headers
    assert "redirect_uri more than once" in page.text
    scoped = httpx2.get(client.authorize_url(challenge) + "&scope=mcp")
    assert scoped.status_code == 302
    assert "error=invalid_request" in scoped.headers["location"] and "scope+is+given+more+than+once" in \
        scoped.headers["location"]
    token = httpx2.post(signin_server.base_url + "/token", content=(
        f"grant_type=refresh_token&refresh_token=a&refresh_token=b&client_id={client.client_id}"),
        headers={"content-type": "application/x-www-form-urlencoded"})
    assert token.status_code == 400 and token.json() == {
        "error": "invalid_request", "error_description": "refresh_token is given more than once"}


# --- client secrets


def stored_clients(server: ServerProcess) -> list[str]:
    return [value for kind, value in current_store().stored(server.workdir / "data") if kind == "client"]


def confidential_client(server: ServerProcess) -> dict[str, str]:
    response = httpx2.post(server.base_url + "/register", json={
        "client_name": "confidential", "redirect_uris": ["https://app.example/cb"],
        "token_endpoint_auth_method": "client_secret_post"})
    assert response.status_code == 201, response.text
    return response.json()


def revoke_as(server: ServerProcess, client_id: str, secret: str) -> int:
    return httpx2.post(server.base_url + "/revoke", data={"client_id": client_id, "client_secret": secret,
                                                          "token": "not-a-token"}).status_code


def test_client_secrets_are_stored_hashed_and_compared_as_hashes(signin_server: ServerProcess) -> None:
    client = confidential_client(signin_server)
    stored = [value for value in stored_clients(signin_server) if client["client_id"] in value]
    assert stored and client["client_secret"] not in stored[0] and '"client_secret":"sha256:' in stored[0]
    assert revoke_as(signin_server, client["client_id"], client["client_secret"]) == 200
    assert revoke_as(signin_server, client["client_id"], "f" * len(client["client_secret"])) == 401
    digest = stored[0].split('"client_secret":"')[1].split('"')[0]
    assert revoke_as(signin_server, client["client_id"], digest) == 401, "the stored hash is no password"


def test_a_version_0_1_store_keeps_working_after_the_upgrade(google: GoogleStandIn, tmp_path: Path,
                                                            store: StoreUnderTest) -> None:
    """The previous release's server registers clients (one with a secret in clear), signs someone in and
    writes a note; this version opens the same store, and everything of the server's carries on. The notes
    demo owns its data and keeps no upgrade of its own: 0.1's notes stay where 0.1 put them, untouched (0.2
    moves them), and with SQLite the log names the table left as it was."""
    old = tmp_path / "old" / "server.py"
    old.parent.mkdir()
    old.write_text(subprocess.run(["git", "show", f"{PREVIOUS_RELEASE}:server.py"], cwd=REPO, capture_output=True,
                                  text=True, check=True).stdout)
    port, data = free_port(), {"DATA_DIR": str(tmp_path / "data")}
    google.next_login(ALICE)
    with auth_server(google, tmp_path, env=data, port=port, script=old) as before:
        secret_client = confidential_client(before)
        public = RawClient.register(before)
        tokens = public.sign_in()
        assert mcp_call(before, tokens["access_token"], "tools/call", {"name": "add_note", "arguments": {
            "title": "written by 0.1"}}).status_code == 200
    with auth_server(google, tmp_path, env=data, port=port) as after:
        public.server = after
        refreshed = public.refresh(tokens["refresh_token"])
        found = mcp_call(after, refreshed.json().get("access_token"), "tools/call",
                         {"name": "search_notes", "arguments": {"query": "0.1"}})
        revoked = revoke_as(after, secret_client["client_id"], secret_client["client_secret"])
        stored = [value for value in stored_clients(after) if secret_client["client_id"] in value]
        log = after.log()
    assert refreshed.status_code == 200, refreshed.text
    assert found.json()["result"]["structuredContent"]["total"] == 0, "0.1's notes are not this version's records"
    assert revoked == 200, "a secret stored in clear by 0.1 still authenticates"
    assert secret_client["client_secret"] not in stored[0], "and is stored hashed from then on"
    if store.kind == "sqlite":
        assert "tables this version does not read, left as they are: notes" in log
    assert "Traceback" not in log


# --- private data files


@pytest.mark.store_of_its_own
def test_the_data_folder_and_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """An installation of 0.1 left the folder 0755 and the database 0644 (umask 022): it is tightened at start,
    and every file the server creates is 0600 (SQLite gives -wal and -shm the database file's mode)."""
    data = tmp_path / "data"
    old_umask = os.umask(0o022)
    try:
        data.mkdir(mode=0o755)
        (data / "stream-http.db").touch(mode=0o644)
        os.chmod(data, 0o755)
        with running_server(tmp_path, env={"DATA_DIR": str(data),
                                           "STORE_URL": f"sqlite:///{data / 'stream-http.db'}"}) as server:
            httpx2.post(server.mcp_url, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
                headers={"accept": "application/json, text/event-stream"})
            modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in [data, *data.iterdir()]}
            log = server.log()
    finally:
        os.umask(old_umask)
    assert modes.pop("data") == 0o700
    assert modes and set(modes.values()) == {0o600}, modes
    assert {"stream-http.db", "stream-http.db-wal", "stream-http.db-shm"} <= set(modes)
    assert log.count("readable by their owner only") == 1


# --- wrong methods


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/token", "POST"), ("PUT", "/token", "POST"), ("GET", "/register", "POST"), ("DELETE", "/revoke", "POST"),
    ("PUT", "/mcp", "GET, POST, DELETE"),
])
def test_a_wrong_method_gets_405_with_allow(signin_server: ServerProcess, method: str, path: str, allowed: str) -> None:
    response = httpx2.request(method, signin_server.base_url + path)
    assert response.status_code == 405
    assert set(allowed.split(", ")) <= {part.strip() for part in response.headers["allow"].split(",")}


# --- rate limits


def test_a_burst_of_mcp_requests_past_the_limit_gets_429_with_retry_after(google: GoogleStandIn,
                                                                          tmp_path: Path) -> None:
    google.next_login(ALICE)
    with auth_server(google, tmp_path, env={"RATE_LIMIT_MCP": "20"}) as server:
        token = RawClient.register(server).sign_in()["access_token"]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: mcp_call(server, token, "tools/list"), range(30)))
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) == 20 and statuses.count(429) == 10, statuses
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert 0 < int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error"]["code"] == -32000 and "at most 20 a minute" in refused.json()["error"]["message"]


def test_the_oauth_endpoints_limit_each_client_and_registrations(google: GoogleStandIn, tmp_path: Path) -> None:
    with auth_server(google, tmp_path, env={"RATE_LIMIT_CLIENT": "5", "RATE_LIMIT_REGISTER": "3"}) as server:
        registrations = [httpx2.post(server.base_url + "/register", json={
            "client_name": f"app {n}", "redirect_uris": ["http://127.0.0.1:7000/cb"],
            "token_endpoint_auth_method": "none"}) for n in range(4)]
        client_id = registrations[0].json()["client_id"]
        tokens = [httpx2.post(server.base_url + "/token", data={
            "grant_type": "refresh_token", "refresh_token": "nope", "client_id": client_id}) for _ in range(6)]
        authorize = httpx2.get(server.base_url + f"/authorize?client_id={client_id}&response_type=code")
    assert [r.status_code for r in registrations] == [201, 201, 201, 429]
    assert registrations[3].json()["error"] == "temporarily_unavailable" and "retry-after" in registrations[3].headers
    assert [r.status_code for r in tokens] == [400] * 5 + [429]
    assert authorize.status_code == 429 and "Too many attempts" in authorize.text
    assert int(tokens[5].headers["retry-after"]) > 0 and int(authorize.headers["retry-after"]) > 0


def test_sign_ins_are_limited_per_person(google: GoogleStandIn, tmp_path: Path) -> None:
    with auth_server(google, tmp_path, env={"RATE_LIMIT_PERSON": "2"}) as server:
        client = RawClient.register(server)
        codes = []
        for _ in range(2):
            google.next_login(ALICE)
            query, _ = client.authorize(pkce_pair()[1])
            codes.append("code" in query)
        google.next_login(ALICE)
        _, browser = client.authorize(pkce_pair()[1])
        page = browser.visits[-1]
        back = parse_qs(urlsplit(browser.continue_link(page.body)).query)
    assert codes == [True, True]
    assert page.status == 429 and "Too many sign-ins for alice@example.com this hour" in page.body
    assert 0 < int(page.headers["retry-after"]) <= 3600, "every 429 says when to come back"
    assert back["error"] == ["temporarily_unavailable"], "the client is told, through the page's link"


# --- what a hostile review found in round 3, each closed as a class


FORGED = "2026-01-01 00:00:00,000 INFO    stream_http.audit: {\"event\": \"token_issued\", \"forged\": true}"
LOG_LINE_START = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ |    |$)")


def test_no_value_a_caller_sends_can_split_the_text_log(signin_server: ServerProcess) -> None:
    """CWE-117: a client id, client name, redirect URI, tool name, method, header or trace state carrying a
    line break and a fake record stays on its own line, escaped; no log line starts but with a record's
    timestamp (or a traceback's indentation), and nothing invalid in a trace header reaches a warning."""
    base, forged = signin_server.base_url, "x\n" + FORGED
    httpx2.post(base + "/token", data={"grant_type": "refresh_token", "refresh_token": "r",
                                       "client_id": "https://x.invalid/a\n" + FORGED})
    httpx2.post(base + "/register", json={"client_name": forged, "redirect_uris": ["https://evil.example/\n" + FORGED],
                                          "token_endpoint_auth_method": "none"})
    httpx2.get(base + "/authorize", params={"client_id": forged, "redirect_uri": forged, "response_type": "code"})
    for name in (forged, "x\r" + FORGED, "x\u2028" + FORGED):  # in the body only: a header cannot carry it
        httpx2.post(signin_server.mcp_url, headers=mcp_headers(), json={
            "jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": {}}})
    httpx2.post(signin_server.mcp_url, json={"jsonrpc": "2.0", "id": 1, "method": forged}, headers={
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "k=v,bad key=" + FORGED.replace(",", ";"), "accept": "application/json, text/event-stream"})
    time.sleep(TIME_FOR_A_TRACEBACK_S)
    log = signin_server.log()
    assert "\\n2026-01-01 00:00:00,000 INFO" in log, "the forged client id was logged, escaped"
    broken = [line for line in log.split("\n") if not LOG_LINE_START.match(line)]
    assert broken == [], broken
    assert not any(line.startswith("2026-01-01") for line in log.splitlines())
    assert "Invalid key/value pair" not in log and "opentelemetry" not in log


def test_invented_methods_add_no_metric_series(google: GoogleStandIn, tmp_path: Path) -> None:
    """Labels come from closed sets: fifty methods a signed-in caller invents (one with an email in it) are
    counted under one `other` series, never one each."""
    metrics_port = free_port()
    google.next_login(ALICE)
    with auth_server(google, tmp_path, env={"METRICS_PORT": str(metrics_port), "RATE_LIMIT_MCP": "0"}) as server:
        token = RawClient.register(server).sign_in()["access_token"]
        mcp_call(server, token, "tools/list")
        before = series(metrics_port)
        answers = [mcp_call(server, token, f"x/alice@example.com/{n}") for n in range(50)]
        after = series(metrics_port)
        scraped = httpx2.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert {answer.status_code for answer in answers} <= {200, 400, 404}
    assert len(after) - len(before) <= 2, sorted(set(after) - set(before))  # `other` in the counter and histogram
    assert "alice@example.com" not in scraped and 'method="other"' in scraped


def series(metrics_port: int) -> list[str]:
    text = httpx2.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    return [line.rsplit(" ", 1)[0] for line in text.splitlines()
            if line.startswith(("stream_http_mcp_requests_total{", "stream_http_mcp_request_duration_seconds_count{"))]


@pytest.mark.parametrize("path", ["/register", "/mcp"])
def test_a_nesting_bomb_is_a_clear_400_on_every_json_endpoint(signin_server: ServerProcess, path: str) -> None:
    bomb = "[" * 30_000 + "]" * 30_000
    answer = httpx2.post(signin_server.base_url + path, content=bomb, headers={
        "content-type": "application/json", "accept": "application/json, text/event-stream"})
    time.sleep(TIME_FOR_A_TRACEBACK_S)
    if path == "/register":
        assert answer.status_code == 400 and answer.json()["error"] == "invalid_client_metadata"
        assert "nested too deeply" in answer.json()["error_description"]
    else:  # the MCP endpoint reads the body before it asks for a token: no sign-in needed to be refused
        assert answer.status_code in (400, 401), answer.text
    assert "Traceback" not in signin_server.log() and "RecursionError" not in signin_server.log()


def test_a_nesting_bomb_in_an_mcp_request_is_a_parse_error(stateful_server: ServerProcess) -> None:
    answer = httpx2.post(stateful_server.mcp_url, content="[" * 30_000 + "]" * 30_000, headers={
        "content-type": "application/json", "accept": "application/json, text/event-stream"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == -32700


def test_the_consent_page_loaded_twice_still_takes_the_first_answer(signin_server: ServerProcess,
                                                                      google: GoogleStandIn) -> None:
    """An embedded browser that fetches the consent page twice: the first load's form still works; a form
    of another transaction is refused."""
    google.next_login(ALICE)
    client = RawClient.register(signin_server)
    first_visit = httpx2.get(client.authorize_url(pkce_pair()[1]), follow_redirects=True)
    again = httpx2.get(str(first_visit.url))
    other = httpx2.get(client.authorize_url(pkce_pair()[1]), follow_redirects=True)
    form, second_form, other_form = (Browser.consent_form(page.text) for page in (first_visit, again, other))
    assert form is not None and second_form is not None and other_form is not None
    assert form[1] == second_form[1], "loading the page again changes nothing in its form"
    crossed = httpx2.post(urljoin(str(first_visit.url), form[0]), headers={"sec-fetch-site": "same-origin"},
                          data={**form[1], "csrf": other_form[1]["csrf"], "decision": "approve"})
    answered = httpx2.post(urljoin(str(first_visit.url), form[0]), headers={"sec-fetch-site": "same-origin"},
                           data={**form[1], "decision": "approve"})
    assert crossed.status_code == 400, "another transaction's form is refused"
    assert answered.status_code == 303 and answered.headers["location"].startswith(google.issuer)


@pytest.mark.parametrize("endpoint", ["/token", "/revoke"])
def test_an_unknown_or_deleted_client_gets_401_invalid_client(signin_server: ServerProcess, endpoint: str) -> None:
    """The status Claude registers again on, for a client_id never seen and for one the store no longer has."""
    deleted = RawClient.register(signin_server)
    data_dir = signin_server.workdir / "data"
    forget_client(data_dir, deleted.client_id)
    for client_id in ("never-registered", deleted.client_id):
        answer = httpx2.post(signin_server.base_url + endpoint, data={
            "client_id": client_id, "grant_type": "refresh_token", "refresh_token": "r", "token": "t"})
        assert answer.status_code == 401 and answer.json()["error"] == "invalid_client", (client_id, answer.text)


def forget_client(data_dir: Path, client_id: str) -> None:
    """Delete a registration straight from the store, as a wiped or restored store does."""
    store = current_store()
    if store.redis_url is None:
        import sqlite3

        with contextlib.closing(sqlite3.connect(data_dir / "stream-http.db")) as db, db:
            db.execute("DELETE FROM records WHERE kind = 'client' AND key = ?", (client_id,))
    else:
        import redis

        redis.Redis.from_url(store.redis_url).delete(f"{store.prefix(str(data_dir))}:r:client:{client_id}")
