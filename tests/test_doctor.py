"""`server.py doctor URL` against a healthy deployment and against deployments broken the ways they
break in the field: a proxy that hides the challenge, the metadata or the CORS headers or rewrites the
metadata; a public URL the server does not know; a narrow redirect policy; Google not knowing the
server's callback; nothing listening."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, assert_no_traceback, free_port, run_python, start_server
from tests.nginx import Nginx, readme_config, readme_nginx_block
from tests.signin import GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET, GoogleStandIn, auth_server

CALLBACKS = ["Claude (web, desktop, mobile)", "Claude Code", "ChatGPT", "VS Code", "Cursor",
             "Gemini (gemini.google.com)", "Gemini CLI", "Antigravity", "Grok",
             "mcp-remote (Claude Desktop's bridge)", "MCP Inspector"]
DOCUMENTS = ["Claude (web, desktop, mobile)", "Claude Code", "ChatGPT", "VS Code", "Cursor"]
HEALTHY = ["Host header", "readiness", "2025-11-25 handshake", "2026-07-28 discover", "CORS preflight",
           "CORS exposed headers", "401 challenge", "public URL", "trailing slash", "resource metadata (path-aware)",
           "resource metadata (root)", "issuer", "PKCE", "iss in responses",
           *(f"callback for {client}" for client in CALLBACKS), "loopback redirect on any port",
           *(f"metadata document of {client}" for client in DOCUMENTS), "consent page",
           "Google callback", "offline access", "Google discovery", "Google accepts the client",
           "Google publishing status"]
REPORT_LINE = re.compile(r"^(ok  |warn|FAIL)  [^:]+: .+$")


def doctor(url: str, *args: str) -> tuple[int, dict[str, tuple[str, str]], str]:
    """Exit status, each check's (status, detail), and the whole report."""
    done = run_python("server.py", "doctor", url, *args, timeout_s=120)
    assert_no_traceback(done.stdout, done.stderr)
    assert done.stderr == "", "the doctor prints only its own report"
    lines = done.stdout.splitlines()
    assert lines[0] == f"checking {url}" and re.fullmatch(r"\d+ passed, (1 warning|\d+ warnings), \d+ failed",
                                                          lines[-1])
    assert not re.search(r"\b1 warnings\b", lines[-1])
    checks = {}
    for line in lines[1:-1]:
        assert REPORT_LINE.match(line), line
        verdict, rest = line.split("  ", 1)
        name, detail = rest.strip().split(": ", 1)
        checks[name] = (verdict.strip(), detail)
    return done.returncode, checks, done.stdout


