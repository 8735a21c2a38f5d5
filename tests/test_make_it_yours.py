"""README's "Make it yours", done as it says: add a tool, a resource and a prompt to a copy of
server.py, or remove the notes demo from it, then start that copy and use it through the SDK's Client."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest
from mcp import Client

from tests.conftest import REPO, STARTUP_TIMEOUT_S, eventually, free_port, store_env
from tests.headless_browser import Browser
from tests.signin import ALICE, GoogleStandIn, RawClient, auth_server, mcp_call

pytestmark = pytest.mark.anyio
README = (REPO / "README.md").read_text()


def readme_block(after: str) -> str:
    """The first ```python block following the line that contains `after`."""
    start = README.index(after)
    match = re.search(r"```python\n(.*?)```", README[start:], re.S)
    assert match, f"README has no python block after {after!r}"
    return match.group(1)


@contextmanager
def serving(source: str, workdir: Path) -> Iterator[str]:
    """Run this version of server.py as a user would, and yield its MCP URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "server.py").write_text(source)
    port = free_port()
    data_dir = str(workdir / "data")
    log = (workdir / "server.log").open("wb")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "DATA_DIR": data_dir, **store_env(data_dir)}
    process = subprocess.Popen([sys.executable, "server.py", "--port", str(port)], cwd=workdir, env=env,
                               stdout=log, stderr=subprocess.STDOUT)

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError((workdir / "server.log").read_text())
        return httpx2.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200

    try:
        eventually(healthy, STARTUP_TIMEOUT_S, awaiting="this server.py to answer /healthz", interval_s=0.1,
                   ignoring=httpx2.HTTPError)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(15)
        assert "Traceback" not in (workdir / "server.log").read_text()


def with_surface_added(source: str) -> str:
    """README's step: paste the new tool, resource and prompt right after the `add` tool."""
    anchor = "    return a + b\n"
    assert source.count(anchor) == 1
    return source.replace(anchor, anchor + "\n\n" + readme_block("Add a tool") + "\n", 1)


async def test_a_tool_resource_and_prompt_added_as_the_readme_says_are_served(tmp_path: Path) -> None:
    source = with_surface_added((REPO / "server.py").read_text())
    with serving(source, tmp_path) as url:
        async with Client(url, mode="legacy") as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            called = await client.call_tool("word_count", {"text": "one two  three"})
            resource = await client.read_resource("server://motd")
            prompt = await client.get_prompt("review_code", {"code": "print(1)"})
    assert "word_count" in tools and tools["word_count"].annotations.read_only_hint is True
    assert called.structured_content == {"result": 3}
    assert resource.contents[0].text.startswith("Welcome")
    assert "print(1)" in prompt.messages[0].content.text


NOTES_DEMO = ("add_note", "search_notes", "ask_before_deleting", "delete_note", "DeleteConfirmation", "DeleteOutcome",
              "NOT_ASKED", "NoteView", "NoteList", "Tag", "notes_index", "note_text", "summarize_notes",
              "draft_from_note", "Note", "note_key", "save_note", "get_note", "find_notes", "remove_note",
              "normalise_tags", "confirmation_of", "DRAFT_STYLES", "complete_argument", "NOTE_TITLE_MAX_CHARS",
              "NOTE_BODY_MAX_CHARS", "NOTE_TAGS_MAX", "NOTE_TAG_MAX_CHARS", "SEARCH_LIMIT_MAX", "note_tags", "TagCount",
              "NoteTags", "notes_view", "NOTES_VIEW", "NOTES_VIEW_BODY", "NOTES_VIEW_SCRIPT")


def without_notes_demo(source: str) -> str:
    """README's removal: delete the demo's definitions (its completions included)."""
    tree = ast.parse(source)
    doomed: list[tuple[int, int]] = []
    for node in tree.body:
        names = [node.name] if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) else [
            target.id for target in getattr(node, "targets", [getattr(node, "target", None)])
            if isinstance(target, ast.Name)]
        if names and all(name in NOTES_DEMO for name in names):
            first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            doomed.append((first, node.end_lineno or node.lineno))
    lines = source.splitlines(keepends=True)
    for first, last in sorted(doomed, reverse=True):
        del lines[first - 1:last]
    return "".join(lines)


async def test_the_server_runs_without_the_notes_demo(tmp_path: Path) -> None:
    source = without_notes_demo((REPO / "server.py").read_text())
    machinery = source[source.index("# === The server's machinery below"):]
    assert "Note" not in re.sub(r"#.*|\"[^\"]*\"", "", machinery).replace("NoteUpdated", ""), \
        "the machinery must not need the demo"
    compile(source, "server.py", "exec")
    with serving(source, tmp_path) as url:
        async with Client(url, mode="2026-07-28") as client:
            tools = {tool.name for tool in (await client.list_tools()).tools}
            resources = {str(resource.uri) for resource in (await client.list_resources()).resources}
            prompts = {prompt.name for prompt in (await client.list_prompts()).prompts}
            summed = await client.call_tool("add", {"a": 1, "b": 2})
    assert tools == {"echo", "add", "whoami", "long_task", "google_profile", "calendar_upcoming",
                     "drive_search"}
    assert resources == {"server://info", "ui://stream-http/calendar.html"} and prompts == set()
    assert summed.structured_content == {"result": 3.0}


def with_google_tool_added(source: str, api_base: str) -> str:
    """README's Google tool, pasted after the built-in ones, its API pointed at the stand-in."""
    block = readme_block("## Calling Google APIs from a tool").replace("https://tasks.googleapis.com", api_base)
    anchor = "\n# --- resources\n"
    assert source.count(anchor) == 1
    return source.replace(anchor, "\n\n" + block + anchor, 1)


async def test_a_google_tool_added_as_the_readme_says_asks_for_its_scope_then_answers(google: GoogleStandIn,
                                                                                     tmp_path: Path) -> None:
    script = tmp_path / "copy" / "server.py"
    script.parent.mkdir()
    script.write_text(with_google_tool_added((REPO / "server.py").read_text(), google.issuer))
    google.revoke_person(ALICE["sub"])
    google.next_login(ALICE)
    with auth_server(google, tmp_path, script=script) as server:
        access = RawClient.register(server).sign_in()["access_token"]
        asked = mcp_call(server, access, "tools/call", {"name": "task_lists", "arguments": {}}).json()["result"]
        text = asked["content"][0]["text"]
        google.next_login(ALICE)
        page = Browser().go(text[text.index("http"):].split()[0])
        answered = mcp_call(server, access, "tools/call", {"name": "task_lists", "arguments": {}}).json()["result"]
    google.revoke_person(ALICE["sub"])
    assert asked["isError"] and "needs your permission to see your google tasks lists" in text
    assert google.authorization_requests()[-1]["scope"] == "openid https://www.googleapis.com/auth/tasks.readonly"
    assert "You can return to your application" in page.body
    assert answered["isError"] is False and answered["structuredContent"] == {"result": ["My Tasks", "Groceries"]}
