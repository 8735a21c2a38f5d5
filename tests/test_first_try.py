"""Every client on the first try: the app callbacks of well-known clients, the seed's localhost URL with
sign-in on, header values with optional whitespace, registrations that heal, Claude's connector route,
and a refresh whose response was lost."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx2
import pytest
from mcp import Client

from tests.conftest import Peers, ServerProcess, assert_no_traceback, free_port, run_python, running_server
from tests.headless_browser import Browser
from tests.signin import ALICE, GoogleStandIn, RawClient, auth_server, browser_program, mcp_call, mcp_remote, pkce_pair


def register(server: ServerProcess, *redirect_uris: str) -> httpx2.Response:
    return httpx2.post(server.base_url + "/register", json={
        "client_name": "first try", "redirect_uris": list(redirect_uris), "token_endpoint_auth_method": "none"})


# --- app callbacks


def test_the_app_callbacks_of_well_known_clients_register_by_default(signin_server: ServerProcess) -> None:
    for callback in ("cursor://anysphere.cursor-mcp/oauth/callback", "claude://claude.ai/mcp-auth-callback/sdk"):
        response = register(signin_server, callback)
        assert response.status_code == 201, response.text
        assert response.json()["redirect_uris"] == [callback]


def test_another_app_scheme_is_refused_and_logged_once_with_the_setting_to_change(signin_server: ServerProcess) -> None:
    callback = "com.example.notes://oauth/callback"
    answers = [register(signin_server, callback) for _ in range(3)]
    assert {answer.status_code for answer in answers} == {400}
    assert "add it to REDIRECT_URI_PATTERNS" in answers[0].json()["error_description"]
    logged = [line for line in signin_server.log().splitlines() if "refused the redirect URI" in line
              and callback in line]
    assert len(logged) == 1, logged
    assert "REDIRECT_URI_PATTERNS" in logged[0]


# --- loopback names: localhost, 127.0.0.1 and [::1] are one server unless PUBLIC_URL says otherwise


def names_in(server: ServerProcess, host: str) -> dict[str, str]:
    url = f"http://{host}:{server.port}"
    challenge = httpx2.post(f"{url}/mcp/", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                            headers={"accept": "application/json, text/event-stream"})
    resource = httpx2.get(f"{url}/.well-known/oauth-protected-resource/mcp").json()
    metadata = httpx2.get(f"{url}/.well-known/oauth-authorization-server").json()
    return {"challenge": re.search(r'resource_metadata="([^"]+)"', challenge.headers["www-authenticate"]).group(1),
            "resource": resource["resource"], "authorization_server": resource["authorization_servers"][0],
            "issuer": metadata["issuer"], "token_endpoint": metadata["token_endpoint"]}


def test_each_loopback_name_is_answered_as_itself(signin_server: ServerProcess) -> None:
    for host in ("localhost", "127.0.0.1"):
        base = f"http://{host}:{signin_server.port}"
        assert names_in(signin_server, host) == {
            "challenge": f"{base}/.well-known/oauth-protected-resource/mcp", "resource": f"{base}/mcp",
            "authorization_server": base, "issuer": base, "token_endpoint": f"{base}/token"}


def test_an_explicit_public_url_is_the_only_name(google: GoogleStandIn, tmp_path: Path) -> None:
    port = free_port()
    with auth_server(google, tmp_path, env={"PUBLIC_URL": f"http://127.0.0.1:{port}"}, port=port) as server:
        seen = names_in(server, "localhost")
    assert set(seen.values()) == {f"http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp",
                                  f"http://127.0.0.1:{port}/mcp", f"http://127.0.0.1:{port}",
                                  f"http://127.0.0.1:{port}/token"}


def test_a_token_got_through_localhost_works_through_127_0_0_1(signin_server: ServerProcess,
                                                                 google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    client = RawClient.register(signin_server)
    verifier, challenge = pkce_pair()
    localhost = f"http://localhost:{signin_server.port}"
    end = Browser(stop_at=client.redirect_uri).go(client.authorize_url(challenge, resource=f"{localhost}/mcp")
                                                  .replace(signin_server.base_url, localhost))
    query = {key: value[0] for key, value in parse_qs(urlsplit(end.url).query).items()}
    assert query["iss"] == localhost, "the issuer the client discovered through localhost"
    tokens = httpx2.post(f"{localhost}/token", data={
        "grant_type": "authorization_code", "code": query["code"], "code_verifier": verifier,
        "redirect_uri": client.redirect_uri, "client_id": client.client_id}).json()
    assert mcp_call(signin_server, tokens["access_token"], "tools/list").status_code == 200


@pytest.fixture
def seed_server(google: GoogleStandIn, tmp_path: Path) -> Iterator[ServerProcess]:
    """The original description's snippet (`http://localhost:8080/mcp/`: the localhost name, the trailing
    slash), sign-in on, no PUBLIC_URL, on a port of the test's own rather than 8080, which may be someone's."""
    with auth_server(google, tmp_path / "server") as server:
        yield server


@pytest.mark.anyio
async def test_mcp_remote_signs_in_with_the_seeds_url_shape(peers: Peers, seed_server: ServerProcess,
                                                           google: GoogleStandIn, tmp_path: Path) -> None:
    google.next_login(ALICE)
    seed_url = f"http://localhost:{seed_server.port}/mcp/"
    claude, visits = mcp_remote(peers, seed_url, tmp_path)
    with anyio.fail_after(90):
        async with Client(claude, mode="legacy") as remote:
            me = (await remote.call_tool("whoami", {})).structured_content
    assert me["email"] == ALICE["email"]
    log = visits.read_text()
    assert f"http://localhost:{seed_server.port}/consent?txn=" in log and "/oauth/google/callback" in log
    assert_no_traceback(seed_server.log())


def test_client_py_signs_in_and_its_default_url_is_the_servers(google: GoogleStandIn, tmp_path: Path) -> None:
    """client.py's default URL is where a zero-configuration server serves; the sign-in itself runs against a
    server on a port of the test's own (a person's own server may hold 8000)."""
    import client
    import server

    assert client.DEFAULT_URL == server.load_settings({}).mcp_url == "http://127.0.0.1:8000/mcp"
    google.next_login(ALICE)
    browser, _ = browser_program(tmp_path)
    with auth_server(google, tmp_path / "server") as running:
        done = run_python("client.py", "call", "whoami", timeout_s=120,
                          env={"XDG_CONFIG_HOME": str(tmp_path / "config"), "BROWSER": browser,
                               "MCP_URL": running.mcp_url})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["email"] == ALICE["email"]


# --- header values with optional whitespace (RFC 9110 §5.5)


def raw_post(port: int, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, str]:
    """One HTTP/1.1 request written byte for byte (HTTP clients trim what this test needs to send)."""
    payload = json.dumps(body).encode()
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST /mcp HTTP/1.1\r\n{head}Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                     .encode() + payload)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1].decode(errors="replace")


def test_header_values_with_optional_whitespace_are_read_as_trimmed(signin_server: ServerProcess,
                                                                    google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    token = RawClient.register(signin_server).sign_in()["access_token"]
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": "echo", "arguments": {"message": "padded"},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                  "io.modelcontextprotocol/clientCapabilities": {}}}}
    headers = {"Host": f"127.0.0.1:{signin_server.port}  ", "Content-Type": "application/json ",
               "Accept": "application/json, text/event-stream\t", "MCP-Protocol-Version": "2026-07-28 ",
               "Mcp-Method": " tools/call ", "Mcp-Name": "echo  ", "Authorization": f"Bearer {token} "}
    status, text = raw_post(signin_server.port, headers, body)
    assert status == 200, text
    assert '"padded"' in text


def test_the_conformance_suites_whitespace_scenario_passes(peers: Peers, tmp_path: Path) -> None:
    with running_server(tmp_path / "server", "--stateless") as server:
        done = subprocess.run([peers.node22, peers.bin("conformance-alpha/dist/index.js"), "server", "--url",
                               server.mcp_url, "--scenario", "http-header-validation", "-o", str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=120, env=peers.node_env(), check=False)
    checks = [check for path in (tmp_path / "out").rglob("checks.json") for check in json.loads(path.read_text())]
    whitespace = [check for check in checks if check["id"] == "sep-2243-server-accepts-whitespace-header-value"]
    assert whitespace and {check["status"] for check in whitespace} == {"SUCCESS"}, done.stdout[-3000:]
    assert done.returncode == 0, done.stdout[-3000:]


# --- registrations that heal


def test_a_forgotten_client_is_told_how_to_reconnect_and_registering_again_works(google: GoogleStandIn,
                                                                               tmp_path: Path) -> None:
    with auth_server(google, tmp_path / "before") as server:
        old = RawClient.register(server)
        port = server.port
    with auth_server(google, tmp_path / "after", port=port) as wiped:  # a new store: the registration is gone
        old.server = wiped
        _, challenge = pkce_pair()
        page = httpx2.get(old.authorize_url(challenge))
        token = old.token(grant_type="authorization_code", code="x", code_verifier="y" * 43,
                          redirect_uri=old.redirect_uri)
        google.next_login(ALICE)
        again = RawClient.register(wiped, old.redirect_uri)
        tokens = again.sign_in()
        works = mcp_call(wiped, tokens["access_token"], "tools/list").status_code
    assert page.status_code == 400 and "location" not in page.headers
    for words in ("no longer knows it", "~/.mcp-auth", "Remove Dynamic Authentication Providers", "Connectors",
                  "Claude Code", "Cursor"):
        assert words in page.text, words
    assert token.status_code == 401 and token.json()["error"] == "invalid_client"
    assert "register again" in token.json()["error_description"]
    assert "~/.mcp-auth" in token.json()["error_description"]
    assert works == 200


# --- Claude's connector route


def test_claude_config_names_the_connector_route_for_an_https_server() -> None:
    public = run_python("server.py", "claude-config", "--url", "https://mcp.example.com/mcp")
    local = run_python("server.py", "claude-config", "--url", "http://127.0.0.1:8000/mcp")
    assert public.returncode == local.returncode == 0
    assert "Settings, Connectors, Add custom connector, with the URL https://mcp.example.com/mcp" in public.stderr
    assert "Connectors" not in local.stderr


# --- a refresh whose response was lost


def test_a_retry_with_the_previous_refresh_token_gets_a_fresh_pair(signin_server: ServerProcess,
                                                                  google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    client = RawClient.register(signin_server)
    first = client.sign_in()
    lost = client.refresh(first["refresh_token"]).json()  # the client never sees this answer
    time.sleep(2.5)  # beyond the 2-second race window
    retried = client.refresh(first["refresh_token"])
    assert retried.status_code == 200, retried.text
    fresh = retried.json()
    assert fresh["refresh_token"] not in (first["refresh_token"], lost["refresh_token"])
    assert mcp_call(signin_server, fresh["access_token"], "tools/list").status_code == 200
    assert mcp_call(signin_server, lost["access_token"], "tools/list").status_code == 401, "the unused pair retired"
    assert client.refresh(fresh["refresh_token"]).status_code == 200, "the new chain rotates as usual"
    assert '"event": "refresh_retried"' in signin_server.log()


def test_the_previous_token_after_its_successor_was_used_ends_the_grant(signin_server: ServerProcess,
                                                                          google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    client = RawClient.register(signin_server)
    first = client.sign_in()
    second = client.refresh(first["refresh_token"]).json()
    third = client.refresh(second["refresh_token"]).json()  # the successor was used: the old one is stale
    time.sleep(2.5)
    replayed = client.refresh(first["refresh_token"])
    assert replayed.status_code == 400 and replayed.json()["error"] == "invalid_grant"
    assert mcp_call(signin_server, third["access_token"], "tools/list").status_code == 401, "RFC 9700 §4.14.2"


def test_racing_retries_have_one_winner_whose_answer_they_all_get(signin_server: ServerProcess,
                                                                   google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    client = RawClient.register(signin_server)
    first = client.sign_in()
    client.refresh(first["refresh_token"])  # lost
    time.sleep(2.5)  # a client retries after its request timed out, not within the 2-second race window
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.refresh(first["refresh_token"]), range(8)))
    assert [answer.status_code for answer in answers] == [200] * 8, [answer.text for answer in answers]
    assert len({answer.json()["refresh_token"] for answer in answers}) == 1, "one pair: one token chain"
    winner = answers[0].json()
    assert mcp_call(signin_server, winner["access_token"], "tools/list").status_code == 200
    assert client.refresh(winner["refresh_token"]).status_code == 200, "and it rotates as usual"
