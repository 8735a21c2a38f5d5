"""What every part of the benchmark shares: the contenders, how one is started on its own port and CPU,
how a request of each era looks, and what the kernel says about a process (CPU time, memory, files)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BENCH = REPO / "bench"
CONTENDERS = BENCH / "contenders"
PEERS = REPO / "tests" / "peers"
ERAS = ("legacy", "2026-07-28")
LEGACY_VERSION = "2025-11-25"
MODES = {"json": "stateless JSON", "sse": "stateless SSE", "stateful": "stateful JSON, one session"}
FASTMCP_WANTED, FASTMCP_FALLBACK = "fastmcp>=4.2,<4.3", "fastmcp==4.1.0"  # the fallback: what installed before
TICKS = os.sysconf("SC_CLK_TCK")
SERVER_CPU, LOAD_CPU = "0", "1"
STARTUP_TIMEOUT_S = 180  # FastMCP's environment is built on first use


@dataclass
class Contender:
    """One server under test. `command(port, mode)` starts it; it serves `modes` and `eras`."""

    name: str
    command: Callable[[int, str], list[str]]
    modes: tuple[str, ...] = ("json",)
    eras: tuple[str, ...] = ERAS
    env: dict[str, str] = field(default_factory=dict)
    token: str = ""
    google: Any = None  # the Google stand-in that signs in for a token, with sign-in on
    store: str = ""  # its own Redis for our server: "redis" (one server), "sentinel" or "cluster"
    store_query: str = ""  # more of its STORE_URL's query
    throughput: bool = True  # measured in the throughput part (else only where named, as in rates)
    port: int = field(default_factory=lambda: free_port())  # the same every round: tokens name it

    def serves(self, mode: str, era: str) -> bool:
        return mode in self.modes and era in self.eras and not (mode == "stateful" and era != "legacy")


def pinned(cpu: str, command: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *command] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else command


@functools.cache
def setting_names() -> frozenset[str]:
    sys.path.insert(0, str(REPO))
    import server

    return frozenset(option.env for option in server.OPTIONS)


def environment_without_settings() -> dict[str, str]:
    """This process's environment without any of the server's settings, and with no settings file: every
    contender runs with the settings the benchmark gives it, whatever the person exported or keeps in .env."""
    return {**{key: value for key, value in os.environ.items() if key not in setting_names()}, "ENV_FILE": ""}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running(contender: Contender, workdir: Path, mode: str = "json",
            ) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The contender serving `mode` on its port, pinned to the server CPU, checked to answer `add`."""
    port = contender.port
    log = (workdir / f"{contender.name}.log").open("ab")
    env = {**environment_without_settings(), "DATA_DIR": str(workdir / contender.name), **contender.env}
    process = subprocess.Popen(pinned(SERVER_CPU, contender.command(port, mode)), cwd=REPO, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        wait_until_listening(url, contender, process)
        prepare_token(contender, url)
        answer_once(url, contender, mode)
        yield process, url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_listening(url: str, contender: Contender, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
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


def request_headers(era: str, token: str = "", session: str = "") -> dict[str, str]:
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream",
               "mcp-protocol-version": LEGACY_VERSION if era == "legacy" else era}
    if era != "legacy":
        headers |= {"mcp-method": "tools/call", "mcp-name": "add"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    if session:
        headers["mcp-session-id"] = session
    return headers


def request_body(era: str, method: str = "tools/call", params: dict[str, Any] | None = None,
                 request_id: int = 1) -> dict[str, Any]:
    params = dict(params if params is not None else {"name": "add", "arguments": {"a": 2, "b": 3}})
    if era != "legacy":
        params["_meta"] = {"io.modelcontextprotocol/protocolVersion": era,
                           "io.modelcontextprotocol/clientCapabilities": {}}
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


def initialize_body(client_name: str = "bench") -> dict[str, Any]:
    """A handshake-era `initialize` request."""
    return request_body("legacy", "initialize", {"protocolVersion": LEGACY_VERSION, "capabilities": {},
                                                 "clientInfo": {"name": client_name, "version": "1"}})


def json_rpc_answer(response: httpx2.Response) -> dict[str, Any]:
    """The JSON-RPC message of a JSON or single-event SSE response."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        return json.loads(data[-1]) if data and data[-1] else {}
    return response.json()


def open_session(client: httpx2.Client, url: str, token: str = "") -> str:
    """A handshake-era session: initialize, then notifications/initialized; its Mcp-Session-Id."""
    headers = request_headers("legacy", token)
    response = client.post(url, headers=headers, json=initialize_body())
    session = response.headers.get("mcp-session-id", "")
    if response.status_code != 200 or not session:
        raise RuntimeError(f"initialize answered {response.status_code}: {response.text[:300]}")
    client.post(url, headers=request_headers("legacy", token, session),
                json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    return session


def answer_once(url: str, contender: Contender, mode: str) -> None:
    """The contender answers `add` correctly in every era it serves: a benchmark of errors is worthless."""
    with httpx2.Client(timeout=30) as client:
        for era in contender.eras:
            if not contender.serves(mode, era):
                continue
            session = open_session(client, url, contender.token) if mode == "stateful" else ""
            response = client.post(url, json=request_body(era), headers=request_headers(era, contender.token, session))
            result = json_rpc_answer(response).get("result") or {}
            if (result.get("structuredContent") or {}).get("result") != 5:
                raise RuntimeError(f"{contender.name} ({mode}, {era}) answered {response.status_code}: "
                                   f"{response.text[:300]}")


# --- what the kernel says about a process


def server_pid(process: subprocess.Popen[bytes]) -> int:
    """The server itself, under `taskset`'s exec (same pid) or `uv run`'s child."""
    pid = process.pid
    for _ in range(3):
        kids = [kid for task in Path(f"/proc/{pid}/task").iterdir()  # any thread may have started it
                for kid in (task / "children").read_text().split()]
        if not kids:
            return pid
        pid = int(kids[0])
    return pid


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of `pid` and its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- the contenders


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def ours(port: int, mode: str, script: Path = REPO / "server.py") -> list[str]:
    """Our server with product defaults but for the mode: stateless JSON as README runs replicas."""
    flags = {"json": ["--stateless", "--json-response"], "sse": ["--stateless"], "stateful": ["--json-response"]}
    return python(str(script), *flags[mode], "--port", str(port))


def ours_at(revision: str, workdir: Path) -> Callable[[int, str], list[str]]:
    """Our server as it was at a git revision, to measure what a change costs in the same run."""
    script = workdir / f"server-{revision}.py"
    script.write_bytes(subprocess.run(["git", "show", f"{revision}:server.py"], cwd=REPO, capture_output=True,
                                      check=True).stdout)
    return lambda port, mode: ours(port, mode, script)


def bare_sdk(*extra: str) -> Callable[[int, str], list[str]]:
    return lambda port, mode: python(str(CONTENDERS / "bare_sdk.py"), str(port), f"--{mode}", *extra)


def ts_sdk(port: int, mode: str) -> list[str]:
    from tests.conftest import Peers

    return [Peers(PEERS).node22, str(CONTENDERS / "ts_sdk.cjs"), str(port), str(PEERS)]


def in_fastmcp_env(requirement: str, *args: str) -> list[str]:
    """A command in an environment of FastMCP's own (it pins its own `mcp`), built by uv on first use."""
    return ["uv", "run", "--no-project", "--isolated", "--quiet", "--with", requirement, "python", *args]


@functools.cache
def fastmcp_release() -> tuple[str, str]:
    """The FastMCP release the bench runs: the newest 4.2.x when it installs from the registry here, else
    4.1.0. Its requirement and its version."""
    for requirement in (FASTMCP_WANTED, FASTMCP_FALLBACK):
        found = subprocess.run(in_fastmcp_env(requirement, "-c", "import fastmcp; print(fastmcp.__version__)"),
                               capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S, check=False)
        if found.returncode == 0 and found.stdout.strip():
            return requirement, found.stdout.strip().splitlines()[-1]
        print(f"bench: {requirement} does not install here: {found.stderr.strip()[-300:]}", file=sys.stderr)
    raise RuntimeError("FastMCP installs in no version the bench knows")


def fastmcp(port: int, mode: str) -> list[str]:
    return in_fastmcp_env(fastmcp_release()[0], str(CONTENDERS / "fastmcp_server.py"), str(port))


def is_fastmcp(name: str) -> bool:
    return name.startswith("FastMCP")


BENCH_TOKEN = "bench-token-for-the-in-memory-verifier"
ALL_MODES = tuple(MODES)


def all_contenders() -> list[Contender]:
    raw = str(CONTENDERS / "raw_starlette.py")
    return [
        Contender("A raw Starlette", lambda port, mode: python(raw, str(port))),
        Contender("A+ uvloop httptools", lambda port, mode: python(raw, str(port), "--fast")),
        Contender("SDK defaults", bare_sdk(), modes=ALL_MODES),
        Contender("SDK tuned", bare_sdk("--tuned"), modes=ALL_MODES),
        Contender("SDK tuned + bearer", bare_sdk("--tuned", "--bearer", BENCH_TOKEN), token=BENCH_TOKEN),
        Contender("TS SDK", ts_sdk, eras=("legacy",)),
        Contender("FastMCP", fastmcp),  # named by its version once chosen (chosen_contenders)
        Contender("ours auth off", ours, modes=ALL_MODES),
        Contender("ours auth on SQLite", ours, modes=ALL_MODES),
        Contender("ours auth on Redis", ours, modes=ALL_MODES, store="redis"),
        # A primary, a replica and three sentinels; then without waiting for the replica after each write,
        # to show what that WAIT costs (in the rates part: the throughput part writes nothing).
        Contender("ours auth on Sentinel", ours, store="sentinel"),
        Contender("ours auth on Sentinel, no WAIT", ours, store="sentinel", store_query="&replica_wait_ms=0",
                  throughput=False),
        Contender("ours auth on Cluster", ours, store="cluster"),  # three primaries with a replica each
        Contender("ours auth on Cluster, no WAIT", ours, store="cluster", store_query="&replica_wait_ms=0",
                  throughput=False),
        Contender("ours metrics on", ours, env={"METRICS_PORT": str(free_port())}),  # auth on, SQLite
        # The tuned SDK again, in a process of its own, last in each mode: its ratio to "SDK tuned" (the pair
        # as far apart as any ratio's) is this run's noise floor.
        Contender("SDK tuned again", bare_sdk("--tuned"), modes=ALL_MODES),
    ]


def chosen_contenders(workdir: Path, only: list[str], baseline: str | None = None, *, throughput: bool = False,
                      ) -> tuple[list[Contender], contextlib.ExitStack]:
    """The contenders whose names start with one of `only` (all when empty; with `throughput`, only those
    measured there), with what they need running: the npm peers for the TypeScript SDK, and for sign-in the
    Google stand-in and each one's Redis. With `baseline`, also our server at that git revision, signed in on
    SQLite."""
    stack = contextlib.ExitStack()
    contenders = [c for c in all_contenders() if c.throughput or not throughput]
    if baseline:
        contenders.append(Contender(f"ours @{baseline} auth on", ours_at(baseline, workdir)))
    chosen = [c for c in contenders if not only or any(c.name.startswith(prefix) for prefix in only)]
    for contender in chosen:
        if is_fastmcp(contender.name):
            contender.name = f"FastMCP {fastmcp_release()[1]}"
    if any(c.name in ("TS SDK",) or signs_in(c) for c in chosen):
        from tests.conftest import install_peers

        install_peers()
    for contender in chosen:
        if contender.name.startswith("ours"):
            contender.env["MAX_SESSIONS"] = "20000"
    if any(signs_in(c) for c in chosen):
        stack.enter_context(signed_in(workdir, [c for c in chosen if signs_in(c)]))
    return chosen, stack


def signs_in(contender: Contender) -> bool:
    return "auth on" in contender.name or contender.name == "ours metrics on"


# One token and one person here make more requests than any real one: the budgets stay on (their cost is
# measured) but so high that the load never meets them.
UNREACHABLE_BUDGETS = {name: str(10**9) for name in ("RATE_LIMIT_MCP", "RATE_LIMIT_CLIENT", "RATE_LIMIT_PERSON",
                                                     "RATE_LIMIT_REGISTER")}


@contextlib.contextmanager
def redis_of(kind: str, workdir: Path) -> Iterator[str]:
    """A Redis of this kind on loopback, for as long as the block runs: its STORE_URL (without a query). A
    single server as the tests start it (append-only), or Sentinel or Cluster from tests/redis_ha.py."""
    from tests.conftest import RedisServer
    from tests.redis_ha import ClusterSet, SentinelSet

    if kind == "redis":
        redis = RedisServer(workdir)
        try:
            yield redis.url
        finally:
            redis.stop()
        return
    with (SentinelSet(workdir) if kind == "sentinel" else ClusterSet(workdir)) as nodes:
        yield nodes.url


@contextlib.contextmanager
def signed_in(workdir: Path, contenders: list[Contender]) -> Iterator[None]:
    """Sign-in on for these contenders: the Google stand-in, and a Redis of its own for each that names one."""
    from tests.conftest import PEERS as PEERS_DIR
    from tests.conftest import TEST_SECRET_KEY, Peers
    from tests.signin import GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET, GoogleStandIn

    with contextlib.ExitStack() as stack:
        google = GoogleStandIn(Peers(PEERS_DIR), workdir / "google")
        stack.callback(google.stop)
        for contender in contenders:
            contender.env |= {"GOOGLE_CLIENT_ID": GOOGLE_CLIENT_ID, "GOOGLE_CLIENT_SECRET": GOOGLE_CLIENT_SECRET,
                              "GOOGLE_DISCOVERY_URL": google.discovery_url, "SECRET_KEY": TEST_SECRET_KEY,
                              "ALLOWED_HOSTS": "127.0.0.1:*", **UNREACHABLE_BUDGETS}
            if contender.store:
                url = stack.enter_context(redis_of(contender.store, workdir / f"{contender.store}-{contender.port}"))
                contender.env["STORE_URL"] = f"{url}?prefix=bench{contender.store_query}"
            contender.google = google
        yield


class ServerAt:
    """What tests.signin's RawClient needs of a running server."""

    def __init__(self, mcp_url: str) -> None:
        self.mcp_url = mcp_url
        self.base_url = mcp_url.removesuffix("/mcp")


def prepare_token(contender: Contender, url: str) -> None:
    """A real token, issued by our server through the Google stand-in (once: the store keeps it)."""
    if contender.google is None or contender.token:
        return
    from tests.signin import RawClient

    contender.google.allow_callback(url.removesuffix("/mcp") + "/oauth/google/callback")
    contender.token = RawClient.register(ServerAt(url)).sign_in()["access_token"]  # type: ignore[arg-type]
