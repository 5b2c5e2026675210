"""The sandbox's cost: the same echo on a ``--isolation sandbox`` and a ``process`` gateway.

Two gateways side by side, each on the server core(s), measured in turns so
that other work on the machine lands on both alike:

- create → Ready of the echo function (a cached environment: bwrap, the
  cgroup and the runtime's start are what differs);
- scale-from-zero → first answer (a replica started by the call itself);
- req/s and p50 at 1 and 8 connections (the wire is the same socket: the
  sandbox should cost nothing per call).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bench import apps, lifecycle, util
from bench.context import ECHO_BODY, Context
from bench.echo import Target, compare
from bench.gateway import Gateway

MODES = ("sandbox", "process")


def run(ctx: Context) -> dict:
    echo_dir = apps.write_echo_dir()
    times = 2 if ctx.quick else 5
    util.log("isolation: a sandbox and a process gateway")
    gateways = {
        m: Gateway(cpus=ctx.cpus.server, label=f"{m} gateway", extra=["--isolation", m])
        for m in MODES
    }
    out: dict = {m: {"create_ready_s": [], "from_zero_s": []} for m in MODES}
    try:
        util.log(f"isolation: create → Ready, {times} each, in turns")
        for i in range(times):
            for mode, gw in gateways.items():
                seconds = gw.deploy(f"cold-{i}", echo_dir, "echo_async.py")
                out[mode]["create_ready_s"].append(round(seconds, 3))
        for gw in gateways.values():
            gw.deploy("zero", echo_dir, "echo_async.py", replicas=lifecycle.ZERO)
        util.log(f"isolation: scale from zero → first answer, {times} each, in turns")
        for _ in range(times):
            for mode, gw in gateways.items():
                first = lifecycle._from_zero(gw, "zero", ECHO_BODY, 1)
                out[mode]["from_zero_s"].append(first["first_answer_s"][0])
        for mode in MODES:
            for key in ("create_ready_s", "from_zero_s"):
                out[mode][key.replace("_s", "_median_s")] = util.median(out[mode][key])
        for mode, gw in gateways.items():
            gw.deploy("echo", echo_dir, "echo_async.py", concurrency=64)
            out[mode]["limits"] = gw.info("echo")["replicas"]["list"][0].get("limits")
        rows: list[Target] = [
            (
                m,
                gw.function_url("echo"),
                {"gateway": gw.pid, "replica": gw.replica_tree("echo")},
                False,
            )
            for m, gw in gateways.items()
        ]
        for conns in (1, 8):
            util.log(f"isolation: echo at {conns} connection(s), {ctx.repeats} round(s)")
            measured = compare(
                ctx.gen,
                rows,
                conns,
                [ECHO_BODY],
                ctx.echo_duration,
                ctx.warmup,
                ctx.repeats,
                ctx.settle,
            )
            for mode, result in measured.items():
                out[mode][f"c{conns}"] = result
        out["repeats"] = ctx.repeats
        out["cpus"] = ctx.cpus.describe()
        return out
    finally:
        for gw in gateways.values():
            gw.stop()
        time.sleep(0.2)


def _get(results: dict, *keys: str) -> object:
    data: object = results.get("isolation")
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def table(results: dict) -> str | None:
    """Sandbox and process side by side, and the difference."""
    iso = results.get("isolation") or {}
    if not iso or "skipped" in iso:
        return None
    from bench.report import _table

    def row(label: str, path: tuple[str, ...], fmt: Callable[[float], str], delta: str) -> list:
        s, p = _get(results, "sandbox", *path), _get(results, "process", *path)
        if not isinstance(s, (int, float)) or not isinstance(p, (int, float)):
            return [label, "–", "–", "–"]
        diff = f"{1000 * (s - p):+.0f} ms" if delta == "ms" else f"{100 * (s / p - 1):+.1f}%"
        return [label, fmt(s), fmt(p), diff]

    seconds = lambda v: f"{v:.3f} s"  # noqa: E731
    rps = lambda v: f"{v:,.0f}"  # noqa: E731
    ms = lambda v: f"{v:.3f} ms"  # noqa: E731
    rows = [
        row("create → Ready, echo (median)", ("create_ready_median_s",), seconds, "ms"),
        row("scale-from-zero → first answer (median)", ("from_zero_median_s",), seconds, "ms"),
        row("echo req/s @1", ("c1", "rps"), rps, "%"),
        row("echo p50 @1", ("c1", "p50_ms"), ms, "%"),
        row("echo req/s @8", ("c8", "rps"), rps, "%"),
        row("echo p50 @8", ("c8", "p50_ms"), ms, "%"),
    ]
    return _table(["", "sandbox", "process", "sandbox − process"], rows)


def targets(results: dict, add: Callable[..., None]) -> None:
    """The issue's goals: cold start under +100 ms, no measurable change per call."""
    for label, key in (
        ("create → Ready", "create_ready_median_s"),
        ("scale-from-zero → first answer", "from_zero_median_s"),
    ):
        s, p = _get(results, "sandbox", key), _get(results, "process", key)
        if isinstance(s, (int, float)) and isinstance(p, (int, float)):
            add(
                f"sandbox − process: {label} (median)",
                s - p,
                f"{1000 * (s - p):+.0f} ms ({s:.3f} − {p:.3f} s)",
                "< +100 ms",
                lambda v: v < 0.1,
                lambda v: f"{1000 * (v - 0.1):.0f} ms",
            )
    for conns in (1, 8):
        s, p = (
            _get(results, "sandbox", f"c{conns}", "rps"),
            _get(results, "process", f"c{conns}", "rps"),
        )
        if isinstance(s, (int, float)) and isinstance(p, (int, float)) and p:
            add(
                f"sandbox / process: echo req/s @{conns}",
                s / p,
                f"{100 * s / p:.0f}% ({s:,.0f} / {p:,.0f})",
                "≥ 95% (no measurable change)",
                lambda v: v >= 0.95,
                lambda v: f"{100 * (0.95 - v):.0f} points",
            )
