"""Side-by-side throughput of MCP servers answering the same `tools/call` of `add`, in one run.

    uv run bench/run.py                 # every contender, both eras, 3 interleaved rounds of 5 s
    uv run bench/run.py --quick         # 1 round of 1 s: a smoke run
    uv run bench/run.py --only A,ours   # contenders whose name starts with these

Each contender is its own process on loopback, pinned to CPU 0; Debian's `wrk` (16 keep-alive
connections, bench/add.lua giving every request its own JSON-RPC id) is pinned to CPU 1. Rounds visit
the contenders in turn, so drift in the machine hits them all alike; the table shows medians, the
server's CPU time per request (from /proc), the generator's CPU use (over 90% of a core means wrk, not
the server, set the pace: the run says so), and each contender's ratio to A (raw Starlette) and to the
bare SDK under its defaults and tuned. Figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BENCH = REPO / "bench"
ERAS = ("legacy", "2026-07-28")
TICKS = os.sysconf("SC_CLK_TCK")
SERVER_CPU, LOAD_CPU = "0", "1"


@dataclass
class Contender:
    name: str
    command: Callable[[int], list[str]]
    env: dict[str, str] = field(default_factory=dict)
    token: str = ""
    google: Any = None  # the Google stand-in that signs in for a token, with sign-in on
    port: int = field(default_factory=lambda: free_port())  # the same every round: tokens name it


@dataclass
class Sample:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    generator_cpu: float
    failures: int


def pinned(cpu: str, command: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *command] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else command


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running(contender: Contender, workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = contender.port
    log = (workdir / f"{contender.name}.log").open("ab")
    env = {**os.environ, "DATA_DIR": str(workdir / contender.name), **contender.env}
    process = subprocess.Popen(pinned(SERVER_CPU, contender.command(port)), cwd=REPO, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        wait_until_listening(url, contender, process)
        prepare_token(contender, url)
        answer_once(url, contender, process)
        yield process, url
    finally:
        process.terminate()
        process.wait(15)


def request_headers(era: str, token: str) -> dict[str, str]:
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream",
               "mcp-protocol-version": "2025-11-25" if era == "legacy" else era}
    if era != "legacy":
        headers |= {"mcp-method": "tools/call", "mcp-name": "add"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return headers


def request_body(era: str) -> dict:
    params: dict = {"name": "add", "arguments": {"a": 2, "b": 3}}
    if era != "legacy":
        params["_meta"] = {"io.modelcontextprotocol/protocolVersion": era,
                           "io.modelcontextprotocol/clientCapabilities": {}}
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}


def wait_until_listening(url: str, contender: Contender, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{contender.name} exited with {process.returncode}")
        try:
            httpx2.post(url, json={})
            return
        except httpx2.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def answer_once(url: str, contender: Contender, process: subprocess.Popen[bytes]) -> None:
    """The contender answers `add` correctly in both eras: a benchmark of errors would be worthless."""
    for era in ERAS:
        response = httpx2.post(url, json=request_body(era), headers=request_headers(era, contender.token))
        result = response.json().get("result") or {}
        if (result.get("structuredContent") or {}).get("result") != 5:
            raise RuntimeError(f"{contender.name} answered {response.status_code}: {response.text[:300]}")


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of `pid` and its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def server_pid(process: subprocess.Popen[bytes]) -> int:
    """The server itself, under `taskset`'s exec (same pid) or `uv run`'s child."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    kids = children.read_text().split() if children.exists() else []
    return int(kids[0]) if kids else process.pid


def load(url: str, era: str, token: str, seconds: float, connections: int) -> Sample:
    env = {**os.environ, "BENCH_ERA": era, "BENCH_TOKEN": token}
    command = pinned(LOAD_CPU, ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
                                "-s", str(BENCH / "add.lua"), url])
    before = os.times()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    after = os.times()
    out = done.stdout
    generator = (after.children_user + after.children_system - before.children_user - before.children_system)
    return Sample(requests_per_s=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
                  p50_ms=latency_ms(out, "50%"), p99_ms=latency_ms(out, "99%"), cpu_us_per_request=0.0,
                  generator_cpu=generator / seconds,
                  failures=int(re.search(r"bench-failures (\d+)", out).group(1)))


