"""Open Inference Protocol (V2) infer req/s: DCF's ``/v2`` beside its ``/function/NAME``,
and both beside MLServer, a server that speaks V2, all running the same model code
(``bench/oip_model.py``: a dense layer, [1, 64] FP32 in, [1, 16] FP32 out).

Rows, at 8 connections, JSON tensors (MLServer's REST takes no binary tensor data):

- ``dcf-v2``: ``POST /v2/models/dense/infer`` through ``dcf gateway start``;
- ``dcf-function``: ``POST /function/dense`` with ``{"x": [[...]]}``, the same handler;
- ``mlserver``: MLServer with ``parallel_workers: 0`` (inference on its event loop), and
  ``mlserver-workers``: its default, one inference worker process (as DCF's replica is).

MLServer is installed in a venv of its own, made from ``bench/oip-requirements.txt``
(every package pinned) the first time this part runs: ``$DCF_BENCH_VENVS/oip-mlserver``,
by default ``/work/venvs/oip-mlserver`` where ``/work/venvs`` exists, else
``build/venvs/oip-mlserver`` in the checkout. It never touches DCF's own environment.
Target: DCF's V2 ≥ 1.5× the better MLServer row's req/s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from bench import util
from bench.context import Context
from bench.gateway import Gateway

REQUIREMENTS = util.BENCH_DIR / "oip-requirements.txt"
MODEL = util.BENCH_DIR / "oip_model.py"
CONNS = 8
TARGET = 1.5

HANDLER = '''"""The bench's model as a DCF function: V2 tensors, or JSON on /function/NAME."""

import json

import numpy as np
from oip_model import predict


def Handler(req):
    if req.tensors is not None:
        return {"y": predict(req.tensors["x"])}
    x = np.asarray(json.loads(req.input)["x"], np.float32)
    return {"y": predict(x).tolist()}
'''

MLSERVER_MODEL = '''"""The bench's model as an MLServer model."""

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from oip_model import predict


