"""client.py calling tools that act on the person's Google account, as a person runs it: it signs in, the
server sends the person to Google for the tool's permission (URL-mode elicitation, in both protocol eras),
the person grants it in the browser (the headless browser, at the Google stand-in), and the call completes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, ServerProcess, assert_no_traceback, eventually
from tests.headless_browser import Browser
from tests.signin import ALICE, GoogleStandIn, auth_server, browser_program, google_apis

SIGN_IN_LINK = r"(http://127\.0\.0\.1:\d+/authorize\?\S+)"
GRANT_LINK = r"(http://127\.0\.0\.1:\d+/oauth/google/grant\?\S+)"


@pytest.fixture(autouse=True)
def alice_starts_with_no_google_grants(google: GoogleStandIn) -> Iterator[None]:
    """Google remembers what a person granted the (shared) client: each test starts and ends afresh."""
    google.revoke_person(ALICE["sub"])
    google.next_login(ALICE)
    yield
    google.revoke_person(ALICE["sub"])


@pytest.fixture
def google_server(google: GoogleStandIn, tmp_path: Path) -> Iterator[ServerProcess]:
    """A stateful server with sign-in on, its Google APIs at the stand-in."""
    with auth_server(google, tmp_path / "server", env=google_apis(google)) as server:
        yield server


class ClientProcess:
    """client.py run as a person runs it (stdin and stderr not a terminal here), its stderr read as it comes."""

    def __init__(self, server: ServerProcess, home: Path, *args: str, browser: str = "/bin/false") -> None:
        self.process = subprocess.Popen([sys.executable, "client.py", "--url", server.mcp_url, *args], cwd=REPO,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env={"PATH": "/usr/bin:/bin", "BROWSER": browser,
                                                        "XDG_CONFIG_HOME": str(home / "config")})
        self.stderr = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr += line

    def wait_for(self, pattern: str, timeout_s: float = 60) -> str:
        """The first group of `pattern` once client.py has printed it."""
        return eventually(lambda: re.search(pattern, self.stderr), timeout_s, awaiting=f"{pattern!r} on stderr",
                          showing=lambda: self.stderr).group(1)

    def finish(self, timeout_s: float = 60) -> tuple[int, str]:
        """The exit status and stdout (small: a tool's result), once client.py has ended. Not communicate(),
        which would take some of stderr from the reader."""
        self.process.wait(timeout_s)
        self.reader.join(5)
        assert self.process.stdout is not None
        return self.process.returncode, self.process.stdout.read()


def grant_at_google(link: str) -> str:
    """The person opens the link client.py printed and grants at Google; the page they land on."""
    page = Browser().go(link)
    assert page.status == 200, page.body[-500:]
    return page.body


@pytest.mark.parametrize("era", ["--legacy", "--modern"])
def test_calendar_upcoming_sends_the_person_to_google_and_completes(google_server: ServerProcess, tmp_path: Path,
                                                                    era: str) -> None:
    """--no-browser: both links (sign-in, then Google's permission) are printed, and followed by the person."""
    client = ClientProcess(google_server, tmp_path, era, "--no-browser", "call", "calendar_upcoming", "days=7",
                           "limit=5")
    Browser().go(client.wait_for(SIGN_IN_LINK))
    landed = grant_at_google(client.wait_for(GRANT_LINK))
    status, output = client.finish()
    assert status == 0, client.stderr
    assert [event["summary"] for event in json.loads(output)["events"]] == ["Design review", "Lunch with Bob"]
    assert "You can return to your application" in landed
    assert ("The server asks: calendar_upcoming needs your permission to see the events on your google calendar. "
            "Open the link to grant it at Google, then come back here.") in client.stderr
    assert "Open it in your browser; client.py waits until you are done there.\n" in client.stderr
    assert "Waiting for you to finish in your browser...\n" in client.stderr
    assert ("Done in the browser; the server goes on." in client.stderr) == (era == "--legacy"), \
        "2025-11-25 hears of it from notifications/elicitation/complete; 2026-07-28 from the retried call's answer"
    assert_no_traceback(client.stderr)


def test_without_a_terminal_the_link_is_printed_not_opened(google_server: ServerProcess, tmp_path: Path) -> None:
    """No terminal to agree on, and no --yes: sign-in opens the browser as always, but the server's link is only
    printed (the spec wants the person's consent before a server's link is opened), and waited for."""
    browser, visits = browser_program(tmp_path)
    client = ClientProcess(google_server, tmp_path, "call", "drive_search", "query=Budget", "limit=1", browser=browser)
    grant_at_google(client.wait_for(GRANT_LINK))
    status, output = client.finish()
    assert status == 0, client.stderr
    assert [file["name"] for file in json.loads(output)["files"]] == ["Budget 2027"]
    assert "(--yes opens it for you)" in client.stderr
    assert "/consent?txn=" in visits.read_text() and "/oauth/google/grant" not in visits.read_text()


def test_with_yes_the_link_opens_in_the_browser(google_server: ServerProcess, tmp_path: Path) -> None:
    browser, visits = browser_program(tmp_path)
    client = ClientProcess(google_server, tmp_path, "--yes", "call", "drive_search", "query=Budget", "limit=1",
                           browser=browser)
    status, output = client.finish()
    assert status == 0, client.stderr
    assert [file["name"] for file in json.loads(output)["files"]] == ["Budget 2027"]
    assert "Opening your browser. If it does not open, visit the link above." in client.stderr
    assert re.search(r"GET 200 \S+/oauth/google/callback\?", visits.read_text()), visits.read_text()
