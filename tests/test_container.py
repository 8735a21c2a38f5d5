"""The container image, built by podman from the Dockerfile on a base made of Debian packages, then run
from its own filesystem as its own user, with its entrypoint, command and environment.

This machine can build images but not run containers (no registry to pull from; runtimes cannot set
their limits here), so the image's root filesystem is mounted and the entrypoint runs under `chroot`
as the image's user: the same files, user, environment and working directory a container would have,
in the host's network, where the Google stand-in is."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

import server as server_module
from tests.conftest import REPO, ServerProcess, eventually, free_port, start_server
from tests.signin import ALICE, GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET, GoogleStandIn, RawClient, mcp_call

pytestmark = pytest.mark.store_of_its_own
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # for a build behind a TLS-inspecting proxy
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"


def run(*command: str, timeout_s: float = 600) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def needed(program: str) -> str:
    path = shutil.which(program) or (f"/usr/sbin/{program}" if Path(f"/usr/sbin/{program}").exists() else None)
    if path is None:
        pytest.fail(f"{program} is needed to build the image: apt-get install {program} (.ci/run does)")
    return path


def uv_binary() -> str:
    """The uv that runs the tests (`uv run` names itself in $UV), for the image's build stage."""
    found = os.environ.get("UV") or shutil.which("uv")
    if not found:
        pytest.fail("uv is needed to build the image's environment")
    path = Path(found).resolve()
    if path.read_bytes()[:4] != b"\x7fELF":  # a shim (pyenv's) rather than the program: ask uv itself
        path = Path(run(str(path), "run", "--no-project", "--python", sys.executable, "python", "-c",
                        "import os; print(os.environ['UV'])").strip())
    return str(path)


@dataclass
class Image:
    tag: str
    config: dict[str, Any]
    history: list[dict[str, Any]]
    size: int


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    podman, mmdebstrap = needed("podman"), needed("mmdebstrap")
    work = tmp_path_factory.mktemp("image")
    suffix = f"{os.getpid()}-{int(time.time())}"
    base, uv, tag = (f"localhost/stream-http-test-{name}:{suffix}" for name in ("base", "uv", "image"))
    run(mmdebstrap, "--quiet", "--variant=minbase", "--include=python3,ca-certificates", "bookworm",
        str(work / "base.tar"))
    (work / "uv").mkdir()
    shutil.copy(uv_binary(), work / "uv" / "uv")
    run("tar", "-C", str(work / "uv"), "-cf", str(work / "uv.tar"), "uv")
    try:
        run(podman, "import", "--quiet", str(work / "base.tar"), base)
        run(podman, "import", "--quiet", str(work / "uv.tar"), uv)
        run(podman, "build", "--quiet", "--format", "docker", "--isolation=chroot", "--build-arg",
            f"BASE_IMAGE={base}", "--build-arg", f"UV_IMAGE={uv}", "--secret",
            f"id=ca-certificates,src={CA_BUNDLE}", "-t", tag, str(REPO))
        inspected = json.loads(run(podman, "image", "inspect", tag))[0]
        history = json.loads(run(podman, "history", "--format", "json", tag))
        config = {**inspected["Config"], "Healthcheck": inspected.get("Healthcheck")}  # podman lists it apart
        yield Image(tag, config, history, int(inspected["Size"]))
    finally:
        subprocess.run([podman, "rmi", "--force", tag, uv, base], capture_output=True, check=False)


@pytest.fixture
def root(image: Image) -> Iterator[Path]:
    """The root filesystem of a new container of the image (created, never started)."""
    podman = needed("podman")
    container = run(podman, "create", image.tag).strip()
    try:
        yield Path(run(podman, "mount", container).strip())
    finally:
        subprocess.run([podman, "rm", "--force", container], capture_output=True, check=False)


