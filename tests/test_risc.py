"""Google's Cross-Account Protection (RISC): security event tokens pushed to the receiver, verified against
the stand-in's RISC configuration and keys. One that puts an account at risk ends the person's access at
once; forged, replayed, wrong-audience, stale and malformed ones change nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.conftest import TEST_SECRET_KEY, RedisServer, ServerProcess, free_port
from tests.signin import GOOGLE_CLIENT_ID, GoogleStandIn, RawClient, auth_server, mcp_call, someone_new

RISC = "https://schemas.openid.net/secevent/risc/event-type/"
OAUTH = "https://schemas.openid.net/secevent/oauth/event-type/"
AT_RISK = [RISC + "sessions-revoked", OAUTH + "tokens-revoked", OAUTH + "token-revoked", RISC + "account-disabled",
           RISC + "account-purged"]


@pytest.fixture(scope="module")
def receiver(google: GoogleStandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with auth_server(google, tmp_path_factory.mktemp("risc"), env={
            "GOOGLE_RISC": "true", "GOOGLE_RISC_DISCOVERY_URL": google.risc_discovery_url}) as server:
        yield server


def events(google: GoogleStandIn, kind: str, sub: str, **details: Any) -> dict[str, Any]:
    return {kind: {"subject": {"subject_type": "iss-sub", "iss": google.issuer, "sub": sub}, **details}}


def deliver(server: ServerProcess, token: str) -> httpx2.Response:
    return httpx2.post(server.base_url + "/oauth/google/risc", content=token,
                       headers={"content-type": "application/secevent+jwt", "accept": "application/json"})


def signed_in(server: ServerProcess, google: GoogleStandIn) -> tuple[dict[str, Any], RawClient, dict[str, Any]]:
    person = someone_new()
    google.next_login(person)
    client = RawClient.register(server)
    tokens = client.sign_in()
    assert mcp_call(server, tokens["access_token"], "tools/list").status_code == 200
    return person, client, tokens


@pytest.mark.parametrize("kind", AT_RISK)
def test_an_account_at_risk_loses_its_access_at_once(receiver: ServerProcess, google: GoogleStandIn,
                                                     kind: str) -> None:
    person, client, tokens = signed_in(receiver, google)
    answer = deliver(receiver, google.risc_token(events(google, kind, person["sub"], reason="hijacking"),
                                                 aud=GOOGLE_CLIENT_ID))
    assert answer.status_code == 202, answer.text
    assert mcp_call(receiver, tokens["access_token"], "tools/list").status_code == 401
    refreshed = client.refresh(tokens["refresh_token"])
    assert refreshed.status_code == 400 and refreshed.json()["error"] == "invalid_grant"
    log = receiver.log()
    assert '"event": "security_event"' in log and kind.rsplit("/", 1)[-1] in log and "access ended" in log


def test_refused_tokens_change_nothing(receiver: ServerProcess, google: GoogleStandIn) -> None:
    person, client, tokens = signed_in(receiver, google)
    ending = events(google, RISC + "sessions-revoked", person["sub"])
    now = int(time.time())
    refused = {
        "forged": (google.risc_token(ending, aud=GOOGLE_CLIENT_ID, sign_with="stranger"), "invalid_key"),
        "an unknown key": (google.risc_token(ending, aud=GOOGLE_CLIENT_ID, kid="not-a-google-key"), "invalid_key"),
        "another audience": (google.risc_token(ending, aud="other.apps.googleusercontent.com"), "invalid_audience"),
        "another issuer": (google.risc_token(ending, aud=GOOGLE_CLIENT_ID, iss="https://evil.example"),
                           "invalid_issuer"),
        "expired": (google.risc_token(ending, aud=GOOGLE_CLIENT_ID, iat=now - 7200), "invalid_request"),
        "from the future": (google.risc_token(ending, aud=GOOGLE_CLIENT_ID, iat=now + 3600), "invalid_request"),
        "not a token": ("not.a.token", "invalid_request"),
        "not even text": ("\udcff", "invalid_request"),
    }
    for case, (token, err) in refused.items():
        answer = httpx2.post(receiver.base_url + "/oauth/google/risc", content=token.encode("utf-8", "surrogateescape"),
                             headers={"content-type": "application/secevent+jwt"})
        assert answer.status_code == 400, (case, answer.text)
        assert answer.json()["err"] == err, (case, answer.text)
    too_large = deliver(receiver, "x" * 100_000)
    assert too_large.status_code == 413
    replayed = google.risc_token(events(google, RISC + "account-enabled", person["sub"]), aud=GOOGLE_CLIENT_ID)
    assert deliver(receiver, replayed).status_code == 202, "account-enabled is noted only"
    again = deliver(receiver, replayed)
    assert again.status_code == 400 and "delivered before" in again.json()["description"]
    assert mcp_call(receiver, tokens["access_token"], "tools/list").status_code == 200, "nothing changed"
    assert client.refresh(tokens["refresh_token"]).status_code == 200
    log = receiver.log()
    assert log.count('"event": "security_event_refused"') >= len(refused) + 1
    assert "Traceback" not in log


def test_the_receiver_is_off_unless_configured(signin_server: ServerProcess, google: GoogleStandIn) -> None:
    person, _, tokens = signed_in(signin_server, google)
    token = google.risc_token(events(google, RISC + "sessions-revoked", person["sub"]), aud=GOOGLE_CLIENT_ID)
    assert deliver(signin_server, token).status_code in (404, 405)
    assert mcp_call(signin_server, tokens["access_token"], "tools/list").status_code == 200


@pytest.mark.store_of_its_own
def test_a_replica_that_did_not_receive_the_event_ends_access_too(google: GoogleStandIn, tmp_path: Path,
                                                                   redis_server: RedisServer) -> None:
    """Google pushes to one replica; the person's token is refused on every one at once."""
    port = free_port()  # both replicas are one server to clients: PUBLIC_URL is the first's address
    env = {"GOOGLE_RISC": "true", "GOOGLE_RISC_DISCOVERY_URL": google.risc_discovery_url,
           "STORE_URL": f"{redis_server.url}?prefix=risc-{time.time_ns()}", "SECRET_KEY": TEST_SECRET_KEY,
           "PUBLIC_URL": f"http://127.0.0.1:{port}"}
    with auth_server(google, tmp_path / "a", env=env, port=port) as first, \
            auth_server(google, tmp_path / "b", env=env) as second:
        person, _, tokens = signed_in(first, google)
        as_first = {"Host": f"127.0.0.1:{port}"}
        assert mcp_call(second, tokens["access_token"], "tools/list", **as_first).status_code == 200
        token = google.risc_token(events(google, RISC + "account-disabled", person["sub"]), aud=GOOGLE_CLIENT_ID)
        assert deliver(first, token).status_code == 202
        assert mcp_call(second, tokens["access_token"], "tools/list", **as_first).status_code == 401
