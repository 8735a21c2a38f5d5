"""The store's contract, run over both backends: the embedded SQLite file and a real Redis.

Everything the OAuth provider and the notes demo keep goes through this API, so each backend must
behave the same: typed values in and out, expiry, atomic take and compare-and-swap (one winner
under races), per-owner listing newest first, groups ended together, rate counters and locks.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
import redis

import server
from tests.conftest import RedisServer
from tests.redis_ha import ClusterSet, SentinelSet

pytestmark = [pytest.mark.anyio, pytest.mark.store_of_its_own]


@dataclass(frozen=True)
class Card:
    kind: ClassVar[str] = "card"

    title: str
    tags: tuple[str, ...] = ()
    extra: dict[str, Any] | None = None


@dataclass(frozen=True)
class Badge:
    kind: ClassVar[str] = "badge"

    owner: str


@pytest.fixture(scope="module")
def sentinel_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    with SentinelSet(tmp_path_factory.mktemp("sentinel")) as started:
        yield started


@pytest.fixture(scope="module")
def cluster_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSet]:
    with ClusterSet(tmp_path_factory.mktemp("cluster")) as started:
        yield started


REDIS_MODES = ["redis", "sentinel", "cluster"]


def redis_url(request: pytest.FixtureRequest, mode: str) -> str:
    """A STORE_URL of a Redis in `mode` (a single server, a primary behind Sentinel, or a Cluster), with a
    prefix of its own."""
    url = request.getfixturevalue("redis_server" if mode == "redis" else f"{mode}_set").url
    return f"{url}?prefix=contract-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["sqlite", *REDIS_MODES])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[server.Store]:
    if request.param == "sqlite":
        opened: server.Store = server.SQLiteStore(tmp_path / "store.db")
    else:
        opened = server.RedisStore(redis_url(request, request.param))
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def test_values_come_back_as_the_type_they_went_in_as(backend: server.Store) -> None:
    card = Card("hello", ("a", "b"), {"n": 1, "nested": {"x": [1, 2]}})
    await backend.put(server.Entry("k1", card))
    back = await backend.get(Card, "k1")
    assert back == card and isinstance(back.tags, tuple)
    assert await backend.get(Card, "missing") is None
    assert await backend.get(Badge, "k1") is None, "kinds are separate key spaces"


async def test_records_expire(backend: server.Store) -> None:
    await backend.put(server.Entry("short", Card("brief"), ttl_s=0.3, owner="ann"),
                    server.Entry("long", Card("lasting"), ttl_s=60, owner="ann"))
    assert await backend.get(Card, "short") == Card("brief")
    await anyio.sleep(0.5)
    assert await backend.get(Card, "short") is None
    assert await backend.take(Card, "short") is None, "an expired record cannot be taken"
    assert [card.title for card in await backend.find(Card, "ann")] == ["lasting"]


async def test_take_has_exactly_one_winner_and_writes_its_then_entries_only_when_it_wins(backend: server.Store) -> None:
    await backend.put(server.Entry("code", Card("one-time")))
    results: list[Card | None] = []

    async def take(number: int) -> None:
        results.append(await backend.take(Card, "code", then=[server.Entry(f"used-{number}", Badge("x"))]))

    async with anyio.create_task_group() as tasks:
        for number in range(20):
            tasks.start_soon(take, number)
    assert [result for result in results if result is not None] == [Card("one-time")]
    written = [number for number in range(20) if await backend.get(Badge, f"used-{number}") is not None]
    assert len(written) == 1, written
    assert await backend.get(Card, "code") is None


async def test_swap_is_compare_and_swap(backend: server.Store) -> None:
    first, second = Card("v1"), Card("v2")
    await backend.put(server.Entry("doc", first, ttl_s=60), server.Entry("old", Badge("gone soon")))
    assert not await backend.swap("doc", Card("not what is stored"), second)
    assert await backend.get(Card, "doc") == first
    assert await backend.swap("doc", first, second, then=[server.Entry("side", Badge("b")), server.Gone(Badge, "old")])
    assert await backend.get(Card, "doc") == second
    assert await backend.get(Badge, "side") == Badge("b")
    assert await backend.get(Badge, "old") is None, "a Gone entry deletes in the same step"
    wins: list[bool] = []

    async def swap(number: int) -> None:
        wins.append(await backend.swap("doc", second, Card(f"v3-{number}")))

    async with anyio.create_task_group() as tasks:
        for number in range(10):
            tasks.start_soon(swap, number)
    assert wins.count(True) == 1


async def test_find_lists_an_owners_records_newest_first(backend: server.Store) -> None:
    await backend.put(server.Entry("a", Card("middle"), owner="ann", order=2.0),
                    server.Entry("b", Card("newest"), owner="ann", order=3.5),
                    server.Entry("c", Card("oldest"), owner="ann", order=1.0),
                    server.Entry("d", Card("bob's"), owner="bob", order=9.0),
                    server.Entry("e", Badge("ann"), owner="ann", order=5.0))
    assert [card.title for card in await backend.find(Card, "ann")] == ["newest", "middle", "oldest"]
    assert await backend.delete(Card, "a") is True
    assert await backend.delete(Card, "a") is False
    assert [card.title for card in await backend.find(Card, "ann")] == ["newest", "oldest"]
    assert [card.title for card in await backend.find(Card, "bob")] == ["bob's"]
    assert await backend.find(Card, "nobody") == []


async def test_a_group_ends_together(backend: server.Store) -> None:
    await backend.put(server.Entry("g1", Card("one"), group="grant-1", owner="ann"),
                    server.Entry("g2", Badge("two"), group="grant-1"),
                    server.Entry("g3", Card("other grant"), group="grant-2"))
    assert await backend.delete_group("grant-1") == 2
    assert await backend.get(Card, "g1") is None and await backend.get(Badge, "g2") is None
    assert await backend.get(Card, "g3") == Card("other grant")
    assert await backend.find(Card, "ann") == []
    assert await backend.delete_group("grant-1") == 0


async def test_hits_count_within_a_window(backend: server.Store) -> None:
    bucket = f"b-{uuid.uuid4().hex}"
    counts = [(await backend.hit(bucket, 0.5))[0] for _ in range(3)]
    assert counts == [1, 2, 3]
    _, left = await backend.hit(bucket, 0.5)
    assert 0 < left <= 0.5
    await anyio.sleep(0.6)
    assert (await backend.hit(bucket, 0.5))[0] == 1, "a new window starts from one"


async def test_a_lock_has_one_holder_at_a_time(backend: server.Store) -> None:
    inside: list[int] = []
    overlaps: list[int] = []

    async def hold(number: int) -> None:
        async with backend.lock("the-lock", ttl_s=5):
            if inside:
                overlaps.append(number)
            inside.append(number)
            await anyio.sleep(0.02)
            inside.remove(number)

    async with anyio.create_task_group() as tasks:
        for number in range(5):
            tasks.start_soon(hold, number)
    assert overlaps == []


@pytest.mark.parametrize("mode", REDIS_MODES)
async def test_redis_replicas_hear_each_others_announcements_and_confirm_them(request: pytest.FixtureRequest,
                                                                              mode: str) -> None:
    """The embedded store has no other process to tell; a shared one carries announcements to all, says
    when it starts hearing them, and lets a speaker wait until each listener confirmed one."""
    url = redis_url(request, mode)
    prefix = url.rsplit("prefix=", 1)[1]
    speaker, listener = (server.RedisStore(url) for _ in range(2))
    await speaker.open()
    await listener.open()
    sending, heard = anyio.create_memory_object_stream[dict[str, Any]](10)
    confirming = True

    async def listen() -> None:
        async for message in listener.messages():
            await sending.send(message)
            if confirming and isinstance(message.get("ticket"), str):
                await listener.confirm(message["ticket"])

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(listen)
            with anyio.fail_after(5):
                assert await heard.receive() is server.FEED_LISTENING
                assert await speaker.publish({"hello": "replicas"}) == (1, 1)
                assert await heard.receive() == {"hello": "replicas"}
                assert await speaker.publish({"confirm": "please"}, confirmed_within_s=2) == (1, 1)
                confirmed = await heard.receive()
            assert confirmed["confirm"] == "please" and confirmed["ticket"].startswith(f"{speaker.prefix}:ack:")
            assert prefix in speaker.prefix
            confirming, started = False, time.monotonic()  # heard, never confirmed: waited for, up to the limit
            assert await speaker.publish({"confirm": "please"}, confirmed_within_s=0.6) == (1, 0)
            assert time.monotonic() - started >= 0.6, "it waited for the confirmation, up to the limit"
            tasks.cancel_scope.cancel()
    finally:
        await speaker.close()
        await listener.close()


async def test_the_embedded_store_hears_everything_there_is_from_the_start(tmp_path: Path) -> None:
    store = server.SQLiteStore(tmp_path / "store.db")
    await store.open()
    try:
        feed = store.messages()
        assert await anext(feed) is server.FEED_LISTENING
        assert await store.publish({"ended_grant": "g"}, confirmed_within_s=2) == (0, 0)
        with anyio.move_on_after(0.2) as waited:
            await anext(feed)
        assert waited.cancelled_caught, "nothing else to hear: no other process shares the file"
    finally:
        await store.close()


# --- stores written by version 0.1 open with everything of the server's in them; data of their own is left be


def test_a_version_0_1_sqlite_file_is_upgraded_in_place(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The records table is upgraded; a table of its own that 0.1 kept (its notes) is left as it was, named in
    the log: storage knows no note, and 0.2 is the version that moved them."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE notes (owner TEXT NOT NULL, id TEXT NOT NULL, title TEXT NOT NULL, body TEXT NOT NULL,
                                tags TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (owner, id)) WITHOUT ROWID;
            CREATE TABLE records (kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, expires_at REAL,
                                  grant_id TEXT, subject TEXT, PRIMARY KEY (kind, key)) WITHOUT ROWID;
            CREATE INDEX records_by_grant ON records (grant_id) WHERE grant_id IS NOT NULL;
            CREATE INDEX records_by_subject ON records (kind, subject) WHERE subject IS NOT NULL;
        """)
        db.execute("INSERT INTO notes VALUES ('ann', 'n1', 'Old note', 'body', '[\"home\"]', 100.5)")
        db.execute("INSERT INTO records VALUES ('grant', 'g1', ?, NULL, 'g1', 'ann')", (server.to_json({
            "id": "g1", "client_id": "c1", "client_name": "App", "subject": "ann", "scopes": ["mcp"],
            "resource": "http://127.0.0.1:8000/mcp", "claims": {}, "created_at": 1.0}),))

    async def check() -> None:
        store = server.SQLiteStore(path)
        await store.open()
        try:
            assert [grant.client_id for grant in await store.find(server.Grant, "ann")] == ["c1"]
            assert await store.delete_group("g1") == 1
        finally:
            await store.close()

    anyio.run(check)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT title FROM notes").fetchall() == [("Old note",)], "nothing of it is lost"
        assert db.execute("SELECT count(*) FROM records WHERE kind = 'note'").fetchone() == (0,)
    assert "tables this version does not read, left as they are: notes" in caplog.text