def latency_ms(wrk_output: str, percentile: str) -> float:
    value, unit = re.search(rf"^\s+{percentile}\s+([\d.]+)(us|ms|s)\s*$", wrk_output, re.MULTILINE).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def measure(process: subprocess.Popen[bytes], url: str, contender: Contender, era: str, seconds: float,
            connections: int) -> Sample:
    pid = server_pid(process)
    cpu_before = process_cpu_s(pid)
    sample = load(url, era, contender.token, seconds, connections)
    cpu = process_cpu_s(pid) - cpu_before
    sample.cpu_us_per_request = cpu / max(1.0, sample.requests_per_s * seconds) * 1e6
    return sample


# --- the contenders


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def ours(port: int) -> list[str]:
    """Our server as README runs it for replicas: stateless, JSON responses, product defaults otherwise."""
    return python(str(REPO / "server.py"), "--stateless", "--json-response", "--port", str(port))


def sign_in_token(server_url: str) -> str:
    """A real token, issued by our server through the Google stand-in."""
    from tests.signin import RawClient

    class Server:  # what RawClient needs of a running server
        base_url = server_url.removesuffix("/mcp")
        mcp_url = server_url

    return RawClient.register(Server()).sign_in()["access_token"]  # type: ignore[arg-type]


def contenders(workdir: Path, only: list[str]) -> tuple[list[Contender], contextlib.ExitStack]:
    stack = contextlib.ExitStack()
    chosen = [
        Contender("A raw Starlette", lambda port: python(str(BENCH / "contenders/raw_starlette.py"), str(port))),
        Contender("A+ uvloop httptools", lambda port: python(str(BENCH / "contenders/raw_starlette.py"), str(port),
                                                             "--fast")),
        Contender("SDK defaults", lambda port: python(str(BENCH / "contenders/bare_sdk.py"), str(port))),
        Contender("SDK tuned", lambda port: python(str(BENCH / "contenders/bare_sdk.py"), str(port), "--tuned")),
        Contender("ours auth off", ours),
        Contender("ours auth on SQLite", ours),
        Contender("ours auth on Redis", ours),
    ]
    chosen = [c for c in chosen if not only or any(c.name.startswith(prefix) for prefix in only)]
    if any("auth on" in c.name for c in chosen):
        from tests.conftest import PEERS, TEST_SECRET_KEY, Peers, RedisServer, install_peers
        from tests.signin import GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET, GoogleStandIn

        install_peers()
        google = GoogleStandIn(Peers(PEERS), workdir / "google")
        stack.callback(google.stop)
        for contender in chosen:
            if "auth on" not in contender.name:
                continue
            contender.env = {"GOOGLE_CLIENT_ID": GOOGLE_CLIENT_ID, "GOOGLE_CLIENT_SECRET": GOOGLE_CLIENT_SECRET,
                             "GOOGLE_DISCOVERY_URL": google.discovery_url, "SECRET_KEY": TEST_SECRET_KEY,
                             "ALLOWED_HOSTS": "127.0.0.1:*"}
            if "Redis" in contender.name:
                redis = RedisServer(workdir / "redis")
                stack.callback(redis.stop)
                contender.env["STORE_URL"] = f"{redis.url}?prefix=bench"
            contender.google = google
    return chosen, stack


def prepare_token(contender: Contender, url: str) -> None:
    if contender.google is None or contender.token:
        return
    contender.google.allow_callback(url.removesuffix("/mcp") + "/oauth/google/callback")
    contender.token = sign_in_token(url)


# --- the run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--eras", default=",".join(ERAS))
    parser.add_argument("--only", default="", help="comma-separated name prefixes of contenders to run")
    parser.add_argument("--quick", action="store_true", help="one round of one second")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    if args.quick:
        args.seconds, args.rounds = 1.0, 1
    if shutil.which("wrk") is None:
        print("bench: Debian's wrk is needed (apt-get install wrk)", file=sys.stderr)
        return 2
    eras = [era for era in args.eras.split(",") if era]
    workdir = Path(tempfile.mkdtemp(prefix="stream-http-bench-"))
    chosen, stack = contenders(workdir, [p.strip() for p in args.only.split(",") if p.strip()])
    samples: dict[tuple[str, str], list[Sample]] = {}
    with stack:
        for round_number in range(args.rounds):
            for contender in chosen:
                with running(contender, workdir) as (process, url):
                    for era in eras:
                        load(url, era, contender.token, min(1.0, args.seconds), args.connections)  # warm up
                        sample = measure(process, url, contender, era, args.seconds, args.connections)
                        samples.setdefault((contender.name, era), []).append(sample)
                print(f"round {round_number + 1}/{args.rounds}: {contender.name} done", file=sys.stderr)
    rows = report(chosen, eras, samples)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(row["failures"] == 0 for row in rows) else 1


