"""A DCF gateway for the bench: a free port, a temporary DCF_HOME, deploys through the client."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench import util


class Gateway:
    def __init__(
        self,
        cpus: set[int] | None = None,
        label: str = "gateway",
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> None:
        """``extra``: more ``dcf gateway start`` options (``--backend ray ...``)."""
        self.home = util.tempdir("dcf-bench-home-")
        self.port = util.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(self.home, "gateway.log")
        self.label = label
        cmd = [sys.executable, "-m", "dcf.cli.main", "gateway", "start", "--port", str(self.port)]
        self.proc: subprocess.Popen = util.spawn(
            [*cmd, *(extra or [])],
            env={"DCF_HOME": self.home, **(env or {})},
            cpus=cpus,
            log=self.log,
            cwd=self.home,
        )
        try:
            util.wait_http(self.url + "/healthz", timeout=timeout, proc=self.proc)
        except Exception:
            raise RuntimeError(f"{label} did not start: {self.log.read_text()[-2000:]}") from None
        from dcf.client import Client

        self.client = Client(f"127.0.0.1:{self.port}", timeout=300)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def function_url(self, name: str) -> str:
        return f"{self.url}/function/{name}"

    def deploy(
        self,
        name: str,
        directory: str,
        file: str,
        handler: str = "Handler",
        update: bool = False,
        **settings: object,
    ) -> float:
        """Create (or update) a function and wait until it is Ready; returns the seconds taken."""
        from dcf.config import parse_function

        spec = parse_function(
            {"handler": {"dir": ".", "file": file, "name": handler}, **settings}, name
        )
        start = time.perf_counter()
        result = self.client.deploy(spec, Path(directory), update=update, wait=True)
        elapsed = time.perf_counter() - start
        if result.get("status") != "Ready":
            info = self.client.info(name)
            raise RuntimeError(
                f"{name} did not become Ready: {result} — {info.get('failure')}"
                f" {info.get('last_error')}"
            )
        return elapsed

    def info(self, name: str) -> dict:
        return self.client.info(name)

    def replica_pids(self, name: str) -> list[int]:
        return [r["pid"] for r in self.info(name)["replicas"]["list"] if r.get("pid")]

    def replica_tree(self, name: str) -> list[int]:
        """Every process of the function's replicas, for CPU accounting: in a sandbox a
        replica's pid is bwrap's, and the runtime runs below it."""
        return [d for p in self.replica_pids(name) for d in util.descendants(p)]

    def rss_mb(self) -> float | None:
        return util.rss_mb(self.pid)

    def stop(self) -> None:
        self.client.close()
        util.stop(self.proc)