class Dense(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        y = predict(x)
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("y", y)])
'''

DECLARED = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 16]}],
}


def venv_dir() -> Path:
    return util.venvs_root() / "oip-mlserver"


def ensure_venv() -> Path:
    """MLServer's venv, made (or brought up to the requirements file) when it is not current."""
    return util.ensure_venv(venv_dir(), REQUIREMENTS, "oip: MLServer", ready="mlserver")


def bodies() -> tuple[bytes, bytes, list[float]]:
    """(the V2 request, the /function/NAME request, the input row)."""
    row = [round((i % 13) / 13 - 0.5, 4) for i in range(64)]
    v2 = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": row}]}
    return json.dumps(v2).encode(), json.dumps({"x": [row]}).encode(), row


def _start_mlserver(venv: Path, workers: int, cpus: set[int]) -> tuple[subprocess.Popen, str]:
    directory = Path(util.tempdir(f"dcf-bench-mlserver{workers}-"))
    port = util.free_port()
    settings = {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": util.free_port(),
        "metrics_port": util.free_port(),
        "metrics_endpoint": None,
        "parallel_workers": workers,
    }
    (directory / "settings.json").write_text(json.dumps(settings))
    model = {"name": "dense", "implementation": "model.Dense"}
    (directory / "model-settings.json").write_text(json.dumps(model))
    (directory / "model.py").write_text(MLSERVER_MODEL)
    shutil.copy(MODEL, directory / "oip_model.py")
    proc = util.spawn(
        [str(venv / "bin" / "mlserver"), "start", str(directory)],
        env={"PYTHONPATH": str(directory)},
        cpus=cpus,
        log=directory / "mlserver.log",
        cwd=directory,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"mlserver exited with {proc.returncode}")
        return util.http("GET", url + "/v2/models/dense/ready", timeout=2)[0] == 200

    try:
        util.wait_for(ready, 120, "MLServer's model ready")
    except Exception:
        log = (directory / "mlserver.log").read_text()[-2000:]
        util.stop(proc)
        raise RuntimeError(f"MLServer did not start: {log}") from None
    return proc, url


def _check(url: str, body: bytes, row: list[float], v2: bool) -> None:
    """The answer is the model's, so every row measures the same work."""
    import httpx
    import numpy as np

    from bench.oip_model import predict

    answer = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
    if answer.status_code != 200:
        raise RuntimeError(f"{url} answered {answer.status_code}: {answer.text[:300]}")
    doc = answer.json()
    got = doc["outputs"][0]["data"] if v2 else doc["y"]
    want = predict(np.array([row], np.float32))
    if not np.allclose(np.array(got, np.float32).reshape(want.shape), want, atol=1e-5):
        raise RuntimeError(f"{url} answered {got[:4]}…, not the model's {want.ravel()[:4]}…")


def _measure(ctx: Context, url: str, body: bytes, pids: list[int]) -> dict:
    before = sum(util.cpu_seconds(p) for p in pids)
    result = ctx.gen.run(url, CONNS, ctx.echo_duration, [body], warmup=0, ctype="application/json")
    used = sum(util.cpu_seconds(p) for p in pids) - before
    if result.get("requests"):
        result["cpu_us_per_req"] = round(used * 1e6 / result["requests"], 1)
    return result


def run(ctx: Context) -> dict:
    if not ctx.gen.use_wrk:
        return {
            "skipped": "needs wrk (MLServer reads JSON only with Content-Type: "
            "application/json, which only the wrk generator sends)"
        }
    try:
        venv = ensure_venv()
    except (OSError, subprocess.SubprocessError) as exc:
        return {"skipped": f"MLServer's venv could not be made: {exc}"}
    v2_body, function_body, row = bodies()
    server = ctx.cpus.server
    handler_dir = Path(util.tempdir("dcf-bench-oip-"))
    (handler_dir / "handler.py").write_text(HANDLER)
    shutil.copy(MODEL, handler_dir / "oip_model.py")
    procs: list[subprocess.Popen] = []
    gw = Gateway(cpus=server)
    try:
        gw.deploy("dense", str(handler_dir), "handler.py", **DECLARED)
        dcf_pids = [gw.pid, *gw.replica_pids("dense")]
        targets = [
            ("dcf-v2", gw.url + "/v2/models/dense/infer", v2_body, dcf_pids, True),
            ("dcf-function", gw.function_url("dense"), function_body, dcf_pids, False),
        ]
        for key, workers in (("mlserver", 0), ("mlserver-workers", 1)):
            proc, url = _start_mlserver(venv, workers, server)
            procs.append(proc)
            pids = util.descendants(proc.pid)  # the server and its inference workers
            targets.append((key, url + "/v2/models/dense/infer", v2_body, pids, True))
        for _, url, body, _, v2 in targets:
            _check(url, body, row, v2)
        ctx.settle()
        for _, url, body, _, _ in targets:  # warm-up
            ctx.gen.run(url, CONNS, ctx.warmup, [body], warmup=0, ctype="application/json")
        runs: dict[str, list[dict]] = {key: [] for key, *_ in targets}
        for round_ in range(ctx.repeats):
            util.log(f"oip: round {round_ + 1}/{ctx.repeats} at {CONNS} connections")
            for key, url, body, pids, _ in targets:
                runs[key].append(_measure(ctx, url, body, pids))
        out: dict = {key: max(r, key=lambda x: x["rps"]) for key, r in runs.items()}
        for key, r in runs.items():
            out[key]["runs"] = [x["rps"] for x in r]
        out["conns"] = CONNS
        out["duration_s"] = ctx.echo_duration
        out["repeats"] = ctx.repeats
        out["cpus"] = ctx.cpus.describe()
        out["mlserver"]["version"] = _mlserver_version(venv)
        return out
    finally:
        gw.stop()
        for proc in procs:
            util.stop(proc)
        time.sleep(0.2)


def _mlserver_version(venv: Path) -> str:
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import mlserver; print(mlserver.__version__)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.stdout.strip() or "?"


def peer_rps(results: dict) -> tuple[str, float] | None:
    oip = results.get("oip") or {}
    rows = [(k, oip[k]["rps"]) for k in ("mlserver", "mlserver-workers") if k in oip]
    return max(rows, key=lambda r: r[1]) if rows else None


def section(results: dict) -> str | None:
    """The markdown table of this part, for bench/report.py."""
    oip = results.get("oip")
    if not oip:
        return None
    if "skipped" in oip:
        return f"## Open Inference Protocol (V2) — skipped: {oip['skipped']}"
    lines = [
        f"## Open Inference Protocol (V2) — {oip.get('cpus')}; {oip.get('conns')} connections; "
        f"best of {oip.get('repeats')} interleaved runs of {oip.get('duration_s')} s; "
        f"MLServer {get_version(oip)}",
        "",
        "| target | req/s | p50 ms | p99 ms | CPU µs/req (servers) | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in ("dcf-v2", "dcf-function", "mlserver", "mlserver-workers"):
        r = oip.get(key)
        if r:
            lines.append(
                f"| {key} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{r.get('cpu_us_per_req', '–')} | {r.get('errors', 0)} |"
            )
    return "\n".join(lines)


def get_version(oip: dict) -> str:
    return (oip.get("mlserver") or {}).get("version", "?")


def targets(results: dict) -> list[dict]:
    """The target row for bench/report.py's table: DCF's V2 against the better MLServer."""
    oip = results.get("oip") or {}
    peer = peer_rps(results)
    if "dcf-v2" not in oip or peer is None or not peer[1]:
        return []
    ratio = oip["dcf-v2"]["rps"] / peer[1]
    met = ratio >= TARGET
    return [
        {
            "target": f"V2 infer req/s @{CONNS}: DCF / MLServer ({peer[0]})",
            "value": round(ratio, 2),
            "measured": f"{ratio:.2f}×",
            "goal": f"≥ {TARGET}×",
            "status": "MET" if met else f"MISSED by {TARGET - ratio:.2f}×",
            "note": f"/function/NAME: {oip['dcf-function']['rps'] / peer[1]:.2f}× the peer"
            if "dcf-function" in oip
            else "",
        }
    ]
