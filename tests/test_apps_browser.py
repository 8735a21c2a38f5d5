"""MCP Apps views in a real host: Debian's Chromium (through Playwright) loads a test host page made of
the TypeScript SDK's Client and ext-apps' AppBridge (tests/apps_host/), connected to a running server.py.
The host calls each tool that names a view, renders the view in a sandboxed frame under the CSP its
resource declares, and the test checks what a person sees and does there: the notes listed, filtered,
opened and added to (the note reaching the store, a second client's notification and the model's
context), the agenda of the Calendar stand-in's events in the host's time zone, in light and dark, at
desktop and phone widths, without a CSP violation or a console error; with sign-in on (through the
consent page, in the browser) and off."""

from __future__ import annotations

import json
import os
import re
import threading
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import mcp_types as types

from tests.conftest import ARTIFACTS, REPO, Peers, ServerProcess, eventually, handshake_listener, running_server
from tests.signin import ALICE, GoogleStandIn, RawClient, auth_server, mcp_call, pkce_pair
from tests.test_google_tools import grant_by_link
from tests.test_make_it_yours import readme_block, serving
from tests.test_pages_browser import CALLBACK, README_SCREENSHOTS, UPDATE_README_SCREENSHOTS, VIEWPORTS, chromium

__all__ = ["chromium"]  # the fixture, shared with the page tests
HOST_DIR = REPO / "tests" / "apps_host"
HOST_PATH = "/__apps-host/"
SHOTS = ARTIFACTS / "apps"
# The bare imports the host's modules make, and the node_modules they resolve to (as a bundler would, for a browser).
BARE_IMPORTS = ["@modelcontextprotocol/client", "@modelcontextprotocol/client/_shims", "@modelcontextprotocol/core",
                "@modelcontextprotocol/core/internal", "@modelcontextprotocol/ext-apps/app-bridge", "zod", "zod/v4",
                "pkce-challenge", "eventsource", "eventsource-parser", "eventsource-parser/stream", "jose",
                "@standard-schema/spec"]
CONDITIONS = ("browser", "import", "default")
HOST_CONTEXT = {"theme": "light", "displayMode": "inline", "availableDisplayModes": ["inline", "fullscreen"],
                "locale": "en-GB", "timeZone": "Asia/Tokyo", "platform": "web",
                "containerDimensions": {"maxHeight": 500, "maxWidth": 760}}


def export_target(entry: Any) -> str | None:
    """The file a package.json "exports" entry names for a browser's ES modules."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        for condition in CONDITIONS:
            if condition in entry and (found := export_target(entry[condition])):
                return found
    return None


def import_map(modules: Path) -> dict[str, Any]:
    imports = {}
    for specifier in BARE_IMPORTS:
        scoped = specifier.startswith("@")
        parts = specifier.split("/")
        package, subpath = "/".join(parts[:2 if scoped else 1]), "/".join(parts[2 if scoped else 1:])
        manifest = json.loads((modules / package / "package.json").read_text())
        target = export_target(manifest["exports"]["./" + subpath if subpath else "."])
        assert target, f"{specifier} has no browser module"
        imports[specifier] = f"{HOST_PATH}modules/{package}/{target.removeprefix('./')}"
    return {"imports": imports}


class Host:
    """The host page in one browser window, and what it saw."""

    def __init__(self, chromium: Any, peers: Peers, base_url: str, viewport: str = "desktop") -> None:
        self.modules = peers.root / "node_modules"
        self.context = chromium.new_context(viewport=VIEWPORTS[viewport])
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}")
                     if message.type in ("error", "warning") or "Content Security Policy" in message.text else None)
        self.page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))
        self.context.route(f"{base_url}{HOST_PATH}**", self.serve)
        self.page.goto(f"{base_url}{HOST_PATH}index.html")
        try:
            self.page.wait_for_function("window.host !== undefined", timeout=20_000)
        except Exception as error:
            raise AssertionError(f"the host page did not load: {self.console}") from error
        self.frame = self.page.frame_locator("#stage iframe")

    def serve(self, route: Any) -> None:
        """The host's files, at the server's origin as a host's own page would be at its own."""
        path = route.request.url.split(HOST_PATH, 1)[1].split("?")[0]
        if path.startswith("modules/"):
            file = (self.modules / path.removeprefix("modules/")).resolve()
            assert file.is_relative_to(self.modules.resolve())
            return route.fulfill(status=200, content_type="text/javascript", body=file.read_bytes())
        body = (HOST_DIR / path).read_text()
        if path == "index.html":
            body = body.replace("IMPORT_MAP", json.dumps(import_map(self.modules)))
        return route.fulfill(status=200, content_type="text/html" if path.endswith(".html") else "text/javascript",
                             body=body)

    def connect(self, mcp_url: str, token: str | None) -> dict[str, Any]:
        return {tool["name"]: tool for tool in self.page.evaluate("([u, t]) => host.connect(u, t)", [mcp_url, token])}

    def show(self, tool: str, arguments: dict[str, Any], **context: Any) -> dict[str, Any]:
        result = self.page.evaluate("([n, a, c]) => host.show(n, a, c)", [tool, arguments, {**HOST_CONTEXT, **context}])
        self.frame.locator("main:not([aria-busy])").wait_for()
        return result

    def seen(self) -> dict[str, Any]:
        return self.page.evaluate("host.seen")

    def view_height(self) -> float:
        return self.frame.locator("html").evaluate("html => html.getBoundingClientRect().height")

    def shoot(self, name: str, for_readme: bool) -> None:
        """The view at desktop and phone widths, light and dark; README keeps the desktop ones of one run."""
        for viewport in ("desktop", "phone"):
            self.page.set_viewport_size(VIEWPORTS[viewport])
            for theme in ("light", "dark"):
                self.page.evaluate("([t]) => { document.body.className = t; return host.changeContext({theme: t}); }",
                                   [theme])
                self.frame.locator(f"html[data-theme={theme}]").wait_for()
                assert self.frame.locator("html").evaluate(
                    "html => html.scrollWidth <= html.clientWidth"), f"{name} scrolls sideways at {viewport} width"
                shot = SHOTS / f"{name}-{viewport}-{theme}.png"
                shot.parent.mkdir(parents=True, exist_ok=True)
                self.page.locator("#stage").screenshot(path=str(shot))
                assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                if for_readme and viewport == "desktop":
                    kept = README_SCREENSHOTS / f"view-{name}-{theme}.png"
                    if os.environ.get(UPDATE_README_SCREENSHOTS) == "1":
                        kept.write_bytes(shot.read_bytes())
                    assert kept.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"README shows {kept}"
        self.page.set_viewport_size(VIEWPORTS["desktop"])
        self.page.evaluate("() => { document.body.className = ''; return host.changeContext({theme: 'light'}); }")

    def close(self) -> None:
        assert self.console == [], self.console
        self.context.close()


