"""Three stateless replicas on Redis Sentinel and on Redis Cluster, serving signed-in clients under load,
while the primary that holds the store is killed (SIGKILL) in the middle of the run.

What must hold: requests fail only during the failover and only with 503 and Retry-After (never a 500,
never a traceback); the replicas find the new primary by themselves; sign-ins, refreshes and revocations
work afterwards; a revocation made just before the kill still holds; no acknowledged note, refresh or
grant is lost. The run's timeline (t=0 at the kill) is printed and written to
TMPDIR/stream-http-failover-MODE.txt, to be quoted.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest

import server as server_module
from tests.conftest import TEST_SECRET_KEY, ServerProcess, eventually, free_port
from tests.redis_ha import ClusterSet, SentinelSet
from tests.signin import ALICE, GoogleStandIn, RawClient, mcp_call, pkce_pair, start_auth_server

pytestmark = pytest.mark.store_of_its_own  # its own Redis nodes, whatever --store says
REPLICAS = 3
WORKERS = 6
PREFIX = "failover"
FAILOVER_TIMEOUT_S = 30
RECOVERY_TIMEOUT_S = 30
RETRY_SOON_S = 0.1  # after a 503 a worker tries again this soon (sooner than Retry-After), to find the outage's end


@dataclass
class Outcome:
    """One request of the load: when it started and ended (monotonic), what, where, and its answer."""

    started: float
    ended: float
    what: str
    replica: int
    status: int
    retry_after: str | None
    traceback: bool
    error: str | None = None  # a 200 that is not a success: a JSON-RPC error, or a tool's error


@dataclass
class Worker:
    """One signed-in client: its current tokens, and what the server acknowledged to it."""

    number: int
    client: RawClient
    tokens: dict[str, Any]
    notes: list[tuple[str, str]] = field(default_factory=list)  # (tag, id) of each note acknowledged as added
    refreshes: int = 0  # refreshes acknowledged (each a new pair; the grant goes on with the last)

    @property
    def tag(self) -> str:
        return f"worker-{self.number}"

    def batch(self, step: int) -> str:
        """A tag per 100 steps (50 notes at most), so that search_notes lists each batch whole."""
        return f"{self.tag}-{step // 100}"


@dataclass
class Deployment:
    mode: str
    nodes: SentinelSet | ClusterSet
    replicas: list[ServerProcess]
    google: GoogleStandIn

    def replica(self, number: int) -> ServerProcess:
        return self.replicas[number % REPLICAS]

    def sign_in(self, through: int) -> tuple[RawClient, dict[str, Any]]:
        """Register and sign Alice in at replica `through`, for the deployment's one resource (PUBLIC_URL is
        replica 0, where Google calls back)."""
        self.google.next_login(ALICE)
        client = RawClient.register(self.replica(through))
        verifier, challenge = pkce_pair()
        query, browser = client.authorize(challenge, resource=self.replicas[0].mcp_url)
        assert "code" in query, [(visit.status, visit.url) for visit in browser.visits[-3:]]
        response = client.exchange(query["code"], verifier)
        assert response.status_code == 200, response.text
        return client, response.json()

    def kill_primary(self) -> int:
        if isinstance(self.nodes, SentinelSet):
            return self.nodes.kill_primary()
        return self.nodes.kill_primary_of(f"{{{PREFIX}}}")

    def wait_for_failover(self) -> None:
        if isinstance(self.nodes, SentinelSet):
            self.nodes.wait_for_failover(FAILOVER_TIMEOUT_S)
        else:
            self.nodes.wait_until_healthy(FAILOVER_TIMEOUT_S)


@pytest.fixture(params=["sentinel", "cluster"])
def deployment(request: pytest.FixtureRequest, google: GoogleStandIn, tmp_path: Path) -> Iterator[Deployment]:
    with ExitStack() as stack:
        nodes = SentinelSet(tmp_path / "sentinel") if request.param == "sentinel" else ClusterSet(tmp_path / "cluster")
        stack.enter_context(nodes)
        ports = [free_port() for _ in range(REPLICAS)]
        env = {"STORE_URL": f"{nodes.url}?prefix={PREFIX}", "SECRET_KEY": TEST_SECRET_KEY,
               "ALLOWED_HOSTS": "127.0.0.1:*", "PUBLIC_URL": f"http://127.0.0.1:{ports[0]}"}
        replicas = []
        for number, port in enumerate(ports):
            replica = start_auth_server(google, tmp_path / f"replica-{number}", "--stateless", env=env, port=port)
            stack.callback(replica.stop)
            replicas.append(replica)
        yield Deployment(request.param, nodes, replicas, google)


def answered(response: httpx2.Response, what: str, replica: int, started: float) -> Outcome:
    return Outcome(started, time.monotonic(), what, replica, response.status_code,
                   response.headers.get("retry-after"), "Traceback" in response.text, error_in(response))


def error_in(response: httpx2.Response) -> str | None:
    """What went wrong in a 200 answer to an MCP call: its JSON-RPC error, or the tool's error."""
    if response.status_code != 200 or not response.url.path.endswith("/mcp"):
        return None
    message = response.json()
    if "error" in message:
        return str(message["error"])
    return response.text[:300] if message["result"].get("isError") else None