def failed(checks: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {name: detail for name, (status, detail) in checks.items() if status == "FAIL"}


def warned(checks: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {name: detail for name, (status, detail) in checks.items() if status == "warn"}


@pytest.fixture(scope="module")
def healthy(google: GoogleStandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with sign-in and every other setting at its default."""
    with auth_server(google, tmp_path_factory.mktemp("healthy")) as server:
        yield server


def test_a_healthy_default_deployment_passes_with_one_reminder(healthy: ServerProcess) -> None:
    status, checks, report = doctor(healthy.mcp_url)
    assert status == 0, report
    assert list(checks) == HEALTHY
    assert failed(checks) == {}
    assert list(warned(checks)) == ["Google publishing status"]
    assert "refresh tokens expire after 7 days" in checks["Google publishing status"][1]
    assert report.splitlines()[-1] == f"{len(HEALTHY) - 1} passed, 1 warning, 0 failed"
    assert checks["Google callback"][1].startswith(f"{healthy.base_url}/oauth/google/callback")
    assert "cursor://anysphere.cursor-mcp/oauth/callback" in checks["callback for Cursor"][1]
    assert checks["readiness"][1] in ("ready; the store is sqlite", "ready; the store is standalone")


def test_json_reports_the_same_for_machines(healthy: ServerProcess) -> None:
    done = run_python("server.py", "doctor", healthy.mcp_url, "--json", timeout_s=120)
    assert done.returncode == 0 and done.stderr == ""
    report = json.loads(done.stdout)
    assert [check["name"] for check in report["checks"]] == HEALTHY
    assert {check["status"] for check in report["checks"]} == {"ok", "warn"}
    assert (report["passed"], report["warnings"], report["failed"]) == (len(HEALTHY) - 1, 1, 0)


def test_a_narrow_redirect_policy_warns_of_each_client_it_shuts_out(google: GoogleStandIn, tmp_path: Path) -> None:
    """Shutting clients out may be deliberate: a warning naming the fix, not a failure."""
    with auth_server(google, tmp_path, env={"REDIRECT_URI_PATTERNS": "http://127.0.0.1:*/*"}) as server:
        status, checks, report = doctor(server.mcp_url)
    assert set(warned(checks)) == {*(f"callback for {client}" for client in CALLBACKS), "Google publishing status",
                                   *(f"metadata document of {client}" for client in DOCUMENTS)}, report
    assert "if it should, add https://claude.ai/api/mcp/auth_callback to REDIRECT_URI_PATTERNS" in \
        checks["callback for Claude (web, desktop, mobile)"][1]
    # ...but this pattern also refuses port-less loopback callbacks, which breaks Claude Code: that fails.
    assert status == 1 and list(failed(checks)) == ["loopback redirect on any port"]
    assert checks["Google accepts the client"][0] == "ok", "the rest of the sign-in still checked"


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
        env = {"PUBLIC_URL": nginx.base_url}
        with auth_server(google, tmp_path / "server", env=env, port=port):
            google.allow_callback(f"{nginx.base_url}/oauth/google/callback")
            status, checks, report = doctor(nginx.base_url + "/mcp")
    finally:
        nginx.stop()
    assert status == 1
    assert set(failed(checks)) == expected, report


def test_google_not_knowing_the_callback_is_caught_before_a_user_is(google: GoogleStandIn, tmp_path: Path) -> None:
    env = {"GOOGLE_CLIENT_ID": GOOGLE_CLIENT_ID, "GOOGLE_CLIENT_SECRET": GOOGLE_CLIENT_SECRET,
           "GOOGLE_DISCOVERY_URL": google.discovery_url}
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
    assert report.splitlines()[-1] == "0 passed, 0 warnings, 1 failed"


def test_a_server_without_sign_in_on_loopback(stateful_server: ServerProcess) -> None:
    status, checks, _ = doctor(stateful_server.mcp_url)
    assert status == 0
    assert list(checks) == ["Host header", "readiness", "2025-11-25 handshake", "2026-07-28 discover",
                            "CORS preflight", "CORS exposed headers", "sign-in"]
    assert failed(checks) == {} and warned(checks) == {}
    assert checks["sign-in"][1].startswith("off")


def test_a_proxy_that_drops_the_protocol_version_header_loses_the_2026_clients(tmp_path: Path) -> None:
    port = free_port()
    nginx = Nginx.start(tmp_path / "nginx", in_location('proxy_set_header MCP-Protocol-Version "";')(
        readme_config([port])))
    try:
        server = start_server(tmp_path / "server", port=port, env={"PUBLIC_URL": nginx.base_url})
        try:
            status, checks, report = doctor(nginx.base_url + "/mcp")
        finally:
            server.stop()
    finally:
        nginx.stop()
    assert status == 1
    assert list(failed(checks)) == ["2026-07-28 discover"], report
    assert "dropping the MCP-Protocol-Version or Mcp-Method header" in checks["2026-07-28 discover"][1]


def tls_proxy(workdir: Path, name: str, upstream: int) -> tuple[Nginx, Path]:
    """nginx terminating TLS for `name` with a certificate of its own (and the CA file that trusts it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    block = readme_nginx_block().replace("server 10.0.0.11:8000", f"server 127.0.0.1:{upstream}")
    block = "\n".join(line for line in block.splitlines() if "10.0.0." not in line)  # README's other replicas
    block = re.sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", block)
    block = re.sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", block)
    block = block.replace("server_name mcp.example.com;", f"server_name {name};")
    return Nginx.start(workdir, block, tls=True), cert


@pytest.mark.parametrize("public_url_set", [True, False], ids=["public-url", "internal-public-url"])
def test_behind_a_public_name_every_advertised_url_must_be_public(google: GoogleStandIn, tmp_path: Path,
                                                                  public_url_set: bool) -> None:
    """A TLS proxy answering for a public name (reached here with --resolve): with PUBLIC_URL that name, all
    is well; left at the server's own loopback address, the metadata sends clients to an internal URL."""
    name, port = "mcp.example.com", free_port()
    nginx, cert = tls_proxy(tmp_path / "nginx", name, port)
    public = f"https://{name}:{nginx.port}"
    env = {"PUBLIC_URL": public} if public_url_set else {"ALLOWED_HOSTS": f"{name}:*"}
    try:
        with auth_server(google, tmp_path / "server", env=env, port=port):
            google.allow_callback(f"{public}/oauth/google/callback")
            status, checks, report = doctor(f"{public}/mcp", "--resolve", f"{name}:{nginx.port}:127.0.0.1",
                                            "--cacert", str(cert))
    finally:
        nginx.stop()
    if public_url_set:
        assert status == 0 and failed(checks) == {}, report
        assert checks["metadata URLs"][0] == "ok"
    else:
        assert status == 1
        assert {"public URL", "metadata URLs"} <= set(failed(checks)), report
        assert f"http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp" in checks["metadata URLs"][1]


@pytest.mark.parametrize(("url", "problem"), [
    ("http://[::1:8000/mcp", "is not a URL"), ("http://127.0.0.1:abc/mcp", "has a port that is not a number"),
    ("not-a-url", "must be an http:// or https:// URL")])
def test_a_url_the_doctor_cannot_use_is_one_line_saying_why(url: str, problem: str) -> None:
    done = run_python("server.py", "doctor", url)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"server.py doctor: {url!r} ") and done.stderr.count("\n") == 1
    assert problem in done.stderr and "Traceback" not in done.stderr


def test_an_origin_without_the_mcp_path_gets_the_path_suggested(stateful_server: ServerProcess) -> None:
    """`doctor http://127.0.0.1:8000`: one failure naming the endpoint, not four with wrong fixes."""
    status, checks, report = doctor(stateful_server.base_url)
    assert status == 1 and list(checks) == ["MCP endpoint"], report
    assert checks["MCP endpoint"] == ("FAIL", f"{stateful_server.base_url} is no MCP endpoint, but "
                                              f"{stateful_server.mcp_url} is: check {stateful_server.mcp_url}")

