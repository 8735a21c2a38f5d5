"""Sign in with Google: what MCP clients get (discovery, the full flow, refresh, revocation, restarts)
and what the person signing in sees, against the Google stand-in and real clients."""

from __future__ import annotations

import json
import re
import stat
import time
from pathlib import Path

import httpx2
import pytest

from tests.conftest import ServerProcess, StoreUnderTest
from tests.signin import ALICE, BOB, GoogleStandIn, RawClient, SdkSignIn, auth_server, mcp_call, pkce_pair

# --- discovery


def test_protected_resource_metadata_at_the_path_and_the_root(signin_server: ServerProcess) -> None:
    for path in ("/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource",
                 "/.well-known/oauth-protected-resource/mcp/"):
        metadata = httpx2.get(signin_server.base_url + path).json()
        assert metadata == {"resource": signin_server.mcp_url, "authorization_servers": [signin_server.base_url],
                            "scopes_supported": ["mcp", "google"], "bearer_methods_supported": ["header"],
                            "resource_name": "stream-http"}, path


def test_authorization_server_metadata(signin_server: ServerProcess) -> None:
    response = httpx2.get(signin_server.base_url + "/.well-known/oauth-authorization-server",
                          headers={"origin": "http://localhost:6274"})
    metadata = response.json()
    assert metadata["issuer"] == signin_server.base_url, "the issuer matches exactly: no trailing slash"
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["authorization_response_iss_parameter_supported"] is True
    assert metadata["client_id_metadata_document_supported"] is True
    assert "none" in metadata["revocation_endpoint_auth_methods_supported"]
    for endpoint in ("authorization", "token", "registration", "revocation"):
        assert metadata[f"{endpoint}_endpoint"].startswith(signin_server.base_url + "/")
    assert response.headers["access-control-allow-origin"] == "*"


def test_requests_without_a_token_get_the_challenge(signin_server: ServerProcess) -> None:
    response = mcp_call(signin_server, None, "tools/list")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == (
        f'Bearer resource_metadata="{signin_server.base_url}/.well-known/oauth-protected-resource/mcp", '
        'scope="mcp"')
    bad = mcp_call(signin_server, "not-a-token", "tools/list")
    assert bad.status_code == 401
    assert bad.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert 'scope="mcp"' in bad.headers["www-authenticate"]
    exposed = httpx2.post(signin_server.mcp_url, headers={"origin": "http://localhost:6274"})
    assert "www-authenticate" in exposed.headers["access-control-expose-headers"].lower()


