"""The Google stand-in itself: refresh tokens issued and counted as Google does, and its RISC tokens.

Driven with raw requests, as a browser and a confidential client would, without server.py.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import httpx2
import pytest

from tests.conftest import Peers
from tests.signin import GoogleStandIn, pkce_pair

CLIENT_ID = "standin-selftest.apps.googleusercontent.com"
OTHER_CLIENT_ID = "standin-other.apps.googleusercontent.com"
SECRET = "selftest-secret"
REDIRECT_URI = "http://127.0.0.1:9/cb"  # never visited: the code is read from the redirect itself


def person() -> dict[str, Any]:
    """Someone new to the stand-in, so that the counts are theirs alone."""
    number = secrets.randbelow(10**9)
    return {"sub": f"2000000000{number:09d}", "email": f"p{number}@example.com", "email_verified": True,
            "name": f"Person {number}"}


def sign_in(google: GoogleStandIn, browser: httpx2.Client, who: dict[str, Any], *, scope: str = "openid email",
            client_id: str = CLIENT_ID, **params: str) -> dict[str, Any]:
    """Google's authorization-code flow with access_type=offline, in `browser` (its cookies are its Google
    session); Google's token response."""
    google.control("/test/clients", {"client_id": client_id, "client_secret": SECRET, "redirect_uris": [REDIRECT_URI]})
    google.next_login(who)
    verifier, challenge = pkce_pair()
    url = google.issuer + "/auth?" + urlencode({
        "client_id": client_id, "response_type": "code", "redirect_uri": REDIRECT_URI, "scope": scope,
        "state": "s", "nonce": secrets.token_urlsafe(16), "code_challenge": challenge,
        "code_challenge_method": "S256", "access_type": "offline", **params})
    for _ in range(10):
        response = browser.get(url)
        assert response.is_redirect, response.text
        url = urljoin(url, response.headers["location"])
        if url.startswith(REDIRECT_URI):
            break
    code = parse_qs(urlsplit(url).query)["code"][0]
    token = httpx2.post(google.issuer + "/token", auth=(client_id, SECRET), data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI, "code_verifier": verifier})
    assert token.status_code == 200, token.text
    return token.json()


def refresh(google: GoogleStandIn, refresh_token: str, client_id: str = CLIENT_ID) -> int:
    return httpx2.post(google.issuer + "/token", auth=(client_id, SECRET),
                       data={"grant_type": "refresh_token", "refresh_token": refresh_token}).status_code


def counts(live: int, issued: int, revoked: int) -> dict[str, int]:
    return {"live": live, "issued": issued, "revoked": revoked}


def test_a_refresh_token_only_when_the_consent_is_shown(google: GoogleStandIn) -> None:
    who = person()
    with httpx2.Client() as first, httpx2.Client() as second:
        consented = sign_in(google, first, who)
        assert "refresh_token" in consented, "the first consent"
        assert google.refresh_tokens(who["sub"]) == counts(1, 1, 0)
        assert "refresh_token" not in sign_in(google, second, who), "granted before, in another browser"
        assert "refresh_token" not in sign_in(google, first, who), "granted before, in the same browser session"
        assert google.refresh_tokens(who["sub"]) == counts(1, 1, 0)
        prompted = sign_in(google, second, who, prompt="consent")
        assert "refresh_token" in prompted
        widened = sign_in(google, second, who, scope="openid email profile")
        assert "refresh_token" in widened, "a new scope is a consent shown"
        assert google.refresh_tokens(who["sub"]) == counts(3, 3, 0)
        assert refresh(google, consented["refresh_token"]) == 200, "an older refresh token stays live"

        google.misbehave("no_refresh_token")
        assert "refresh_token" not in sign_in(google, first, who, prompt="consent")
        assert google.refresh_tokens(who["sub"]) == counts(3, 3, 0), "one the client never saw is not counted"

        revocation = httpx2.get(google.discovery_url).json()["revocation_endpoint"]
        revoked = httpx2.post(revocation, auth=(CLIENT_ID, SECRET),
                              data={"token": consented["refresh_token"]})
        assert revoked.status_code == 200
        assert google.refresh_tokens(who["sub"]) == counts(2, 3, 1)

        sign_in(google, second, who, client_id=OTHER_CLIENT_ID)
        both = google.refresh_tokens(who["sub"])
        assert both["clients"] == {CLIENT_ID: counts(2, 3, 1), OTHER_CLIENT_ID: counts(1, 1, 0)}
        assert counts(both["live"], both["issued"], both["revoked"]) == counts(3, 4, 1)
        assert google.refresh_tokens(who["sub"], OTHER_CLIENT_ID) == counts(1, 1, 0)

        google.revoke_person(who["sub"])
        assert google.refresh_tokens(who["sub"], CLIENT_ID) == counts(0, 3, 3)
        assert refresh(google, widened["refresh_token"]) == 400
        assert "refresh_token" in sign_in(google, second, who), "after the revocation, a first consent again"
        assert google.refresh_tokens(who["sub"], CLIENT_ID) == counts(1, 4, 3)