def median(samples: list[Sample], attribute: str) -> float:
    return statistics.median(getattr(sample, attribute) for sample in samples)


def report(chosen: list[Contender], eras: list[str], samples: dict[tuple[str, str], list[Sample]]) -> list[dict]:
    rows = []
    for era in eras:
        base = {name: median(samples[(name, era)], "requests_per_s") for name in
                ("A raw Starlette", "SDK defaults", "SDK tuned") if (name, era) in samples}
        print(f"\nera {era}: stateless JSON, tools/call add, {len(next(iter(samples.values())))} round(s)")
        print(f"{'contender':<22}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU µs/req':>12}{'wrk CPU':>9}"
              f"{'xA':>7}{'xSDK def':>10}{'xSDK tuned':>12}")
        for contender in chosen:
            got = samples[(contender.name, era)]
            rps = median(got, "requests_per_s")
            ratios = [rps / base[name] if name in base else float("nan")
                      for name in ("A raw Starlette", "SDK defaults", "SDK tuned")]
            generator = median(got, "generator_cpu")
            row = {"contender": contender.name, "era": era, "requests_per_s": rps,
                   "p50_ms": median(got, "p50_ms"), "p99_ms": median(got, "p99_ms"),
                   "cpu_us_per_request": median(got, "cpu_us_per_request"), "generator_cpu": generator,
                   "ratio_a": ratios[0], "ratio_sdk_defaults": ratios[1], "ratio_sdk_tuned": ratios[2],
                   "failures": sum(sample.failures for sample in got)}
            rows.append(row)
            flag = "  (generator-bound)" if generator > 0.9 else ""
            print(f"{contender.name:<22}{rps:>9.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
                  f"{row['cpu_us_per_request']:>12.0f}{generator:>8.0%} {ratios[0]:>6.2f}{ratios[1]:>10.2f}"
                  f"{ratios[2]:>12.2f}{flag}{'  FAILURES ' + str(row['failures']) if row['failures'] else ''}")
    targets(rows)
    return rows


def targets(rows: list[dict]) -> None:
    """The issue's targets that this run can judge, each from ratios within the run."""
    by = {(row["contender"], row["era"]): row for row in rows}
    checks = []
    for era in {row["era"] for row in rows}:
        on, off = by.get(("ours auth on SQLite", era)), by.get(("ours auth off", era))
        redis, tuned = by.get(("ours auth on Redis", era)), by.get(("SDK tuned", era))
        defaults = by.get(("SDK defaults", era))
        if on and tuned:
            checks.append((f"{era}: auth on SQLite ≥ 0.95 x SDK tuned", on["requests_per_s"] / tuned["requests_per_s"],
                           0.95))
            checks.append((f"{era}: p99 ≤ 1.25 x SDK tuned's", tuned["p99_ms"] * 1.25 / max(on["p99_ms"], 1e-9),
                           1.0))
        if on and defaults:
            checks.append((f"{era}: auth on SQLite ≥ 2.0 x SDK defaults",
                           on["requests_per_s"] / defaults["requests_per_s"], 2.0))
        if on and off:
            checks.append((f"{era}: auth on ≥ 0.95 x auth off", on["requests_per_s"] / off["requests_per_s"], 0.95))
        if on and redis:
            checks.append((f"{era}: Redis ≥ 0.90 x SQLite", redis["requests_per_s"] / on["requests_per_s"], 0.90))
    if checks:
        print("\ntargets")
    for name, value, goal in sorted(checks):
        print(f"{'met ' if value >= goal else 'MISS'}  {name}: {value:.2f}")


if __name__ == "__main__":
    sys.exit(main())
