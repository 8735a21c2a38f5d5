"""Redis Sentinel and Redis Cluster on free loopback ports, for tests of the store's high-availability modes.

Debian's `redis-server` and `redis-cli`, each node in its own directory under the given one:

- `SentinelSet`: a primary, one replica and three sentinels (quorum 2) watching them, tuned so a failover
  after `kill_primary()` completes within a few seconds.
- `ClusterSet`: three primaries with one replica each, joined with `redis-cli --cluster create`, tuned so a
  replica takes over within a few seconds of `kill_primary_of(key)`.

Either can require a password and speak only TLS (a self-signed certificate for 127.0.0.1, made with
`openssl`), so the `rediss+` URL forms are tested too. A node can be killed (SIGKILL: its sockets close)
or paused (SIGSTOP: a network partition; clients wait for their timeouts) and resumed.

Both are context managers: every process they started is stopped when the block ends, a failing test
included, and a start that fails stops what it had started before it raises (with the nodes' logs).
Nothing here depends on pytest, so a scratch script can use them too.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import redis

HOST = "127.0.0.1"
SERVICE = "mymaster"
SLOTS = 16384
START_TIMEOUT_S = 20.0
T = TypeVar("T")

# What every data node shares: loopback only, nothing written to disk, a replica's first sync starts at
# once (Redis 7 waits 5 s by default for more replicas to share a diskless transfer), and a primary pings
# its replicas every second, not every 10: until the first ping moves a replica's offset past 0, Redis 7.0
# leaves it out of CLUSTER SLOTS.
COMMON_OPTIONS = ("--bind", HOST, "--protected-mode", "yes", "--save", "", "--appendonly", "no",
                  "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1")


def executable(name: str) -> str:
    """The path of a Redis program (`redis-server`, `redis-cli`), or an error that says how to get it."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if found is None:
        raise RuntimeError(f"{name} is needed for the Redis HA tests: apt-get install redis-server")
    return found


def free_port(taken: set[int]) -> int:
    """A loopback port the kernel just handed out for port 0, not one of `taken` (then added to it)."""
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def wait_until(check: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Poll `check` every 0.1 s until it returns something other than None or False; Redis errors and
    refused connections count as "not yet". TimeoutError naming `what` once `timeout_s` is up."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result is not None and result is not False:
                return result
        except (redis.RedisError, OSError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s (last error: {last_error!r})")
        time.sleep(0.1)


def ask(port: int, *command: Any, **options: Any) -> Any:
    """One command to the Redis (or sentinel) on this loopback port, decoded, with short timeouts;
    `options` are more `redis.Redis` arguments (password, ssl, ssl_ca_certs)."""
    with redis.Redis(host=HOST, port=port, decode_responses=True, socket_timeout=2, socket_connect_timeout=1,
                     **options) as client:
        return client.execute_command(*command)


def parse_info(reply: str | dict[str, Any]) -> dict[str, str]:
    """An INFO-style reply as text fields (redis-py parses INFO itself, not CLUSTER INFO)."""
    if isinstance(reply, dict):
        return {key: str(value) for key, value in reply.items()}
    return dict(line.split(":", 1) for line in reply.splitlines() if ":" in line)


def auth_part(username: str | None, password: str | None) -> str:
    """The `user:password@` part of a URL (empty without a password)."""
    if password is None:
        return ""
    return f"{username or ''}:{password}@"


@dataclass
class Tls:
    """A self-signed certificate for 127.0.0.1 that every node serves and every client trusts."""

    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path) -> Tls:
        directory.mkdir(parents=True, exist_ok=True)
        tls = cls(directory / "cert.pem", directory / "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-keyout", str(tls.key), "-out", str(tls.cert), "-subj", f"/CN={HOST}",
                        "-addext", f"subjectAltName=IP:{HOST}"], check=True, capture_output=True, timeout=30)
        return tls

    def server_args(self) -> list[str]:
        """TLS for clients and replication; clients need not present a certificate."""
        return ["--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
                "--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no", "--tls-replication", "yes"]

    def client_options(self) -> dict[str, Any]:
        """What `redis.Redis` (and the asyncio clients) need to trust the nodes."""
        return {"ssl": True, "ssl_ca_certs": str(self.cert)}

    def cli_args(self) -> list[str]:
        return ["--tls", "--cacert", str(self.cert)]


