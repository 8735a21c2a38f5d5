"""The pages people see, driven in real headless Chromium (Debian's, through Playwright): a sign-in from
an MCP client through the consent page and the Google stand-in's login form, Deny, /account, and the
error pages. Each page is saved as a screenshot at desktop and phone widths under artifacts/screenshots/
for a person to look at, and checked for what a person needs: one heading, named buttons reachable by
keyboard, readable contrast, no sideways scrolling on a phone, and no Content-Security-Policy violation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.conftest import ARTIFACTS, REPO, Peers, ServerProcess
from tests.signin import ALICE, GoogleStandIn, RawClient, auth_server, mcp_call, pkce_pair

SCREENSHOTS = ARTIFACTS / "screenshots"
README_SCREENSHOTS = REPO / "tests" / "screenshots"  # what README shows, kept in the repository
UPDATE_README_SCREENSHOTS = "STREAM_HTTP_UPDATE_SCREENSHOTS"  # =1: this run's shots replace the kept ones
CHROMIUM = "/usr/bin/chromium"
VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
CALLBACK = "http://127.0.0.1:6777/cb"
# WCAG 2 contrast ratio of an element's text against its own (or the page's) background.
CONTRAST_JS = """element => {
  const rgb = c => c.match(/[\\d.]+/g).slice(0, 3).map(Number);
  const lum = c => { const [r, g, b] = rgb(c).map(v => { v /= 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; }); return 0.2126*r + 0.7152*g + 0.0722*b; };
  const background = el => { for (; el; el = el.parentElement) { const c = getComputedStyle(el).backgroundColor;
      if (!c.startsWith('rgba') || !c.endsWith(', 0)')) return c; } return 'rgb(255, 255, 255)'; };
  const [a, b] = [lum(getComputedStyle(element).color), lum(background(element))];
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
}"""


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is needed for the page tests: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def interactive_google(peers: Peers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GoogleStandIn]:
    """A stand-in that shows its login form, so the test signs in by typing and clicking."""
    stand_in = GoogleStandIn(peers, tmp_path_factory.mktemp("google-form"), "--interactive")
    yield stand_in
    stand_in.stop()


@pytest.fixture(scope="module")
def site(interactive_google: GoogleStandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with auth_server(interactive_google, tmp_path_factory.mktemp("pages")) as server:
        yield server


class Person:
    """One browser window (a fresh profile) and what it saw."""

    def __init__(self, chromium: Any, viewport: str = "desktop") -> None:
        self.context = chromium.new_context(viewport=VIEWPORTS[viewport])
        self.page = self.context.new_page()
        self.csp_violations: list[str] = []
        self.page.on("console", lambda message: self.csp_violations.append(message.text)
                     if "Content Security Policy" in message.text else None)
        self.arrived: list[str] = []
        self.context.route(CALLBACK + "**", self.client_callback)

    def client_callback(self, route: Any) -> None:
        """The MCP client's loopback callback: record the answer, as the client would."""
        self.arrived.append(route.request.url)
        route.fulfill(status=200, content_type="text/plain", body="the client received its answer")

    def answer(self) -> dict[str, str]:
        assert self.arrived, "the browser never came back to the client"
        return {key: values[0] for key, values in parse_qs(urlsplit(self.arrived[-1]).query).items()}

    def close(self) -> None:
        self.context.close()


def check_page(person: Person, name: str, chromium: Any) -> None:
    """What every page owes a person, at both widths; and the screenshots."""
    page = person.page
    assert page.locator("html").get_attribute("lang") == "en"
    assert page.locator("h1").count() == 1
    for button in page.get_by_role("button").all() + page.get_by_role("link").all():
        assert button.inner_text().strip() or button.get_attribute("aria-label"), "every control has a name"
        assert button.evaluate(CONTRAST_JS) >= 4.5, f"{button.inner_text()!r} is hard to read"
    assert page.locator("h1").evaluate(CONTRAST_JS) >= 4.5
    assert person.csp_violations == [], person.csp_violations
    for viewport, size in VIEWPORTS.items():
        page.set_viewport_size(size)
        assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth"), \
            f"{name} scrolls sideways at {viewport} width"
        shot = SCREENSHOTS / f"{name}-{viewport}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.locator("script, link[rel=stylesheet], img[src^=http], iframe").count() == 0, "self-contained"


def shoot_for_readme(person: Person, name: str) -> None:
    """The page at desktop width in light and dark, as README shows it: taken every run (artifacts/readme/),
    and kept in tests/screenshots/ when STREAM_HTTP_UPDATE_SCREENSHOTS=1. README's images must be there."""
    page = person.page
    page.set_viewport_size(VIEWPORTS["desktop"])
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        shot = ARTIFACTS / "readme" / f"{name}-desktop-{scheme}.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.locator("main").screenshot(path=str(shot))  # the card a person reads, without the empty page
        kept = README_SCREENSHOTS / shot.name
        if os.environ.get(UPDATE_README_SCREENSHOTS) == "1":
            README_SCREENSHOTS.mkdir(exist_ok=True)
            kept.write_bytes(shot.read_bytes())
        assert kept.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{kept} is README's picture of {name}"
    page.emulate_media(color_scheme="light")


def authorize_url(server: ServerProcess) -> tuple[RawClient, str, str]:
    client = RawClient.register(server, redirect_uri=CALLBACK, client_name="Notes Desktop")
    verifier, challenge = pkce_pair()
    return client, verifier, client.authorize_url(challenge, scope="mcp")


def sign_in_at_google(person: Person, email: str) -> None:
    page = person.page
    page.wait_for_url("**/interaction/**")
    page.get_by_label("Email").fill(email)
    page.get_by_role("button", name="Next").click()