def one_step(deployment: Deployment, worker: Worker, step: int, http: httpx2.Client) -> Outcome:
    """A note added, a whoami, or (every fourth step) a refresh, on the replicas in turn."""
    replica = (worker.number + step) % REPLICAS
    server = deployment.replica(replica)
    started = time.monotonic()
    if step % 4 == 3:
        response = http.post(server.base_url + "/token", data={
            "grant_type": "refresh_token", "refresh_token": worker.tokens["refresh_token"],
            "client_id": worker.client.client_id})
        if response.status_code == 200:
            worker.tokens, worker.refreshes = response.json(), worker.refreshes + 1
        return answered(response, "refresh", replica, started)
    if step % 2 == 0:
        response = mcp_call(server, worker.tokens["access_token"], "tools/call", {
            "name": "add_note", "arguments": {"title": f"{worker.tag} note {step}", "tags": [worker.batch(step)]}},
            http=http)
        outcome = answered(response, "add_note", replica, started)
        if is_success(outcome):
            worker.notes.append((worker.batch(step), response.json()["result"]["structuredContent"]["id"]))
        return outcome
    response = mcp_call(server, worker.tokens["access_token"], "tools/call", {"name": "whoami", "arguments": {}},
                        http=http)
    return answered(response, "whoami", replica, started)


def is_success(outcome: Outcome) -> bool:
    return outcome.status == 200 and outcome.error is None


def run_load(deployment: Deployment, worker: Worker, stop: threading.Event, outcomes: list[Outcome]) -> None:
    with httpx2.Client(timeout=30) as http:
        for step in itertools.count():
            if stop.is_set():
                return
            started = time.monotonic()
            try:
                outcome = one_step(deployment, worker, step, http)
            except (httpx2.HTTPError, ValueError, KeyError) as exc:  # an answer no client could read: noted
                outcome = Outcome(started, time.monotonic(), "?", -1, 0, None, False, repr(exc))
            outcomes.append(outcome)
            if not is_success(outcome):
                time.sleep(RETRY_SOON_S)