def entrypoint(image: Image, root: Path, env: dict[str, str], *command: str) -> list[str]:
    """What the container runtime would run: the entrypoint and command, as the image's user, in its
    working directory, with its environment under `env`."""
    user = image.config["User"]
    workdir = image.config.get("WorkingDir") or "/"
    return [CHROOT, f"--userspec={user}", str(root), "/bin/sh", "-c", f'cd {workdir} && exec "$@"', "sh",
            *(command or (*image.config.get("Entrypoint", []), *(image.config.get("Cmd") or [])))]


def image_env(image: Image, **overrides: str) -> dict[str, str]:
    env = dict(item.split("=", 1) for item in image.config.get("Env", []))
    return {**env, **overrides}


def test_the_image_is_small_runs_unprivileged_and_keeps_its_data_in_a_volume(image: Image) -> None:
    config = image.config
    assert config["User"] == "10001:10001"
    assert "/data" in config["Volumes"]
    env = image_env(image)
    assert env["HOST"] == "0.0.0.0" and env["DATA_DIR"] == "/data" and env["LOG_FORMAT"] == "json"
    assert config["Entrypoint"] == ["/app/.venv/bin/python", "/app/server.py"]
    assert config["Healthcheck"]["Test"][0] == "CMD" and "/healthz" in " ".join(config["Healthcheck"]["Test"])
    assert config["StopSignal"] == "SIGTERM"
    layers = [layer for layer in image.history if layer.get("size", 0) > 0]
    assert len(layers) == 4, layers  # the base, the environment, server.py, the user
    assert not any("/uv " in (layer.get("CreatedBy") or layer.get("createdBy") or "") for layer in layers)
    print(f"image: {image.size / 1e6:.0f} MB in {len(layers)} layers:",
          ", ".join(f"{layer['size'] / 1e6:.1f} MB" for layer in layers))


def test_its_defaults_refuse_to_serve_everyone_without_sign_in(image: Image, root: Path) -> None:
    result = subprocess.run(entrypoint(image, root, {}), env=image_env(image, PORT=str(free_port())),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without sign-in" in result.stderr


def test_the_image_serves_signs_in_and_stops_cleanly(image: Image, root: Path, google: GoogleStandIn,
                                                    tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    base_url = f"http://127.0.0.1:{port}"
    google.allow_callback(base_url + "/oauth/google/callback")
    env = image_env(image, PORT=str(port), PUBLIC_URL=base_url, METRICS_PORT=str(metrics_port),
                    GOOGLE_CLIENT_ID=GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET=GOOGLE_CLIENT_SECRET,
                    GOOGLE_DISCOVERY_URL=google.discovery_url)
    log_path = tmp_path / "container.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(entrypoint(image, root, env), env=env, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(process, port, tmp_path, log_path, base_url, env)
    try:
        def healthy() -> bool:
            assert process.poll() is None, server.log()
            return httpx2.get(base_url + "/healthz", timeout=2).status_code == 200

        eventually(healthy, 60, awaiting="the image's server to answer /healthz", interval_s=0.2,
                   ignoring=httpx2.TransportError, showing=server.log)
        assert httpx2.get(base_url + "/readyz").json() == {
            "status": "ready", "checks": {"store": "ok", "shutdown": "no", "google_discovery": "loaded"},
            "store_mode": "sqlite"}
        healthcheck = image.config["Healthcheck"]["Test"][1:]
        assert subprocess.run(entrypoint(image, root, env, *healthcheck), env=env, timeout=30).returncode == 0

        google.next_login(ALICE)
        tokens = RawClient.register(server).sign_in()
        answer = mcp_call(server, tokens["access_token"], params={"name": "add", "arguments": {"a": 2, "b": 40}})
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"]["structuredContent"] == {"result": 42.0}
        metrics = httpx2.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert 'stream_http_mcp_requests_total{method="tools/call",outcome="ok",tool="add"} 1.0' in metrics

        data = root / "data"
        files = sorted(path.name for path in data.iterdir())
        assert "stream-http.db" in files and "secret_key" in files, files
        for path in [data, *data.iterdir()]:
            assert path.stat().st_uid == 10001, path
            assert path.stat().st_mode & 0o077 == 0, f"{path} is private to the server's user"
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=20)
    assert code == 0, "SIGTERM is a clean stop"
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any(line.get("event") == "sign_in_allowed" and line.get("email") == ALICE["email"] for line in lines)
    assert any(line["message"].startswith("draining:") for line in lines)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)


