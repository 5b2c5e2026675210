"""Where the gateway's CPU goes under echo load: py-spy samples of the gateway and its replica.

``python -m bench profile``: a gateway on the server core with the async echo
function, wrk at 8 connections on the other core, and ``py-spy record`` on the
gateway and on the replica meanwhile. The raw stacks are written next to the
results; the summary lists, per process, the functions with the most samples on
CPU (self, i.e. the leaf frame) and the innermost DCF frame of each sample
(what DCF code, including the library calls it makes, costs).
"""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter
from pathlib import Path

from bench import apps, util
from bench.context import ECHO_BODY, Context, big_body
from bench.gateway import Gateway

LOOP_FRAMES = ("Runner.run (", "run (uvloop", "BaseEventLoop.run_forever")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def available() -> str | None:
    if shutil.which("py-spy") is None:
        return "py-spy is not installed: pip install py-spy"
    return None


def _dcf_files() -> list[str]:
    return sorted(str(p.relative_to(util.ROOT)) for p in (util.ROOT / "dcf").rglob("*.py"))


def _normalise(path: str, dcf_files: list[str]) -> tuple[str, bool]:
    """The file as ``dcf/...`` when it is one of DCF's (py-spy shortens paths), and whether."""
    if path.startswith("dcf/") and path in dcf_files:
        return path, True
    matches = [f for f in dcf_files if f.endswith("/" + path)]
    if len(matches) == 1:
        return matches[0], True
    for marker in ("/site-packages/", "/lib/python3"):
        idx = path.rfind(marker)
        if idx >= 0:
            return path[idx + len(marker) :].lstrip("/"), False
    return path, False


def summarise(raw: Path, top: int = 15) -> dict:
    """Self and inclusive sample counts per function, and per innermost DCF frame.

    A sample's stack is cut at the event loop's frame (``Runner.run``): what is
    above it is the process's start-up (``dcf gateway start`` → uvicorn), what is
    below is the callback or task the loop was running.
    """
    dcf_files = _dcf_files()
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    dcf_inner: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames: list[tuple[str, bool]] = []
        for frame in stack.split(";"):
            m = FRAME.match(frame)
            if m:
                path, ours = _normalise(m["file"], dcf_files)
                frames.append((f"{m['func']} ({path})", ours))
            else:
                frames.append((frame, False))
        loop_at = max(
            (i for i, (name, _) in enumerate(frames) if name.startswith(LOOP_FRAMES)), default=-1
        )
        work = frames[loop_at + 1 :]
        if not work:
            # No Python frame below the loop: its own C code (epoll, socket I/O, callbacks).
            work = [("event loop itself (uvloop: epoll, socket syscalls, callbacks)", False)]
        leaf[work[-1][0]] += n
        for name in {name for name, _ in work}:
            inclusive[name] += n
        inner = next((name for name, ours in reversed(work) if ours), None)
        dcf_inner[inner or "(no DCF frame: event loop, uvicorn, asyncio)"] += n

    def pct(counter: Counter[str]) -> list[dict]:
        return [
            {"function": name, "samples": n, "pct": round(100 * n / total, 1)}
            for name, n in counter.most_common(top)
        ]

    return {
        "samples": total,
        "self": pct(leaf),
        "inclusive": pct(inclusive),
        "innermost_dcf_frame": pct(dcf_inner),
    }


def _record(
    ctx: Context, gw: Gateway, replica: int, body: bytes, duration: int, stem: Path
) -> dict:
    """wrk at 8 connections for ``duration`` s with py-spy on the gateway and the replica."""
    url = gw.function_url("echo")
    ctx.gen.run(url, 8, 2, [body], warmup=0)
    outputs = {
        "gateway": (gw.pid, stem.with_name(stem.name + "-gateway.txt")),
        "replica": (replica, stem.with_name(stem.name + "-replica.txt")),
    }
    spies = []
    for pid, path in outputs.values():
        spies.append(util.py_spy(pid, path, "raw", 250, duration, ctx.cpus))
    time.sleep(0.5)  # let py-spy attach
    load = ctx.gen.run(url, 8, duration - 1, [body], warmup=0)
    errors = []
    for spy in spies:
        _, err = spy.communicate(timeout=60)
        if spy.returncode:
            errors.append(err.decode(errors="replace")[-500:])
    out: dict = {"load": load, "duration_s": duration, "py_spy_errors": errors}
    for key, (_pid, path) in outputs.items():
        if path.exists():
            out[key] = {"raw": str(path.relative_to(util.ROOT)), **summarise(path)}
    return out


def run(ctx: Context, results_dir: Path, name: str) -> dict:
    why = available()
    if why:
        return {"skipped": why}
    echo_dir = apps.write_echo_dir()
    duration = 5 if ctx.quick else 12
    gw = Gateway(cpus=ctx.cpus.server, label="profile gateway")
    try:
        gw.deploy("echo", echo_dir, "echo_async.py", concurrency=64)
        replica = gw.replica_pids("echo")[0]
        if ctx.cpus.pinned:
            # The replica on the generator's core: sharing the gateway's core, it would run
            # inside the gateway's write() calls (wake-up preemption) and inflate them.
            util.set_affinity_tree(replica, ctx.cpus.client)
        out: dict = {"cpus": "gateway on the server core; replica, wrk and py-spy on the other"}
        for key, body in (("echo_100B_c8", ECHO_BODY), ("echo_600KB_c8", big_body())):
            ctx.settle()
            util.log(f"profile: {key}, {duration}s with py-spy on the gateway and its replica")
            stem = f"{name}-{key}" if "profile" in name else f"{name}-profile-{key}"
            out[key] = _record(ctx, gw, replica, body, duration, results_dir / stem)
        return out
    finally:
        gw.stop()
