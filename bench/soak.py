"""The reliability soak: many signed-in clients against one server for minutes, by hand.

    uv run bench/run.py --soak 10                    # 64 clients, 10 minutes
    uv run bench/run.py --soak 2 --soak-clients 16

Our server runs as `stateful.sh` runs it (sessions, SSE answers) with sign-in on SQLite, pinned to CPU 0.
Each client signs in as its own person through the Google stand-in, opens a session and then, one request
at a time, mixes tool calls (`add`), note writes (`add_note`) and reads (`search_notes`, `notes://{id}`),
refreshes its token every 100 requests and reconnects (ends its session, new connection, new session)
every 250. Reported per period (a minute, or a sixth of a short run): requests, failures (any answer but
the expected one, or no answer), p99 latency, the server's RSS and open file descriptors. Targets: zero
failures, and RSS and file descriptors flat after warm-up (the last period within 10% of the second).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

from bench.harness import (
    LEGACY_VERSION,
    REPO,
    Contender,
    ServerAt,
    initialize_body,
    json_rpc_answer,
    open_files,
    python,
    request_body,
    rss_bytes,
    running,
    server_pid,
    signed_in,
)

REFRESH_EVERY, RECONNECT_EVERY = 100, 250


@dataclass
class Period:
    started_s: float
    requests: int = 0
    failures: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    rss_mb: float = 0.0
    open_files: int = 0


@dataclass
class SignedIn:
    client_id: str
    access_token: str
    refresh_token: str


class SoakClient:
    """One person's client: a session, a token that it refreshes, a connection that it replaces."""

    def __init__(self, number: int, url: str, credentials: SignedIn, record: Any) -> None:
        self.number, self.url, self.credentials, self.record = number, url, credentials, record
        self.http = httpx2.AsyncClient(timeout=30)
        self.session = ""
        self.note_ids: list[str] = []
        self.ids = itertools.count(1)

    def headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "application/json, text/event-stream",
                   "mcp-protocol-version": LEGACY_VERSION, "authorization": f"Bearer {self.credentials.access_token}"}
        if self.session:
            headers["mcp-session-id"] = self.session
        return headers

    async def timed(self, send: Any, ok: Any) -> Any:
        started = time.perf_counter()
        try:
            response = await send()
            good = ok(response)
        except (httpx2.HTTPError, ValueError, KeyError) as exc:
            response, good = exc, False
        self.record((time.perf_counter() - started) * 1e3, good, response)
        return response if good else None

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any] | None:
        def ok(response: httpx2.Response) -> bool:
            answer = json_rpc_answer(response)
            return response.status_code == 200 and "result" in answer and not answer["result"].get("isError")

        response = await self.timed(lambda: self.http.post(self.url, headers=self.headers(), json=request_body(
            "legacy", method, params, next(self.ids))), ok)
        return json_rpc_answer(response)["result"] if response is not None else None

    async def connect(self) -> None:
        async def initialize() -> httpx2.Response:
            self.session = ""
            return await self.http.post(self.url, headers=self.headers(), json=initialize_body("soak"))

        response = await self.timed(initialize, lambda r: r.status_code == 200 and "mcp-session-id" in r.headers)
        if response is not None:
            self.session = response.headers["mcp-session-id"]
            await self.timed(lambda: self.http.post(self.url, headers=self.headers(), json={
                "jsonrpc": "2.0", "method": "notifications/initialized"}), lambda r: r.status_code == 202)

    async def reconnect(self) -> None:
        await self.timed(lambda: self.http.delete(self.url, headers=self.headers()),
                         lambda r: r.status_code in (200, 204))
        await self.http.aclose()
        self.http = httpx2.AsyncClient(timeout=30)
        await self.connect()

    async def refresh(self) -> None:
        base = self.url.removesuffix("/mcp")
        response = await self.timed(lambda: self.http.post(f"{base}/token", data={
            "grant_type": "refresh_token", "refresh_token": self.credentials.refresh_token,
            "client_id": self.credentials.client_id}), lambda r: r.status_code == 200)
        if response is not None:
            tokens = response.json()
            self.credentials.access_token, self.credentials.refresh_token = (tokens["access_token"],
                                                                             tokens["refresh_token"])

    async def one_request(self, number: int, chance: random.Random) -> None:
        roll = chance.random()
        if roll < 0.50:
            await self.call("tools/call", {"name": "add", "arguments": {"a": number, "b": 1}})
        elif roll < 0.60:
            result = await self.call("tools/call", {"name": "add_note", "arguments": {
                "title": f"soak {self.number}-{number}", "body": "written by the soak", "tags": ["soak"]}})
            if result is not None:
                self.note_ids.append(result["structuredContent"]["id"])
        elif roll < 0.85:
            await self.call("tools/call", {"name": "search_notes", "arguments": {"query": "soak", "limit": 5}})
        elif self.note_ids:
            await self.call("resources/read", {"uri": f"notes://{chance.choice(self.note_ids)}"})
        else:
            await self.call("tools/call", {"name": "add", "arguments": {"a": number, "b": 2}})

    async def run(self, until: float) -> None:
        chance = random.Random(self.number)
        await self.connect()
        for number in itertools.count(1):
            if time.monotonic() >= until:
                break
            if number % REFRESH_EVERY == 0:
                await self.refresh()
            if number % RECONNECT_EVERY == 0:
                await self.reconnect()
            await self.one_request(number, chance)
        await self.http.aclose()


