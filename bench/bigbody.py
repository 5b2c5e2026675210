"""The large-body path: a 600 KB base64 echo through a bare uvicorn hop, DCF's local
backend and DCF's Ray backend, in turns, in one run.

``python -m bench bigbody``: the three servers (and the whole Ray cluster) on the
server core, wrk on the other; cells at 1, 8 and 64 connections, best of the
interleaved rounds, with the CPU µs per call of each server process. With py-spy
installed, flame graphs (SVG) of the gateway and the replica of both backends at 8
connections are written next to the results (``<name>-bigbody-<backend>-<process>.svg``):
they say where a 600 KB call's CPU goes.

With ``DCF_BENCH_BASELINE=DIR`` (a checkout of DCF, e.g. main before a change), a
gateway of that code with the local backend runs in turns with the others
(``baseline``), flame graphs included: before and after from one run.

Targets: DCF local ≥ 0.75 × the bare hop, DCF Ray backend ≥ 0.85 × DCF local (@8).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from bench import apps, util
from bench.context import Context, big_body
from bench.echo import Target, compare
from bench.gateway import Gateway
from bench.ray_backend import RayCluster, available

CONNS = (1, 8, 64)
LOCAL_TARGET = 0.75
RAY_TARGET = 0.85
FLAME_SECONDS = 6


def _python_of(pids: list[int]) -> int:
    """The Python process among ``pids`` (a sandbox's tree: bwrap, then the runtime)."""
    for pid in reversed(pids):
        try:
            if "python" in os.path.basename(os.readlink(f"/proc/{pid}/exe")):
                return pid
        except OSError:
            continue
    return pids[-1]


def _flames(ctx: Context, url: str, pids: dict[str, int], body: bytes, stem: Path) -> dict:
    """py-spy flame graphs of ``pids`` while wrk sends 600 KB calls at 8 connections."""
    spies = {}
    for key, pid in pids.items():
        out = stem.with_name(f"{stem.name}-{key}.svg")
        spies[key] = (out, util.py_spy(pid, out, "flamegraph", 200, FLAME_SECONDS, ctx.cpus))
    time.sleep(0.5)
    load = ctx.gen.run(url, 8, FLAME_SECONDS - 1, [body], warmup=0)
    files, errors = {}, []
    for key, (out, spy) in spies.items():
        _, err = spy.communicate(timeout=60)
        if spy.returncode:
            errors.append(f"{key}: {err.decode(errors='replace')[-300:]}")
        if out.exists():
            files[key] = str(out.relative_to(util.ROOT))
    return {"svg": files, "rps_while_sampled": load["rps"], "py_spy_errors": errors}


def run(ctx: Context, results_dir: Path | None = None, name: str = "bigbody") -> dict:
    big = big_body()
    server = ctx.cpus.server
    echo_dir = apps.write_echo_dir()
    out: dict = {
        "body_bytes": len(big),
        "generator": ctx.gen.name,
        "cpus": ctx.cpus.describe(),
        "repeats": ctx.repeats,
        "duration_s": ctx.echo_duration,
    }
    bare_port = util.free_port()
    bare = util.spawn(
        [sys.executable, "-m", "bench.apps", "starlette", str(bare_port)],
        cpus=server,
        cwd=util.ROOT,
    )
    local = Gateway(cpus=server, label="local gateway")
    baseline_dir = os.environ.get("DCF_BENCH_BASELINE")
    baseline: Gateway | None = None
    cluster: RayCluster | None = None
    ray: Gateway | None = None
    try:
        util.wait_http(f"http://127.0.0.1:{bare_port}/", proc=bare)
        local.deploy("echo", echo_dir, "echo_async.py", concurrency=64)
        # A sandboxed replica's pid is bwrap's: the runtime is below it.
        sandbox = util.descendants(local.replica_pids("echo")[0])
        local_pids = {"gateway": local.pid, "replica": _python_of(sandbox)}
        targets: list[Target] = [
            ("bare", f"http://127.0.0.1:{bare_port}/echo", {"server": bare.pid}, False),
            ("local", local.function_url("echo"), {**local_pids, "replica": sandbox}, False),
        ]
        flames = {"local": (local.function_url("echo"), local_pids)}
        if baseline_dir:
            out["baseline_dir"] = baseline_dir
            baseline = Gateway(
                cpus=server, label="baseline gateway", env={"PYTHONPATH": baseline_dir}
            )
            baseline.deploy("echo", echo_dir, "echo_async.py", concurrency=64)
            tree = util.descendants(baseline.replica_pids("echo")[0])
            base_pids = {"gateway": baseline.pid, "replica": _python_of(tree)}
            url = baseline.function_url("echo")
            targets.append(("baseline", url, {**base_pids, "replica": tree}, False))
            flames["baseline"] = (url, base_pids)
        why = available()
        if why:
            out["ray"] = {"skipped": why}
        else:
            util.log("bigbody: starting a Ray cluster and a gateway with the Ray backend")
            cluster = RayCluster(1, 2)
            if ctx.cpus.pinned:
                util.set_affinity_tree(cluster.pid, server)
            ray = Gateway(
                cpus=server,
                label="ray-backend gateway",
                extra=["--backend", "ray", "--ray-address", cluster.address],
                env={"RAY_USAGE_STATS_ENABLED": "0"},
                timeout=120,
            )
            ray.deploy("echo", echo_dir, "echo_async.py", concurrency=64)
            if ctx.cpus.pinned:
                util.set_affinity_tree(cluster.pid, server)  # the replica's actor too
            replica = ray.info("echo")["replicas"]["list"][0]["pid"]
            ray_pids = {"gateway": ray.pid, "replica": replica}
            rest = [p for p in cluster.pids() if p != replica]
            targets.append(("ray", ray.function_url("echo"), {**ray_pids, "ray": rest}, False))
        for key, url, _, _ in targets:
            status, answer = util.http("POST", url, big, timeout=30)
            if status != 200 or answer != big:
                raise RuntimeError(f"bigbody: {key} did not echo the body ({status})")
        for conns in CONNS:
            util.log(f"bigbody: 600 KB echo, {conns} connection(s), {ctx.repeats} round(s)")
            rows = compare(
                ctx.gen,
                targets,
                conns,
                [big],
                ctx.echo_duration,
                ctx.warmup,
                ctx.repeats,
                ctx.settle,
            )
            for key, result in rows.items():
                out.setdefault(key, {})[f"c{conns}"] = result
        if results_dir is not None and shutil.which("py-spy") and not ctx.quick:
            if ray is not None:
                flames["ray"] = (ray.function_url("echo"), ray_pids)
            out["flames"] = {}
            for backend, (url, pids) in flames.items():
                util.log(f"bigbody: py-spy flame graphs of the {backend} backend")
                stem = results_dir / f"{name}-bigbody-{backend}"
                out["flames"][backend] = _flames(ctx, url, pids, big, stem)
        return out
    finally:
        for g in (ray, local, baseline):
            if g is not None:
                g.stop()
        if cluster is not None:
            out["left_running"] = cluster.stop()
        util.stop(bare)


def _rps(part: dict, key: str, conns: int) -> float | None:
    return ((part.get(key) or {}).get(f"c{conns}") or {}).get("rps")


def table(results: dict) -> str | None:
    """The markdown table of this part, for bench/report.py."""
    part = results.get("bigbody")
    if not part:
        return None
    if "skipped" in part:
        return f"## 600 KB echo — skipped: {part['skipped']}"
    lines = [
        f"## 600 KB echo (bigbody) — {part.get('cpus')}; best of {part.get('repeats')} "
        f"interleaved runs of {part.get('duration_s')} s; {part.get('body_bytes')} bytes each way",
        "",
        "| target | req/s @1 | req/s @8 | req/s @64 | p50 @8 ms | p99 @8 ms | CPU µs/call @8 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    labels = {
        "bare": "bare uvicorn+Starlette",
        "baseline": f"DCF baseline ({part.get('baseline_dir')}), local backend",
        "local": "DCF, local backend",
        "ray": "DCF, Ray backend",
    }
    for key, label in labels.items():
        row = part.get(key) or {}
        if "c8" not in row:
            continue
        c8 = row["c8"]
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in (c8.get("cpu_us_per_req") or {}).items())
        cells = [f"{_rps(part, key, c) or 0:.0f}" for c in CONNS]
        lines.append(
            f"| {label} | {' | '.join(cells)} | {c8['p50_ms']:.2f} | {c8['p99_ms']:.2f} | {cpu} |"
        )
    return "\n".join(lines)


def targets(results: dict) -> list[dict]:
    part = results.get("bigbody") or {}
    rows = []
    for conns in (8, 64):
        base, now = _rps(part, "baseline", conns), _rps(part, "local", conns)
        if base and now:
            rows.append(
                {
                    "target": f"600 KB echo req/s @{conns}: DCF local / its baseline",
                    "value": round(now / base, 2),
                    "measured": f"{now / base:.2f}",
                    "goal": "(no goal)",
                    "status": "–",
                    "note": "",
                }
            )
        bare, local, ray = (_rps(part, k, conns) for k in ("bare", "local", "ray"))
        for label, num, den, goal in (
            (f"600 KB echo req/s @{conns}: DCF local / bare hop", local, bare, LOCAL_TARGET),
            (f"600 KB echo req/s @{conns}: DCF Ray backend / local", ray, local, RAY_TARGET),
        ):
            if not num or not den:
                continue
            ratio = num / den
            rows.append(
                {
                    "target": label,
                    "value": round(ratio, 2),
                    "measured": f"{ratio:.2f}",
                    "goal": f"≥ {goal}",
                    "status": "MET" if ratio >= goal else f"MISSED by {goal - ratio:.2f}",
                    "note": "",
                }
            )
    return rows
