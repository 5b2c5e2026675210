"""``python -m bench peers``: DCF (local and Ray backend) beside LitServe, BentoML,
PyTriton and Ray Serve, each serving the same workloads, one system at a time.

Workloads (every system serves all three, from ``bench/peers/workloads.py``):

- ``echo``: a 100-byte body back;
- ``big``: a 600 KB base64 body back;
- ``ssd``: the SSD example's COCO SSD on the example's samples as base64 text, as
  the seed's client sends them, with each system's dynamic batching on at the
  example's settings (at most 8 per batch, 5 ms wait; BentoML's adaptive batcher
  takes no wait, only its ``max_batch_size``). DCF serves ``ssd-test`` as shipped.

The systems are started one after the other (cold start: from its spawn to its
first SSD answer) and then all serve side by side, idle but for the one being
measured, so that every cell is taken in turns: each workload and connection
count in two rounds over all systems, the better kept (other work on a shared
machine can only slow a run down, and interleaving keeps a burst of it from
landing on one system only). Echo and 600 KB cells put every process of every
system on the server core and wrk on the other; SSD cells pin nothing (the
model uses every core). Cells: req/s at 1, 8 and 64 connections, p50/p99 at 8,
CPU µs per call of the system's processes. Then each system's resident memory,
then all are stopped with everything they started. The SSD model in-process
with batches of 8, run in the same rounds, is the SSD rows' ceiling.

The peers conflict with DCF's pins, so each lives in a venv of its own, made from
``bench/peers/<peer>-requirements.txt`` the first time (and when that file
changes): ``$DCF_BENCH_VENVS/dcf-bench/<peer>`` (default ``/work/venvs`` where it
exists, else ``build/venvs``). Their versions are recorded in the results.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import apps, ssd, util
from bench.context import ECHO_BODY, Context, big_body
from bench.echo import best_of
from bench.gateway import Gateway

HERE = Path(__file__).resolve().parent
PEERS = ("litserve", "bentoml", "pytriton", "rayserve")
SYSTEMS = ("dcf", "dcf-ray", *PEERS)
LABELS = {
    "dcf": "DCF (local backend)",
    "dcf-ray": "DCF (Ray backend)",
    "litserve": "LitServe",
    "bentoml": "BentoML",
    "pytriton": "PyTriton (Triton HTTP)",
    "rayserve": "Ray Serve",
}
PACKAGES = {
    "litserve": ["litserve", "fastapi", "uvicorn"],
    "bentoml": ["bentoml"],
    "pytriton": ["nvidia-pytriton", "tritonclient"],
    "rayserve": ["ray"],
}
COMMON = ["onnxruntime", "numpy", "opencv-python-headless"]
WORKLOADS = ("echo", "big", "ssd")
WORKLOAD_LABELS = {
    "echo": "echo, 100 B",
    "big": "echo, 600 KB base64",
    "ssd": "COCO SSD, base64 photos, batching on",
}
CONNS = (1, 8, 64)
START_TIMEOUT = 180


def venv_root() -> Path:
    return util.venvs_root() / "dcf-bench"


def ensure_venv(peer: str) -> Path:
    """The peer's venv, made (or brought up to its requirements file) when not current."""
    requirements = HERE / f"{peer}-requirements.txt"
    return util.ensure_venv(venv_root() / peer, requirements, f"peers: {peer}")


