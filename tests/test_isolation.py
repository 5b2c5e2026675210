"""Attacks from inside a function on the others and on the host, through a real gateway.

Each test is what a hostile tenant would do from a handler; it passes when
the attack fails.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ECHO, REPO, GatewayProcess, deploy

FORGE = """
import socket, struct

def Handler(req):
    # One wire frame with forged headers, straight to another replica's socket.
    meta = "POST\\n/\\n\\nx-dcf-key:forged".encode()
    body = b"hi"
    frame = struct.pack("!III", 7, len(meta), len(body)) + meta + body
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(3)
        s.connect(req.input.decode())
        s.sendall(frame)
        got = s.recv(4096)
    except OSError as exc:
        return {"answer": None, "error": type(exc).__name__}
    return {"answer": got.hex() or None, "error": None}
"""


def _info(gw: GatewayProcess, name: str) -> dict:
    with gw.http() as http:
        return http.get(f"/system/function/{name}").json()


def _call(gw: GatewayProcess, name: str, body: bytes = b"") -> tuple[int, dict]:
    with gw.http() as http:
        r = http.post(f"/function/{name}", content=body, timeout=60)
    try:
        return r.status_code, r.json()
    except json.JSONDecodeError:
        return r.status_code, {"text": r.text}


@pytest.fixture(scope="module")
def process_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(tmp_path_factory.mktemp("iso-process") / "home").start()
    yield gateway
    gateway.stop()


def test_another_replicas_socket_answers_no_forged_frame(
    process_gw: GatewayProcess, tmp_path: Path
) -> None:
    deploy(process_gw, tmp_path, "victim", ECHO)
    deploy(process_gw, tmp_path, "forger", FORGE)
    victim = _info(process_gw, "victim")["replicas"]["list"][0]["address"]
    status, out = _call(process_gw, "forger", victim.encode())
    assert status == 200, out
    assert out["answer"] is None, f"the victim's replica answered a forged frame: {out}"
    assert Path(victim).stat().st_mode & 0o777 == 0o600
    assert Path(victim).parent.stat().st_mode & 0o777 == 0o700
    # The gateway itself still gets through.
    assert _call(process_gw, "victim", b'"ok"') == (200, "ok")


SNOOP = """
import os, glob

def Handler(req):
    out = {}
    for name in req.input.decode().split(","):
        try:
            with open(name, "rb") as f:
                out[name] = f.read(200).decode(errors="replace")
        except OSError as exc:
            out[name] = "ERR " + type(exc).__name__
    out["_tmp"] = sorted(os.listdir("/tmp"))
    with open("/tmp/mine.txt", "w") as f:
        f.write("private")
    out["_pid"] = os.getpid()
    out["_own"] = os.path.exists(os.path.join(os.getcwd(), "handler.py"))
    return out
