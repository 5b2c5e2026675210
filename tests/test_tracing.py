"""OpenTelemetry traces of calls: a real gateway exporting OTLP/HTTP to a real receiver.

The receiver is a small HTTP server on loopback that decodes what the gateway and
its replicas POST to ``/v1/traces`` with the ``opentelemetry-proto`` messages, so
these tests see exactly what a collector would.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import http.server
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcf import telemetry
from tests.conftest import REPO, GatewayProcess, deploy

trace_pb2 = pytest.importorskip(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
    reason="tracing tests need pip install -e '.[test]' (opentelemetry-proto)",
)

BATCHED = """
import dcf
from opentelemetry import trace

tracer = trace.get_tracer("test-handler")


@dcf.batch(max_size=4, max_wait_ms=5)
def Handler(reqs):
    out = []
    with tracer.start_as_current_span("model"):
        for req in reqs:
            out.append({"trace_id": req.trace_id, "traceparent": req.headers.get("traceparent")})
    return out
"""

PLAIN = """
import sys
from opentelemetry import trace

tracer = trace.get_tracer("test-handler")


def Handler(req):
    if req.input == b"boom":
        raise RuntimeError("boom")
    if req.input == b"many":  # past the span limits: bounded as the SDK bounds its spans
        for i in range(1000):
            trace.get_current_span().set_attribute(f"extra.{i}", "x" * 10_000)
            trace.get_current_span().add_event(f"event.{i}")
        return {"trace_id": req.trace_id}
    # The handler span is the current span: the handler may annotate it, as any span.
    current = trace.get_current_span()
    current.set_attribute("model.name", "plain")
    current.set_attribute("model.bad", object())  # not a valid value: cleared, as by the SDK
    current.add_event("model.loaded", {"model.size": 3})
    with tracer.start_as_current_span("inner"):
        return {"trace_id": req.trace_id, "otel": "opentelemetry" in sys.modules}
"""

MODULES = """
import os
import sys


def Handler(req):
    return {
        "otel": sorted(m for m in sys.modules if m.startswith("opentelemetry")),
        "otel_env": sorted(k for k in os.environ if k.startswith("OTEL_")),
        "trace_id": req.trace_id,
    }
"""


# -- the receiver ---------------------------------------------------------------------------


class Receiver:
    """An OTLP/HTTP traces endpoint: every span it was sent, decoded, as a dict."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                message = trace_pb2.ExportTraceServiceRequest()
                message.ParseFromString(body)
                receiver._add(self.path, message)
                answer = trace_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _add(self, path: str, message: object) -> None:
        with self._lock:
            self.requests += 1
            for resource_spans in message.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            {
                                "path": path,
                                "service": resource.get("service.name"),
                                "resource": resource,
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex() or None,
                                "attributes": _attributes(span.attributes),
                                "events": {e.name: _attributes(e.attributes) for e in span.events},
                                "status": span.status.code,  # 0 unset, 1 ok, 2 error
                                "kind": span.kind,  # 2 server, 3 client, 4 producer, 5 consumer
                                "start": span.start_time_unix_nano,
                                "end": span.end_time_unix_nano,
                            }
                        )

    def trace(self, trace_id: str, names: set[str], timeout: float = 20) -> dict[str, dict]:
        """The spans of ``trace_id`` by name, once every one of ``names`` has arrived."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = {s["name"]: s for s in self.spans if s["trace_id"] == trace_id}
            if names <= found.keys() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        missing = names - found.keys()
        assert not missing, f"spans {sorted(missing)} never arrived; got {sorted(found)}"
        return found

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _attributes(pairs: object) -> dict:
    out = {}
    for pair in pairs:
        value = pair.value
        kind = value.WhichOneof("value")
        out[pair.key] = getattr(value, kind) if kind else None
    return out


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def _plain_env() -> dict[str, str]:
    """The test's environment without any OTEL_ setting a developer's shell may hold."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


