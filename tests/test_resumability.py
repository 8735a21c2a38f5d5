"""Stateful sessions: the GET stream, Last-Event-ID resumption, and bounded memory."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest

import server as server_module
from tests.conftest import (
    INITIALIZE,
    EventStream,
    ServerProcess,
    StoreUnderTest,
    eventually,
    free_port,
    mcp_headers,
    metric,
    open_session,
    running_server,
    sse_events,
)

SSE_HEADERS = {"accept": "text/event-stream"}


@pytest.fixture(scope="module")
def stateful_server(tmp_path_factory: pytest.TempPathFactory, store: StoreUnderTest) -> Iterator[ServerProcess]:
    """conftest's stateful server, with its metrics on: a test here sees the server notice a dropped stream."""
    with running_server(tmp_path_factory.mktemp("stateful"), env={"METRICS_PORT": str(free_port())}) as running:
        yield running


def streams_open(server: ServerProcess) -> float | None:
    return metric(int(server.env["METRICS_PORT"]), "stream_http_streams_open")


def long_task_in_a_session(server: ServerProcess, *, request_id: int,
                           steps: int) -> tuple[dict[str, str], dict[str, Any]]:
    """A new session's headers, and a long_task call (0.3 s a step, with progress) to post in it."""
    with httpx2.Client() as http:
        session = open_session(http, server.mcp_url)
    headers = mcp_headers(session_id=session, **{"mcp-protocol-version": "2025-11-25"})
    arguments = {"steps": steps, "step_seconds": 0.3}
    return headers, {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {
        "name": "long_task", "arguments": arguments, "_meta": {"progressToken": request_id}}}


def resume_until_result(server: ServerProcess, headers: dict[str, str],
                        last_event_id: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """Reconnect with Last-Event-ID and read until the call's result: the messages, and the progress in them."""
    resumed = EventStream(server.mcp_url, {**headers, **SSE_HEADERS, "last-event-id": last_event_id})
    try:
        eventually(lambda: any("result" in m for m in resumed.messages), awaiting="the call's result, resumed",
                   showing=lambda: resumed.messages)
    finally:
        resumed.stop()
    messages = resumed.messages
    return messages, [m["params"]["progress"] for m in messages if m.get("method") == "notifications/progress"]


def add_note(server: ServerProcess, title: str) -> None:
    with httpx2.Client() as other:
        session = open_session(other, server.mcp_url)
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "add_note", "arguments": {"title": title}}}
        assert other.post(server.mcp_url, json=call, headers=mcp_headers(session_id=session)).status_code == 200


def test_a_reconnecting_get_stream_receives_the_events_it_missed(stateful_server: ServerProcess) -> None:
    with httpx2.Client() as http:
        session = open_session(http, stateful_server.mcp_url)
        http.post(stateful_server.mcp_url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                  headers=mcp_headers(session_id=session))  # registers the session for list changes
    first = EventStream(stateful_server.mcp_url, {**SSE_HEADERS, "mcp-session-id": session})
    assert first.wait_until_answered() == 200  # the stream is open: what the server sends now reaches it
    add_note(stateful_server, "while connected")
    [seen] = first.wait_for(1)
    seen_id = seen.id
    assert seen.message["method"] == "notifications/resources/list_changed" and seen_id
    first.stop()

    eventually(lambda: streams_open(stateful_server) == 0, awaiting="the server to notice the dropped stream")
    add_note(stateful_server, "while disconnected")
    add_note(stateful_server, "still disconnected")

    resumed = EventStream(stateful_server.mcp_url, {**SSE_HEADERS, "mcp-session-id": session, "last-event-id": seen_id})
    replayed = resumed.wait_for(2)
    resumed.stop()
    assert [event.message["method"] for event in replayed[:2]] == ["notifications/resources/list_changed"] * 2
    assert all(event.id and event.id != seen_id for event in replayed)


def test_an_event_id_from_another_session_replays_nothing(stateful_server: ServerProcess) -> None:
    with httpx2.Client() as http:
        victim = open_session(http, stateful_server.mcp_url)
        http.post(stateful_server.mcp_url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                  headers=mcp_headers(session_id=victim))
    reader = EventStream(stateful_server.mcp_url, {**SSE_HEADERS, "mcp-session-id": victim})
    assert reader.wait_until_answered() == 200
    add_note(stateful_server, "private event")
    [victim_event] = [event.id for event in reader.wait_for(1)]
    reader.stop()

    add_note(stateful_server, "another private event")
    with httpx2.Client() as http:
        attacker = open_session(http, stateful_server.mcp_url)
        response = http.get(stateful_server.mcp_url, timeout=10,
                            headers={**SSE_HEADERS, "mcp-session-id": attacker, "last-event-id": victim_event})
    assert response.status_code == 200
    assert "data:" not in response.text, "events of one session must never replay into another"


def test_a_dropped_post_stream_resumes_with_progress_and_the_result(stateful_server: ServerProcess) -> None:
    """SEP-1699: a client that loses a tool call's stream reconnects and gets the rest of it."""
    headers, call = long_task_in_a_session(stateful_server, request_id=7, steps=4)
    posted = EventStream(stateful_server.mcp_url, headers, method="POST", body=call)
    first_progress = posted.wait_for(1)[0]
    posted.stop()  # the connection drops after the first progress notification
    last_id = first_progress.id
    assert first_progress.message["params"]["progress"] == 1 and last_id

    messages, progress = resume_until_result(stateful_server, headers, last_id)
    assert progress[-1] == 4 and 1 not in progress, progress
    assert messages[-1]["id"] == 7 and messages[-1]["result"]["structuredContent"]["steps_completed"] == 4


