"""Streamed answers through a real gateway, on the local and the Ray backend.

A handler that returns (or is) a generator sends its items as they are made:
chunked transfer, or Server-Sent Events for ``Accept: text/event-stream``. The
raw-socket client below reads chunks as they come off the wire, so nothing
between the handler and the test can buffer an answer unseen.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, GatewayProcess, free_port, write_function

STREAMS = """
import asyncio
import time

from dcf import HTTPError, Response

state = {"closed_at": None}


def counter(n, gap):
    try:
        for i in range(n):
            if i:
                time.sleep(gap)
            yield {"i": i}
    finally:
        state["closed_at"] = time.time()


async def acounter(n, gap):
    try:
        for i in range(n):
            if i:
                await asyncio.sleep(gap)
            yield {"i": i}
    finally:
        state["closed_at"] = time.time()


def failing():
    yield "one"
    yield "two"
    raise ValueError("boom")


def early():
    raise HTTPError(422, "n must be positive")
    yield


def Handler(req):
    n, gap = int(req.query.get("n", 5)), float(req.query.get("gap", 0.3))
    if req.path == "/state":
        return state
    if req.path == "/async":
        return acounter(n, gap)
    if req.path == "/response":
        headers = {"x-kind": "counter", "content-type": "application/x-ndjson"}
        return Response(body=counter(n, gap), status=201, headers=headers)
    if req.path == "/fail":
        return failing()
    if req.path == "/early":
        return early()
    if req.path == "/lines":
        return (line for line in ["hello\\nworld", "bye"])
    return counter(n, gap)
"""

FOREVER = """
import time


def Handler(req):
    i = 0
    while True:
        yield f"{i}\\n"
        i += 1
        time.sleep(0.2)
"""

PAUSES = """
import time


def Handler(req):
    yield "0\\n"
    time.sleep(3)  # past its stream_idle_timeout, well within its timeout
    yield "1\\n"
"""

FLOW = """
import asyncio

made = {"items": 0, "closed": False}
CHUNK = b"x" * (256 << 10)


async def Handler(req):
    if req.path == "/progress":
        yield made
        return
    try:
        for _ in range(1000):
            made["items"] += 1
            yield CHUNK
    finally:
        made["closed"] = True
"""

BATCHED = """
import dcf


@dcf.batch(max_size=4)
def Handler(reqs):
    for r in reqs:
        yield r.input
