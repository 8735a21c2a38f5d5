"""Helpers for the sign-in tests: the Google stand-in, servers with sign-in on, and OAuth clients.

The stand-in is npm `oidc-provider` (tests/peers/google_standin.mjs) on loopback. Clients are the real
ones: the SDK's OAuthClientProvider, the TypeScript SDK, mcp-remote, the Inspector CLI, and raw OAuth
requests for the attacks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from tests.conftest import REPO, Peers, ServerProcess, free_port, start_server
from tests.headless_browser import Browser

ALICE = {"sub": "100000000000000000001", "email": "alice@example.com", "email_verified": True,
         "name": "Alice Example", "picture": "https://example.com/alice.png"}
BOB = {"sub": "100000000000000000002", "email": "bob@example.org", "email_verified": True, "name": "Bob Other"}
CAROL = {"sub": "100000000000000000003", "email": "carol@corp.example", "email_verified": True,
         "name": "Carol Corp", "hd": "corp.example"}
GOOGLE_CLIENT_ID = "stream-http-test.apps.googleusercontent.com"
GOOGLE_CLIENT_SECRET = "stand-in-secret"


def someone_new() -> dict[str, Any]:
    """A person the session-wide stand-in has never seen (so its counts are the calling test's alone)."""
    sub = f"2{time.time_ns() % 10**19:019d}"
    return {"sub": sub, "email": f"p{sub[-6:]}@example.com", "email_verified": True, "name": "New Person"}


class GoogleStandIn:
    """The stand-in's process and its test controls."""

    def __init__(self, peers: Peers, workdir: Path, *extra: str) -> None:
        self.log_path = workdir / "google-standin.log"
        workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([peers.node22, str(peers.root / "google_standin.mjs"), "--port", "0", *extra],
                                        stdout=subprocess.PIPE, stderr=self.log_path.open("wb"), text=True,
                                        env=peers.node_env())
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line.startswith("ready "):
            raise RuntimeError(f"the Google stand-in did not start: {line!r} {self.log_path.read_text()}")
        self.issuer = line.split()[1]
        self.discovery_url = self.issuer + "/.well-known/openid-configuration"

    def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        response = (httpx2.post(self.issuer + path, json=body) if body is not None
                    else httpx2.get(self.issuer + path))
        response.raise_for_status()
        return response.json()

    def allow_callback(self, callback_url: str) -> None:
        self.control("/test/clients", {"client_id": GOOGLE_CLIENT_ID, "client_secret": GOOGLE_CLIENT_SECRET,
                                       "redirect_uris": [callback_url]})

    def next_login(self, person: dict[str, Any], *, deny: bool = False) -> None:
        self.control("/test/next-login", {**person, "deny": deny})

    def misbehave(self, mode: str | None) -> None:
        self.control("/test/misbehave", {"mode": mode})

    def revoke_person(self, sub: str) -> None:
        self.control("/test/revoke-user", {"sub": sub})

    def authorization_requests(self) -> list[dict[str, str]]:
        return self.control("/test/log")["authorizationRequests"]

    def revocations(self) -> list[dict[str, Any]]:
        return self.control("/test/log")["revocations"]

    def refreshes(self) -> list[dict[str, Any]]:
        """Every refresh-token request Google saw, with its outcome ("success" or "error")."""
        return self.control("/test/log")["refreshes"]

    def refresh_tokens(self, sub: str, client_id: str | None = None) -> dict[str, Any]:
        """How many refresh tokens Google issued to `sub` (for one client, else for all), how many of them are
        still live and how many were revoked: {"live", "issued", "revoked"}, the rest having expired. With
        several clients and no client_id, "clients" has the counts of each."""
        query = {"sub": sub, **({"client_id": client_id} if client_id else {})}
        return self.control("/test/refresh-tokens?" + urlencode(query))

    @property
    def risc_discovery_url(self) -> str:
        """Cross-Account Protection's configuration: the issuer and the keys its security event tokens verify with."""
        return self.issuer + "/.well-known/risc-configuration"

    def risc_token(self, events: dict[str, Any], aud: str, **claims: Any) -> str:
        """A security event token as Google pushes it to a RISC receiver: a JWT (RS256, with the stand-in's kid)
        of iss, aud, iat, jti and `events`. `claims`: iat (default now), jti (default random), iss (default the
        issuer), kid, and sign_with="stranger" for one signed with a key the served JWKS does not hold."""
        return self.control("/test/risc/token", {"events": events, "aud": aud, **claims})["token"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def start_auth_server(google: GoogleStandIn, workdir: Path, *args: str, env: dict[str, str] | None = None,
                      port: int | None = None, script: Path = REPO / "server.py") -> ServerProcess:
    """server.py with sign-in on, its Google callback registered with the stand-in."""
    port = port or free_port()
    google.allow_callback(f"http://127.0.0.1:{port}/oauth/google/callback")
    auth_env = {"GOOGLE_CLIENT_ID": GOOGLE_CLIENT_ID, "GOOGLE_CLIENT_SECRET": GOOGLE_CLIENT_SECRET,
                "GOOGLE_DISCOVERY_URL": google.discovery_url, **(env or {})}
    return start_server(workdir, *args, env=auth_env, port=port, wait_path="/healthz", script=script)


@contextmanager
def auth_server(google: GoogleStandIn, workdir: Path, *args: str, env: dict[str, str] | None = None,
                port: int | None = None, script: Path = REPO / "server.py") -> Iterator[ServerProcess]:
    server = start_auth_server(google, workdir, *args, env=env, port=port, script=script)
    try:
        yield server
    finally:
        server.stop()


# --- the SDK's OAuth client, driven headlessly


@dataclass
class MemoryTokens:
    """TokenStorage for the SDK's OAuthClientProvider, kept in memory (and inspectable by tests)."""

    tokens: OAuthToken | None = None
    client: OAuthClientInformationFull | None = None
    history: list[OAuthToken] = field(default_factory=list)

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens
        self.history.append(tokens)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


@dataclass
class SdkSignIn:
    """An SDK client that signs in through the headless browser when the server asks."""

    server_url: str
    storage: MemoryTokens = field(default_factory=MemoryTokens)
    decision: str = "approve"
    redirect_uri: str = "http://127.0.0.1:6555/callback"
    sign_ins: int = 0
    browser: Browser | None = None

    def provider(self) -> OAuthClientProvider:
        metadata = OAuthClientMetadata(client_name="pytest SDK client", redirect_uris=[self.redirect_uri],
                                       grant_types=["authorization_code", "refresh_token"],
                                       response_types=["code"], token_endpoint_auth_method="none")
        result: dict[str, str] = {}

        async def redirect(url: str) -> None:
            self.sign_ins += 1
            self.browser = Browser(decision=self.decision, stop_at=self.redirect_uri)
            result["url"] = (await anyio.to_thread.run_sync(self.browser.go, url)).url

        async def callback() -> AuthorizationCodeResult:
            query = {key: values[0] for key, values in parse_qs(urlsplit(result["url"]).query).items()}
            if "code" not in query:
                raise RuntimeError(f"sign-in ended without a code: {query}")
            return AuthorizationCodeResult(code=query["code"], state=query.get("state"), iss=query.get("iss"))

        return OAuthClientProvider(server_url=self.server_url, client_metadata=metadata, storage=self.storage,
                                   redirect_handler=redirect, callback_handler=callback)

    def client(self, http: httpx2.AsyncClient, mode: str = "legacy", **options: Any) -> Client:
        return Client(streamable_http_client(self.server_url, http_client=http), mode=mode, **options)


# --- raw OAuth, for the attacks


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


@dataclass
class RawClient:
    """A client registered by hand, which runs the authorization-code flow step by step."""

    server: ServerProcess
    client_id: str
    redirect_uri: str
    client_secret: str | None = None

    @classmethod
    def register(cls, server: ServerProcess, redirect_uri: str = "http://127.0.0.1:6777/cb",
                 **metadata: Any) -> RawClient:
        # A name of its own: registering the very same metadata again gets the same client back.
        body = {"client_name": f"raw test client {secrets.token_hex(4)}", "redirect_uris": [redirect_uri],
                "token_endpoint_auth_method": "none", **metadata}
        response = httpx2.post(server.base_url + "/register", json=body)
        assert response.status_code == 201, response.text
        info = response.json()
        return cls(server, info["client_id"], redirect_uri, info.get("client_secret"))

    def authorize_url(self, challenge: str | None, **overrides: str | None) -> str:
        params = {"response_type": "code", "client_id": self.client_id, "redirect_uri": self.redirect_uri,
                  "state": "xyz-state", "code_challenge": challenge, "code_challenge_method": "S256",
                  "scope": "mcp", "resource": self.server.mcp_url, **overrides}
        return self.server.base_url + "/authorize?" + urlencode({k: v for k, v in params.items() if v is not None})

    def authorize(self, challenge: str | None = None, decision: str = "approve",
                  **overrides: str | None) -> tuple[dict[str, str], Browser]:
        """Run the browser part; return the query the client's redirect URI received."""
        browser = Browser(decision=decision, stop_at=overrides.get("redirect_uri") or self.redirect_uri)
        end = browser.go(self.authorize_url(challenge, **overrides))
        if end.method != "STOP":
            return {}, browser
        return {key: values[0] for key, values in parse_qs(urlsplit(end.url).query).items()}, browser

    def token(self, **form: str) -> httpx2.Response:
        return httpx2.post(self.server.base_url + "/token", data={"client_id": self.client_id, **form})

    def exchange(self, code: str, verifier: str, **extra: str) -> httpx2.Response:
        return self.token(**{"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                             "redirect_uri": self.redirect_uri, **extra})

    def refresh(self, refresh_token: str, **extra: str) -> httpx2.Response:
        return self.token(grant_type="refresh_token", refresh_token=refresh_token, **extra)

    def sign_in(self, scope: str = "mcp") -> dict[str, Any]:
        """The whole flow: tokens for whoever the stand-in signs in next."""
        verifier, challenge = pkce_pair()
        query, browser = self.authorize(challenge, scope=scope)
        assert "code" in query, (query, [(v.status, v.url, v.body[:300]) for v in browser.visits[-3:]])
        response = self.exchange(query["code"], verifier)
        assert response.status_code == 200, response.text
        return response.json()


class DocumentHost:
    """JSON documents served on loopback, as a developer's client serves its metadata document and keys
    (a server sees them only with CIMD_ALLOW_LOCAL on). Counts the fetches of each path."""

    def __init__(self) -> None:
        self.documents: dict[str, Any] = {}
        self.fetches: Counter[str] = Counter()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.fetches[self.path] += 1
                document = host.documents.get(self.path)
                body = json.dumps(document).encode()
                self.send_response(200 if document is not None else 404)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def publish(self, path: str, document: Any) -> str:
        self.documents[path] = document
        return self.base_url + path

    def stop(self) -> None:
        self.httpd.shutdown()


def mcp_call(server: ServerProcess, access_token: str | None, method: str = "tools/call",
             params: dict[str, Any] | None = None, *, http: httpx2.Client | None = None,
             **headers: str) -> httpx2.Response:
    """One stateless-style MCP request with a bearer token (the 2026-07-28 envelope)."""
    body = {"jsonrpc": "2.0", "id": 1, "method": method,
            "params": {**(params or {}), "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                                                   "io.modelcontextprotocol/clientCapabilities": {}}}}
    request_headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
                       "mcp-protocol-version": "2026-07-28", "mcp-method": method, **headers}
    if method == "tools/call" and params:
        request_headers["mcp-name"] = params["name"]
    if access_token:
        request_headers["authorization"] = f"Bearer {access_token}"
    return (http or httpx2).post(server.mcp_url, json=body, headers=request_headers, timeout=30)


def browser_program(workdir: Path, decision: str = "approve") -> tuple[str, Path]:
    """A BROWSER= program that runs the headless browser, and the log it writes."""
    log = workdir / f"browser-{decision}.log"
    script = workdir / f"browser-{decision}.sh"
    script.write_text(f'#!/bin/sh\nHEADLESS_DECISION={decision} HEADLESS_LOG="{log}" '
                      f'exec "{sys.executable}" "{REPO / "tests" / "headless_browser.py"}" "$@"\n')
    script.chmod(0o755)
    return str(script), log


def google_apis(google: GoogleStandIn) -> dict[str, str]:
    """The settings that send server.py's Calendar and Drive requests to the stand-in."""
    return {"GOOGLE_CALENDAR_API": f"{google.issuer}/calendar/v3", "GOOGLE_DRIVE_API": f"{google.issuer}/drive/v3"}


def mcp_remote(peers: Peers, url: str, workdir: Path) -> tuple[StdioServerParameters, Path]:
    """mcp-remote for `url` as Claude Desktop starts it, signing in through the headless browser; and the
    log of the pages that browser visited."""
    browser, visits = browser_program(workdir)
    params = StdioServerParameters(command=peers.node22, args=[peers.bin("mcp-remote/dist/proxy.js"), url],
                                   env=peers.node_env(BROWSER=browser, MCP_REMOTE_CONFIG_DIR=str(workdir / "auth"),
                                                      HOME=str(workdir)))
    return params, visits


def env_without_settings() -> dict[str, str]:
    from tests.conftest import SETTING_NAMES

    return {key: value for key, value in os.environ.items() if key not in SETTING_NAMES}
