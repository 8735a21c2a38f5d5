"""The MCP clients people use in late 2026, on the first try, with no network beyond loopback (like a
deployment whose egress is blocked or bot-challenged): the pinned metadata documents of Claude, Claude
Code, ChatGPT, VS Code and Cursor; private_key_jwt for documents that offer it; every known callback;
REDIRECT_URI_PATTERNS by client name."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx2
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, RSAKey

from tests.conftest import REPO, ServerProcess, first_json, run_python, running_server
from tests.signin import ALICE, DocumentHost, GoogleStandIn, RawClient, auth_server, mcp_call, pkce_pair

CLAUDE = "https://claude.ai/oauth/mcp-oauth-client-metadata"
CLAUDE_CODE = "https://claude.ai/oauth/claude-code-client-metadata"
CHATGPT = "https://chatgpt.com/oauth/client.json"
CHATGPT_MCP = "https://chatgpt.com/oauth/mcp/client.json"
VSCODE = "https://vscode.dev/oauth/client-metadata.json"
CURSOR = "https://cursor.com/oauth/mcp-client.json"

# Each pinned client with a callback it sends (loopback ones on a port of its choosing, RFC 8252 §7.3).
PINNED_SIGN_INS = [
    (CLAUDE, "https://claude.ai/api/mcp/auth_callback"),
    (CLAUDE_CODE, "http://localhost:53682/callback"),
    (CLAUDE_CODE, "http://127.0.0.1/callback"),
    (CHATGPT, "https://chatgpt.com/connector_platform_oauth_redirect"),
    (CHATGPT_MCP, "https://chatgpt.com/connector/oauth/mcp"),
    (VSCODE, "http://127.0.0.1:33418/"),
    (VSCODE, "http://127.0.0.1:61234/"),
    (VSCODE, "https://vscode.dev/redirect"),
    (CURSOR, "https://www.cursor.com/agents/mcp/oauth/callback"),
    (CURSOR, "http://localhost:8787/callback"),
]


def authorize(server: ServerProcess, client_id: str, redirect_uri: str) -> httpx2.Response:
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "state": "s",
              "code_challenge": pkce_pair()[1], "code_challenge_method": "S256", "scope": "mcp",
              "resource": server.mcp_url}
    return httpx2.get(server.base_url + "/authorize?" + urlencode(params))


# --- pinned documents


@pytest.mark.parametrize(("client_id", "redirect_uri"), PINNED_SIGN_INS)
def test_a_pinned_client_is_known_without_a_fetch(signin_server: ServerProcess, client_id: str,
                                                  redirect_uri: str) -> None:
    response = authorize(signin_server, client_id, redirect_uri)
    assert response.status_code == 302, response.text[-600:]
    assert response.headers["location"].startswith(signin_server.base_url + "/consent?txn="), response.headers


def test_claude_signs_in_by_its_pinned_document_and_calls_a_tool(signin_server: ServerProcess,
                                                                 google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    claude = RawClient(signin_server, CLAUDE, "https://claude.ai/api/mcp/auth_callback")
    verifier, challenge = pkce_pair()
    query, browser = claude.authorize(challenge)
    consent = next(visit for visit in browser.visits if "/consent?txn=" in visit.url)
    tokens = claude.exchange(query["code"], verifier)
    assert "Claude" in consent.body and "Vouched for by" in consent.body
    assert tokens.status_code == 200, tokens.text
    answer = mcp_call(signin_server, tokens.json()["access_token"], params={"name": "whoami", "arguments": {}})
    assert "alice@example.com" in answer.text
    assert claude.refresh(tokens.json()["refresh_token"]).status_code == 200


def test_without_pinning_an_unreachable_document_is_unknown(google: GoogleStandIn, tmp_path: Path) -> None:
    with auth_server(google, tmp_path, env={"PINNED_CLIENT_DOCUMENTS": "false"}) as server:
        response = authorize(server, CLAUDE, "https://claude.ai/api/mcp/auth_callback")
    assert response.status_code == 400
    assert "Unknown application" in response.text and "cannot be used" in response.text


def test_a_callback_the_pinned_copy_lacks_sends_for_the_published_document(signin_server: ServerProcess) -> None:
    """Vendors add callbacks: one the pinned copy lacks is looked up in the published document, and with
    that out of reach the request is refused as any unregistered redirect URI is, never followed."""
    response = authorize(signin_server, CURSOR, "cursor://anysphere.cursor-mcp/oauth/callback")
    assert response.status_code == 400
    assert "location" not in response.headers
    assert "asked to return to an address it did not register" in response.text


# --- private_key_jwt (RFC 7523), as ChatGPT's document offers it


class KeyedClient:
    """A client whose metadata document, on loopback, authenticates at /token with signed assertions."""

    def __init__(self, host: DocumentHost, server: ServerProcess, **document: Any) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "key-1"})
        keys = host.publish("/oauth/jwks.json", {"keys": [self.key.as_dict(private=False)]})
        self.client_id = host.publish("/oauth/client.json", {})
        host.documents["/oauth/client.json"].update({
            "client_id": self.client_id, "client_name": "Keyed Client", "redirect_uris": ["https://keyed.example/cb"],
            "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
            "token_endpoint_auth_method": "private_key_jwt", "token_endpoint_auth_signing_alg": "RS256",
            "jwks_uri": keys, **document})
        self.raw = RawClient(server, self.client_id, "https://keyed.example/cb")
        self.token_endpoint = server.base_url + "/token"

    def assertion(self, key: Any = None, alg: str = "RS256", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.client_id, "sub": self.client_id, "aud": self.token_endpoint, "iat": now, "exp": now + 60,
                "jti": uuid.uuid4().hex, **claims}
        return jwt.encode({"alg": alg, "kid": "key-1"}, {k: v for k, v in body.items() if v is not None},
                          key or self.key)

    def signed(self, assertion: str) -> dict[str, str]:
        return {"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion}

    def token(self, **form: str) -> httpx2.Response:
        """A /token request naming no client_id: the assertion says who it is from, as ChatGPT sends it."""
        return httpx2.post(self.token_endpoint, data=form)


@pytest.fixture
def documents() -> Iterator[DocumentHost]:
    host = DocumentHost()
    yield host
    host.stop()


@pytest.fixture(scope="module")
def local_documents_server(google: GoogleStandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with auth_server(google, tmp_path_factory.mktemp("keyed"), env={"CIMD_ALLOW_LOCAL": "true"}) as server:
        yield server


def code_for(client: KeyedClient, google: GoogleStandIn) -> tuple[str, str]:
    google.next_login(ALICE)
    verifier, challenge = pkce_pair()
    query, browser = client.raw.authorize(challenge)
    assert "code" in query, [(visit.status, visit.url, visit.body[-300:]) for visit in browser.visits[-2:]]
    return query["code"], verifier


def test_a_client_with_a_choice_signs_in_publicly_or_with_an_assertion(local_documents_server: ServerProcess,
                                                                      google: GoogleStandIn,
                                                                      documents: DocumentHost) -> None:
    """ChatGPT's document offers none and private_key_jwt: either works, and a refresh follows suit."""
    client = KeyedClient(documents, local_documents_server, token_endpoint_auth_method=None,
                         token_endpoint_auth_methods_supported=["none", "private_key_jwt"])
    code, verifier = code_for(client, google)
    public = client.raw.exchange(code, verifier)
    assert public.status_code == 200, public.text
    code, verifier = code_for(client, google)
    signed = client.token(grant_type="authorization_code", code=code, code_verifier=verifier,
                          redirect_uri=client.raw.redirect_uri, **client.signed(client.assertion()))
    assert signed.status_code == 200, signed.text
    refreshed = client.token(grant_type="refresh_token", refresh_token=signed.json()["refresh_token"],
                             **client.signed(client.assertion(aud=local_documents_server.base_url)))
    assert refreshed.status_code == 200, refreshed.text
    assert mcp_call(local_documents_server, refreshed.json()["access_token"], "tools/list").status_code == 200


