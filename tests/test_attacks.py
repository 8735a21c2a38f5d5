"""Attacks on the sign-in, each refused with the right error and no token issued, against a real
server and the Google stand-in. Plus a property-based fuzz of the OAuth endpoints."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import TIME_FOR_A_TRACEBACK_S, ServerProcess
from tests.headless_browser import Browser
from tests.signin import ALICE, BOB, CAROL, DocumentHost, GoogleStandIn, RawClient, auth_server, mcp_call, pkce_pair


def assert_page(response: httpx2.Response, status: int, words: str) -> None:
    """A page for the person (never a redirect to an address nobody vouched for)."""
    assert response.status_code == status
    assert "location" not in response.headers
    assert words in response.text, response.text[-800:]


def query_of(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


# --- PKCE and codes


@pytest.mark.parametrize(("overrides", "description"), [
    ({"code_challenge": None}, "a PKCE code_challenge is required"),
    ({"code_challenge_method": "plain"}, "code_challenge_method must be S256"),
    ({"code_challenge_method": None}, "code_challenge_method must be S256"),
    ({"code_challenge": "short"}, "a PKCE code_challenge is required"),
    ({"response_type": "token"}, "response_type must be code"),
    ({"scope": "mcp admin"}, "unknown scope admin"),
    ({"resource": "https://other.example/mcp"}, "this server issues tokens only for"),
])
def test_malformed_authorization_requests_go_back_with_an_error(signin_server: ServerProcess,
                                                                overrides: dict[str, str | None],
                                                                description: str) -> None:
    client = RawClient.register(signin_server)
    _, challenge = pkce_pair()
    query, browser = client.authorize(challenge, **overrides)
    assert query["error"] in ("invalid_request", "unsupported_response_type", "invalid_scope", "invalid_target")
    assert description in query["error_description"]
    assert query["state"] == "xyz-state" and query["iss"] == signin_server.base_url
    assert "code" not in query
    assert not browser.seen("/consent"), "refused before anything was shown"


def test_a_wrong_or_missing_verifier_gets_no_token(signin_server: ServerProcess, google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    client = RawClient.register(signin_server)
    verifier, challenge = pkce_pair()
    query, _ = client.authorize(challenge)
    wrong = client.exchange(query["code"], pkce_pair()[0])
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    again = client.exchange(query["code"], verifier)
    assert again.json()["error"] == "invalid_grant", "a code is single-use, even after a failed attempt"
    query, _ = client.authorize(challenge)
    missing = client.token(grant_type="authorization_code", code=query["code"], redirect_uri=client.redirect_uri)
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"


def test_a_replayed_code_gets_nothing_and_revokes_the_first_tokens(signin_server: ServerProcess,
                                                                   google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    client = RawClient.register(signin_server)
    verifier, challenge = pkce_pair()
    query, _ = client.authorize(challenge)
    first = client.exchange(query["code"], verifier).json()
    assert mcp_call(signin_server, first["access_token"], "tools/list").status_code == 200
    replay = client.exchange(query["code"], verifier)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    assert mcp_call(signin_server, first["access_token"], "tools/list").status_code == 401
    assert client.refresh(first["refresh_token"]).json()["error"] == "invalid_grant"
    assert '"event": "code_replayed"' in signin_server.log()


def test_a_code_is_bound_to_its_client_and_redirect_uri(signin_server: ServerProcess, google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    client = RawClient.register(signin_server)
    other = RawClient.register(signin_server)
    verifier, challenge = pkce_pair()
    query, _ = client.authorize(challenge)
    stolen = other.exchange(query["code"], verifier)
    assert stolen.json()["error"] == "invalid_grant"
    query, _ = client.authorize(challenge)
    moved = client.exchange(query["code"], verifier, redirect_uri="http://127.0.0.1:6777/elsewhere")
    assert moved.status_code == 400 and moved.json()["error"] == "invalid_request"


def test_expired_codes_and_other_resources_get_nothing(signin_server: ServerProcess, google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    client = RawClient.register(signin_server)
    verifier, challenge = pkce_pair()
    query, _ = client.authorize(challenge)
    elsewhere = client.exchange(query["code"], verifier, resource="https://other.example/mcp")
    assert elsewhere.status_code == 400 and elsewhere.json()["error"] == "invalid_target"
    with_slash = client.exchange(query["code"], verifier, resource=signin_server.mcp_url + "/")
    assert with_slash.status_code == 200, "the same resource with a trailing slash is the same resource"


# --- redirect URIs


@pytest.mark.parametrize("redirect_uri", [
    "http://127.0.0.1:6777/other-path", "https://evil.example/cb", "http://127.0.0.1:6777/cb?next=https://evil.example",
])
def test_unregistered_redirect_uris_are_never_followed(signin_server: ServerProcess, redirect_uri: str) -> None:
    client = RawClient.register(signin_server)
    _, challenge = pkce_pair()
    response = httpx2.get(client.authorize_url(challenge, redirect_uri=redirect_uri))
    assert response.status_code == 400
    assert "did not register" in response.text
    assert "location" not in response.headers


def test_a_loopback_redirect_may_change_only_its_port(signin_server: ServerProcess, google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    client = RawClient.register(signin_server, redirect_uri="http://127.0.0.1/callback")
    verifier, challenge = pkce_pair()
    query, _ = client.authorize(challenge, redirect_uri="http://127.0.0.1:49152/callback")
    assert "code" in query
    token = client.exchange(query["code"], verifier, redirect_uri="http://127.0.0.1:49152/callback")
    assert token.status_code == 200
    other_host = httpx2.get(client.authorize_url(challenge, redirect_uri="http://localhost:49152/callback"))
    assert other_host.status_code == 400


@pytest.mark.parametrize(("redirect_uri", "problem"), [
    ("http://mcp.example.com/cb", "must be https://, a loopback http:// URI or a known MCP client's app callback"),
    ("https://app.example.com/cb#frag", "must not contain a fragment"),
    ("javascript:alert(1)", "must be https://, a loopback http:// URI or a known MCP client's app callback"),
    ("myapp://oauth/callback", "to allow it, add it to REDIRECT_URI_PATTERNS"),
    ("cursor://anysphere.cursor-mcp/other", "to allow it, add it to REDIRECT_URI_PATTERNS"),
])
def test_registration_refuses_unsafe_redirect_uris(signin_server: ServerProcess, redirect_uri: str,
                                                   problem: str) -> None:
    response = httpx2.post(signin_server.base_url + "/register",
                           json={"client_name": "x", "redirect_uris": [redirect_uri],
                                 "token_endpoint_auth_method": "none"})
    assert response.status_code == 400
    assert response.json()["error"] in ("invalid_redirect_uri", "invalid_client_metadata")
    assert problem in response.json()["error_description"] or response.json()["error"] == "invalid_client_metadata"


def test_the_redirect_allowlist_restricts_and_may_admit_app_schemes(google: GoogleStandIn, tmp_path: Path) -> None:
    patterns = "https://claude.ai/api/mcp/auth_callback,http://127.0.0.1:*/callback,cursor://anysphere.cursor-mcp/*"
    with auth_server(google, tmp_path, env={"REDIRECT_URI_PATTERNS": patterns}) as server:
        def register(uri: str) -> int:
            return httpx2.post(server.base_url + "/register", json={
                "redirect_uris": [uri], "token_endpoint_auth_method": "none"}).status_code
        assert register("https://claude.ai/api/mcp/auth_callback") == 201
        assert register("http://127.0.0.1:3000/callback") == 201
        assert register("cursor://anysphere.cursor-mcp/oauth/callback") == 201
        assert register("https://evil.example/cb") == 400
        assert register("http://127.0.0.1:3000/other") == 400


# --- state and consent


def test_forged_and_replayed_google_callbacks_are_refused(signin_server: ServerProcess, google: GoogleStandIn) -> None:
    forged = httpx2.get(signin_server.base_url + "/oauth/google/callback?state=forged&code=anything")
    assert_page(forged, 400, "expired or was already completed")
    google.next_login(ALICE)
    client = RawClient.register(signin_server)
    _, challenge = pkce_pair()
    browser = Browser(stop_at=signin_server.base_url + "/oauth/google/callback")
    callback = browser.go(client.authorize_url(challenge)).url
    first = browser.http.get(callback)
    assert first.status_code == 302 and "code=" in first.headers["location"]
    replayed = browser.http.get(callback)
    assert_page(replayed, 400, "expired or was already completed")


def test_consent_needs_its_own_csrf_token_and_this_site(signin_server: ServerProcess) -> None:
    client = RawClient.register(signin_server)
    _, challenge = pkce_pair()
    pages = [Browser(stop_at="http://127.0.0.1:6777") for _ in range(2)]
    forms = []
    for browser in pages:
        response = browser.http.get(client.authorize_url(challenge), follow_redirects=True)
        forms.append(Browser.consent_form(response.text))
    (action, first), (_, second) = forms
    for data, headers, status in [
        ({**first, "csrf": "guessed"}, {}, 400),
        ({"txn": first["txn"], "csrf": second["csrf"]}, {}, 400),  # one transaction's token for another
        ({**first}, {"origin": "https://evil.example"}, 403),
        ({**first}, {"sec-fetch-site": "cross-site"}, 403),
    ]:
        response = httpx2.post(action, data={**data, "decision": "approve"}, headers=headers)
        assert response.status_code == status, (data, headers, response.text[-300:])
        assert "location" not in response.headers
    approved = httpx2.post(action, data={**first, "decision": "approve"}, headers={"origin": signin_server.base_url})
    assert approved.status_code == 303, "after all that, the real answer still works"
    twice = httpx2.post(action, data={**first, "decision": "approve"})
    assert twice.status_code == 400, "and only once"


# --- who may sign in


def refused_sign_in(server: ServerProcess) -> tuple[dict[str, str], Browser]:
    client = RawClient.register(server)
    _, challenge = pkce_pair()
    browser = Browser(stop_at=client.redirect_uri)
    end = browser.go(client.authorize_url(challenge))
    assert end.status == 403, end.body[-500:]
    link = Browser.continue_link(end.body)
    return query_of(link), browser


def test_an_unverified_email_is_refused(signin_server: ServerProcess, google: GoogleStandIn) -> None:
    google.next_login({**ALICE, "email_verified": False})
    query, browser = refused_sign_in(signin_server)
    assert "Google has not verified the address alice@example.com" in browser.visits[-1].body
    assert query["error"] == "access_denied" and query["iss"] == signin_server.base_url and "code" not in query


def test_domain_and_email_allowlists_use_verified_claims(google: GoogleStandIn, tmp_path: Path) -> None:
    env = {"ALLOWED_DOMAINS": "corp.example", "ALLOWED_EMAILS": "alice@example.com"}
    with auth_server(google, tmp_path, env=env) as server:
        google.next_login(BOB)
        query, browser = refused_sign_in(server)
        assert query["error"] == "access_denied"
        assert "bob@example.org is not among the people allowed" in browser.visits[-1].body
        google.next_login({**BOB, "email": "mallory@corp.example"})  # a corp address but no verified hd claim
        query, _ = refused_sign_in(server)
        assert query["error"] == "access_denied"
        google.next_login(CAROL)
        assert "access_token" in RawClient.register(server).sign_in()
        google.next_login(ALICE)
        assert "access_token" in RawClient.register(server).sign_in()
        request = google.authorization_requests()[-1]
        log = server.log()
    assert "hd" not in request, "two allowlists: no single domain to hint"
    assert log.count('"event": "sign_in_refused"') == 2


def test_removing_someone_from_the_list_ends_their_refresh(google: GoogleStandIn, tmp_path: Path) -> None:
    google.next_login(ALICE)
    with auth_server(google, tmp_path) as server:
        client = RawClient.register(server)
        tokens = client.sign_in()
        port = server.port
    with auth_server(google, tmp_path, env={"ALLOWED_EMAILS": "bob@example.org"}, port=port) as restarted:
        refused = client.refresh(tokens["refresh_token"])
        after = mcp_call(restarted, tokens["access_token"], "tools/list")
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    assert "alice@example.com is not among the people allowed" in refused.json()["error_description"]
    assert after.status_code == 401, "the grant ended with the refused refresh"


@pytest.mark.parametrize("mode", ["wrong_aud", "wrong_iss", "wrong_nonce", "token_error"])
def test_a_bad_answer_from_google_signs_nobody_in(signin_server: ServerProcess, google: GoogleStandIn,
                                                  mode: str) -> None:
    google.next_login(ALICE)
    google.misbehave(mode)
    query, browser = refused_sign_in(signin_server)
    assert query["error"] == "server_error" and "code" not in query
    assert "Sign-in with Google failed" in browser.visits[-1].body


def test_a_denial_at_google_is_access_denied(signin_server: ServerProcess, google: GoogleStandIn) -> None:
    google.next_login(ALICE, deny=True)
    query, browser = refused_sign_in(signin_server)
    assert query["error"] == "access_denied" and query["state"] == "xyz-state"
    assert "cancelled or refused" in browser.visits[-1].body


# --- tokens for another resource


def test_a_token_for_another_server_is_refused(google: GoogleStandIn, tmp_path: Path) -> None:
    """Two servers share one store; a token issued by one is not accepted by the other."""
    google.next_login(ALICE)
    with auth_server(google, tmp_path / "a", env={"DATA_DIR": str(tmp_path / "shared")}) as first:
        tokens = RawClient.register(first).sign_in()
        with auth_server(google, tmp_path / "b", env={"DATA_DIR": str(tmp_path / "shared")}) as second:
            accepted = mcp_call(first, tokens["access_token"], "tools/list")
            refused = mcp_call(second, tokens["access_token"], "tools/list")
    assert accepted.status_code == 200
    assert refused.status_code == 401


# --- Client ID Metadata Documents


def test_a_metadata_document_on_a_private_address_is_refused(signin_server: ServerProcess) -> None:
    for client_id in ("https://127.0.0.1:9/client.json", "https://localhost/client.json",
                      "https://10.1.2.3/client.json", "http://example.com/client.json", "https://example.com/"):
        params = {"response_type": "code", "client_id": client_id, "redirect_uri": "https://example.com/cb",
                  "code_challenge": pkce_pair()[1], "code_challenge_method": "S256"}
        response = httpx2.get(signin_server.base_url + "/authorize?" + urlencode(params))
        assert response.status_code == 400, client_id
        assert "metadata document" in response.text
        assert "location" not in response.headers


@pytest.fixture
def client_document() -> Iterator[dict[str, Any]]:
    """A client metadata document served on loopback, as a developer's client might serve it."""
    host = DocumentHost()
    url = host.publish("/oauth/client.json", {})
    host.documents["/oauth/client.json"].update({
        "client_id": url, "client_name": "Document Client", "redirect_uris": ["http://127.0.0.1:6999/cb"],
        "token_endpoint_auth_method": "none", "grant_types": ["authorization_code", "refresh_token"]})
    yield host.documents["/oauth/client.json"]
    host.stop()


