"""Tools that act on the person's Google account, asking Google only for what each tool needs, when it
needs it: through the SDK's Client with URL-mode elicitation (its handler follows the link in the headless
browser, which answers the Google stand-in's consent), in both protocol eras; with a scope unticked on
Google's screen; through mcp-remote, which takes no links, by the link in the tool result; and the
errors Google's REST APIs give (a stand-in answering in their documented shapes)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client

from tests.conftest import Peers, ServerProcess
from tests.headless_browser import Browser
from tests.signin import ALICE, BOB, GoogleStandIn, RawClient, SdkSignIn, auth_server, mcp_call, mcp_remote
from tests.test_account import TOKEN, open_account

pytestmark = pytest.mark.anyio
CALENDAR = "https://www.googleapis.com/auth/calendar.readonly"
DRIVE = "https://www.googleapis.com/auth/drive.metadata.readonly"


@pytest.fixture(autouse=True)
def alice_starts_with_no_google_grants(google: GoogleStandIn) -> Iterator[None]:
    """Google remembers what a person granted the (shared) client: each test starts and ends afresh."""
    google.revoke_person(ALICE["sub"])
    yield
    google.revoke_person(ALICE["sub"])


@pytest.fixture
def google_server(google: GoogleStandIn, tmp_path: Path) -> Iterator[ServerProcess]:
    """A stateful server with sign-in on, its Google APIs at the stand-in."""
    env = {"GOOGLE_CALENDAR_API": f"{google.issuer}/calendar/v3", "GOOGLE_DRIVE_API": f"{google.issuer}/drive/v3"}
    with auth_server(google, tmp_path, env=env) as server:
        yield server


class GrantingBrowser:
    """An elicitation callback: for a URL, the person opens it and answers Google's consent."""

    def __init__(self, google: GoogleStandIn, untick: tuple[str, ...] = ()) -> None:
        self.google, self.untick = google, untick
        self.asked: list[types.ElicitRequestURLParams] = []
        self.pages: list[str] = []

    async def __call__(self, context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        assert isinstance(params, types.ElicitRequestURLParams), params
        self.asked.append(params)
        self.google.control("/test/next-consent", {"untick": list(self.untick)})
        self.google.next_login(ALICE)
        end = await anyio.to_thread.run_sync(Browser().go, params.url)
        self.pages.append(end.body)
        return types.ElicitResult(action="accept")


async def signed_in_call(server: ServerProcess, mode: str, granting: GrantingBrowser, tool: str,
                         arguments: dict[str, Any], google: GoogleStandIn) -> types.CallToolResult:
    google.next_login(ALICE)
    signin = SdkSignIn(server.mcp_url)
    async with httpx2.AsyncClient(auth=signin.provider(), timeout=60) as http, \
            signin.client(http, mode, elicitation_callback=granting) as mcp:
        return await mcp.call_tool(tool, arguments)


def last_authorization(google: GoogleStandIn) -> dict[str, str]:
    return google.authorization_requests()[-1]


async def test_sign_in_asks_google_for_the_sign_in_scopes_only(google_server: ServerProcess,
                                                                google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    RawClient.register(google_server).sign_in()
    assert last_authorization(google)["scope"] == "openid email profile"


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_calendar_tool_asks_for_its_scope_then_completes(google_server: ServerProcess,
                                                                  google: GoogleStandIn, mode: str) -> None:
    granting = GrantingBrowser(google)
    result = await signed_in_call(google_server, mode, granting, "calendar_upcoming", {"days": 7, "limit": 5}, google)
    assert result.is_error is False, result.content
    events = result.structured_content["events"]
    assert [event["summary"] for event in events] == ["Design review", "Lunch with Bob"], "30 days ahead is left out"
    assert events[1]["location"] == "Cafe" and events[0]["link"].startswith("https://calendar.example/")
    assert len(granting.asked) == 1 and "see the events on your google calendar" in granting.asked[0].message
    incremental = last_authorization(google)
    assert incremental["scope"] == f"openid {CALENDAR}", "only what the tool needs, and openid to know who answered"
    assert incremental["include_granted_scopes"] == "true" and incremental["login_hint"] == ALICE["email"]
    assert "You can return to your application" in granting.pages[0]
    call = next(request for request in reversed(google.control("/test/log")["apiRequests"])
                if request["path"] == "/calendar/v3/calendars/primary/events")
    assert call["status"] == 200 and CALENDAR in call["scope"].split()
    assert call["query"]["singleEvents"] == "true" and call["query"]["orderBy"] == "startTime"
    assert call["query"]["maxResults"] == "5"
    log = google_server.log()
    assert '"event": "google_scopes_asked"' in log and '"event": "google_scopes_answered"' in log


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_an_unticked_scope_is_named_in_the_tool_result(google_server: ServerProcess, google: GoogleStandIn,
                                                             mode: str) -> None:
    granting = GrantingBrowser(google, untick=(DRIVE,))
    result = await signed_in_call(google_server, mode, granting, "drive_search", {"query": "budget"}, google)
    assert result.is_error is True
    text = result.content[0].text
    assert "still needs your permission to see the names and details of your google drive files" in text
    assert "Not everything was granted" in granting.pages[0]


async def test_once_granted_it_is_not_asked_again_and_drive_search_answers(google_server: ServerProcess,
                                                                          google: GoogleStandIn) -> None:
    granting = GrantingBrowser(google)
    google.next_login(ALICE)
    signin = SdkSignIn(google_server.mcp_url)
    async with httpx2.AsyncClient(auth=signin.provider(), timeout=60) as http, \
            signin.client(http, "2026-07-28", elicitation_callback=granting) as mcp:
        first = await mcp.call_tool("drive_search", {"query": "Budget", "limit": 1})
        second = await mcp.call_tool("drive_search", {"query": "o'neil"})
        google.misbehave("api_quota")
        quota = await mcp.call_tool("drive_search", {"query": "budget"})
    assert len(granting.asked) == 1, "the grant is remembered"
    assert [file["name"] for file in first.structured_content["files"]] == ["Budget 2027"]
    assert second.structured_content["files"] == []
    queries = [request["query"]["q"] for request in google.control("/test/log")["apiRequests"]
               if request["path"] == "/drive/v3/files"]
    assert "name contains 'o\\'neil' and trashed = false" in queries, "quotes escaped as Drive's query language wants"
    assert quota.is_error and "quota" in quota.content[0].text


async def test_without_url_elicitation_the_tool_result_carries_the_link(peers: Peers, google_server: ServerProcess,
                                                                       google: GoogleStandIn, tmp_path: Path) -> None:
    """mcp-remote, as Claude Desktop uses it, takes no links: the result says what is missing and where to grant
    it; after the person opened the link, calling again works."""
    google.next_login(ALICE)
    claude, _ = mcp_remote(peers, google_server.mcp_url, tmp_path)
    with anyio.fail_after(120):
        async with Client(claude, mode="legacy") as remote:
            first = await remote.call_tool("calendar_upcoming", {})
            text = first.content[0].text
            link = text[text.index("http"):].split()[0]
            google.next_login(ALICE)
            page = await anyio.to_thread.run_sync(Browser().go, link)
            again = await remote.call_tool("calendar_upcoming", {"days": 2})
    assert first.is_error and "needs your permission to see the events on your google calendar" in text
    assert link.startswith(f"{google_server.base_url}/oauth/google/grant?r=")
    assert "You can return to your application" in page.body
    assert again.is_error is False and [e["summary"] for e in again.structured_content["events"]] == ["Design review"]


async def test_google_refusing_a_token_gets_one_refresh_and_a_withdrawn_scope_is_asked_again(
        google_server: ServerProcess, google: GoogleStandIn) -> None:
    granting = GrantingBrowser(google)
    google.next_login(ALICE)
    signin = SdkSignIn(google_server.mcp_url)
    async with httpx2.AsyncClient(auth=signin.provider(), timeout=60) as http, \
            signin.client(http, "2026-07-28", elicitation_callback=granting) as mcp:
        assert (await mcp.call_tool("calendar_upcoming", {})).is_error is False
        refreshes = len(google.refreshes())
        google.misbehave("api_unauthorized")
        refreshed = await mcp.call_tool("calendar_upcoming", {})
        assert len(google.refreshes()) == refreshes + 1, "one refresh after Google refused the token"
        google.misbehave("api_insufficient")  # the person withdrew the permission at Google
        withdrawn = await mcp.call_tool("calendar_upcoming", {})
        asked_again = await mcp.call_tool("calendar_upcoming", {})
    assert refreshed.is_error is False
    assert withdrawn.is_error and "no longer allow this server to see the events" in withdrawn.content[0].text
    assert asked_again.is_error is False and len(granting.asked) == 2


async def test_access_withdrawn_at_google_signs_the_person_out(google_server: ServerProcess,
                                                               google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    tokens = RawClient.register(google_server).sign_in("mcp google")
    google.revoke_person(ALICE["sub"])
    google.misbehave("api_unauthorized")
    result = mcp_call(google_server, tokens["access_token"], "tools/call", {"name": "google_profile",
                                                                           "arguments": {}}).json()["result"]
    assert result["isError"] is True
    after = mcp_call(google_server, tokens["access_token"], "tools/list")
    assert after.status_code == 401


async def test_a_grant_answered_after_a_restart_still_completes_the_call(google: GoogleStandIn,
                                                                        tmp_path: Path) -> None:
    """Pending requests and granted scopes live in the store, shared by replicas and kept across restarts."""
    env = {"GOOGLE_CALENDAR_API": f"{google.issuer}/calendar/v3", "SECRET_KEY": "k" * 48}
    google.next_login(ALICE)
    with auth_server(google, tmp_path, env=env) as server:
        tokens = RawClient.register(server).sign_in()
        first = mcp_call(server, tokens["access_token"], "tools/call", {"name": "calendar_upcoming", "arguments": {}})
        text = first.json()["result"]["content"][0]["text"]
        port = server.port
    with auth_server(google, tmp_path, env=env, port=port) as restarted:
        google.next_login(ALICE)
        page = Browser().go(text[text.index("http"):].split()[0])
        again = mcp_call(restarted, tokens["access_token"], "tools/call", {"name": "calendar_upcoming",
                                                                           "arguments": {}}).json()["result"]
    assert "You can return to your application" in page.body
    assert again["isError"] is False, again


async def test_the_tool_surface_names_the_google_scopes(google_server: ServerProcess, google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    tokens = RawClient.register(google_server).sign_in()
    tools = {tool["name"]: tool for tool in mcp_call(google_server, tokens["access_token"],
                                                     "tools/list").json()["result"]["tools"]}
    assert tools["calendar_upcoming"]["_meta"]["stream-http/google-scopes"] == [CALENDAR]
    assert tools["drive_search"]["_meta"]["stream-http/google-scopes"] == [DRIVE]
    assert tools["drive_search"]["annotations"]["readOnlyHint"] is True
    assert "summary" in json.dumps(tools["calendar_upcoming"]["outputSchema"])


# --- /account: the Google permissions a person has granted, and withdrawing them

WITHDRAW = re.compile(r'name="google_scope" value="([^"]+)"\s+aria-label="Withdraw: ([^"]+)"')


def call_tool(server: ServerProcess, access_token: str, name: str, **arguments: Any) -> dict[str, Any]:
    response = mcp_call(server, access_token, "tools/call", {"name": name, "arguments": arguments})
    assert response.status_code == 200, response.text
    return response.json()["result"]


def grant_by_link(server: ServerProcess, google: GoogleStandIn, access_token: str, name: str,
                  **arguments: Any) -> dict[str, Any]:
    """Call a Google tool from a client that takes no links, open the link it answers with, call again."""
    asked = call_tool(server, access_token, name, **arguments)
    text = asked["content"][0]["text"]
    assert asked["isError"] and "http" in text, asked
    google.next_login(ALICE)
    assert "You can return to your application" in Browser().go(text[text.index("http"):].split()[0]).body
    return call_tool(server, access_token, name, **arguments)


def withdraw(browser: Browser, server: ServerProcess, page: str, scope: str) -> str:
    response = browser.http.post(server.base_url + "/account", data={"csrf_token": TOKEN.search(page).group(1),
                                                                     "google_scope": scope})
    assert response.status_code == 303, response.text
    return browser.http.get(response.headers["location"]).text


async def test_account_lists_the_google_permissions_and_withdraws_one_then_all(google_server: ServerProcess,
                                                                               google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    access = RawClient.register(google_server).sign_in("mcp google")["access_token"]
    assert grant_by_link(google_server, google, access, "calendar_upcoming")["isError"] is False
    assert grant_by_link(google_server, google, access, "drive_search", query="budget")["isError"] is False
    browser, page = open_account(google_server, google, ALICE)
    assert "Used by calendar_upcoming" in page and "Used by drive_search" in page
    assert "Needed to sign in" in page and "See your email address" in page
    assert {scope for scope, _ in WITHDRAW.findall(page)} == {CALENDAR, DRIVE}, "sign-in's own are not offered"
    revocations = len(google.revocations())

    page = withdraw(browser, google_server, page, CALENDAR)
    assert "this server no longer uses that permission" in page
    assert {scope for scope, _ in WITHDRAW.findall(page)} == {DRIVE}
    assert len(google.revocations()) == revocations, "Drive still needs Google's grant, so it is not revoked"
    google.misbehave("api_unauthorized")  # a Google refresh answers with every scope, the withdrawn one too
    assert call_tool(google_server, access, "drive_search", query="budget")["isError"] is False
    again = call_tool(google_server, access, "calendar_upcoming")
    assert again["isError"] and "needs your permission to see the events" in again["content"][0]["text"]

    page = withdraw(browser, google_server, page, "all")
    assert "Google has revoked this server's access" in page and "None: a tool" in page
    assert len(google.revocations()) == revocations + 1
    assert mcp_call(google_server, access, "tools/list").status_code == 200, "still connected"
    assert grant_by_link(google_server, google, access, "google_profile")["structuredContent"]["email"] == \
        ALICE["email"], "a Google tool asks afresh, and works once granted"


async def test_withdrawing_needs_the_account_page_itself(google_server: ServerProcess, google: GoogleStandIn) -> None:
    browser, page = open_account(google_server, google, ALICE)
    forged = browser.http.post(google_server.base_url + "/account", data={"csrf_token": "guess",
                                                                          "google_scope": "all"})
    unknown = browser.http.post(google_server.base_url + "/account", data={"csrf_token": TOKEN.search(page).group(1),
                                                                           "google_scope": CALENDAR})
    assert forged.status_code == 403 and unknown.status_code == 404
    assert len(WITHDRAW.findall(page)) == 0


async def test_a_grant_answered_by_another_google_account_is_refused(google_server: ServerProcess,
                                                                    google: GoogleStandIn) -> None:
    google.next_login(ALICE)
    access = RawClient.register(google_server).sign_in()["access_token"]
    asked = call_tool(google_server, access, "calendar_upcoming")["content"][0]["text"]
    google.next_login(BOB)  # the person picks another account on Google's chooser
    page = Browser().go(asked[asked.index("http"):].split()[0])
    again = call_tool(google_server, access, "calendar_upcoming")
    google.revoke_person(BOB["sub"])
    assert page.status == 403 and f"You answered Google as {BOB['email']}" in page.body
    assert ALICE["email"] not in page.body and "a…@example.com" in page.body, "the other account is only hinted at"
    assert again["isError"] and "needs your permission" in again["content"][0]["text"], "Bob's grant is not Alice's"
