"""A headless stand-in for the person at the browser during sign-in.

It follows an authorization URL through redirects (keeping cookies, as a browser does), answers
stream-http's consent page, signs in at the Google stand-in (plain redirects), and finally loads the
client's own callback URL so a waiting client (mcp-remote, the Inspector, client.py) gets its code.

Used two ways: imported by tests (`Browser`), and as a `BROWSER=` program, with the answer to the
consent page in HEADLESS_DECISION (approve | deny) and a log of visited URLs in HEADLESS_LOG.
"""

from __future__ import annotations

import html
import os
import re
import sys
from dataclasses import dataclass, field
from urllib.parse import urljoin

import httpx2

FORM = re.compile(r'<form method="post" action="([^"]+)">')
HIDDEN = re.compile(r'<input type="hidden" name="(\w+)" value="([^"]*)">')
LINK = re.compile(r'<a class="button primary" href="([^"]+)">')
MAX_STEPS = 40


@dataclass
class Visit:
    method: str
    url: str
    status: int
    body: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Browser:
    """Follows a sign-in the way a person's browser would, without a screen."""

    decision: str = "approve"
    stop_at: str | None = None  # stop before loading a URL with this prefix, and return it
    visits: list[Visit] = field(default_factory=list)
    http: httpx2.Client = field(default_factory=lambda: httpx2.Client(follow_redirects=False, timeout=30))

    def go(self, url: str) -> Visit:
        """Browse from `url` until a page that is neither a redirect nor a consent form; return it."""
        method, data = "GET", None
        for _ in range(MAX_STEPS):
            if self.stop_at and url.startswith(self.stop_at):
                return Visit("STOP", url, 0, "")
            response = self.http.request(method, url, data=data)
            visit = Visit(method, url, response.status_code, response.text, dict(response.headers))
            self.visits.append(visit)
            if response.status_code in (301, 302, 303, 307, 308):
                method, data, url = "GET", None, urljoin(url, response.headers["location"])
            elif (form := self.consent_form(response.text)) is not None:
                method, url, data = "POST", urljoin(url, form[0]), {**form[1], "decision": self.decision}
            else:
                return visit
        raise RuntimeError(f"no end after {MAX_STEPS} steps: {[v.url for v in self.visits[-5:]]}")

    @staticmethod
    def consent_form(page: str) -> tuple[str, dict[str, str]] | None:
        match = FORM.search(page)
        if match is None or 'name="csrf"' not in page:
            return None
        return html.unescape(match.group(1)), {name: html.unescape(value) for name, value in HIDDEN.findall(page)}

    @staticmethod
    def continue_link(page: str) -> str:
        """Where a message page's "Return to the application" button leads."""
        match = LINK.search(page)
        if match is None:
            raise AssertionError(f"no continue link in {page[-500:]}")
        return html.unescape(match.group(1))

    def seen(self, fragment: str) -> bool:
        return any(fragment in visit.url for visit in self.visits)


def main(argv: list[str]) -> int:
    browser = Browser(decision=os.environ.get("HEADLESS_DECISION", "approve"))
    end = browser.go(argv[-1])
    if log := os.environ.get("HEADLESS_LOG"):
        with open(log, "a") as file:
            for visit in browser.visits:
                file.write(f"{visit.method} {visit.status} {visit.url}\n")
    return 0 if end.status < 400 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
