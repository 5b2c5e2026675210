"""The same echo and SSD functions served by Ray Serve, measured like DCF's rows.

Two Ray sessions, one after the other (Ray reads its serving mode from the
environment when it starts): ``proxy`` (defaults, through Serve's HTTP proxy)
and ``direct`` (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, each replica called on its
own port). Echo rows pin every Ray process to the server core, as DCF's are;
SSD rows let them use every core, as DCF's do.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

from bench import apps, util
from bench.context import ECHO_BODY, Context, big_body
from bench.echo import best_of, measure

MAX_ONGOING = {"echo": 64, "ssd": 8, "ssd-batch": 16}


def available() -> str | None:
    """Why the Ray rows cannot run, or None."""
    if importlib.util.find_spec("ray") is None:
        return 'ray is not installed: pip install "ray[serve]" (or pip install -e ".[bench]")'
    if importlib.util.find_spec("ray.serve") is None:
        return 'ray is installed without Serve: pip install "ray[serve]"'
    return None


def _start(mode: str, ssd_dir: str | None, log: Path) -> tuple[subprocess.Popen, dict]:
    port = util.free_port()
    cmd = [sys.executable, "-m", "bench.ray_driver", "--mode", mode, "--port", str(port)]
    cmd += ["--direct-base-port", str(_free_range())]
    for key, flag in (
        ("echo", "--echo-max-ongoing"),
        ("ssd", "--ssd-max-ongoing"),
        ("ssd-batch", "--ssd-batch-max-ongoing"),
    ):
        cmd += [flag, str(MAX_ONGOING[key])]
    if ssd_dir:
        cmd += ["--ssd-dir", ssd_dir]
    proc = util.spawn(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=util.ROOT, stderr_log=log
    )
    return proc, util.read_json_line(proc, b"RAYJSON", 240, f"Ray ({mode})", log)


def _free_range(span: int = 100) -> int:
    """A base port with ``span`` free ports above it (for direct ingress)."""
    import socket

    for base in range(30000, 60000, 1000):
        ok = True
        for port in range(base, base + span):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    return 30000


def _session(ctx: Context, mode: str, ssd_dir: str | None, bodies: list[bytes]) -> dict:
    util.log(f"ray: starting Ray Serve ({mode})")
    started = time.perf_counter()
    proc, info = _start(mode, ssd_dir, Path(util.tempdir("dcf-bench-ray-"), "ray.log"))
    out: dict = {"info": info, "driver_wall_to_ready_s": round(time.perf_counter() - started, 2)}
    try:
        urls = info["urls"]
        time.sleep(1)
        out["rss_mb_all_processes"] = util.tree_rss_mb(proc.pid)
        duration, warm = ctx.echo_duration, ctx.warmup
        if ctx.cpus.pinned:
            util.set_affinity_tree(proc.pid, ctx.cpus.server)
        echo: dict = {}
        # CPU per call of Ray as a whole: every process of the local cluster.
        tree = {"ray (all processes)": util.descendants(proc.pid)}
        for conns in (1, 8, 64):
            ctx.settle()
            util.log(f"ray ({mode}): echo, {conns} connection(s)")
            echo[f"c{conns}"] = _best(ctx, urls["echo"], conns, [ECHO_BODY], duration, warm, tree)
        ctx.settle()
        echo["big_c8"] = _best(ctx, urls["echo"], 8, [big_body()], duration, warm, tree)
        out["echo"] = echo
        if ctx.cpus.pinned:
            util.set_affinity_tree(proc.pid, ctx.cpus.all)
        if ssd_dir and bodies:
            for app in ("ssd", "ssd-batch"):
                if app not in urls:
                    out[app] = {"skipped": f"no URL found for {app}"}
                    continue
                ctx.settle()
                util.log(f"ray ({mode}): {app}")
                out[app] = {
                    f"c{conc}": ctx.gen_shared.run(
                        urls[app], conc, ctx.ssd_duration, bodies, warmup=ctx.warmup
                    )
                    for conc in (1, 8)
                }
        return out
    finally:
        assert proc.stdin is not None
        try:
            proc.stdin.close()  # the driver shuts Serve and Ray down
            proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        util.stop(proc)


def _best(
    ctx: Context,
    url: str,
    conns: int,
    bodies: list[bytes],
    duration: float,
    warm: float,
    pids: dict[str, int | list[int]],
) -> dict:
    runs = [
        measure(ctx.gen, url, conns, duration, bodies, warm if i == 0 else 0, pids)
        for i in range(ctx.repeats)
    ]
    return best_of(runs)


def run(ctx: Context, with_ssd: bool = True) -> dict:
    why = available()
    if why:
        return {"skipped": why}
    ssd_dir = None
    bodies: list[bytes] = []
    if with_ssd and apps.ssd_example_ready(ctx.example):
        ssd_dir = apps.prepare_ssd_dir(ctx.example)
        bodies = apps.ssd_bodies(ctx.example)
    out: dict = {
        "max_ongoing_requests": MAX_ONGOING,
        "repeats": ctx.repeats,
        "duration_s": ctx.echo_duration,
        "ssd_s": ctx.ssd_duration,
    }
    for mode in ("proxy", "direct"):
        try:
            out[mode] = _session(ctx, mode, ssd_dir, bodies)
        except Exception as exc:  # noqa: BLE001 - one mode failing must not lose the other
            util.log(f"ray ({mode}) failed: {exc}")
            out[mode] = {"skipped": f"failed: {exc}"}
    return out
