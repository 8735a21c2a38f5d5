"""Several replicas sharing one Redis, behind nginx configured exactly as README's deployment section.

Three stateless replicas of server.py on their own ports, one `redis-server` (append-only, so a
restart keeps its data), and Debian's nginx on loopback running README's `nginx` block round-robin.
Sign-in goes through replica 1 and Google's callback through the load balancer; tokens, codes, notes,
notifications, sealed request state and Google refreshes cross replicas; replicas die and Redis goes
away in the middle of a run.
"""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ResourcesListChanged

from tests.conftest import (
    TEST_SECRET_KEY,
    Peers,
    RedisServer,
    ServerProcess,
    eventually,
    free_port,
    handshake_listener,
    running_server,
)
from tests.headless_browser import Browser
from tests.nginx import Nginx, readme_config
from tests.signin import ALICE, GoogleStandIn, RawClient, SdkSignIn, mcp_call, pkce_pair, start_auth_server

pytestmark = pytest.mark.store_of_its_own  # always its own Redis, whatever --store says
REPLICAS = 3
GOOGLE_TOKEN_TTL_S = 2
WAIT_S = 10


# --- the cluster


@dataclass
class Cluster:
    redis: RedisServer
    replicas: list[ServerProcess]
    nginx: Nginx
    google: GoogleStandIn
    env: dict[str, str]

    @property
    def public(self) -> ServerProcess:
        """The load balancer, seen as one server (what clients use)."""
        return replace(self.replicas[0], base_url=self.nginx.base_url)

    def replica(self, number: int) -> ServerProcess:
        """Replica 1, 2 or 3."""
        return self.replicas[number - 1]

    def restart(self, number: int) -> None:
        old = self.replica(number)
        self.replicas[number - 1] = start_auth_server(self.google, old.workdir, "--stateless", env=self.env,
                                                      port=old.port)

    def sign_in(self, through: int = 1, scope: str = "mcp") -> tuple[RawClient, dict[str, Any]]:
        """Register and sign Alice in at replica `through`; Google calls back through the load balancer."""
        self.google.next_login(ALICE)
        client = RawClient.register(self.replica(through))
        verifier, challenge = pkce_pair()
        query, browser = client.authorize(challenge, scope=scope, resource=self.public.mcp_url)
        assert "code" in query, [(visit.status, visit.url) for visit in browser.visits[-3:]]
        response = client.exchange(query["code"], verifier)
        assert response.status_code == 200, response.text
        return client, response.json()


