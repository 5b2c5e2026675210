"""Durable async jobs (issue 9, defect 1 and build 1), against real gateways and replicas.

Each test reproduces an attack on the old in-memory jobs: results held in memory
without a limit, jobs evicted by count, jobs killed by a restart, a lost job
answering 404 like a bogus id.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ECHO, GatewayProcess, deploy

MB = 1_000_000
SIZED = """
def Handler(req):
    return b"x" * int(req.input)
"""
RUNS = """
import time, urllib.request
def Handler(req):
    # Counted by the test's server: a sandboxed replica cannot write the host's files.
    with urllib.request.urlopen(req.query["counter"], timeout=10) as counted:
        runs = int(counted.read())
    time.sleep(float(req.input or 0))
    return f"ran {runs} times"
"""


class RunCounter:
    """A loopback HTTP server that counts the GETs of each path: a job's runs, across
    replicas and gateway restarts. ``url(key)`` is what the handler calls."""

    def __init__(self) -> None:
        counts: dict[str, int] = {}
        self._counts = counts
        self._changed = changed = threading.Condition()

        class Count(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                with changed:
                    counts[self.path] = counts.get(self.path, 0) + 1
                    body = str(counts[self.path]).encode()
                    changed.notify_all()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Count)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, key: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{key}"

    def wait_runs(self, key: str, runs: int, timeout: float = 30) -> None:
        """Until the handler has counted ``runs`` runs of ``key``: a job the store calls
        running may not have reached its handler yet."""
        with self._changed:
            reached = self._changed.wait_for(
                lambda: self._counts.get(f"/{key}", 0) >= runs, timeout
            )
        assert reached, f"{key}: {self._counts.get(f'/{key}', 0)} runs, not {runs}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def counter() -> Iterator[RunCounter]:
    server = RunCounter()
    yield server
    server.close()


# helpers ---------------------------------------------------------------------------------


def submit(http: httpx.Client, name: str, body: bytes = b"", **kwargs: object) -> str:
    response = http.post(f"/async-function/{name}", content=body, **kwargs)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def state_of(http: httpx.Client, job_id: str) -> str | None:
    response = http.get(f"/async-function/jobs/{job_id}")
    state = response.headers.get("x-dcf-job-status")
    if state is None and response.status_code == 202:  # the old in-memory jobs said it so
        state = response.json().get("status")
    return state


def wait_job(http: httpx.Client, job_id: str, timeout: float = 30) -> httpx.Response:
    """The job's final answer: done, failed or gone."""
    deadline = time.monotonic() + timeout
    while True:
        response = http.get(f"/async-function/jobs/{job_id}")
        if response.headers.get("x-dcf-job-status") not in ("queued", "running"):
            return response
        assert time.monotonic() < deadline, f"job {job_id} still {response.text}"
        time.sleep(0.05)


def wait_state(http: httpx.Client, job_id: str, state: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while state_of(http, job_id) != state:
        assert time.monotonic() < deadline, f"job {job_id} never {state}"
        time.sleep(0.02)


def rss(gw: GatewayProcess) -> int:
    assert gw.proc is not None
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


@pytest.fixture
def started() -> Iterator[list[GatewayProcess]]:
    """Gateways a test starts with its own flags; stopped after it."""
    gateways: list[GatewayProcess] = []
    yield gateways
    for gateway in gateways:
        gateway.stop()


def start(started: list[GatewayProcess], home: Path, *flags: str) -> GatewayProcess:
    gateway = GatewayProcess(home, extra=list(flags)).start()
    started.append(gateway)
    return gateway


class Hook:
    """A loopback HTTP server that records callbacks; answers 503 to the first ``fail``."""

    def __init__(self, host: str = "127.0.0.1", fail: int = 0) -> None:
        received: list[tuple[dict[str, str], bytes]] = []
        self.received = received
        failures = [fail]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = 503 if failures[0] > 0 else 200
                failures[0] -= 1
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 15) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"{len(self.received)} callbacks, not {count}"
            time.sleep(0.05)
        return self.received

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# defect 1: memory, eviction, restarts, lost vs unknown ---------------------------------------


