"""``python -m bench [PART ...]``: DCF's benchmarks, side by side in one run.

Parts (``PARTS``): echo, tracing (echo with tracing off and on), ssd, coldstart,
memory, cli, streaming, isolation (the sandbox against ``--isolation process``),
ray (Ray Serve), raybackend (DCF's Ray backend), oip (V2 infer beside MLServer,
bench/oip.py), all of these by default (``--quick`` leaves the two Ray parts out
unless named), and profile, bigbody (600 KB echo: bare hop, local, Ray backend, with
flame graphs) and peers (LitServe, BentoML, PyTriton, Ray Serve beside DCF,
bench/peers/), only when named. Prints a markdown table and writes
``bench/results/<name>.json`` and ``<name>.md``, and
``latest.json``/``latest.md`` (``latest-quick.*`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import report, util
from bench.context import Context

DEFAULT = (
    "echo",
    "tracing",
    "ssd",
    "coldstart",
    "memory",
    "cli",
    "streaming",
    "isolation",
    "ray",
    "raybackend",
    "oip",
)
PARTS = (*DEFAULT, "profile", "bigbody", "peers")
RAY_PARTS = ("ray", "raybackend")  # left out of --quick's defaults
RESULTS = util.BENCH_DIR / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=util.ROOT,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "dcf"],
            capture_output=True,
            text=True,
            cwd=util.ROOT,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + (
        f" + uncommitted changes in {len(dirty.splitlines())} dcf file(s)" if dirty else ""
    )


def _versions() -> dict:
    out = {}
    for name in ("dcf", "uvicorn", "starlette", "fastapi", "uvloop", "httptools", "ray", "cv2"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - optional packages
            continue
    if shutil.which("wrk"):
        proc = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
        out["wrk"] = (proc.stdout + proc.stderr).splitlines()[0].strip()
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="DCF's benchmarks, side by side in one run (parts: see below).",
    )
    parser.add_argument(
        "parts",
        nargs="*",
        metavar="PART",
        help=f"any of {', '.join(PARTS)} (default: {' '.join(DEFAULT)}; --quick drops "
        f"{' and '.join(RAY_PARTS)})",
    )
    parser.add_argument("--quick", action="store_true", help="short runs, one round: a smoke test")
    parser.add_argument("--name", help="results file name (default: a timestamp)")
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin servers and the load generator to separate cores",
    )
    parser.add_argument(
        "--python-gen",
        action="store_true",
        help="use the asyncio load generator even where wrk is installed",
    )
    parser.add_argument(
        "--example",
        default=str(util.ROOT / "examples" / "ssd-detector"),
        help="the SSD example's directory",
    )
    parser.add_argument(
        "--ssd-wait",
        type=float,
        default=0,
        help="seconds to wait for the SSD example to appear before skipping its rows",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each group of runs, wait up to this long for the machine to be under 25%% "
        "busy (other work on a shared machine skews every number)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        metavar="N",
        help="interleaved rounds per echo row (default 3, 1 with --quick): more rounds steady "
        "the ratios on a noisy machine",
    )
    parser.add_argument("--no-save", action="store_true", help="print only, write no results")
    args = parser.parse_args(argv)
    if args.repeats is not None and not 1 <= args.repeats <= 100:
        parser.error(f"--repeats must be from 1 to 100, not {args.repeats}")
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    if not args.parts:
        args.parts = _defaults(args.quick)
    return args


def _defaults(quick: bool) -> list[str]:
    return [p for p in DEFAULT if not (quick and p in RAY_PARTS)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    util.install_cleanup()
    os.chdir(util.ROOT)
    name = args.name or time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    ctx = Context(
        quick=args.quick,
        pin=not args.no_pin,
        example=Path(args.example),
        ssd_wait=args.ssd_wait,
        prefer_wrk=not args.python_gen,
        quiet_wait=args.wait_quiet,
        rounds=args.repeats,
    )
    if not ctx.gen.use_wrk and not args.python_gen:
        util.log("wrk is not installed (apt-get install -y wrk): using the asyncio generator")
    results: dict = {
        "meta": {
            "name": name,
            "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "quick": args.quick,
            "parts": args.parts,
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "git": _git(),
            "versions": _versions(),
            "generator": ctx.gen.name,
            "cpus": ctx.cpus.describe(),
            "loadavg_before": util.load_average(),
            "machine_busy_pct_before": round(util.machine_busy_pct(1.0), 1),
            "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        }
    }
    started = time.perf_counter()
    failed = False
    try:
        for part in args.parts:
            t0 = time.perf_counter()
            try:
                results[part] = _run_part(part, ctx, results, name)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - report it, go on with the other parts
                util.log(f"{part} failed: {type(exc).__name__}: {exc}")
                results[part] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
                failed = True
            util.log(f"{part}: {time.perf_counter() - t0:.0f}s")
    except KeyboardInterrupt:
        util.log("interrupted: stopping everything the bench started")
        util.stop_all()
        results["meta"]["interrupted"] = True
    results["meta"]["loadavg_after"] = util.load_average()
    results["meta"]["total_s"] = round(time.perf_counter() - started, 1)
    results["targets"] = report.targets(results)
    text = report.render(results)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        # latest.* (latest-quick.*) is the last run of every default part; a run of some
        # parts only writes its own files.
        complete = set(args.parts) >= set(_defaults(args.quick))
        stems = [name]
        if complete:
            stems.append("latest-quick" if args.quick else "latest")
        for stem in stems:
            (RESULTS / f"{stem}.json").write_text(util.dumps(results) + "\n")
            (RESULTS / f"{stem}.md").write_text(text)
        util.log("results: " + ", ".join(str(RESULTS / f"{s}.json") for s in stems))
    util.log(f"total {results['meta']['total_s']:.0f}s")
    return 1 if failed or results["meta"].get("interrupted") else 0


def _run_part(part: str, ctx: Context, results: dict, name: str) -> dict:
    if part == "echo":
        from bench import echo

        return echo.run(ctx)
    if part == "tracing":
        from bench import tracing

        return tracing.run(ctx)
    if part == "ssd":
        from bench import ssd

        return ssd.run(ctx)
    if part == "coldstart":
        from bench import lifecycle

        ssd_result = results.get("ssd")
        if not ssd_result or "skipped" in ssd_result:
            ssd_result = _model_load(ctx)
        return lifecycle.coldstart(ctx, ssd_result)
    if part == "memory":
        from bench import lifecycle

        return lifecycle.memory(ctx)
    if part == "cli":
        from bench import cli

        return cli.run(ctx)
    if part == "streaming":
        from bench import streaming

        return streaming.run(ctx)
    if part == "isolation":
        from bench import isolation

        return isolation.run(ctx)
    if part == "ray":
        from bench import ray_serve

        return ray_serve.run(ctx)
    if part == "raybackend":
        from bench import ray_backend

        return ray_backend.run(ctx)
    if part == "oip":
        from bench import oip

        return oip.run(ctx)
    if part == "profile":
        from bench import profile

        return profile.run(ctx, RESULTS, name)
    if part == "bigbody":
        from bench import bigbody

        return bigbody.run(ctx, RESULTS, name)
    if part == "peers":
        from bench import peers

        return peers.run(ctx, RESULTS, name)
    raise ValueError(part)


def _model_load(ctx: Context) -> dict | None:
    """The SSD model's import and load time, measured in a process of its own."""
    from bench import apps, ssd

    if not apps.ssd_example_ready(ctx.example):
        return None
    ssd_dir = apps.prepare_ssd_dir(ctx.example)
    body = Path(ssd_dir, "sample.b64")
    body.write_bytes(apps.ssd_bodies(ctx.example)[0])
    return ssd.in_process(ssd_dir, "unbatched", 1, 0.5, 0, [str(body)])


if __name__ == "__main__":
    sys.exit(main())
