"""/account over HTTP: a person signs in with Google (same policy), sees the applications connected to
them and nobody else's, and disconnects one or all, which ends their tokens at once."""

from __future__ import annotations

import html
import re
from pathlib import Path

import httpx2

from tests.conftest import ServerProcess
from tests.headless_browser import Browser
from tests.signin import ALICE, BOB, GoogleStandIn, RawClient, auth_server, mcp_call

DISCONNECT = re.compile(r'<button type="submit" name="grant" value="([^"]+)" aria-label="Disconnect ([^"]+)">')
TOKEN = re.compile(r'name="csrf_token"\s+value="([^"]+)"')


def open_account(server: ServerProcess, google: GoogleStandIn, person: dict) -> tuple[Browser, str]:
    """A browser that signed in to /account as `person`, and the page it shows."""
    google.next_login(person)
    browser = Browser()
    page = browser.go(server.base_url + "/account")
    assert page.status == 200, page.body
    assert page.url == server.base_url + "/account"
    return browser, page.body


def disconnect(browser: Browser, server: ServerProcess, page: str, grant: str, **headers: str) -> httpx2.Response:
    token = TOKEN.search(page).group(1)
    return browser.http.post(server.base_url + "/account", data={"csrf_token": token, "grant": grant},
                             headers=headers)


def sign_in(server: ServerProcess, google: GoogleStandIn, person: dict, name: str,
            redirect_uri: str = "http://127.0.0.1:6777/cb") -> dict:
    google.next_login(person)
    return RawClient.register(server, redirect_uri=redirect_uri, client_name=name).sign_in()


def test_the_page_lists_my_apps_and_disconnects_one_then_all(signin_server: ServerProcess,
                                                             google: GoogleStandIn) -> None:
    server = signin_server
    editor = sign_in(server, google, ALICE, "Alice's <editor>", "http://127.0.0.1:7001/callback")
    desktop = sign_in(server, google, ALICE, "Alice's desktop app", "http://localhost:7002/callback")
    bobs = sign_in(server, google, BOB, "Bob's tool")
    revocations_before = len(google.revocations())

    browser, page = open_account(server, google, ALICE)
    shown = {html.unescape(name): grant for grant, name in DISCONNECT.findall(page)}
    assert set(shown) == {"Alice's <editor>", "Alice's desktop app"}, "Bob's app is not on Alice's page"
    assert "Alice&#x27;s &lt;editor&gt;" in page and "<editor>" not in page
    assert "127.0.0.1:7001" in page and "localhost:7002" in page
    assert "Signed in as <strong>alice@example.com</strong>" in page
    assert "frame-ancestors 'none'" in browser.http.get(server.base_url + "/account").headers[
        "content-security-policy"]

    gone = disconnect(browser, server, page, shown["Alice's <editor>"])
    assert gone.status_code == 303
    after = browser.http.get(gone.headers["location"]).text
    assert "Disconnected 1 application." in after and "Alice&#x27;s desktop app" in after
    assert mcp_call(server, editor["access_token"], "tools/list").status_code == 401, "ended at once"
    assert mcp_call(server, desktop["access_token"], "tools/list").status_code == 200
    assert len(google.revocations()) == revocations_before, "another grant still needs Google's token"

    everything = disconnect(browser, server, after, "all")
    final = browser.http.get(everything.headers["location"]).text
    assert "Disconnected 1 application." in final and "No applications are connected" in final
    assert mcp_call(server, desktop["access_token"], "tools/list").status_code == 401
    assert mcp_call(server, bobs["access_token"], "tools/list").status_code == 200, "Bob is untouched"
    assert len(google.revocations()) == revocations_before + 1, "no grant needs Alice's Google token now"
    assert '"event": "apps_disconnected"' in server.log()


def test_nobody_disconnects_what_is_not_theirs(signin_server: ServerProcess, google: GoogleStandIn) -> None:
    server = signin_server
    bobs = sign_in(server, google, BOB, "Bob's only app")
    _, bob_page = open_account(server, google, BOB)
    bob_grant = DISCONNECT.search(bob_page).group(1)
    sign_in(server, google, ALICE, "Alice's app")
    alice, alice_page = open_account(server, google, ALICE)
    stolen = disconnect(alice, server, alice_page, bob_grant)
    forged = alice.http.post(server.base_url + "/account", data={"csrf_token": "guess", "grant": "all"})
    cross_site = disconnect(alice, server, alice_page, "all", origin="https://evil.example")
    assert stolen.status_code == 404
    assert forged.status_code == 403 and cross_site.status_code == 403
    assert mcp_call(server, bobs["access_token"], "tools/list").status_code == 200
    assert "Alice&#x27;s app" in alice.http.get(server.base_url + "/account").text, "nothing was changed"


def test_signed_out_means_google_first_and_the_same_policy(google: GoogleStandIn, tmp_path: Path) -> None:
    with auth_server(google, tmp_path, env={"ALLOWED_DOMAINS": "corp.example"}) as server:
        anonymous = httpx2.get(server.base_url + "/account")
        posted = httpx2.post(server.base_url + "/account", data={"grant": "all"})
        google.next_login(ALICE)
        refused = Browser().go(server.base_url + "/account")
    assert anonymous.status_code == 303 and anonymous.headers["location"].startswith(google.issuer)
    assert posted.status_code == 303, "no change without signing in first"
    assert refused.status == 403 and "Access refused" in refused.body
    assert 'href="' not in refused.body, "no link that would start the same refusal again"


def test_a_step_up_widens_the_clients_grant_instead_of_adding_one(google: GoogleStandIn, tmp_path: Path) -> None:
    """A client that signed in for `mcp` and is asked for `mcp google` (google_profile) signs in again: the person
    keeps one grant for that client, the wider one, and /account lists the application once. A sign-in with
    the same scopes (another machine sharing the client_id) ends nothing."""
    with auth_server(google, tmp_path) as server:
        client = RawClient.register(server, client_name="Widened app")
        google.next_login(ALICE)
        narrow = client.sign_in("mcp")
        google.next_login(ALICE)
        twin = client.sign_in("mcp")  # the same client elsewhere, the same scopes: both stay signed in
        assert [mcp_call(server, t["access_token"], "tools/list").status_code for t in (narrow, twin)] == [200, 200]
        google.next_login(ALICE)
        wide = client.sign_in("mcp google")
        _, page = open_account(server, google, ALICE)
        shown = [html.unescape(name) for _, name in DISCONNECT.findall(page)]
        statuses = [mcp_call(server, t["access_token"], "tools/list").status_code for t in (narrow, twin, wide)]
        log = server.log()
    assert shown == ["Widened app"], shown
    assert statuses == [401, 401, 200], "the narrower grants ended; the wider one serves"
    assert log.count('"reason": "widened by a step-up"') == 2
