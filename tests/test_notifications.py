"""Adding or deleting a note tells listening clients their resource list changed, in both eras."""

from __future__ import annotations

from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.subscriptions import ResourcesListChanged

from tests.conftest import ServerProcess, handshake_listener

pytestmark = pytest.mark.anyio
WAIT_S = 10


async def test_handshake_session_hears_list_changes_on_its_get_stream(stateful_server: ServerProcess) -> None:
    """A 2025-11-25 client with an open GET stream hears about notes another connection adds."""
    heard = anyio.Event()
    seen: list[Any] = []

    async def on_message(message: Any) -> None:
        seen.append(message)
        if isinstance(message, types.ResourceListChangedNotification):
            heard.set()

    async with handshake_listener(stateful_server.mcp_url, message_handler=on_message) as listener:
        assert listener.server_capabilities.resources.list_changed is True
        await listener.list_resources()  # a request after initialize registers the session
        async with Client(stateful_server.mcp_url, mode="legacy") as writer:
            note = await writer.call_tool("add_note", {"title": "heard across sessions"})
        with anyio.fail_after(WAIT_S):
            await heard.wait()
        heard = anyio.Event()
        async with Client(stateful_server.mcp_url, mode="2026-07-28") as writer:
            await writer.call_tool("delete_note", {"note_id": note.structured_content["id"]})
        with anyio.fail_after(WAIT_S):
            await heard.wait()


@pytest.mark.parametrize("mode_args", [(), ("--stateless",), ("--stateless", "--json-response")],
                         ids=["stateful", "stateless", "stateless-json"])
async def test_modern_listen_stream_hears_list_changes(tmp_path: Any, mode_args: tuple[str, ...]) -> None:
    """A 2026-07-28 client's subscriptions/listen stream hears adds and deletes, in every mode."""
    from tests.conftest import running_server

    with running_server(tmp_path, *mode_args) as server:
        async with Client(server.mcp_url, mode="2026-07-28") as listener, \
                listener.listen(resources_list_changed=True) as subscription:
            assert subscription.honored.resources_list_changed is True
            async with Client(server.mcp_url, mode="legacy") as writer:
                note = await writer.call_tool("add_note", {"title": "heard by a listener"})
            with anyio.fail_after(WAIT_S):
                assert isinstance(await anext(aiter(subscription)), ResourcesListChanged)
            async with Client(server.mcp_url, mode="2026-07-28") as writer:
                await writer.call_tool("delete_note", {"note_id": note.structured_content["id"]})
            with anyio.fail_after(WAIT_S):
                assert isinstance(await anext(aiter(subscription)), ResourcesListChanged)


async def test_reading_does_not_announce_a_change(stateful_server: ServerProcess) -> None:
    async with Client(stateful_server.mcp_url, mode="2026-07-28") as listener, \
            listener.listen(resources_list_changed=True) as subscription:
        async with Client(stateful_server.mcp_url, mode="legacy") as reader:
            await reader.call_tool("search_notes", {})
            await reader.read_resource("notes://index")
        with anyio.move_on_after(1) as waited:
            await anext(aiter(subscription))
        assert waited.cancelled_caught, "a read must not produce a list-changed event"


async def test_handshake_subscriptions_deliver_resource_updates(stateful_server: ServerProcess) -> None:
    updates: list[str] = []
    arrived = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updates.append(str(message.params.uri))
            arrived.set()

    async with handshake_listener(stateful_server.mcp_url, message_handler=on_message) as listener:
        assert listener.server_capabilities.resources.subscribe is True
        await listener.subscribe_resource("notes://index")
        async with Client(stateful_server.mcp_url, mode="legacy") as writer:
            note_id = (await writer.call_tool("add_note", {"title": "watched"})).structured_content["id"]
            with anyio.fail_after(WAIT_S):
                await arrived.wait()
            assert updates == ["notes://index"], "only the subscribed resource is announced"
            await listener.unsubscribe_resource("notes://index")
            await listener.subscribe_resource(f"notes://{note_id}")
            arrived = anyio.Event()
            await writer.call_tool("delete_note", {"note_id": note_id})
            with anyio.fail_after(WAIT_S):
                await arrived.wait()
    assert updates == ["notes://index", f"notes://{note_id}"]


