"""Issue 9's hostile tests: each one an attack through real HTTP or the real CLI against a
real gateway, asserting the clear error, that the gateway stays responsive, and that
nothing deployed is lost."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ECHO, GatewayProcess, alive, deploy, processes_with, write_function

# helpers ----------------------------------------------------------------------


class HealthProbe:
    """Polls /healthz in the background; ``worst`` is its slowest answer (seconds)."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.worst = 0.0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.gw.url, timeout=30) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    ok = http.get("/healthz").status_code == 200
                except httpx.TransportError:
                    ok = False
                self.worst = max(self.worst, time.monotonic() - started)
                self.failures += not ok
                self._stop.wait(0.05)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def info_of(gw: GatewayProcess, name: str) -> dict:
    with gw.http() as http:
        return http.get(f"/system/function/{name}").json()


def host_pid(ancestor: int, pid: int) -> int:
    """The host pid of the process below ``ancestor`` that calls itself ``pid``.

    A sandboxed replica has a PID namespace of its own: what its handler reports of
    ``os.getpid()`` is the last entry of that process's ``NSpid``, not its host pid.
    """
    todo = [ancestor]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            todo += [int(c) for c in task.read_text().split()]
        status = Path(f"/proc/{current}/status").read_text()
        nspid = status.split("NSpid:")[1].split("\n")[0].split()
        if int(nspid[-1]) == pid and current != ancestor:
            return current
    raise AssertionError(f"no process below {ancestor} is pid {pid} in its namespace")


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def wait_for(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def upload(gw: GatewayProcess, name: str, archive: bytes, timeout: float = 60,
           **function: object) -> httpx.Response:
    payload = {"function": {"name": name, **function},
               "code": base64.b64encode(archive).decode()}
    with gw.http() as http:
        return http.post("/system/functions", json=payload, timeout=timeout)


def tar_header(name: str, size: int, kind: bytes = b"0") -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def zeros_bomb(size: int) -> bytes:
    """A tar.gz of one file of ``size`` zero bytes, built without ever holding them.

    gzip members concatenate, so one compressed MiB of zeros repeated is a valid stream:
    about 1 KB per MiB, as a real bomb is."""
    mib = gzip.compress(bytes(1 << 20), compresslevel=9)
    assert size % (1 << 20) == 0
    return (gzip.compress(tar_header("handler.py", size)) + mib * (size >> 20)
            + gzip.compress(bytes(1024)))


def members_bomb(count: int) -> bytes:
    """A tar.gz of ``count`` empty members: 512 bytes of header each, unpacked."""
    block = gzip.compress(tar_header("handler.py", 0) * 1000, compresslevel=9)
    assert count % 1000 == 0
    return block * (count // 1000) + gzip.compress(bytes(1024))


# 2: a forked child outlives its handler ----------------------------------------------

FORKER = """
import os, time
def Handler(req):
    if req.input == b"fork":
        pid = os.fork()
        if pid == 0:
            time.sleep(300)
            os._exit(0)
        return str(pid)
    return "ok"
"""


def test_forked_child_neither_wedges_its_replica_nor_delete(gw: GatewayProcess, tmp_path: Path):
    deploy(gw, tmp_path, "forker", FORKER, timeout="5s")
    with gw.http() as http:
        reported = int(http.post("/function/forker", content=b"fork").text)
        replica = info_of(gw, "forker")["replicas"]["list"][0]["pid"]
        child = host_pid(replica, reported)
        os.kill(replica, signal.SIGKILL)
        # The replica's death is seen by its exit, not by its pipes (the child holds them):
        # it is restarted, its group (the child) dies with it, and calls are served.
        started = time.monotonic()
        wait_for(lambda: info_of(gw, "forker")["replicas"]["restarts"] == 1, 5, "a restart")
        r = http.post("/function/forker", content=b"x", timeout=10)
        assert (r.status_code, r.text) == (200, "ok")
        assert time.monotonic() - started < 5
        wait_for(lambda: not alive(child), 5, "the forked child to die with its replica")

        # DELETE with a live forked child answers at once, and leaves nothing behind.
        reported = int(http.post("/function/forker", content=b"fork").text)
        child = host_pid(info_of(gw, "forker")["replicas"]["list"][0]["pid"], reported)
        started = time.monotonic()
        r = http.delete("/system/function/forker", timeout=15)
        assert r.status_code == 200 and time.monotonic() - started < 8
        wait_for(lambda: not alive(child), 5, "the forked child to die with DELETE")
        assert http.get("/system/function/forker").status_code == 404
    # Re-creating the name works (the registry is consistent with memory).
    deploy(gw, tmp_path, "forker", FORKER, timeout="5s")
    assert httpx.post(gw.url + "/function/forker", content=b"x").text == "ok"


# 5: uploads ----------------------------------------------------------------------------


def test_upload_bombs_are_refused_fast_and_the_gateway_stays_responsive(tmp_path: Path):
    gw = GatewayProcess(tmp_path / "home", extra=[
        "--max-upload", str(4 << 20), "--max-upload-files", "1000",
        "--max-unpacked", str(100 << 20)]).start()
    try:
        deploy(gw, tmp_path, "bystander", ECHO)
        cases = {
            # the 2 GiB of zeros in a 2 MB tar.gz
            "zeros": (zeros_bomb(2 << 30), "unpacked size", "104857600 bytes"),
            # a few hundred MB of zeros against the configured 100 MB
            "zeros-300M": (zeros_bomb(300 << 20), "unpacked size", "104857600 bytes"),
            # 1M empty members
            "members": (members_bomb(1_000_000), "files", "1000"),
            # an archive over the upload cap
            "large": (os.urandom(5 << 20), "archive", str(4 << 20)),
        }
        with HealthProbe(gw) as probe:
            for label, (archive, what, limit) in cases.items():
                started = time.monotonic()
                r = upload(gw, f"bomb-{label}".lower(), archive)
                took = time.monotonic() - started
                assert r.status_code in (400, 413), (label, r.status_code, r.text)
                error = r.json()["error"]
                assert what in error and limit in error, (label, error)
                assert took < 5, (label, took)
                assert httpx.post(gw.url + "/function/bystander", content=b"hi").text == "hi"
        assert probe.worst < 1, probe.worst
        assert probe.failures == 0
        listed = {f["name"] for f in gw.http().get("/system/functions").json()}
        assert listed == {"bystander"}
        code_dirs = {p.name for p in (gw.home / "functions").iterdir()}
        assert code_dirs == {"bystander"}, code_dirs
        # A legitimate archive just under the caps deploys.
        ok = tar_gz({"handler.py": b"def Handler(req):\n    return 'fine'\n",
                     "weights.bin": bytes(50 << 20)})
        r = upload(gw, "fits", ok, runtime="python3")
        assert r.status_code == 202, r.text
        gw.wait_status("fits", "Ready")
    finally:
        gw.stop()


# 6: a hung handler -------------------------------------------------------------------

HANGER = """
import time
def Handler(req):
    if req.input == b"hang":
        time.sleep(3600)
    return "ok"
"""


def test_hung_replica_is_replaced_and_says_so(gw: GatewayProcess, tmp_path: Path):
    # One slot: after the hung call, nothing else reaches the replica; it is replaced
    # once that call stays unanswered 3 more timeouts.
    deploy(gw, tmp_path, "hang-one", HANGER, timeout="1s", concurrency=1)
    # Four slots: three calls in a row time out on it; it is replaced at once.
    deploy(gw, tmp_path, "hang-four", HANGER, timeout="1s", concurrency=4)
    with gw.http() as http:
        for name, hung, recovered_within in (("hang-one", 1, 8), ("hang-four", 3, 5)):
            pid = info_of(gw, name)["replicas"]["list"][0]["pid"]
            started = time.monotonic()
            with httpx.Client(base_url=gw.url, timeout=30) as caller:
                threads = [threading.Thread(target=caller.post, args=(f"/function/{name}",),
                                            kwargs={"content": b"hang"}) for _ in range(hung)]
                for t in threads:
                    t.start()
                time.sleep(0.3)  # the hung calls are on the replica
                while True:
                    r = http.post(f"/function/{name}", content=b"x")
                    if r.status_code == 200:
                        break
                    assert r.status_code in (502, 503, 504), r.text
                    assert time.monotonic() - started < recovered_within, name
                for t in threads:
                    t.join()
            info = info_of(gw, name)
            assert info["status"] == "Ready"
            assert info["replicas"]["restarts"] == 1
            assert info["replicas"]["list"][0]["pid"] != pid
            assert not alive(pid)
            assert "answered nothing" in info["replicas"]["last_restart"], info["replicas"]
    shown = gw.dcf("function", "info", "hang-one", check=True).stdout.decode()
    assert "answered nothing" in shown


# 7: restart backoff resets ------------------------------------------------------------


def test_restart_backoff_resets_after_a_healthy_spell(tmp_path: Path):
    gw = GatewayProcess(tmp_path / "home", extra=["--healthy-after", "1"]).start()
    try:
        deploy(gw, tmp_path, "phoenix", ECHO)
        for kill in range(3):
            pid = info_of(gw, "phoenix")["replicas"]["list"][0]["pid"]
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda n=kill: info_of(gw, "phoenix")["replicas"]["restarts"] == n + 1
                     and info_of(gw, "phoenix")["status"] == "Ready", 10, "a restart")
            time.sleep(1.3)  # healthy for longer than --healthy-after
        log = gw.dcf("function", "log", "phoenix", check=True).stdout.decode()
        delays = [line.rsplit("restarting in ", 1)[1] for line in log.splitlines()
                  if "restarting in" in line]
        assert delays == ["0.5s"] * 3, delays
        # Without a healthy spell it still backs off.
        for expected in ("0.5s", "1s"):
            pid = info_of(gw, "phoenix")["replicas"]["list"][0]["pid"]
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda p=pid: info_of(gw, "phoenix")["status"] == "Ready"
                     and info_of(gw, "phoenix")["replicas"]["list"][0]["pid"] != p, 10, "restart")
            log = gw.dcf("function", "log", "phoenix", check=True).stdout.decode()
            assert log.rstrip().rsplit("restarting in ", 1)[1].split()[0] == expected
    finally:
        gw.stop()