def test_results_go_to_disk_capped_and_gateway_memory_stays_flat(started, tmp_path: Path):
    """Was: 40 answers of 50 MB took the gateway from 106 MB to 2.15 GB of memory."""
    gw = start(started, tmp_path / "home", "--job-result-max", "6Mi")
    deploy(gw, tmp_path, "sized", SIZED, concurrency=2)
    with gw.http() as http:
        warm = submit(http, "sized", b"%d" % (5 * MB))
        assert len(wait_job(http, warm).content) == 5 * MB
        before = rss(gw)
        kept = [submit(http, "sized", b"%d" % (5 * MB)) for _ in range(20)]
        refused = [submit(http, "sized", b"%d" % (7 * MB)) for _ in range(10)]
        answers = {job_id: wait_job(http, job_id) for job_id in kept + refused}
        grown = rss(gw) - before
        # 20 answers of 5 MB kept (100 MB) and 10 of 7 MB refused (70 MB): none stays in memory.
        assert grown < 40 * MB, f"gateway grew by {grown / MB:.0f} MB"
        for job_id in kept:
            response = answers[job_id]
            assert response.status_code == 200
            assert response.headers["x-dcf-job-status"] == "done"
            assert response.headers["content-length"] == str(5 * MB)
            assert response.content == b"x" * (5 * MB)
            assert (gw.home / "jobs" / f"{job_id}.out").stat().st_size == 5 * MB
        for job_id in refused:
            response = answers[job_id]
            assert response.status_code == 507
            assert response.headers["x-dcf-job-status"] == "failed"
            error = response.json()["error"]
            assert "7000000 bytes" in error and "--job-result-max" in error, error
            assert not list((gw.home / "jobs").glob(f"{job_id}*"))
        # Served from its file again and again, memory still flat.
        for _ in range(5):
            assert len(http.get(f"/async-function/jobs/{kept[0]}").content) == 5 * MB
        assert rss(gw) - before < 40 * MB


def test_a_thousand_posts_evict_no_job_and_a_full_store_says_429(
    gw: GatewayProcess, started, tmp_path: Path
):
    """Was: one job, then 1000 anonymous posts, and its owner got 404 after 0.3 s."""
    deploy(gw, tmp_path, "flood", ECHO)
    with gw.http() as http:
        first = submit(http, "flood", b"mine")
        others = [submit(http, "flood", b"%d" % i) for i in range(1000)]
        response = wait_job(http, first)
        assert (response.status_code, response.content) == (200, b"mine")
        assert wait_job(http, others[-1]).content == b"999"

    small = start(started, tmp_path / "small", "--job-max", "20", "--job-max-bytes", "1Mi")
    deploy(small, tmp_path, "flood", ECHO)
    with small.http() as http:
        first = submit(http, "flood", b"mine")
        accepted, refusals = [], []
        for i in range(100):
            response = http.post("/async-function/flood", content=b"%d" % i)
            (accepted if response.status_code == 202 else refusals).append(response)
        assert len(accepted) == 19
        assert {r.status_code for r in refusals} == {429}
        error = refusals[0].json()["error"]
        assert "job store is full" in error and "no job is evicted" in error, error
        assert int(refusals[0].headers["retry-after"]) >= 1
        response = wait_job(http, first)
        assert (response.status_code, response.content) == (200, b"mine")
    bigger = start(started, tmp_path / "bytes", "--job-max-bytes", "1Mi")
    deploy(bigger, tmp_path, "flood", ECHO)
    with bigger.http() as http:
        submit(http, "flood", b"a" * 600_000)
        response = http.post("/async-function/flood", content=b"b" * 600_000)
        assert response.status_code == 429
        assert "bytes" in response.json()["error"]


def test_graceful_restart_does_not_kill_running_jobs(
    gateway: GatewayProcess, tmp_path: Path, counter: RunCounter
):
    """Was: a restart killed running jobs, and their ids answered 404."""
    deploy(gateway, tmp_path, "slowjob", RUNS)
    with gateway.http() as http:
        job_id = submit(http, "slowjob", b"1.5", params={"counter": counter.url("runs")})
        wait_state(http, job_id, "running")
    counter.wait_runs("runs", 1)  # in the handler, not only marked running
    gateway.stop()
    gateway.start()
    with gateway.http() as http:
        response = wait_job(http, job_id)
    assert response.status_code == 200
    assert response.text == "ran 2 times"  # at least once: the run cut short ran again