@pytest.fixture(scope="module")
def cluster(peers: Peers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("cluster")
    google = GoogleStandIn(peers, workdir / "google", "--access-token-ttl", str(GOOGLE_TOKEN_TTL_S))
    redis = RedisServer(workdir / "redis")
    ports = [free_port() for _ in range(REPLICAS)]
    nginx = Nginx.start(workdir / "nginx", readme_config(ports))
    google.allow_callback(f"{nginx.base_url}/oauth/google/callback")
    env = {"STORE_URL": f"{redis.url}?prefix=cluster", "SECRET_KEY": TEST_SECRET_KEY,
           "PUBLIC_URL": nginx.base_url, "ALLOWED_HOSTS": "127.0.0.1:*",  # the tests also call replicas directly
           "GOOGLE_CALENDAR_API": f"{google.issuer}/calendar/v3"}
    replicas = [start_auth_server(google, workdir / f"replica-{n}", "--stateless", env=env, port=port)
                for n, port in enumerate(ports, start=1)]
    try:
        yield Cluster(redis, replicas, nginx, google, env)
    finally:
        for replica in replicas:
            replica.stop()
        nginx.stop()
        redis.stop()
        google.stop()


def whoami(server: ServerProcess, access_token: str) -> httpx2.Response:
    return mcp_call(server, access_token, "tools/call", {"name": "whoami", "arguments": {}})


def tool(server: ServerProcess, access_token: str, name: str, **arguments: Any) -> dict[str, Any]:
    response = mcp_call(server, access_token, "tools/call", {"name": name, "arguments": arguments})
    assert response.status_code == 200, response.text
    return response.json()["result"]


def at_once(*calls: Callable[[], httpx2.Response]) -> list[httpx2.Response]:
    """Run the calls in threads released at the same instant."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int, call: Callable[[], httpx2.Response]) -> None:
        barrier.wait()
        results[index] = call()

    threads = [threading.Thread(target=run, args=pair) for pair in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


# --- one sign-in, every replica


def test_a_sign_in_through_one_replica_holds_on_all_and_ends_on_all(cluster: Cluster) -> None:
    client, tokens = cluster.sign_in(through=1)
    for number in (1, 2, 3, 1, 2, 3):
        response = whoami(cluster.replica(number), tokens["access_token"])
        assert response.status_code == 200, (number, response.text)
        assert ALICE["email"] in response.text
    refreshed = RawClient(cluster.replica(2), client.client_id, client.redirect_uri).refresh(tokens["refresh_token"])
    assert refreshed.status_code == 200, refreshed.text
    fresh = refreshed.json()
    assert [whoami(cluster.replica(n), fresh["access_token"]).status_code for n in (3, 1)] == [200, 200]
    revoked = httpx2.post(cluster.replica(3).base_url + "/revoke",
                          data={"token": fresh["refresh_token"], "client_id": client.client_id})
    assert revoked.status_code == 200
    after = [whoami(cluster.replica(n), fresh["access_token"]) for n in (1, 2, 3)]
    assert [response.status_code for response in after] == [401, 401, 401]
    assert all('resource_metadata="' + cluster.nginx.base_url in r.headers["www-authenticate"] for r in after)
    assert client.refresh(fresh["refresh_token"]).json()["error"] == "invalid_grant"


def test_notes_written_on_one_replica_are_read_on_the_others(cluster: Cluster) -> None:
    _, tokens = cluster.sign_in()
    token = tokens["access_token"]
    note = tool(cluster.replica(1), token, "add_note", title="shared by replicas", tags=["cluster"])
    note_id = note["structuredContent"]["id"]
    for number in (2, 3):
        found = tool(cluster.replica(number), token, "search_notes", tag="cluster")
        assert note_id in [n["id"] for n in found["structuredContent"]["notes"]], number
    uri = f"notes://{note_id}"
    index = mcp_call(cluster.replica(3), token, "resources/read", {"uri": uri}, **{"mcp-name": uri})
    assert "shared by replicas" in index.text


@pytest.mark.anyio
async def test_an_sdk_client_through_the_load_balancer_signs_in_and_confirms_a_delete(cluster: Cluster) -> None:
    """Discovery, registration, sign-in and calls all round-robin over the replicas; delete_note's
    question (the SDK's sealed request state) is asked by one replica and answered to the next."""
    cluster.google.next_login(ALICE)
    sign_in = SdkSignIn(cluster.nginx.base_url + "/mcp")
    asked: list[str] = []

    async def confirm(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"confirm": True})

    logged_before = len(cluster.nginx.access_log())
    async with httpx2.AsyncClient(auth=sign_in.provider(), timeout=30) as http, \
            Client(streamable_http_client(sign_in.server_url, http_client=http), mode="2026-07-28",
                   elicitation_callback=confirm) as mcp:
        note_id = (await mcp.call_tool("add_note", {"title": "delete me everywhere"})).structured_content["id"]
        deleted = await mcp.call_tool("delete_note", {"note_id": note_id})
        found = await mcp.call_tool("search_notes", {"query": "everywhere"})
    assert sign_in.sign_ins == 1
    assert asked == [f"Delete the note 'delete me everywhere' ({note_id})? This cannot be undone."]
    assert deleted.structured_content == {"deleted": True, "note_id": note_id, "confirmation": "confirmed"}
    assert found.structured_content["notes"] == []
    served_by = [upstream for _, upstream in cluster.nginx.access_log()[logged_before:]]
    assert len(set(served_by)) == REPLICAS, "round-robin spread the client over every replica"
    assert all(a != b for a, b in itertools.pairwise(served_by)), "consecutive requests met different replicas"


@pytest.mark.anyio
async def test_a_list_change_crosses_replicas(cluster: Cluster) -> None:
    """A 2026-07-28 listener on replica 1 hears a note added through replica 2 (Redis pub/sub)."""
    _, tokens = cluster.sign_in()
    headers = {"authorization": f"Bearer {tokens['access_token']}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http, \
            Client(streamable_http_client(cluster.replica(1).mcp_url, http_client=http),
                   mode="2026-07-28") as listener, \
            listener.listen(resources_list_changed=True) as subscription:
        await anyio.to_thread.run_sync(lambda: tool(cluster.replica(2), tokens["access_token"], "add_note",
                                                    title="heard on another replica"))
        with anyio.fail_after(WAIT_S):
            assert isinstance(await anext(aiter(subscription)), ResourcesListChanged)


@pytest.mark.anyio
async def test_a_handshake_get_stream_hears_a_note_added_on_another_stateful_replica(
        tmp_path: Path, cluster: Cluster) -> None:
    """Stateful replicas (without sign-in) sharing the Redis: a 2025-11-25 session on A hears about B's note."""
    env = {"STORE_URL": f"{cluster.redis.url}?prefix=stateful", "SECRET_KEY": TEST_SECRET_KEY}
    heard = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceListChangedNotification):
            heard.set()

    with running_server(tmp_path / "a", env=env) as a, running_server(tmp_path / "b", env=env) as b:
        async with handshake_listener(a.mcp_url, message_handler=on_message) as listener:
            await listener.list_resources()
            async with Client(b.mcp_url, mode="legacy") as writer:
                await writer.call_tool("add_note", {"title": "from replica B"})
            with anyio.fail_after(WAIT_S):
                await heard.wait()


