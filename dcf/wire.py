"""The framing between the gateway and a replica.

HTTP between the two would parse every call twice more. Instead the gateway
keeps one connection per replica and multiplexes its calls on it, each frame
tagged with a call id: calls that are in flight together share reads and
writes (one syscall and one wake-up for several calls under load), and a call
that times out is simply forgotten, without closing anything.

    request:  !III  call_id meta_len body_len | meta | body
              meta = method \\n path \\n query (\\n name:value)*
    response: !IHHII call_id status batch meta_len body_len | meta | body
              meta = name:value (\\n name:value)*
              batch = size of the batch this call closed (0: none), for the metrics

Header names and values never hold a newline (HTTP forbids it; ``render``
strips any a handler returns). Shared by the runtime and the gateway; it
imports neither.

Call id 0 is never a call. On every connection, TCP or unix socket (another
replica of the same OS user can reach a socket in the gateway's directory),
the first frame must be a HELLO with call id 0 whose body is the secret the
gateway gave this replica; a replica closes any connection that opens otherwise.
"""

from __future__ import annotations

import contextlib
import struct

REQUEST_HEAD = struct.Struct("!III")
RESPONSE_HEAD = struct.Struct("!IHHII")

Headers = list[tuple[str, str]]

HELLO = "HELLO"
HELLO_LIMIT = 4096
"""Bytes a replica reads from a connection before it must have said HELLO."""


def request_frame(
    call_id: int, method: str, path: str, query: str, headers: Headers, body: bytes
) -> list[bytes]:
    """The frame as parts for ``transport.writelines``: the body is never copied."""
    lines = [method, path, query]
    lines.extend(f"{k}:{v}" for k, v in headers)
    meta = "\n".join(lines).encode("latin-1")
    return [REQUEST_HEAD.pack(call_id, len(meta), len(body)), meta, body]


def hello_frame(secret: bytes) -> list[bytes]:
    """The first frame on every connection: proves the peer is this replica's gateway."""
    return request_frame(0, HELLO, "", "", [], secret)


def parse_request_meta(meta: bytes) -> tuple[str, str, str, Headers]:
    method, path, query, *lines = meta.decode("latin-1").split("\n")
    return method, path, query, _headers(lines)


def response_frame(
    call_id: int, status: int, headers: Headers, body: bytes, batch: int = 0
) -> list[bytes]:
    meta = "\n".join(f"{k}:{v}" for k, v in headers).encode("latin-1")
    return [RESPONSE_HEAD.pack(call_id, status, batch, len(meta), len(body)), meta, body]


def parse_response_meta(meta: bytes) -> Headers:
    return _headers(meta.decode("latin-1").split("\n")) if meta else []


def _headers(lines: list[str]) -> Headers:
    out = []
    for line in lines:
        name, _, value = line.partition(":")
        out.append((name, value))
    return out


LARGE_BODY = 64 << 10


class FrameReader:
    """Cuts a byte stream into frames of one kind (request or response).

    Small frames are cut from one buffer. A large body (an image, say) is kept
    as the chunks it arrived in and joined once when complete, so its bytes
    are copied once rather than on every chunk.
    """

    def __init__(self, head: struct.Struct) -> None:
        self._head = head
        self._buffer = bytearray()
        self._need = head.size  # bytes that must be buffered before parsing can progress
        self._large: tuple | None = None  # (head fields, meta) of the large body under way
        self._chunks: list[bytes] = []
        self._missing = 0

    def feed(self, data: bytes) -> list[tuple]:
        """``(*head_fields_but_lengths, meta, body)`` for every frame completed by ``data``."""
        frames: list[tuple] = []
        if self._large is not None:
            if len(data) < self._missing:
                self._chunks.append(data)
                self._missing -= len(data)
                return frames
            self._chunks.append(data[: self._missing])
            frames.append((*self._large, b"".join(self._chunks)))
            data = data[self._missing :]
            self._large, self._chunks = None, []
            if not data:
                return frames
        buffer = self._buffer
        buffer += data
        end = len(buffer)
        if end < self._need:
            return frames
        head = self._head
        size = head.size
        start = 0
        with memoryview(buffer) as view:  # slices of a view copy once, not twice
            while end - start >= size:
                fields = head.unpack_from(buffer, start)
                meta_at = start + size
                body_at = meta_at + fields[-2]
                stop = body_at + fields[-1]
                if stop > end:
                    if fields[-1] >= LARGE_BODY and body_at <= end:
                        self._large = (*fields[:-2], bytes(view[meta_at:body_at]))
                        self._chunks = [bytes(view[body_at:end])]
                        self._missing = stop - end
                        start = stop = end
                    break
                frames.append(
                    (*fields[:-2], bytes(view[meta_at:body_at]), bytes(view[body_at:stop]))
                )
                start = stop
        self._need = size if end - start < size else stop - start
        if start:
            del buffer[:start]
        return frames