def test_a_version_0_1_redis_layout_is_upgraded(redis_server: RedisServer) -> None:
    prefix = f"old-{uuid.uuid4().hex[:8]}"
    raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
    note = {"id": "n1", "title": "Kept", "body": "b", "tags": ["x"], "created_at": 123.25}
    raw.set(f"{prefix}:n:ann:n1", server.to_json(note))
    raw.zadd(f"{prefix}:notes:ann", {"n1": 123.25})
    grant = {"id": "g1", "client_id": "c1", "client_name": "App", "subject": "ann", "scopes": ["mcp"],
             "resource": "r", "claims": {}, "created_at": 5.0}
    raw.set(f"{prefix}:r:grant:g1", server.to_json(grant))
    raw.sadd(f"{prefix}:s:grant:ann", f"{prefix}:r:grant:g1")
    raw.sadd(f"{prefix}:g:g1", f"{prefix}:r:grant:g1")

    async def check() -> None:
        store = server.RedisStore(f"{redis_server.url}?prefix={prefix}")
        await store.open()
        try:
            assert [g.id for g in await store.find(server.Grant, "ann")] == ["g1"]
        finally:
            await store.close()

    anyio.run(check)
    assert not raw.exists(f"{prefix}:s:grant:ann") and raw.exists(f"{prefix}:o:grant:ann")
    assert raw.exists(f"{prefix}:notes:ann", f"{prefix}:n:ann:n1") == 2, "keys of their own are left as they were"