# --- races between replicas


@pytest.mark.parametrize("attempt", range(5))
def test_one_code_raced_on_two_replicas_has_one_winner(cluster: Cluster, attempt: int) -> None:
    cluster.google.next_login(ALICE)
    client = RawClient.register(cluster.replica(1))
    verifier, challenge = pkce_pair()
    query, _ = client.authorize(challenge, resource=cluster.public.mcp_url)
    on = [RawClient(cluster.replica(n), client.client_id, client.redirect_uri) for n in (2, 3)]
    results = at_once(*(lambda c=c: c.exchange(query["code"], verifier) for c in on))
    assert sorted(r.status_code for r in results) == [200, 400]
    assert next(r for r in results if r.status_code == 400).json()["error"] == "invalid_grant"


def one_chain(cluster: Cluster, client: RawClient, results: list[httpx2.Response]) -> dict[str, Any]:
    """Every racer got the same pair (one answer, one token chain), and that chain goes on on every replica."""
    assert {r.status_code for r in results} == {200}, [r.text for r in results]
    pairs = {(r.json()["access_token"], r.json()["refresh_token"]) for r in results}
    assert len(pairs) == 1, f"{len(pairs)} token chains for one grant"
    fresh = results[0].json()
    assert [whoami(cluster.replica(n), fresh["access_token"]).status_code for n in (1, 2, 3)] == [200, 200, 200]
    onward = RawClient(cluster.replica(2), client.client_id, client.redirect_uri).refresh(fresh["refresh_token"])
    assert onward.status_code == 200, onward.text
    return onward.json()


@pytest.mark.parametrize("attempt", range(5))
def test_one_refresh_token_raced_on_three_replicas_gets_one_answer(cluster: Cluster, attempt: int) -> None:
    """Processes of one client sharing its refresh token refresh at the same instant, through every replica:
    each gets the one pair the first of them got, and the grant goes on."""
    client, tokens = cluster.sign_in()
    on = [RawClient(cluster.replica(n % 3 + 1), client.client_id, client.redirect_uri) for n in range(9)]
    one_chain(cluster, client, at_once(*(lambda c=c: c.refresh(tokens["refresh_token"]) for c in on)))


def test_two_refreshes_100_ms_apart_both_get_an_answer_the_client_can_use(cluster: Cluster) -> None:
    """The field's case: two processes share a refresh token and refresh 100 ms apart. Neither ends the grant:
    both get the same successor, and the next refresh with it works."""
    client, tokens = cluster.sign_in()
    first = RawClient(cluster.replica(1), client.client_id, client.redirect_uri).refresh(tokens["refresh_token"])
    time.sleep(0.1)
    second = RawClient(cluster.replica(3), client.client_id, client.redirect_uri).refresh(tokens["refresh_token"])
    one_chain(cluster, client, [first, second])


def test_google_sees_one_refresh_when_every_replica_needs_it(cluster: Cluster) -> None:
    _, tokens = cluster.sign_in(scope="mcp google")
    assert tool(cluster.replica(1), tokens["access_token"], "google_profile")["isError"] is False
    time.sleep(GOOGLE_TOKEN_TTL_S + 1)  # Google's access token has expired: every replica wants a new one
    before = len(cluster.google.refreshes())
    profiles = at_once(*(lambda n=n: mcp_call(cluster.replica(n), tokens["access_token"], "tools/call",
                                              {"name": "google_profile", "arguments": {}}) for n in (1, 2, 3, 1, 2, 3)))
    refreshes = cluster.google.refreshes()[before:]
    assert [p.json()["result"]["isError"] for p in profiles] == [False] * 6, [p.text for p in profiles]
    assert [r["outcome"] for r in refreshes] == ["success"], "one refresh, and the others used its result"


