"""Streamed answers: time to first item and items/s, through the gateway and a bare hop.

The same generators (``STREAM``: ``n`` items of ``size`` bytes after ``delay``
seconds of the handler's own work) are served by

- ``gateway``: a DCF function (local backend), sync and async generators;
- ``bare``: uvicorn + Starlette's ``StreamingResponse``, one hop, the reference point.

A raw-socket client (in this process, on a kept-alive connection) times each call
from the request's last byte sent to the first chunk read (TTFI) and to the last
one (items/s). A plain single-answer call through the same gateway is the floor
the TTFI is set against.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

from bench import util
from bench.context import Context
from bench.gateway import Gateway

STREAM = """
import asyncio
import time


def Handler(req):
    n, size = int(req.query.get("n", 1)), int(req.query.get("size", 16))
    delay = float(req.query.get("delay", 0))
    item = b"x" * size
    if delay:
        time.sleep(delay)  # the handler's own time before its first item
    for _ in range(n):
        yield item


async def AsyncHandler(req):
    n, size = int(req.query.get("n", 1)), int(req.query.get("size", 16))
    delay = float(req.query.get("delay", 0))
    item = b"x" * size
    if delay:
        await asyncio.sleep(delay)
    for _ in range(n):
        yield item


def Plain(req):
    return b"x" * 16
"""


def bare_stream(port: int) -> None:
    """``python -m bench.streaming bare PORT``: the same async generator behind Starlette."""
    import asyncio

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def stream(request: Request) -> StreamingResponse:
        q = request.query_params
        n, size, delay = int(q.get("n", 1)), int(q.get("size", 16)), float(q.get("delay", 0))
        item = b"x" * size

        async def items():  # noqa: ANN202
            if delay:
                await asyncio.sleep(delay)
            for _ in range(n):
                yield item

        return StreamingResponse(items(), media_type="application/octet-stream")

    app = Starlette(routes=[Route("/{path:path}", stream, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", http="httptools")


class RawClient:
    """HTTP/1.1 on one kept-alive socket, reading chunked answers as they arrive."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def _recv(self) -> None:
        data = self.sock.recv(1 << 18)
        if not data:
            raise ConnectionError("closed")
        self.buffer += data

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self._recv()
        head, self.buffer = self.buffer.split(marker, 1)
        return head

    def call(self, path: str, headers: str = "") -> tuple[float, float, int]:
        """(seconds to the first body byte, seconds to the end, body bytes) of one POST."""
        request = f"POST {path} HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n{headers}\r\n"
        start = time.perf_counter()
        self.sock.sendall(request.encode())
        head = self._until(b"\r\n\r\n").lower()
        if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
            raise RuntimeError(f"{path}: {head[:200]!r}")
        if b"transfer-encoding: chunked" not in head:
            length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            while len(self.buffer) < length:
                self._recv()
            now = time.perf_counter() - start
            self.buffer = self.buffer[length:]
            return now, now, length
        first = None
        received = 0
        while True:
            size = int(self._until(b"\r\n"), 16)
            while len(self.buffer) < size + 2:
                self._recv()
            self.buffer = self.buffer[size + 2 :]
            if not size:
                return first or 0.0, time.perf_counter() - start, received
            if first is None:
                first = time.perf_counter() - start
            received += size

    def close(self) -> None:
        self.sock.close()


def _ttfi(client: RawClient, path: str, calls: int) -> dict:
    for _ in range(max(5, calls // 10)):
        client.call(path)
    firsts = sorted(client.call(path)[0] for _ in range(calls))
    return {
        "calls": calls,
        "p50_ms": round(1000 * util.median(firsts), 3),
        "p99_ms": round(1000 * util.percentile(firsts, 99), 3),
    }


def _rate(client: RawClient, path: str, n: int, size: int, rounds: int, sse: bool = False) -> dict:
    headers = "Accept: text/event-stream\r\n" if sse else ""
    best = None
    for _ in range(rounds + 1):  # the first warms up
        _, total, received = client.call(f"{path}?n={n}&size={size}", headers)
        expected = n * (size + 8) if sse else n * size  # SSE: "data: " and a blank line
        if received != expected:
            raise RuntimeError(f"{path}: {received} bytes for {n} items of {size}")
        best = total if best is None else min(best, total)
    assert best is not None
    return {"items": n, "size": size, "items_per_s": round(n / best), "mb_per_s": None}


def run(ctx: Context) -> dict:
    server = ctx.cpus.server
    calls = 100 if ctx.quick else 400
    rounds = 1 if ctx.quick else 3
    n_small = 5000 if ctx.quick else 20000
    code = util.tempdir("dcf-bench-stream-")
    Path(code, "stream.py").write_text(STREAM)
    util.log("streaming: a gateway (local backend) and a bare uvicorn+Starlette stream")
    bare_port = util.free_port()
    bare = util.spawn(
        [sys.executable, "-m", "bench.streaming", "bare", str(bare_port)],
        cpus=server,
        cwd=util.ROOT,
    )
    gw = Gateway(cpus=server)
    try:
        gw.deploy("stream", code, "stream.py")
        gw.deploy("stream-async", code, "stream.py", handler="AsyncHandler")
        gw.deploy("plain", code, "stream.py", handler="Plain")
        util.wait_for(lambda: _connects(bare_port), 30, "the bare streaming server")
        targets = {
            "gateway-sync": (gw.port, "/function/stream"),
            "gateway-async": (gw.port, "/function/stream-async"),
            "bare": (bare_port, "/stream"),
        }
        out: dict = {"cpus": ctx.cpus.describe(), "calls": calls, "rounds": rounds}
        floor = RawClient(gw.port)
        out["gateway-plain"] = {"ttfi": _ttfi(floor, "/function/plain", calls)}
        floor.close()
        for key, (port, path) in targets.items():
            util.log(f"streaming: {key}")
            client = RawClient(port)
            row: dict = {"ttfi": _ttfi(client, f"{path}?n=2", calls)}
            own = _ttfi(client, f"{path}?n=2&delay=0.005", max(50, calls // 4))
            row["ttfi_after_5ms"] = own
            row["ttfi_over_own_ms"] = round(own["p50_ms"] - 5.0, 3)
            row["small"] = _rate(client, path, n_small, 16, rounds)
            big = _rate(client, path, 400 if ctx.quick else 2000, 64 << 10, rounds)
            big["mb_per_s"] = round(big["items_per_s"] * 64 / 1024, 1)
            row["big"] = big
            if key.startswith("gateway"):
                row["sse"] = _rate(client, path, n_small, 16, rounds, sse=True)
            client.close()
            out[key] = row
        return out
    finally:
        gw.stop()
        util.stop(bare)


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


if __name__ == "__main__" and sys.argv[1:2] == ["bare"]:
    bare_stream(int(sys.argv[2]))