def allow_and_sign_in(person: Person, url: str, email: str = ALICE["email"]) -> None:
    """Open a sign-in link, click Allow on the consent page, and sign in at the Google stand-in."""
    person.page.goto(url)
    person.page.get_by_role("button", name="Allow").click()
    sign_in_at_google(person, email)


def test_a_sign_in_by_clicking_through_consent_and_google(chromium: Any, site: ServerProcess,
                                                         interactive_google: GoogleStandIn) -> None:
    interactive_google.next_login(ALICE)
    client, verifier, url = authorize_url(site)
    person = Person(chromium)
    try:
        person.page.goto(url)
        assert person.page.get_by_role("heading", level=1).inner_text() == "Allow access?"
        assert "Notes Desktop" in person.page.inner_text("main") and "127.0.0.1:6777" in person.page.inner_text("main")
        check_page(person, "consent", chromium)
        shoot_for_readme(person, "consent")
        person.page.set_viewport_size(VIEWPORTS["desktop"])
        person.page.keyboard.press("Tab")  # the keyboard reaches Allow first
        assert person.page.evaluate("document.activeElement.textContent") == "Allow"
        person.page.keyboard.press("Enter")
        sign_in_at_google(person, ALICE["email"])
        person.page.wait_for_url(CALLBACK + "**")
        answer = person.answer()
    finally:
        person.close()
    assert answer["state"] == "xyz-state" and answer["iss"] == site.base_url
    tokens = client.exchange(answer["code"], verifier).json()
    assert mcp_call(site, tokens["access_token"], "tools/list").status_code == 200


def test_client_py_signs_in_through_the_browser_and_says_so(chromium: Any, site: ServerProcess,
                                                           interactive_google: GoogleStandIn, tmp_path: Path) -> None:
    """The signed-in page: client.py's own loopback page, at the end of a sign-in done by clicking."""
    interactive_google.next_login(ALICE)
    process = subprocess.Popen([sys.executable, "client.py", "--url", site.mcp_url, "--no-browser", "call", "whoami"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={"XDG_CONFIG_HOME": str(tmp_path), "PATH": os.environ["PATH"]})
    assert process.stderr is not None
    assert process.stderr.readline().startswith("Sign in by opening this link")
    link = process.stderr.readline().strip()
    person = Person(chromium)
    try:
        allow_and_sign_in(person, link)
        person.page.wait_for_url("http://127.0.0.1:*/callback?*")
        assert person.page.get_by_role("heading", level=1).inner_text() == "Signed in"
        check_page(person, "signed-in", chromium)
    finally:
        person.close()
    output, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors
    assert json.loads(output)["email"] == ALICE["email"]


def test_deny_sends_the_client_access_denied(chromium: Any, site: ServerProcess) -> None:
    _, _, url = authorize_url(site)
    person = Person(chromium, "phone")
    try:
        person.page.goto(url)
        person.page.get_by_role("button", name="Deny").click()
        person.page.wait_for_url(CALLBACK + "**")
        answer = person.answer()
    finally:
        person.close()
    assert answer["error"] == "access_denied" and answer["state"] == "xyz-state" and answer["iss"] == site.base_url


def test_the_connected_apps_page_disconnects_by_click(chromium: Any, site: ServerProcess,
                                                     interactive_google: GoogleStandIn) -> None:
    interactive_google.next_login(ALICE)
    client, verifier, url = authorize_url(site)
    person = Person(chromium)
    try:
        allow_and_sign_in(person, url)
        person.page.wait_for_url(CALLBACK + "**")
        tokens = client.exchange(person.answer()["code"], verifier).json()
        person.page.goto(site.base_url + "/account")  # signed in a moment ago: no second trip to Google
        assert person.page.get_by_role("heading", level=1).inner_text() == "Connected applications"
        assert person.page.get_by_role("heading", name="Notes Desktop").count() >= 1
        check_page(person, "account", chromium)
        shoot_for_readme(person, "account")
        person.page.set_viewport_size(VIEWPORTS["desktop"])
        person.page.get_by_role("button", name="Disconnect Notes Desktop").first.click()
        person.page.wait_for_load_state()
        assert "Disconnected 1 application." in person.page.get_by_role("status").inner_text()
        check_page(person, "account-after-disconnect", chromium)
    finally:
        person.close()
    assert mcp_call(site, tokens["access_token"], "tools/list").status_code == 401, "disconnected at once"


def test_the_refused_and_error_pages(chromium: Any, interactive_google: GoogleStandIn, tmp_path: Path) -> None:
    icon = tmp_path / "icon.svg"
    icon.write_text('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 28 28"><circle cx="14" cy="14" r="12" '
                    'fill="#1a5fd0"/></svg>')
    env = {"ALLOWED_DOMAINS": "corp.example", "SERVER_ICON": str(icon)}
    with auth_server(interactive_google, tmp_path, env=env) as server:
        interactive_google.next_login(ALICE)
        _, _, url = authorize_url(server)
        person = Person(chromium)
        try:
            allow_and_sign_in(person, url)
            person.page.wait_for_load_state()
            assert person.page.get_by_role("heading", level=1).inner_text() == "Access refused"
            brand_icon = person.page.locator(".brand img")
            assert brand_icon.get_attribute("src").startswith("data:image/svg+xml;base64,")
            assert brand_icon.evaluate("img => img.complete && img.naturalWidth > 0"), "the icon is drawn"
            check_page(person, "refused", chromium)
            person.page.goto(server.base_url + "/consent?txn=expired")
            assert person.page.get_by_role("heading", level=1).inner_text() == "This page has expired"
            check_page(person, "expired", chromium)
        finally:
            person.close()