REFUSES_WITH_MARKER = """
import os
if os.path.exists(os.path.join(os.path.dirname(__file__), "refuse")):
    raise RuntimeError("told to refuse")

def Handler(req):
    return "ok"
"""


def test_a_restart_that_fails_while_others_serve_keeps_trying(gw: GatewayProcess, tmp_path: Path):
    """A replica that dies and cannot start again (a node lost mid-restart, a disk gone)
    while another serves is still wanted: it tries again, backing off, until it starts."""
    deploy(gw, tmp_path, "stubborn", REFUSES_WITH_MARKER, replicas={"min": 2, "max": 2})
    wait_for(lambda: info_of(gw, "stubborn")["replicas"]["ready"] == 2, 15, "two replicas")
    info = info_of(gw, "stubborn")
    (code,) = (gw.home / "functions" / "stubborn").glob("v*")
    (code / "refuse").write_text("")  # the code dir as replicas see it: the next start fails
    os.kill(info["replicas"]["list"][0]["pid"], signal.SIGKILL)
    wait_for(lambda: gw.dcf("function", "log", "stubborn").stdout.decode().count(
        "could not start (trying again in") >= 2, 15, "two failed starts")
    info = info_of(gw, "stubborn")
    assert info["status"] == "Ready" and info["replicas"]["ready"] == 1, info
    assert "told to refuse" in info["replicas"]["last_restart"], info
    assert httpx.post(gw.url + "/function/stubborn").text == "ok"
    (code / "refuse").unlink()
    wait_for(lambda: info_of(gw, "stubborn")["replicas"]["ready"] == 2, 15, "the replica back")