BUFFER = 256 << 10
"""What one read may fill (uvloop's own read buffer is as large)."""
PREALLOCATE_MAX = 64 << 20
"""Largest body read straight into a buffer of its size; a larger one is gathered as it
comes (a header alone must not make a process allocate gigabytes)."""


class FrameTooLarge(ValueError):
    """A frame larger than the reader's ``limit``: the connection must end."""


class BufferedFrameReader:
    """Cuts frames out of what an ``asyncio.BufferedProtocol`` reads, with fewer copies.

    ``FrameReader`` gets each read as a new bytes object (the event loop copies it out of
    its own buffer) and joins a large body's chunks at the end: three copies of every
    body byte. Here the kernel writes small frames into one reusable buffer and a large
    body straight into a buffer of the body's size, which becomes the frame's bytes with
    one more copy: two. ``get_buffer``/``buffer_updated`` are the protocol's two calls.

    ``first_limit``: the largest first frame accepted (None: any), e.g. a HELLO before
    a connection has proven it is the gateway's; a larger one raises
    :class:`FrameTooLarge`. Later frames have no limit.
    """

    def __init__(self, head: struct.Struct, first_limit: int | None = None) -> None:
        self._head = head
        self._limit = first_limit
        self._buffer = bytearray(BUFFER)
        self._start = 0  # unparsed bytes are _buffer[_start:_end]
        self._end = 0
        self._need = head.size  # bytes from _start the next frame needs before it can progress
        self._large: tuple | None = None  # (head fields, meta) of the large body under way
        self._body: bytearray | None = None  # the large body, filled in place
        self._filled = 0
        self._chunks: list[bytes] | None = None  # a body beyond PREALLOCATE_MAX, as it came
        self._missing = 0
        self._view: memoryview | None = None

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next read goes: the large body's rest, or the buffer's free end."""
        self._release()
        if self._body is not None:
            view = memoryview(self._body)[self._filled :]
        else:
            free = len(self._buffer) - self._end
            pending = self._end - self._start
            if free < max(self._need - pending, BUFFER // 4):
                # A fresh buffer, not a resize: the loop may still hold the old one's view.
                size = max(BUFFER, 2 * max(self._need, pending))
                fresh = bytearray(size)
                fresh[:pending] = self._buffer[self._start : self._end]
                self._buffer, self._start, self._end = fresh, 0, pending
            view = memoryview(self._buffer)[self._end :]
        self._view = view
        return view

    def _release(self) -> None:
        # The loop holds the view until buffer_updated returns (uvloop does): released at
        # the next get_buffer, and a buffer is never resized, only replaced.
        if self._view is not None:
            with contextlib.suppress(BufferError):
                self._view.release()
            self._view = None

    def buffer_updated(self, nbytes: int) -> list[tuple]:
        """``(*head_fields_but_lengths, meta, body)`` for every frame these bytes completed."""
        if self._body is not None:
            self._filled += nbytes
            if self._filled < len(self._body):
                return []
            frame = (*self._large, bytes(self._body))  # type: ignore[misc]
            self._large, self._body = None, None
            return [frame]
        self._end += nbytes
        if self._chunks is not None:
            return self._gather()
        return self._parse()

    def _gather(self) -> list[tuple]:
        """The rest of a body too large to preallocate, from the buffer, read by read."""
        chunks = self._chunks
        assert chunks is not None
        take = min(self._missing, self._end - self._start)
        chunks.append(bytes(self._buffer[self._start : self._start + take]))
        self._start += take
        self._missing -= take
        if self._missing:
            self._start = self._end = 0
            return []
        frames = [(*self._large, b"".join(chunks))]  # type: ignore[misc]
        self._large, self._chunks = None, None
        self._need = self._head.size
        return frames + self._parse()

    def _parse(self) -> list[tuple]:
        frames: list[tuple] = []
        buffer, start, end = self._buffer, self._start, self._end
        head = self._head
        size = head.size
        while end - start >= size:
            fields = head.unpack_from(buffer, start)
            length = size + fields[-2] + fields[-1]
            if self._limit is not None:
                if length > self._limit:
                    raise FrameTooLarge(f"a frame of {length} bytes, over {self._limit}")
                self._limit = None
            meta_at = start + size
            body_at = meta_at + fields[-2]
            stop = start + length
            if stop <= end:
                frames.append(
                    (*fields[:-2], bytes(buffer[meta_at:body_at]), bytes(buffer[body_at:stop]))
                )
                start = stop
                continue
            if fields[-1] >= LARGE_BODY and body_at <= end:
                self._large = (*fields[:-2], bytes(buffer[meta_at:body_at]))
                have = end - body_at
                if fields[-1] <= PREALLOCATE_MAX:
                    body = self._body = bytearray(fields[-1])
                    body[:have] = buffer[body_at:end]
                    self._filled = have
                else:
                    self._chunks = [bytes(buffer[body_at:end])]
                    self._missing = fields[-1] - have
                self._start = self._end = 0
                self._need = size
                return frames
            # Until its meta is in: a large body then gets a buffer of its own.
            self._need = length if fields[-1] < LARGE_BODY else body_at - start
            break
        else:
            self._need = size
        if start == end:
            start = end = 0
        self._start, self._end = start, end
        return frames


# Streamed answers -------------------------------------------------------------
#
# A handler that yields answers with several response frames, all with
# ``batch == STREAM`` (a batch never streams, so the batch branch is the only one
# that looks): first an OPEN frame (``status`` is the HTTP status, meta the
# headers), then ITEM frames (one item each), then END (body empty) or ERROR
# (body: the error as JSON). The gateway grants credit for items with CREDIT
# control frames (a replica keeps at most ``STREAM_WINDOW_ITEMS`` items or
# ``STREAM_WINDOW_BYTES`` bytes unacknowledged, one item always) and asks the
# replica to stop with CANCEL; a replica answers CANCEL with END. Control frames
# are request frames whose meta starts with ``CONTROL``.

STREAM = 0xFFFF
ITEM, END, ERROR = 1, 2, 3
"""Kinds of stream frames after the OPEN one (an HTTP status is never below 100)."""

CONTROL = ord("!")
CREDIT = b"!credit"
CANCEL = b"!cancel"
CREDIT_BODY = struct.Struct("!II")  # items, bytes consumed

STREAM_WINDOW_ITEMS = 256
STREAM_WINDOW_BYTES = 1 << 20


def stream_open_frame(call_id: int, status: int, headers: Headers) -> list[bytes]:
    return response_frame(call_id, status, headers, b"", STREAM)


def stream_frame(call_id: int, kind: int, body: bytes = b"") -> list[bytes]:
    """An ITEM, END or ERROR frame."""
    return [RESPONSE_HEAD.pack(call_id, kind, STREAM, 0, len(body)), b"", body]


def control_frame(call_id: int, kind: bytes, body: bytes = b"") -> list[bytes]:
    """A CREDIT or CANCEL frame, gateway to replica."""
    return [REQUEST_HEAD.pack(call_id, len(kind), len(body)), kind, body]
