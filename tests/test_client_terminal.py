"""client.py in a real terminal (a pseudo-terminal): a progress bar while a tool reports progress, and a
spinner saying what it waits for during sign-in."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

from tests.conftest import REPO, ServerProcess, assert_no_traceback, eventually
from tests.headless_browser import Browser
from tests.signin import ALICE, GoogleStandIn

WIDE = 2000  # columns: the sign-in link stays on one line
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """client.py with its stderr on a pseudo-terminal (what a person sees), stdout on a pipe."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, WIDE, 0, 0))
        self.process = subprocess.Popen([sys.executable, "client.py", *args], cwd=REPO, stdin=subprocess.DEVNULL,
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
