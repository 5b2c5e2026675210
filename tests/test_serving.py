"""Batching and autoscaling through a real gateway (behaviour, never timing)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import GatewayProcess, deploy


def info(gw: GatewayProcess, name: str) -> dict:
    return gw.http().get(f"/system/function/{name}").json()


def wait_for(predicate, timeout: float = 30, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not reached in time")


BATCHED = """
    import time, dcf
    class Handler:
        @dcf.batch(max_size=8, max_wait_ms=20)
        def __call__(self, reqs):
            time.sleep(0.05)  # a forward pass: calls queue meanwhile and form the next batch
            return [dcf.HTTPError(400, "bad item") if r.input == b"bad"
                    else {"echo": r.input.decode(), "batch": len(reqs)} for r in reqs]
"""


def test_batched_calls_keep_their_own_answers_and_fail_alone(gw: GatewayProcess, tmp_path: Path):
    deploy(gw, tmp_path, "batched", BATCHED, concurrency=8)
    bodies = [b"bad" if i == 5 else str(i).encode() for i in range(24)]

    def call(body: bytes) -> httpx.Response:
        return httpx.post(gw.url + "/function/batched", content=body, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, bodies))
    for body, r in zip(bodies, results, strict=True):
        if body == b"bad":
            assert r.status_code == 400 and r.json()["error"] == "bad item"
        else:
            assert r.status_code == 200 and r.json()["echo"] == body.decode()
    assert max(r.json()["batch"] for r in results if r.status_code == 200) > 1
    lone = httpx.post(gw.url + "/function/batched", content=b"solo", timeout=30).json()
    assert lone == {"echo": "solo", "batch": 1}
    metrics = httpx.get(gw.url + "/metrics").text
    count = _sample(metrics, 'dcf_function_batch_size_count{function="batched"}')
    total = _sample(metrics, 'dcf_function_batch_size_sum{function="batched"}')
    assert 2 <= count < 25 and total == 25  # every call, counted once in its batch


def _sample(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.rsplit(" ", 1)[1])


def test_scales_up_under_load_and_back_down_after(gw: GatewayProcess, tmp_path: Path):
    deploy(gw, tmp_path, "elastic", """
        import time
        def Handler(req):
            time.sleep(0.1)
            return "ok"
    """, concurrency=1, replicas={"min": 1, "max": 3, "scale_down_delay": "1s"})
    stop = threading.Event()
    codes: list[int] = []

    def load() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                codes.append(http.post(gw.url + "/function/elastic").status_code)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: info(gw, "elastic")["replicas"]["ready"] == 3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(codes) == {200}
    wait_for(lambda: info(gw, "elastic")["replicas"]["desired"] == 1)
    wait_for(lambda: info(gw, "elastic")["replicas"]["ready"] == 1)
    assert "scaling 3 → " in gw.dcf("function", "log", "elastic").stdout.decode()


def test_scale_to_zero_and_back_with_the_first_call_succeeding(gw: GatewayProcess,
                                                              tmp_path: Path):
    deploy(gw, tmp_path, "sleepy", "def Handler(req):\n    return 'awake'\n",
           replicas={"min": 0, "max": 1, "idle_timeout": "1s", "scale_down_delay": "1s"})
    wait_for(lambda: info(gw, "sleepy")["status"] == "Scaled to zero")
    row = next(line for line in gw.dcf("function", "list").stdout.decode().splitlines()
               if line.startswith("sleepy"))
    assert row.endswith("Scaled to zero") and " 0/0 " in row
    r = httpx.post(gw.url + "/function/sleepy", timeout=30)
    assert (r.status_code, r.text) == (200, "awake")
    assert info(gw, "sleepy")["status"] == "Ready"
    wait_for(lambda: info(gw, "sleepy")["status"] == "Scaled to zero")


def test_scale_command_to_zero_minimum_then_calls_still_work(gw: GatewayProcess, tmp_path: Path):
    deploy(gw, tmp_path, "manual", "def Handler(req):\n    return 'here'\n",
           replicas={"min": 2, "max": 2, "idle_timeout": "1s", "scale_down_delay": "1s"})
    wait_for(lambda: info(gw, "manual")["replicas"]["ready"] == 2)
    gw.dcf("function", "scale", "manual", "--min", "0", "--max", "1", check=True)
    wait_for(lambda: info(gw, "manual")["status"] == "Scaled to zero")
    assert httpx.post(gw.url + "/function/manual", timeout=30).text == "here"