class TracedGateway(GatewayProcess):
    """A gateway whose environment is given exactly (OTEL_* included)."""

    def __init__(self, home: Path, extra: list[str], env: dict[str, str]) -> None:
        super().__init__(home, extra=extra)
        self._env = env

    def env(self) -> dict[str, str]:
        env = super().env()
        for key in [k for k in env if k.startswith("OTEL_")]:
            del env[key]
        env.update(self._env)
        return env


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def tgw(receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    home = tmp_path_factory.mktemp("tracing") / "home"
    # Exported within 0.1 s instead of the default 5 s, so the tests wait little; and a
    # collector credential, which must stay with the gateway.
    env = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_EXPORTER_OTLP_HEADERS": "authorization=s3cret"}
    gateway = TracedGateway(home, ["--otlp-endpoint", receiver.url], env).start()
    yield gateway
    gateway.stop()


# -- a traced call ----------------------------------------------------------------------------


def test_a_batched_call_is_one_trace_from_the_gateway_through_the_replica(
    tgw: GatewayProcess, receiver: Receiver, tmp_path: Path
) -> None:
    deploy(tgw, tmp_path, "traced-batch", BATCHED)
    trace_id, caller_span, traceparent = _traceparent()
    with tgw.http() as http:
        response = http.post(
            "/function/traced-batch", content=b"x", headers={"traceparent": traceparent}
        )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["trace_id"] == trace_id  # req.trace_id: the caller's trace, continued
    version, tid, handler_id, flags = answer["traceparent"].split("-")
    assert (version, tid, flags) == ("00", trace_id, "01")

    spans = receiver.trace(
        trace_id, {"POST /function/traced-batch", "batch wait", "handler", "model"}
    )
    call = spans["POST /function/traced-batch"]
    assert call["service"] == "dcf-gateway"
    assert call["parent"] == caller_span
    attrs = call["attributes"]
    assert attrs["dcf.function"] == "traced-batch"
    assert attrs["dcf.version"] == 1
    assert attrs["dcf.replica"].startswith("traced-batch-v1-")
    assert attrs["http.response.status_code"] == 200
    # The replica's spans: the same trace, children of the gateway's span, their own service.
    wait, handler = spans["batch wait"], spans["handler"]
    for span in (wait, handler):
        assert span["parent"] == call["span_id"], span
        assert span["service"] == "traced-batch"
        assert span["resource"]["service.instance.id"] == attrs["dcf.replica"]
        assert span["resource"]["service.version"] == "1"
        assert span["resource"]["dcf.function"] == "traced-batch"
        assert span["attributes"]["dcf.batch.size"] == 1
    assert wait["end"] <= handler["start"]
    assert call["start"] <= wait["start"]
    assert handler["end"] <= call["end"]
    # What the handler saw: the handler span's context, so its own spans nest under it.
    assert handler["span_id"] == handler_id
    assert spans["model"]["parent"] == handler["span_id"]


def test_a_plain_call_gets_a_handler_span_and_a_new_trace_without_traceparent(
    tgw: GatewayProcess, receiver: Receiver, tmp_path: Path
) -> None:
    deploy(tgw, tmp_path, "traced-plain", PLAIN)
    with tgw.http() as http:
        response = http.post("/function/traced-plain", content=b"x")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["otel"] is True
    trace_id = answer["trace_id"]
    assert trace_id and len(trace_id) == 32
    spans = receiver.trace(trace_id, {"POST /function/traced-plain", "handler", "inner"})
    call, handler = spans["POST /function/traced-plain"], spans["handler"]
    assert call["parent"] is None  # a new trace starts at the gateway
    assert (call["kind"], call["status"]) == (2, 0)
    assert handler["parent"] == call["span_id"]
    assert spans["inner"]["parent"] == handler["span_id"]
    assert "batch wait" not in spans
    # What the handler set on its current span is on the handler span.
    assert handler["attributes"]["model.name"] == "plain"
    assert handler["attributes"]["model.bad"] is None
    assert handler["events"] == {"model.loaded": {"model.size": 3}}

    # A handler that raises: both spans are errors.
    trace_id, _, traceparent = _traceparent()
    with tgw.http() as http:
        response = http.post(
            "/function/traced-plain", content=b"boom", headers={"traceparent": traceparent}
        )
    assert response.status_code == 500, response.text
    spans = receiver.trace(trace_id, {"POST /function/traced-plain", "handler"})
    assert spans["POST /function/traced-plain"]["status"] == 2
    assert spans["POST /function/traced-plain"]["attributes"]["http.response.status_code"] == 500
    assert spans["handler"]["status"] == 2

    # A handler that sets far more than the limits allow: the span keeps 128 of each.
    trace_id, _, traceparent = _traceparent()
    with tgw.http() as http:
        response = http.post(
            "/function/traced-plain", content=b"many", headers={"traceparent": traceparent}
        )
    assert response.status_code == 200, response.text
    handler = receiver.trace(trace_id, {"handler"})["handler"]
    assert len(handler["attributes"]) == 128 and len(handler["events"]) == 128
    assert handler["attributes"]["http.response.status_code"] == 200


SLOW = """
import time


def Handler(req):
    time.sleep(0.4)
    return {"trace_id": req.trace_id}
"""


def test_a_call_that_waits_for_a_replica_gets_a_queue_span(
    tgw: GatewayProcess, receiver: Receiver, tmp_path: Path
) -> None:
    deploy(tgw, tmp_path, "traced-slow", SLOW, concurrency=1, replicas={"min": 1, "max": 1})
    parents = [_traceparent() for _ in range(2)]

    def call(traceparent: str) -> int:
        with tgw.http() as http:
            headers = {"traceparent": traceparent}
            return http.post("/function/traced-slow", content=b"x", headers=headers).status_code

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert list(pool.map(call, [p[2] for p in parents])) == [200, 200]
    queued = []
    for trace_id, _, _ in parents:
        spans = receiver.trace(trace_id, {"POST /function/traced-slow", "handler"})
        if "queue" in spans:
            queue, call_span = spans["queue"], spans["POST /function/traced-slow"]
            assert queue["parent"] == call_span["span_id"] and queue["service"] == "dcf-gateway"
            assert call_span["start"] <= queue["start"] < queue["end"] <= spans["handler"]["start"]
            queued.append((queue["end"] - queue["start"]) / 1e9)
    # One of the two waited for the other's 0.4 s on the only slot; the one that found
    # the slot free waited no time worth a span.
    assert len(queued) == 1 and queued[0] > 0.2, queued


def test_a_failing_call_is_traced_with_its_status(tgw: GatewayProcess, receiver: Receiver) -> None:
    trace_id, caller_span, traceparent = _traceparent()
    with tgw.http() as http:
        response = http.post(
            "/function/no-such", content=b"x", headers={"traceparent": traceparent}
        )
    assert response.status_code == 404
    call = receiver.trace(trace_id, {"POST /function/no-such"})["POST /function/no-such"]
    assert call["attributes"]["http.response.status_code"] == 404
    assert call["parent"] == caller_span


def test_an_unsampled_traceparent_passes_through_untraced(
    tgw: GatewayProcess, receiver: Receiver, tmp_path: Path
) -> None:
    deploy(tgw, tmp_path, "traced-modules", MODULES)
    trace_id, _, traceparent = _traceparent()
    with tgw.http() as http:
        response = http.post(
            "/function/traced-modules", headers={"traceparent": traceparent[:-2] + "00"}
        )
    assert response.status_code == 200
    answer = response.json()
    assert answer["trace_id"] == trace_id  # the handler still sees the caller's trace
    # What reached the replica: where to export, never the gateway's own OTEL_ settings.
    assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" in answer["otel_env"]
    assert "OTEL_BSP_SCHEDULE_DELAY" in answer["otel_env"]
    assert "OTEL_EXPORTER_OTLP_HEADERS" not in answer["otel_env"]
    time.sleep(0.5)
    assert not [s for s in receiver.spans if s["trace_id"] == trace_id]


# -- async jobs -------------------------------------------------------------------------------


class CallbackReceiver:
    def __init__(self) -> None:
        self.calls: list[dict] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.calls.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/done"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_an_async_job_carries_the_submits_trace_into_its_run_and_callback(
    tgw: GatewayProcess, receiver: Receiver, tmp_path: Path
) -> None:
    deploy(tgw, tmp_path, "traced-job", PLAIN)
    callback = CallbackReceiver()
    try:
        trace_id, caller_span, traceparent = _traceparent()
        with tgw.http() as http:
            response = http.post(
                "/async-function/traced-job",
                content=b"x",
                headers={"traceparent": traceparent, "x-callback-url": callback.url},
            )
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            deadline = time.monotonic() + 30
            while not callback.calls and time.monotonic() < deadline:
                time.sleep(0.05)
            result = http.get(f"/async-function/jobs/{job_id}")
        assert result.status_code == 200 and result.json()["trace_id"] == trace_id
        assert callback.calls, "the callback never came"
        spans = receiver.trace(
            trace_id,
            {"POST /async-function/traced-job", "job traced-job", "handler", "callback traced-job"},
        )
        submit = spans["POST /async-function/traced-job"]
        run, handler, back = spans["job traced-job"], spans["handler"], spans["callback traced-job"]
        assert submit["parent"] == caller_span
        assert submit["attributes"]["http.response.status_code"] == 202
        assert run["parent"] == submit["span_id"]
        assert run["attributes"]["dcf.job.id"] == job_id
        assert run["attributes"]["dcf.replica"].startswith("traced-job-v1-")
        assert handler["parent"] == run["span_id"]
        assert back["parent"] == submit["span_id"]
        # The callback continues the trace at the receiver.
        sent = callback.calls[0]["traceparent"].split("-")
        assert sent[1] == trace_id and sent[2] == back["span_id"]
    finally:
        callback.server.shutdown()
        callback.server.server_close()


