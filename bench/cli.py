"""How fast the ``dcf`` command answers: ``dcf function call`` of an echo function beside curl.

The seed's loop is ``cat img | base64 | dcf function call ssd-test``, typed again and
again, so the command's own start-up is the latency a user feels. Every row runs a
whole process against the same gateway, timed from spawn to exit as a shell sees it;
the rows take turns, so a burst of other work on the machine hits them all alike.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import apps, util
from bench.context import ECHO_BODY, Context
from bench.gateway import Gateway


def _dcf() -> list[str]:
    """The installed ``dcf`` script, as a user runs it (else ``python -m dcf.cli.main``)."""
    script = shutil.which("dcf", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "dcf.cli.main"]


def _time(cmd: list[str], env: dict[str, str], body: bytes, expect: bytes | None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, input=body, capture_output=True, env=env, timeout=60)
    elapsed = time.perf_counter() - start
    if proc.returncode or (expect is not None and proc.stdout != expect):
        output = f"{proc.stdout[:200]!r} {proc.stderr[-500:]!r}"
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {output}")
    return elapsed


def run(ctx: Context) -> dict:
    runs = 5 if ctx.quick else 20
    echo_dir = apps.write_echo_dir()
    util.log(f"cli: {runs} runs of each command against one gateway")
    gw = Gateway(label="cli gateway")
    try:
        gw.deploy("echo", echo_dir, "echo_sync.py")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DCF_")}
        env["DCF_GATEWAY"] = f"127.0.0.1:{gw.port}"
        dcf = _dcf()
        commands: dict[str, tuple[list[str], bytes | None]] = {
            "python": ([sys.executable, "-c", "pass"], None),
            "dcf --version": ([*dcf, "--version"], None),
            "dcf function call": ([*dcf, "function", "call", "echo"], ECHO_BODY),
            "dcf function list": ([*dcf, "function", "list"], None),
        }
        if shutil.which("curl"):
            curl = ["curl", "-sS", "--data-binary", "@-", gw.function_url("echo")]
            commands["curl"] = (curl, ECHO_BODY)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for cmd, expect in commands.values():  # warm the page cache and the replica
            _time(cmd, env, ECHO_BODY, expect)
        for _ in range(runs):
            for name, (cmd, expect) in commands.items():
                times[name].append(_time(cmd, env, ECHO_BODY, expect))
        rows = {
            name: {
                "median_s": round(util.median(values) or 0, 4),
                "best_s": round(min(values), 4),
                "runs_s": [round(v, 4) for v in values],
            }
            for name, values in times.items()
        }
        return {"runs": runs, "command": " ".join(commands["dcf function call"][0]), "rows": rows}
    finally:
        gw.stop()