def test_forged_and_replayed_assertions_get_nothing_and_lose_nothing(local_documents_server: ServerProcess,
                                                                      google: GoogleStandIn,
                                                                      documents: DocumentHost) -> None:
    client = KeyedClient(documents, local_documents_server)
    code, verifier = code_for(client, google)
    exchange = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                "redirect_uri": client.raw.redirect_uri}
    someone_else = RSAKey.generate_key(2048, parameters={"kid": "key-1"})
    replayed = client.assertion()
    assert client.token(grant_type="refresh_token", refresh_token="x", **client.signed(replayed)).status_code == 400
    refused = {
        "no assertion": ({"client_id": client.client_id}, "client_assertion (private_key_jwt)"),
        "another key": (client.signed(client.assertion(key=someone_else)), "does not verify"),
        "an HMAC": (client.signed(client.assertion(key=OctKey.generate_key(256), alg="HS256")), "does not verify"),
        "an EC key not in the set": (client.signed(client.assertion(key=ECKey.generate_key("P-256"), alg="ES256")),
                                     "does not verify"),
        "another audience": (client.signed(client.assertion(aud="https://other.example/token")), "aud must name"),
        "an audience of objects": (client.signed(client.assertion(aud=[{}, ["x"]])), "aud must name"),
        "another issuer": (client.signed(client.assertion(iss="https://other.example/client.json")), "iss and sub"),
        "expired": (client.signed(client.assertion(exp=int(time.time()) - 5)), "must expire within"),
        "no expiry": (client.signed(client.assertion(exp=None)), "must expire within"),
        "a day long": (client.signed(client.assertion(exp=int(time.time()) + 86400)), "must expire within"),
        "no jti": (client.signed(client.assertion(jti=None)), "needs a jti"),
        "replayed": (client.signed(replayed), "used before"),
        "another type": ({**client.signed(client.assertion()), "client_assertion_type": "jwt"},
                         "client_assertion_type must be"),
        "garbage": ({**client.signed("not.a.jwt"), "client_id": client.client_id}, "does not verify"),
        "garbage naming nobody": (client.signed("not.a.jwt"), "client_id is required"),
    }
    for case, (credentials, reason) in refused.items():
        response = client.token(**exchange, **credentials)
        assert response.status_code == 401, (case, response.text)
        assert response.json()["error"] == "invalid_client", case
        assert reason in response.json()["error_description"], (case, response.text)
    tokens = client.token(**exchange, **client.signed(client.assertion()))
    assert tokens.status_code == 200, tokens.text
    for keys in ({"keys": "x"}, [1, 2], {"keys": [{"kty": "EC", "crv": "P-999", "x": "a", "y": "b", "kid": "k9"}]},
                 {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k9"}]}):
        documents.documents["/oauth/jwks.json"] = keys
        assertion = jwt.encode({"alg": "RS256", "kid": "k9"}, {
            "iss": client.client_id, "sub": client.client_id, "aud": client.token_endpoint,
            "exp": int(time.time()) + 60, "jti": uuid.uuid4().hex}, client.key)
        response = client.token(grant_type="refresh_token", refresh_token=tokens.json()["refresh_token"],
                                **client.signed(assertion))
        assert response.status_code == 401, (keys, response.text)
    assert client.token(grant_type="refresh_token", refresh_token=tokens.json()["refresh_token"],
                        **client.signed(client.assertion())).status_code == 200
    assert "Traceback" not in local_documents_server.log()


def test_a_key_rotated_in_is_fetched_again(local_documents_server: ServerProcess, google: GoogleStandIn,
                                           documents: DocumentHost) -> None:
    client = KeyedClient(documents, local_documents_server)
    first, verifier = code_for(client, google)
    assert client.token(grant_type="authorization_code", code=first, code_verifier=verifier,
                        redirect_uri=client.raw.redirect_uri, **client.signed(client.assertion())).status_code == 200
    rotated = RSAKey.generate_key(2048, parameters={"kid": "key-2"})
    documents.documents["/oauth/jwks.json"] = {"keys": [rotated.as_dict(private=False)]}
    second, verifier = code_for(client, google)
    assertion = jwt.encode({"alg": "RS256", "kid": "key-2"}, {
        "iss": client.client_id, "sub": client.client_id, "aud": client.token_endpoint, "exp": int(time.time()) + 60,
        "jti": uuid.uuid4().hex}, rotated)
    response = client.token(grant_type="authorization_code", code=second, code_verifier=verifier,
                            redirect_uri=client.raw.redirect_uri, **client.signed(assertion))
    assert response.status_code == 200, response.text
    assert documents.fetches["/oauth/jwks.json"] == 2


def test_a_document_without_a_supported_method_is_refused(local_documents_server: ServerProcess,
                                                          documents: DocumentHost) -> None:
    client = KeyedClient(documents, local_documents_server, jwks_uri=None, token_endpoint_auth_method="private_key_jwt")
    del documents.documents["/oauth/client.json"]["jwks_uri"]
    response = authorize(local_documents_server, client.client_id, client.raw.redirect_uri)
    assert response.status_code == 400
    assert "offers no client authentication this server supports" in response.text


def test_the_metadata_advertises_private_key_jwt(signin_server: ServerProcess) -> None:
    metadata = httpx2.get(signin_server.base_url + "/.well-known/oauth-authorization-server").json()
    assert metadata["client_id_metadata_document_supported"] is True
    assert {"none", "private_key_jwt"} <= set(metadata["token_endpoint_auth_methods_supported"])
    assert "RS256" in metadata["token_endpoint_auth_signing_alg_values_supported"]


# --- callbacks


KNOWN_CALLBACKS = {
    "Claude": ["https://claude.ai/api/mcp/auth_callback", "https://claude.com/api/mcp/auth_callback",
               "claude://claude.ai/mcp-auth-callback/sdk"],
    "Claude Code": ["http://localhost:41003/callback", "http://127.0.0.1:41003/callback"],
    "ChatGPT": ["https://chatgpt.com/connector/oauth/8f3c2a1b9d", "https://chatgpt.com/connector_platform_oauth_redirect"],
    "Gemini": ["https://oauth-redirect.googleusercontent.com/r/project-1234567"],
    "Gemini CLI": ["http://localhost:7777/oauth/callback", "http://localhost:39211/oauth/callback"],
    "Antigravity": ["https://antigravity.google/oauth-callback"],
    "Grok": ["grokbot://mcp/oauth/callback", "https://grok.com/connectors-oauth-exchange-code/"],
    "Cursor": ["cursor://anysphere.cursor-mcp/oauth/callback", "cursor://anysphere.cursor-mcp/oauth/return",
               "https://www.cursor.com/agents/mcp/oauth/callback", "https://www.cursor.com/bot/mcp/oauth/callback",
               "http://localhost:8787/callback"],
    "VS Code": ["http://127.0.0.1:33418/", "https://vscode.dev/redirect", "https://insiders.vscode.dev/redirect"],
}


def register(server: ServerProcess, *uris: str) -> httpx2.Response:
    return httpx2.post(server.base_url + "/register", json={
        "client_name": f"callbacks {uuid.uuid4().hex[:6]}", "redirect_uris": list(uris),
        "token_endpoint_auth_method": "none"})


@pytest.mark.parametrize("client", list(KNOWN_CALLBACKS))
def test_every_known_callback_registers_by_default(signin_server: ServerProcess, client: str) -> None:
    response = register(signin_server, *KNOWN_CALLBACKS[client])
    assert response.status_code == 201, response.text


def test_one_refused_callback_among_several_is_named(signin_server: ServerProcess) -> None:
    response = register(signin_server, *KNOWN_CALLBACKS["Cursor"][:2], "cursor://anysphere.cursor-mcp/other")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_redirect_uri"
    assert "'cursor://anysphere.cursor-mcp/other'" in response.json()["error_description"]
    assert "REDIRECT_URI_PATTERNS" in response.json()["error_description"]
    assert "cursor://anysphere.cursor-mcp/other" in signin_server.log()


def test_redirect_patterns_may_name_clients(google: GoogleStandIn, tmp_path: Path) -> None:
    with auth_server(google, tmp_path, env={"REDIRECT_URI_PATTERNS": "claude,ChatGPT,https://mine.example/*"}
                     ) as server:
        allowed = [register(server, uri).status_code for uri in [
            *KNOWN_CALLBACKS["Claude"], *KNOWN_CALLBACKS["ChatGPT"], "https://mine.example/cb"]]
        refused = [register(server, uri) for uri in [*KNOWN_CALLBACKS["Cursor"], *KNOWN_CALLBACKS["Gemini"]]]
    assert allowed == [201] * 6
    assert [response.status_code for response in refused] == [400] * 6
    assert all("matches none of REDIRECT_URI_PATTERNS" in response.json()["error_description"]
               or "add it to REDIRECT_URI_PATTERNS" in response.json()["error_description"] for response in refused)


def test_a_client_name_the_server_does_not_know_stops_it_at_start(tmp_path: Path) -> None:
    result = run_python(str(REPO / "server.py"), "--port", "0", env={
        "REDIRECT_URI_PATTERNS": "claude,clippy", "GOOGLE_CLIENT_ID": "x.apps.googleusercontent.com",
        "GOOGLE_CLIENT_SECRET": "s", "SECRET_KEY": "k" * 40})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "REDIRECT_URI_PATTERNS names 'clippy'" in result.stderr
    assert "claude, claude-code, chatgpt" in result.stderr
    assert "Traceback" not in result.stderr


# --- tools that describe themselves for every directory


HINTS = ("readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint")


def listed_tools(server: ServerProcess, access_token: str | None) -> list[dict[str, Any]]:
    response = mcp_call(server, access_token, "tools/list")
    assert response.status_code == 200, response.text
    return first_json(response.text)["result"]["tools"]  # type: ignore[index]


def assert_described(tool: dict[str, Any], schemes: list[dict[str, Any]]) -> None:
    """What ChatGPT's and Claude's directories require of a tool, as the wire carries it."""
    name = tool["name"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name), name
    assert tool.get("title") and tool["annotations"].get("title") == tool["title"], name
    for hint in HINTS:
        assert isinstance(tool["annotations"].get(hint), bool), f"{name} has no explicit {hint}"
    assert not (tool["annotations"]["readOnlyHint"] and tool["annotations"]["destructiveHint"]), name
    assert tool["_meta"]["securitySchemes"] == schemes, name
    assert tool["securitySchemes"] == schemes, name


def test_every_tool_describes_itself_and_the_sign_in_it_needs(signin_server: ServerProcess,
                                                              google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    tokens = RawClient.register(signin_server).sign_in()
    tools = listed_tools(signin_server, tokens["access_token"])
    assert len(tools) >= 10
    for tool in tools:
        google_profile = tool["name"] == "google_profile"
        assert_described(tool, [{"type": "oauth2", "scopes": ["mcp", "google"] if google_profile else ["mcp"]}])


def test_without_sign_in_every_tool_is_noauth(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        tools = listed_tools(server, None)
    assert len(tools) >= 10
    for tool in tools:
        assert_described(tool, [{"type": "noauth"}])


def test_a_shared_client_id_has_a_budget_per_address(google: GoogleStandIn, tmp_path: Path) -> None:
    """Every Claude user signs in as Claude's one client_id: someone spending its budget at /token must not
    lock the others out. A registered client's budget stays its own, from any address."""
    with auth_server(google, tmp_path, env={"RATE_LIMIT_CLIENT": "3", "TRUSTED_PROXIES": "127.0.0.1"}) as server:
        registered = RawClient.register(server)

        def token(client_id: str, address: str) -> int:
            return httpx2.post(server.base_url + "/token", headers={"X-Forwarded-For": address}, data={
                "client_id": client_id, "grant_type": "refresh_token", "refresh_token": "x"}).status_code

        spender = [token(CLAUDE, "203.0.113.9") for _ in range(5)]
        other = token(CLAUDE, "198.51.100.7")
        own = [token(registered.client_id, address) for address in ("203.0.113.9", "198.51.100.7") * 2]
    assert spender[3:] == [429, 429] and 429 not in spender[:3]
    assert other != 429
    assert own[3] == 429, own