def test_a_metadata_document_client_signs_in(google: GoogleStandIn, tmp_path: Path,
                                             client_document: dict[str, Any]) -> None:
    google.next_login(ALICE)
    with auth_server(google, tmp_path, env={"CIMD_ALLOW_LOCAL": "true"}) as server:
        client = RawClient(server, client_document["client_id"], "http://127.0.0.1:6999/cb")
        verifier, challenge = pkce_pair()
        query, browser = client.authorize(challenge)
        consent = next(visit for visit in browser.visits if "/consent?txn=" in visit.url)
        tokens = client.exchange(query["code"], verifier)
        log = server.log()
    assert "Document Client" in consent.body and "Vouched for by" in consent.body
    assert tokens.status_code == 200
    assert "CIMD_ALLOW_LOCAL is on" in log


def test_a_metadata_document_that_lies_about_itself_is_refused(google: GoogleStandIn, tmp_path: Path,
                                                               client_document: dict[str, Any]) -> None:
    url = client_document["client_id"]
    client_document["client_id"] = "https://somebody-else.example/client.json"
    with auth_server(google, tmp_path, env={"CIMD_ALLOW_LOCAL": "true"}) as server:
        params = {"response_type": "code", "client_id": url, "redirect_uri": "http://127.0.0.1:6999/cb",
                  "code_challenge": pkce_pair()[1], "code_challenge_method": "S256"}
        response = httpx2.get(server.base_url + "/authorize?" + urlencode(params))
    assert response.status_code == 400
    assert "the document&#x27;s client_id must be its own URL" in response.text
    assert "location" not in response.headers


