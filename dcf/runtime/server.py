"""How a replica is reached: the gateway's framed socket, or plain HTTP when run alone."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl

from dcf import wire
from dcf.runtime.handler import Invoker
from dcf.runtime.request import Request


def make_request(meta: dict, body: bytes, info: dict[str, str]) -> Request:
    return Request(
        input=body,
        method=meta["m"],
        path=meta["p"],
        query=dict(parse_qsl(meta["q"], keep_blank_values=True)) if meta["q"] else {},
        headers=dict(meta["h"]),
        info=info,
    )


async def serve_socket(
    invoker: Invoker,
    address: str,
    info: dict[str, str],
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve the gateway: one call at a time on each of its persistent connections."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                meta, body = await wire.read_request(reader)
                status, headers, out = await invoker(make_request(meta, body, info))
                writer.write(wire.encode_response(status, headers, out))
                if writer.transport.get_write_buffer_size() > 1 << 20:
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    if address.startswith("tcp://"):
        host, port = address[len("tcp://") :].rsplit(":", 1)
        server = await asyncio.start_server(connection, host, int(port), limit=1 << 20)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)
        server = await asyncio.start_unix_server(connection, address, limit=1 << 20)
    if on_ready is not None:
        on_ready()
    async with server:
        await server.serve_forever()


def http_app(invoker: Invoker, info: dict[str, str], ready_file: str | None):
    """A bare ASGI app: every path invokes the handler, except the health endpoints."""

    async def app(scope, receive, send):  # noqa: ANN001 - ASGI signature
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if ready_file:
                        Path(ready_file).touch()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if ready_file:
                        Path(ready_file).unlink(missing_ok=True)
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        if path in ("/_/ready", "/_/health", "/healthz"):
            status, headers, out = 200, [("content-type", "application/json")], b'{"ready":true}'
        else:
            chunks = []
            more = True
            while more:
                message = await receive()
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            meta = {
                "m": scope["method"],
                "p": path,
                "q": scope["query_string"].decode("latin-1"),
                "h": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            }
            status, headers, out = await invoker(make_request(meta, b"".join(chunks), info))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers],
            }
        )
        await send({"type": "http.response.body", "body": out})

    return app