def test_a_google_permission_asked_on_one_replica_is_granted_through_another(cluster: Cluster) -> None:
    """The pending request and the granted scopes are in Redis: asked on replica 2, answered through the load
    balancer (whichever replica Google's redirect reaches), used on replica 3."""
    cluster.google.revoke_person(ALICE["sub"])
    _, tokens = cluster.sign_in()
    asked = tool(cluster.replica(2), tokens["access_token"], "calendar_upcoming")
    text = asked["content"][0]["text"]
    link = text[text.index("http"):].split()[0]
    cluster.google.next_login(ALICE)
    page = Browser().go(link)
    granted = tool(cluster.replica(3), tokens["access_token"], "calendar_upcoming", days=2)
    cluster.google.revoke_person(ALICE["sub"])
    assert asked["isError"] and link.startswith(f"{cluster.nginx.base_url}/oauth/google/grant?r=")
    assert "You can return to your application" in page.body
    assert granted["isError"] is False and granted["structuredContent"]["events"][0]["summary"] == "Design review"


# --- the proxy's forwarded headers


def test_the_audit_log_names_the_client_behind_the_proxy(cluster: Cluster) -> None:
    transport = httpx2.HTTPTransport(local_address="127.0.0.5")
    with httpx2.Client(transport=transport) as http:
        response = http.post(cluster.nginx.base_url + "/register", headers={"x-forwarded-for": "203.0.113.9"},
                             json={"client_name": "behind the proxy", "redirect_uris": ["http://127.0.0.1:7/cb"],
                                   "token_endpoint_auth_method": "none"})
    assert response.status_code == 201, response.text
    client_id = response.json()["client_id"]
    lines = [json.loads(line.split("audit: ", 1)[1]) for replica in cluster.replicas
             for line in replica.log().splitlines() if "audit: " in line and client_id in line]
    assert [(line["event"], line["ip"]) for line in lines] == [("client_registered", "127.0.0.5")], \
        "the address nginx saw, not what the client claimed"


# --- failures in the middle of a run (these come last: they disturb the cluster, then restore it)


def test_a_replica_killed_mid_run_costs_only_its_own_requests(cluster: Cluster) -> None:
    _, tokens = cluster.sign_in()
    token = tokens["access_token"]
    logged_before = len(cluster.nginx.access_log())
    dead = cluster.replica(2)
    through_proxy: list[int] = []
    direct: list[tuple[int, int | str]] = []
    for round_number in range(30):
        if round_number == 10:
            dead.process.send_signal(signal.SIGKILL)
            dead.process.wait()
        through_proxy.append(whoami(cluster.public, token).status_code)
        for number in (1, 2, 3):
            try:
                direct.append((number, whoami(cluster.replica(number), token).status_code))
            except httpx2.ConnectError:
                direct.append((number, "refused"))
    try:
        proxied = cluster.nginx.access_log()[logged_before:]
        assert through_proxy == [200] * 30, proxied
        assert [outcome for number, outcome in direct if number != 2] == [200] * 60
        assert [outcome for number, outcome in direct if number == 2] == [200] * 10 + ["refused"] * 20
        dead_address = f"127.0.0.1:{dead.port}"
        assert any(dead_address in upstream and "," in upstream for _, upstream in proxied), \
            "nginx met the dead replica and passed the request on"
    finally:
        cluster.restart(2)
    assert whoami(cluster.replica(2), token).status_code == 200, "a new replica picks up where the dead one was"


