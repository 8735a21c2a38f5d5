"""Sign-in and token rates of our server, on SQLite and on Redis (one server, a primary that Sentinel fails
over, a Cluster; on the last two also without WAIT for a replica after each write, to measure what it costs),
pinned like in the throughput part:

- complete sign-ins per second: registration aside, the whole authorization-code flow with PKCE through
  our consent page and the Google stand-in (npm `oidc-provider` on loopback), ending in a token exchange;
- token refreshes per second: chains of refresh-token grants, each using the token the last one returned;
- bearer-token validations per second: `wrk` posting a body that is not JSON with a token (bench/validate.lua):
  the server looks the token up and then refuses the body (415), and the same with a
  token that does not exist (401). (What the SDK's own bearer layers cost without storage shows in the
  throughput part: "SDK tuned + bearer" against "SDK tuned".)
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2

from bench.harness import (
    BENCH,
    LEGACY_VERSION,
    LOAD_CPU,
    Contender,
    ServerAt,
    chosen_contenders,
    pinned,
    process_cpu_s,
    running,
    server_pid,
)

CONTENDERS = ("ours auth on SQLite", "ours auth on Redis", "ours auth on Sentinel", "ours auth on Cluster")  # and
# each one's ", no WAIT" variant
SIGN_IN_THREADS = 8
REFRESH_CHAINS = 16


def sign_ins(url: str, count: int) -> tuple[list[dict[str, Any]], float, int]:
    """`count` complete sign-ins, SIGN_IN_THREADS at a time: their tokens, the seconds taken, failures."""
    from tests.signin import RawClient

    client = RawClient.register(ServerAt(url))  # type: ignore[arg-type]

    def one(_: int) -> dict[str, Any] | None:
        try:
            return client.sign_in()
        except (AssertionError, httpx2.HTTPError):
            return None

    started = time.perf_counter()
    with ThreadPoolExecutor(SIGN_IN_THREADS) as pool:
        tokens = list(pool.map(one, range(count)))
    elapsed = time.perf_counter() - started
    return [t for t in tokens if t], elapsed, sum(1 for t in tokens if t is None)


async def refresh_chains(base_url: str, client_id: str, refresh_tokens: list[str], seconds: float,
                         ) -> tuple[int, int]:
    """Each chain refreshes, then refreshes with what it got, until time is up: (done, failed)."""
    done = failed = 0
    deadline = time.monotonic() + seconds

    async def chain(client: httpx2.AsyncClient, token: str) -> None:
        nonlocal done, failed
        while time.monotonic() < deadline:
            response = await client.post(f"{base_url}/token", data={
                "grant_type": "refresh_token", "refresh_token": token, "client_id": client_id})
            if response.status_code != 200:
                failed += 1
                return
            token = response.json()["refresh_token"]
            done += 1

    async with httpx2.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(chain(client, token) for token in refresh_tokens))
    return done, failed


def validations(url: str, token: str, seconds: float) -> tuple[float, int, int]:
    """wrk's token-carrying POST for `seconds`: (requests per second, requests, answers that were not 4xx)."""
    command = pinned(LOAD_CPU, ["wrk", "-t1", "-c16", f"-d{max(1, round(seconds))}s", "-s",
                                str(BENCH / "validate.lua"), url])
    out = subprocess.run(command, capture_output=True, text=True, check=True,
                         env={**os.environ, "BENCH_TOKEN": token}).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))
    refused = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return (float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), total,
            total - int(refused.group(1) if refused else 0))


def status_of(url: str, token: str) -> int:
    return httpx2.post(url, content=b"not json", headers={
        "authorization": f"Bearer {token}", "content-type": "text/plain", "mcp-protocol-version": LEGACY_VERSION,
        "accept": "application/json, text/event-stream"}).status_code


def measure(contender: Contender, url: str, pid: int, quick: bool) -> list[dict[str, Any]]:
    seconds = 1.0 if quick else 5.0
    found = []
    if contender.google is not None:
        count = 4 if quick else 48
        cpu = process_cpu_s(pid)
        tokens, elapsed, failed = sign_ins(url, count)
        cpu = process_cpu_s(pid) - cpu
        found.append({"contender": contender.name, "what": "complete sign-ins", "per_s": len(tokens) / elapsed,
                      "count": len(tokens), "failed": failed, "server_cpu_ms_each": cpu / max(1, len(tokens)) * 1e3})
        from tests.signin import RawClient

        client = RawClient.register(ServerAt(url))  # type: ignore[arg-type]
        chains = [client.sign_in()["refresh_token"] for _ in range(2 if quick else REFRESH_CHAINS)]
        cpu = process_cpu_s(pid)
        done, failed = asyncio.run(refresh_chains(ServerAt(url).base_url, client.client_id, chains, seconds))
        cpu = process_cpu_s(pid) - cpu
        found.append({"contender": contender.name, "what": "token refreshes", "per_s": done / seconds,
                      "count": done, "failed": failed, "server_cpu_ms_each": cpu / max(1, done) * 1e3})
    for what, token in (("bearer validations (valid token)", contender.token),
                        ("bearer validations (unknown token)", "no-such-token")):
        status = status_of(url, token)
        expected = status == 401 if token == "no-such-token" else status in (400, 415)
        cpu = process_cpu_s(pid)
        per_s, total, accepted = validations(url, token, seconds)
        cpu = process_cpu_s(pid) - cpu
        found.append({"contender": contender.name, "what": f"{what}, answered {status}", "per_s": per_s,
                      "count": total, "failed": accepted if expected else total,
                      "server_cpu_ms_each": cpu / max(1, total) * 1e3})
    return found


def run(workdir: Path, quick: bool = False) -> list[dict[str, Any]]:
    chosen, stack = chosen_contenders(workdir, list(CONTENDERS))
    found: list[dict[str, Any]] = []
    with stack:
        for contender in chosen:
            with running(contender, workdir) as (process, url):
                found += measure(contender, url, server_pid(process), quick)
    print("\nsign-in and token rates (server pinned to one core)")
    print(f"{'contender':<32}{'what':<46}{'per s':>9}{'x SQLite':>9}{'count':>8}{'CPU ms each':>13}")
    on_sqlite = {rate["what"]: rate["per_s"] for rate in found if rate["contender"] == CONTENDERS[0]}
    for rate in found:
        rate["ratio_sqlite"] = rate["per_s"] / on_sqlite[rate["what"]] if on_sqlite.get(rate["what"]) else None
        ratio = f"{rate['ratio_sqlite']:>9.2f}" if rate["ratio_sqlite"] is not None else f"{'-':>9}"
        failed = f"  FAILED {rate['failed']}" if rate["failed"] else ""
        print(f"{rate['contender']:<32}{rate['what']:<46}{rate['per_s']:>9.1f}{ratio}"
              f"{rate['count']:>8}{rate['server_cpu_ms_each']:>13.3f}{failed}")
    return found