@dataclass
class RedisNode:
    """One `redis-server` process on a loopback port, in its own directory, logging to `node.log` there."""

    port: int
    workdir: Path
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def alive(self) -> bool:
        """Running and not paused: a node that can answer."""
        return self.process is not None and self.process.poll() is None and not self.paused

    def start(self, *extra: str) -> None:
        """Start the process (again) with its arguments and `extra` ones; returns at once."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "node.log").open("ab") as log:
            self.process = subprocess.Popen([executable("redis-server"), *self.args, *extra], cwd=self.workdir,
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def kill(self) -> None:
        """SIGKILL: the node vanishes as a crashed machine would; its sockets close, so clients are told."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the node stops answering but keeps its sockets open, as behind a network partition
        (clients wait for their timeouts; the kernel still accepts new connections)."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """SIGCONT: the partition heals; the node goes on as it was (a primary still thinks it is one)."""
        if self.process is not None and self.paused:
            self.process.send_signal(signal.SIGCONT)
            self.paused = False

    def terminate(self) -> None:
        """SIGTERM (a clean shutdown, resumed first if paused); `reap` waits for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.resume()

    def reap(self) -> None:
        """Wait for the process to exit, SIGKILL after 5 s."""
        if self.process is not None:
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def stop(self) -> None:
        self.terminate()
        self.reap()

    def log(self, lines: int = 30) -> str:
        path = self.workdir / "node.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def stop_all(nodes: Iterable[RedisNode]) -> None:
    """SIGTERM to each node, then wait for each (SIGKILL after 5 s)."""
    nodes = list(nodes)
    for node in nodes:
        node.terminate()
    for node in nodes:
        node.reap()


