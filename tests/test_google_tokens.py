"""Google's own tokens: kept encrypted on the server, refreshed when they expire, revoked with the
last grant, and a clean sign-out when Google withdraws the authorization."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.conftest import Peers
from tests.signin import ALICE, CAROL, GoogleStandIn, RawClient, auth_server, mcp_call, pkce_pair, someone_new


@pytest.fixture
def short_lived_google(peers: Peers, tmp_path: Path) -> Iterator[GoogleStandIn]:
    """A stand-in whose access tokens live 2 seconds, so the server must refresh them."""
    stand_in = GoogleStandIn(peers, tmp_path / "google", "--access-token-ttl", "2")
    yield stand_in
    stand_in.stop()


def profile(server, access_token: str) -> dict:
    response = mcp_call(server, access_token, "tools/call", {"name": "google_profile", "arguments": {}})
    assert response.status_code == 200, response.text
    return response.json()["result"]


def sign_in_with_scope(client: RawClient, scope: str) -> dict[str, Any]:
    verifier, challenge = pkce_pair()
    query, _ = client.authorize(challenge, scope=scope)
    return client.exchange(query["code"], verifier).json()


def test_the_google_token_is_refreshed_when_it_expires(short_lived_google: GoogleStandIn, tmp_path: Path) -> None:
    google = short_lived_google
    google.next_login(ALICE)
    with auth_server(google, tmp_path) as server:
        tokens = sign_in_with_scope(RawClient.register(server), "mcp google")
        first = profile(server, tokens["access_token"])
        time.sleep(3)  # Google's access token has expired now; the stored refresh token gets a new one
        second = profile(server, tokens["access_token"])
    assert first["isError"] is False and second["isError"] is False
    assert first["structuredContent"]["email"] == second["structuredContent"]["email"] == ALICE["email"]


def test_google_withdrawing_access_signs_the_person_out_cleanly(short_lived_google: GoogleStandIn,
                                                                tmp_path: Path) -> None:
    google = short_lived_google
    google.next_login(ALICE)
    with auth_server(google, tmp_path) as server:
        client = RawClient.register(server)
        tokens = sign_in_with_scope(client, "mcp google")
        assert profile(server, tokens["access_token"])["isError"] is False
        google.revoke_person(ALICE["sub"])  # the person removed the app at myaccount.google.com
        time.sleep(3)
        result = profile(server, tokens["access_token"])
        after = mcp_call(server, tokens["access_token"], "tools/list")
        refresh = client.refresh(tokens["refresh_token"])
        log = server.log()
    assert result["isError"] is True
    assert "Google no longer honours your sign-in" in result["content"][0]["text"]
    assert after.status_code == 401, "a clean 401, so the client signs in again instead of looping"
    assert refresh.json()["error"] == "invalid_grant"
    assert '"reason": "Google withdrew the authorization' in log


def test_revoking_the_last_grant_revokes_the_google_token(google: GoogleStandIn, tmp_path: Path) -> None:
    google.next_login(CAROL)
    with auth_server(google, tmp_path) as server:
        first, second = RawClient.register(server), RawClient.register(server)
        tokens_a, tokens_b = first.sign_in(), second.sign_in()
        before = len(google.revocations())
        revoke = server.base_url + "/revoke"
        httpx2.post(revoke, data={"token": tokens_a["access_token"], "client_id": first.client_id})
        assert len(google.revocations()) == before, "Carol still has another grant"
        httpx2.post(revoke, data={"token": tokens_b["refresh_token"], "client_id": second.client_id})
        log = server.log()
    assert len(google.revocations()) == before + 1
    assert '"event": "google_token_revoked"' in log


def test_a_single_allowed_domain_is_hinted_to_google(google: GoogleStandIn, tmp_path: Path) -> None:
    google.next_login(CAROL)
    with auth_server(google, tmp_path, env={"ALLOWED_DOMAINS": "corp.example"}) as server:
        RawClient.register(server).sign_in()
    assert google.authorization_requests()[-1]["hd"] == "corp.example"


def test_a_google_refresh_without_a_new_refresh_token_keeps_the_old_one(short_lived_google: GoogleStandIn,
                                                                       tmp_path: Path) -> None:
    """Google usually answers a refresh with an access token only: the refresh token held stays in use."""
    google = short_lived_google
    google.next_login(ALICE)
    with auth_server(google, tmp_path) as server:
        tokens = sign_in_with_scope(RawClient.register(server), "mcp google")
        google.misbehave("no_refresh_token")
        time.sleep(3)
        first = profile(server, tokens["access_token"])  # refreshed; Google sent no refresh token back
        time.sleep(3)
        second = profile(server, tokens["access_token"])  # refreshed again, with the one kept
    assert first["isError"] is False and second["isError"] is False, (first, second)
    assert [refresh["outcome"] for refresh in google.refreshes()][-2:] == ["success", "success"]


# --- Google's limit of 100 live refresh tokens per person and OAuth client


def test_twenty_sign_ins_keep_one_google_refresh_token(signin_server: Any, google: GoogleStandIn) -> None:
    """Several clients, a new browser (device) each time: Google is never made to ask again, so it mints no
    refresh token beyond the first, and the oldest one still in use is never pushed out."""
    person = someone_new()
    clients = [RawClient.register(signin_server, f"http://127.0.0.1:{6700 + n}/cb") for n in range(3)]
    before = len(google.authorization_requests())
    for n in range(20):
        google.next_login(person)
        tokens = clients[n % 3].sign_in()
    asked = google.authorization_requests()[before:]
    counts = google.refresh_tokens(person["sub"])
    print(f"20 sign-ins through 3 clients: {len(asked)} trips to Google, refresh tokens {counts}")
    assert counts == {"live": 1, "issued": 1, "revoked": 0}
    assert [request.get("prompt") for request in asked] == [None] * 20
    google.next_login(person)
    step_up = RawClient.register(signin_server).sign_in("mcp google")
    assert profile(signin_server, step_up["access_token"])["structuredContent"]["email"] == person["email"]
    assert tokens["access_token"] and google.refresh_tokens(person["sub"])["issued"] == 1


def test_a_server_without_a_refresh_token_has_google_ask_once_more(google: GoogleStandIn, tmp_path: Path) -> None:
    """Someone who consented before (to another deployment with the same Google client, or whose tokens this
    server forgot): Google gives no refresh token without consent, so the server goes back once for it."""
    person = someone_new()
    with auth_server(google, tmp_path / "first") as first:
        google.next_login(person)
        RawClient.register(first).sign_in()
    with auth_server(google, tmp_path / "second") as second:
        before = len(google.authorization_requests())
        google.next_login(person)
        RawClient.register(second).sign_in()
        google.next_login(person)
        again = RawClient.register(second).sign_in("mcp google")
        email = profile(second, again["access_token"])["structuredContent"]["email"]
    asked = google.authorization_requests()[before:]
    assert [request.get("prompt") for request in asked] == [None, "consent", None]
    assert asked[1]["login_hint"] == person["email"]
    assert email == person["email"]
    assert google.refresh_tokens(person["sub"])["issued"] == 2
