"""The framing between the gateway and a replica.

HTTP between the two would parse every call twice more; this framing is a fixed
header, a small JSON block and the raw body, sent over one persistent
connection per in-flight call. Shared by the runtime (server side) and the
gateway (client side); it imports neither.

    request:  !II  meta_len body_len | meta {"m","p","q","h"} | body
    response: !HII status meta_len body_len | meta [[name, value], ...] | body
"""

from __future__ import annotations

import asyncio
import json
import struct

REQUEST_HEAD = struct.Struct("!II")
RESPONSE_HEAD = struct.Struct("!HII")

Headers = list[tuple[str, str]]


def encode_request(method: str, path: str, query: str, headers: Headers, body: bytes) -> bytes:
    meta = json.dumps({"m": method, "p": path, "q": query, "h": headers}).encode()
    return REQUEST_HEAD.pack(len(meta), len(body)) + meta + body


async def read_request(reader: asyncio.StreamReader) -> tuple[dict, bytes]:
    """One request frame; raises ``asyncio.IncompleteReadError`` at a clean EOF."""
    meta_len, body_len = REQUEST_HEAD.unpack(await reader.readexactly(REQUEST_HEAD.size))
    meta = json.loads(await reader.readexactly(meta_len))
    body = await reader.readexactly(body_len) if body_len else b""
    return meta, body


def encode_response(status: int, headers: Headers, body: bytes) -> bytes:
    meta = json.dumps(headers).encode() if headers else b""
    return RESPONSE_HEAD.pack(status, len(meta), len(body)) + meta + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, Headers, bytes]:
    status, meta_len, body_len = RESPONSE_HEAD.unpack(await reader.readexactly(RESPONSE_HEAD.size))
    headers = json.loads(await reader.readexactly(meta_len)) if meta_len else []
    body = await reader.readexactly(body_len) if body_len else b""
    return status, headers, body
