"""Load generators: ``wrk`` (C, preferred) and a small asyncio one (HTTP/1.1 or DCF's framing).

Both keep every connection alive and send the next request as soon as the
answer arrives (closed loop), and report the same fields: ``rps``, ``p50_ms``,
``p90_ms``, ``p99_ms``, ``requests``, ``errors`` (transport errors plus non-2xx
answers) and ``generator``.

The asyncio generator also runs as ``python -m bench.loadgen`` so that it can be
pinned to a core of its own; it speaks DCF's gateway↔replica framing
(``dcf.wire``) for calling a replica's socket directly, which wrk cannot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from bench import util

WRK_MARK = "WRKJSON "
PY_MARK = "PYGENJSON "

_LUA = r"""
local paths = {%(paths)s}
local bodies = {}
for i, p in ipairs(paths) do
  local f = assert(io.open(p, "rb"))
  bodies[i] = f:read("*a")
  f:close()
end
local extra = {%(extra)s}
wrk.method = "POST"
wrk.headers["Content-Type"] = "%(ctype)s"
if #bodies == 1 and #extra == 0 then
  wrk.body = bodies[1]
else
  local reqs = {}
  local n = 0
  init = function(args)
    for i, b in ipairs(bodies) do
      local headers = {["Content-Type"] = "%(ctype)s"}
      for k, v in pairs(extra[i] or {}) do headers[k] = v end
      reqs[i] = wrk.format("POST", nil, headers, b)
    end
  end
  request = function()
    n = n + 1
    return reqs[(n %% #reqs) + 1]
  end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests": %%d, "duration_us": %%d, "bytes": %%d, "connect": %%d, "read": %%d, '
    .. '"write": %%d, "status": %%d, "timeout": %%d, "p50_us": %%d, "p90_us": %%d, '
    .. '"p99_us": %%d, "mean_us": %%.1f, "max_us": %%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


class Generator:
    """Runs load against a URL (or a replica socket) with wrk or the asyncio generator."""

    def __init__(self, cpus: set[int] | None, prefer_wrk: bool = True) -> None:
        self.cpus = cpus
        self.use_wrk = prefer_wrk and have_wrk()
        self._dir = util.tempdir("dcf-bench-load-")
        self._files: dict[bytes, str] = {}

    @property
    def name(self) -> str:
        return "wrk -t1" if self.use_wrk else "python asyncio generator"

    def _body_file(self, body: bytes) -> str:
        path = self._files.get(body)
        if path is None:
            path = os.path.join(self._dir, f"body{len(self._files)}.bin")
            Path(path).write_bytes(body)
            self._files[body] = path
        return path

    def run(
        self,
        url: str,
        conns: int,
        duration: float,
        bodies: Sequence[bytes],
        warmup: float = 1.0,
        python: bool = False,
        ctype: str = "application/octet-stream",
        headers: Sequence[dict[str, str]] = (),
    ) -> dict:
        """Closed-loop load for ``duration`` s after ``warmup`` s; ``url`` may be ``unix:PATH``
        (a replica's framed socket, asyncio generator only). ``headers``: more headers for
        each body, in order (wrk only: Triton's binary tensors need one per body)."""
        files = [self._body_file(b) for b in bodies]
        if url.startswith("unix:") or python or not self.use_wrk:
            return self._python(url, conns, duration, files, warmup)
        if warmup > 0:
            self._wrk(url, conns, warmup, files, ctype, headers)
        return self._wrk(url, conns, duration, files, ctype, headers)

    def _wrk(
        self,
        url: str,
        conns: int,
        duration: float,
        files: list[str],
        ctype: str,
        headers: Sequence[dict[str, str]] = (),
    ) -> dict:
        key = (tuple(files), ctype, json.dumps(list(headers)))
        script = os.path.join(self._dir, f"post{abs(hash(key))}.lua")
        if not os.path.exists(script):
            paths = ", ".join(json.dumps(f) for f in files)
            extra = ", ".join(
                "{" + ", ".join(f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in h.items()) + "}"
                for h in headers
            )
            Path(script).write_text(
                _LUA % {"paths": paths, "ctype": ctype, "mark": WRK_MARK, "extra": extra}
            )
        cmd = [
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "30s",
            "-s",
            script,
            url,
        ]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None,
            timeout=duration + 60,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(WRK_MARK)), None)
        if line is None:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        raw = json.loads(line[len(WRK_MARK) :])
        seconds = raw["duration_us"] / 1e6
        errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
        return {
            "generator": "wrk",
            "conns": conns,
            "duration_s": round(seconds, 2),
            "requests": raw["requests"],
            "rps": round(raw["requests"] / seconds, 1) if seconds else 0.0,
            "p50_ms": raw["p50_us"] / 1000,
            "p90_ms": raw["p90_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000,
            "mean_ms": round(raw["mean_us"] / 1000, 3),
            "max_ms": raw["max_us"] / 1000,
            "errors": errors,
            "non_2xx": raw["status"],
        }

    def _python(
        self, url: str, conns: int, duration: float, files: list[str], warmup: float
    ) -> dict:
        cmd = [
            sys.executable,
            "-m",
            "bench.loadgen",
            url,
            "--conns",
            str(conns),
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
        ]
        for f in files:
            cmd += ["--body-file", f]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None,
            timeout=duration + warmup + 60,
            cwd=util.ROOT,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(PY_MARK)), None)
        if line is None:
            raise RuntimeError(f"load generator failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return json.loads(line[len(PY_MARK) :])


# -- the asyncio generator ----------------------------------------------------------------------


class _HttpCodec:
    """HTTP/1.1 requests, pre-encoded; answers framed by Content-Length or chunked."""

    slots_per_conn = 1

    def __init__(self, url: str, bodies: list[bytes]) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.requests = [
            (
                f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(b)}\r\n\r\n"
            ).encode()
            + b
            for b in bodies
        ]

    def request(self, slot: int, n: int) -> bytes:
        return self.requests[n % len(self.requests)]

    def answers(self, buf: bytearray) -> list[tuple[int, int]]:
        out = []
        while True:
            status = self._one(buf)
            if status is None:
                return out
            out.append((-1, status))  # one call per connection: its only slot

    @staticmethod
    def _one(buf: bytearray) -> int | None:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buf[:end]).lower()
        status = int(head[9:12])
        start = end + 4
        idx = head.find(b"\ncontent-length:")
        if idx >= 0:
            stop = head.find(b"\r", idx + 16)
            length = int(head[idx + 16 : stop if stop >= 0 else None])
            if len(buf) < start + length:
                return None
            del buf[: start + length]
            return status
        if b"transfer-encoding: chunked" in head:
            pos = start
            while True:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    return None
                size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
                pos = line_end + 2 + size + 2
                if len(buf) < pos:
                    return None
                if size == 0:
                    del buf[:pos]
                    return status
        del buf[:start]
        return status