def check_view(host: Host) -> None:
    """What every view owes the person and the host: it fits inline (at most 500 px), lets the host's
    background through, said its size, and made no CSP violation."""
    frame = host.frame
    assert host.view_height() <= 500
    assert frame.locator("body").evaluate("body => getComputedStyle(body).backgroundColor") == "rgba(0, 0, 0, 0)"
    assert frame.locator("html").evaluate("html => getComputedStyle(html).backgroundColor") == "rgba(0, 0, 0, 0)"
    sizes = host.seen()["sizes"]
    assert sizes and 0 < sizes[-1] <= 500, sizes
    assert frame.locator("script[src], link, img[src^=http], iframe").count() == 0, "self-contained"
    assert host.seen()["errors"] == []


def sign_in_in_the_browser(chromium: Any, server: ServerProcess, google: GoogleStandIn) -> str:
    """The host's sign-in as a person does it: the consent page in Chromium, Allow, back to the host."""
    client = RawClient.register(server, redirect_uri=CALLBACK, client_name="Apps Test Host")
    verifier, challenge = pkce_pair()
    context = chromium.new_context()
    arrived: list[str] = []
    context.route(CALLBACK + "**", lambda route: (arrived.append(route.request.url),
                                                  route.fulfill(status=200, body="signed in")))
    page = context.new_page()
    google.next_login(ALICE)
    page.goto(client.authorize_url(challenge, scope="mcp"))
    assert page.get_by_role("heading", level=1).inner_text() == "Allow access?"
    page.get_by_role("button", name="Allow").click()
    page.wait_for_url(CALLBACK + "**")
    context.close()
    code = re.search(r"[?&]code=([^&]+)", arrived[-1])
    assert code, arrived
    response = client.exchange(code.group(1), verifier)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def notes_index(server: ServerProcess, token: str | None) -> list[dict[str, Any]]:
    response = mcp_call(server, token, "resources/read", {"uri": "notes://index"}, **{"mcp-name": "notes://index"})
    assert response.status_code == 200, response.text
    return json.loads(response.json()["result"]["contents"][0]["text"])


def add_note(server: ServerProcess, token: str | None, title: str, body: str, tags: list[str]) -> None:
    response = mcp_call(server, token, "tools/call", {"name": "add_note",
                                                      "arguments": {"title": title, "body": body, "tags": tags}})
    assert response.json()["result"]["isError"] is False


