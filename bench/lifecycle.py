"""Cold start (create → Ready, scale-from-zero → first answer) and gateway memory."""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from bench import apps, util
from bench.context import ECHO_BODY, Context
from bench.gateway import Gateway

ZERO = {"min": 0, "max": 1, "idle_timeout": "1s", "scale_down_delay": "1s"}


def _first_call(port: int, path: str, body: bytes) -> tuple[float, int]:
    """Seconds to the first answer on a fresh connection, and its status."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, body=body)
        response = conn.getresponse()
        response.read()
        return time.perf_counter() - start, response.status
    finally:
        conn.close()


def _scaled_to_zero(gw: Gateway, name: str, timeout: float = 60) -> float:
    start = time.perf_counter()
    util.wait_for(
        lambda: gw.info(name)["status"] == "Scaled to zero",
        timeout,
        f"{name} reporting 'Scaled to zero'",
        interval=0.1,
    )
    return time.perf_counter() - start


def _from_zero(gw: Gateway, name: str, body: bytes, times: int) -> dict:
    firsts, idles = [], []
    warm = None
    for _ in range(times):
        idles.append(round(_scaled_to_zero(gw, name), 2))
        time.sleep(0.3)  # no call in flight, nothing starting
        seconds, status = _first_call(gw.port, f"/function/{name}", body)
        if status != 200:
            raise RuntimeError(f"first call to {name} after scale to zero answered {status}")
        firsts.append(round(seconds, 3))
        warm = _first_call(gw.port, f"/function/{name}", body)[0]
    return {
        "first_answer_s": firsts,
        "median_s": util.median(firsts),
        "best_s": min(firsts),
        "warm_call_s": round(warm, 4) if warm else None,
        "seconds_until_scaled_to_zero": idles,
    }


def coldstart(ctx: Context, ssd: dict | None) -> dict:
    echo_dir = apps.write_echo_dir()
    times = 1 if ctx.quick else 3
    util.log("coldstart: gateway, create → Ready")
    gw = Gateway(label="coldstart gateway")
    out: dict = {}
    try:
        creates = [
            round(gw.deploy(f"cold-{i}", echo_dir, "echo_async.py"), 3) for i in range(times)
        ]
        out["create_ready_s"] = creates
        out["create_ready_median_s"] = util.median(creates)
        out["create_ready_best_s"] = min(creates)
        out["cli_create_s"] = _cli_create(gw, echo_dir)

        util.log("coldstart: scale from zero → first answer (echo)")
        gw.deploy("zero", echo_dir, "echo_async.py", replicas=ZERO)
        out["from_zero_echo"] = _from_zero(gw, "zero", ECHO_BODY, times)

        if ssd and apps.ssd_example_ready(ctx.example):
            util.log("coldstart: create → Ready and scale from zero (SSD)")
            ssd_dir = apps.prepare_ssd_dir(ctx.example)
            body = apps.ssd_bodies(ctx.example)[0]
            out["ssd_create_ready_s"] = round(
                gw.deploy("ssd-cold", ssd_dir, "bench_ssd.py", "Unbatched"), 3
            )
            gw.deploy("ssd-zero", ssd_dir, "bench_ssd.py", "Unbatched", replicas=ZERO)
            out["from_zero_ssd"] = _from_zero(gw, "ssd-zero", body, max(1, times - 1))
            out["ssd_model_load_s"] = ssd.get("model_load_s")
            out["ssd_import_s"] = ssd.get("import_s")
        return out
    finally:
        gw.stop()


def _cli_create(gw: Gateway, echo_dir: str) -> float:
    """``dcf function create -f config.yaml``, timed from the shell's point of view."""
    config = Path(echo_dir, "config.yaml")
    config.write_text(
        yaml.safe_dump(
            {
                "dcf": {"gateway": f"127.0.0.1:{gw.port}"},
                "functions": {
                    "cold-cli": {"handler": {"dir": ".", "file": "echo_async.py"}},
                },
            }
        )
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dcf.cli.main", "function", "create", "-f", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=echo_dir,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"dcf function create failed: {proc.stdout}{proc.stderr}")
    return round(elapsed, 3)


def memory(ctx: Context) -> dict:
    echo_dir = apps.write_echo_dir()
    util.log("memory: gateway with 10 functions")
    gw = Gateway(label="memory gateway")
    out: dict = {}
    try:
        time.sleep(0.5)
        out["idle_rss_mb"] = round(gw.rss_mb(), 1)
        errors: list[BaseException] = []

        def deploy(i: int) -> None:
            try:
                gw.deploy(f"fn-{i}", echo_dir, "echo_async.py" if i % 2 else "echo_sync.py")
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        start = time.perf_counter()
        threads = [threading.Thread(target=deploy, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        out["deploy_10_s"] = round(time.perf_counter() - start, 2)
        time.sleep(0.5)
        out["rss_10_functions_mb"] = round(gw.rss_mb(), 1)

        # Traffic on every function, then the dashboard's and Prometheus' reads.
        calls = 50 if ctx.quick else 300
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        for n in range(calls):
            for i in range(10):
                conn.request("POST", f"/function/fn-{i}", body=ECHO_BODY)
                response = conn.getresponse()
                response.read()
                assert response.status == 200, response.status
            if n % 50 == 0:
                for path in ("/metrics", "/system/functions"):
                    conn.request("GET", path)
                    conn.getresponse().read()
        conn.close()
        out["calls"] = calls * 10
        out["rss_after_calls_mb"] = round(gw.rss_mb(), 1)
        out["peak_rss_mb"] = round(util.rss_mb(gw.pid, "VmHWM") or 0, 1)
        replicas = [p for i in range(10) for p in gw.replica_pids(f"fn-{i}")]
        out["replicas"] = len(replicas)
        out["replica_rss_mb_each"] = round(
            sum(util.rss_mb(p) or 0 for p in replicas) / max(1, len(replicas)), 1
        )
        out["total_rss_mb"] = util.tree_rss_mb(gw.pid)
        return out
    finally:
        gw.stop()
