"""No call lost when the platform changes shape (issue 17): scale-down drains its
replicas, a stuck call delays a retire by at most the function's timeout, and a deploy
that fails in an unexpected way fails fast, says why and leaves nothing behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from dcf import wire
from tests.conftest import GatewayProcess, deploy, write_function

SLOW = """
import time
def Handler(req):
    time.sleep(30 if req.input == b"stuck" else 0.4)
    return req.input
"""


class Load:
    """``callers`` threads calling ``name`` in a loop; every answer counted by status."""

    def __init__(self, gw: GatewayProcess, name: str) -> None:
        self.gw, self.name = gw, name
        self.codes: Counter[int] = Counter()
        self.errors: list[str] = []
        self._threads: list[tuple[threading.Thread, threading.Event]] = []

    def _call(self, stop: threading.Event, n: int) -> None:
        with httpx.Client(base_url=self.gw.url, timeout=30) as http:
            for i in range(1000):
                if stop.is_set():
                    return
                body = f"{n}-{i}".encode()
                try:
                    response = http.post(f"/function/{self.name}", content=body)
                    ok = response.status_code == 200 and response.content == body
                    self.codes[200 if ok else response.status_code] += 1
                    if not ok:
                        self.errors.append(response.text[:200])
                except httpx.TransportError as exc:
                    self.codes[0] += 1
                    self.errors.append(repr(exc))

    def set(self, callers: int) -> None:
        while len(self._threads) > callers:
            thread, stop = self._threads.pop()
            stop.set()
            thread.join(30)
        while len(self._threads) < callers:
            stop = threading.Event()
            thread = threading.Thread(target=self._call, args=(stop, len(self._threads)))
            self._threads.append((thread, stop))
            thread.start()

    @property
    def failed(self) -> int:
        return sum(n for code, n in self.codes.items() if code != 200)


@contextmanager
def load(gw: GatewayProcess, name: str) -> Iterator[Load]:
    running = Load(gw, name)
    try:
        yield running
    finally:
        running.set(0)


def members(gw: GatewayProcess, name: str) -> list[dict]:
    return gw.http().get(f"/system/function/{name}").json()["replicas"]["list"]


def wait_members(gw: GatewayProcess, name: str, count: int, timeout: float = 30) -> float:
    """Seconds until ``name`` has exactly ``count`` replicas, retiring ones included."""
    start = time.monotonic()
    while len(listed := members(gw, name)) != count:
        assert time.monotonic() - start < timeout, f"{name}: {listed}"
        time.sleep(0.05)
    return time.monotonic() - start


def busy(gw: GatewayProcess, name: str, inflight: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while sum(r["inflight"] for r in members(gw, name)) < inflight:
        assert time.monotonic() < deadline, members(gw, name)
        time.sleep(0.05)


def test_explicit_scale_down_under_load_fails_no_call(gateway: GatewayProcess, tmp_path: Path):
    """Every slot busy when a replica retires: its calls finish before it stops."""
    deploy(gateway, tmp_path, "drain", SLOW, concurrency=2, replicas={"min": 3, "max": 3})
    with load(gateway, "drain") as running:
        running.set(6)
        busy(gateway, "drain", 6)
        response = gateway.http().post("/system/function/drain/scale", json={"min": 2, "max": 2})
        assert response.status_code == 200, response.text
        wait_members(gateway, "drain", 2)
        busy(gateway, "drain", 4)
        gateway.dcf("function", "scale", "drain", "--min", "1", "--max", "1", check=True)
        wait_members(gateway, "drain", 1)
        time.sleep(1)
    assert running.failed == 0, (running.codes, running.errors[:3])
    assert running.codes[200] > 20


def test_autoscaling_3_2_1_0_under_load_fails_no_call(gateway: GatewayProcess, tmp_path: Path):
    """The issue's reproduction: 6 callers, then 3, then 1, then none."""
    replicas = {"min": 0, "max": 3, "scale_down_delay": "1s", "idle_timeout": "1s"}
    deploy(gateway, tmp_path, "auto", SLOW, concurrency=2, replicas=replicas, timeout="10s")
    with load(gateway, "auto") as running:
        running.set(6)
        wait_members(gateway, "auto", 3)
        time.sleep(2)
        running.set(3)
        wait_members(gateway, "auto", 2)
        time.sleep(2)
        running.set(1)
        wait_members(gateway, "auto", 1)
        time.sleep(1.5)
    gateway.wait_status("auto", "Scaled to zero", timeout=30)
    assert running.failed == 0, (running.codes, running.errors[:3])
    assert running.codes[200] > 20