async def test_modern_listen_stream_hears_updates_of_subscribed_resources(stateful_server: ServerProcess) -> None:
    from mcp.client.subscriptions import ResourceUpdated

    async with Client(stateful_server.mcp_url, mode="2026-07-28") as listener, \
            listener.listen(resource_subscriptions=["notes://index"]) as subscription:
        async with Client(stateful_server.mcp_url, mode="2026-07-28") as writer:
            await writer.call_tool("add_note", {"title": "modern watched"})
        with anyio.fail_after(WAIT_S):
            event = await anext(aiter(subscription))
    assert event == ResourceUpdated(uri="notes://index")


async def test_handshake_log_level_is_honoured(stateful_server: ServerProcess) -> None:
    logs: list[str] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(str(params.data))

    async with Client(stateful_server.mcp_url, mode="legacy", logging_callback=on_log) as mcp:
        assert mcp.server_capabilities.logging is not None
        await mcp.set_logging_level("warning")
        await mcp.call_tool("long_task", {"steps": 2, "step_seconds": 0})
        assert logs == [], "info logs are below the requested level"
        await mcp.set_logging_level("info")
        await mcp.call_tool("long_task", {"steps": 2, "step_seconds": 0})
    assert logs == ["long_task finished step 1 of 2", "long_task finished step 2 of 2"]


async def test_stateless_handshake_servers_promise_no_notifications(tmp_path: Any) -> None:
    import httpx2

    from tests.conftest import first_json, mcp_headers, running_server

    with running_server(tmp_path, "--stateless") as server:
        async with Client(server.mcp_url, mode="legacy") as mcp:
            resources = mcp.server_capabilities.resources
            await mcp.set_logging_level("warning")  # accepted; a stateless server has no session to keep it in
        bad_level = httpx2.post(server.mcp_url, headers=mcp_headers(), json={
            "jsonrpc": "2.0", "id": 1, "method": "logging/setLevel", "params": {"level": "loud"}})
    assert resources.list_changed is False and resources.subscribe is False
    error = first_json(bad_level.text)["error"]
    assert error["code"] == -32602 and "level must be one of" in error["message"]


async def test_sessions_are_forgotten_when_they_end_and_listeners_are_kept(tmp_path: Any) -> None:
    """The record that routes a session's notifications holds that session's objects: it goes when the
    client ends the session (DELETE) or the SDK closes it for idling, and stays while a GET stream listens.
    /healthz counts the records (before this, every closed session stayed until MAX_SESSIONS)."""
    import httpx2

    from tests.conftest import first_json, mcp_headers, open_session, running_server

    idle_s = 2
    with running_server(tmp_path, env={"SESSION_IDLE_TIMEOUT": str(idle_s)}) as server:
        def sessions() -> int:
            return httpx2.get(server.base_url + "/healthz").json()["sessions"]

        def raw_session_with_a_call() -> str:
            with httpx2.Client() as http:
                session = open_session(http, server.mcp_url)
                answer = http.post(server.mcp_url, headers=mcp_headers(session_id=session), json={
                    "jsonrpc": "2.0", "id": 2, "method": "tools/call",
                    "params": {"name": "add", "arguments": {"a": 1, "b": 2}}})
                assert first_json(answer.text)["result"]["structuredContent"] == {"result": 3}
                return session

        assert sessions() == 0
        async with Client(server.mcp_url, mode="legacy") as client:
            await client.list_tools()
            assert sessions() == 1
        assert sessions() == 0  # the SDK client ends its session with DELETE

        heard = anyio.Event()

        async def on_message(message: Any) -> None:
            if isinstance(message, types.ResourceListChangedNotification):
                heard.set()

        async with Client(server.mcp_url, mode="legacy", message_handler=on_message) as listener:
            await listener.list_resources()
            raw_session_with_a_call()  # left open, never used again: the SDK closes it for idling
            assert sessions() == 2
            await anyio.sleep(idle_s + 1.5)
            raw_session_with_a_call()  # a new session looks for closed ones
            assert sessions() == 2  # the listener (its GET stream is open) and the newest one
            async with Client(server.mcp_url, mode="2026-07-28") as writer:
                await writer.call_tool("add_note", {"title": "still heard"})
            with anyio.fail_after(WAIT_S):
                await heard.wait()
