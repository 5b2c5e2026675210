"""Tracing's cost: echo through the gateway with tracing off, on at 100% and on at 1%.

All in one run, each its own gateway (and replica) on the server core(s), measured
in interleaved rounds at 8 connections, exporting to a local OTLP/HTTP sink (on the
load generator's core: a real collector would be a process of its own). ``off`` is
measured twice per round, as two rows: their difference is this run's noise.

With ``DCF_BENCH_BASELINE=DIR`` (a checkout of DCF, e.g. main before tracing), a
gateway of that code runs beside them: "off is within noise of today" is then a
ratio from the same run. ``python -m bench.tracing sink PORT`` is the sink alone.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import apps, util
from bench.context import ECHO_BODY, Context
from bench.echo import Target, best_of, measure
from bench.gateway import Gateway

CONNECTIONS = 8
ORDER = ("off", "on-1%", "baseline", "off-again", "on-100%")
"""The order of a round; ``off-again`` is the off gateway measured a second time."""
DRAIN = 6.0
"""Seconds after the every-call run before the next: its span processors' last exports
(every 5 s) are done by then."""


def _rounds(ctx: Context, targets: list[Target], repeats: int) -> dict[str, dict]:
    """Each target warmed up, then ``repeats`` rounds of one run each, interleaved (as
    ``echo.compare``), with a pause after the every-call run so that its exports do not
    land on the next run."""
    ctx.settle()
    for key, url, _, python in targets:
        ctx.gen.run(url, CONNECTIONS, ctx.warmup, [ECHO_BODY], warmup=0, python=python)
        if key == "on-100%":
            time.sleep(DRAIN)
    runs: dict[str, list[dict]] = {key: [] for key, *_ in targets}
    for _ in range(repeats):
        for key, url, pids, python in targets:
            duration = ctx.echo_duration
            result = measure(ctx.gen, url, CONNECTIONS, duration, [ECHO_BODY], 0, pids, python)
            runs[key].append(result)
            if key == "on-100%":
                time.sleep(DRAIN)
    return {key: best_of(r) for key, r in runs.items()}


def serve_sink(port: int) -> None:
    """An OTLP/HTTP endpoint that takes every export (200) and counts requests and bytes."""
    counts = {"requests": 0, "bytes": 0}
    lock = threading.Lock()

    class Sink(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            size = int(self.headers.get("content-length", 0))
            self.rfile.read(size)
            with lock:
                counts["requests"] += 1
                counts["bytes"] += size
            self._answer(b"", "application/x-protobuf")

        def do_GET(self) -> None:  # noqa: N802
            with lock:
                self._answer(json.dumps(counts).encode(), "application/json")

        def _answer(self, body: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()


def _sink_counts(url: str) -> dict:
    return json.loads(util.http("GET", url + "/stats")[1])


def _baseline_commit(directory: str) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=directory,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def overhead(sink_url: str, calls: int = 20_000) -> dict:
    """CPU µs that tracing adds to one call, measured in this process around DCF's own
    tracing code (the gateway's wrapper and queue span, the replica's traced invoker),
    with a trivial call inside: a figure that other work on the machine sways far less
    than req/s. ``sampled`` includes exporting (the span processor's thread)."""
    import asyncio

    from dcf import telemetry
    from dcf.gateway.observe.tracing import GatewayTracing
    from dcf.runtime.handler import Invoker
    from dcf.runtime.request import Request
    from dcf.runtime.tracing import TracedInvoker

    url = sink_url + telemetry.TRACES_PATH
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/function/echo",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"content-length", b"100")],
    }

    async def acquire() -> object:
        return _Link

    async def receive() -> dict:
        return {}

    async def send(message: dict) -> None:
        pass

    def gateway_app(tracer: GatewayTracing | None):  # noqa: ANN202
        async def app(scope, receive, send) -> None:  # noqa: ANN001
            if tracer is None:
                await acquire()
            else:
                await tracer.queued(acquire)
            await send({"type": "http.response.start", "status": 200})

        return app

    async def loop(app) -> float:  # noqa: ANN001
        for _ in range(200):
            await app(scope, receive, send)
        start = time.process_time()
        for _ in range(calls):
            await app(scope, receive, send)
        return time.process_time() - start

    def gateway(ratio: float | None) -> float:
        if ratio is None:
            return asyncio.run(loop(gateway_app(None)))
        tracer = GatewayTracing(telemetry.TraceSettings(url, "parentbased_traceidratio", ratio))
        spent = asyncio.run(loop(tracer.wrap(gateway_app(tracer))))
        start = time.process_time()
        tracer.close()  # the export of what is left, counted too
        return spent + time.process_time() - start

    def replica(traced: bool | None) -> float:
        inner = Invoker(lambda req: req.input, "echo")
        invoker: object = inner
        if traced is not None:
            settings = telemetry.TraceSettings(url, "parentbased_always_off")
            invoker = TracedInvoker(inner, settings, {"function": "echo", "version": "1"})
        headers = {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"} if traced else {}
        start = time.process_time()
        for _ in range(calls):
            invoker.call_now(Request(input=b"x", headers=dict(headers)))  # type: ignore[attr-defined]
        spent = time.process_time() - start
        if traced is not None:
            start = time.process_time()
            invoker.provider.shutdown()  # type: ignore[attr-defined]
            spent += time.process_time() - start
        return spent

    per_call = 1e6 / calls
    bare_gw, bare_replica = gateway(None), replica(None)
    out = {
        "calls": calls,
        "gateway_unsampled_us": (gateway(0.0) - bare_gw) * per_call,
        "gateway_sampled_us": (gateway(1.0) - bare_gw) * per_call,
        "replica_unsampled_us": (replica(False) - bare_replica) * per_call,
        "replica_sampled_us": (replica(True) - bare_replica) * per_call,
    }
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


class _Link:
    id = "echo-v1-1"


def run(ctx: Context) -> dict:
    server = ctx.cpus.server
    echo_dir = apps.write_echo_dir()
    port = util.free_port()
    sink_url = f"http://127.0.0.1:{port}"
    sink = util.spawn(
        [sys.executable, "-m", "bench.tracing", "sink", str(port)],
        cpus=ctx.cpus.client,
        cwd=util.ROOT,
    )
    baseline_dir = os.environ.get("DCF_BENCH_BASELINE")
    modes: dict[str, dict] = {
        "off": {"extra": []},
        "on-100%": {"extra": ["--otlp-endpoint", sink_url, "--trace-sample", "1"]},
        "on-1%": {"extra": ["--otlp-endpoint", sink_url, "--trace-sample", "0.01"]},
    }
    if baseline_dir:
        modes["baseline"] = {"extra": [], "env": {"PYTHONPATH": str(Path(baseline_dir))}}
    gateways: dict[str, Gateway] = {}
    try:
        util.wait_http(sink_url + "/stats", proc=sink)
        for mode, how in modes.items():
            util.log(f"tracing: starting the {mode} gateway")
            # Not the bench's own OTEL_ settings, if any: only the flags turn tracing on.
            env = {k: "" for k in os.environ if k.startswith("OTEL_")}
            gw = gateways[mode] = Gateway(
                cpus=server, label=mode, extra=how["extra"], env={**env, **how.get("env", {})}
            )
            gw.deploy("echo", echo_dir, "echo_async.py", concurrency=64)
            status, answer = util.http("POST", gw.function_url("echo"), ECHO_BODY)
            assert status == 200 and answer == ECHO_BODY, (mode, status, answer[:200])
        targets: list[Target] = []
        # Every call sampled goes last in a round: its gateway and replica go on exporting
        # their backlog for a while after their run, on the cores the next run uses.
        for mode in [m for m in ORDER if m.removesuffix("-again") in gateways]:
            gw = gateways[mode.removesuffix("-again")]
            pids = {"gateway": gw.pid, "replica": gw.replica_tree("echo")}
            targets.append((mode, gw.function_url("echo"), pids, False))
        before = _sink_counts(sink_url)
        repeats = ctx.repeats
        util.log(f"tracing: {CONNECTIONS} connections, {repeats} interleaved round(s)")
        rows = _rounds(ctx, targets, repeats)
        after = _sink_counts(sink_url)
        util.log("tracing: its CPU per call, in process")
        cost = overhead(sink_url)
        out: dict = {
            "connections": CONNECTIONS,
            "repeats": repeats,
            "duration_s": ctx.echo_duration,
            "cpus": ctx.cpus.describe(),
            "generator": ctx.gen.name,
            "rows": rows,
            "sink": {k: after[k] - before[k] for k in after},
            "overhead": cost,
        }
        if baseline_dir:
            out["baseline"] = {"dir": baseline_dir, "commit": _baseline_commit(baseline_dir)}
        return out
    finally:
        for gw in gateways.values():
            gw.stop()
        util.stop(sink)


def _rps(rows: dict, key: str) -> float | None:
    row = rows.get(key) or {}
    return row.get("rps")


def _cpu_per_call(rows: dict, key: str) -> float | None:
    """CPU µs per call of the gateway and its replica together: what tracing adds to each
    call, less swayed than req/s by other work on a shared machine."""
    cpu = (rows.get(key) or {}).get("cpu_us_per_req") or {}
    return sum(cpu.values()) if cpu else None


def table(result: dict) -> str:
    """The markdown for ``python -m bench`` (report.py) and this part's own file."""
    if "skipped" in result:
        return f"## Tracing — skipped: {result['skipped']}"
    rows = result["rows"]
    off = _rps(rows, "off")
    labels = {
        "off": "tracing off",
        "off-again": "tracing off, measured again (noise)",
        "on-1%": "tracing on, 1% of calls sampled",
        "on-100%": "tracing on, every call sampled",
        "baseline": f"baseline checkout ({(result.get('baseline') or {}).get('commit', '')})",
    }
    lines = [
        f"## Tracing — echo through the gateway at {result['connections']} connections;"
        f" best of {result['repeats']} interleaved runs of {result['duration_s']} s;"
        f" {result['cpus']}",
        "",
        "| gateway | req/s | vs off | p50 ms | p99 ms | CPU µs/req gateway | replica |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in labels.items():
        row = rows.get(key)
        if not row:
            continue
        cpu = row.get("cpu_us_per_req") or {}
        ratio = f"{row['rps'] / off:.3f}" if off else "–"
        cells = [
            label,
            f"{row['rps']:,.0f}",
            ratio,
            f"{row.get('p50_ms', 0):.3f}",
            f"{row.get('p99_ms', 0):.3f}",
            str(cpu.get("gateway", "–")),
            str(cpu.get("replica", "–")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    sink = result.get("sink") or {}
    lines += [
        "",
        f"The sink took {sink.get('requests', 0)} exports ({sink.get('bytes', 0):,} bytes)"
        " during the measured runs.",
    ]
    cost = result.get("overhead")
    if cost:
        lines += [
            "",
            f"CPU that tracing adds to one call, measured in process ({cost['calls']:,} calls"
            " around DCF's tracing code, a trivial call inside; sampled includes exporting):",
            "",
            "| per call | gateway µs | replica µs |",
            "|---|---:|---:|",
            f"| not sampled | {cost['gateway_unsampled_us']} | {cost['replica_unsampled_us']} |",
            f"| sampled | {cost['gateway_sampled_us']} | {cost['replica_sampled_us']} |",
        ]
    return "\n".join(lines)


def targets(result: dict) -> list[dict]:
    """The issue's goals as ratios of this run: off within noise, 1% sampling ≤ 5% cost."""
    if "skipped" in result:
        return []
    rows = result["rows"]
    off, again = _rps(rows, "off"), _rps(rows, "off-again")
    out = []
    noise = abs(off / again - 1) if off and again else None
    one = _rps(rows, "on-1%")
    if off and one:
        cost = 1 - one / off
        out.append(
            {
                "target": "tracing on, 1% sampled: cost vs off",
                "value": cost,
                "measured": f"{100 * cost:.1f}%",
                "goal": "≤ 5%",
                "status": "MET" if cost <= 0.05 else "MISSED",
                "note": f"this run's noise (off vs off again): {100 * noise:.1f}%"
                if noise is not None
                else "",
            }
        )
    cpu_off, cpu_one = _cpu_per_call(rows, "off"), _cpu_per_call(rows, "on-1%")
    cpu_again = _cpu_per_call(rows, "off-again")
    if cpu_off and cpu_one:
        cost = cpu_one / cpu_off - 1
        spread = abs(cpu_off / cpu_again - 1) if cpu_again else None
        out.append(
            {
                "target": "tracing on, 1% sampled: CPU per call vs off (gateway + replica)",
                "value": cost,
                "measured": f"{100 * cost:+.1f}% ({cpu_one:.0f} vs {cpu_off:.0f} µs)",
                "goal": "≤ 5%",
                "status": "MET" if cost <= 0.05 else "MISSED",
                "note": f"off vs off again: {100 * spread:.1f}%" if spread is not None else "",
            }
        )
    cost = result.get("overhead")
    if cost and cpu_off:
        unsampled = cost["gateway_unsampled_us"] + cost["replica_unsampled_us"]
        sampled = cost["gateway_sampled_us"] + cost["replica_sampled_us"]
        added = unsampled + 0.01 * sampled
        out.append(
            {
                "target": "tracing on, 1% sampled: CPU it adds per call (in process)"
                " vs the off row's CPU per call",
                "value": added / cpu_off,
                "measured": f"{100 * added / cpu_off:.1f}% ({added:.1f} of {cpu_off:.0f} µs)",
                "goal": "≤ 5%",
                "status": "MET" if added / cpu_off <= 0.05 else "MISSED",
                "note": f"{unsampled:.1f} µs a call + 1% of {sampled:.0f} µs",
            }
        )
    base = _rps(rows, "baseline")
    if off and base:
        delta = off / base - 1
        within = noise is not None and abs(delta) <= max(noise, 0.02)
        out.append(
            {
                "target": "tracing off vs the baseline checkout",
                "value": delta,
                "measured": f"{100 * delta:+.1f}%",
                "goal": "within noise",
                "status": "MET" if within else "MISSED",
                "note": f"noise {100 * noise:.1f}% (2% at least)" if noise is not None else "",
            }
        )
    full = _rps(rows, "on-100%")
    if off and full:
        out.append(
            {
                "target": "tracing on, every call sampled: cost vs off",
                "value": 1 - full / off,
                "measured": f"{100 * (1 - full / off):.1f}%",
                "goal": "–",
                "status": "info",
                "note": "",
            }
        )
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "sink":
        serve_sink(int(sys.argv[2]))
    else:
        sys.exit("usage: python -m bench.tracing sink PORT")