@dataclass(frozen=True)
class EarlierCard:
    """A Card as an earlier version wrote it, without the fields added since (they have defaults)."""

    kind: ClassVar[str] = "card"

    title: str


async def test_swap_compares_values_so_records_written_by_an_earlier_version_swap_too(backend: server.Store) -> None:
    await backend.put(server.Entry("old", EarlierCard("written long ago")))
    current = await backend.get(Card, "old")
    assert current == Card("written long ago")
    assert await backend.swap("old", current, Card("rewritten", ("new",)))
    assert await backend.get(Card, "old") == Card("rewritten", ("new",))
    assert not await backend.swap("old", current, Card("again")), "the old value is gone"


def on_replica(nodes: SentinelSet | ClusterSet, port: int, key: str) -> str | None:
    """`key` as the replica on `port` has it (a cluster replica answers reads after READONLY)."""
    with redis.Redis(host="127.0.0.1", port=port, decode_responses=True, single_connection_client=True,
                     **nodes.client_options) as replica:
        if isinstance(nodes, ClusterSet):
            replica.execute_command("READONLY")
        return replica.get(key)


@pytest.mark.parametrize("mode", ["sentinel", "cluster"])
async def test_with_sentinel_or_cluster_a_write_is_acknowledged_once_a_replica_has_it(
        request: pytest.FixtureRequest, mode: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis replicates asynchronously: a record is only acknowledged once a replica has it too (WAIT), so a
    failover right after loses nothing. Without an answering replica the write still succeeds, said once in
    the log, and waits for one again once it answers."""
    monkeypatch.setattr(server, "REPLICA_UNHEARD_PAUSE_S", 0)  # ask the replica again at the next write
    nodes: SentinelSet | ClusterSet = request.getfixturevalue(f"{mode}_set")
    store = server.RedisStore(redis_url(request, mode))
    await store.open()
    replica = nodes.replica_port() if isinstance(nodes, SentinelSet) else nodes.replica_of(store.prefix)
    try:
        await store.put(server.Entry("first", Card("on the replica")))
        assert on_replica(nodes, replica, f"{store.prefix}:r:card:first") is not None
        nodes.nodes[replica].pause()
        try:
            await store.put(server.Entry("second", Card("written while the replica is away")))
        finally:
            nodes.nodes[replica].resume()
        assert await store.get(Card, "second") == Card("written while the replica is away")
        assert "no replica confirmed a write within 100 ms" in caplog.text
        await store.put(server.Entry("third", Card("on the replica again")))
        assert on_replica(nodes, replica, f"{store.prefix}:r:card:third") is not None
        assert "a replica confirms writes again" in caplog.text
    finally:
        await store.close()


@pytest.mark.parametrize("mode", ["sentinel", "cluster"])
async def test_in_cluster_every_key_shares_one_slot_and_the_mode_is_named(request: pytest.FixtureRequest,
                                                                          mode: str) -> None:
    store = server.RedisStore(redis_url(request, mode))
    await store.open()
    try:
        assert store.mode == mode
        await store.put(server.Entry("k", Card("c"), owner="ann", group="g"))
        async with store.lock("l", ttl_s=5):
            await store.hit("bucket", 1)
        nodes: SentinelSet | ClusterSet = request.getfixturevalue(f"{mode}_set")
        primary = nodes.current_primary_port() if isinstance(nodes, SentinelSet) else nodes.primary_of(store.prefix)
        keys = nodes.ask(primary, "KEYS", f"*{store.prefix.strip('{}')}*")
        assert len(keys) >= 4, keys
        if mode == "cluster":
            assert store.prefix.startswith("{") and store.prefix.endswith("}")
            assert {nodes.ask(primary, "CLUSTER", "KEYSLOT", key) for key in keys} == {
                nodes.ask(primary, "CLUSTER", "KEYSLOT", store.prefix)}
        else:
            assert not store.prefix.startswith("{"), "Sentinel keeps the standalone layout: no data to rename"
    finally:
        await store.close()


@pytest.mark.parametrize("mode", REDIS_MODES)
async def test_stream_events_are_kept_and_replayed_to_their_own_session_only(request: pytest.FixtureRequest,
                                                                            mode: str) -> None:
    """The events behind Last-Event-ID, in every Redis mode (in Cluster each event and its stream's list
    are written in one transaction: one slot)."""
    store = server.RedisStore(redis_url(request, mode))
    await store.open()
    events = store.event_store(max_events=10, ttl_s=60)
    token = server._stream_scope.set(server.StreamScope(session_id="session-1"))
    try:
        ids = [await events.store_event("stream-a", server.jsonrpc_message_adapter.validate_python(
            {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": n}}))
            for n in range(3)]
        replayed: list[Any] = []

        async def collect(event: Any) -> None:
            replayed.append((event.event_id, event.message.params["data"]))

        assert await events.replay_events_after(ids[0], collect) == "stream-a"
        assert replayed == [(ids[1], 1), (ids[2], 2)]
        server._stream_scope.set(server.StreamScope(session_id="session-2"))
        assert await events.replay_events_after(ids[0], collect) is None, "another session's events"
    finally:
        server._stream_scope.reset(token)
        await store.close()
