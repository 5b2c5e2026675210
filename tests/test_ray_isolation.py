"""The sandbox on the ray backend: each replica's runtime runs inside bwrap on its node.

The same attacks as tests/test_isolation.py, from a handler placed by Ray on the
session's test cluster (every node on 127.0.0.2): another function's code, the
gateway's files and the host's /tmp stay out of reach, and the limits hold for
the whole replica.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcf import wire
from dcf.sandbox import probe
from tests.conftest import ECHO, REPO, GatewayProcess, deploy
from tests.test_isolation import HOG, NET, SNOOP, SPIN

pytest.importorskip("ray", reason="the ray backend's tests need pip install -e '.[ray]'")


@pytest.fixture(scope="module")
def sgw(cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:  # noqa: ANN001
    home = tmp_path_factory.mktemp("ray-sandbox") / "home"
    extra = ["--backend", "ray", "--ray-address", cluster.address, "--isolation", "sandbox"]
    gateway = GatewayProcess(home, extra=extra).start()
    yield gateway
    gateway.stop()


def _info(gw: GatewayProcess, name: str) -> dict:
    with gw.http() as http:
        return http.get(f"/system/function/{name}").json()


def _replica(gw: GatewayProcess, name: str) -> dict:
    return _info(gw, name)["replicas"]["list"][0]


def _call(gw: GatewayProcess, name: str, body: bytes = b"") -> tuple[int, dict]:
    with gw.http() as http:
        r = http.post(f"/function/{name}", content=body, timeout=60)
    try:
        return r.status_code, r.json()
    except json.JSONDecodeError:
        return r.status_code, {"text": r.text}


def _listener(address: str) -> list[str]:
    """The command line of the process that listens on a replica's tcp address."""
    port = address.rsplit(":", 1)[1]
    out = subprocess.run(
        ["ss", "-Htlnp", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    pid = re.search(r"pid=(\d+)", out)
    assert pid, f"nobody listens on {address}: {out!r}"
    return Path(f"/proc/{pid.group(1)}/cmdline").read_bytes().decode().split("\0")


def test_a_sandboxed_ray_replica_sees_only_its_own_files(
    sgw: GatewayProcess, tmp_path: Path
) -> None:
    deploy(sgw, tmp_path, "rsecret", ECHO, requests={"cpu": "0.25"})
    deploy(sgw, tmp_path, "rsnoop", SNOOP, requests={"cpu": "0.25"})
    other = _replica(sgw, "rsecret")
    home = sgw.home
    uid = os.getuid()
    # What the node holds of the other function: the code Ray unpacked for it there.
    unpacked = list(Path(f"/tmp/dcf-ray-{uid}/code").glob("rsecret-v1-*/handler.py"))
    victims = [
        *unpacked,
        *home.glob("functions/rsecret/*/handler.py"),
        home / "dcf.db",
        Path(f"/proc/{sgw.proc.pid}/environ"),
        Path(f"/proc/{other['pid']}/environ"),
        Path("/etc/shadow"),
    ]
    assert unpacked and len(victims) >= 6, victims
    marker = Path("/tmp") / f"dcf-host-marker-{os.getpid()}"
    marker.write_text("host")
    Path("/tmp/mine.txt").unlink(missing_ok=True)
    try:
        status, out = _call(sgw, "rsnoop", ",".join(map(str, victims)).encode())
    finally:
        marker.unlink()
    assert status == 200, out
    leaked = {k: v for k, v in out.items() if not k.startswith("_") and not v.startswith("ERR")}
    assert all(v == "" for v in leaked.values()), f"read from the sandbox: {leaked}"
    assert out["_own"] is True
    assert out["_pid"] < 10, out  # its own /proc: a fresh PID namespace
    # A private /tmp: nothing of the host's but the dirs its own read-only mounts sit in
    # (its code, and Python and dcf where the node keeps them under /tmp).
    assert marker.name not in out["_tmp"], out["_tmp"]
    bound = [Path(sys.prefix), Path(sys.base_prefix), REPO]
    mount_dirs = {p.parts[2] for p in bound if p.parts[:2] == ("/", "tmp") and len(p.parts) > 2}
    assert set(out["_tmp"]) <= {f"dcf-ray-{uid}", "ray", *mount_dirs}, out["_tmp"]
    assert not Path("/tmp/mine.txt").exists()
    mine = _replica(sgw, "rsnoop")
    assert mine["isolation"] == "sandbox", mine
    expected = "cgroup" if probe.cgroup_version() is not None else "rlimit"
    assert mine["limits"]["enforced_by"] == expected, mine
    shown = sgw.dcf("function", "info", "rsnoop", check=True).stdout.decode()
    assert f"enforced_by {expected}" in shown, shown
    for name in ("rsecret", "rsnoop"):
        sgw.dcf("function", "delete", name, check=True)


def test_the_memory_limit_holds_for_the_whole_ray_replica(
    sgw: GatewayProcess, tmp_path: Path
) -> None:
    deploy(sgw, tmp_path, "rcalm", ECHO, requests={"cpu": "0.25"})
    deploy(sgw, tmp_path, "rhog", HOG, requests={"cpu": "0.25"}, limits={"memory": "256Mi"})
    status, out = _call(sgw, "rhog", b"heap")
    assert status == 502, (status, out)
    assert "OOM-killed (limit 256Mi)" in json.dumps(out), out
    assert "memory limit" in json.dumps(out), out
    assert _call(sgw, "rcalm", b'"still here"') == (200, "still here")
    with sgw.http() as http:
        assert http.get("/healthz").status_code == 200
    sgw.wait_status("rhog", "Ready")
    assert _call(sgw, "rhog", b"ok") == (200, {"text": "fine"})
    assert "OOM-killed (limit 256Mi)" in json.dumps(_info(sgw, "rhog")), _info(sgw, "rhog")
    # A forked child is in the same group: the kernel kills it, not the node.
    status, out = _call(sgw, "rhog", b"fork-mmap")
    assert (status, out) == (200, {"signal": 9}), out
    for name in ("rcalm", "rhog"):
        sgw.dcf("function", "delete", name, check=True)


def test_cpu_pids_and_tmp_limits_on_ray(sgw: GatewayProcess, tmp_path: Path) -> None:
    deploy(
        sgw,
        tmp_path,
        "rspin",
        SPIN,
        limits={"cpu": "0.5", "pids": 64, "ephemeral-storage": "64Mi"},
    )
    status, out = _call(sgw, "rspin", b"spin")
    assert status == 200, out
    assert out["cpu_per_s"] <= 0.6, out
    status, out = _call(sgw, "rspin", b"forkbomb")
    assert status == 200, out
    assert out["error"] is not None and out["forked"] < 64, out
    status, out = _call(sgw, "rspin", b"fill")
    assert status == 200, out
    assert out["error"] == 28 and out["written"] <= 64 << 20, out  # ENOSPC
    limits = _replica(sgw, "rspin")["limits"]
    assert limits["cpu"] == "0.5" and limits["pids"] == "64" and limits["tmp"] == "64Mi", limits
    sgw.dcf("function", "delete", "rspin", check=True)


def test_network_modes_on_ray_and_the_wire_needs_the_secret(
    sgw: GatewayProcess, tmp_path: Path
) -> None:
    deploy(sgw, tmp_path, "ronline", NET, requests={"cpu": "0.25"})
    deploy(sgw, tmp_path, "roffline", NET, requests={"cpu": "0.25"}, network="none")
    port = str(sgw.port).encode()
    assert _call(sgw, "ronline", port) == (200, {"connected": True, "error": None})
    status, out = _call(sgw, "roffline", port)
    assert status == 200 and out["connected"] is False, out
    online, offline = _replica(sgw, "ronline"), _replica(sgw, "roffline")
    # The host network: the gateway talks to the sandboxed runtime itself, no hop between.
    assert _listener(online["address"])[1:3] == ["-m", "dcf.runtime"], online
    assert offline["limits"]["network"] == "none", offline
    # Either way, a connection without the gateway's secret gets nothing.
    call = b"".join(wire.request_frame(1, "POST", "", "", [], b"leak?"))
    for replica in (online, offline):
        host, wport = replica["address"].removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(wport)), timeout=5) as sock:
            try:
                sock.sendall(call)
                answer = sock.recv(1024)
            except ConnectionResetError:
                answer = b""
        assert answer == b"", f"{replica['id']} answered {answer!r} without the secret"
    for name in ("ronline", "roffline"):
        sgw.dcf("function", "delete", name, check=True)