def test_a_killed_primary_costs_503s_during_the_failover_and_loses_nothing_acknowledged(
        deployment: Deployment) -> None:
    workers = [Worker(number, *deployment.sign_in(through=number)) for number in range(WORKERS)]
    victim_client, victim = deployment.sign_in(through=0)
    outcomes: list[Outcome] = []
    stop = threading.Event()
    threads = [threading.Thread(target=run_load, args=(deployment, worker, stop, outcomes)) for worker in workers]
    for thread in threads:
        thread.start()
    try:
        eventually(lambda: all(worker.refreshes >= 1 and len(worker.notes) >= 2 for worker in workers), 60,
                   awaiting="every worker to have added notes and refreshed before the kill")
        revoked = httpx2.post(deployment.replica(1).base_url + "/revoke",
                              data={"token": victim["refresh_token"], "client_id": victim_client.client_id})
        assert revoked.status_code == 200, revoked.text
        killed_at = time.monotonic()
        deployment.kill_primary()
        deployment.wait_for_failover()
        failed_over = time.monotonic()

        def every_replica_served_since_the_failover() -> float | None:
            firsts = [min((o.ended for o in list(outcomes) if o.replica == number and o.started > failed_over
                           and is_success(o)), default=None) for number in range(REPLICAS)]
            return None if None in firsts else max(firsts)  # type: ignore[type-var]

        recovered = eventually(every_replica_served_since_the_failover, RECOVERY_TIMEOUT_S,
                               awaiting="every replica to serve again after the failover, by itself",
                               showing=lambda: since_the_failover(deployment, list(outcomes), failed_over))
        settled = len(outcomes)
        eventually(lambda: len(outcomes) >= settled + 10 * WORKERS, 60, awaiting="more load after the recovery")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    seen = list(outcomes)
    timeline = describe(deployment.mode, seen, killed_at, failed_over, recovered)

    lost_notes = [(worker.tag, note) for worker in workers for note in sorted(lost(deployment, worker))]
    lost_grants = [worker.tag for worker in workers if not grant_goes_on(deployment, worker)]
    timeline += (f"\nacknowledged: {sum(len(w.notes) for w in workers)} notes, "
                 f"{sum(w.refreshes for w in workers)} refreshes; lost: {len(lost_notes)} notes, "
                 f"{len(lost_grants)} grants")
    feeds = [feed_events(replica) for replica in deployment.replicas]
    timeline += "\nrevocation feed per replica (lost, heard again): " + "; ".join(
        f"{events.count('lost')}, {events.count('heard') - 1}" for events in feeds)
    report(deployment.mode, timeline)

    assert {o.status for o in seen} <= {200, 503}, Counter(o.status for o in seen)
    assert [o.error for o in seen if o.error] == [], "a failure is a 503, not an error inside a 200"
    assert all(o.retry_after == "2" for o in seen if o.status == 503), "every 503 says when to retry"
    assert not any(o.traceback for o in seen)
    assert [o for o in seen if o.ended < killed_at and not is_success(o)] == [], "failures before the kill"
    assert [o for o in seen if o.started > recovered and not is_success(o)] == [], "failures after the recovery"
    assert lost_notes == [] and lost_grants == [], timeline
    assert all("lost" in events and events[-1] == "heard" for events in feeds), "each heard again, by itself"

    # The revocation made just before the kill holds on every replica.
    assert [whoami(deployment.replica(n), victim["access_token"]) for n in range(REPLICAS)] == [401] * REPLICAS
    assert victim_client.refresh(victim["refresh_token"]).json()["error"] == "invalid_grant"
    # Sign-in, refresh and revocation work afterwards, across replicas.
    client, tokens = deployment.sign_in(through=2)
    fresh = RawClient(deployment.replica(1), client.client_id, client.redirect_uri).refresh(tokens["refresh_token"])
    assert fresh.status_code == 200, fresh.text
    assert [whoami(deployment.replica(n), fresh.json()["access_token"]) for n in range(REPLICAS)] == [200] * REPLICAS
    ended = httpx2.post(deployment.replica(0).base_url + "/revoke",
                        data={"token": fresh.json()["refresh_token"], "client_id": client.client_id})
    assert ended.status_code == 200
    assert [whoami(deployment.replica(n), fresh.json()["access_token"]) for n in range(REPLICAS)] == [401] * REPLICAS
    for replica in deployment.replicas:
        ready = httpx2.get(replica.base_url + "/readyz")
        assert ready.status_code == 200 and ready.json()["store_mode"] == deployment.mode, ready.text
        assert "Traceback" not in replica.log()


def since_the_failover(deployment: Deployment, seen: list[Outcome], failed_over: float) -> str:
    """What each replica answered since the failover, and the end of its log."""
    parts = []
    for number, replica in enumerate(deployment.replicas):
        answers = Counter((o.status, o.error) for o in seen if o.replica == number and o.started > failed_over)
        parts += [f"replica {number}: {answers}", *replica.log().splitlines()[-15:]]
    return "\n".join(parts)


def feed_events(replica: ServerProcess) -> list[str]:
    """When the replica stopped hearing other replicas' revocations, and heard them again, in order."""
    return [("lost" if "stopped hearing" in line else "heard") for line in replica.log().splitlines()
            if "stopped hearing other replicas' revocations" in line or "hearing other replicas' revocations: " in line]


def whoami(server: ServerProcess, access_token: str) -> int:
    return mcp_call(server, access_token, "tools/call", {"name": "whoami", "arguments": {}}).status_code


def lost(deployment: Deployment, worker: Worker) -> set[str]:
    """The ids of notes acknowledged to the worker that the store no longer has (asked with its latest token)."""
    missing = set()
    for tag in sorted({tag for tag, _ in worker.notes}):
        response = mcp_call(deployment.replica(worker.number), worker.tokens["access_token"], "tools/call",
                            {"name": "search_notes", "arguments": {"tag": tag, "limit": 100}})
        assert response.status_code == 200, response.text
        found = {note["id"] for note in response.json()["result"]["structuredContent"]["notes"]}
        missing |= {note for batch, note in worker.notes if batch == tag} - found
    return missing


def grant_goes_on(deployment: Deployment, worker: Worker) -> bool:
    """The last pair acknowledged to the worker still works: its access token, and a refresh with its
    refresh token (the grant, and every rotation of it acknowledged, survived)."""
    server = deployment.replica(worker.number + 1)
    if whoami(server, worker.tokens["access_token"]) != 200:
        return False
    return RawClient(server, worker.client.client_id, worker.client.redirect_uri).refresh(
        worker.tokens["refresh_token"]).status_code == 200


