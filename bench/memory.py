"""Memory of stateful sessions: what an idle session and an open GET stream cost, ours against the bare SDK,
and whether memory comes back (or is reused) after sessions close.

Each server runs stateful, pinned like in the throughput part. Sessions are opened with `initialize` and
`notifications/initialized`; GET streams are raw sockets that read the response's status line and then
stay open. Resident memory (VmRSS) is read from /proc after each step, once the server is idle again.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2

from bench.harness import (
    LEGACY_VERSION,
    Contender,
    chosen_contenders,
    initialize_body,
    request_headers,
    rss_bytes,
    running,
    server_pid,
)

CONTENDERS = ("SDK tuned", "ours auth off")
OPENING_AT_ONCE = 32


@dataclass
class Footprint:
    contender: str
    sessions: int
    session_kb: float  # per idle session
    stream_kb: float  # per open GET stream, on top of its session


@dataclass
class Wave:
    contender: str
    wave: int
    sessions: int
    peak_mb: float  # with every session and stream of the wave open
    after_mb: float  # once they are closed


async def open_sessions(client: httpx2.AsyncClient, url: str, count: int) -> list[str]:
    gate = asyncio.Semaphore(OPENING_AT_ONCE)

    async def one() -> str:
        async with gate:
            response = await client.post(url, headers=request_headers("legacy"), json=initialize_body())
            session = response.headers.get("mcp-session-id")
            if response.status_code != 200 or not session:
                raise RuntimeError(f"initialize answered {response.status_code}: {response.text[:200]}")
            done = await client.post(url, headers=request_headers("legacy", session=session),
                                     json={"jsonrpc": "2.0", "method": "notifications/initialized"})
            if done.status_code != 202:
                raise RuntimeError(f"notifications/initialized answered {done.status_code}: {done.text[:200]}")
            return session

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def open_streams(port: int, sessions: list[str]) -> list[asyncio.StreamWriter]:
    """A GET stream per session, held open: the status line is read, nothing more."""
    gate = asyncio.Semaphore(OPENING_AT_ONCE)

    async def one(session: str) -> asyncio.StreamWriter:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write((f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
                          f"Mcp-Session-Id: {session}\r\nMCP-Protocol-Version: {LEGACY_VERSION}\r\n\r\n").encode())
            await writer.drain()
            status = await reader.readline()
            if b" 200 " not in status:
                raise RuntimeError(f"GET stream answered {status!r}")
            return writer

    return list(await asyncio.gather(*(one(session) for session in sessions)))


async def close(client: httpx2.AsyncClient, url: str, sessions: list[str],
                streams: list[asyncio.StreamWriter]) -> None:
    for writer in streams:
        writer.close()
    gate = asyncio.Semaphore(OPENING_AT_ONCE)

    async def end(session: str) -> None:
        async with gate:
            await client.delete(url, headers=request_headers("legacy", session=session))

    await asyncio.gather(*(end(session) for session in sessions))


def settled_rss(pid: int) -> int:
    """RSS once the server has finished what it was doing (two equal readings 0.3 s apart, at most 5 s)."""
    last, deadline = rss_bytes(pid), time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = rss_bytes(pid)
        if abs(now - last) < 64 * 1024:
            return now
        last = now
    return last


async def footprint(contender: Contender, url: str, pid: int, counts: tuple[int, ...]) -> list[Footprint]:
    found = []
    async with httpx2.AsyncClient(timeout=60, limits=httpx2.Limits(max_connections=OPENING_AT_ONCE)) as client:
        await close(client, url, await open_sessions(client, url, 1), [])  # warm the code paths up
        base = settled_rss(pid)
        sessions: list[str] = []
        streams: list[asyncio.StreamWriter] = []
        sessions_bytes = streams_bytes = 0
        for count in counts:
            added = await open_sessions(client, url, count - len(sessions))
            sessions += added
            with_sessions = settled_rss(pid)
            sessions_bytes = with_sessions - base - streams_bytes
            streams += await open_streams(contender.port, added)
            streams_bytes += settled_rss(pid) - with_sessions
            found.append(Footprint(contender.name, count, sessions_bytes / count / 1024,
                                   streams_bytes / count / 1024))
        await close(client, url, sessions, streams)
    return found


async def waves(contender: Contender, url: str, pid: int, size: int, count: int) -> list[Wave]:
    found = []
    async with httpx2.AsyncClient(timeout=60, limits=httpx2.Limits(max_connections=OPENING_AT_ONCE)) as client:
        for number in range(1, count + 1):
            sessions = await open_sessions(client, url, size)
            streams = await open_streams(contender.port, sessions)
            peak = settled_rss(pid)
            await close(client, url, sessions, streams)
            await asyncio.sleep(0.5)
            found.append(Wave(contender.name, number, size, peak / 2**20, settled_rss(pid) / 2**20))
    return found


def run(workdir: Path, quick: bool = False) -> list[Footprint | Wave]:
    counts, wave_size = ((20, 100), 50) if quick else ((1_000, 10_000), 2_000)
    chosen, stack = chosen_contenders(workdir, list(CONTENDERS))
    found: list[Footprint | Wave] = []
    with stack:
        for contender in [c for c in chosen if c.name in CONTENDERS]:
            with running(contender, workdir, "stateful") as (process, url):
                found += asyncio.run(footprint(contender, url, server_pid(process), counts))
            with running(contender, workdir, "stateful") as (process, url):  # a fresh process for the waves
                found += asyncio.run(waves(contender, url, server_pid(process), wave_size, 3))
    report(found, judge=not quick)
    return found


def share(ours: float, theirs: float) -> str:
    """ours / theirs, printed; "n/a" where theirs measured nothing (a quick run's RSS moves in whole pages)."""
    return f"{ours / theirs:.2f}" if theirs > 0 else "n/a"


def report(found: list[Footprint | Wave], *, judge: bool = True) -> None:
    print("\nmemory, stateful: per idle session and per open GET stream (KB of RSS)")
    print(f"{'contender':<22}{'sessions':>9}{'KB/session':>12}{'KB/stream':>11}{'x SDK':>8}{'x SDK':>8}")
    sdk = {m.sessions: m for m in found if isinstance(m, Footprint) and m.contender == "SDK tuned"}
    for m in found:
        if isinstance(m, Footprint):
            theirs = sdk.get(m.sessions)
            ratios = (share(m.session_kb, theirs.session_kb), share(m.stream_kb, theirs.stream_kb)) if theirs \
                else ("1.00", "1.00")
            print(f"{m.contender:<22}{m.sessions:>9,}{m.session_kb:>12.1f}{m.stream_kb:>11.1f}"
                  f"{ratios[0]:>8}{ratios[1]:>8}")
    print("\nmemory, three waves of sessions with streams, opened then closed (MB of RSS)")
    print(f"{'contender':<22}{'wave':>5}{'sessions':>9}{'peak MB':>9}{'after MB':>10}")
    for m in found:
        if isinstance(m, Wave):
            print(f"{m.contender:<22}{m.wave:>5}{m.sessions:>9,}{m.peak_mb:>9.1f}{m.after_mb:>10.1f}")
    for name in CONTENDERS:
        mine = [m for m in found if isinstance(m, Wave) and m.contender == name]
        if len(mine) == 3:
            grew = mine[2].peak_mb / mine[0].peak_mb if mine[0].peak_mb > 0 else float("nan")
            print(f"{name}: third wave's peak is {grew:.2f} x the first's "
                  f"({'memory reused' if grew <= 1.10 else 'memory NOT reused'})")
    if not judge:
        print("memory targets: not judged in a --quick run (a few sessions move RSS by whole pages)")
        return
    footprints = {(m.contender, m.sessions): m for m in found if isinstance(m, Footprint)}
    for (name, sessions), m in footprints.items():
        theirs = footprints.get(("SDK tuned", sessions))
        if name != "SDK tuned" and theirs:
            for what, ours, sdk_kb in (("session", m.session_kb, theirs.session_kb),
                                       ("stream", m.stream_kb, theirs.stream_kb)):
                met = ours <= sdk_kb * 1.10
                print(f"{'met ' if met else 'MISS'}  memory per {what} at {sessions:,} within 10% of the SDK's: "
                      f"{ours:.1f} KB vs {sdk_kb:.1f} KB")
