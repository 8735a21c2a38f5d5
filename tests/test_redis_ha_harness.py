"""The Redis HA harness (tests/redis_ha.py) against the `redis` package's asyncio clients: what a store on
Sentinel or Cluster can rely on when a primary fails, and what it must do itself.

Sentinel: `Sentinel(...).master_for(service)` finds the new primary by itself after a failover; calls fail
meanwhile with ConnectionError (MasterNotFoundError is one) or TimeoutError; scripts load themselves again
on the new primary; a subscription must be made again. An idle pool keeps talking to a primary that was
partitioned away and came back, until something asks the sentinels again.

Cluster: `RedisCluster` refreshes its slot map by itself; scripts work when every key shares one hash tag;
PUBLISH reaches subscribers on every node; SSUBSCRIBE on the primary of the channel's slot gets SPUBLISH
with an exact count of listeners. WAIT must travel on the writing connection: in a pipeline, aimed at the
key's node.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from tests.redis_ha import HOST, ClusterSet, SentinelSet

pytestmark = [pytest.mark.anyio, pytest.mark.store_of_its_own]

OPTIONS: dict[str, Any] = {"decode_responses": True, "socket_timeout": 2, "socket_connect_timeout": 2}
FAILOVER_TIMEOUT_S = 20
# What a store may treat as "Redis is away for now" in either mode (ClusterDownError is a ResponseError).
UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterDownError,
               redis.exceptions.SlotNotCoveredError)
SCRIPT = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[2])"


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    with SentinelSet(tmp_path / "sentinel") as started:
        yield started


@pytest.fixture
def cluster_set(tmp_path: Path) -> Iterator[ClusterSet]:
    with ClusterSet(tmp_path / "cluster") as started:
        yield started


def primary_client(sentinels: SentinelSet, retries: int = 1, **options: Any) -> redis.asyncio.Redis:
    """The store's client shape: the primary through the sentinels, one retry on a stale socket."""
    sentinel = Sentinel(sentinels.sentinels, sentinel_kwargs=sentinels.sentinel_options)
    return sentinel.master_for(sentinels.service, **OPTIONS, **sentinels.client_options, **options,
                               retry=Retry(NoBackoff(), retries))


def cluster_client(cluster: ClusterSet, retries: int = 1) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in cluster.seeds], **OPTIONS,
                        **cluster.client_options, retry=Retry(NoBackoff(), retries))


async def until_it_works(call: Callable[[], Awaitable[Any]], timeout_s: float = FAILOVER_TIMEOUT_S,
                         ) -> tuple[Any, list[Exception], float]:
    """Call every 50 ms until it succeeds: its result, the errors on the way, and the seconds it took."""
    errors: list[Exception] = []
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            return await call(), errors, time.monotonic() - started
        except redis.RedisError as exc:
            errors.append(exc)
        await anyio.sleep(0.05)
    raise AssertionError(f"still failing after {timeout_s} s: {errors[-3:]}")


async def write_and_wait(client: Any, key: str, value: str, node: Any = None) -> int:
    """SET, then WAIT 1 on the same connection (a pipeline); how many replicas acknowledged it."""
    target = {"target_nodes": node} if node is not None else {}
    async with client.pipeline(transaction=False) as pipe:
        pipe.set(key, value)
        pipe.execute_command("WAIT", 1, 1000, **target)
        _, acknowledged = await pipe.execute()
    return acknowledged


# --- Sentinel


async def test_sentinel_client_follows_the_new_primary_by_itself(sentinel_set: SentinelSet) -> None:
    client = primary_client(sentinel_set)
    script = client.register_script(SCRIPT)
    assert await write_and_wait(client, "{p}:kept", "before") == 1
    assert await script(keys=["{p}:s", "{p}:n"], args=["x"]) == 1

    old = sentinel_set.kill_primary()
    value, errors, took = await until_it_works(lambda: client.get("{p}:kept"))
    new = await anyio.to_thread.run_sync(sentinel_set.wait_for_failover)

    assert value == "before" and took < 10
    assert errors and all(isinstance(error, redis.ConnectionError) for error in errors)  # refused, then
    assert any(isinstance(error, redis.asyncio.sentinel.MasterNotFoundError) for error in errors) or took < 1.5
    assert client.connection_pool.master_address == (HOST, new) and new != old
    # Scripts are not replicated: the new primary answers NOSCRIPT and the Script loads itself again.
    assert await script(keys=["{p}:s", "{p}:n"], args=["y"]) == 2
    await client.aclose()