def versions(venv: Path, packages: list[str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code, *packages],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return {}


# -- what a system is sent -------------------------------------------------------------------


@dataclass
class Load:
    """One workload's URL and bodies on one system, and how to check an answer."""

    url: str
    bodies: list[bytes]
    headers: list[dict[str, str]] = field(default_factory=list)
    ctype: str = "application/octet-stream"


def triton_request(data: bytes, batched: bool, output: str) -> tuple[bytes, dict[str, str]]:
    """A V2 infer request with one BYTES element as binary data, as tritonclient sends it."""
    raw = struct.pack("<I", len(data)) + data
    head = {
        "inputs": [
            {
                "name": "data",
                "shape": [1, 1] if batched else [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": output, "parameters": {"binary_data": True}}],
    }
    text = json.dumps(head).encode()
    return text + raw, {"Inference-Header-Content-Length": str(len(text))}


def _loads(system: str, base: str, payloads: dict[str, list[bytes]]) -> dict[str, Load]:
    if system in ("dcf", "dcf-ray"):
        return {
            "echo": Load(f"{base}/function/echo", payloads["echo"]),
            "big": Load(f"{base}/function/echo", payloads["big"]),
            "ssd": Load(f"{base}/function/ssd-test", payloads["ssd"]),
        }
    if system == "bentoml":
        as_json = [json.dumps([b.decode()]).encode() for b in payloads["ssd"]]
        return {
            "echo": Load(f"{base}/echo", payloads["echo"]),
            "big": Load(f"{base}/echo", payloads["big"]),
            "ssd": Load(f"{base}/ssd", as_json, ctype="application/json"),
        }
    if system == "pytriton":
        out: dict[str, Load] = {}
        for key, model, batched, output in (
            ("echo", "echo", False, "data"),
            ("big", "echo", False, "data"),
            ("ssd", "ssd", True, "detections"),
        ):
            framed = [triton_request(b, batched, output) for b in payloads[key]]
            out[key] = Load(
                f"{base}/v2/models/{model}/infer", [b for b, _ in framed], [h for _, h in framed]
            )
        return out
    return {
        "echo": Load(f"{base}/echo", payloads["echo"]),
        "big": Load(f"{base}/echo", payloads["big"]),
        "ssd": Load(f"{base}/ssd", payloads["ssd"]),
    }


def _post(load: Load, index: int = 0) -> tuple[int, bytes]:
    import httpx

    headers = {"content-type": load.ctype, **(load.headers[index] if load.headers else {})}
    try:
        answer = httpx.post(load.url, content=load.bodies[index], headers=headers, timeout=30)
    except httpx.HTTPError:
        return 0, b""
    return answer.status_code, answer.content


def _check(system: str, loads: dict[str, Load], payloads: dict[str, list[bytes]]) -> None:
    """Every system answers every workload right, so every row measures the same work."""
    for key in ("echo", "big"):
        status, answer = _post(loads[key])
        if status != 200 or payloads[key][0] not in answer:
            raise RuntimeError(f"{system} {key}: {status} {answer[:200]!r}")
    status, answer = _post(loads["ssd"])
    if status != 200 or b"class_id" not in answer:
        raise RuntimeError(f"{system} ssd: {status} {answer[:300]!r}")


# -- starting each system ----------------------------------------------------------------------


class System:
    """One system under test: started, its processes, its loads, stopped."""

    name: str
    root: int  # the process everything of the system is below
    loads: dict[str, Load]
    versions: dict[str, str]

    def pids(self) -> list[int]:
        return util.descendants(self.root)

    def stop(self) -> None:
        raise NotImplementedError


class DcfSystem(System):
    def __init__(self, ctx: Context, ray: bool, ssd_dir: str, payloads: dict) -> None:
        from bench.ray_backend import RayCluster

        self.name = "dcf-ray" if ray else "dcf"
        self.cluster: RayCluster | None = None
        extra: list[str] = []
        env: dict[str, str] = {}
        if ray:
            self.cluster = RayCluster(1, 2)
            extra = ["--backend", "ray", "--ray-address", self.cluster.address]
            env = {"RAY_USAGE_STATS_ENABLED": "0"}
        self.gateway = Gateway(
            cpus=ctx.cpus.server, label=self.name, extra=extra, env=env, timeout=120
        )
        echo_dir = apps.write_echo_dir()
        self.gateway.deploy("echo", echo_dir, "echo_async.py", concurrency=64)
        settings = {**ssd.example_settings(ctx.example), "replicas": {"min": 1, "max": 1}}
        self.gateway.deploy("ssd-test", ssd_dir, "handler.py", "Handler", **settings)
        self.root = self.gateway.pid
        self.loads = _loads(self.name, self.gateway.url, payloads)
        import dcf

        self.versions = {"dcf": dcf.__version__}
        if ray:
            import ray as ray_module

            self.versions["ray"] = ray_module.__version__

    def pids(self) -> list[int]:
        pids = util.descendants(self.gateway.pid)
        if self.cluster is not None:
            pids += self.cluster.pids()
        return pids

    def stop(self) -> None:
        self.gateway.stop()
        if self.cluster is not None:
            self.cluster.stop()


class PeerSystem(System):
    def __init__(self, ctx: Context, peer: str, payloads: dict) -> None:
        self.name = peer
        venv = ensure_venv(peer)
        self.versions = versions(venv, [*PACKAGES[peer], *COMMON])
        port = util.free_port()
        workdir = Path(util.tempdir(f"dcf-bench-{peer}-"))
        self.log = workdir / "server.log"
        python = str(venv / "bin" / "python")
        path = [str(HERE), str(ctx.example), str(util.ROOT)]
        env = {"PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1"}
        stdin = subprocess.DEVNULL
        if peer == "litserve":
            cmd = [python, str(HERE / "litserve_server.py"), str(port)]
        elif peer == "bentoml":
            cmd = [str(venv / "bin" / "bentoml"), "serve", "bentoml_server:Peer"]
            cmd += ["--host", "127.0.0.1", "--port", str(port)]
            env["BENTOML_DO_NOT_TRACK"] = "True"
            # Its access log costs a line per call: off, as DCF logs no call either.
            env["BENTOML_CONFIG_OPTIONS"] = "api_server.logging.access.enabled=false"
        elif peer == "pytriton":
            ports = [str(port), str(util.free_port()), str(util.free_port())]
            cmd = [python, str(HERE / "pytriton_server.py"), *ports]
            # The wheel's Python stub for 3.11 links the system's libpython3.11; it must load
            # the one this interpreter's stdlib belongs to.
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (_libdir(python), os.environ.get("LD_LIBRARY_PATH", "")) if p
            )
        else:
            temp = util.tempdir("rs-")  # short: Ray's socket paths must fit in 107 bytes
            cmd = [python, str(HERE / "rayserve_server.py"), str(port), temp]
            env["RAY_USAGE_STATS_ENABLED"] = "0"
            stdin = subprocess.PIPE  # it runs until its stdin closes
        self.proc = util.spawn(
            cmd, env=env, cpus=ctx.cpus.server, log=self.log, cwd=HERE, stdin=stdin
        )
        self.root = self.proc.pid
        self.loads = _loads(peer, f"http://127.0.0.1:{port}", payloads)

    def stop(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for pid in util.descendants(self.proc.pid)[1:]:
            util.kill(pid)
        util.stop(self.proc)

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return ""


def _libdir(python: str) -> str:
    proc = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.stdout.strip()


def _start(ctx: Context, name: str, ssd_dir: str, payloads: dict) -> tuple[System, float]:
    """The system, and the seconds from its spawn to its first SSD answer."""
    started = time.perf_counter()
    if name in ("dcf", "dcf-ray"):
        system: System = DcfSystem(ctx, name == "dcf-ray", ssd_dir, payloads)
    else:
        system = PeerSystem(ctx, name, payloads)
    ssd_load = system.loads["ssd"]

    def answered() -> bool:
        if isinstance(system, PeerSystem) and system.proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {system.tail()}")
        return _post(ssd_load)[0] == 200

    try:
        util.wait_for(answered, START_TIMEOUT, f"{name}'s first SSD answer", interval=0.2)
    except Exception:
        system.stop()
        raise
    return system, time.perf_counter() - started


# -- the part ------------------------------------------------------------------------------


def _cpu(pids: list[int]) -> float:
    return sum(util.cpu_seconds(p) for p in pids)


def _pin(ctx: Context, system: System, pinned: bool) -> None:
    cpus = ctx.cpus.server if pinned else ctx.cpus.all
    util.set_affinity_tree(system.root, cpus)
    if isinstance(system, DcfSystem) and system.cluster is not None:
        util.set_affinity_tree(system.cluster.pid, cpus)


def _cell(ctx: Context, system: System, key: str, conns: int, duration: float) -> dict:
    """One run of ``conns`` connections, with the CPU µs per call of all the system's processes."""
    load = system.loads[key]
    gen = ctx.gen if key != "ssd" else ctx.gen_shared
    pids = system.pids()
    before = _cpu(pids)
    result = gen.run(
        load.url, conns, duration, load.bodies, warmup=0, ctype=load.ctype, headers=load.headers
    )
    if result.get("requests"):
        result["cpu_us_per_req"] = round((_cpu(pids) - before) * 1e6 / result["requests"], 1)
    return result


def _payloads(ctx: Context) -> dict[str, list[bytes]]:
    return {"echo": [ECHO_BODY], "big": [big_body()], "ssd": apps.ssd_bodies(ctx.example)}


def run(ctx: Context, results_dir: Path | None = None, name: str = "peers") -> dict:
    if not ctx.gen.use_wrk:
        return {"skipped": "needs wrk (the peers' rows send headers only wrk's script sets)"}
    if not ssd.wait_for_example(ctx):
        return {"skipped": f"the SSD example is not at {ctx.example}"}
    ssd_dir = apps.prepare_ssd_dir(ctx.example)
    payloads = _payloads(ctx)
    only = os.environ.get("DCF_BENCH_PEERS")  # a comma-separated subset, for trying one out
    systems = [s for s in SYSTEMS if not only or s in only.split(",")]
    echo_s, ssd_s = (1, 2) if ctx.quick else (2, 3)
    rounds = 1 if ctx.quick else 2
    out: dict = {
        "cpus": ctx.cpus.describe(),
        "duration_s": {"echo": echo_s, "big": echo_s, "ssd": ssd_s},
        "batching": {"max_batch": 8, "max_wait_ms": 5},
        "samples": [p.name for p in apps.ssd_samples(ctx.example)],
        "systems": {},
    }
    started: dict[str, System] = {}
    files = []
    for i, data in enumerate(payloads["ssd"]):
        body = Path(ssd_dir, f"sample{i}.b64")
        body.write_bytes(data)
        files.append(str(body))
    inproc: list[dict] = []
    try:
        for system_name in systems:
            util.log(f"peers: starting {system_name}")
            row: dict = {}
            out["systems"][system_name] = row
            try:
                system, cold = _start(ctx, system_name, ssd_dir, payloads)
                started[system_name] = system
                row["versions"] = system.versions
                row["cold_start_s"] = round(cold, 2)
                _check(system_name, system.loads, payloads)
            except Exception as exc:  # noqa: BLE001 - report it, go on with the others
                util.log(f"peers: {system_name} did not start: {exc}")
                row["skipped"] = f"did not start: {type(exc).__name__}: {str(exc)[-600:]}"
                if system_name in started:
                    started.pop(system_name).stop()
        runs: dict[tuple[str, str, int], list[dict]] = {}
        for key in WORKLOADS:
            duration = ssd_s if key == "ssd" else echo_s
            for system in started.values():
                _pin(ctx, system, key != "ssd")
            ctx.settle()
            for system in started.values():  # warm-up
                load = system.loads[key]
                gen = ctx.gen if key != "ssd" else ctx.gen_shared
                gen.run(
                    load.url,
                    8,
                    ctx.warmup,
                    load.bodies,
                    warmup=0,
                    ctype=load.ctype,
                    headers=load.headers,
                )
            for conns in CONNS:
                for round_ in range(rounds):
                    util.log(f"peers: {key} @{conns}, round {round_ + 1}/{rounds}")
                    for name, system in started.items():
                        cell = _cell(ctx, system, key, conns, duration)
                        runs.setdefault((name, key, conns), []).append(cell)
                    if key == "ssd" and conns == 8:
                        util.log("peers: the SSD model in-process, batches of 8")
                        inproc.append(ssd.in_process(ssd_dir, "batched", 8, duration, 1, files))
        for (name, key, conns), cells in runs.items():
            out["systems"][name].setdefault(key, {})[f"c{conns}"] = best_of(cells)
        for name, system in started.items():
            pids = system.pids()
            out["systems"][name]["rss_mb"] = round(sum(util.rss_mb(p) or 0 for p in pids), 1)
            out["systems"][name]["processes"] = len(pids)
    finally:
        for system in started.values():
            system.stop()
    if inproc:
        out["in-process-batch8"] = best_of(inproc)
    return out


# -- report ------------------------------------------------------------------------------------


def _at(row: dict, key: str, conns: int) -> dict:
    return (row.get(key) or {}).get(f"c{conns}") or {}


def table(results: dict) -> str:
    part = results.get("peers") or {}
    if "skipped" in part:
        return f"## Peers — skipped: {part['skipped']}"
    systems = part.get("systems") or {}
    lines = [
        f"## Peers — all running, measured in turns (best of 2 rounds); echo rows: "
        f"{part.get('cpus')}; SSD rows not pinned; "
        f"{part.get('duration_s')} s per cell; batching: {part.get('batching')}",
        "",
        "| workload | system | req/s @1 | req/s @8 | req/s @64 | p50 @8 ms | p99 @8 ms | "
        "CPU µs/call @8 | RSS MB | cold start s | errors @1/8/64 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in WORKLOADS:
        for name in SYSTEMS:
            row = systems.get(name)
            if row is None:
                continue
            if "skipped" in row or "failed" in row:
                why = " ".join((row.get("skipped") or row.get("failed")).split())
                lines.append(f"| {WORKLOAD_LABELS[key]} | {LABELS[name]} | {why[:120]} |")
                continue
            c8 = _at(row, key, 8)
            rps = [_at(row, key, c).get("rps") for c in CONNS]
            lines.append(
                f"| {WORKLOAD_LABELS[key]} | {LABELS[name]} | "
                + " | ".join(f"{r:.1f}" if r is not None else "–" for r in rps)
                + f" | {c8.get('p50_ms', 0):.2f} | {c8.get('p99_ms', 0):.2f} | "
                f"{c8.get('cpu_us_per_req', '–')} | {row.get('rss_mb', '–')} | "
                f"{row.get('cold_start_s', '–')} | "
                + "/".join(str(_at(row, key, c).get("errors", "–")) for c in CONNS)
                + " |"
            )
        if key == "ssd" and part.get("in-process-batch8"):
            inproc = part["in-process-batch8"]
            lines.append(
                f"| {WORKLOAD_LABELS[key]} | the model in-process, batches of 8 | – | "
                f"{inproc['rps']:.1f} | – | {inproc['p50_ms']:.2f} | {inproc['p99_ms']:.2f} | "
                "– | – | – | – |"
            )
    lines += [
        "",
        "Versions: "
        + "; ".join(
            f"{LABELS[n]}: " + ", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items())
            for n, r in systems.items()
            if r.get("versions")
        ),
    ]
    return "\n".join(lines)


def targets(results: dict) -> list[dict]:
    part = results.get("peers") or {}
    systems = part.get("systems") or {}
    rows: list[dict] = []

    def add(label: str, ratio: float, goal: float, note: str = "") -> None:
        rows.append(
            {
                "target": label,
                "value": round(ratio, 2),
                "measured": f"{ratio:.2f}×",
                "goal": f"≥ {goal}×",
                "status": "MET" if ratio >= goal else f"MISSED by {goal - ratio:.2f}×",
                "note": note,
            }
        )

    dcf = systems.get("dcf") or {}
    for key in WORKLOADS:
        for conns in (8, 64):
            ours = _at(dcf, key, conns).get("rps")
            peers = [(n, _at(systems.get(n) or {}, key, conns).get("rps")) for n in PEERS]
            peers = [(n, r) for n, r in peers if r]
            if not ours or not peers:
                continue
            best = max(peers, key=lambda p: p[1])
            ray = _at(systems.get("dcf-ray") or {}, key, conns).get("rps")
            note = f"Ray backend: {ray / best[1]:.2f}×" if ray else ""
            add(
                f"{WORKLOAD_LABELS[key]} req/s @{conns}: DCF / best peer ({LABELS[best[0]]})",
                ours / best[1],
                1.0,
                note,
            )
    inproc = (part.get("in-process-batch8") or {}).get("rps")
    ours = _at(dcf, "ssd", 8).get("rps")
    if inproc and ours:
        add("COCO SSD req/s @8: DCF / the model in-process, batches of 8", ours / inproc, 0.95)
    return rows
