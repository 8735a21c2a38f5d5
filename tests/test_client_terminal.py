"""client.py in a real terminal (a pseudo-terminal): a progress bar while a tool reports progress, a
spinner saying what it waits for during sign-in and while the person is at a link a tool sent them to,
the question before such a link is opened, and Ctrl-C."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, ServerProcess, assert_no_traceback, eventually
from tests.headless_browser import Browser
from tests.signin import ALICE, GoogleStandIn, auth_server, browser_program, google_apis

WIDE = 2000  # columns: the sign-in link stays on one line
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """client.py with its stderr on a pseudo-terminal (what a person sees), stdout on a pipe."""

    def __init__(self, *args: str, env: dict[str, str], typing: bool = False) -> None:
        """With `typing`, stdin is the terminal too (the person can answer questions)."""
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, WIDE, 0, 0))
        self.process = subprocess.Popen([sys.executable, "client.py", *args], cwd=REPO,
                                        stdin=slave if typing else subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=slave, text=True,
                                        env={"PATH": os.environ["PATH"], "TERM": "xterm-256color", **env})
        os.close(slave)
        self.master, self.screen = master, b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the client closed the terminal
                return
            if not chunk:
                return
            self.screen += chunk

    @property
    def text(self) -> str:
        """What was written, without colours and cursor moves."""
        return ANSI.sub("", self.screen.decode(errors="replace"))

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def last_line(self) -> str:
        """The last line written, as it stays on the screen (after what a spinner drew and erased)."""
        return self.text.replace("\r\n", "\n").rstrip().splitlines()[-1].rpartition("\r")[2]

    def wait_for(self, pattern: str, timeout_s: float = 30) -> re.Match[str]:
        return eventually(lambda: re.search(pattern, self.text), timeout_s, awaiting=f"{pattern!r} on the terminal",
                          showing=lambda: self.text)

    def finish(self, timeout_s: float = 60) -> tuple[int, str]:
        output, _ = self.process.communicate(timeout=timeout_s)
        self.reader.join(5)
        os.close(self.master)
        return self.process.returncode, output


def test_a_progress_bar_while_a_tool_reports_progress(stateful_server: ServerProcess, tmp_path: Path) -> None:
    terminal = Terminal("--url", stateful_server.mcp_url, "call", "long_task", "steps=3", "step_seconds=0.4",
                        env={"XDG_CONFIG_HOME": str(tmp_path)})
    status, output = terminal.finish()
    screen = terminal.text
    assert status == 0
    assert "━" in screen, "a drawn bar"
    assert re.search(r"step 1 of 3\s.*━.*1/3", screen) and re.search(r"step 3 of 3\s.*━.*3/3", screen)
    assert "progress 1/3" not in screen, "the plain lines are for pipes, not terminals"
    assert json.loads(output)["steps_completed"] == 3
    assert_no_traceback(screen)


def test_a_spinner_says_what_sign_in_waits_for(google: GoogleStandIn, signin_server: ServerProcess,
                                               tmp_path: Path) -> None:
    google.next_login(ALICE)
    terminal = Terminal("--url", signin_server.mcp_url, "--no-browser", "call", "whoami",
                        env={"XDG_CONFIG_HOME": str(tmp_path)})
    link = terminal.wait_for(r"(http://127\.0\.0\.1:\d+/authorize\?\S+)").group(1)
    terminal.wait_for("Waiting for you to sign in in your browser")

    def frames() -> set[str]:
        shown = set(re.findall(r"([⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]) Waiting for you to sign in", terminal.text))
        return shown if len(shown) >= 2 else set()

    try:  # however slow the machine: the spinner must turn while it waits
        eventually(frames, 15, awaiting="the spinner to turn while it waits (two frames)", interval_s=0.1,
                   showing=lambda: terminal.text)
    finally:
        Browser().go(link)
        status, output = terminal.finish()
    assert status == 0, terminal.text
    assert json.loads(output)["email"] == ALICE["email"]
    assert_no_traceback(terminal.text)


def test_a_confirmation_is_answered_on_the_terminal(stateful_server: ServerProcess, tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    added = Terminal("--url", stateful_server.mcp_url, "call", "add_note", "title=Old", env=env)
    note = json.loads(added.finish()[1])
    terminal = Terminal("--url", stateful_server.mcp_url, "call", "delete_note", f"note_id={note['id']}", env=env,
                        typing=True)
    terminal.wait_for(r"Delete this note for good\? $")
    terminal.type("y\n")
    status, output = terminal.finish()
    assert status == 0, terminal.text
    assert json.loads(output) == {"deleted": True, "note_id": note["id"], "confirmation": "confirmed"}


# --- a link a tool sends the person to (a Google permission)

GRANT_LINK = r"(http://127\.0\.0\.1:\d+/oauth/google/grant\?\S+)"


@pytest.fixture
def google_server(google: GoogleStandIn, tmp_path: Path) -> Iterator[ServerProcess]:
    """A server with sign-in on and its Google APIs at the stand-in; Alice without Google grants before and after."""
    google.revoke_person(ALICE["sub"])
    google.next_login(ALICE)
    with auth_server(google, tmp_path / "server", env=google_apis(google)) as server:
        yield server
    google.revoke_person(ALICE["sub"])


def spinner_turns(terminal: Terminal, text: str) -> None:
    """However slow the machine: the spinner must turn while it waits (two frames seen)."""
    def frames() -> set[str]:
        shown = set(re.findall(rf"([⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]) {re.escape(text)}", terminal.text))
        return shown if len(shown) >= 2 else set()

    eventually(frames, 15, awaiting="the spinner to turn while it waits (two frames)", interval_s=0.1,
               showing=lambda: terminal.text)


@pytest.mark.parametrize("era", ["--legacy", "--modern"])
def test_a_spinner_waits_for_the_browser_and_ctrl_c_ends_in_one_line(google_server: ServerProcess, tmp_path: Path,
                                                                     era: str) -> None:
    terminal = Terminal("--url", google_server.mcp_url, era, "--no-browser", "call", "calendar_upcoming",
                        env={"XDG_CONFIG_HOME": str(tmp_path)})
    try:
        Browser().go(terminal.wait_for(r"(http://127\.0\.0\.1:\d+/authorize\?\S+)").group(1))
        terminal.wait_for(GRANT_LINK)
        spinner_turns(terminal, "Waiting for you to finish in your browser (Ctrl-C to stop)")
        assert re.search(r"Waiting for you to finish in your browser \(Ctrl-C to stop\) 0:00:0\d", terminal.text)
    finally:
        terminal.process.send_signal(signal.SIGINT)
        status, output = terminal.finish()
    assert status == 130, terminal.text
    assert terminal.last_line() == "stopped waiting for your browser (Ctrl-C); run the command again to go on"
    assert output == ""
    assert_no_traceback(terminal.text)


def at_the_question(server: ServerProcess, tmp_path: Path, *era: str) -> tuple[Terminal, Path]:
    """client.py calling calendar_upcoming in a terminal, asking whether to open Google's link; and the log of
    what the BROWSER program visited."""
    browser, visits = browser_program(tmp_path)
    terminal = Terminal("--url", server.mcp_url, *era, "call", "calendar_upcoming",
                        env={"XDG_CONFIG_HOME": str(tmp_path), "BROWSER": browser}, typing=True)
    terminal.wait_for(r"Open it in your browser\? \[Y/n\] ")
    return terminal, visits


def test_the_person_agrees_before_the_link_opens(google_server: ServerProcess, tmp_path: Path) -> None:
    terminal, visits = at_the_question(google_server, tmp_path)
    assert "/oauth/google/grant" not in visits.read_text(), "not before the person agreed"
    terminal.type("\n")
    status, output = terminal.finish()
    assert status == 0, terminal.text
    assert [event["summary"] for event in json.loads(output)["events"]] == ["Design review", "Lunch with Bob"]
    assert "/oauth/google/grant" in visits.read_text()
    assert_no_traceback(terminal.text)


def test_ctrl_c_at_the_question_ends_at_once(google_server: ServerProcess, tmp_path: Path) -> None:
    terminal, _ = at_the_question(google_server, tmp_path)
    terminal.process.send_signal(signal.SIGINT)
    status, _ = terminal.finish(timeout_s=15)  # not held up by the question's pending read
    assert status == 130
    assert terminal.last_line() == "interrupted (Ctrl-C)"
    assert_no_traceback(terminal.text)


def test_the_person_can_decline_the_link(google_server: ServerProcess, tmp_path: Path) -> None:
    terminal, visits = at_the_question(google_server, tmp_path, "--modern")
    terminal.type("n\n")
    status, _ = terminal.finish()
    assert status == 1
    assert terminal.last_line() == ("error: tool calendar_upcoming failed: You did not open the link to Google, so "
                                    "this tool did not run. Call it again when you want to grant the permission it "
                                    "needs.")
    assert "/oauth/google/grant" not in visits.read_text()
