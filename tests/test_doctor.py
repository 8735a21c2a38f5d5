"""`server.py doctor URL` against a healthy deployment and against deployments broken the ways they
break in the field: a proxy that hides the challenge, the metadata or the CORS headers or rewrites the
metadata; a public URL the server does not know; a narrow redirect policy; Google not knowing the
server's callback; nothing listening."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, assert_no_traceback, free_port, run_python, start_server
from tests.nginx import Nginx, readme_config
from tests.signin import GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET, GoogleStandIn, auth_server

EVERY_KNOWN_CLIENT = ("https://*,http://127.0.0.1:*,http://localhost:*,"
                      "cursor://anysphere.cursor-mcp/oauth/callback")
HEALTHY = ["Host header", "CORS preflight", "CORS exposed headers", "401 challenge", "public URL", "trailing slash",
           "resource metadata (path-aware)", "resource metadata (root)", "issuer", "PKCE", "iss in responses",
           "callback for Claude", "callback for MCP Inspector", "callback for mcp-remote", "callback for VS Code",
           "callback for Cursor", "consent page", "Google callback", "offline access", "Google discovery",
           "Google accepts the client"]


def doctor(url: str) -> tuple[int, dict[str, tuple[bool, str]], str]:
    """Exit status, each check's (passed, detail), and the whole report."""
    done = run_python("server.py", "doctor", url, timeout_s=120)
    assert_no_traceback(done.stdout, done.stderr)
    checks = {}
    for line in done.stdout.splitlines()[1:-1]:
        verdict, rest = line.split("  ", 1)
        name, detail = rest.strip().split(": ", 1)
        checks[name] = (verdict == "ok", detail)
    return done.returncode, checks, done.stdout


def failed(checks: dict[str, tuple[bool, str]]) -> dict[str, str]:
    return {name: detail for name, (passed, detail) in checks.items() if not passed}