async def test_sentinel_subscription_must_be_made_again_on_the_new_primary(sentinel_set: SentinelSet) -> None:
    client = primary_client(sentinel_set)
    listener = primary_client(sentinel_set, retries=0)
    pubsub = listener.pubsub()
    await pubsub.subscribe("{p}:changes")
    assert (await pubsub.get_message(timeout=1))["type"] == "subscribe"
    sentinel_set.kill_primary()
    with pytest.raises(redis.ConnectionError):
        await pubsub.get_message(timeout=1)
    await pubsub.aclose()

    async def subscribe_again() -> Any:
        pubsub = listener.pubsub()
        await pubsub.subscribe("{p}:changes")
        return pubsub

    pubsub, _, took = await until_it_works(subscribe_again)
    assert (await pubsub.get_message(timeout=1))["type"] == "subscribe"
    assert await client.publish("{p}:changes", "after") == 1
    assert (await pubsub.get_message(timeout=1))["data"] == "after"
    assert pubsub.connection.port == sentinel_set.current_primary_port() and took < 10
    await pubsub.aclose()
    await client.aclose()
    await listener.aclose()


async def test_sentinel_idle_pool_writes_to_the_old_primary_until_it_asks_again(
        sentinel_set: SentinelSet) -> None:
    """A partition: the primary is paused, failed over, then resumed, still a primary. A client idle all
    along writes to it (and the write is lost when it is made a replica) until the pool asks the sentinels
    again; `min-replicas-to-write 1` makes the old primary refuse instead."""
    client = primary_client(sentinel_set)
    await client.set("warm", "1")
    old = sentinel_set.pause_primary()
    new = await anyio.to_thread.run_sync(sentinel_set.wait_for_failover)
    sentinel_set.nodes[old].resume()

    await client.set("{p}:lost", "written to the old primary")
    assert sentinel_set.ask(old, "GET", "{p}:lost") == "written to the old primary"
    assert sentinel_set.ask(new, "GET", "{p}:lost") is None

    sentinel_set.ask(old, "CONFIG", "SET", "min-replicas-to-write", "1")
    sentinel_set.ask(old, "CONFIG", "SET", "min-replicas-max-lag", "2")
    with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
        await client.set("{p}:refused", "x")

    assert await client.connection_pool.get_master_address() == (HOST, new)  # drops idle connections
    await client.set("{p}:kept", "written to the new primary")
    assert sentinel_set.ask(new, "GET", "{p}:kept") == "written to the new primary"
    await client.aclose()


# --- Cluster


async def test_cluster_scripts_need_keys_that_share_a_hash_tag(cluster_set: ClusterSet) -> None:
    client = cluster_client(cluster_set)
    script = client.register_script(SCRIPT)
    assert await script(keys=["{p}:s", "{p}:n"], args=["x"]) == 1
    with pytest.raises(redis.RedisClusterException, match="same key slot"):
        await script(keys=["s", "n"], args=["x"])
    elsewhere = next(f"{{q{i}}}" for i in range(100) if cluster_set.primary_of(f"{{q{i}}}") !=
                     cluster_set.primary_of("{p}"))
    undeclared = client.register_script("redis.call('SET', KEYS[1], 1); redis.call('SET', ARGV[1], 1)")
    with pytest.raises(redis.ResponseError, match="non local key"):
        await undeclared(keys=["{p}:a"], args=[f"{elsewhere}:b"])
    assert await client.getdel("{p}:s") == "x"
    await client.set("{p}:t", "1", px=5000)
    await client.set("{p}:t", "2", keepttl=True)
    assert 0 < await client.pttl("{p}:t") <= 5000
    await client.rpush("{p}:list", "v")
    assert await client.blpop(["{p}:list"], timeout=0.5) == ("{p}:list", "v")
    lock = client.lock("{p}:lock:x", timeout=5, blocking_timeout=1)
    assert await lock.acquire()
    assert not await client.lock("{p}:lock:x", timeout=5, blocking_timeout=0.2).acquire()
    await lock.release()
    await client.aclose()


async def test_cluster_wait_must_go_to_the_writing_connection(cluster_set: ClusterSet) -> None:
    """Keyless, WAIT goes to the client's default node; aimed at the key's node inside the pipeline it
    shares the writing connection and means what it says."""
    client = cluster_client(cluster_set)
    await client.initialize()
    node = client.get_node_from_key("{p}")
    client.set_default_node(next(other for other in client.get_primaries() if other != node))
    assert await write_and_wait(client, "{p}:a", "1", node) == 1
    cluster_set.nodes[cluster_set.replica_of("{p}")].pause()
    started = time.monotonic()
    assert await write_and_wait(client, "{p}:b", "1", node) == 0  # the replica cannot acknowledge
    assert time.monotonic() - started >= 0.9
    started = time.monotonic()
    assert await write_and_wait(client, "{p}:c", "1") == 1  # the default node's own replica: a meaningless 1
    assert time.monotonic() - started < 0.5
    await client.aclose()