def test_gateway_killed_mid_job_runs_it_after_restart(
    gateway: GatewayProcess, tmp_path: Path, counter: RunCounter
):
    deploy(gateway, tmp_path, "slowjob", RUNS)
    with gateway.http() as http:
        running = submit(http, "slowjob", b"1.5", params={"counter": counter.url("runs")})
        wait_state(http, running, "running")
        queued = submit(http, "slowjob", b"0", params={"counter": counter.url("other")})
    counter.wait_runs("runs", 1)  # in the handler, not only marked running
    assert gateway.proc is not None
    os.kill(gateway.proc.pid, signal.SIGKILL)
    gateway.proc.wait()
    gateway.start()
    with gateway.http() as http:
        response = wait_job(http, running)
        assert (response.status_code, response.text) == (200, "ran 2 times")
        response = wait_job(http, queued)
        assert (response.status_code, response.text) == (200, "ran 1 times")


def test_lost_and_expired_jobs_are_410_and_unknown_ids_404(started, tmp_path: Path):
    """Was: a lost job answered 404 "no job", the same as a bogus id."""
    gw = start(started, tmp_path / "home", "--job-ttl", "1s")
    deploy(gw, tmp_path, "brief", ECHO)
    deploy(gw, tmp_path, "doomed", "import time\ndef Handler(req):\n    time.sleep(5)\n",
           concurrency=1)
    with gw.http() as http:
        done = submit(http, "brief", b"short-lived")
        assert re.fullmatch(r"[0-9a-f]{48}", done)  # 128 random bits and a MAC
        assert wait_job(http, done).content == b"short-lived"
        running = submit(http, "doomed")
        queued = submit(http, "doomed")
        wait_state(http, running, "running")
        assert state_of(http, queued) == "queued"
        gw.dcf("function", "delete", "doomed", check=True)
        for job_id in (running, queued):
            response = wait_job(http, job_id, timeout=10)
            assert response.status_code == 410, response.text
            assert "'doomed' was deleted" in response.json()["error"]
        time.sleep(1.5)
        response = http.get(f"/async-function/jobs/{done}")
        assert response.status_code == 410
        assert "expired" in response.json()["error"]
        tampered = done[:-1] + ("0" if done[-1] != "0" else "1")
        for bogus in ("nope", secrets.token_hex(24), tampered):
            response = http.get(f"/async-function/jobs/{bogus}")
            assert response.status_code == 404, bogus
            assert "never issued" in response.json()["error"]
        # Once swept, the result's file is gone from disk too; the answer stays 410.
        deadline = time.monotonic() + 5
        while (gw.home / "jobs" / f"{done}.out").exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert http.get(f"/async-function/jobs/{done}").status_code == 410


def test_jobs_obey_the_function_queue_and_leave_room_for_sync_calls(
    gw: GatewayProcess, tmp_path: Path
):
    """Was: every job went to the pool at once; past max_queue they ended as 429s."""
    deploy(gw, tmp_path, "narrow", "import time\ndef Handler(req):\n    time.sleep(0.03)\n"
           "    return req.input\n", concurrency=1, max_queue=2)
    with gw.http() as http:
        jobs = [submit(http, "narrow", b"%d" % i) for i in range(30)]
        sync = [http.post("/function/narrow", content=b"sync").status_code for _ in range(5)]
        answers = [wait_job(http, job_id) for job_id in jobs]
    assert sync == [200] * 5
    assert [(r.status_code, r.content) for r in answers] == [(200, b"%d" % i) for i in range(30)]


# callbacks ----------------------------------------------------------------------------------


def test_callback_gets_the_answer_with_the_job_id_and_is_retried(
    gw: GatewayProcess, tmp_path: Path
):
    deploy(gw, tmp_path, "calls-back", "def Handler(req):\n    return req.input.upper()\n")
    hook = Hook(fail=1)
    try:
        with gw.http() as http:
            job_id = submit(
                http, "calls-back", b"deliver me", headers={"x-callback-url": hook.url}
            )
            received = hook.wait(2)  # the first answered 503: tried again
    finally:
        hook.close()
    for headers, body in received:
        assert headers["x-dcf-job-id"] == job_id
        assert headers["x-dcf-job-status"] == "done"
        assert headers["x-dcf-status"] == "200"
        assert body == b"DELIVER ME"
    # The function never sees the gateway's instruction.
    assert "x-callback-url" not in json.dumps(received[0][0]).replace(hook.url, "")


