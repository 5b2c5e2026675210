"""``/metrics`` against a real gateway: exact call counts, bounded labels, replica gauges.

One gateway for the module; each function's calls are made once (``calls`` fixture),
so every test can check exact numbers.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GatewayProcess, deploy

COUNTED = """
import dcf


def Handler(req):
    if req.input == b"raise":
        raise RuntimeError("the handler broke")
    if req.input == b"bad":
        raise dcf.HTTPError(400, "bad input")
    return req.input
"""

ECHO = """
def Handler(req):
    return req.input
"""

OK_CALLS = 7  # through HTTP
CLI_CALLS = 1  # through `dcf function call`
ASYNC_CALLS = 1  # through /async-function/
RAISING_CALLS = 3  # handler raises: 500
REJECTED_CALLS = 2  # dcf.HTTPError(400, ...)
UNKNOWN_CALLS = 4


# fixtures and helpers ------------------------------------------------------------------------



@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("functions")


@pytest.fixture(scope="module")
def calls(gw: GatewayProcess, root: Path) -> dict[str, int]:
    """Deploy ``counted`` and call it in every way; returns the calls made by status code."""
    deploy(gw, root, "counted", COUNTED)
    with gw.http() as http:
        for i in range(OK_CALLS):
            response = http.post("/function/counted", content=f"call {i}".encode())
            assert response.status_code == 200, response.text
        for _ in range(RAISING_CALLS):
            response = http.post("/function/counted", content=b"raise")
            assert response.status_code == 500, response.text
            assert response.json()["function"] == "counted"
        for _ in range(REJECTED_CALLS):
            response = http.post("/function/counted", content=b"bad")
            assert response.status_code == 400, response.text
            assert response.json() == {"error": "bad input", "function": "counted"}
        for _ in range(ASYNC_CALLS):
            job = http.post("/async-function/counted", content=b"later")
            assert job.status_code == 202, job.text
            _wait_job(http, job.json()["id"])
    for _ in range(CLI_CALLS):
        result = gw.dcf("function", "call", "counted", input=b"from the cli")
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == b"from the cli"
    return {"200": OK_CALLS + CLI_CALLS + ASYNC_CALLS, "500": RAISING_CALLS, "400": REJECTED_CALLS}


def _wait_job(http, job_id: str, timeout: float = 30) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = http.get(f"/async-function/jobs/{job_id}")
        if response.headers.get("x-dcf-job-status") == "done":
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def scrape(gw: GatewayProcess) -> dict[str, object]:
    """Metric families by name, parsed by the Prometheus client's own parser."""
    with gw.http() as http:
        response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def samples(families: dict, family: str, sample: str, **labels: str) -> list:
    """Samples named ``sample`` of ``family`` whose labels include ``labels``."""
    return [
        s
        for s in families[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def value(families: dict, family: str, sample: str, **labels: str) -> float:
    found = samples(families, family, sample, **labels)
    assert len(found) == 1, f"{sample}{labels}: {found}"
    return found[0].value


def calls_by_code(families: dict, function: str) -> dict[str, int]:
    found = samples(families, "dcf_function_calls", "dcf_function_calls_total", function=function)
    return {s.labels["code"]: int(s.value) for s in found}


def wait_for(check, timeout: float = 30):  # noqa: ANN001, ANN201
    """Until ``check()`` returns something truthy; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


# tests ---------------------------------------------------------------------------------------


def test_metrics_parse_and_name_the_families(gw: GatewayProcess, calls: dict) -> None:
    families = scrape(gw)
    kinds = {
        "dcf_function_calls": "counter",
        "dcf_function_call_seconds": "histogram",
        "dcf_gateway_unknown_function_calls": "counter",
        "dcf_function_replicas_ready": "gauge",
        "dcf_function_replicas_desired": "gauge",
        "dcf_function_inflight": "gauge",
        "dcf_function_queued": "gauge",
        "dcf_function_cold_starts": "counter",
    }
    for name, kind in kinds.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind, name
    # Labels stay bounded: function and status code, nothing per request.
    for s in families["dcf_function_calls"].samples:
        assert set(s.labels) == {"function", "code"}, s


def test_call_counts_by_status_code_are_exact(gw: GatewayProcess, calls: dict) -> None:
    assert calls_by_code(scrape(gw), "counted") == calls
    # Reading the metrics or the management API counts nothing.
    with gw.http() as http:
        http.get("/system/function/counted")
        http.get("/system/functions")
    assert calls_by_code(scrape(gw), "counted") == calls


def test_info_errors_count_server_errors(gw: GatewayProcess, calls: dict) -> None:
    with gw.http() as http:
        info = http.get("/system/function/counted").json()
    assert info["errors"] == calls["500"]
    assert info["invocations"] == sum(calls.values())


def test_latency_histogram_counts_every_call(gw: GatewayProcess, calls: dict) -> None:
    families = scrape(gw)
    family, total = "dcf_function_call_seconds", sum(calls.values())
    assert value(families, family, f"{family}_count", function="counted") == total
    assert value(families, family, f"{family}_sum", function="counted") > 0
    buckets = samples(families, family, f"{family}_bucket", function="counted")
    by_bound = sorted((float(s.labels["le"]), s.value) for s in buckets)
    assert by_bound[-1] == (math.inf, total)
    counts = [count for _, count in by_bound]
    assert counts == sorted(counts), "bucket counts must be cumulative"


def test_unknown_function_counts_without_a_label(gw: GatewayProcess, calls: dict) -> None:
    unknown = "dcf_gateway_unknown_function_calls"
    before = value(scrape(gw), unknown, f"{unknown}_total")
    with gw.http() as http:
        for i in range(UNKNOWN_CALLS):
            response = http.post(f"/function/no-such-fn-{i % 2}", content=b"x")
            assert response.status_code == 404
            assert response.json()["function"] == f"no-such-fn-{i % 2}"
    families = scrape(gw)
    assert value(families, unknown, f"{unknown}_total") == before + UNKNOWN_CALLS
    for family in families.values():
        for s in family.samples:
            assert not s.labels.get("function", "").startswith("no-such-fn"), s
    # Known functions' counts did not move.
    assert calls_by_code(families, "counted") == calls


def test_unknown_async_function_is_counted_too(gw: GatewayProcess, calls: dict) -> None:
    unknown = "dcf_gateway_unknown_function_calls"
    before = value(scrape(gw), unknown, f"{unknown}_total")
    with gw.http() as http:
        assert http.post("/async-function/no-such-async", content=b"x").status_code == 404
    families = scrape(gw)
    assert not samples(
        families, "dcf_function_calls", "dcf_function_calls_total", function="no-such-async"
    )
    assert value(families, unknown, f"{unknown}_total") == before + 1


def test_cli_list_invocations_equal_the_counter(gw: GatewayProcess, calls: dict) -> None:
    result = gw.dcf("function", "list", check=True)
    lines = result.stdout.decode().splitlines()
    header = lines[0].split()
    assert "Invocations" in header, lines[0]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    listed = int(rows["counted"][header.index("Invocations")])
    assert listed == sum(calls_by_code(scrape(gw), "counted").values()) == sum(calls.values())
    with gw.http() as http:
        summary = {f["name"]: f for f in http.get("/system/functions").json()}
    assert summary["counted"]["invocations"] == listed


def test_replica_gauges_follow_scaling(gw: GatewayProcess, root: Path, calls: dict) -> None:
    deploy(gw, root, "pair", ECHO, replicas={"min": 2, "max": 3})

    def gauges(name: str) -> tuple[float, float]:
        families = scrape(gw)
        return (
            value(
                families,
                "dcf_function_replicas_ready",
                "dcf_function_replicas_ready",
                function=name,
            ),
            value(
                families,
                "dcf_function_replicas_desired",
                "dcf_function_replicas_desired",
                function=name,
            ),
        )

    assert wait_for(lambda: gauges("pair") == (2, 2)), gauges("pair")
    assert gauges("counted") == (1, 1)
    with gw.http() as http:
        # Every function's gauges agree with what the API reports.
        for fn in http.get("/system/functions").json():
            assert gauges(fn["name"]) == (fn["replicas"]["ready"], fn["replicas"]["desired"])
        response = http.post("/system/function/pair/scale", json={"min": 1, "max": 1})
        assert response.status_code == 200, response.text
    assert wait_for(lambda: gauges("pair") == (1, 1)), gauges("pair")
    with gw.http() as http:
        replicas = http.get("/system/function/pair").json()["replicas"]
    assert gauges("pair") == (replicas["ready"], replicas["desired"])

    # A deleted function leaves no series behind (counter and histogram included).
    with gw.http() as http:
        assert http.post("/function/pair", content=b"x").status_code == 200
        assert calls_by_code(scrape(gw), "pair") == {"200": 1}
        assert http.delete("/system/function/pair").status_code == 200
    families = scrape(gw)
    for family in families.values():
        assert all(s.labels.get("function") != "pair" for s in family.samples), family.name