def test_calls_never_wait_for_a_collector_that_is_down(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"}
    gateway = TracedGateway(tmp_path / "home", ["--otlp-endpoint", dead], env).start()
    try:
        deploy(gateway, tmp_path, "traced-nowhere", PLAIN)
        with gateway.http() as http:
            started = time.monotonic()
            for _ in range(20):
                response = http.post("/function/traced-nowhere", content=b"x")
                assert response.status_code == 200, response.text
                time.sleep(0.02)
            assert time.monotonic() - started < 10  # generous: no call waits for an export
    finally:
        gateway.stop()


# -- tracing off ------------------------------------------------------------------------------


def test_with_tracing_off_neither_gateway_nor_replica_loads_opentelemetry(
    tmp_path: Path,
) -> None:
    # Every import either process makes is logged (-X importtime), the replica's too: it
    # inherits PYTHON* settings.
    gateway = TracedGateway(tmp_path / "home", [], {"PYTHONPROFILEIMPORTTIME": "1"}).start()
    try:
        deploy(gateway, tmp_path, "untraced", MODULES)
        trace_id, _, traceparent = _traceparent()
        with gateway.http() as http:
            response = http.post("/function/untraced", headers={"traceparent": traceparent})
        assert response.status_code == 200
        answer = response.json()
        assert answer == {"otel": [], "otel_env": [], "trace_id": trace_id}
    finally:
        gateway.stop()
    log = gateway.log_path.read_text()
    assert "import time:" in log and "dcf.gateway.routing.router" in log  # imports are logged
    # FastAPI imports OpenTelemetry's API wherever it is installed (its own telemetry, idle
    # while no provider is set); the SDK, the exporter and protobuf messages are ours.
    for module in ("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.proto"):
        assert module not in log


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--trace-sample", "0.5"], {}, "--trace-sample"),  # with nowhere to send them
        (["--otlp-endpoint", "ftp://collector:4318"], {}, "--otlp-endpoint"),
        (["--otlp-endpoint", "http://"], {}, "--otlp-endpoint"),
        (
            ["--otlp-endpoint", "http://127.0.0.1:4318", "--trace-sample", "1.5"],
            {},
            "--trace-sample",
        ),
        (
            [],
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            },
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            [],
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                "OTEL_TRACES_SAMPLER": "sometimes",
            },
            "OTEL_TRACES_SAMPLER",
        ),
        (
            [],
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                "OTEL_TRACES_SAMPLER": "traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "half",
            },
            "OTEL_TRACES_SAMPLER_ARG",
        ),
    ],
)
def test_bad_tracing_settings_stop_the_gateway_with_one_line(
    args: list[str], env: dict[str, str], message: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dcf.cli.main", "gateway", "start", "--port", "1", *args],
        env={**_plain_env(), "DCF_HOME": str(tmp_path / "home"), **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_settings_follow_the_standard_variables() -> None:
    assert telemetry.from_environment({}) is None
    assert telemetry.from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}) is None
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
    settings = telemetry.from_environment(base)
    assert settings is not None
    assert settings.endpoint == "http://collector:4318/v1/traces"
    assert (settings.sampler, settings.ratio) == ("parentbased_always_on", 1.0)
    specific = {**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://other:4318/traces"}
    assert telemetry.from_environment(specific).endpoint == "http://other:4318/traces"
    assert telemetry.from_environment({**base, "OTEL_SDK_DISABLED": "true"}) is None
    assert telemetry.from_environment({**base, "OTEL_TRACES_EXPORTER": "none"}) is None
    ratio = {
        **base,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
    }
    assert telemetry.from_environment(ratio).ratio == 0.25
    # The flags win over the variables.
    flagged = telemetry.from_environment(ratio, endpoint="http://flag:4318", sample=0.5)
    assert flagged.endpoint == "http://flag:4318/v1/traces"
    assert (flagged.sampler, flagged.ratio) == ("parentbased_traceidratio", 0.5)
    assert telemetry.from_environment({}, endpoint="http://flag:4318").endpoint.startswith(
        "http://flag"
    )


def test_sampling_decisions() -> None:
    def decide(sampler: str, ratio: float, traceparent: str | None) -> bool:
        settings = telemetry.TraceSettings("http://c/v1/traces", sampler, ratio)
        return telemetry.should_sample(settings, telemetry.parse_traceparent(traceparent))

    _, _, sampled = _traceparent()
    unsampled = sampled[:-2] + "00"
    assert decide("parentbased_always_on", 1, None)
    assert decide("parentbased_always_on", 1, sampled)
    assert not decide("parentbased_always_on", 1, unsampled)
    assert not decide("parentbased_always_off", 1, None)
    assert decide("parentbased_always_off", 1, sampled)
    assert decide("parentbased_traceidratio", 0.0, sampled)
    assert not decide("parentbased_traceidratio", 0.0, None)
    assert decide("parentbased_traceidratio", 1.0, None)
    assert decide("always_on", 1, unsampled)
    assert not decide("always_off", 1, sampled)
    assert not decide("traceidratio", 0.0, sampled)
    hits = sum(decide("parentbased_traceidratio", 0.1, None) for _ in range(20_000))
    assert 1_500 < hits < 2_500


def test_traceparent_parsing_refuses_what_w3c_does() -> None:
    trace_id, span_id, good = _traceparent()
    assert telemetry.parse_traceparent(good) == (trace_id, span_id, True)
    assert telemetry.parse_traceparent(good.upper()) is None  # lowercase hex only
    assert telemetry.parse_traceparent("00-" + "0" * 32 + f"-{span_id}-01") is None
    assert telemetry.parse_traceparent(f"00-{trace_id}-" + "0" * 16 + "-01") is None
    assert telemetry.parse_traceparent("ff-" + good[3:]) is None
    assert telemetry.parse_traceparent(good + "-more") is None  # version 00 has 4 fields
    assert telemetry.parse_traceparent("01-" + good[3:] + "-more") is not None  # later ones may
    assert telemetry.parse_traceparent("x" * 1000) is None
    assert telemetry.parse_traceparent(None) is None


def test_the_ray_backend_traces_its_replicas(
    cluster: object, receiver: Receiver, tmp_path: Path
) -> None:
    env = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
    extra = ["--backend", "ray", "--ray-address", cluster.address, "--otlp-endpoint", receiver.url]  # type: ignore[attr-defined]
    gateway = TracedGateway(tmp_path / "home", extra, env).start()
    try:
        deploy(gateway, tmp_path, "traced-ray", PLAIN)
        trace_id, caller_span, traceparent = _traceparent()
        with gateway.http() as http:
            response = http.post("/function/traced-ray", headers={"traceparent": traceparent})
        assert response.status_code == 200, response.text
        assert response.json()["trace_id"] == trace_id
        spans = receiver.trace(trace_id, {"POST /function/traced-ray", "handler", "inner"})
        call, handler = spans["POST /function/traced-ray"], spans["handler"]
        assert call["parent"] == caller_span
        assert handler["parent"] == call["span_id"] and handler["service"] == "traced-ray"
        assert spans["inner"]["parent"] == handler["span_id"]
    finally:
        gateway.stop()