def test_redis_going_away_gets_503s_then_everything_back(cluster: Cluster) -> None:
    client, tokens = cluster.sign_in()
    cluster.redis.stop()
    try:
        during = [whoami(cluster.replica(n), tokens["access_token"]) for n in (1, 2, 3)]
        refresh = RawClient(cluster.replica(2), client.client_id, client.redirect_uri).refresh(tokens["refresh_token"])
        ready = httpx2.get(cluster.replica(3).base_url + "/readyz")
        alive = httpx2.get(cluster.replica(3).base_url + "/healthz")
        more = [whoami(cluster.replica(n), tokens["access_token"]) for n in (1, 2, 3) for _ in range(3)]
        proxied = whoami(cluster.public, tokens["access_token"])
    finally:
        cluster.redis.start()
    for response in [*during, *more, proxied]:
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "2"
        assert response.json()["error"]["code"] == -32000
        assert "Traceback" not in response.text
    assert refresh.status_code == 503 and refresh.json()["error"] == "temporarily_unavailable"
    assert ready.status_code == 503 and ready.headers["retry-after"] == "2"
    assert ready.json() == {"status": "not ready", "missing": ["store"], "checks": {
        "store": "unavailable", "shutdown": "no", "google_discovery": "loaded"}, "store_mode": "standalone"}
    assert alive.status_code == 200, "the process is alive: an orchestrator must not restart it for Redis"

    eventually(lambda: all(httpx2.get(r.base_url + "/readyz").status_code == 200 for r in cluster.replicas), WAIT_S,
               awaiting="the replicas to come back by themselves", interval_s=0.2)
    assert [whoami(cluster.replica(n), tokens["access_token"]).status_code for n in (1, 2, 3)] == [200] * 3
    again = RawClient(cluster.replica(1), client.client_id, client.redirect_uri).refresh(tokens["refresh_token"])
    assert again.status_code == 200, "the refresh tried during the outage used nothing up"
    for replica in cluster.replicas:
        log = replica.log()
        assert log.count("store unavailable:") == 1, "the outage is logged once, not per request"
        assert log.count("store available again") == 1
        assert "Traceback" not in log


@pytest.mark.parametrize("attempt", range(3))
def test_retries_after_a_lost_refresh_answer_raced_on_three_replicas_give_one_chain(cluster: Cluster,
                                                                                   attempt: int) -> None:
    """The answer to a refresh was lost; past the race window the client retries with the previous token,
    twelve times at once, through all three replicas. One retry wins (a fresh pair; the lost one is retired),
    every other gets that same pair, and only that chain goes on: the lost pair's refresh token is dead."""
    client, tokens = cluster.sign_in()
    lost = client.refresh(tokens["refresh_token"]).json()  # answered, but the answer never reached the client
    time.sleep(2.5)  # past the race window: a retry now, not a duplicate
    on = [RawClient(cluster.replica(n % 3 + 1), client.client_id, client.redirect_uri) for n in range(12)]
    results = at_once(*(lambda c=c: c.refresh(tokens["refresh_token"]) for c in on))
    one_chain(cluster, client, results)
    assert results[0].json()["refresh_token"] != lost["refresh_token"], "the retry got a pair of its own"
    assert whoami(cluster.replica(1), lost["access_token"]).status_code == 401, "the lost pair was retired"


def test_a_rate_limit_holds_across_replicas(cluster: Cluster, tmp_path: Path) -> None:
    """One budget for a token, whichever replica its requests reach (counted in the shared Redis)."""
    ports = [free_port(), free_port()]
    env = {**cluster.env, "STORE_URL": f"{cluster.redis.url}?prefix=limits", "RATE_LIMIT_MCP": "30",
           "PUBLIC_URL": f"http://127.0.0.1:{ports[0]}"}
    replicas = [start_auth_server(cluster.google, tmp_path / f"limited-{n}", "--stateless", env=env, port=port)
                for n, port in enumerate(ports)]
    try:
        cluster.google.next_login(ALICE)
        token = RawClient.register(replicas[0]).sign_in()["access_token"]
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda n: mcp_call(replicas[n % 2], token, "tools/list"), range(40)))
    finally:
        for replica in replicas:
            replica.stop()
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) == 30 and statuses.count(429) == 10, statuses
    assert {answer.status_code for answer in answers[1::2]} >= {200}, "the second replica served its share too"


# --- the verified-token cache: each replica keeps the tokens it has read, and a revocation reaches all


def hammer(server: ServerProcess, access_token: str, stop: threading.Event,
           seen: list[tuple[float, float, int]]) -> None:
    """whoami again and again until `stop`, noting in `seen` when each request started and ended, and its status."""
    with httpx2.Client() as http:  # keep-alive: as many requests as the replica answers
        while not stop.is_set():
            started = time.monotonic()
            status = mcp_call(server, access_token, "tools/call", {"name": "whoami", "arguments": {}},
                              http=http).status_code
            seen.append((started, time.monotonic(), status))


