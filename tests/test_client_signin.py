"""client.py signing in: the browser (or a printed link), a loopback callback, an owner-only token
cache, silent refresh, and logout."""

from __future__ import annotations

import asyncio
import json
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx2

from tests.conftest import REPO, ServerProcess, assert_no_traceback, run_python
from tests.headless_browser import Browser
from tests.signin import ALICE, GoogleStandIn, auth_server, browser_program, mcp_call


def client(server: ServerProcess, home: Path, *args: str, browser: str = "/bin/false",
           url: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_python("client.py", "--url", url or server.mcp_url, *args,
                      env={"XDG_CONFIG_HOME": str(home / "config"), "BROWSER": browser}, timeout_s=120)


def test_sign_in_once_then_use_the_cache_refresh_and_log_out(google: GoogleStandIn, tmp_path: Path) -> None:
    google.next_login(ALICE)
    browser, visits = browser_program(tmp_path)
    with auth_server(google, tmp_path / "server", env={"ACCESS_TOKEN_TTL": "3"}) as server:
        first = client(server, tmp_path, "call", "whoami", browser=browser)
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout)["email"] == ALICE["email"]
        assert "/consent?txn=" in visits.read_text()
        cache = tmp_path / "config" / "stream-http" / "tokens.json"
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600
        assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
        cached = json.loads(cache.read_text())[server.mcp_url]
        old_access = cached["tokens"]["access_token"]

        second = client(server, tmp_path, "call", "add", "a=1", "b=2")  # no browser this time
        assert second.returncode == 0, second.stderr
        time.sleep(4)  # the access token expires
        third = client(server, tmp_path, "call", "search_notes")
        assert third.returncode == 0, third.stderr
        assert "sign in" not in third.stderr.lower(), "refreshed silently"
        assert json.loads(cache.read_text())[server.mcp_url]["tokens"]["access_token"] != old_access

        logout = client(server, tmp_path, "logout")
        assert logout.returncode == 0
        assert "Signed out of" in logout.stderr
        assert server.mcp_url not in json.loads(cache.read_text())
        log = server.log()
    assert '"event": "token_refreshed"' in log and '"event": "grant_revoked"' in log


def test_no_browser_prints_the_link_and_waits_for_it(google: GoogleStandIn, signin_server: ServerProcess,
                                                    tmp_path: Path) -> None:
    google.next_login(ALICE)
    process = subprocess.Popen([sys.executable, "client.py", "--url", signin_server.mcp_url, "--no-browser",
                                "call", "whoami"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={"XDG_CONFIG_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert process.stderr is not None
    header = process.stderr.readline()
    link = process.stderr.readline().strip()
    assert header.startswith("Sign in by opening this link")
    end = Browser().go(link)
    assert re.match(r"http://127\.0\.0\.1:\d+/callback\?code=", end.url)
    assert "<h1>Signed in</h1>" in end.body and "You can close this tab and go back to the terminal." in end.body
    output, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors
    assert json.loads(output)["email"] == ALICE["email"]


def test_a_refused_sign_in_is_one_line(google: GoogleStandIn, signin_server: ServerProcess, tmp_path: Path) -> None:
    browser, _ = browser_program(tmp_path, decision="deny")
    result = client(signin_server, tmp_path, "call", "whoami", browser=browser)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "error: sign-in refused: The request was denied"
    assert_no_traceback(result.stderr)


def test_tokens_from_a_logged_out_client_no_longer_work(google: GoogleStandIn, signin_server: ServerProcess,
                                                        tmp_path: Path) -> None:
    google.next_login(ALICE)
    browser, _ = browser_program(tmp_path)
    assert client(signin_server, tmp_path, "call", "whoami", browser=browser).returncode == 0
    cache = tmp_path / "config" / "stream-http" / "tokens.json"
    held = json.loads(cache.read_text())[signin_server.mcp_url]
    access, refresh = held["tokens"]["access_token"], held["tokens"]["refresh_token"]
    assert mcp_call(signin_server, access, "tools/list").status_code == 200
    assert client(signin_server, tmp_path, "logout").returncode == 0
    assert mcp_call(signin_server, access, "tools/list").status_code == 401
    refreshed = httpx2.post(signin_server.base_url + "/token", data={
        "grant_type": "refresh_token", "refresh_token": refresh, "client_id": held["client"]["client_id"]})
    assert refreshed.status_code == 400 and refreshed.json()["error"] == "invalid_grant"
    assert signin_server.mcp_url not in json.loads(cache.read_text()), "tokens and registration forgotten"
    again = client(signin_server, tmp_path, "logout")
    assert again.returncode == 0 and again.stderr == f"Not signed in to {signin_server.mcp_url}.\n"


def test_a_url_without_the_mcp_path_is_named_before_any_sign_in(signin_server: ServerProcess,
                                                                  tmp_path: Path) -> None:
    origin = signin_server.base_url
    result = client(signin_server, tmp_path, "call", "whoami", url=origin)
    assert result.returncode == 1
    assert result.stderr == f"error: no MCP endpoint at {origin}; did you mean {origin}/mcp?\n"


def test_a_token_is_refreshed_before_it_can_expire_on_its_way(tmp_path: Path) -> None:
    """The SDK answers a 401 with a new sign-in in the browser, so client.py must never send a token
    that may expire before the server sees it: it refreshes a minute early (half a short lifetime)."""
    import argparse

    from mcp.shared.auth import OAuthToken

    import client as client_py

    assert client_py.refresh_at(3600, 1000.0) == 1000.0 + 3540
    assert client_py.refresh_at(3, 1000.0) == 1000.0 + 1.5
    cache = client_py.TokenCache("http://127.0.0.1:1/mcp", tmp_path / "tokens.json")
    provider = client_py.oauth(argparse.Namespace(url=cache.server_url, no_browser=True), cache)
    token = OAuthToken(access_token="a", token_type="Bearer", expires_in=3600, refresh_token="r")
    before = time.time()
    provider.context.update_token_expiry(token)  # what the SDK does with a new token, then it stores it
    asyncio.run(cache.set_tokens(token))
    deadline = provider.context.token_expiry_time
    assert deadline is not None and before + 3540 <= deadline <= time.time() + 3540
    assert json.loads((tmp_path / "tokens.json").read_text())[cache.server_url]["expires_at"] == deadline
    fresh = client_py.oauth(argparse.Namespace(url=cache.server_url, no_browser=True), cache)
    assert fresh.context.token_expiry_time == deadline