class _FramedCodec:
    """DCF's gateway↔replica framing, whichever version ``dcf.wire`` has.

    With call ids (a multiplexed protocol) all calls share one connection, as the
    gateway's do; otherwise each connection carries one call at a time.
    """

    def __init__(self, bodies: list[bytes], conns: int) -> None:
        from dcf import wire

        self.wire = wire
        self.mux = hasattr(wire, "request_frame")
        self.head = wire.RESPONSE_HEAD
        self.bodies = bodies
        self.slots_per_conn = conns if self.mux else 1
        self._cache: dict[tuple[int, int], bytes] = {}

    def request(self, slot: int, n: int) -> bytes:
        key = (slot, n % len(self.bodies))
        frame = self._cache.get(key)
        if frame is None:
            headers = [("content-type", "application/octet-stream")]
            body = self.bodies[key[1]]
            if self.mux:
                parts = self.wire.request_frame(slot, "POST", "/", "", headers, body)
                frame = b"".join(parts)
            else:
                frame = self.wire.encode_request("POST", "/", "", headers, body)
            self._cache[key] = frame
        return frame

    def answers(self, buf: bytearray) -> list[tuple[int, int]]:
        out = []
        size = self.head.size
        pos = 0
        while len(buf) - pos >= size:
            fields = self.head.unpack_from(buf, pos)
            stop = pos + size + fields[-2] + fields[-1]
            if stop > len(buf):
                break
            # (call_id, status, ...) with call ids; (status, ...) without.
            out.append((fields[0], fields[1]) if self.mux else (-1, fields[0]))
            pos = stop
        if pos:
            del buf[:pos]
        return out