def test_a_revocation_racing_requests_on_three_replicas_ends_the_token_on_all_at_once(cluster: Cluster) -> None:
    client, tokens = cluster.sign_in()
    assert [whoami(cluster.replica(n), tokens["access_token"]).status_code for n in (1, 2, 3)] == [200] * 3
    stop = threading.Event()
    runs: list[tuple[int, list[tuple[float, float, int]]]] = [(n, []) for n in (1, 2, 3) for _ in range(2)]
    with ThreadPoolExecutor(REPLICAS * 2) as pool:  # two callers per replica, every replica's cache warm
        callers = [pool.submit(hammer, cluster.replica(n), tokens["access_token"], stop, requests)
                   for n, requests in runs]
        try:
            eventually(lambda: all(requests for _, requests in runs), WAIT_S,
                       awaiting="every caller to have been answered (every replica's cache warm)")
            asked = time.monotonic()
            revoked = httpx2.post(cluster.replica(2).base_url + "/revoke",
                                  data={"token": tokens["refresh_token"], "client_id": client.client_id})
            answered = time.monotonic()
            eventually(lambda: all(any(started > answered for started, _, _ in requests) for _, requests in runs),
                       WAIT_S, awaiting="every caller to have been answered again after the revocation")
        finally:
            stop.set()
            for caller in callers:
                caller.result()
        seen = [(n, *request) for n, requests in runs for request in requests]
    assert revoked.status_code == 200, revoked.text
    before = [status for _, _, ended, status in seen if ended < asked]
    during = [status for _, started, ended, status in seen if ended >= asked and started <= answered]
    after = [(n, status) for n, started, _, status in seen if started > answered]
    for n in (1, 2, 3):
        mine = [status for replica, status in after if replica == n]
        print(f"replica {n}: {sum(1 for r, s, e, _ in seen if r == n and e < asked)} requests answered 200 before "
              f"the revocation; {len(mine)} started after it was answered: {sorted(set(mine))}")
    print(f"racing the revocation ({(answered - asked) * 1000:.1f} ms): {len(during)} requests, "
          f"{during.count(200)} answered 200, {during.count(401)} answered 401")
    assert set(before) == {200}
    assert all(any(r == n and e < asked for r, _, e, _ in seen) for n in (1, 2, 3)), "every cache was warm"
    assert all(n in {r for r, _ in after} for n in (1, 2, 3)), "every replica was asked after the revocation"
    assert {status for _, status in after} == {401}, "a replica served a revoked token from its cache"
    assert set(during) <= {200, 401}


def test_a_replica_that_stops_hearing_revocations_trusts_no_kept_token_until_it_hears_again(
        cluster: Cluster) -> None:
    import redis

    client, tokens = cluster.sign_in()
    assert [whoami(cluster.replica(n), tokens["access_token"]).status_code for n in (1, 2, 3)] == [200] * 3
    lost, heard = "stopped hearing other replicas' revocations", "hearing other replicas' revocations: verified"
    before = [(replica.log().count(lost), replica.log().count(heard)) for replica in cluster.replicas]
    with redis.Redis.from_url(cluster.redis.url) as control:  # every replica's subscription, cut at once
        assert control.client_kill_filter(_type="pubsub") == REPLICAS
    revoked = httpx2.post(cluster.replica(1).base_url + "/revoke",
                          data={"token": tokens["refresh_token"], "client_id": client.client_id})
    assert revoked.status_code == 200
    assert [whoami(cluster.replica(n), tokens["access_token"]).status_code for n in (2, 3)] == [401, 401]
    assert [replica.log().count(lost) for replica in cluster.replicas] == [n + 1 for n, _ in before]

    eventually(lambda: [replica.log().count(heard) for replica in cluster.replicas] == [n + 1 for _, n in before],
               WAIT_S, awaiting="every replica to subscribe again by itself, and trust its cache again",
               interval_s=0.1, showing=lambda: [replica.log().count(heard) for replica in cluster.replicas])
    client, tokens = cluster.sign_in()
    assert [whoami(cluster.replica(n), tokens["access_token"]).status_code for n in (2, 3, 2, 3)] == [200] * 4
    revoked = httpx2.post(cluster.replica(1).base_url + "/revoke",
                          data={"token": tokens["refresh_token"], "client_id": client.client_id})
    assert revoked.status_code == 200
    assert [whoami(cluster.replica(n), tokens["access_token"]).status_code for n in (2, 3)] == [401, 401]