def sign_in_everyone(contender: Contender, url: str, count: int) -> list[SignedIn]:
    """One person per client (the stand-in signs in whoever it is told to next)."""
    from tests.signin import RawClient

    client = RawClient.register(ServerAt(url))  # type: ignore[arg-type]
    people = []
    for number in range(count):
        contender.google.next_login({"sub": f"soak-{number}", "email": f"soak{number}@example.com",
                                     "email_verified": True, "name": f"Soak {number}"})
        tokens = client.sign_in()
        people.append(SignedIn(client.client_id, tokens["access_token"], tokens["refresh_token"]))
    return people


async def drive(url: str, people: list[SignedIn], seconds: float, period_s: float, pid: int) -> list[Period]:
    started = time.monotonic()
    periods = [Period(0.0)]
    problems: list[str] = []

    def record(latency_ms: float, good: bool, response: Any) -> None:
        period = periods[-1]
        period.requests += 1
        period.latencies_ms.append(latency_ms)
        if not good:
            period.failures += 1
            if len(problems) < 5:
                problems.append(repr(response)[:300] if not isinstance(response, httpx2.Response)
                                else f"{response.status_code} {response.text[:300]}")

    async def sample() -> None:
        while True:
            await asyncio.sleep(period_s)
            periods[-1].rss_mb, periods[-1].open_files = rss_bytes(pid) / 2**20, open_files(pid)
            periods.append(Period(time.monotonic() - started))

    until = started + seconds
    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(SoakClient(n, url, p, record).run(until) for n, p in enumerate(people)))
    sampler.cancel()
    if periods[-1].requests:
        periods[-1].rss_mb, periods[-1].open_files = rss_bytes(pid) / 2**20, open_files(pid)
    else:
        periods.pop()
    for problem in problems:
        print(f"failure: {problem}")
    return periods


def run(workdir: Path, minutes: float, clients: int) -> dict[str, Any]:
    def product_defaults(port: int, mode: str) -> list[str]:  # sessions, SSE answers
        return python(str(REPO / "server.py"), "--port", str(port))

    contender = Contender("ours auth on SQLite", product_defaults, modes=("stateful",))
    contender.env["MAX_SESSIONS"] = "20000"
    seconds = minutes * 60
    period_s = 60.0 if seconds >= 360 else seconds / 6
    with signed_in(workdir, [contender]), running(contender, workdir, "stateful") as (process, url):
        people = sign_in_everyone(contender, url, clients)
        print(f"soak: {clients} signed-in clients for {minutes:g} min against {url}, periods of {period_s:g} s")
        periods = asyncio.run(drive(url, people, seconds, period_s, server_pid(process)))
    print(f"{'from s':>7}{'requests':>10}{'failed':>8}{'p99 ms':>9}{'RSS MB':>9}{'open fds':>10}")
    for period in periods:
        p99 = statistics.quantiles(period.latencies_ms, n=100)[98] if len(period.latencies_ms) > 1 else 0.0
        print(f"{period.started_s:>7.0f}{period.requests:>10}{period.failures:>8}{p99:>9.1f}"
              f"{period.rss_mb:>9.1f}{period.open_files:>10}")
    failed = sum(p.failures for p in periods)
    result: dict[str, Any] = {"clients": clients, "seconds": seconds, "failed": failed,
                              "requests": sum(p.requests for p in periods),
                              "periods": [{"started_s": p.started_s, "requests": p.requests, "failures": p.failures,
                                           "rss_mb": p.rss_mb, "open_files": p.open_files} for p in periods]}
    print(f"{'met ' if failed == 0 else 'MISS'}  failed requests: {failed} of {result['requests']}")
    if len(periods) >= 3:
        warm, last = periods[1], periods[-1]
        rss_flat = last.rss_mb <= warm.rss_mb * 1.10
        fds_flat = last.open_files <= warm.open_files * 1.10 + 2
        result |= {"rss_flat": rss_flat, "fds_flat": fds_flat}
        print(f"{'met ' if rss_flat else 'MISS'}  RSS flat after warm-up: {warm.rss_mb:.1f} MB -> {last.rss_mb:.1f} MB")
        print(f"{'met ' if fds_flat else 'MISS'}  open files flat after warm-up: {warm.open_files} -> "
              f"{last.open_files}")
    return result