# 8: requirements.txt ------------------------------------------------------------------

BAD_REQUIREMENTS = {
    "-e /etc": "option",
    "-r /etc/passwd": "option",
    "-c /etc/passwd": "option",
    "--index-url http://127.0.0.1:9/simple": "option",
    "--extra-index-url=http://127.0.0.1:9/simple": "option",
    "-f /tmp": "option",
    "--find-links /tmp": "option",
    "--trusted-host evil.example": "option",
    "-i http://127.0.0.1:9/simple": "option",
    "numpy --hash=sha256:00": "not a requirement",
    "/etc": "not a requirement",
    "./mylib": "not a requirement",
    "../elsewhere": "not a requirement",
    "file:///etc/passwd": "not a requirement",
    "git+https://evil.example/x.git": "not a requirement",
    "evil @ https://evil.example/evil.whl": "direct URL",
    "evil @ file:///etc": "direct URL",
}


def test_requirements_are_plain_specifiers_only(gw: GatewayProcess, tmp_path: Path):
    for n, (line, why) in enumerate(BAD_REQUIREMENTS.items()):
        requirements = f"click>=7\n\n# a comment\n{line}\n".encode()
        archive = tar_gz({"handler.py": ECHO.encode(), "requirements.txt": requirements})
        r = upload(gw, f"reqs-{n}", archive)
        assert r.status_code == 400, (line, r.status_code, r.text)
        error = r.json()["error"]
        assert "requirements.txt line 4" in error and why in error, (line, error)
        assert "root:x:0:0" not in r.text
    # Through the CLI: one line, exit 1.
    config = write_function(tmp_path, "reqs-cli", ECHO, requirements="-r /etc/passwd\n")
    result = gw.dcf("function", "create", "-f", str(config), "reqs-cli")
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err and "root:x" not in err
    assert err.startswith("error: ") and "requirements.txt line 1" in err
    assert len(err.strip().splitlines()) == 1, err
    names = {f["name"] for f in gw.http().get("/system/functions").json()}
    assert not any(name.startswith("reqs-") for name in names), names
    # A plain specifier the gateway's environment already satisfies installs offline.
    deploy(gw, tmp_path, "reqs-ok", ECHO, requirements="click>=7 ; python_version >= '3'\n")


