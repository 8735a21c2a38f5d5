"""stateful.sh and stateless.sh start the two modes, passing extra arguments through."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx2
import pytest

from tests.conftest import REPO, SETTING_NAMES, ServerProcess, free_port, wait_for_port


@pytest.mark.parametrize(("script", "mode"), [("stateful.sh", "stateful"), ("stateless.sh", "stateless")])
def test_run_scripts_start_their_mode(tmp_path: Path, script: str, mode: str) -> None:
    assert shutil.which("uv"), "the scripts run the server through uv"
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in SETTING_NAMES}
    process = subprocess.Popen(["sh", str(REPO / script), "--port", str(port), "--data-dir", str(tmp_path)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_for_port(port, timeout_s=60)
        health = httpx2.get(f"http://127.0.0.1:{port}/healthz").json()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=20)[0].decode()
    assert health["mode"] == mode
    assert f"serving MCP at http://127.0.0.1:{port}/mcp ({mode}, no sign-in)" in output
    assert (tmp_path / "stream-http.db").exists()


def test_the_server_runs_on_uvloop_and_httptools(server: ServerProcess) -> None:
    """The fast event loop and HTTP parser are the defaults, not a benchmark's tuning: a server started on
    asyncio's own loop serves about half the requests per core (bench/run.py)."""
    loaded = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert "uvloop/loop." in loaded
    assert "httptools/parser/parser." in loaded
