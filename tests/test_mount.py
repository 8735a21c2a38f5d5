"""stream-http mounted under /tools in a parent Starlette app, with the parent running its lifespan."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client

from tests.conftest import REPO, free_port, store_env, wait_for_port

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("mode", ["stateful", "stateless"])
async def test_a_tool_call_through_the_mounted_app(tmp_path: Path, mode: str, era: str) -> None:
    port = free_port()
    env = {**os.environ, "PUBLIC_URL": f"http://127.0.0.1:{port}/tools", "DATA_DIR": str(tmp_path),
           "MCP_STATELESS": str(mode == "stateless").lower(), **store_env(str(tmp_path))}
    log = (tmp_path / "parent.log").open("wb")
    parent = subprocess.Popen([sys.executable, "-m", "uvicorn", "tests.mounted_app:app", "--port", str(port)],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        assert httpx2.get(f"http://127.0.0.1:{port}/").text.startswith("the parent app")
        assert httpx2.get(f"http://127.0.0.1:{port}/tools/healthz").json()["status"] == "ok"
        async with Client(f"http://127.0.0.1:{port}/tools/mcp", mode=era) as mcp:
            result = await mcp.call_tool("add", {"a": 20, "b": 22})
            note = await mcp.call_tool("add_note", {"title": "mounted"})
            index = await mcp.read_resource("notes://index")
        assert result.structured_content == {"result": 42}
        assert note.structured_content["id"] in index.contents[0].text
    finally:
        parent.terminate()
        parent.wait(15)
    assert "Traceback" not in (tmp_path / "parent.log").read_text()


@pytest.mark.parametrize("mode", ["stateful"])
async def test_sign_in_through_the_mounted_app(google: Any, tmp_path: Path, mode: str) -> None:
    from tests.signin import ALICE, GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET, SdkSignIn

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    google.allow_callback(f"{base}/tools/oauth/google/callback")
    google.next_login(ALICE)
    env = {**os.environ, "PUBLIC_URL": f"{base}/tools", "DATA_DIR": str(tmp_path), "GOOGLE_CLIENT_ID": GOOGLE_CLIENT_ID,
           "GOOGLE_CLIENT_SECRET": GOOGLE_CLIENT_SECRET, "GOOGLE_DISCOVERY_URL": google.discovery_url}
    log = (tmp_path / "parent.log").open("wb")
    parent = subprocess.Popen([sys.executable, "-m", "uvicorn", "tests.mounted_app:app", "--port", str(port)],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        metadata = httpx2.get(f"{base}/.well-known/oauth-authorization-server/tools").json()
        resource = httpx2.get(f"{base}/.well-known/oauth-protected-resource/tools/mcp").json()
        signin = SdkSignIn(f"{base}/tools/mcp")
        async with httpx2.AsyncClient(auth=signin.provider()) as http, signin.client(http) as mcp:
            me = (await mcp.call_tool("whoami", {})).structured_content
    finally:
        parent.terminate()
        parent.wait(15)
    assert metadata["issuer"] == f"{base}/tools"
    assert metadata["authorization_endpoint"] == f"{base}/tools/authorize"
    assert resource["resource"] == f"{base}/tools/mcp"
    assert me["email"] == ALICE["email"]
