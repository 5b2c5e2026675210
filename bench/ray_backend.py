"""DCF's Ray backend: the same gateway, echo and SSD, with each replica a Ray actor.

One small cluster for the part (``bench.ray_cluster``: a head with no CPUs and
one worker node with 2 CPUs, every node on 127.0.0.2 so nothing leaves
loopback), and one gateway that joins it as a driver (``dcf gateway start
--backend ray --ray-address ...``). Calls go gateway → replica over TCP on
127.0.0.2 (``dcf.wire``, one multiplexed connection), never through Ray.

- ``echo``: the echo part's async handler, ``concurrency: 64``, one replica;
  its rows are pinned like the local gateway's: the gateway and the whole
  cluster (GCS, raylets, the replica's worker process) on the server core, the
  load generator on the other. CPU per call is split into gateway, replica and
  the rest of Ray.
- ``ssd-test``: the SSD example's own handler with its config.yaml settings,
  one replica (the echo replica is deleted first), nothing pinned, as the local
  "example as shipped" row.

A gateway with the local backend serves the same two functions beside it, and
every cell is measured on both in turns (``compare`` interleaves them), so that
the Ray backend's ratio to the local backend is not skewed by other work on the
machine landing on one of them only.

Afterwards: no established connection of the gateway or the cluster may have
an end off loopback, and no process of the cluster may be left once it is shut
down (both are recorded and reported as targets).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

from bench import apps, ssd, util
from bench.context import ECHO_BODY, Context, big_body
from bench.echo import Target, best_of, compare
from bench.gateway import Gateway

WORKERS = 1
WORKER_CPUS = 2


def available() -> str | None:
    """Why the Ray backend's rows cannot run, or None."""
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed: pip install -e '.[ray]'"
    return None