# --- fuzz: never a 500


TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=40)
VALUES = st.one_of(TEXT, st.sampled_from(["code", "S256", "plain", "mcp", "mcp google", "authorization_code",
                                           "refresh_token", "none", "", "http://127.0.0.1:6777/cb"]))
FIELDS = st.dictionaries(st.sampled_from(["response_type", "client_id", "redirect_uri", "state", "scope",
                                          "code_challenge", "code_challenge_method", "resource", "grant_type",
                                          "code", "code_verifier", "refresh_token", "token", "token_type_hint",
                                          "client_secret"]), VALUES, max_size=8)


@dataclass
class Fuzzed:
    """The sign-in server the fuzzes below send their requests to, and how many each has sent it."""

    server: ServerProcess
    sent: Counter[str] = field(default_factory=Counter)


@pytest.fixture(scope="module")
def fuzzed(signin_server: ServerProcess) -> Fuzzed:
    return Fuzzed(signin_server)


@given(fields=FIELDS, endpoint=st.sampled_from(["/authorize", "/token", "/revoke", "/consent",
                                                "/oauth/google/callback"]))
@settings(max_examples=250, deadline=None)
def fuzz_oauth_requests(fuzzed: Fuzzed, fields: dict[str, str], endpoint: str) -> None:
    fuzzed.sent["oauth"] += 1
    url = fuzzed.server.base_url + endpoint
    responses = [httpx2.post(url, data=fields), httpx2.get(url, params=fields)] if endpoint != "/token" else [
        httpx2.post(url, data=fields)]
    for response in responses:
        assert response.status_code < 500, (endpoint, fields, response.text[-300:])