def test_stuck_call_delays_a_retire_by_at_most_the_timeout(gateway: GatewayProcess, tmp_path: Path):
    deploy(gateway, tmp_path, "stuck", SLOW, replicas={"min": 2, "max": 2}, timeout="3s")
    codes: list[int] = []

    def stuck() -> None:
        with gateway.http() as http:
            codes.append(http.post("/function/stuck", content=b"stuck").status_code)

    threads = [threading.Thread(target=stuck) for _ in range(2)]
    for thread in threads:
        thread.start()
    busy(gateway, "stuck", 2)
    gateway.dcf("function", "scale", "stuck", "--min", "1", "--max", "1", check=True)
    # At most the timeout (3 s) after the scale, with a margin for a busy machine.
    assert wait_members(gateway, "stuck", 1, timeout=30) < 3 + 6
    for thread in threads:
        thread.join(30)
    assert codes == [504, 504]
    log = gateway.dcf("function", "log", "stuck", check=True).stdout.decode()
    assert "stopped with 1 call still in it" in log, log


GARBAGE_STATUS = """
import os
os.write(int(os.environ["DCF_STATUS_FD"]), b"this is not JSON\\n")
def Handler(req):
    return req.input
"""


def replica_pids(name: str) -> list[int]:
    """Processes whose environment names them a replica of ``name``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"DCF_FUNCTION={name}".encode() in environ:
                found.append(int(entry))
    return found


def test_unexpected_start_error_fails_the_deploy_fast(gateway: GatewayProcess, tmp_path: Path):
    config = write_function(tmp_path, "garbage", GARBAGE_STATUS)
    start = time.monotonic()
    result = gateway.dcf("function", "create", "-f", str(config), "garbage", timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - start < 30
    info = gateway.wait_status("garbage", "Failed", timeout=10)
    assert "JSONDecodeError" in (info["failure"] or ""), info
    log = gateway.dcf("function", "log", "garbage", check=True).stdout.decode()
    assert "JSONDecodeError" in log, log
    time.sleep(0.5)
    assert replica_pids("garbage") == []
    assert not (gateway.home / "functions" / "garbage").exists()


def test_oserror_during_deploy_leaves_nothing_half_done(gateway: GatewayProcess, tmp_path: Path):
    """requirements.txt that is a directory: reading it raises IsADirectoryError."""
    config = write_function(tmp_path, "oserr", SLOW)
    (tmp_path / "oserr" / "requirements.txt").unlink()
    (tmp_path / "oserr" / "requirements.txt").mkdir()
    (tmp_path / "oserr" / "requirements.txt" / "keep").write_text("")
    result = gateway.dcf("function", "create", "-f", str(config), "oserr", timeout=120)
    assert result.returncode != 0
    info = gateway.wait_status("oserr", "Failed", timeout=10)
    assert info["failure"] and "requirements.txt" in info["failure"], info
    assert replica_pids("oserr") == []
    assert not (gateway.home / "functions" / "oserr").exists()


ASYNC_MARK = """
import asyncio, os
async def Handler(req):
    await asyncio.sleep(1.0)
    with open(os.environ["MARK"], "w") as f:
        f.write("ran")
    return b"done"
"""


def test_replica_stops_the_calls_of_a_dropped_connection(tmp_path: Path) -> None:
    """A real replica process: once the gateway's connection is gone, its calls end."""
    (tmp_path / "handler.py").write_text(ASYNC_MARK)
    address = str(tmp_path / "replica.sock")
    mark = tmp_path / "mark"
    env = {
        **os.environ,
        "HANDLER_DIR": str(tmp_path),
        "DCF_LISTEN": address,
        "MARK": str(mark),
    }
    proc = subprocess.Popen([sys.executable, "-m", "dcf.runtime"], env=env)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(address):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(address)
            sock.sendall(b"".join(wire.request_frame(1, "POST", "/", "", [], b"x")))
            time.sleep(0.3)  # the call is running when the connection goes
        time.sleep(2.0)
        assert not mark.exists(), "the handler ran on after its connection was dropped"
    finally:
        proc.kill()
        proc.wait()
