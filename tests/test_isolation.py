"""Attacks from inside a function on the others and on the host, through a real gateway.

Each test is what a hostile tenant would do from a handler; it passes when
the attack fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
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
    home = tmp_path_factory.mktemp("iso-process") / "home"
    gateway = GatewayProcess(home, extra=["--isolation", "process"]).start()
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
    out["_home"] = os.environ["HOME"]
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
    with sandbox_gw.http() as http:  # another caller's job, and its result on disk
        job = http.post("/async-function/secretive", content=b"the-other-callers-result")
        assert job.status_code == 202, job.text
        deadline = time.monotonic() + 30
        while not list(home.glob("jobs/*.out")):
            assert time.monotonic() < deadline, "the job never finished"
            time.sleep(0.05)
    victims = [
        *home.glob("functions/secretive/*/handler.py"),
        home / "dcf.db",
        *home.rglob("jobs.db"),
        home / "jobs.key",
        *home.glob("jobs/*.out"),
        Path(f"/proc/{sandbox_gw.proc.pid}/environ"),
        Path(other["replicas"]["list"][0]["address"]),
        Path("/etc/shadow"),
    ]
    assert len(victims) >= 8 and all(p.exists() for p in victims), victims
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
    assert out["_home"] == "/tmp"  # the gateway user's home is not there: a writable one is
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


class Bystander:
    """Calls another function and /healthz in a loop while an attack runs: every answer
    must be a 200, and the gateway's RSS must not grow by what the attack allocates."""

    def __init__(self, gw: GatewayProcess, function: str) -> None:
        self.gw, self.function = gw, function
        self.answers: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.gw.http() as http:
            while not self._stop.is_set():
                try:
                    self.answers.append(http.post(f"/function/{self.function}").status_code)
                    self.answers.append(http.get("/healthz").status_code)
                except httpx.HTTPError:
                    self.answers.append(0)
                time.sleep(0.05)

    def rss(self) -> int:
        status = Path(f"/proc/{self.gw.proc.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) << 10

    def __enter__(self) -> Bystander:
        self.rss_before = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.rss_after = self.rss()

    def check(self) -> None:
        assert len(self.answers) >= 4 and set(self.answers) == {200}, self.answers
        assert self.rss_after - self.rss_before < 64 << 20, (self.rss_before, self.rss_after)


def test_memory_limit_holds_for_the_whole_replica(
    sandbox_gw: GatewayProcess, tmp_path: Path
) -> None:
    deploy(sandbox_gw, tmp_path, "hog", HOG, limits={"memory": "256Mi"})
    deploy(sandbox_gw, tmp_path, "hogbystander", ECHO)
    with Bystander(sandbox_gw, "hogbystander") as bystander:
        _eat_a_gib_three_ways(sandbox_gw)
    bystander.check()


def _eat_a_gib_three_ways(sandbox_gw: GatewayProcess) -> None:
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
    deploy(sandbox_gw, tmp_path, "spinbystander", ECHO)
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
    with Bystander(sandbox_gw, "spinbystander") as bystander:  # the host stays responsive
        status, out = _call(sandbox_gw, "spinner", b"forkbomb")
    bystander.check()
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


class _GatewayWith(GatewayProcess):
    """A gateway started with some of DCF's own variables set (GatewayProcess drops them)."""

    def __init__(self, home: Path, variables: dict[str, str]) -> None:
        super().__init__(home)
        self.variables = variables

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.variables}


def test_sandbox_is_the_default_and_says_what_enforces_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DCF_TEST_ISOLATION", raising=False)  # the gateway's own default
    gw = _GatewayWith(tmp_path / "home", {"DCF_CGROUPS": "off"}).start()
    try:
        with gw.http() as http:
            assert http.get("/system/info").json()["isolation"] == "sandbox"
        deploy(gw, tmp_path, "capped", ECHO, limits={"memory": "256Mi"})
        replica = _info(gw, "capped")["replicas"]["list"][0]
        assert replica["isolation"] == "sandbox" and replica["limits_by"] == "rlimits", replica
        shown = gw.dcf("function", "info", "capped", check=True).stdout.decode()
        assert "memory 256Mi (by rlimits)" in shown, shown
    finally:
        gw.stop()
    said = [line for line in gw.log_path.read_text().splitlines() if "cgroups" in line]
    assert len(said) == 1 and "rlimits instead" in said[0] and "no CPU quota" in said[0], said