@given(body=st.one_of(st.dictionaries(st.sampled_from(["redirect_uris", "client_name", "grant_types", "scope",
                                                        "token_endpoint_auth_method", "response_types"]),
                                       st.one_of(VALUES, st.lists(VALUES, max_size=3)), max_size=6),
                      st.text(max_size=30)))
@settings(max_examples=150, deadline=None)
def fuzz_registrations(fuzzed: Fuzzed, body: Any) -> None:
    fuzzed.sent["registrations"] += 1
    response = httpx2.post(fuzzed.server.base_url + "/register",
                           content=json.dumps(body) if not isinstance(body, str) else body,
                           headers={"content-type": "application/json"})
    assert response.status_code < 500, (body, response.text[-300:])


FUZZES = {"oauth": fuzz_oauth_requests, "registrations": fuzz_registrations}


def test_fuzzed_oauth_requests_never_get_a_500(fuzzed: Fuzzed) -> None:
    fuzz_oauth_requests(fuzzed)


def test_fuzzed_registrations_never_get_a_500(fuzzed: Fuzzed) -> None:
    fuzz_registrations(fuzzed)


def test_the_fuzzed_server_logged_no_traceback(fuzzed: Fuzzed) -> None:
    """Whichever tests ran before it, and in whatever order: a fuzz that has not yet hit this server runs
    here first, so the log checked is always that of a fuzzed server."""
    for name, fuzz in FUZZES.items():
        if not fuzzed.sent[name]:
            fuzz(fuzzed)
    assert all(fuzzed.sent[name] for name in FUZZES), fuzzed.sent
    time.sleep(TIME_FOR_A_TRACEBACK_S)
    assert "Traceback" not in fuzzed.server.log()
