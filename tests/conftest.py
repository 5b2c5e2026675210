"""Fixtures that run the real thing: a gateway process on a free port, real replicas."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

NODE_IP = "127.0.0.2"
"""Every test Ray node, and the gateway's driver, on loopback (Ray rewrites 127.0.0.1)."""
FAST_HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 4,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayProcess:
    """``dcf gateway start`` in a subprocess, with its own DCF_HOME."""

    def __init__(self, home: Path, token: str | None = None, extra: list[str] | None = None):
        self.home = home
        self.token = token
        self.extra = extra or []
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        self.proc: subprocess.Popen | None = None
        self.log_path = home.parent / f"gateway-{self.port}.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DCF_")}
        env["DCF_HOME"] = str(self.home)
        env["DCF_GATEWAY"] = self.address
        if self.token:
            env["DCF_TOKEN"] = self.token
        return env

    def start(self) -> GatewayProcess:
        cmd = [
            sys.executable,
            "-m",
            "dcf.cli.main",
            "gateway",
            "start",
            "--port",
            str(self.port),
            *self.extra,
        ]
        if self.token:
            cmd += ["--token", self.token]
        # The whole suite in another isolation mode: DCF_TEST_ISOLATION=sandbox pytest ...
        isolation = os.environ.get("DCF_TEST_ISOLATION")
        if isolation and "--isolation" not in self.extra:
            cmd += ["--isolation", isolation]
        env = self.env()
        env.pop("DCF_TOKEN", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError("gateway did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=60)

    def dcf(
        self,
        *args: str,
        input: bytes | str | None = None,
        cwd: Path | None = None,
        check: bool = False,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess:
        """Run the real CLI against this gateway."""
        if isinstance(input, str):
            input = input.encode()
        result = subprocess.run(
            [sys.executable, "-m", "dcf.cli.main", *args],
            input=input if input is not None else b"",
            capture_output=True,
            env=self.env(),
            cwd=cwd,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"dcf {' '.join(args)} exited {result.returncode}:\n{result.stderr.decode()}"
            )
        return result

    def wait_status(self, name: str, status: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        info: dict = {}
        with self.http() as http:
            while time.monotonic() < deadline:
                response = http.get(f"/system/function/{name}")
                if response.status_code == 200:
                    info = response.json()
                    if info["status"] == status:
                        return info
                time.sleep(0.1)
        raise AssertionError(f"{name} did not become {status}: {info}")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory,
       request: pytest.FixtureRequest) -> Iterator[GatewayProcess]:
    """One gateway shared by a test module's tests (each deploys its own functions)."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    gateway = GatewayProcess(tmp_path_factory.mktemp(name) / "home").start()
    yield gateway
    gateway.stop()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path / "home").start()
    yield gw
    gw.stop()


def write_function(
    root: Path, name: str, handler: str, requirements: str = "", **settings: object
) -> Path:
    """A function directory and a config.yaml entry for it; returns the config path."""
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "handler.py").write_text(textwrap.dedent(handler))
    (directory / "requirements.txt").write_text(requirements)
    config = root / "config.yaml"
    data = yaml.safe_load(config.read_text()) if config.exists() else None
    data = data or {"functions": {}}
    entry = {"runtime": "python3", "handler": {"dir": f"./{name}"}}
    entry.update(settings)
    data["functions"][name] = entry
    config.write_text(yaml.safe_dump(data))
    return config


def deploy(
    gw: GatewayProcess,
    root: Path,
    name: str,
    handler: str,
    update: bool = False,
    **settings: object,
) -> dict:
    config = write_function(root, name, handler, **settings)
    args = ["function", "create", "-f", str(config), name] + (["--update"] if update else [])
    gw.dcf(*args, check=True)
    return gw.wait_status(name, "Ready")


ECHO = """
def Handler(req):
    return req.input
"""


def ray_worker(cluster, name: str, **args: object):  # noqa: ANN001, ANN201 - ray's types
    """A worker node with 2 CPUs and a custom resource named after it."""
    return cluster.add_node(num_cpus=2, resources={name: 1}, node_ip_address=NODE_IP, **args)


@pytest.fixture(scope="session")
def cluster() -> Iterator:
    """One real multi-node Ray cluster for every module that tests the ray backend: a head
    with no CPUs and three workers, all on loopback, with health checks fast enough to see
    a node die in ~2 s. A test that removes a node adds one back."""
    pytest.importorskip("ray", reason="the ray backend's tests need pip install -e '.[ray]'")
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "node_ip_address": NODE_IP,
            "include_dashboard": False,
            "_system_config": FAST_HEALTH,
        },
    )
    for i in range(3):
        ray_worker(cluster, f"worker{i}")
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_with(*markers: str) -> list[int]:
    """Host pids of the live processes whose command line holds every one of ``markers``.

    Found from outside: a sandboxed process sees neither the host's files nor its pids,
    so it cannot report its own."""
    wanted = [m.encode() for m in markers]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if all(m in cmdline for m in wanted) and alive(int(entry.name)):
                found.append(int(entry.name))
    return found
