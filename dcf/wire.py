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
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

REQUEST_HEAD = struct.Struct("!III")
RESPONSE_HEAD = struct.Struct("!IHHII")

Headers = list[tuple[str, str]]


def request_frame(
    call_id: int, method: str, path: str, query: str, headers: Headers, body: bytes
) -> list[bytes]:
    """The frame as parts for ``transport.writelines``: the body is never copied."""
    lines = [method, path, query]
    lines.extend(f"{k}:{v}" for k, v in headers)
    meta = "\n".join(lines).encode("latin-1")
    return [REQUEST_HEAD.pack(call_id, len(meta), len(body)), meta, body]


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


class FrameReader:
    """Cuts a byte stream into frames of one kind (request or response)."""

    def __init__(self, head: struct.Struct) -> None:
        self._head = head
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple]:
        """Yield ``(*head_fields_but_lengths, meta, body)`` for every complete frame."""
        buffer = self._buffer
        buffer += data
        head = self._head
        size = head.size
        start = 0
        end = len(buffer)
        while end - start >= size:
            fields = head.unpack_from(buffer, start)
            meta_len, body_len = fields[-2], fields[-1]
            meta_at = start + size
            body_at = meta_at + meta_len
            stop = body_at + body_len
            if stop > end:
                break
            yield (*fields[:-2], bytes(buffer[meta_at:body_at]), bytes(buffer[body_at:stop]))
            start = stop
        if start:
            del buffer[:start]