def describe(mode: str, seen: list[Outcome], killed_at: float, failed_over: float, recovered: float) -> str:
    """The run's timeline, t=0 at the kill, in seconds."""
    failures = sorted((o for o in seen if not is_success(o)), key=lambda o: o.ended)
    after = [o for o in seen if o.started > killed_at and is_success(o)]
    lines = [f"failover timeline, Redis {mode}, {REPLICAS} replicas, {WORKERS} signed-in clients (t=0: SIGKILL "
             "of the primary holding the store)",
             f"  load before the kill: {sum(1 for o in seen if o.ended < killed_at)} requests",
             f"  failover complete (as the {'sentinels say' if mode == 'sentinel' else 'cluster says'}): "
             f"t={failed_over - killed_at:+.2f} s"]
    if failures:
        lines += [f"  first 503: t={failures[0].ended - killed_at:+.2f} s ({failures[0].what}, replica "
                  f"{failures[0].replica})", f"  last 503:  t={failures[-1].ended - killed_at:+.2f} s"]
        after = [o for o in after if o.started > failures[-1].started] or after
    else:
        lines.append("  no request failed")
    if after:
        lines.append(f"  first success after: t={min(o.ended for o in after) - killed_at:+.2f} s")
    lines.append(f"  every replica served again by: t={recovered - killed_at:+.2f} s")
    for what in ("add_note", "whoami", "refresh"):
        counts = Counter(o.status for o in seen if o.what == what)
        lines.append(f"  {what:<9} " + ", ".join(f"{status}: {count}" for status, count in sorted(counts.items())))
    during = Counter(o.status for o in seen if o.ended >= killed_at and o.started <= recovered)
    lines.append("  between the kill and the recovery: " + ", ".join(
        f"{status}: {count}" for status, count in sorted(during.items())))
    return "\n".join(lines)


def report(mode: str, timeline: str) -> None:
    print("\n" + timeline)
    path = Path(os.environ.get("TMPDIR", tempfile.gettempdir()), f"stream-http-failover-{mode}.txt")
    path.write_text(timeline + "\n")


@pytest.mark.anyio
async def test_a_json_answer_that_is_only_the_store_failing_goes_out_as_503_with_retry_after() -> None:
    """A call admitted just before Redis went away meets the failure inside the SDK, which answers a JSON-RPC
    error; the client sees the same 503 as a call refused at the gate. Every other answer passes as it was."""
    async def answers(body: dict[str, Any], content_type: bytes = b"application/json") -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: Any) -> None:
            sent.append(message)

        served = server_module.Served({"jsonrpc": "2.0", "id": 7, "method": "tools/call"}, "POST")
        answer = served.send(send, vary=False, hold_json=True, session=None)
        await answer({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
        await answer({"type": "http.response.body", "body": json.dumps(body).encode(), "more_body": False})
        return sent

    failed = {"jsonrpc": "2.0", "id": 7, "error": {"code": -32000, "message": server_module.STORE_FAILED}}
    start, body = await answers(failed)
    assert start["status"] == 503 and (b"retry-after", b"2") in start["headers"]
    assert json.loads(body["body"]) == failed
    for other in ({"jsonrpc": "2.0", "id": 7, "result": {"content": []}},
                  {"jsonrpc": "2.0", "id": 7, "error": {"code": -32000, "message": "something else"}}):
        assert [message.get("status") for message in await answers(other)] == [200, None]
    assert (await answers(failed, b"text/event-stream"))[0]["status"] == 200, "a stream has begun: it stays 200"


@pytest.mark.anyio
async def test_a_held_json_start_never_goes_out_without_its_body() -> None:
    """The start of a JSON answer waits for its body (to tell a store failure). If the app stops before the
    body, the start is dropped rather than sent as a 200 with nothing after it: the failure that stopped the
    app is then answered as any other (uvicorn's 500, or the store's 503 from the exception handler)."""
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    served = server_module.Served({"jsonrpc": "2.0", "id": 7, "method": "tools/call"}, "POST")
    answer = served.send(send, vary=True, hold_json=True, session=None)
    await answer({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    assert sent == [], "held until the body shows what the answer is"
    await served.finish()
    assert sent == [] and served.held is None
    sse = server_module.Served({"jsonrpc": "2.0", "id": 8, "method": "tools/call"}, "POST")
    answer = sse.send(send, vary=True, hold_json=True, session=None)
    await answer({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await sse.finish()  # a stream that was left open is ended cleanly
    assert [(message["type"], message.get("more_body")) for message in sent] == [
        ("http.response.start", None), ("http.response.body", False)]
    assert (b"vary", b"Origin") in sent[0]["headers"]