"""


@pytest.fixture(scope="module")
def sandbox_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    home = tmp_path_factory.mktemp("iso-sandbox") / "home"
    gateway = GatewayProcess(home, extra=["--isolation", "sandbox"]).start()
    yield gateway
    gateway.stop()


def test_a_sandboxed_handler_sees_only_its_own_files(
    sandbox_gw: GatewayProcess, tmp_path: Path
) -> None:
    deploy(sandbox_gw, tmp_path, "secretive", ECHO)
    deploy(sandbox_gw, tmp_path, "snoop", SNOOP)
    other = _info(sandbox_gw, "secretive")
    home = sandbox_gw.home
    victims = [
        *home.glob("functions/secretive/*/handler.py"),
        home / "dcf.db",
        *home.rglob("jobs.db"),
        Path(f"/proc/{sandbox_gw.proc.pid}/environ"),
        Path(other["replicas"]["list"][0]["address"]),
        Path("/etc/shadow"),
    ]
    assert len(victims) >= 5, victims
    marker = Path("/tmp") / f"dcf-host-marker-{os.getpid()}"
    marker.write_text("host")
    Path("/tmp/mine.txt").unlink(missing_ok=True)
    try:
        status, out = _call(sandbox_gw, "snoop", ",".join(map(str, victims)).encode())
    finally:
        marker.unlink()
    assert status == 200, out
    leaked = {k: v for k, v in out.items() if not k.startswith("_") and not v.startswith("ERR")}
    assert all(v == "" for v in leaked.values()), f"read from the sandbox: {leaked}"
    assert out["_own"] is True
    # A private /tmp: none of the host's files, only the dirs its own mounts sit in (the
    # code, the socket, Python and dcf, when any of them lives under the host's /tmp).
    assert marker.name not in out["_tmp"], out["_tmp"]
    socket_dir = Path(_info(sandbox_gw, "snoop")["replicas"]["list"][0]["address"]).parent
    bound = [home, socket_dir, Path(sys.prefix), Path(sys.base_prefix), REPO]
    mount_dirs = {p.parts[2] for p in bound if p.parts[:2] == ("/", "tmp") and len(p.parts) > 2}
    assert set(out["_tmp"]) <= mount_dirs, out["_tmp"]
    assert not Path("/tmp/mine.txt").exists()
    with sandbox_gw.http() as http:
        assert http.get("/system/info").json()["isolation"] == "sandbox"
    info = _info(sandbox_gw, "snoop")["replicas"]["list"][0]
    assert info["isolation"] == "sandbox", info
    assert info["limits"]["pids"] == "512", info


HOG = """
import mmap, os, signal

GIB = 1 << 30