def test_idle_sessions_expire(tmp_path: Path) -> None:
    with running_server(tmp_path, env={"SESSION_IDLE_TIMEOUT": "1"}) as server, httpx2.Client() as http:
        session = open_session(http, server.mcp_url)
        ping = {"jsonrpc": "2.0", "id": 3, "method": "ping"}
        assert http.post(server.mcp_url, json=ping, headers=mcp_headers(session_id=session)).status_code == 200
        time.sleep(2.5)
        expired = http.post(server.mcp_url, json=ping, headers=mcp_headers(session_id=session))
    assert expired.status_code == 404
    assert expired.json()["error"]["message"] == "Session not found"


def test_the_session_limit_answers_503_and_spares_existing_sessions(tmp_path: Path) -> None:
    with running_server(tmp_path, env={"MAX_SESSIONS": "2"}) as server, httpx2.Client() as http:
        first = open_session(http, server.mcp_url)
        open_session(http, server.mcp_url)
        refused = http.post(server.mcp_url, json=INITIALIZE, headers=mcp_headers())
        ping = {"jsonrpc": "2.0", "id": 3, "method": "ping"}
        still_served = http.post(server.mcp_url, json=ping, headers=mcp_headers(session_id=first))
    assert refused.status_code == 503 and refused.json()["error"]["message"] == "Too many open sessions"
    assert still_served.status_code == 200


def test_the_event_store_keeps_a_bounded_number_of_events() -> None:
    store = server_module.MemoryEventStore(max_events=50)
    scope = server_module.StreamScope(session_id="s1")
    message = types.JSONRPCNotification(jsonrpc="2.0", method="notifications/x")

    async def fill() -> list[str]:
        token = server_module._stream_scope.set(scope)
        try:
            return [await store.store_event("_GET_stream", message) for _ in range(500)]
        finally:
            server_module._stream_scope.reset(token)

    async def replay(after: str) -> tuple[str | None, int]:
        received: list[Any] = []

        async def collect(event: Any) -> None:
            received.append(event)

        token = server_module._stream_scope.set(server_module.StreamScope(session_id="s1"))
        try:
            return await store.replay_events_after(after, collect), len(received)
        finally:
            server_module._stream_scope.reset(token)

    ids = anyio.run(fill)
    assert store.size == 50
    assert anyio.run(replay, ids[0]) == (None, 0), "an evicted event cannot be resumed from"
    assert anyio.run(replay, ids[-10]) == ("_GET_stream", 9)


def test_with_json_answers_only_the_get_streams_events_are_kept() -> None:
    """A JSON answer carries no event id, so nobody can resume from it: with MCP_JSON_RESPONSE it is not stored
    (a write per request saved, a Redis round trip there), while the GET stream's events are, and replay."""
    kept = server_module.MemoryEventStore(max_events=50)
    events = server_module.GetStreamEvents(kept)
    message = types.JSONRPCNotification(jsonrpc="2.0", method="notifications/x")

    async def store_then_replay() -> tuple[list[str], str | None, int]:
        received: list[Any] = []

        async def collect(event: Any) -> None:
            received.append(event)

        token = server_module._stream_scope.set(server_module.StreamScope(session_id="s1"))
        try:
            answers = [await events.store_event(str(request_id), message) for request_id in range(5)]
            streamed = [await events.store_event("_GET_stream", message) for _ in range(3)]
            return answers, await events.replay_events_after(streamed[0], collect), len(received)
        finally:
            server_module._stream_scope.reset(token)

    answers, stream, replayed = anyio.run(store_then_replay)
    assert answers == [""] * 5 and kept.size == 3
    assert (stream, replayed) == ("_GET_stream", 2)


def test_with_json_answers_a_reconnecting_get_stream_still_receives_what_it_missed(tmp_path: Path) -> None:
    with running_server(tmp_path, "--json-response", env={"METRICS_PORT": str(free_port())}) as server:
        test_a_reconnecting_get_stream_receives_the_events_it_missed(server)


@pytest.mark.parametrize("header", ["mcp-session-id"])
def test_unknown_session_ids_are_404(stateful_server: ServerProcess, header: str) -> None:
    ping = {"jsonrpc": "2.0", "id": 3, "method": "ping"}
    response = httpx2.post(stateful_server.mcp_url, json=ping, headers=mcp_headers(session_id="not-a-session"))
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Session not found"


def test_a_post_stream_resumes_from_its_first_priming_event(stateful_server: ServerProcess) -> None:
    """The priming event is the first id a client sees; a client that drops right after it must get
    everything that followed, from this process's memory or from Redis."""
    headers, call = long_task_in_a_session(stateful_server, request_id=8, steps=3)
    with httpx2.Client(timeout=30) as http, http.stream("POST", stateful_server.mcp_url, json=call,
                                                         headers=headers) as response:
        first = next(sse_events(response))  # the connection drops right after the priming event
    priming = first.id
    assert priming and first.message is None, first
    time.sleep(1.2)  # the task runs on, and its progress is sent while nobody listens
    messages, progress = resume_until_result(stateful_server, headers, priming)
    assert progress == [1, 2, 3], messages
    assert messages[-1]["id"] == 8 and messages[-1]["result"]["structuredContent"]["steps_completed"] == 3
