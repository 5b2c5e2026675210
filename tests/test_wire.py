"""The buffered frame reader: any split of the stream, bodies larger than its buffer,
the first-frame limit; and a real replica reading through it."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcf import wire


def _read_all(reader: wire.BufferedFrameReader, stream: bytes, sizes: list[int]) -> list:
    """What an event loop does: fill the buffer it is given, say how much, again."""
    rng = random.Random(3)
    got, pos = [], 0
    while pos < len(stream):
        view = reader.get_buffer(-1)
        n = min(len(view), rng.choice(sizes), len(stream) - pos)
        view[:n] = stream[pos : pos + n]
        pos += n
        got.extend(reader.buffer_updated(n))
    return got


@pytest.mark.parametrize("sizes", [[1], [7, 13, 100], [65_536, 65_537, 200_000, 1 << 20]])
def test_frames_survive_any_split_and_bodies_larger_than_the_buffer(
    sizes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A low ceiling, so that the gathered path (bodies too large to preallocate) runs too.
    monkeypatch.setattr(wire, "PREALLOCATE_MAX", 400_000)
    rng = random.Random(11)
    sent = []
    lengths = [0, 5, 65_535, 65_536, 70_000, wire.BUFFER + 1, 300_000, 700_000]
    count = 12 if sizes == [1] else 80  # byte by byte is slow: fewer frames
    for call_id in range(1, count):
        body = rng.randbytes(rng.choice(lengths if sizes != [1] else lengths[:5]))
        sent.append((call_id, 200 + call_id % 3, call_id % 5, [("x-a", "b:c"), ("k", "")], body))
    stream = b"".join(b"".join(wire.response_frame(i, s, h, b, n)) for i, s, n, h, b in sent)
    got = _read_all(wire.BufferedFrameReader(wire.RESPONSE_HEAD), stream, sizes)
    assert [(i, s, n, wire.parse_response_meta(m), b) for i, s, n, m, b in got] == sent
    assert all(type(frame[-1]) is bytes for frame in got)


def test_only_the_first_frame_is_held_to_the_limit() -> None:
    hello = b"".join(wire.hello_frame(b"s" * 32))
    big = b"".join(wire.request_frame(1, "POST", "/", "", [], b"x" * 100_000))
    got = _read_all(wire.BufferedFrameReader(wire.REQUEST_HEAD, 4096), hello + big, [50_000])
    assert [len(frame[-1]) for frame in got] == [32, 100_000]
    reader = wire.BufferedFrameReader(wire.REQUEST_HEAD, 4096)
    with pytest.raises(wire.FrameTooLarge):
        _read_all(reader, big, [50_000])


ECHO = "async def Handler(req):\n    return req.input\n"


def _replica(tmp_path: Path, secret: bytes) -> tuple[subprocess.Popen, str]:
    (tmp_path / "handler.py").write_text(ECHO)
    address = str(tmp_path / "replica.sock")
    read_fd, write_fd = os.pipe()
    os.write(write_fd, secret)
    os.close(write_fd)
    env = {
        **os.environ,
        "HANDLER_DIR": str(tmp_path),
        "DCF_LISTEN": address,
        "DCF_SECRET_FD": str(read_fd),
    }
    proc = subprocess.Popen([sys.executable, "-m", "dcf.runtime"], env=env, pass_fds=(read_fd,))
    os.close(read_fd)
    deadline = time.monotonic() + 30
    while not os.path.exists(address):
        assert time.monotonic() < deadline and proc.poll() is None, "the replica did not listen"
        time.sleep(0.05)
    return proc, address


def _answers(sock: socket.socket, count: int) -> dict[int, bytes]:
    reader = wire.FrameReader(wire.RESPONSE_HEAD)
    out: dict[int, bytes] = {}
    while len(out) < count:
        data = sock.recv(1 << 20)
        assert data, "the replica closed the connection"
        for call_id, status, _batch, _meta, body in reader.feed(data):
            assert status == 200
            out[call_id] = body
    return out


def test_a_real_replica_reads_large_and_split_frames(tmp_path: Path) -> None:
    secret = os.urandom(32)
    proc, address = _replica(tmp_path, secret)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(address)
            sock.settimeout(30)
            lengths = [0, 10, 65_535, 65_536, 300_000, 700_000, 3_000_000, 5]
            bodies = {i + 1: os.urandom(n) for i, n in enumerate(lengths)}
            stream = b"".join(wire.hello_frame(secret))
            for call_id, body in bodies.items():
                stream += b"".join(wire.request_frame(call_id, "POST", "/", "", [], body))
            rng = random.Random(5)
            pos = 0
            while pos < len(stream):  # in pieces that cut heads, metas and bodies anywhere
                step = rng.choice([1, 3, 11, 4096, 70_000, 1 << 20])
                sock.sendall(stream[pos : pos + step])
                pos += step
            assert _answers(sock, len(bodies)) == bodies
    finally:
        proc.kill()
        proc.wait()


def test_a_real_replica_closes_on_an_oversized_first_frame(tmp_path: Path) -> None:
    secret = os.urandom(32)
    proc, address = _replica(tmp_path, secret)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(address)
            sock.settimeout(10)
            # A head claiming a 1 GB body, before any HELLO: nothing is allocated for it.
            sock.sendall(wire.REQUEST_HEAD.pack(1, 4, 1 << 30) + b"POST")
            assert sock.recv(100) == b""
        with socket.socket(socket.AF_UNIX) as sock:  # and the replica serves on
            sock.connect(address)
            sock.settimeout(10)
            stream = b"".join(wire.hello_frame(secret))
            stream += b"".join(wire.request_frame(1, "POST", "/", "", [], b"still here"))
            sock.sendall(stream)
            assert _answers(sock, 1) == {1: b"still here"}
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