class Listener(threading.Thread):
    """A second client of the same person, subscribed to notes://index on its own stateful session, in a
    thread of its own (the browser's API belongs to the test's thread)."""

    def __init__(self, server: ServerProcess, token: str | None) -> None:
        super().__init__(daemon=True)
        self.server, self.token = server, token
        self.updates: list[str] = []
        self.subscribed, self.done = threading.Event(), threading.Event()

    def run(self) -> None:
        anyio.run(self.listen)

    async def listen(self) -> None:
        async def on_message(message: Any) -> None:
            if isinstance(message, types.ResourceUpdatedNotification):
                self.updates.append(str(message.params.uri))

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with handshake_listener(self.server.mcp_url, headers, message_handler=on_message) as mcp:
            await mcp.subscribe_resource("notes://index")
            self.subscribed.set()
            await anyio.to_thread.run_sync(self.done.wait)


def the_notes_view(chromium: Any, peers: Peers, server: ServerProcess, token: str | None, name: str) -> None:
    """Everything a person does in the notes view, and where it lands."""
    add_note(server, token, "Groceries", "Milk, eggs and bread", ["home"])
    add_note(server, token, "Design review", "Agenda: the layers of server.py", ["work", "review"])
    host = Host(chromium, peers, server.base_url)
    try:
        tools = host.connect(server.mcp_url, token)
        assert tools["search_notes"]["ui"] == {"resourceUri": "ui://stream-http/notes.html"}
        assert tools["note_tags"]["appOnly"] is True
        result = host.show("search_notes", {"query": ""})
        assert result["structuredContent"]["total"] == 2
        frame = host.frame
        assert frame.locator("#list summary").all_inner_texts()[0].startswith("Design review")
        assert frame.locator("#list li").count() == 2
        assert frame.locator("#count").inner_text() == "2 notes"
        check_view(host)
        host.shoot(name, for_readme=token is not None)

        frame.locator("#filter").focus()  # by keyboard: filter, then open the note it leaves
        host.page.keyboard.type("milk")
        assert frame.locator("#list li").count() == 1
        assert frame.locator("#count").inner_text() == "1 shown of 2 notes"
        host.page.keyboard.press("Tab")
        host.page.keyboard.press("Tab")
        assert frame.locator("summary:focus").inner_text().startswith("Groceries")
        host.page.keyboard.press("Enter")
        assert frame.locator("#list details[open] div").inner_text() == "Milk, eggs and bread"
        frame.locator("#filter").fill("")

        frame.locator("#tag").select_option("work")  # the tag filter: note_tags, then search_notes, through the host
        assert frame.locator("#tag option").all_inner_texts() == ["All tags", "#home (1)", "#review (1)", "#work (1)"]
        frame.locator("#list li").first.wait_for()
        assert frame.locator("#list summary").all_inner_texts()[0].startswith("Design review")
        assert frame.locator("#list li").count() == 1
        frame.locator("#tag").select_option("")
        frame.locator("#count", has_text="2 notes").wait_for()

        frame.locator("#adding summary").click()  # add a note from the view, by keyboard
        frame.get_by_label("Title").wait_for()  # shown once the form is open
        frame.get_by_label("Title").focus()
        host.page.keyboard.type("Added in the view")
        host.page.keyboard.press("Tab")
        host.page.keyboard.type("Typed by a person")
        host.page.keyboard.press("Tab")
        host.page.keyboard.type("view, test")
        host.page.keyboard.press("Tab")
        assert frame.locator("button:focus").inner_text() == "Add", "Tab reaches the form's button"
        fields = ("Title", "Note", "Tags, separated by commas")
        typed = [frame.get_by_label(name, exact=True).input_value() for name in fields]
        assert typed == ["Added in the view", "Typed by a person", "view, test"]
        host.page.keyboard.press("Enter")
        frame.locator("#added:not(:empty)").wait_for()  # the view's answer, whichever it is
        assert frame.locator("#added").inner_text() == "Added “Added in the view”."
        assert frame.locator("#list summary").all_inner_texts()[0].startswith("Added in the view")
        assert frame.locator("#count").inner_text() == "3 notes"
        told = host.seen()["modelContext"]
        assert len(told) == 1 and told[0]["structuredContent"]["title"] == "Added in the view"
        assert told[0]["structuredContent"]["tags"] == ["view", "test"]
        check_view(host)
    finally:
        host.close()
    stored = {note["title"]: note for note in notes_index(server, token)}
    assert stored["Added in the view"]["tags"] == ["view", "test"]