class SilentIndex:
    """A package index that accepts connections and never answers: pip hangs on it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/simple"

    def close(self) -> None:
        self.sock.close()


def pip_processes(home: Path) -> list[int]:
    return processes_with("pip", str(home))


def test_install_has_a_timeout_and_dies_with_its_function(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    index = SilentIndex()
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "300")
    gw = GatewayProcess(tmp_path / "home", extra=["--install-timeout", "3"]).start()
    try:
        # Past the install timeout: the deploy fails, saying so, and pip is gone.
        config = write_function(tmp_path, "slowpip", ECHO, requirements="dcf-never-answers\n")
        started = time.monotonic()
        result = gw.dcf("function", "create", "-f", str(config), "slowpip")
        assert result.returncode == 1
        assert b"did not finish within" in result.stderr, result.stderr
        assert time.monotonic() - started < 20
        wait_for(lambda: not pip_processes(gw.home), 5, "pip to be killed")
        assert not entries(gw.home / "envs"), "a half-built env was left"

        # Deleted mid-install: DELETE answers at once and pip dies with the function.
        with gw.http() as http:
            r = upload(gw, "midbuild", tar_gz({"handler.py": ECHO.encode(),
                                               "requirements.txt": b"dcf-also-never\n"}))
            assert r.status_code == 202, r.text
            wait_for(lambda: pip_processes(gw.home), 10, "pip to start")
            started = time.monotonic()
            assert http.delete("/system/function/midbuild", timeout=15).status_code == 200
            assert time.monotonic() - started < 5
        wait_for(lambda: not pip_processes(gw.home), 5, "pip to die with its function")
        assert not entries(gw.home / "envs")
        assert not (gw.home / "functions" / "midbuild").exists()
    finally:
        gw.stop()
        index.close()


# 9: a replica dies under load ----------------------------------------------------------


async def hammer(port: int, path: str, connections: int, stop: threading.Event,
                 results: list[tuple[float, int, bytes]]) -> None:
    """Keep-alive POSTs on ``connections`` raw connections until ``stop``: a light client,
    so the gateway, not the client, sets the pace."""
    request = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nx".encode()

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while not stop.is_set():
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            body = await reader.readexactly(length)
            results.append((time.monotonic(), int(head[9:12]), body))
        writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))


def test_replica_killed_under_load_fails_only_its_own_calls(gw: GatewayProcess, tmp_path: Path):
    # Each replica has forked a child that holds its socket and pipes: the victim's death
    # must still be seen at once (by its exit), and only its own calls fail.
    deploy(gw, tmp_path, "pair", """
        import os, time
        forked = False
        def Handler(req):
            global forked
            if not forked:
                forked = True
                if os.fork() == 0:
                    time.sleep(300)
                    os._exit(0)
            time.sleep(0.002)
            return "ok"
    """, replicas={"min": 2, "max": 2}, concurrency=2, timeout="3s")
    wait_for(lambda: info_of(gw, "pair")["replicas"]["ready"] == 2, 30, "two replicas")
    victim = info_of(gw, "pair")["replicas"]["list"][0]["pid"]
    results: list[tuple[float, int, bytes]] = []
    stop = threading.Event()
    thread = threading.Thread(target=asyncio.run,
                              args=(hammer(gw.port, "/function/pair", 32, stop, results),))
    thread.start()
    time.sleep(1.5)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    time.sleep(1.5)
    stop.set()
    thread.join()
    failures = [(code, body) for _, code, body in results if code != 200]
    # At most the calls that were on the victim (its concurrency) fail.
    assert len(failures) <= 2, failures
    assert all(code == 502 for code, _ in failures), failures
    assert not any(b"FileNotFound" in body or b"Refused" in body for _, body in failures)
    served_after = [t for t, code, _ in results if code == 200 and t > killed_at + 0.1]
    assert len(served_after) > 100, len(served_after)  # the healthy replica carried on at once


# 10: config.yaml attacks on the CLI -----------------------------------------------------

LAUGHS = "\n".join(
    ["functions:", "  bomb:", "    handler: {dir: .}", "    build_args:",
     '      a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"      {chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]"
       for i in range(8)]
    + ["    desc: *i", ""]
)


def test_cli_survives_hostile_config_files(gw: GatewayProcess, tmp_path: Path):
    (tmp_path / "handler.py").write_text(ECHO)
    cases = {
        "binary": (b"functions:\n  x: \xff\xfe\x00\x81\n", "UTF-8"),
        "laughs": (LAUGHS.encode(), "alias"),
        "huge": (b"# " + b"x" * (2 << 20) + b"\nfunctions: {}\n", "larger than"),
    }
    for label, (content, expected) in cases.items():
        work = tmp_path / label
        work.mkdir()
        (work / "handler.py").write_text(ECHO)
        (work / "config.yaml").write_bytes(content)
        # Commands that do not need config.yaml are not affected by it.
        for args in (("function", "list"), ("runtime", "list")):
            result = gw.dcf(*args, cwd=work, timeout=30)
            assert result.returncode == 0, (label, args, result.stderr.decode())
        # Commands that need it fail in one line, fast.
        for args in (("function", "create"), ("function", "delete", "-f", "config.yaml"),
                     ("function", "init", "newfn")):
            started = time.monotonic()
            result = gw.dcf(*args, cwd=work, timeout=30)
            err = result.stderr.decode()
            assert result.returncode == 1, (label, args, err)
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (label, err)
            assert "config.yaml" in err and expected in err, (label, args, err)
            assert time.monotonic() - started < 5, (label, args)
        assert not (work / "newfn").exists()
    # Anchors and aliases of a reasonable size still work.
    (tmp_path / "config.yaml").write_text(
        "functions:\n  anchored: &d\n    handler: {dir: .}\n    timeout: 5s\n"
        "  aliased: *d\n")
    result = gw.dcf("function", "create", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr.decode()


# 12: a log follower that stops reading ------------------------------------------------


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_stalled_log_follower_does_not_grow_the_gateway(gw: GatewayProcess, tmp_path: Path):
    deploy(gw, tmp_path, "chatty", """
        import sys
        def Handler(req):
            line = "y" * 4000 + "\\n"
            for _ in range(int(req.input)):
                sys.stdout.write(line)
            sys.stdout.flush()
            return "printed"
    """, timeout="60s")
    follower = socket.create_connection(("127.0.0.1", gw.port))
    follower.sendall(b"GET /system/function/chatty/logs?follow=true&tail=0 HTTP/1.1\r\n"
                     b"host: x\r\n\r\n")
    time.sleep(0.3)
    before = rss(gw.proc.pid)
    with HealthProbe(gw) as probe:
        for _ in range(4):  # 64 MB of output the follower never reads
            r = httpx.post(gw.url + "/function/chatty", content=b"4000", timeout=60)
            assert r.text == "printed"
        time.sleep(1)
    grown = rss(gw.proc.pid) - before
    assert grown < 16 << 20, f"gateway grew by {grown >> 20} MB"
    assert probe.worst < 1, probe.worst
    # The follower, reading again, is told what it missed.
    follower.settimeout(5)
    seen = b""
    deadline = time.monotonic() + 10
    while b"dropped" not in seen and time.monotonic() < deadline:
        chunk = follower.recv(1 << 20)
        if not chunk:
            break
        seen = seen[-200:] + chunk
    follower.close()
    assert b"dropped" in seen


# 14: smaller ones ----------------------------------------------------------------------


def test_handler_file_must_stay_inside_the_upload(gw: GatewayProcess, tmp_path: Path):
    deploy(gw, tmp_path, "innocent", "def Handler(req):\n    return 'innocent code'\n")
    for file in ("../../innocent/v1/handler.py", "../innocent/v1/handler.py", "/etc/passwd",
                 "sub/../../x.py"):
        r = upload(gw, "intruder", tar_gz({"handler.py": ECHO.encode()}),
                   handler={"file": file})
        assert r.status_code == 400, (file, r.text)
        assert "handler.file" in r.json()["error"], r.json()
    # A symlink inside the upload pointing out of it is not followed either.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        link = tarfile.TarInfo("handler.py")
        link.type = tarfile.SYMTYPE
        link.linkname = str(gw.home / "functions" / "innocent" / "v1" / "handler.py")
        tar.addfile(link)
    r = upload(gw, "intruder", buffer.getvalue())
    assert r.status_code == 400, r.text
    config = tmp_path / "escape.yaml"
    config.write_text("functions:\n  intruder:\n    handler: {dir: ./innocent, file: ../x.py}\n")
    result = gw.dcf("function", "create", "-f", str(config))
    assert result.returncode == 1 and b"handler.file" in result.stderr
    assert all(f["name"] != "intruder" for f in gw.http().get("/system/functions").json())


def test_failed_deploys_leave_no_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    gw = GatewayProcess(tmp_path / "home").start()
    try:
        assert upload(gw, "nohandler", tar_gz({"other.py": b""})).status_code == 400
        assert upload(gw, "notar", b"not a tar").status_code == 400
        config = write_function(tmp_path, "noinstall", ECHO, requirements="dcf-not-a-pkg\n")
        result = gw.dcf("function", "create", "-f", str(config), "noinstall")
        assert result.returncode == 1
        assert not entries(gw.home / "functions")
        assert not entries(gw.home / "envs")
    finally:
        gw.stop()


def test_a_killed_gateway_leaves_no_stale_run_dir(tmp_path: Path):
    gw = GatewayProcess(tmp_path / "home").start()
    deploy(gw, tmp_path, "sock", ECHO)
    run_dir = Path(info_of(gw, "sock")["replicas"]["list"][0]["address"]).parent.parent
    assert run_dir.is_dir()
    os.killpg(gw.proc.pid, signal.SIGKILL)
    gw.proc.wait()
    assert run_dir.is_dir()  # nothing could clean it: the next gateway does
    other = GatewayProcess(tmp_path / "home2").start()
    try:
        assert not run_dir.exists()
    finally:
        other.stop()


def test_slow_body_is_cut_after_the_body_timeout(tmp_path: Path):
    gw = GatewayProcess(tmp_path / "home", extra=["--body-timeout", "1"]).start()
    try:
        deploy(gw, tmp_path, "patient", ECHO)
        for path in ("/function/patient", "/system/functions"):
            with socket.create_connection(("127.0.0.1", gw.port)) as slow:
                slow.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n"
                             "content-type: application/json\r\n\r\n0123456789".encode())
                slow.settimeout(10)
                started = time.monotonic()
                answer = b""
                while chunk := slow.recv(65536):
                    answer += chunk
                took = time.monotonic() - started
            assert answer.startswith(b"HTTP/1.1 408"), (path, answer[:200])
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert "1s" in body["error"] and "body" in body["error"], body
            assert took < 4, (path, took)
        assert httpx.post(gw.url + "/function/patient", content=b"fast").text == "fast"
    finally:
        gw.stop()


def test_limits_are_flags_of_gateway_start():
    result = subprocess.run([sys.executable, "-m", "dcf.cli.main", "gateway", "start", "--help"],
                            capture_output=True, text=True, timeout=30)
    for flag in ("--max-upload", "--max-upload-files", "--max-unpacked", "--install-timeout",
                 "--body-timeout", "--unresponsive-after", "--healthy-after"):
        assert flag in result.stdout, flag