async def test_cluster_client_refreshes_its_slot_map_by_itself(cluster_set: ClusterSet) -> None:
    client = cluster_client(cluster_set)
    await client.initialize()
    script = client.register_script(SCRIPT)
    assert await write_and_wait(client, "{p}:kept", "before", client.get_node_from_key("{p}")) == 1
    old = cluster_set.kill_primary_of("{p}")

    value, errors, took = await until_it_works(lambda: client.get("{p}:kept"))
    assert value == "before" and took < 10
    assert errors and all(isinstance(error, UNAVAILABLE) for error in errors)
    assert client.get_node_from_key("{p}").port not in (old, None)
    assert await script(keys=["{p}:s", "{p}:n"], args=["x"]) == 1
    await client.aclose()


async def test_cluster_publish_reaches_every_node_and_spublish_counts_its_shard(cluster_set: ClusterSet) -> None:
    client = cluster_client(cluster_set)
    await client.initialize()
    far = next(node for node in client.get_nodes() if node.port != client.get_node_from_key("{p}").port)
    plain = redis.asyncio.Redis(host=far.host, port=far.port, **OPTIONS, **cluster_set.client_options)
    pubsub = plain.pubsub()
    await pubsub.subscribe("{p}:changes")
    assert (await pubsub.get_message(timeout=1))["type"] == "subscribe"
    await client.publish("{p}:changes", "broadcast")
    assert (await pubsub.get_message(timeout=1))["data"] == "broadcast"
    await pubsub.aclose()
    await plain.aclose()

    async def ssubscribe() -> Any:
        """A plain client on the primary of the channel's slot, as the cluster client sees it now."""
        node = client.get_node_from_key("{p}:changes")
        shard = redis.asyncio.Redis(host=node.host, port=node.port, **OPTIONS, **cluster_set.client_options,
                                    retry=Retry(NoBackoff(), 0))
        sharded = shard.pubsub()
        await sharded.ssubscribe("{p}:changes")
        assert (await sharded.get_message(timeout=1))["type"] == "ssubscribe"
        return shard, sharded

    shard, sharded = await ssubscribe()
    assert await client.spublish("{p}:changes", "one") == 1
    assert (await sharded.get_message(timeout=1))["data"] == "one"
    cluster_set.kill_primary_of("{p}:changes")
    with pytest.raises(redis.ConnectionError):
        await sharded.get_message(timeout=1)
    await sharded.aclose()
    await shard.aclose()

    await until_it_works(lambda: client.spublish("{p}:changes", "nobody yet"))  # refreshes the slot map
    shard, sharded = await ssubscribe()
    assert await client.spublish("{p}:changes", "two") == 1
    assert (await sharded.get_message(timeout=1))["data"] == "two"
    await sharded.aclose()
    await shard.aclose()
    await client.aclose()


# --- TLS and passwords


async def test_tls_and_passwords_reach_sentinels_and_cluster_nodes(tmp_path: Path) -> None:
    with SentinelSet(tmp_path / "sentinel", password="data", sentinel_password="watch", tls=True) as sentinels:
        assert sentinels.url.startswith("rediss+sentinel://:data@")
        client = primary_client(sentinels)
        assert await client.set("k", "v")
        await client.aclose()
        # Without sentinel_kwargs, Sentinel() hands its sentinels only the socket_* options: no password, no
        # TLS, and redis-py's default retries with backoff (about 14 s for three sentinels; none here).
        alone = Sentinel(sentinels.sentinels, **OPTIONS, **sentinels.client_options,
                         sentinel_kwargs={"socket_timeout": 2, "retry": Retry(NoBackoff(), 0)})
        with pytest.raises(redis.asyncio.sentinel.MasterNotFoundError):
            await alone.discover_master(sentinels.service)
        await alone.aclose()
    with ClusterSet(tmp_path / "cluster", password="data", tls=True) as cluster:
        assert cluster.url.startswith("rediss+cluster://:data@")
        client = cluster_client(cluster)
        assert await client.set("{p}:k", "v")
        assert len(client.get_primaries()) == 3
        await client.aclose()