class RayCluster:
    """``python -m bench.ray_cluster`` in a process of its own: everything of the cluster
    is below it, to pin and to stop at once."""

    def __init__(self, workers: int, worker_cpus: float) -> None:
        log = Path(util.tempdir("dcf-bench-raycluster-"), "cluster.log")
        cmd = [sys.executable, "-m", "bench.ray_cluster", "--workers", str(workers)]
        cmd += ["--worker-cpus", str(worker_cpus)]
        self.proc = util.spawn(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=util.ROOT, stderr_log=log
        )
        self.info = util.read_json_line(self.proc, b"CLUSTERJSON", 120, "the Ray cluster", log)
        self.address: str = self.info["address"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return util.descendants(self.pid)

    def stop(self) -> list[int]:
        """Remove the nodes (the helper's own shutdown), then kill whatever is left; returns
        the processes of the cluster that outlived its shutdown (should be none)."""
        seen = {pid: util.start_time(pid) for pid in self.pids()}
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        time.sleep(1)  # raylets end their workers on the way out
        left = util.still_running(seen)
        util.stop(self.proc)
        for pid in left:
            util.kill(pid)
        return left


def run(ctx: Context) -> dict:
    why = available()
    if why:
        return {"skipped": why}
    out: dict = {
        "generator": ctx.gen.name,
        "cpus": ctx.cpus.describe(),
        "repeats": ctx.repeats,
        "duration_s": ctx.echo_duration,
    }
    util.log(f"raybackend: starting a Ray cluster (head + {WORKERS} worker node on 127.0.0.2)")
    cluster = RayCluster(WORKERS, WORKER_CPUS)
    out["cluster"] = cluster.info
    gw: Gateway | None = None
    local: Gateway | None = None
    try:
        if ctx.cpus.pinned:
            util.set_affinity_tree(cluster.pid, ctx.cpus.server)
        started = time.perf_counter()
        gw = Gateway(
            cpus=ctx.cpus.server,
            label="ray-backend gateway",
            extra=["--backend", "ray", "--ray-address", cluster.address],
            env={"RAY_USAGE_STATS_ENABLED": "0"},
            timeout=120,
        )
        out["gateway_start_s"] = round(time.perf_counter() - started, 2)
        out["gateway_rss_idle_mb"] = gw.rss_mb()
        local = Gateway(cpus=ctx.cpus.server, label="local gateway")
        out["echo"], out["local-echo"] = _echo(ctx, gw, local, cluster)
        ours = [gw.pid, *cluster.pids()]
        out["non_loopback_connections"] = util.non_loopback_connections(ours)
        out["ssd"], out["local-ssd"] = _ssd(ctx, gw, local, cluster)
        ours = [gw.pid, *cluster.pids()]
        out["non_loopback_connections"] += util.non_loopback_connections(ours)
        out["gateway_rss_mb"] = gw.rss_mb()
        out["cluster_rss_mb"] = util.tree_rss_mb(cluster.pid)
        return out
    finally:
        for g in (local, gw):
            if g is not None:
                g.stop()
        out["left_running"] = cluster.stop()
        if out["left_running"]:
            util.log(f"raybackend: cluster processes left after shutdown: {out['left_running']}")


def _echo(ctx: Context, gw: Gateway, local: Gateway, cluster: RayCluster) -> tuple[dict, dict]:
    """The Ray backend's echo rows, and the local backend's, measured in turns."""
    echo_dir = apps.write_echo_dir()
    out: dict = {"create_s": round(gw.deploy("echo", echo_dir, "echo_async.py", concurrency=64), 2)}
    local.deploy("echo", echo_dir, "echo_async.py", concurrency=64)
    (replica,) = gw.info("echo")["replicas"]["list"]
    out["replica"] = {k: replica.get(k) for k in ("address", "node", "node_ip", "pid")}
    status, answer = util.http("POST", gw.function_url("echo"), ECHO_BODY)
    assert status == 200 and answer == ECHO_BODY, (status, answer[:200])
    if ctx.cpus.pinned:
        util.set_affinity_tree(cluster.pid, ctx.cpus.server)  # the replica's worker included
    pid = replica["pid"]
    pids = {"gateway": gw.pid, "replica": pid, "ray": [p for p in cluster.pids() if p != pid]}
    targets: list[Target] = [
        ("ray", gw.function_url("echo"), pids, False),
        (
            "local",
            local.function_url("echo"),
            {"gateway": local.pid, "replica": local.replica_tree("echo")},
            False,
        ),
    ]
    baseline: dict = {}
    duration, warm = ctx.echo_duration, ctx.warmup
    for conns in (1, 8, 64):
        util.log(f"raybackend: echo, {conns} connection(s), {ctx.repeats} round(s)")
        rows = compare(
            ctx.gen, targets, conns, [ECHO_BODY], duration, warm, ctx.repeats, ctx.settle
        )
        out[f"c{conns}"], baseline[f"c{conns}"] = rows["ray"], rows["local"]
    util.log("raybackend: echo, 600 KB body at 8 connections")
    rows = compare(ctx.gen, targets, 8, [big_body()], duration, warm, ctx.repeats, ctx.settle)
    out["big_c8"], baseline["big_c8"] = rows["ray"], rows["local"]
    for g in (gw, local):
        g.client.delete("echo")
    return out, baseline


def _ssd(ctx: Context, gw: Gateway, local: Gateway, cluster: RayCluster) -> tuple[dict, dict]:
    """``ssd-test`` @8 on both backends, in turns: ``rounds`` runs each, the best kept."""
    if not ssd.wait_for_example(ctx):
        return {"skipped": f"the SSD example is not at {ctx.example}"}, {}
    if ctx.cpus.pinned:  # SSD rows: the model uses every core, as in the local rows
        for pid in (cluster.pid, gw.pid, local.pid):
            util.set_affinity_tree(pid, ctx.cpus.all)
    ssd_dir = apps.prepare_ssd_dir(ctx.example)
    bodies = apps.ssd_bodies(ctx.example)
    shipped = ssd.example_settings(ctx.example)
    util.log("raybackend: deploying the SSD example (ssd-test) as shipped, on both gateways")
    settings = {**shipped, "replicas": {"min": 1, "max": 1}}
    out: dict = {
        "samples": [p.name for p in apps.ssd_samples(ctx.example)],
        "example_settings": shipped,
        "create_s": round(gw.deploy("ssd-test", ssd_dir, "handler.py", "Handler", **settings), 2),
    }
    local.deploy("ssd-test", ssd_dir, "handler.py", "Handler", **settings)
    answers = []
    for g in (gw, local):
        status, answer = util.http("POST", g.function_url("ssd-test"), bodies[0], timeout=60)
        if status != 200:
            raise RuntimeError(f"ssd-test on {g.label} answered {status}: {answer[:300]!r}")
        answers.append(answer)
    out["same_answer_as_local"] = answers[0] == answers[1]
    # Two runs of half the local rows' duration each, so the part stays short.
    rounds = 1 if ctx.quick else 2
    duration = ctx.ssd_duration / rounds
    out["duration_s"] = duration
    runs: dict[str, list[dict]] = {"ray": [], "local": []}
    ctx.settle()
    util.log(f"raybackend: SSD (ssd-test), 8 connections, {rounds} round(s) on each backend")
    for i in range(rounds):
        for key, g in (("ray", gw), ("local", local)):
            url = g.function_url("ssd-test")
            runs[key].append(
                ctx.gen_shared.run(url, 8, duration, bodies, warmup=ctx.warmup if i == 0 else 0)
            )
    out["c8"] = best_of(runs["ray"])
    return out, {"c8": best_of(runs["local"]), "duration_s": duration}