@pytest.fixture(scope="module")
def google_limit_2(peers: Peers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GoogleStandIn]:
    stand_in = GoogleStandIn(peers, tmp_path_factory.mktemp("google-limit"), "--refresh-token-limit", "2")
    yield stand_in
    stand_in.stop()


def test_beyond_the_limit_the_oldest_refresh_token_is_revoked(google_limit_2: GoogleStandIn) -> None:
    who = person()
    with httpx2.Client() as browser:
        tokens = [sign_in(google_limit_2, browser, who, prompt="consent")["refresh_token"] for _ in range(3)]
    assert google_limit_2.refresh_tokens(who["sub"]) == counts(2, 3, 1)
    assert [refresh(google_limit_2, token) for token in tokens] == [400, 200, 200]


SESSIONS_REVOKED = "https://schemas.openid.net/secevent/risc/event-type/sessions-revoked"


def test_a_risc_token_verifies_against_the_served_keys_and_a_forged_one_does_not(google: GoogleStandIn) -> None:
    import jwt

    configuration = httpx2.get(google.risc_discovery_url).json()
    assert configuration["issuer"] == google.issuer
    assert configuration["jwks_uri"].startswith(google.issuer + "/")
    keys = httpx2.get(configuration["jwks_uri"]).json()["keys"]
    assert [(key["kty"], key["alg"]) for key in keys] == [("RSA", "RS256")] and keys[0]["kid"]
    assert "d" not in keys[0], "the public key only"
    events = {SESSIONS_REVOKED: {"subject": {"subject_type": "iss-sub", "iss": google.issuer,
                                             "sub": "100000000000000000001"}}}
    jwks = jwt.PyJWKClient(configuration["jwks_uri"])

    def verify(token: str) -> dict[str, Any]:
        key = jwks.get_signing_key_from_jwt(token)
        return jwt.decode(token, key, algorithms=["RS256"], audience=CLIENT_ID, issuer=configuration["issuer"])

    token = google.risc_token(events, CLIENT_ID)
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": keys[0]["kid"]}
    claims = verify(token)
    assert claims["events"] == events and claims["aud"] == CLIENT_ID and len(claims["jti"]) >= 16
    assert set(claims) == {"iss", "aud", "iat", "jti", "events"}
    chosen = verify(google.risc_token(events, CLIENT_ID, iat=1_700_000_000, jti="jti-1"))
    assert (chosen["iat"], chosen["jti"]) == (1_700_000_000, "jti-1")
    with pytest.raises(jwt.InvalidSignatureError):
        verify(google.risc_token(events, CLIENT_ID, sign_with="stranger"))
    with pytest.raises(jwt.PyJWKClientError):
        verify(google.risc_token(events, CLIENT_ID, kid="no-such-key"))
    with pytest.raises(jwt.InvalidIssuerError):
        verify(google.risc_token(events, CLIENT_ID, iss="https://accounts.example.net"))
    with pytest.raises(httpx2.HTTPStatusError):
        google.risc_token(events, CLIENT_ID, sign_with="nobody")
