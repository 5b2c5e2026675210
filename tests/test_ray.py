"""The ray backend on a real multi-node Ray cluster, driven through the CLI and HTTP.

The session's cluster (``cluster`` in conftest.py): a head with no CPUs
and worker nodes with distinct custom resources, every node on 127.0.0.2 so no
traffic leaves loopback, with health checks fast enough to see a node die in ~2 s.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dcf import wire
from tests.conftest import (
    ECHO,
    NODE_IP,
    REPO,
    GatewayProcess,
    deploy,
    ray_worker,
    write_function,
)

ray = pytest.importorskip("ray", reason="the ray backend's tests need pip install -e '.[ray]'")
from ray.cluster_utils import Cluster  # noqa: E402

SLOW_ECHO = """
import time

def Handler(req):
    time.sleep(0.01)
    return req.input
"""

WHERE = """
import os

print("replica says hello", flush=True)

def Handler(req):
    # The replica by name: in a sandbox every runtime's pid is the same (its own namespace).
    replica = os.environ.get("DCF_REPLICA")
    return {"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(), "id": replica}
"""


@pytest.fixture(scope="module")
def rgw(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    home = tmp_path_factory.mktemp("ray") / "home"
    gateway = GatewayProcess(home, extra=["--backend", "ray", "--ray-address", cluster.address])
    gateway.start()
    yield gateway
    gateway.stop()


def replicas(gw: GatewayProcess, name: str) -> list[dict]:
    with gw.http() as http:
        return http.get(f"/system/function/{name}").json()["replicas"]["list"]


def all_ready(gw: GatewayProcess, name: str, count: int) -> dict:
    def check() -> dict | None:
        with gw.http() as http:
            info = http.get(f"/system/function/{name}").json()
        listed = info["replicas"]["list"]
        return info if len(listed) == count and all(r["state"] == "ready" for r in listed) else None

    return wait_until(check, timeout=60)


def refuses(address: str) -> bool:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


def wait_until(check, timeout: float = 30, every: float = 0.2):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not true within {timeout}s: {check}")


class Caller:
    """Calls a function from a few threads until stopped; counts answers and failures."""

    def __init__(self, gw: GatewayProcess, name: str, threads: int = 4) -> None:
        self.url = f"{gw.url}/function/{name}"
        self.ok = 0
        self.failures: list[tuple[float, int, str]] = []
        self.answers: list[bytes] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                response = http.post(self.url, content=b"ping")
                if response.status_code == 200:
                    self.ok += 1
                    self.answers.append(response.content)
                else:
                    self.failures.append((time.monotonic(), response.status_code, response.text))

    def __enter__(self) -> Caller:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def lan_addresses() -> list[str]:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return [a for a in out if not a.startswith("127.") and ":" not in a]


def test_replicas_spread_over_nodes_and_serve(rgw: GatewayProcess, tmp_path: Path) -> None:
    deploy(rgw, tmp_path, "spread", WHERE, replicas={"min": 3, "max": 3}, requests={"cpu": "1"})
    info = all_ready(rgw, "spread", 3)
    nodes = {r["node"] for r in info["replicas"]["list"]}
    assert len(nodes) == 3, info["replicas"]["list"]
    assert all(r["node_ip"] == NODE_IP for r in info["replicas"]["list"])
    assert all(r["address"].startswith(f"tcp://{NODE_IP}:") for r in info["replicas"]["list"])

    # Calls reach every replica; `info` and the CLI show each replica's node.
    pids = {rgw.dcf("function", "call", "spread", check=True).stdout for _ in range(12)}
    assert len(pids) >= 2
    shown = rgw.dcf("function", "info", "spread", check=True).stdout.decode()
    assert shown.count(f"node {NODE_IP}") == 3, shown

    # What a replica prints reaches the function's log, with the replica and its node.
    log = wait_until(
        lambda: (
            (out := rgw.dcf("function", "log", "spread").stdout.decode()).count(
                "replica says hello"
            )
            == 3
            and out
        )
    )
    assert f"@{NODE_IP}] replica says hello" in log

    with rgw.http() as http:
        metrics = http.get("/metrics").text
    assert 'dcf_function_calls_total{code="200",function="spread"}' in metrics

    # Nothing talks to this host's LAN address: nodes, driver and replicas are on loopback.
    connections = subprocess.run(["ss", "-Htn"], capture_output=True, text=True).stdout
    for address in lan_addresses():
        assert f"{address}:" not in connections, connections

    # delete: every replica's actor is gone, so its port no longer answers.
    addresses = [r["address"] for r in info["replicas"]["list"]]
    rgw.dcf("function", "delete", "spread", check=True)
    wait_until(lambda: all(refuses(a) for a in addresses))


FORKER = """
import subprocess

def Handler(req):
    subprocess.Popen(["sleep", req.input.decode()])
    return "forked"
"""


def _pid_of(argv: list[str]) -> int | None:
    """The host's pid of the process running ``argv`` (a sandbox's pids are its own)."""
    wanted = "\0".join(argv).encode() + b"\0"
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and (proc / "cmdline").read_bytes() == wanted:
                return int(proc.name)
    return None


def test_what_a_handler_forked_ends_with_its_replica(rgw: GatewayProcess, tmp_path: Path) -> None:
    deploy(rgw, tmp_path, "forker", FORKER, requests={"cpu": "0.25"})
    marker = f"300.{os.getpid()}"  # this test's child, and no other process, sleeps this long
    with rgw.http() as http:
        assert http.post("/function/forker", content=marker).status_code == 200
    child = wait_until(lambda: _pid_of(["sleep", marker]), timeout=5)
    assert Path(f"/proc/{child}").exists()
    rgw.dcf("function", "delete", "forker", check=True)
    wait_until(lambda: not Path(f"/proc/{child}").exists() or _zombie(child), timeout=15)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_spread_holds_as_replicas_come_later_and_pack_keeps_them_together(
    rgw: GatewayProcess, tmp_path: Path
) -> None:
    deploy(rgw, tmp_path, "grower", ECHO, requests={"cpu": "0.25"})
    rgw.dcf("function", "scale", "grower", "--min", "3", "--max", "3", check=True)
    listed = all_ready(rgw, "grower", 3)["replicas"]["list"]
    assert len({r["node"] for r in listed}) == 3, listed

    deploy(
        rgw,
        tmp_path,
        "packed",
        ECHO,
        requests={"cpu": "0.25"},
        placement="pack",
        replicas={"min": 3, "max": 3},
    )
    listed = all_ready(rgw, "packed", 3)["replicas"]["list"]
    assert len({r["node"] for r in listed}) == 1, listed
    for name in ("grower", "packed"):
        rgw.dcf("function", "delete", name, check=True)


def test_a_connection_without_the_secret_is_refused(rgw: GatewayProcess, tmp_path: Path) -> None:
    info = deploy(rgw, tmp_path, "guarded", ECHO, requests={"cpu": "0.5"})
    host, port = info["replicas"]["list"][0]["address"].removeprefix("tcp://").rsplit(":", 1)
    call = b"".join(wire.request_frame(1, "POST", "", "", [], b"leak?"))
    attempts = {
        "no hello": call,
        "wrong secret": b"".join(wire.hello_frame(b"x" * 32)) + call,
        "huge first frame": b"".join(wire.request_frame(0, "HELLO", "", "", [], b"x" * 70_000)),
    }
    for what, payload in attempts.items():
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            try:
                sock.sendall(payload)
                answer = sock.recv(1024)
            except ConnectionResetError:
                answer = b""
            assert answer == b"", f"{what}: the replica answered {answer!r}"
    # The gateway's own connection still works.
    assert rgw.dcf("function", "call", "guarded", input="ok", check=True).stdout == b"ok"


def test_a_request_no_node_can_hold_fails_at_once(rgw: GatewayProcess, tmp_path: Path) -> None:
    config = write_function(tmp_path, "greedy", ECHO, limits={"gpu": "1"})
    started = time.monotonic()
    result = rgw.dcf("function", "create", "-f", str(config), "greedy")
    assert time.monotonic() - started < 20
    assert result.returncode == 1
    error = result.stderr.decode()
    assert "gpu 1" in error and "no node has gpu 1" in error, error
    info = rgw.wait_status("greedy", "Failed")
    assert info["replicas"]["list"] == []
    assert "gpu" in info["failure"]

    config = write_function(tmp_path, "exotic", ECHO, resources={"tpu_pod": 1})
    result = rgw.dcf("function", "create", "-f", str(config), "exotic")
    assert result.returncode == 1 and "no node has tpu_pod 1" in result.stderr.decode()


def test_gpus_are_placed_and_shared(rgw: GatewayProcess, cluster: Cluster, tmp_path: Path) -> None:
    gpu_node = cluster.add_node(num_cpus=0, num_gpus=1, node_ip_address=NODE_IP)
    cluster.wait_for_nodes()
    try:
        info = deploy(rgw, tmp_path, "on-gpu", WHERE, requests={"cpu": "0"}, limits={"gpu": "1"})
        (replica,) = info["replicas"]["list"]
        assert replica["node"] == gpu_node.node_id
        seen = rgw.dcf("function", "call", "on-gpu", check=True).stdout
        assert b'"cuda": "0"' in seen
        rgw.dcf("function", "delete", "on-gpu", check=True)

        info = deploy(
            rgw,
            tmp_path,
            "half-gpu",
            WHERE,
            requests={"cpu": "0", "gpu": "0.5"},
            replicas={"min": 2, "max": 2},
        )
        rgw.wait_status("half-gpu", "Ready")
        listed = wait_until(
            lambda: (
                len(r := [x for x in replicas(rgw, "half-gpu") if x["state"] == "ready"]) == 2 and r
            )
        )
        assert {r["node"] for r in listed} == {gpu_node.node_id}
        rgw.dcf("function", "delete", "half-gpu", check=True)
    finally:
        cluster.remove_node(gpu_node)


def test_update_under_load_fails_no_call(rgw: GatewayProcess, tmp_path: Path) -> None:
    v1 = "def Handler(req):\n    return 'v1'\n"
    v2 = "def Handler(req):\n    return 'v2'\n"
    settings = {"replicas": {"min": 2, "max": 2}, "requests": {"cpu": "0.25"}}
    deploy(rgw, tmp_path, "rolling", v1, **settings)
    with Caller(rgw, "rolling") as caller:
        time.sleep(0.5)
        deploy(rgw, tmp_path, "rolling", v2, update=True, **settings)
        wait_until(lambda: caller.answers and caller.answers[-1] == b"v2")
        time.sleep(0.5)
    assert caller.failures == []
    assert caller.ok > 20
    rgw.dcf("function", "delete", "rolling", check=True)


def test_scale_to_zero_and_back(rgw: GatewayProcess, tmp_path: Path) -> None:
    config = write_function(
        tmp_path,
        "napper",
        ECHO,
        replicas={"min": 0, "max": 1, "idle_timeout": "1s"},
        requests={"cpu": "0.25"},
    )
    rgw.dcf("function", "create", "-f", str(config), "napper", check=True)
    rgw.wait_status("napper", "Scaled to zero", timeout=30)
    wait_until(lambda: replicas(rgw, "napper") == [], timeout=10)  # the last one has stopped
    answer = rgw.dcf("function", "call", "napper", input="awake", check=True)
    assert answer.stdout == b"awake"
    rgw.dcf("function", "scale", "napper", "--min", "2", "--max", "2", check=True)
    all_ready(rgw, "napper", 2)
    rgw.dcf("function", "delete", "napper", check=True)


def test_a_replica_waiting_for_busy_resources_says_why_then_gives_up(
    rgw: GatewayProcess, tmp_path: Path
) -> None:
    # worker1 has one unit of its custom resource: the first function takes it.
    deploy(rgw, tmp_path, "holder", ECHO, resources={"worker1": 1}, requests={"cpu": "0"})
    config = write_function(
        tmp_path,
        "waiter",
        ECHO,
        resources={"worker1": 1},
        requests={"cpu": "0"},
        start_timeout="4s",
    )
    rgw.dcf("function", "create", "-f", str(config), "waiter", "--no-wait", check=True)

    def waiting() -> dict | None:
        with rgw.http() as http:
            info = http.get("/system/function/waiter").json()
        listed = info["replicas"]["list"]
        return info if listed and listed[0]["detail"] else None

    info = wait_until(waiting, timeout=10)
    assert info["status"] in ("Building", "Not Ready")
    assert "waiting for the cluster" in info["replicas"]["list"][0]["detail"]
    info = rgw.wait_status("waiter", "Failed", timeout=30)
    assert "not ready within the start timeout of 4s" in info["failure"]
    assert "waiting for the cluster" in info["failure"]
    # The holder kept its replica; the waiter left nothing pending behind.
    assert rgw.dcf("function", "call", "holder", input="still", check=True).stdout == b"still"
    for name in ("holder", "waiter"):
        rgw.dcf("function", "delete", name, check=True)


def test_ssd_example_gives_the_same_boxes_as_locally(
    rgw: GatewayProcess, gw: GatewayProcess
) -> None:
    example = REPO / "examples" / "ssd-detector"
    photos = sorted((example / "samples").glob("*.jpg"))
    assert photos
    answers = {}
    for gateway in (rgw, gw):
        gateway.dcf("function", "create", "-f", "config.yaml", "ssd-test", cwd=example, check=True)
        gateway.wait_status("ssd-test", "Ready", timeout=180)
        with gateway.http() as http:
            answers[gateway.url] = [
                http.post("/function/ssd-test", content=_b64(photo)).json() for photo in photos
            ]
    ray_boxes, local_boxes = answers[rgw.url], answers[gw.url]
    assert any(ray_boxes), "the detector found nothing in any sample photo"
    assert ray_boxes == local_boxes
    rgw.dcf("function", "delete", "ssd-test", check=True)


def _b64(path: Path) -> bytes:
    import base64

    return base64.b64encode(path.read_bytes())


def test_a_lost_node_fails_only_its_calls(
    rgw: GatewayProcess, cluster: Cluster, tmp_path: Path
) -> None:
    info = deploy(
        rgw,
        tmp_path,
        "sturdy",
        SLOW_ECHO,
        replicas={"min": 2, "max": 2},
        requests={"cpu": "1"},
        concurrency=2,
    )
    info = all_ready(rgw, "sturdy", 2)
    victim_id = info["replicas"]["list"][0]["node"]
    (victim,) = [n for n in cluster.worker_nodes if n.node_id == victim_id]
    with Caller(rgw, "sturdy", threads=4) as caller:
        wait_until(lambda: caller.ok > 20)
        cluster.remove_node(victim, allow_graceful=False)
        lost_at = time.monotonic()

        def replaced() -> bool:
            listed = replicas(rgw, "sturdy")
            ready = [r for r in listed if r["state"] == "ready"]
            return len(ready) == 2 and victim_id not in {r["node"] for r in ready}

        wait_until(replaced, timeout=60)
        replaced_at = time.monotonic()
        served = caller.ok
        time.sleep(2)
    # Only calls in flight on the lost replica failed (concurrency 2), as 502s.
    assert len(caller.failures) <= 2, caller.failures
    assert all(status == 502 for _, status, _ in caller.failures), caller.failures
    assert all(at < replaced_at for at, _, _ in caller.failures)
    assert caller.ok > served, "calls stopped after the replacement"
    print(f"replacement ready {replaced_at - lost_at:.1f}s after the node was lost")
    ray_worker(cluster, "worker-replacement")  # capacity back for the tests after this one
    rgw.dcf("function", "delete", "sturdy", check=True)


def test_gateway_restart_brings_functions_back_and_leaves_no_orphans(
    rgw: GatewayProcess, tmp_path: Path
) -> None:
    deploy(rgw, tmp_path, "phoenix", ECHO, requests={"cpu": "0.25"})
    info = all_ready(rgw, "phoenix", 1)
    before = [r["address"] for r in info["replicas"]["list"]]

    rgw.stop()  # graceful
    wait_until(lambda: all(refuses(a) for a in before))
    rgw.start()
    info = all_ready(rgw, "phoenix", 1)
    assert rgw.dcf("function", "call", "phoenix", input="again", check=True).stdout == b"again"

    # A gateway killed outright: its actors die with its driver, none left orphaned.
    after = [r["address"] for r in info["replicas"]["list"]]
    assert rgw.proc is not None
    os.killpg(rgw.proc.pid, 9)
    rgw.proc.wait()
    wait_until(lambda: all(refuses(a) for a in after), timeout=30)
    rgw.start()
    rgw.wait_status("phoenix", "Ready", timeout=60)
    assert rgw.dcf("function", "call", "phoenix", input="back", check=True).stdout == b"back"


def test_start_without_a_cluster_says_so_in_one_line(tmp_path: Path) -> None:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{port.getsockname()[1]}"
    port.close()
    gateway = GatewayProcess(
        tmp_path / "home", extra=["--backend", "ray", "--ray-address", address]
    )
    env = gateway.env()
    result = subprocess.run(
        [*_dcf(), "gateway", "start", "--port", str(gateway.port), *gateway.extra],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and f"no Ray cluster answers at {address}" in lines[0], lines


def _dcf() -> list[str]:
    import sys

    return [sys.executable, "-m", "dcf.cli.main"]