class _Conn(asyncio.Protocol):
    """One keep-alive connection with ``slots`` calls in flight, each resent on its answer."""

    def __init__(self, load: _Load, codec, first_slot: int) -> None:  # noqa: ANN001
        self.load = load
        self.codec = codec
        self.slots = range(first_slot, first_slot + codec.slots_per_conn)
        self.active = len(self.slots)
        self.starts: dict[int, int] = {}
        self.n = first_slot
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.finished = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:  # noqa: ANN001
        self.transport = transport
        for slot in self.slots:
            self._send(slot)

    def connection_lost(self, exc) -> None:  # noqa: ANN001
        if not self.finished.done():
            self.load.errors += 1
            self.finished.set_result(None)

    def _send(self, slot: int) -> None:
        if self.load.stopped:
            self.active -= 1
            if not self.active and not self.finished.done():
                self.finished.set_result(None)
                self.transport.close()
            return
        self.n += 1
        self.starts[slot] = time.perf_counter_ns()
        self.transport.write(self.codec.request(slot, self.n))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        answers = self.codec.answers(self.buf)
        if not answers:
            return
        now = time.perf_counter_ns()
        slots = [self.slots[0] if slot < 0 else slot for slot, _ in answers]
        for slot, (_, status) in zip(slots, answers, strict=True):
            self.load.record(now - self.starts[slot], status)
        for slot in slots:
            self._send(slot)


class _Load:
    def __init__(self) -> None:
        self.stopped = False
        self.recording = False
        self.latencies: list[int] = []
        self.errors = 0
        self.non_2xx = 0

    def record(self, ns: int, status: int) -> None:
        if not self.recording:
            return
        self.latencies.append(ns)
        if not 200 <= status < 300:
            self.non_2xx += 1


async def _run(url: str, conns: int, duration: float, warmup: float, bodies: list[bytes]) -> dict:
    loop = asyncio.get_running_loop()
    framed = url.startswith("unix:")
    codec = _FramedCodec(bodies, conns) if framed else _HttpCodec(url, bodies)
    load = _Load()
    protocols = []
    for first in range(0, conns, codec.slots_per_conn):
        if framed:
            _, proto = await loop.create_unix_connection(
                lambda first=first: _Conn(load, codec, first), url[len("unix:") :]
            )
        else:
            _, proto = await loop.create_connection(
                lambda first=first: _Conn(load, codec, first), codec.host, codec.port
            )
        protocols.append(proto)
    await asyncio.sleep(warmup)
    load.recording = True
    start = time.perf_counter()
    await asyncio.sleep(duration)
    load.recording = False
    elapsed = time.perf_counter() - start
    load.stopped = True
    await asyncio.wait([p.finished for p in protocols], timeout=30)
    ms = sorted(x / 1e6 for x in load.latencies)
    kind = "python-framed" + ("-mux" if framed and codec.mux else "") if framed else "python-http"
    return {
        "generator": kind,
        "conns": conns,
        "duration_s": round(elapsed, 2),
        "requests": len(ms),
        "rps": round(len(ms) / elapsed, 1),
        "p50_ms": round(util.percentile(ms, 50) or 0, 4),
        "p90_ms": round(util.percentile(ms, 90) or 0, 4),
        "p99_ms": round(util.percentile(ms, 99) or 0, 4),
        "mean_ms": round(sum(ms) / len(ms), 4) if ms else None,
        "max_ms": round(ms[-1], 3) if ms else None,
        "errors": load.errors + load.non_2xx,
        "non_2xx": load.non_2xx,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url", help="http://HOST:PORT/PATH or unix:SOCKET (DCF framing)")
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--body-file", action="append", default=[])
    parser.add_argument("--body-size", type=int, default=100)
    args = parser.parse_args()
    bodies = [Path(f).read_bytes() for f in args.body_file] or [b"x" * args.body_size]
    coro = _run(args.url, args.conns, args.duration, args.warmup, bodies)
    try:
        import uvloop

        result = uvloop.run(coro)
    except ImportError:
        result = asyncio.run(coro)
    print(PY_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