# --- compose.yaml


@pytest.fixture
def stateless_sqlite(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_server(tmp_path / "server", "--stateless", env={"STORE_URL": f"sqlite:///{tmp_path}/s.db"})
    try:
        yield server
    finally:
        server.stop()


def compose() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((REPO / "compose.yaml").read_text())


def test_compose_runs_stateless_replicas_on_one_persistent_redis_with_shared_settings() -> None:
    spec = compose()
    server, redis = spec["services"]["stream-http"], spec["services"]["redis"]
    assert server["build"] == "." and server["deploy"]["replicas"] >= 2
    assert server["env_file"] == [{"path": ".env", "required": False}], "every .env setting reaches the replicas"
    settings = server["environment"]
    readme = (REPO / "README.md").read_text()
    shared = readme[readme.index("**The same on every replica**"):].split("\n- ", 1)[0]
    must_share = set(re.findall(r"`([A-Z_]+)`", shared))
    assert must_share and must_share <= settings.keys(), must_share - settings.keys()
    assert settings["MCP_STATELESS"] == "true" and settings["STORE_URL"].startswith("redis://redis:")
    subnet = spec["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert settings["TRUSTED_PROXIES"] == subnet, "the proxy's forwarded headers and request ids are believed"
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"]) and "redis-data" in spec["volumes"]
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    assert server["stop_grace_period"] == "15s"


def test_the_sentinel_variant_points_every_replica_at_three_sentinels_watching_the_primary() -> None:
    import yaml

    base = compose()
    variant = yaml.safe_load((REPO / "compose.sentinel.yaml").read_text())
    services = variant["services"]
    address = server_module.parse_redis_url(services["stream-http"]["environment"]["STORE_URL"])
    sentinels = [name for name, _ in address.hosts]
    assert address.mode == "sentinel" and len(sentinels) == 3 and all(name in services for name in sentinels)
    for name in sentinels:
        script = services[name]["command"][-1]
        monitor = next(line.split() for line in script.splitlines() if "sentinel monitor" in line)
        assert monitor[2:] == [address.service, "redis", "6379", "2"], "a quorum of two watches compose.yaml's redis"
        assert "port 26379" in script and script.rstrip().endswith("--sentinel")
        assert set(services["stream-http"]["depends_on"]) == set(sentinels)
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1:][:2] == ["redis", "6379"] and "redis" in base["services"]
    assert server_module.load_settings({"STORE_URL": services["stream-http"]["environment"]["STORE_URL"],
                                        "SECRET_KEY": "k" * 40}).store_url.startswith("redis+sentinel://")


def test_composes_proxy_block_serves_through_real_nginx_and_passes_its_request_id(stateless_sqlite: ServerProcess,
                                                                                  tmp_path: Path) -> None:
    from tests.nginx import LISTEN, Nginx

    block = compose()["configs"]["nginx"]["content"].replace("$$", "$").replace("listen 80;", LISTEN)
    block = block.replace("server stream-http:8000", f"server 127.0.0.1:{stateless_sqlite.port}")
    nginx = Nginx.start(tmp_path / "nginx", block)
    try:
        answer = httpx2.get(nginx.base_url + "/healthz")
        ready = httpx2.get(nginx.base_url + "/readyz")
    finally:
        nginx.stop()
    assert answer.status_code == 200 and ready.json()["status"] == "ready"
    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"]), "nginx's $request_id, adopted"
