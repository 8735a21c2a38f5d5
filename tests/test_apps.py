"""MCP Apps on the wire: the server advertises the extension in both eras, two tools name their views
(`_meta.ui`), one tool is for views only, and each view is one small self-contained document. Every
client without the extension gets exactly the text and structured content an Apps host gets: the views
are an addition (SEP-2133), checked with the SDK's Client signed in, in both eras, with and without the
extension. What a person sees in the views is tests/test_apps_browser.py's."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import mcp_types as types
import pytest
from mcp.client import advertise
from mcp.server.apps import APP_MIME_TYPE, EXTENSION_ID

from tests.conftest import ServerProcess, first_json, running_server
from tests.signin import ALICE, GoogleStandIn, SdkSignIn, auth_server, mcp_call
from tests.test_google_tools import GrantingBrowser

pytestmark = pytest.mark.anyio
VIEWS = {"search_notes": "ui://stream-http/notes.html", "calendar_upcoming": "ui://stream-http/calendar.html"}
APPS = advertise(EXTENSION_ID, {"mimeTypes": [APP_MIME_TYPE]})
MOST_VIEW_BYTES = 16_000


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("apps")) as server:
        yield server


@pytest.fixture
def google_server(google: GoogleStandIn, tmp_path: Path) -> Iterator[ServerProcess]:
    google.revoke_person(ALICE["sub"])
    env = {"GOOGLE_CALENDAR_API": f"{google.issuer}/calendar/v3", "GOOGLE_DRIVE_API": f"{google.issuer}/drive/v3"}
    with auth_server(google, tmp_path, env=env) as server:
        yield server
    google.revoke_person(ALICE["sub"])


def initialize(server: ServerProcess, capabilities: dict[str, Any]) -> httpx2.Response:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": capabilities, "clientInfo": {"name": "t", "version": "1"}}}
    return httpx2.post(server.mcp_url, json=body, headers={"accept": "application/json, text/event-stream"})


def modern_tools(server: ServerProcess, capabilities: dict[str, Any]) -> dict[str, Any]:
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": capabilities}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": meta}}
    headers = {"accept": "application/json, text/event-stream", "mcp-protocol-version": "2026-07-28",
               "mcp-method": "tools/list"}
    response = httpx2.post(server.mcp_url, json=body, headers=headers)
    return {tool["name"]: tool for tool in first_json(response.text)["result"]["tools"]}


def test_the_extension_is_advertised_in_both_eras(local_server: ServerProcess) -> None:
    handshake = first_json(initialize(local_server, {}).text)["result"]
    assert handshake["capabilities"]["extensions"] == {EXTENSION_ID: {}}
    discovered = mcp_call(local_server, None, "server/discover", {}, **{"mcp-method": "server/discover"})
    assert first_json(discovered.text)["result"]["capabilities"]["extensions"] == {EXTENSION_ID: {}}


def test_two_tools_name_their_views_and_one_is_for_views_only(local_server: ServerProcess) -> None:
    with_apps = modern_tools(local_server, {"extensions": {EXTENSION_ID: {"mimeTypes": [APP_MIME_TYPE]}}})
    for tool, view in VIEWS.items():
        assert with_apps[tool]["_meta"]["ui"] == {"resourceUri": view}
        assert with_apps[tool]["_meta"]["ui/resourceUri"] == view  # hosts from before MCP Apps 1.0
    assert with_apps["note_tags"]["_meta"]["ui"] == {"visibility": ["app"]}
    assert [name for name, tool in with_apps.items() if "ui" in tool["_meta"]] == [
        "search_notes", "note_tags", "calendar_upcoming"]
    without = modern_tools(local_server, {})
    assert "note_tags" not in without, "a client that renders no view never lists a tool only views call"
    assert without.keys() == with_apps.keys() - {"note_tags"}


@pytest.mark.parametrize("view", sorted(VIEWS.values()))
def test_each_view_is_one_small_self_contained_document(local_server: ServerProcess, view: str) -> None:
    read = mcp_call(local_server, None, "resources/read", {"uri": view}, **{"mcp-name": view})
    [content] = first_json(read.text)["result"]["contents"]
    assert content["mimeType"] == APP_MIME_TYPE == "text/html;profile=mcp-app"
    assert content["_meta"]["ui"] == {"csp": {}, "prefersBorder": False}, "no outside domain of any kind"
    document = content["text"]
    assert len(document.encode()) < MOST_VIEW_BYTES, len(document.encode())
    assert document.startswith("<!doctype html>") and '<html lang="en">' in document
    assert not re.search(r"<script[^>]+src|<link|@import|url\(|https?://", document), "nothing fetched from outside"
    for message in ("ui/initialize", "ui/notifications/initialized", "ui/notifications/tool-result",
                    "ui/notifications/size-changed", "tools/call", "ui/open-link"):
        assert f'"{message}"' in document
    listed = mcp_call(local_server, None, "resources/list", {}, **{"mcp-method": "resources/list"})
    entry = {resource["uri"]: resource for resource in first_json(listed.text)["result"]["resources"]}[view]
    assert entry["mimeType"] == APP_MIME_TYPE and entry["_meta"]["ui"]["csp"] == {}


def without_times(result: types.CallToolResult) -> tuple[Any, ...]:
    """A result as a person reads it, without the times the Calendar stand-in takes from its clock."""
    clock = re.compile(r'"(start|end|until)": "[^"]*"')
    texts = [clock.sub("", block.text) for block in result.content if isinstance(block, types.TextContent)]
    structured = {key: value for key, value in (result.structured_content or {}).items() if key != "until"}
    for event in structured.get("events", []):
        event.pop("start"), event.pop("end")
    return result.is_error, texts, structured


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_every_client_gets_the_same_results_with_or_without_views(google_server: ServerProcess,
                                                                        google: GoogleStandIn, mode: str) -> None:
    seen: dict[bool, list[tuple[Any, ...]]] = {}
    granting = GrantingBrowser(google)
    for apps in (False, True):
        google.next_login(ALICE)
        signin = SdkSignIn(google_server.mcp_url)
        async with httpx2.AsyncClient(auth=signin.provider(), timeout=60) as http, \
                signin.client(http, mode, elicitation_callback=granting, extensions=[APPS] if apps else []) as mcp:
            if not apps:
                await mcp.call_tool("add_note", {"title": "Seen alike", "body": "by every client", "tags": ["same"]})
            listed = {tool.name for tool in (await mcp.list_tools()).tools}
            assert ("note_tags" in listed) is apps
            seen[apps] = [without_times(await mcp.call_tool(name, arguments)) for name, arguments in (
                ("search_notes", {}), ("search_notes", {"tag": "same"}), ("calendar_upcoming", {"days": 7}))]
    assert seen[True] == seen[False]
    assert seen[False][0][2]["notes"][0]["title"] == "Seen alike"
    assert [event["summary"] for event in seen[False][2][2]["events"]] == ["Design review", "Lunch with Bob"]
    assert len(granting.asked) == 1, "the calendar was granted once, by the first client"