def test_a_token_in_the_query_string_is_refused(signin_server: ServerProcess, google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    tokens = RawClient.register(signin_server).sign_in()
    response = httpx2.post(f"{signin_server.mcp_url}?access_token={tokens['access_token']}",
                           json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                           headers={"accept": "application/json, text/event-stream"})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


# --- the full flow, with the SDK's own OAuth client


@pytest.mark.anyio
@pytest.mark.parametrize("mode", [(), ("--stateless",)], ids=["stateful", "stateless"])
async def test_the_sdk_client_signs_in_and_steps_up(google: GoogleStandIn, tmp_path: Path, mode: tuple[str, ...],
                                                    era: str) -> None:
    google.next_login(ALICE)
    with auth_server(google, tmp_path, *mode) as server:
        signin = SdkSignIn(server.mcp_url)
        async with httpx2.AsyncClient(auth=signin.provider()) as http, signin.client(http, era) as mcp:
            me = (await mcp.call_tool("whoami", {})).structured_content
            note = (await mcp.call_tool("add_note", {"title": "signed in"})).structured_content
            profile = await mcp.call_tool("google_profile", {})
        log = server.log()
    assert me["subject"] == ALICE["sub"] and me["email"] == ALICE["email"] and me["authenticated"] is True
    assert me["client_id"] == signin.storage.client.client_id
    assert note["title"] == "signed in"
    assert signin.sign_ins == 2, "google_profile needs the google scope: one step-up sign-in"
    assert signin.storage.tokens.scope == "mcp google"
    assert profile.structured_content["email"] == ALICE["email"]
    assert profile.structured_content["picture"] == ALICE["picture"]
    for event in ("client_registered", "consent_given", "sign_in_allowed", "token_issued"):
        assert f'"event": "{event}"' in log


def test_google_is_asked_for_offline_access_with_pkce_and_a_nonce(signin_server: ServerProcess,
                                                                  google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    RawClient.register(signin_server).sign_in()
    request = google.authorization_requests()[-1]
    assert request["scope"] == "openid email profile"
    assert request["access_type"] == "offline"
    assert request.get("prompt") in (None, "consent"), "consent only on a second trip for a refresh token"
    assert google.refresh_tokens(ALICE["sub"])["live"] >= 1
    assert request["code_challenge_method"] == "S256" and len(request["code_challenge"]) == 43
    assert len(request["nonce"]) >= 16
    assert request["redirect_uri"] == signin_server.base_url + "/oauth/google/callback"


def test_refresh_rotates_and_reuse_ends_the_grant(google: GoogleStandIn, tmp_path: Path) -> None:
    google.next_login(ALICE)
    with auth_server(google, tmp_path, env={"ACCESS_TOKEN_TTL": "2"}) as server:
        client = RawClient.register(server)
        first = client.sign_in()
        assert mcp_call(server, first["access_token"], "tools/list").status_code == 200
        time.sleep(3)
        expired = mcp_call(server, first["access_token"], "tools/list")
        assert expired.status_code == 401
        assert 'error="invalid_token"' in expired.headers["www-authenticate"]
        second = client.refresh(first["refresh_token"])
        assert second.status_code == 200
        fresh = second.json()
        assert fresh["refresh_token"] != first["refresh_token"]
        assert mcp_call(server, fresh["access_token"], "tools/list").status_code == 200
        time.sleep(2.5)  # past the grace window that tells a retry race from reuse
        reused = client.refresh(first["refresh_token"])
        assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
        assert mcp_call(server, fresh["access_token"], "tools/list").status_code == 401, "the grant ended"
        assert client.refresh(fresh["refresh_token"]).json()["error"] == "invalid_grant"
        log = server.log()
    assert '"event": "refresh_token_reused"' in log and '"event": "grant_revoked"' in log


def test_revocation_works_for_public_clients_and_ends_the_tokens(signin_server: ServerProcess,
                                                                 google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    client = RawClient.register(signin_server)
    tokens = client.sign_in()
    revoked = httpx2.post(signin_server.base_url + "/revoke",
                          data={"token": tokens["refresh_token"], "client_id": client.client_id})
    assert revoked.status_code == 200
    assert mcp_call(signin_server, tokens["access_token"], "tools/list").status_code == 401
    assert client.refresh(tokens["refresh_token"]).json()["error"] == "invalid_grant"


def test_restarting_the_server_keeps_clients_and_tokens(google: GoogleStandIn, tmp_path: Path,
                                                       store: StoreUnderTest) -> None:
    google.next_login(ALICE)
    with auth_server(google, tmp_path) as server:
        client = RawClient.register(server)
        tokens = client.sign_in()
        port = server.port
    with auth_server(google, tmp_path, port=port) as restarted:
        still = mcp_call(restarted, tokens["access_token"], "tools/call", {"name": "whoami", "arguments": {}})
        refreshed = client.refresh(tokens["refresh_token"])
    assert still.status_code == 200
    assert ALICE["email"] in still.text
    assert refreshed.status_code == 200, "the registered client is still known"


def test_without_a_secret_key_one_is_generated_once_and_kept(google: GoogleStandIn, tmp_path: Path) -> None:
    env = {"STORE_URL": f"sqlite:///{tmp_path}/data/stream-http.db", "SECRET_KEY": ""}
    with auth_server(google, tmp_path, env=env) as server:
        port = server.port
    key_file = tmp_path / "data" / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "generated a SECRET_KEY in" in server.log()
    key = key_file.read_text()
    with auth_server(google, tmp_path, env=env, port=port) as restarted:
        log = restarted.log()
    assert "generated a SECRET_KEY" not in log
    assert key_file.read_text() == key


def test_tokens_are_stored_only_as_hashes_and_google_tokens_encrypted(google: GoogleStandIn, tmp_path: Path,
                                                                     store: StoreUnderTest) -> None:
    google.next_login(ALICE)
    with auth_server(google, tmp_path) as server:
        tokens = RawClient.register(server).sign_in()
    records = store.stored(tmp_path / "data")
    stored = "\n".join(value for _, value in records)
    assert {"access", "refresh", "grant", "google", "client"} <= {kind for kind, _ in records}
    assert tokens["access_token"] not in stored and tokens["refresh_token"] not in stored
    google_record = next(value for kind, value in records if kind == "google").split(" ", 1)[1]
    assert set(json.loads(google_record)) == {"sealed"}, "Google's tokens are sealed, not readable"


# --- what the person sees


def test_the_consent_page_names_the_client_and_is_safe_to_show(signin_server: ServerProcess) -> None:
    client = RawClient.register(signin_server, client_name="Evil <script>alert(1)</script> Corp")
    _, challenge = pkce_pair()
    response = httpx2.get(client.authorize_url(challenge, scope="mcp google"), follow_redirects=True)
    page = response.text
    assert response.status_code == 200
    assert "Evil &lt;script&gt;alert(1)&lt;/script&gt; Corp" in page and "<script>" not in page
    assert "127.0.0.1:6777" in page, "the redirect host is shown"
    assert "Read your Google profile" in page and "Use this server" in page
    policy = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
    assert response.headers["x-frame-options"] == "DENY"
    assert 'name="csrf"' in page


def test_deny_returns_access_denied_with_state_and_iss(signin_server: ServerProcess) -> None:
    client = RawClient.register(signin_server)
    _, challenge = pkce_pair()
    query, _ = client.authorize(challenge, decision="deny")
    assert query == {"error": "access_denied", "error_description": "The request was denied",
                     "state": "xyz-state", "iss": signin_server.base_url}
    assert f'"client_id": "{client.client_id}", "event": "consent_denied"' in signin_server.log()


def test_approval_is_remembered_per_person_and_client(signin_server: ServerProcess, google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    client = RawClient.register(signin_server)
    verifier, challenge = pkce_pair()
    first, browser = client.authorize(challenge)
    assert browser.seen("/consent?txn=")
    assert client.exchange(first["code"], verifier).status_code == 200
    again = RawClient(signin_server, client.client_id, client.redirect_uri)
    from tests.headless_browser import Browser

    returning = Browser(stop_at=client.redirect_uri, http=browser.http)  # the same browser, with its cookie
    end = returning.go(again.authorize_url(challenge))
    assert end.method == "STOP" and "code=" in end.url
    assert not returning.seen("/consent?txn="), "the same person and client: no second consent page"
    asked = google.authorization_requests()[-1]
    assert "prompt" not in asked, "a Google refresh token is held: no need to make Google ask again"
    assert asked["login_hint"] == ALICE["email"]
    google.next_login(BOB)
    for cookie in list(browser.http.cookies.jar):  # Bob signs in at Google; this server's cookie still says Alice
        if cookie.name != "stream_http_session":
            browser.http.cookies.delete(cookie.name, domain=cookie.domain, path=cookie.path)
    as_bob = Browser(stop_at=client.redirect_uri, http=browser.http)
    bob_end = as_bob.go(again.authorize_url(challenge))
    assert bob_end.method == "STOP" and "code=" in bob_end.url
    assert as_bob.seen("/consent?txn="), "someone else signed in at Google: they are asked themselves"


def test_every_page_is_self_contained(signin_server: ServerProcess) -> None:
    response = httpx2.get(signin_server.base_url + "/consent?txn=nope")
    assert response.status_code == 400
    assert "expired" in response.text
    assert not re.search(r"\b(src|href)=|@import|url\(|<script", response.text), "no external asset, no script"
    assert '<meta name="viewport"' in response.text


# --- notes belong to one Google account


@pytest.mark.anyio
async def test_another_account_cannot_reach_my_notes(google: GoogleStandIn, tmp_path: Path) -> None:
    from mcp.shared.exceptions import MCPError
    from mcp_types import PromptReference, ResourceTemplateReference

    with auth_server(google, tmp_path) as server:
        google.next_login(ALICE)
        alice = SdkSignIn(server.mcp_url)
        async with httpx2.AsyncClient(auth=alice.provider()) as http, alice.client(http) as mcp:
            secret = (await mcp.call_tool("add_note", {"title": "alice's secret", "tags": ["private"]}))
            note_id = secret.structured_content["id"]
        google.next_login(BOB)
        bob = SdkSignIn(server.mcp_url)
        async with httpx2.AsyncClient(auth=bob.provider()) as http, bob.client(http, "2026-07-28") as mcp:
            found = await mcp.call_tool("search_notes", {"query": "secret"})
            index = await mcp.read_resource("notes://index")
            with pytest.raises(MCPError):
                await mcp.read_resource(f"notes://{note_id}")
            deleted = await mcp.call_tool("delete_note", {"note_id": note_id})
            ids = await mcp.complete(ResourceTemplateReference(type="ref/resource", uri="notes://{note_id}"),
                                     {"name": "note_id", "value": ""})
            tags = await mcp.complete(PromptReference(type="ref/prompt", name="summarize_notes"),
                                      {"name": "tag", "value": "priv"})
            with pytest.raises(MCPError):
                await mcp.get_prompt("draft_from_note", {"note_id": note_id})
        google.next_login(ALICE)
        alice_again = SdkSignIn(server.mcp_url)
        async with httpx2.AsyncClient(auth=alice_again.provider()) as http, alice_again.client(http) as mcp:
            still = await mcp.call_tool("search_notes", {"tag": "private"})
    assert found.structured_content == {"notes": [], "total": 0}
    assert json.loads(index.contents[0].text) == []
    assert deleted.is_error and "There is no note" in deleted.content[0].text
    assert ids.completion.values == [] and tags.completion.values == []
    assert [n["id"] for n in still.structured_content["notes"]] == [note_id]


def test_a_session_stays_with_the_account_that_opened_it(signin_server: ServerProcess, google: GoogleStandIn) -> None:
    from tests.conftest import INITIALIZE, mcp_headers

    google.next_login(ALICE)
    alice = RawClient.register(signin_server).sign_in()
    google.next_login(BOB)
    bob = RawClient.register(signin_server).sign_in()
    opened = httpx2.post(signin_server.mcp_url, json=INITIALIZE,
                         headers={**mcp_headers(), "authorization": f"Bearer {alice['access_token']}"})
    session = opened.headers["mcp-session-id"]
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    as_bob = httpx2.post(signin_server.mcp_url, json=ping, headers={
        **mcp_headers(session_id=session), "authorization": f"Bearer {bob['access_token']}"})
    as_alice = httpx2.post(signin_server.mcp_url, json=ping, headers={
        **mcp_headers(session_id=session), "authorization": f"Bearer {alice['access_token']}"})
    assert as_bob.status_code == 404
    assert as_alice.status_code == 200


@pytest.mark.anyio
async def test_a_trailing_slash_on_the_url_does_not_loop_the_sign_in(signin_server: ServerProcess,
                                                                     google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    signin = SdkSignIn(signin_server.mcp_url + "/")
    async with httpx2.AsyncClient(auth=signin.provider()) as http, signin.client(http) as mcp:
        me = (await mcp.call_tool("whoami", {})).structured_content
        again = (await mcp.call_tool("whoami", {})).structured_content
    assert me == again
    assert me["email"] == ALICE["email"]
    assert signin.sign_ins == 1