def test_a_host_that_cannot_sandbox_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCF_")}
    env.update(DCF_HOME=str(tmp_path / "home"), DCF_BWRAP=str(tmp_path / "no-bwrap"))
    r = subprocess.run(
        [sys.executable, "-m", "dcf.cli.main", "gateway", "start", "--port", "1"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    err = r.stderr.decode().strip()
    assert r.returncode != 0 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert "no bwrap" in err and "--isolation process" in err, err


PROBE = f".dcf-isolation-probe-{os.getpid()}"
"""The (empty) file a hostile function tries to plant; any that got written are removed."""

BUILD_SNOOP = """
import json, os, sys

PROBE = "__PROBE__"

out = {}
for path in sys.argv[1].split(","):
    try:
        with open(path, "rb") as f:
            out["read " + path] = f.read(100).decode(errors="replace")
    except OSError as exc:
        out["read " + path] = "ERR " + type(exc).__name__
# Its environment is finished, and shared by every function with these requirements.
for directory in (os.environ["VIRTUAL_ENV"], *sys.argv[2].split(",")):
    try:
        with open(os.path.join(directory, PROBE), "w") as f:
            f.write("")
        out["write " + directory] = "wrote"
    except OSError as exc:
        out["write " + directory] = "ERR " + type(exc).__name__
with open("snooped.json", "w") as f:  # its own upload copy: writable
    json.dump(out, f)
""".replace("__PROBE__", PROBE)

READ_SNOOPED = """
from pathlib import Path

def Handler(req):
    return (Path(__file__).parent / "snooped.json").read_text()
"""


def _secrets_of(gw: GatewayProcess, victim: str) -> list[Path]:
    """What a tenant must never read: another's code, the gateway's databases and keys."""
    home = gw.home
    found = [
        *home.glob(f"functions/{victim}/*/handler.py"),
        home / "dcf.db",
        home / "jobs.db",
        home / "jobs.key",
        Path(f"/proc/{gw.proc.pid}/environ"),
    ]
    assert all(p.exists() for p in found) and len(found) == 5, found
    return found


@pytest.fixture
def planted() -> Iterator[list[str]]:
    """Directories a test lets a function try to write into: any probe written is removed."""
    directories: list[str] = []
    yield directories
    for directory in directories:
        Path(directory, PROBE).unlink(missing_ok=True)


def _failed(out: dict) -> dict:
    """The attempts that got through (every one should have failed)."""
    return {k: v for k, v in out.items() if not (v.startswith("ERR") or v == "")}


def test_a_build_step_sees_only_its_own_copy(
    sandbox_gw: GatewayProcess, tmp_path: Path, planted: list[str]
) -> None:
    deploy(sandbox_gw, tmp_path, "buildvictim", ECHO)
    targets = ",".join(map(str, _secrets_of(sandbox_gw, "buildvictim")))
    shared = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()][:1]
    others = [str(sandbox_gw.home / "functions" / "buildvictim"), *shared]
    planted += [*others, *map(str, (sandbox_gw.home / "envs").glob("*"))]
    (tmp_path / "buildsnoop").mkdir()
    (tmp_path / "buildsnoop" / "snoop.py").write_text(BUILD_SNOOP)
    deploy(
        sandbox_gw,
        tmp_path,
        "buildsnoop",
        READ_SNOOPED,
        requirements="pyyaml\n",  # an environment of its own, already satisfied
        build=[f"python snoop.py {targets} {','.join(others)}"],
    )
    status, out = _call(sandbox_gw, "buildsnoop")
    assert status == 200, out
    assert len(out) == 5 + 1 + len(others), out
    assert _failed(out) == {}, f"a build step got through: {_failed(out)}"
    planted += map(str, (sandbox_gw.home / "envs").glob("*"))
    assert not list(sandbox_gw.home.rglob(PROBE))


ENV_WRITER = """
import os, sys

PROBE = "__PROBE__"

def Handler(req):
    out = {}
    for directory in [sys.prefix, os.path.dirname(__file__), *req.input.decode().split(",")]:
        try:
            with open(os.path.join(directory, PROBE), "w") as f:
                f.write("")
            out[directory] = "wrote"
        except OSError as exc:
            out[directory] = "ERR " + type(exc).__name__
    return out
""".replace("__PROBE__", PROBE)


def test_a_handler_cannot_write_into_any_environment(
    sandbox_gw: GatewayProcess, tmp_path: Path, planted: list[str]
) -> None:
    deploy(sandbox_gw, tmp_path, "envowner", ECHO, requirements="click>=7\n")
    deploy(sandbox_gw, tmp_path, "envwriter", ENV_WRITER, requirements="pyyaml\n")
    envs = [str(p) for p in (sandbox_gw.home / "envs").iterdir() if p.is_dir()]
    shared = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()][:1]
    planted += [*envs, *shared, *map(str, (sandbox_gw.home / "functions").glob("envwriter/*"))]
    status, out = _call(sandbox_gw, "envwriter", ",".join(envs + shared).encode())
    assert status == 200, out
    assert len(out) >= 4 and str(sandbox_gw.home / "envs") in json.dumps(out), out
    assert _failed(out) == {}, f"a handler wrote into an environment: {_failed(out)}"
    assert not list(sandbox_gw.home.rglob(PROBE))
    assert _call(sandbox_gw, "envowner", b'"ok"') == (200, "ok")


TMP_WRITER = """
def Handler(req):
    with open("/tmp/" + req.input.decode(), "wb") as f:
        f.write(b"x" * (1 << 20))
    return "written"
"""


def _holding(name: str) -> list[int]:
    """Host pids whose root (their mount namespace) has ``/tmp/name``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "root" / "tmp" / name).exists():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_replicas_tmp_is_gone_when_it_stops(sandbox_gw: GatewayProcess, tmp_path: Path) -> None:
    deploy(sandbox_gw, tmp_path, "tmpwriter", TMP_WRITER)
    name = f"dcf-private-{os.getpid()}"
    assert _call(sandbox_gw, "tmpwriter", name.encode()) == (200, {"text": "written"})
    assert _holding(name), "the file is in the replica's own /tmp while it runs"
    assert not (Path("/tmp") / name).exists()  # and not in the host's
    sandbox_gw.dcf("function", "delete", "tmpwriter", check=True)
    deadline = time.monotonic() + 10
    while _holding(name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _holding(name) and not (Path("/tmp") / name).exists()
