"""stream-http mounted under /tools in a parent Starlette app, with the parent running its lifespan."""

from __future__ import annotations

import os
import re
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


def readme_fastapi_app() -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index("**FastAPI, beside MCP servers of your own**")
    return re.search(r"```python\n(.*?)```", readme[start:], re.S).group(1)  # type: ignore[union-attr]


async def test_readmes_fastapi_app_serves_ours_with_sign_in_beside_two_of_the_users_own(google: Any,
                                                                                        tmp_path: Path) -> None:
    """The original description's FastAPI example, for real: this server mounted under /tools with sign-in,
    the user's echo and math servers under /echo and /math, one combined lifespan, all reachable."""
    from tests.signin import ALICE, GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET, SdkSignIn

    (tmp_path / "main.py").write_text(readme_fastapi_app())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    google.allow_callback(f"{base}/tools/oauth/google/callback")
    google.next_login(ALICE)
    env = {**os.environ, "PUBLIC_URL": f"{base}/tools", "DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO),
           "GOOGLE_CLIENT_ID": GOOGLE_CLIENT_ID, "GOOGLE_CLIENT_SECRET": GOOGLE_CLIENT_SECRET,
           "GOOGLE_DISCOVERY_URL": google.discovery_url, **store_env(str(tmp_path / "data"))}
    log = (tmp_path / "fastapi.log").open("wb")
    parent = subprocess.Popen([sys.executable, "-m", "uvicorn", "main:app", "--port", str(port)], cwd=tmp_path,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        challenge = httpx2.post(f"{base}/tools/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                headers={"accept": "application/json, text/event-stream"})
        metadata = httpx2.get(f"{base}/.well-known/oauth-authorization-server/tools").json()
        resource = httpx2.get(f"{base}/.well-known/oauth-protected-resource/tools/mcp").json()
        signin = SdkSignIn(f"{base}/tools/mcp")
        async with httpx2.AsyncClient(auth=signin.provider()) as http, signin.client(http) as mcp:
            me = (await mcp.call_tool("whoami", {})).structured_content
        async with Client(f"{base}/echo/mcp", mode="legacy") as echo:
            echoed = await echo.call_tool("echo", {"message": "hi"})
        async with Client(f"{base}/math/mcp", mode="2026-07-28") as math:
            added = await math.call_tool("add_two", {"n": 40})
    finally:
        parent.terminate()
        parent.wait(15)
    assert challenge.status_code == 401
    assert f'resource_metadata="{base}/.well-known/oauth-protected-resource/tools/mcp"' in \
        challenge.headers["www-authenticate"]
    assert metadata["issuer"] == f"{base}/tools" and metadata["token_endpoint"] == f"{base}/tools/token"
    assert resource["resource"] == f"{base}/tools/mcp"
    assert me["email"] == ALICE["email"]
    assert "/tools/oauth/google/callback" in "".join(google.authorization_requests()[-1].values())
    assert echoed.content[0].text == "Echo: hi"
    assert added.structured_content == {"result": 42}
    assert "Traceback" not in (tmp_path / "fastapi.log").read_text()