def eat(how):
    if how == "mmap":  # shared memory: not counted by RLIMIT_DATA
        m = mmap.mmap(-1, GIB, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        for i in range(0, GIB, 4096):
            m[i] = 1
    else:
        b = b"x" * GIB
        del b

def Handler(req):
    how = req.input.decode()
    if how == "ok":
        return "fine"
    if how.startswith("fork-"):
        pid = os.fork()
        if pid == 0:
            try:
                eat(how[5:])
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        return {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}
    eat(how)
    return "ate a GiB"
"""


def test_memory_limit_holds_for_the_whole_replica(
    sandbox_gw: GatewayProcess, tmp_path: Path
) -> None:
    deploy(sandbox_gw, tmp_path, "hog", HOG, limits={"memory": "256Mi"})
    for how in ("heap", "mmap"):
        status, out = _call(sandbox_gw, "hog", how.encode())
        assert status == 502, (how, status, out)
        assert "memory limit" in json.dumps(out), out
        sandbox_gw.wait_status("hog", "Ready")
        assert _call(sandbox_gw, "hog", b"ok") == (200, {"text": "fine"})
    info = _info(sandbox_gw, "hog")
    assert "OOM-killed (limit 256Mi)" in json.dumps(info), info
    # A forked child is in the same group: the kernel kills it, not the host.
    status, out = _call(sandbox_gw, "hog", b"fork-mmap")
    assert (status, out) == (200, {"signal": 9}), out
    with sandbox_gw.http() as http:
        assert http.get("/healthz").status_code == 200


SPIN = """
import os, resource, time

def Handler(req):
    what = req.input.decode()
    if what == "spin":
        t0, c0 = time.monotonic(), time.process_time()
        while time.monotonic() - t0 < 2.0:
            pass
        return {"cpu_per_s": (time.process_time() - c0) / (time.monotonic() - t0)}
    if what == "forkbomb":
        pids, error = [], None
        try:
            for _ in range(2000):
                pid = os.fork()
                if pid == 0:
                    time.sleep(5)
                    os._exit(0)
                pids.append(pid)
        except OSError as exc:
            error = type(exc).__name__
        for pid in pids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        return {"forked": len(pids), "error": error}
    if what == "fill":
        written = 0
        try:
            with open("/tmp/fill", "wb") as f:
                chunk = b"x" * (1 << 20)
                for _ in range(1024):
                    f.write(chunk)
                    f.flush()
                    written += len(chunk)
        except OSError as exc:
            os.unlink("/tmp/fill")
            return {"written": written, "error": exc.errno}
        os.unlink("/tmp/fill")
        return {"written": written, "error": None}
    return "?"
"""


def test_cpu_pids_and_tmp_limits(sandbox_gw: GatewayProcess, tmp_path: Path) -> None:
    deploy(
        sandbox_gw,
        tmp_path,
        "spinner",
        SPIN,
        limits={"cpu": "0.5", "pids": 64, "ephemeral-storage": "64Mi"},
    )
    status, out = _call(sandbox_gw, "spinner", b"spin")
    assert status == 200, out
    assert out["cpu_per_s"] <= 0.6, out
    status, out = _call(sandbox_gw, "spinner", b"forkbomb")
    assert status == 200, out
    assert out["error"] is not None and out["forked"] < 64, out
    status, out = _call(sandbox_gw, "spinner", b"fill")
    assert status == 200, out
    assert out["error"] == 28 and out["written"] <= 64 << 20, out  # ENOSPC
    limits = _info(sandbox_gw, "spinner")["replicas"]["list"][0]["limits"]
    assert limits == {"cpu": "0.5", "pids": "64", "tmp": "64Mi", "network": "host"}, limits
    shown = sandbox_gw.dcf("function", "info", "spinner", check=True).stdout.decode()
    assert "sandbox: pids 64, tmp 64Mi, network host, cpu 0.5" in shown, shown


NET = """
import socket

def Handler(req):
    # The gateway's own port on loopback: reachable on the host network only.
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", int(req.input)))
    except OSError as exc:
        return {"connected": False, "error": type(exc).__name__}
    return {"connected": True, "error": None}
"""


def test_network_none_reaches_nothing_but_its_wire(
    sandbox_gw: GatewayProcess, tmp_path: Path
) -> None:
    deploy(sandbox_gw, tmp_path, "online", NET)
    deploy(sandbox_gw, tmp_path, "offline", NET, network="none")
    port = str(sandbox_gw.port).encode()
    assert _call(sandbox_gw, "online", port) == (200, {"connected": True, "error": None})
    status, out = _call(sandbox_gw, "offline", port)
    assert status == 200 and out["connected"] is False, out


def test_a_stopped_replica_leaves_no_cgroup(sandbox_gw: GatewayProcess, tmp_path: Path) -> None:
    deploy(sandbox_gw, tmp_path, "brief", ECHO)
    replica = _info(sandbox_gw, "brief")["replicas"]["list"][0]["id"]
    groups = [Path(f"/sys/fs/cgroup/{c}/dcf/{replica}") for c in ("memory", "cpu", "pids")]
    groups += [Path(f"/sys/fs/cgroup/dcf/{replica}")]
    assert any(g.is_dir() for g in groups), groups
    sandbox_gw.dcf("function", "delete", "brief", check=True)
    deadline = time.monotonic() + 10
    while any(g.exists() for g in groups) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(g.exists() for g in groups), groups


@pytest.mark.parametrize(
    "settings, word",
    [
        ({"network": "wifi"}, "network"),
        ({"limits": {"pids": 2}}, "pids"),
        ({"limits": {"ephemeral-storage": "lots"}}, "ephemeral"),
    ],
)
def test_bad_sandbox_settings_are_one_clear_line(
    process_gw: GatewayProcess, tmp_path: Path, settings: dict, word: str
) -> None:
    from tests.conftest import write_function

    config = write_function(tmp_path, "badbox", ECHO, **settings)
    r = process_gw.dcf("function", "create", "-f", str(config), "badbox")
    err = (r.stdout + r.stderr).decode()
    assert r.returncode != 0 and word in err and "Traceback" not in err, err