def test_callbacks_outside_the_allow_list_are_refused(gw: GatewayProcess, started, tmp_path: Path):
    deploy(gw, tmp_path, "ssrf", ECHO)
    with gw.http() as http:
        for url, words in [
            ("http://169.254.169.254/latest/meta-data", ["allow-list", "--callback-allow"]),
            ("http://10.1.2.3:8080/hook", ["10.1.2.3 is not in", "127.0.0.0/8"]),
            ("ftp://127.0.0.1/hook", ["http:// or https://"]),
            ("not a url", ["http:// or https://"]),
        ]:
            response = http.post(
                "/async-function/ssrf", content=b"x", headers={"x-callback-url": url}
            )
            assert response.status_code == 400, (url, response.text)
            error = response.json()["error"]
            assert all(word in error for word in words), error

    other = start(started, tmp_path / "home2", "--callback-allow", "127.0.0.2/32")
    deploy(other, tmp_path, "ssrf", ECHO)
    hook = Hook(host="127.0.0.2")
    try:
        with other.http() as http:
            refused = http.post(
                "/async-function/ssrf",
                content=b"x",
                headers={"x-callback-url": "http://127.0.0.1:9/hook"},
            )
            assert refused.status_code == 400 and "127.0.0.2/32" in refused.json()["error"]
            job_id = submit(http, "ssrf", b"allowed", headers={"x-callback-url": hook.url})
            headers, body = hook.wait(1)[0]
            assert (headers["x-dcf-job-id"], body) == (job_id, b"allowed")
    finally:
        hook.close()

    bad = subprocess.run(
        [sys.executable, "-m", "dcf.cli.main", "gateway", "start", "--callback-allow", "a b!"],
        capture_output=True,
        timeout=30,
        env={**os.environ, "DCF_HOME": str(tmp_path / "home3")},
    )
    assert bad.returncode != 0
    assert b"--callback-allow" in bad.stderr and b"Traceback" not in bad.stderr


def test_callbacks_to_the_gateway_itself_are_refused_whatever_the_allow_list(
    gw: GatewayProcess, started, tmp_path: Path
):
    """The answer's body is the function's to choose: POSTed to the gateway's own API it
    could deploy or delete functions. No allow-list may point a callback back at it."""
    deploy(gw, tmp_path, "loops", ECHO)
    wide = start(started, tmp_path / "home2", "--callback-allow", "0.0.0.0/0,::/0,localhost")
    deploy(wide, tmp_path, "loops", ECHO)
    for gateway in (gw, wide):
        port = gateway.port
        with gateway.http() as http:
            for host in ("127.0.0.1", "localhost", "127.9.9.9", "0.0.0.0", "[::1]", "LocalHost."):
                url = f"http://{host}:{port}/system/functions"
                response = http.post(
                    "/async-function/loops", content=b"{}", headers={"x-callback-url": url}
                )
                assert response.status_code == 400, (url, response.text)
                error = response.json()["error"]
                assert "the gateway's own" in error and str(port) in error, error
            assert http.get("/system/functions").status_code == 200
    # Other loopback ports stay allowed by default: the receiver on this machine.
    hook = Hook()
    try:
        with gw.http() as http:
            job_id = submit(http, "loops", b"elsewhere", headers={"x-callback-url": hook.url})
            assert hook.wait(1)[0][0]["x-dcf-job-id"] == job_id
    finally:
        hook.close()


# the CLI ------------------------------------------------------------------------------------


def test_cli_call_async_then_job_get_wait(gw: GatewayProcess, tmp_path: Path):
    deploy(gw, tmp_path, "cli-job", """
        import time, dcf
        def Handler(req):
            time.sleep(0.3)
            if req.input == b"bad":
                raise dcf.HTTPError(400, "bad input")
            return req.input.upper()
    """)
    submitted = gw.dcf("function", "call", "cli-job", "--async", input="hello", check=True)
    job_id = submitted.stdout.decode().strip()
    assert re.fullmatch(r"[0-9a-f]{48}", job_id), submitted.stdout
    early = gw.dcf("job", "get", job_id, check=True)
    assert early.stdout in (b"queued\n", b"running\n", b"HELLO")
    done = gw.dcf("job", "get", job_id, "--wait", check=True)
    assert done.stdout == b"HELLO"
    assert gw.dcf("job", "get", job_id, check=True).stdout == b"HELLO"

    bad_id = gw.dcf("function", "call", "cli-job", "--async", input="bad", check=True)
    failed = gw.dcf("job", "get", bad_id.stdout.decode().strip(), "--wait")
    assert failed.returncode == 1
    assert failed.stderr == b"error: bad input\n" and failed.stdout == b""

    unknown = gw.dcf("job", "get", "nope")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith(b"error: no job 'nope'") and unknown.stderr.count(b"\n") == 1
    missing = gw.dcf("function", "call", "no-such-fn", "--async", input="x")
    assert missing.returncode == 1 and b"no function named 'no-such-fn'" in missing.stderr
