"""SSD: the example's model called in-process vs through the gateway, batched and not.

Same work per image on both sides: base64 decode, image decode, inference (the
example's ``Handler.process`` / its batch path). In-process runs in a process of
its own with ``conc`` threads (or one thread running batches of ``conc``);
through the gateway, wrk keeps ``conc`` connections busy. Nothing is pinned: the
model uses every core, and wrk at these rates costs next to nothing.

Deployments (from a temporary copy of ``examples/ssd-detector`` without its
requirements.txt, so they run on the gateway's environment):

- ``ssd``: ``Unbatched`` (one image per call), ``concurrency: 8``;
- ``ssd-batch``: ``Batched``, the detector wrapped with ``@dcf.batch(max_size=16,
  max_wait_ms=5)``, ``concurrency: 16``;
- ``ssd-test``: the example's own handler with its config.yaml settings (its
  batching: ``SSD_BATCH_SIZE``, default 8), one replica.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench import apps, util
from bench.context import Context
from bench.gateway import Gateway


def wait_for_example(ctx: Context) -> bool:
    if apps.ssd_example_ready(ctx.example):
        return True
    if ctx.ssd_wait <= 0:
        return False
    util.log(f"ssd: waiting up to {ctx.ssd_wait:g}s for {ctx.example} to appear")
    deadline = time.monotonic() + ctx.ssd_wait
    while time.monotonic() < deadline:
        if apps.ssd_example_ready(ctx.example):
            time.sleep(2)  # let the writer finish its files
            return True
        time.sleep(5)
    return False


def in_process(
    ssd_dir: str, mode: str, conc: int, duration: float, warmup: float, body_files: list[str]
) -> dict:
    cmd = [sys.executable, "-m", "bench.apps", "ssd-inproc", ssd_dir, "--mode", mode]
    cmd += ["--conc", str(conc), "--duration", str(duration), "--warmup", str(warmup)]
    for f in body_files:
        cmd += ["--body-file", f]
    proc = util.spawn(cmd, stdout=subprocess.PIPE, cwd=util.ROOT)
    try:
        out, _ = proc.communicate(timeout=duration + warmup + 120)
    finally:
        util.stop(proc)
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("INPROCJSON ")), None)
    if line is None:
        raise RuntimeError(f"in-process SSD run failed: {out.decode()[-3000:]}")
    return json.loads(line[len("INPROCJSON ") :])


def example_settings(example: Path) -> dict:
    """The ``ssd-test`` entry of the example's config.yaml, minus what the bench sets."""
    try:
        data = yaml.safe_load((example / "config.yaml").read_text()) or {}
        functions = data.get("functions") or {}
        settings = dict(functions.get("ssd-test") or next(iter(functions.values())))
    except (OSError, StopIteration, AttributeError, yaml.YAMLError):
        return {}
    for key in ("handler", "replicas", "image", "build_args", "skip_build"):
        settings.pop(key, None)
    return settings


def run(ctx: Context) -> dict:
    if not wait_for_example(ctx):
        return {
            "skipped": f"the SSD example is not at {ctx.example} (handler.py, detector.py, "
            f"samples/*.jpg)"
        }
    ssd_dir = apps.prepare_ssd_dir(ctx.example)
    bodies = apps.ssd_bodies(ctx.example)
    body_files = []
    for i, body in enumerate(bodies):
        path = Path(ssd_dir, f"sample{i}.b64")
        path.write_bytes(body)
        body_files.append(str(path))
    duration, warm = ctx.ssd_duration, ctx.warmup
    gen = ctx.gen_shared
    out: dict = {
        "samples": [p.name for p in apps.ssd_samples(ctx.example)],
        "body_bytes": [len(b) for b in bodies],
        "generator": gen.name,
        "cpus": "not pinned: model, gateway, replicas and generator share every core",
        "duration_s": duration,
        "in-process": {},
        "gateway": {},
        "gateway-batch": {},
        "gateway-example": {},
    }

    util.log("ssd: starting a gateway and deploying the SSD variants")
    gw = Gateway(label="ssd gateway")
    try:
        out["create_s"] = {
            "ssd": round(gw.deploy("ssd", ssd_dir, "bench_ssd.py", "Unbatched", concurrency=8), 2),
            "ssd-batch": round(
                gw.deploy("ssd-batch", ssd_dir, "bench_ssd.py", "Batched", concurrency=16), 2
            ),
        }
        shipped = example_settings(ctx.example)
        try:
            out["create_s"]["ssd-test"] = round(
                gw.deploy(
                    "ssd-test",
                    ssd_dir,
                    "handler.py",
                    "Handler",
                    **{**shipped, "replicas": {"min": 1, "max": 1}},
                ),
                2,
            )
            out["example_settings"] = shipped
        except Exception as exc:  # noqa: BLE001 - the example's own config is optional here
            out["gateway-example"] = {"skipped": str(exc)}
        for name in ("ssd", "ssd-batch"):
            status, answer = util.http("POST", gw.function_url(name), bodies[0])
            if status != 200 or not isinstance(json.loads(answer), list):
                raise RuntimeError(f"{name} answered {status}: {answer[:300]!r}")
        out["sample_answer"] = json.loads(answer)

        for conc in (1, 8):
            ctx.settle()
            util.log(f"ssd: concurrency {conc}")
            out["in-process"][f"c{conc}"] = in_process(
                ssd_dir, "unbatched", conc, duration, warm, body_files
            )
            if conc > 1:
                out["in-process"][f"batch_c{conc}"] = in_process(
                    ssd_dir, "batched", conc, duration, warm, body_files
                )
            out["gateway"][f"c{conc}"] = gen.run(
                gw.function_url("ssd"), conc, duration, bodies, warmup=warm
            )
            out["gateway-batch"][f"c{conc}"] = gen.run(
                gw.function_url("ssd-batch"), conc, duration, bodies, warmup=warm
            )
            if "skipped" not in out["gateway-example"] and conc > 1:
                out["gateway-example"][f"c{conc}"] = gen.run(
                    gw.function_url("ssd-test"), conc, duration, bodies, warmup=warm
                )
        out["model_load_s"] = out["in-process"]["c1"].get("model_load_s")
        # Which detector the example's handler loaded (CocoSSD: the COCO SSD on onnxruntime).
        out["detector"] = out["in-process"]["c1"].get("detector")
        out["import_s"] = out["in-process"]["c1"].get("import_s")
        out["gateway_rss_mb"] = gw.rss_mb()
        return out
    finally:
        gw.stop()