class NodeSet:
    """Nodes started together and stopped together, a failed start included; with an optional password
    (requirepass and masterauth on every data node) and optional TLS (then only TLS: `port 0`)."""

    def __init__(self, workdir: Path, *, password: str | None = None, tls: bool = False) -> None:
        self.workdir = workdir
        self.password = password
        self.tls = Tls.make(workdir / "tls") if tls else None
        self.taken: set[int] = set()
        self.nodes: dict[int, RedisNode] = {}
        self.failed: list[int] = []

    # --- what clients need

    @property
    def scheme(self) -> str:
        return "rediss" if self.tls else "redis"

    @property
    def client_options(self) -> dict[str, Any]:
        """`redis.Redis` arguments that reach a data node: its password, and TLS with the CA to trust."""
        return {"password": self.password, **(self.tls.client_options() if self.tls else {})}

    def ask(self, port: int, *command: Any) -> Any:
        return ask(port, *command, **self.client_options)

    def info(self, port: int, section: str) -> dict[str, str]:
        return parse_info(self.ask(port, "INFO", section))

    def role(self, port: int) -> str:
        """"master" or "slave", as the node itself says."""
        return self.ask(port, "ROLE")[0]

    # --- nodes

    def listen_args(self, port: int) -> list[str]:
        """Listen on `port`, in plain text or (with TLS) only over TLS."""
        if self.tls is None:
            return ["--port", str(port)]
        return ["--port", "0", "--tls-port", str(port), *self.tls.server_args()]

    def auth_args(self) -> list[str]:
        if self.password is None:
            return []
        return ["--requirepass", self.password, "--masterauth", self.password]

    def new_node(self, name: str, args: Callable[[int, Path], Iterable[str]]) -> RedisNode:
        """A node on a free port, in directory `name-port`, with `args(port, directory)`; not started."""
        port = free_port(self.taken)
        workdir = self.workdir / f"{name}-{port}"
        workdir.mkdir(parents=True, exist_ok=True)
        node = RedisNode(port, workdir, [*args(port, workdir)])
        self.nodes[port] = node
        return node

    def alive_ports(self) -> list[int]:
        return [port for port, node in self.nodes.items() if node.alive]

    def logs(self) -> str:
        return "\n".join(f"--- {node.workdir.name}\n{node.log()}" for node in self.nodes.values())

    # --- life cycle

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop every node this set started (those already dead are skipped), all at once."""
        stop_all(self.nodes.values())

    def __enter__(self) -> NodeSet:
        try:
            self.start()
        except BaseException as exc:
            self.stop()
            if isinstance(exc, Exception):
                raise RuntimeError(f"{type(self).__name__} did not start: {exc}\n{self.logs()}") from exc
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


class SentinelSet(NodeSet):
    """A primary, one replica and three sentinels (quorum 2) on loopback.

    A sentinel marks the primary down after `down_after_ms` without an answer; two agreeing make it
    objectively down, one of them is elected and promotes the replica. With the defaults a failover
    completes about 2 to 4 s after `kill_primary()`. `password` protects the data nodes,
    `sentinel_password` the sentinels (they then use it with each other too).
    """

    def __init__(self, workdir: Path, *, service: str = SERVICE, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 3000, password: str | None = None,
                 sentinel_password: str | None = None, tls: bool = False) -> None:
        super().__init__(workdir, password=password, tls=tls)
        self.service, self.down_after_ms, self.failover_timeout_ms = service, down_after_ms, failover_timeout_ms
        self.sentinel_password = sentinel_password
        self.data_ports: list[int] = []
        self.sentinel_ports: list[int] = []

    def __enter__(self) -> SentinelSet:
        super().__enter__()
        return self

    # --- addresses

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """The sentinels' (host, port) pairs, as `redis.asyncio.sentinel.Sentinel` takes them."""
        return [(HOST, port) for port in self.sentinel_ports]

    @property
    def sentinel_options(self) -> dict[str, Any]:
        """`redis.Redis` arguments that reach a sentinel (Sentinel's `sentinel_kwargs`)."""
        return {"password": self.sentinel_password, **(self.tls.client_options() if self.tls else {})}

    @property
    def url(self) -> str:
        """`redis[s]+sentinel://[:password@]host:port,host:port,host:port/service/0` (the password is the
        data nodes'; a sentinel password has no place in this form)."""
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"{self.scheme}+sentinel://{auth_part(None, self.password)}{hosts}/{self.service}/0"

    # --- starting

    def data_args(self, port: int) -> list[str]:
        return [*self.listen_args(port), *COMMON_OPTIONS, *self.auth_args()]

    def sentinel_args(self, port: int, workdir: Path, primary_port: int) -> list[str]:
        """A sentinel's config file, written where it may rewrite it (sentinels record what they learn)."""
        config = workdir / "sentinel.conf"
        config.write_text(self.sentinel_config(port, primary_port))
        return [str(config), "--sentinel"]

    def sentinel_config(self, port: int, primary_port: int) -> str:
        if self.tls is None:
            lines = [f"port {port}"]
        else:
            lines = ["port 0", f"tls-port {port}", f"tls-cert-file {self.tls.cert}", f"tls-key-file {self.tls.key}",
                     f"tls-ca-cert-file {self.tls.cert}", "tls-auth-clients no", "tls-replication yes"]
        lines += [f"bind {HOST}", "protected-mode yes", f"dir {self.workdir}",
                  f"sentinel monitor {self.service} {HOST} {primary_port} 2",
                  f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
                  f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}",
                  f"sentinel parallel-syncs {self.service} 1"]
        if self.password is not None:
            lines.append(f"sentinel auth-pass {self.service} {self.password}")
        if self.sentinel_password is not None:
            lines += [f"requirepass {self.sentinel_password}", f"sentinel sentinel-pass {self.sentinel_password}"]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Primary, then the replica (synced), then the sentinels; returns once every sentinel knows the
        replica and the two other sentinels, so a failover can reach its quorum."""
        primary = self.new_node("primary", lambda port, _: self.data_args(port))
        replica = self.new_node("replica", lambda port, _: [*self.data_args(port), "--replicaof", HOST,
                                                            str(primary.port)])
        self.data_ports = [primary.port, replica.port]
        primary.start()
        replica.start()
        wait_until(lambda: self.info(replica.port, "replication").get("master_link_status") == "up",
                   START_TIMEOUT_S, "the replica's first sync")
        for _ in range(3):
            node = self.new_node("sentinel", lambda port, workdir: self.sentinel_args(port, workdir, primary.port))
            self.sentinel_ports.append(node.port)
            node.start()
        for port in self.sentinel_ports:
            wait_until(lambda port=port: self.sentinel_sees_everyone(port), START_TIMEOUT_S,
                       f"sentinel {port} to see the replica and the other sentinels")

    def sentinel_sees_everyone(self, port: int) -> bool:
        state = self.ask_sentinel(port, "SENTINEL", "MASTER", self.service)
        fields = dict(zip(state[::2], state[1::2], strict=True)) if isinstance(state, list) else state
        return int(fields["num-other-sentinels"]) == 2 and int(fields["num-slaves"]) == 1

    # --- looking

    def ask_sentinel(self, port: int, *command: Any) -> Any:
        return ask(port, *command, **self.sentinel_options)

    def primary_port_per_sentinel(self) -> list[int]:
        """The primary's port as each live sentinel names it."""
        return [int(self.ask_sentinel(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)[1])
                for port in self.sentinel_ports if self.nodes[port].alive]

    def current_primary_port(self) -> int:
        """The primary's port, as the first sentinel that answers names it."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError, OSError):
                return int(self.ask_sentinel(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)[1])
        raise RuntimeError("no sentinel answers")

    def replica_port(self) -> int:
        """The data node that is not the current primary."""
        primary = self.current_primary_port()
        return next(port for port in self.data_ports if port != primary)

    # --- failing

    def kill_primary(self) -> int:
        """SIGKILL the current primary's process; its port."""
        port = self.current_primary_port()
        self.nodes[port].kill()
        self.failed.append(port)
        return port

    def pause_primary(self) -> int:
        """SIGSTOP the current primary (a partition: it is still a primary when resumed); its port."""
        port = self.current_primary_port()
        self.nodes[port].pause()
        self.failed.append(port)
        return port

    def wait_for_failover(self, timeout_s: float = 20.0, old_port: int | None = None) -> int:
        """Wait until every live sentinel names a primary other than `old_port` (default: the last one
        killed or paused) and that node says it is a master; its port."""
        old = old_port if old_port is not None else self.failed[-1]

        def promoted() -> int | None:
            named = set(self.primary_port_per_sentinel())
            if len(named) != 1 or old in named:
                return None
            port = named.pop()
            return port if self.role(port) == "master" else None

        return wait_until(promoted, timeout_s, f"a failover away from {old}")

    def revive(self, port: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start a killed data node again, as a replica of the current primary; returns once it is synced."""
        primary = self.current_primary_port()
        self.nodes[port].start("--replicaof", HOST, str(primary))
        wait_until(lambda: self.info(port, "replication").get("master_link_status") == "up", timeout_s,
                   f"node {port} to sync from {primary}")

    def stop(self) -> None:
        """Sentinels first, so none starts a failover while the data nodes go."""
        stop_all(self.nodes[port] for port in self.sentinel_ports)
        super().stop()


@dataclass
class SlotRange:
    """A range of hash slots and the ports serving it, primary first (from `CLUSTER SLOTS`)."""

    start: int
    end: int
    ports: list[int] = field(default_factory=list)

    @property
    def primary(self) -> int:
        return self.ports[0]


class ClusterSet(NodeSet):
    """A Redis Cluster of `primaries` primaries with one replica each, on loopback.

    Every node binds 127.0.0.1 and announces it, with a cluster bus port of its own (`cluster-port`, so
    port + 10000 need not be free). A primary that stops answering is failed after `node_timeout_ms`
    and its replica takes its slots, about 2 to 3 s after `kill_primary_of(key)` with the defaults.
    """

    def __init__(self, workdir: Path, *, primaries: int = 3, node_timeout_ms: int = 1000,
                 password: str | None = None, tls: bool = False) -> None:
        super().__init__(workdir, password=password, tls=tls)
        self.primaries, self.node_timeout_ms = primaries, node_timeout_ms

    def __enter__(self) -> ClusterSet:
        super().__enter__()
        return self

    @property
    def seeds(self) -> list[tuple[str, int]]:
        """Every node's (host, port)."""
        return [(HOST, port) for port in self.nodes]

    @property
    def url(self) -> str:
        """`redis[s]+cluster://[:password@]127.0.0.1:p1,127.0.0.1:p2,...` naming every node."""
        hosts = ",".join(f"{host}:{port}" for host, port in self.seeds)
        return f"{self.scheme}+cluster://{auth_part(None, self.password)}{hosts}"

    def node_args(self, port: int) -> list[str]:
        return [*self.listen_args(port), *(["--tls-cluster", "yes"] if self.tls else []),
                "--cluster-port", str(free_port(self.taken)), *COMMON_OPTIONS, *self.auth_args(),
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-announce-ip", HOST]

    def start(self) -> None:
        """Six nodes, `redis-cli --cluster create ... --cluster-replicas 1`; returns once healthy and
        every replica is synced."""
        for _ in range(self.primaries * 2):
            self.new_node("node", lambda port, _: self.node_args(port)).start()
        for port in self.nodes:
            wait_until(lambda port=port: self.ask(port, "PING"), START_TIMEOUT_S, f"node {port} to answer")
        auth = ["--no-auth-warning", "-a", self.password] if self.password else []
        command = [executable("redis-cli"), *auth, *(self.tls.cli_args() if self.tls else []),
                   "--cluster", "create", *(f"{HOST}:{port}" for port in self.nodes),
                   "--cluster-replicas", "1", "--cluster-yes"]
        created = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False)
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}{created.stderr}")
        self.wait_until_healthy(START_TIMEOUT_S)
        wait_until(self.replicas_synced, START_TIMEOUT_S, "every primary's replica to sync")

    # --- looking

    def slot_ranges(self, port: int | None = None) -> list[SlotRange]:
        """The slot map as the node on `port` (default: the first live one) sees it."""
        port = port or self.alive_ports()[0]
        return [SlotRange(int(start), int(end), [int(node[1]) for node in nodes])
                for start, end, *nodes in self.ask(port, "CLUSTER", "SLOTS")]

    def replicas_synced(self) -> bool:
        """Every slot range has a replica, and each replica's link to its primary is up."""
        ranges = self.slot_ranges()
        return all(len(r.ports) > 1 for r in ranges) and all(
            self.info(port, "replication").get("master_link_status") == "up" for r in ranges for port in r.ports[1:])

    def healthy_on(self, port: int) -> bool:
        """This node says cluster_state:ok, and its map has every slot served by a live primary that
        says it is one."""
        if parse_info(self.ask(port, "CLUSTER", "INFO")).get("cluster_state") != "ok":
            return False
        ranges = self.slot_ranges(port)
        if sum(r.end - r.start + 1 for r in ranges) != SLOTS:
            return False
        alive = set(self.alive_ports())
        return all(r.primary in alive and self.role(r.primary) == "master" for r in ranges)

    def wait_until_healthy(self, timeout_s: float = 20.0) -> float:
        """Wait until every live node is `healthy_on` (so a client asking any of them gets a good map);
        the seconds it took (after a kill: how long the failover took, give or take 0.1 s)."""
        started = time.monotonic()
        wait_until(lambda: all(self.healthy_on(port) for port in self.alive_ports()), timeout_s,
                   "the cluster to be healthy")
        return time.monotonic() - started

    def primary_of(self, key: str) -> int:
        """The port of the primary that serves `key`'s slot."""
        slot = int(self.ask(self.alive_ports()[0], "CLUSTER", "KEYSLOT", key))
        return next(r.primary for r in self.slot_ranges() if r.start <= slot <= r.end)

    def replica_of(self, key: str) -> int:
        """The port of a replica of the primary that serves `key`'s slot."""
        slot = int(self.ask(self.alive_ports()[0], "CLUSTER", "KEYSLOT", key))
        return next(r.ports[1] for r in self.slot_ranges() if r.start <= slot <= r.end)

    # --- failing

    def kill_primary_of(self, key: str) -> int:
        """SIGKILL the primary serving `key`; its port."""
        port = self.primary_of(key)
        self.nodes[port].kill()
        self.failed.append(port)
        return port

    def pause_primary_of(self, key: str) -> int:
        """SIGSTOP the primary serving `key` (a partition); its port."""
        port = self.primary_of(key)
        self.nodes[port].pause()
        self.failed.append(port)
        return port

    def revive(self, port: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start a killed node again (it keeps its nodes.conf, so it rejoins, as a replica now)."""
        self.nodes[port].start()
        wait_until(lambda: self.role(port) == "slave" and
                   self.info(port, "replication").get("master_link_status") == "up",
                   timeout_s, f"node {port} to rejoin as a synced replica")