"""


@pytest.fixture(scope="module", params=["local", "ray"])
def sgw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    extra: list[str] = []
    if request.param == "ray":
        pytest.importorskip("ray", reason="the ray backend's tests need pip install -e '.[ray]'")
        cluster = request.getfixturevalue("cluster")
        extra = ["--backend", "ray", "--ray-address", cluster.address]
    root = tmp_path_factory.mktemp(f"streaming-{request.param}")
    gateway = GatewayProcess(root / "home", extra=extra).start()
    try:
        write_function(root, "streams", STREAMS, concurrency=1)
        write_function(root, "forever", FOREVER, timeout="1s")
        write_function(root, "pauses", PAUSES, timeout="10s", stream_idle_timeout="1s")
        config = write_function(root, "flow", FLOW, concurrency=2)
        gateway.dcf("function", "create", "-f", str(config), check=True)
        for name in ("streams", "forever", "pauses", "flow"):
            gateway.wait_status(name, "Ready")
        gateway.root = root  # type: ignore[attr-defined]
        yield gateway
    finally:
        gateway.stop()


class RawStream:
    """One HTTP/1.1 call on a plain socket; chunks are read off it as they arrive."""

    def __init__(
        self, gw: GatewayProcess | int, path: str, headers: dict[str, str] | None = None
    ) -> None:
        port = gw if isinstance(gw, int) else gw.port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Length: 0"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.started = time.perf_counter()
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._buffer = b""
        while b"\r\n\r\n" not in self._buffer:
            self._recv()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {
            k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)
        }

    def _recv(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the gateway closed the connection")
        self._buffer += data

    def chunks(self) -> Iterator[tuple[float, bytes]]:
        """(seconds since the call, chunk) for each chunk, until the last (empty) one."""
        assert self.headers.get("transfer-encoding") == "chunked", self.headers
        while True:
            while b"\r\n" not in self._buffer:
                self._recv()
            size_line, self._buffer = self._buffer.split(b"\r\n", 1)
            size = int(size_line, 16)
            while len(self._buffer) < size + 2:
                self._recv()
            data, self._buffer = self._buffer[:size], self._buffer[size + 2 :]
            if not size:
                return
            yield time.perf_counter() - self.started, data

    def close(self) -> None:
        self.sock.close()


def get_json(gw: GatewayProcess, path: str, timeout: float = 10) -> dict:
    return httpx.post(f"{gw.url}/function/{path}", timeout=timeout).json()


@pytest.mark.parametrize("path", ["streams", "streams/async"])
def test_items_arrive_as_they_are_made_in_order(sgw: GatewayProcess, path: str) -> None:
    call = RawStream(sgw, f"/function/{path}")
    assert call.status == 200
    assert call.headers["content-type"] == "application/x-ndjson"
    got = list(call.chunks())
    call.close()
    assert [json.loads(chunk) for _, chunk in got] == [{"i": i} for i in range(5)]
    assert all(chunk.endswith(b"\n") for _, chunk in got)  # one JSON line per item
    times = [t for t, _ in got]
    # The handler's own time to its first item is ~0, then 0.3 s between items.
    assert times[0] < 0.2, times
    for i, t in enumerate(times):
        assert t >= 0.3 * i - 0.05, times  # not sent ahead of being made
        assert t < 0.3 * i + 0.2 + 0.3, times  # nor held back


def test_sse_framing_is_exact(sgw: GatewayProcess) -> None:
    call = RawStream(sgw, "/function/streams?gap=0.01", {"Accept": "text/event-stream"})
    assert call.status == 200
    assert call.headers["content-type"] == "text/event-stream"
    assert call.headers["cache-control"] == "no-cache"
    body = b"".join(chunk for _, chunk in call.chunks())
    call.close()
    assert body == b"".join(b'data: {"i": %d}\n\n' % i for i in range(5))
    lines = RawStream(sgw, "/function/streams/lines", {"Accept": "text/event-stream"})
    assert b"".join(c for _, c in lines.chunks()) == b"data: hello\ndata: world\n\ndata: bye\n\n"
    lines.close()


def test_response_sets_status_and_headers(sgw: GatewayProcess) -> None:
    call = RawStream(sgw, "/function/streams/response?n=3&gap=0.01")
    assert call.status == 201
    assert call.headers["x-kind"] == "counter"
    assert call.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(c) for _, c in call.chunks()] == [{"i": i} for i in range(3)]
    call.close()


@pytest.mark.parametrize("path", ["streams", "streams/async"])
def test_disconnect_runs_finally_and_frees_the_slot(sgw: GatewayProcess, path: str) -> None:
    call = RawStream(sgw, f"/function/{path}?n=1000&gap=0.3")
    chunks = call.chunks()
    next(chunks), next(chunks)
    left = time.time()
    call.close()
    # concurrency 1: this call is served only once the stream's slot is free.
    state = get_json(sgw, "streams/state")
    served = time.time() - left
    assert state["closed_at"] is not None and state["closed_at"] >= left - 0.05, state
    assert state["closed_at"] - left < 1.0, state["closed_at"] - left
    assert served < 2.0, served


def test_raising_midway_ends_the_stream_with_the_error(sgw: GatewayProcess) -> None:
    call = RawStream(sgw, "/function/streams/fail", {"Accept": "text/event-stream"})
    body = b"".join(c for _, c in call.chunks())
    call.close()
    error = json.dumps({"error": "ValueError: boom", "function": "streams"}).encode()
    assert body == b"data: one\n\ndata: two\n\nevent: error\ndata: " + error + b"\n\n"
    # Chunked: the body ends without its last chunk, so no client takes it for a whole one.
    with httpx.stream("POST", f"{sgw.url}/function/streams/fail", timeout=10) as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            response.read()
    # An error before the first item is an ordinary error answer.
    response = httpx.post(f"{sgw.url}/function/streams/early", timeout=10)
    assert response.status_code == 422
    assert response.json() == {"error": "n must be positive", "function": "streams"}


def test_a_stream_outliving_its_timeout_is_cut(sgw: GatewayProcess) -> None:
    call = RawStream(sgw, "/function/forever", {"Accept": "text/event-stream"})
    assert call.headers["content-type"] == "text/event-stream"
    got = list(call.chunks())
    call.close()
    assert got[-1][0] < 1.0 + 0.5, got[-1][0]  # timeout 1s
    assert got[-1][1].startswith(b"event: error\ndata: ")
    assert b"did not end within 1s" in got[-1][1]
    assert [c for _, c in got[:3]] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]


def test_a_stream_idle_past_its_bound_is_cut(sgw: GatewayProcess) -> None:
    call = RawStream(sgw, "/function/pauses", {"Accept": "text/event-stream"})
    got = list(call.chunks())
    call.close()
    assert got[0][1] == b"data: 0\n\n"
    assert 1.0 <= got[-1][0] < 2.5, got[-1][0]  # stream_idle_timeout 1s (before its 3 s gap ends)
    assert got[-1][1].startswith(b"event: error\ndata: ")
    assert b"sent nothing for 1s" in got[-1][1]
    text = httpx.get(f"{sgw.url}/metrics", timeout=10).text
    assert 'dcf_function_stream_ends_total{function="pauses",reason="idle"} 1.0' in text


def test_a_slow_reader_slows_the_generator(sgw: GatewayProcess) -> None:
    call = RawStream(sgw, "/function/flow")
    chunks = call.chunks()
    next(chunks)
    time.sleep(1.0)  # unread: socket buffers, the gateway's window, then the generator waits
    made = get_json(sgw, "flow/progress")
    # 1000 items of 256 KiB; what the kernel's buffers and the window hold is a few dozen.
    assert 0 < made["items"] < 200, made
    call.close()
    time.sleep(0.5)
    assert get_json(sgw, "flow/progress")["closed"] is True


def test_cli_prints_items_as_they_arrive(sgw: GatewayProcess) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcf.cli.main", "function", "call", "streams", "-q", "n=3"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=sgw.env(),
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    seen_first = time.monotonic()
    rest = proc.stdout.read()
    done = time.monotonic()
    assert proc.wait(10) == 0
    assert first == b'{"i": 0}\n'
    assert rest == b'{"i": 1}\n{"i": 2}\n'
    assert done - seen_first > 0.4  # the first line came before the last was made
    failed = sgw.dcf("function", "call", "streams/fail")
    assert failed.returncode == 1
    assert failed.stdout == b"onetwo"
    assert failed.stderr.decode().strip() == (
        "error: the answer of streams/fail broke off before its end"
        " (see: dcf function log streams/fail)"
    )


def test_async_job_stores_the_whole_answer(sgw: GatewayProcess) -> None:
    job = sgw.dcf("function", "call", "streams", "--async", "-q", "gap=0.01", check=True)
    job_id = job.stdout.decode().strip()
    answer = sgw.dcf("job", "get", job_id, "--wait", check=True)
    assert answer.stdout == b"".join(b'{"i": %d}\n' % i for i in range(5))


def test_metrics_show_the_stream(sgw: GatewayProcess) -> None:
    RawStream(sgw, "/function/streams?n=2&gap=0.01").close()  # one more stream, left early
    list(RawStream(sgw, "/function/streams?n=2&gap=0.01").chunks())
    time.sleep(0.3)
    text = httpx.get(f"{sgw.url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith("dcf_function_stream") and 'function="streams"' in line:
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    assert values['dcf_function_streams_total{function="streams"}'] >= 2
    assert values['dcf_function_stream_items_total{function="streams"}'] >= 2
    assert values['dcf_function_stream_first_item_seconds_count{function="streams"}'] >= 1
    ends = 'dcf_function_stream_ends_total{function="streams",reason="%s"}'
    assert values[ends % "complete"] >= 1
    assert values[ends % "disconnect"] >= 1


def test_batched_handlers_cannot_stream(sgw: GatewayProcess) -> None:
    config = write_function(sgw.root, "batched", BATCHED)  # type: ignore[attr-defined]
    assert sgw.dcf("function", "create", "-f", str(config), "batched").returncode == 1
    info = sgw.wait_status("batched", "Failed")
    assert "a @dcf.batch handler cannot stream" in (info["failure"] or info["last_error"])


def test_a_replica_run_alone_streams_over_http(tmp_path: Path) -> None:
    """``python -m dcf.runtime`` without a gateway (the function's Dockerfile) streams too."""
    write_function(tmp_path, "alone", STREAMS)
    port = free_port()
    env = {
        "HANDLER_DIR": str(tmp_path / "alone"),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "DCF_READY_FILE": str(tmp_path / "ready"),
        "PYTHONPATH": str(REPO),
        "PATH": os.environ["PATH"],
    }
    proc = subprocess.Popen([sys.executable, "-m", "dcf.runtime"], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the replica did not start"
            time.sleep(0.05)
        call = RawStream(port, "/?n=3&gap=0.2")
        got = list(call.chunks())
        call.close()
        assert [json.loads(c) for _, c in got] == [{"i": i} for i in range(3)]
        # Items 0.2 s apart arrive as they are made, not buffered into one answer (a gap
        # between first and last, not an absolute time: a loaded machine delays both).
        assert got[-1][0] - got[0][0] >= 0.3, got
    finally:
        proc.terminate()
        proc.wait(10)