def test_the_notes_view_with_sign_in_on(chromium: Any, peers: Peers, google: GoogleStandIn, tmp_path: Path) -> None:
    env = {"GOOGLE_CALENDAR_API": f"{google.issuer}/calendar/v3", "GOOGLE_DRIVE_API": f"{google.issuer}/drive/v3"}
    with auth_server(google, tmp_path, env=env) as server:
        token = sign_in_in_the_browser(chromium, server, google)
        listener = Listener(server, token)
        listener.start()
        try:
            assert listener.subscribed.wait(30), "the second client never subscribed"
            the_notes_view(chromium, peers, server, token, "notes")
            # two notes added beforehand, one in the view
            eventually(lambda: len(listener.updates) >= 3, awaiting="the three notes' notifications")
        finally:
            listener.done.set()
            listener.join(10)
        assert listener.updates == ["notes://index"] * 3


def test_the_notes_view_with_sign_in_off(chromium: Any, peers: Peers, tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        the_notes_view(chromium, peers, server, None, "notes-local")


def test_the_calendar_view_shows_the_agenda(chromium: Any, peers: Peers, google: GoogleStandIn, tmp_path: Path) -> None:
    env = {"GOOGLE_CALENDAR_API": f"{google.issuer}/calendar/v3", "GOOGLE_DRIVE_API": f"{google.issuer}/drive/v3"}
    google.revoke_person(ALICE["sub"])  # Google remembers grants: the person starts with none
    with auth_server(google, tmp_path, env=env) as server:
        token = sign_in_in_the_browser(chromium, server, google)

        granted = grant_by_link(server, google, token, "calendar_upcoming", days=7, limit=5)
        host = Host(chromium, peers, server.base_url)
        try:
            tools = host.connect(server.mcp_url, token)
            assert tools["calendar_upcoming"]["ui"] == {"resourceUri": "ui://stream-http/calendar.html"}
            result = host.show("calendar_upcoming", {"days": 7, "limit": 5})
            events = result["structuredContent"]["events"]
            assert [(event["summary"], event["link"]) for event in events] == [
                (event["summary"], event["link"]) for event in granted["structuredContent"]["events"]]
            frame = host.frame
            assert frame.locator("a").all_inner_texts() == [event["summary"] for event in events]
            assert frame.locator("h2").count() >= 1
            assert frame.locator("#range").inner_text().endswith("times in Asia/Tokyo")
            tokyo = [datetime.fromisoformat(events[0][edge]).astimezone(ZoneInfo("Asia/Tokyo"))
                     for edge in ("start", "end")]
            assert frame.locator("li").first.locator("span.muted").inner_text() == "\u2013".join(
                f"{when:%H:%M}" for when in tokyo)
            assert frame.locator("h2").first.text_content() == f"{tokyo[0]:%A} {tokyo[0].day} {tokyo[0]:%B}"
            check_view(host)
            host.shoot("calendar", for_readme=True)
            frame.locator("a").first.click()
            assert host.seen()["links"] == [events[0]["link"]]
            # an all-day event on the first event's day (in Tokyo) joins that day, under the same heading
            all_day = {"id": "x", "summary": "Holiday", "start": f"{tokyo[0]:%Y-%m-%d}", "end": "", "link": None}
            result["structuredContent"]["events"].insert(0, all_day)
            host.page.evaluate("([r]) => host.replay(r)", [result])
            frame.locator("li", has_text="Holiday").wait_for()
            headings = frame.locator("h2").all_text_contents()
            assert len(headings) == len(set(headings)), headings
            first_day = frame.locator("section").first.locator("li")
            assert first_day.nth(0).inner_text().startswith("All day") and "Holiday" in first_day.nth(0).inner_text()
            assert granted["structuredContent"]["events"][0]["summary"] in first_day.nth(1).inner_text()
        finally:
            host.close()


def test_a_view_added_as_the_readme_says_is_rendered(chromium: Any, peers: Peers, tmp_path: Path) -> None:
    """README's "Add a view", pasted after the `add` tool as it says, served, and shown in the host."""
    anchor = "    return a + b\n"
    source = (REPO / "server.py").read_text()
    source = source.replace(anchor, anchor + "\n\n" + readme_block("**Add a view.**") + "\n", 1)
    with serving(source, tmp_path) as mcp_url:
        host = Host(chromium, peers, mcp_url.removesuffix("/mcp"))
        try:
            tools = host.connect(mcp_url, None)
            assert tools["clock"]["ui"] == {"resourceUri": "ui://my-server/clock.html"}
            result = host.show("clock", {})
            shown = host.frame.locator("#time")
            assert re.fullmatch(r"\d\d:\d\d:\d\d", shown.inner_text()), shown.inner_text()
            assert shown.inner_text() == result["structuredContent"]["result"]
            check_view(host)
        finally:
            host.close()
