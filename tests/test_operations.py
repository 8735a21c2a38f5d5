"""Running it in production: readiness, Prometheus metrics scraped by a real Prometheus, OpenTelemetry
spans (kept by the SDK's in-memory exporter, and sent over OTLP/HTTP), JSON logs and request ids."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx2
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import (
    REPO,
    ServerProcess,
    assert_no_traceback,
    current_store,
    eventually,
    free_port,
    mcp_headers,
    metric,
    open_session,
    run_python,
    running_server,
)
from tests.signin import ALICE, BOB, GoogleStandIn, RawClient, auth_server, mcp_call, pkce_pair

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"


def add(server: ServerProcess, token: str, a: int, b: int, **headers: str) -> httpx2.Response:
    return mcp_call(server, token, params={"name": "add", "arguments": {"a": a, "b": b}}, **headers)


# --- readiness


def test_readyz_names_a_google_that_cannot_be_reached_and_healthz_stays_up(google: GoogleStandIn,
                                                                           tmp_path: Path) -> None:
    env = {"GOOGLE_DISCOVERY_URL": f"http://127.0.0.1:{free_port()}/.well-known/openid-configuration"}
    with auth_server(google, tmp_path, env=env) as server:
        ready = httpx2.get(server.base_url + "/readyz")
        alive = httpx2.get(server.base_url + "/healthz")
    assert ready.status_code == 503 and ready.headers["retry-after"] == "2"
    assert ready.json() == {"status": "not ready", "missing": ["google_discovery"],
                            "checks": {"store": "ok", "shutdown": "no", "google_discovery": "unavailable"},
                            "store_mode": ready.json()["store_mode"]}
    assert ready.json()["store_mode"] in ("sqlite", "standalone")
    assert alive.status_code == 200
    assert "127.0.0.1" not in ready.text, "the probe names what is missing, not where it lives"


def test_readyz_says_draining_once_shutdown_begins(google: GoogleStandIn, tmp_path: Path) -> None:
    """A load balancer that keeps a connection open sees the replica leave before it goes."""
    metrics_port = free_port()  # where the test sees the call in flight
    env = {"SHUTDOWN_GRACE": "6", "RATE_LIMIT_MCP": "0", "METRICS_PORT": str(metrics_port)}
    with auth_server(google, tmp_path, env=env) as server:
        google.next_login(ALICE)
        token = RawClient.register(server).sign_in()["access_token"]
        slow = threading.Thread(target=mcp_call, args=(server, token), kwargs={"params": {
            "name": "long_task", "arguments": {"steps": 8, "step_seconds": 0.5}}}, daemon=True)
        with httpx2.Client(base_url=server.base_url) as balancer:

            def not_ready() -> httpx2.Response | None:
                answer = balancer.get("/readyz")
                return answer if answer.status_code != 200 else None

            assert balancer.get("/readyz").status_code == 200
            slow.start()
            eventually(lambda: metric(metrics_port, "stream_http_mcp_exchanges_open") == 1,
                       awaiting="the call to be in flight")
            server.process.send_signal(signal.SIGTERM)
            draining = eventually(not_ready, awaiting="/readyz to change once shutdown begins")
        slow.join(20)
    assert draining.status_code == 503
    assert draining.json()["missing"] == ["shutdown"] and draining.json()["checks"]["shutdown"] == "draining"


# --- metrics


class Prometheus:
    """Debian's prometheus, scraping one target every second, on free loopback ports."""

    def __init__(self, workdir: Path, target: str) -> None:
        executable = shutil.which("prometheus")
        if executable is None:
            pytest.fail("prometheus is needed for the metrics test: apt-get install prometheus (.ci/run does)")
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: stream-http\n"
                          f"    static_configs:\n      - targets: ['{target}']\n")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen([executable, f"--config.file={config}", f"--storage.tsdb.path={workdir}/tsdb",
                                         f"--web.listen-address={self.url.removeprefix('http://')}"],
                                        stdout=self.log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            assert self.process.poll() is None, "prometheus exited"
            return httpx2.get(self.url + "/-/ready", timeout=1).status_code == 200

        eventually(ready, 30, awaiting="prometheus to start", interval_s=0.2, ignoring=httpx2.TransportError)

    def value(self, query: str) -> float | None:
        result = httpx2.get(self.url + "/api/v1/query", params={"query": query}).json()
        assert result["status"] == "success", result
        series = result["data"]["result"]
        return float(series[0]["value"][1]) if series else None

    def differences(self, expected: dict[str, float]) -> list[str]:
        """Each query whose value is not the one expected, with both."""
        return [f"{query}: {found} (expected {value})" for query, value in expected.items()
                if (found := self.value(query)) != value]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(15)
        self.log.close()


@pytest.fixture
def metrics_server(google: GoogleStandIn, tmp_path: Path) -> Iterator[tuple[ServerProcess, int]]:
    metrics_port = free_port()
    env = {"METRICS_PORT": str(metrics_port), "ALLOWED_EMAILS": ALICE["email"]}
    with auth_server(google, tmp_path / "server", env=env) as server:
        yield server, metrics_port


def test_prometheus_scrapes_sign_ins_tokens_and_tool_calls(metrics_server: tuple[ServerProcess, int],
                                                            google: GoogleStandIn, tmp_path: Path) -> None:
    server, metrics_port = metrics_server
    prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{metrics_port}")
    try:
        client = RawClient.register(server)
        trips_before = len(google.authorization_requests())
        google.next_login(ALICE)
        tokens = client.sign_in()
        google.next_login(BOB)  # not among ALLOWED_EMAILS
        _, browser = client.authorize(pkce_pair()[1])
        assert "Access refused" in browser.visits[-1].body
        # Each trip to Google ends in one code exchange: Bob's one, and Alice's one, or two when Google gave no
        # refresh token on the first (she consented to this stand-in before) and the server went back for one.
        trips = len(google.authorization_requests()) - trips_before
        assert trips in (2, 3)
        for a in range(3):
            assert add(server, tokens["access_token"], a, 1).status_code == 200
        assert add(server, None, 1, 1).status_code == 401
        unknown = mcp_call(server, tokens["access_token"], params={"name": "no-such-tool", "arguments": {}})
        assert unknown.json()["error"]["code"] == -32602
        assert client.refresh(tokens["refresh_token"]).status_code == 200

        expected = {
            'stream_http_mcp_requests_total{method="tools/call",tool="add",outcome="ok"}': 3,
            'stream_http_mcp_requests_total{method="tools/call",tool="unknown",outcome="error"}': 1,
            'stream_http_mcp_request_duration_seconds_count{method="tools/call"}': 4,
            'stream_http_mcp_http_refusals_total{status="401"}': 1,
            "stream_http_client_registrations_total": 1,
            'stream_http_consents_total{decision="given"}': 2,  # consent comes before Google: Bob gave it too
            'stream_http_sign_ins_total{outcome="allowed"}': 1,
            'stream_http_sign_ins_total{outcome="refused",reason="not_allowed"}': 1,
            "stream_http_tokens_issued_total": 1,
            "stream_http_tokens_refreshed_total": 1,
            'stream_http_google_requests_total{api="token",outcome="ok"}': trips,
            "stream_http_store_up": 1,
            "sum(stream_http_store_operation_duration_seconds_count) > bool 10": 1,
            "sum(stream_http_store_failures_total) or vector(0)": 0,
            'stream_http_mcp_exchanges_open': 0,
        }
        eventually(lambda: not prometheus.differences(expected), 30, interval_s=0.5,
                   awaiting="prometheus to scrape every value expected",
                   showing=lambda: "\n".join(prometheus.differences(expected)))
        p99 = prometheus.value('histogram_quantile(0.99, stream_http_mcp_request_duration_seconds_bucket'
                               '{method="tools/call"})')
        print(f"prometheus: {expected}; tools/call p99 {p99}")
    finally:
        prometheus.stop()


def test_metrics_are_not_on_the_public_port(metrics_server: tuple[ServerProcess, int]) -> None:
    server, metrics_port = metrics_server
    assert httpx2.get(server.base_url + "/metrics").status_code == 404
    scraped = httpx2.get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert scraped.status_code == 200 and "# TYPE stream_http_mcp_requests_total counter" in scraped.text
    assert "process_cpu_seconds_total" in scraped.text and "python_gc_collections_total" in scraped.text


def test_metrics_are_off_unless_a_port_is_given(signin_server: ServerProcess) -> None:
    assert "serving Prometheus metrics" not in signin_server.log()
    assert httpx2.get(signin_server.base_url + "/metrics").status_code == 404


# --- traces


def spans_by_id(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {span["span_id"]: span for span in spans}


def ancestors(span: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> list[str]:
    names = []
    while span["parent_id"] in by_id:
        span = by_id[span["parent_id"]]
        names.append(span["name"])
    return names


def tree(root: dict[str, Any], spans: list[dict[str, Any]], depth: int = 0) -> list[str]:
    lines = [f"{'  ' * depth}{root['name']} ({root['kind'].lower()})"]
    for child in (span for span in spans if span["parent_id"] == root["span_id"]):
        lines += tree(child, spans, depth + 1)
    return lines


def test_one_tool_call_and_one_sign_in_as_span_trees(google: GoogleStandIn, tmp_path: Path) -> None:
    spans_file = tmp_path / "spans.json"
    with auth_server(google, tmp_path, env={"SPANS_FILE": str(spans_file)},
                     script=REPO / "tests" / "traced_server.py") as server:
        google.next_login(ALICE)
        token = RawClient.register(server).sign_in()["access_token"]
        note = mcp_call(server, token, params={"name": "add_note", "arguments": {"title": "traced"}},
                        traceparent=TRACEPARENT)
        assert note.status_code == 200, note.text
        assert server.stop() == 0
    spans = json.loads(spans_file.read_text())
    by_id = spans_by_id(spans)

    call = [span for span in spans if span["trace_id"] == TRACE_ID]
    http = next(span for span in call if span["name"] == "POST /mcp")
    assert http["parent_id"] == CALLER_SPAN_ID and http["kind"] == "SERVER", "the caller's trace continues"
    tool = next(span for span in call if span["name"] == "tools/call add_note")
    assert ancestors(tool, by_id)[-1] == "POST /mcp"
    saved = next(span for span in call if span["name"] == "store saving note")
    assert saved["parent_id"] == tool["span_id"], "the tool's own store work is under the tool's span"
    checked = [span for span in call if span["name"] == "store reading access"]
    assert checked and checked[0]["parent_id"] == http["span_id"], "the token check is under the request"
    assert http["attributes"]["http.response.status_code"] == 200

    # The callback that finished the sign-in (a first trip that brought no Google refresh token only sends the
    # browser back to Google for one).
    callbacks = [span for span in spans if span["name"] == "GET /oauth/google/callback"]
    callback = next((span for span in callbacks if any(
        other["name"] == "store saving google" and other["trace_id"] == span["trace_id"] for other in spans)),
        callbacks[0])
    below = [span for span in spans if span["trace_id"] == callback["trace_id"]]
    names = {span["name"] for span in below}
    assert {"google token", "store taking google_scope_trip", "store saving google"} <= names, names
    assert all(callback["name"] in ancestors(span, by_id) for span in below if span is not callback)
    token_exchange = next(span for span in spans if span["name"] == "POST /token")
    assert any(span["name"].startswith("store ") and span["parent_id"] == token_exchange["span_id"]
               for span in spans), "the code exchange's store work is under its request"
    print("\n".join(["tools/call:", *tree(http, spans, 1), "sign-in, Google's answer:", *tree(callback, spans, 1)]))


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: the requests OpenTelemetry's exporter posts, decoded by its own protobufs."""

    received: ClassVar[list[ExportTraceServiceRequest]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/v1/traces" and self.headers["content-type"] == "application/x-protobuf":
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            Collector.received.append(request)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_spans_leave_over_otlp_when_an_endpoint_is_set(google: GoogleStandIn, tmp_path: Path) -> None:
    collector = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    try:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200",
               "OTEL_SERVICE_NAME": "stream-http-test"}
        with auth_server(google, tmp_path, env=env) as server:
            google.next_login(ALICE)
            token = RawClient.register(server).sign_in()["access_token"]
            assert add(server, token, 1, 2, traceparent=TRACEPARENT).status_code == 200
            eventually(lambda: any(span.name == "tools/call add" for span in exported()), 20,
                       awaiting="the tools/call span to reach the collector", interval_s=0.2,
                       showing=lambda: sorted({span.name for span in exported()}))
            log = server.log()
    finally:
        collector.shutdown()
    names = {span.name for span in exported()}
    assert {"POST /mcp", "tools/call add", "GET /oauth/google/callback", "google token"} <= names, names
    services = {attribute.value.string_value for request in Collector.received for resource in request.resource_spans
                for attribute in resource.resource.attributes if attribute.key == "service.name"}
    assert services == {"stream-http-test"}
    assert f"exporting traces over OTLP to {endpoint}" in log
    caller = [span for span in exported() if span.trace_id.hex() == TRACE_ID]
    assert {span.name for span in caller} >= {"POST /mcp", "tools/call add"}


def exported() -> list[Any]:
    return [span for request in Collector.received for resource in request.resource_spans
            for scope in resource.scope_spans for span in scope.spans]


# --- logs and request ids


def test_json_logs_name_each_request_and_its_trace(google: GoogleStandIn, tmp_path: Path) -> None:
    with auth_server(google, tmp_path, env={"LOG_FORMAT": "json"}) as server:
        registered = httpx2.post(server.base_url + "/register", json={
            "client_name": "json logs", "redirect_uris": ["http://127.0.0.1:6777/cb"],
            "token_endpoint_auth_method": "none"}, headers={"X-Request-Id": "edge-7f3a", "traceparent": TRACEPARENT})
        fresh = httpx2.get(server.base_url + "/healthz")
        malformed = [httpx2.get(server.base_url + "/healthz", headers={"X-Request-Id": offered})
                     for offered in ("a" * 129, "id with spaces", "<script>")]
        log = server.log()
    assert registered.status_code == 201
    assert registered.headers["x-request-id"] == "edge-7f3a", "the id of a trusted proxy (loopback) is kept"
    assert len(fresh.headers["x-request-id"]) == 16
    assert all(len(response.headers["x-request-id"]) == 16 for response in malformed), "even a proxy's must be sane"
    lines = [json.loads(line) for line in log.splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    audit = next(line for line in lines if line.get("event") == "client_registered")
    assert audit["request_id"] == "edge-7f3a" and audit["trace_id"] == TRACE_ID
    assert audit["logger"] == "stream_http.audit" and audit["message"] == "client_registered"
    assert audit["client_id"] == registered.json()["client_id"]


def test_request_ids_from_untrusted_callers_are_replaced(google: GoogleStandIn, tmp_path: Path) -> None:
    with auth_server(google, tmp_path, env={"TRUSTED_PROXIES": "10.9.9.9"}) as server:
        answered = [httpx2.get(server.base_url + "/healthz", headers={"X-Request-Id": offered})
                    for offered in ("spoofed", "edge-1", "edge-2")]
        registered = httpx2.post(server.base_url + "/register", json={
            "client_name": "text logs", "redirect_uris": ["http://127.0.0.1:6777/cb"],
            "token_endpoint_auth_method": "none"}, headers={"X-Request-Id": "spoofed"})
        refused = httpx2.post(server.base_url + "/register", json={
            "client_name": "odd scheme", "redirect_uris": ["odd-app://callback"], "token_endpoint_auth_method": "none"})
        log = server.log()
    ids = [response.headers["x-request-id"] for response in [*answered, registered, refused]]
    assert all(len(request_id) == 16 and request_id != "spoofed" for request_id in ids), ids
    assert len(set(ids)) == 5
    audit = next(line for line in log.splitlines() if '"event": "client_registered"' in line)
    assert json.loads(audit.split("audit: ", 1)[1])["request_id"] == ids[3], "an audit line stays one JSON object"
    warning = next(line for line in log.splitlines() if "refused the redirect URI 'odd-app://callback'" in line)
    assert warning.endswith(f"[request {ids[4]}]"), "other lines end with their request's id"



def test_a_metrics_port_that_cannot_be_had_stops_the_server_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        port = free_port()
        result = run_python("server.py", "--port", str(port), "--metrics-port", str(busy),
                            env={"DATA_DIR": str(tmp_path)}, timeout_s=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("server.py: cannot start telemetry: ")
    assert_no_traceback(result.stderr)
    same = run_python("server.py", "--port", str(port), "--metrics-port", str(port), env={"DATA_DIR": str(tmp_path)})
    assert same.returncode == 2 and f"METRICS_PORT={port} is PORT too" in same.stderr


def test_open_sessions_and_streams_are_gauges(tmp_path: Path) -> None:
    metrics_port = free_port()
    with running_server(tmp_path, env={"METRICS_PORT": str(metrics_port)}) as server, httpx2.Client() as http:
        session_id = open_session(http, server.mcp_url)
        listed = http.post(server.mcp_url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                           headers=mcp_headers(session_id=session_id))
        assert listed.status_code == 200
        headers = {**mcp_headers(session_id=session_id), "accept": "text/event-stream"}
        with http.stream("GET", server.mcp_url, headers=headers) as stream:
            assert stream.status_code == 200
            during = httpx2.get(f"http://127.0.0.1:{metrics_port}/metrics").text

        def streams_gauge_fell() -> str | None:
            scraped = httpx2.get(f"http://127.0.0.1:{metrics_port}/metrics").text
            return scraped if "stream_http_streams_open 0.0" in scraped else None

        after = eventually(streams_gauge_fell, awaiting="the streams gauge to fall once the stream closed")
    assert "stream_http_streams_open 1.0" in during and "stream_http_sessions_open 1.0" in during
    assert "stream_http_mcp_exchanges_open 1.0" in during
    assert "stream_http_streams_open 0.0" in after


def test_a_taken_port_is_said_before_anything_claims_to_serve(tmp_path: Path) -> None:
    """One line naming the port and how to choose another; no "serving MCP at" or "startup complete" first."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_python(str(REPO / "server.py"), "--port", str(port), cwd=tmp_path,
                            env={"DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 2
    assert result.stderr.strip() == (f"server.py: port {port} on 127.0.0.1 is taken (is the server already running?): "
                                     f"choose another with --port {port + 1} or PORT={port + 1}"), result.stderr
    assert "serving MCP" not in result.stderr + result.stdout and "startup complete" not in result.stderr


def test_a_signed_in_google_call_and_a_lone_sqlite_server_log_only_what_matters(google: GoogleStandIn,
                                                                                  tmp_path: Path) -> None:
    """No line per call to Google from the HTTP client, and no word of other replicas where there are none."""
    google.next_login(ALICE)
    with auth_server(google, tmp_path) as server:
        token = RawClient.register(server).sign_in("mcp google")["access_token"]
        profile = mcp_call(server, token, "tools/call", {"name": "google_profile", "arguments": {}})
        log = server.log()
    assert profile.status_code == 200 and '"isError":false' in profile.text.replace(" ", "")
    assert "HTTP Request:" not in log, "the HTTP client's INFO line for every call to Google"
    if current_store().kind == "sqlite":
        assert "replicas" not in log, "a lone SQLite server has no replicas to hear"