@pytest.fixture(scope="module")
def healthy(google: GoogleStandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with auth_server(google, tmp_path_factory.mktemp("healthy"),
                     env={"REDIRECT_URI_PATTERNS": EVERY_KNOWN_CLIENT}) as server:
        yield server


def test_a_healthy_deployment_passes_every_check(healthy: ServerProcess) -> None:
    status, checks, report = doctor(healthy.mcp_url)
    assert status == 0, report
    assert list(checks) == HEALTHY
    assert failed(checks) == {}
    assert report.splitlines()[-1] == f"{len(HEALTHY)} passed, 0 failed"
    assert checks["Google callback"][1].startswith(f"{healthy.base_url}/oauth/google/callback")


def test_the_default_redirect_policy_leaves_out_only_cursors_app_scheme(signin_server: ServerProcess) -> None:
    status, checks, _ = doctor(signin_server.mcp_url)
    assert status == 1
    assert list(failed(checks)) == ["callback for Cursor"]
    fix = "add cursor://anysphere.cursor-mcp/oauth/callback to REDIRECT_URI_PATTERNS"
    assert fix in checks["callback for Cursor"][1]


def test_a_narrow_redirect_policy_names_each_client_it_shuts_out(google: GoogleStandIn, tmp_path: Path) -> None:
    with auth_server(google, tmp_path, env={"REDIRECT_URI_PATTERNS": "http://127.0.0.1:*"}) as server:
        status, checks, _ = doctor(server.mcp_url)
    assert status == 1
    assert set(failed(checks)) == {"callback for Claude", "callback for MCP Inspector", "callback for mcp-remote",
                                   "callback for VS Code", "callback for Cursor"}
    assert "add https://claude.ai/api/mcp/auth_callback to REDIRECT_URI_PATTERNS" in checks["callback for Claude"][1]
    assert checks["Google accepts the client"][0], "the rest of the sign-in still checked"


def test_a_server_behind_a_proxy_without_its_public_url(healthy: ServerProcess, tmp_path: Path) -> None:
    """README's nginx block in front of a server whose PUBLIC_URL is still its own address."""
    nginx = Nginx.start(tmp_path / "nginx", readme_config([healthy.port]))
    try:
        status, checks, report = doctor(nginx.base_url + "/mcp")
    finally:
        nginx.stop()
    assert status == 1
    assert set(failed(checks)) == {"public URL", "resource metadata (path-aware)", "resource metadata (root)"}, report
    assert f"the server advertises {healthy.base_url}/.well-known/" in checks["public URL"][1]
    assert "set PUBLIC_URL to the URL clients use" in checks["public URL"][1]


def in_location(directives: str) -> Callable[[str], str]:
    return lambda config: config.replace("location / {", "location / {\n        " + directives)


def beside_location(block: str) -> Callable[[str], str]:
    return lambda config: config.replace("    location / {", f"    {block}\n    location / {{")


REWRITE_JSON = 'proxy_set_header Accept-Encoding ""; sub_filter_types application/json; sub_filter_once off; '
PROXY_BREAKAGES: dict[str, tuple[Callable[[str], str], set[str]]] = {
    "forgets the Host header": (lambda config: config.replace("proxy_set_header Host $http_host;", ""),
                                {"Host header"}),
    "hides the challenge": (in_location("proxy_hide_header WWW-Authenticate;"), {"401 challenge"}),
    "drops the CORS headers": (in_location("proxy_hide_header Access-Control-Expose-Headers;"),
                               {"CORS exposed headers"}),
    "does not route /.well-known/": (beside_location("location /.well-known/ { return 404; }"),
                                     {"resource metadata (path-aware)", "resource metadata (root)"}),
    "rewrites the issuer": (in_location(REWRITE_JSON + """sub_filter '"issuer":"http://' '"issuer":"https://';"""),
                            {"issuer"}),
    "offers plain PKCE": (in_location(REWRITE_JSON + """sub_filter '"code_challenge_methods_supported":["S256"]'
                                      '"code_challenge_methods_supported":["S256","plain"]';"""), {"PKCE"}),
}


@pytest.mark.parametrize("breakage", list(PROXY_BREAKAGES))
def test_a_proxy_that_breaks_one_thing_is_named_with_the_fix(google: GoogleStandIn, tmp_path: Path,
                                                             breakage: str) -> None:
    misconfigure, expected = PROXY_BREAKAGES[breakage]
    port = free_port()
    nginx = Nginx.start(tmp_path / "nginx", misconfigure(readme_config([port])))
    try:
        env = {"PUBLIC_URL": nginx.base_url, "REDIRECT_URI_PATTERNS": EVERY_KNOWN_CLIENT}
        with auth_server(google, tmp_path / "server", env=env, port=port):
            google.allow_callback(f"{nginx.base_url}/oauth/google/callback")
            status, checks, report = doctor(nginx.base_url + "/mcp")
    finally:
        nginx.stop()
    assert status == 1
    assert set(failed(checks)) == expected, report


def test_google_not_knowing_the_callback_is_caught_before_a_user_is(google: GoogleStandIn, tmp_path: Path) -> None:
    env = {"GOOGLE_CLIENT_ID": GOOGLE_CLIENT_ID, "GOOGLE_CLIENT_SECRET": GOOGLE_CLIENT_SECRET,
           "GOOGLE_DISCOVERY_URL": google.discovery_url, "REDIRECT_URI_PATTERNS": EVERY_KNOWN_CLIENT}
    server = start_server(tmp_path, env=env)  # its callback was never registered at the stand-in
    try:
        status, checks, _ = doctor(server.mcp_url)
    finally:
        server.stop()
    assert status == 1
    assert list(failed(checks)) == ["Google accepts the client"]
    assert f"add {server.base_url}/oauth/google/callback to its authorized redirect URIs" in \
        checks["Google accepts the client"][1]


def test_nothing_listening_is_one_line() -> None:
    status, checks, report = doctor(f"http://127.0.0.1:{free_port()}/mcp")
    assert status == 1
    assert list(checks) == ["connection"]
    assert "is the server up at" in checks["connection"][1]
    assert report.splitlines()[-1] == "0 passed, 1 failed"


def test_a_server_without_sign_in_on_loopback(stateful_server: ServerProcess) -> None:
    status, checks, _ = doctor(stateful_server.mcp_url)
    assert status == 0
    assert list(checks) == ["Host header", "CORS preflight", "CORS exposed headers", "sign-in"]
    assert checks["sign-in"][1].startswith("off")
