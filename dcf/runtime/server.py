"""How a replica is reached: the gateway's framed socket, or plain HTTP when run alone."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl

from dcf import tuning, wire
from dcf.runtime.handler import Invoker, Result
from dcf.runtime.request import Request
from dcf.runtime.streaming import Items, Stream, StreamOut, content_type, encode


def make_request(
    method: str, path: str, query: str, headers: wire.Headers, body: bytes, info: dict[str, str]
) -> Request:
    return Request(
        input=body,
        method=method,
        path=path,
        query=dict(parse_qsl(query, keep_blank_values=True)) if query else {},
        headers=dict(headers),
        info=info,
    )


class GatewayConnection(asyncio.BufferedProtocol):
    """Serves the calls the gateway multiplexes on one connection.

    Answers written in the same turn of the loop leave in one write, so a
    replica under load pays one syscall for several calls. With a ``secret``
    (every backend gives one), nothing is served until the peer's first frame proves it knows it.
    """

    HELLO_TIMEOUT = 5.0

    def __init__(self, invoker: Invoker, info: dict[str, str], secret: bytes | None = None) -> None:
        self._invoker = invoker
        self._info = info
        # Until the HELLO, no frame larger than it may be: nothing big is allocated for a
        # peer that has not proven it is the gateway.
        self._reader = wire.BufferedFrameReader(
            wire.REQUEST_HEAD, wire.HELLO_LIMIT if secret is not None else None
        )
        self._outbox: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._secret = secret
        self._unproven = 0  # bytes read before the HELLO
        self._streams: dict[int, StreamOut] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        tuning.tune_socket(transport.get_extra_info("socket"))
        if self._secret is not None:
            self._loop.call_later(self.HELLO_TIMEOUT, self._refuse_if_unproven)

    def _refuse_if_unproven(self) -> None:
        if self._secret is not None and self._transport is not None:
            self._transport.abort()

    def _prove(self, frames: list[tuple], nbytes: int) -> list[tuple]:
        """Frames after a valid HELLO; closes the connection on anything else."""
        self._unproven += nbytes
        if not frames:
            if self._unproven > wire.HELLO_LIMIT and self._transport is not None:
                self._transport.abort()
            return []
        call_id, meta, body = frames[0]
        hello = call_id == 0 and meta.split(b"\n", 1)[0] == wire.HELLO.encode()
        if not (hello and hmac.compare_digest(body, self._secret)):
            if self._transport is not None:
                self._transport.abort()
            return []
        self._secret = None
        return frames[1:]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            frames = self._reader.buffer_updated(nbytes)
        except wire.FrameTooLarge:
            if self._transport is not None:
                self._transport.abort()
            return
        if self._secret is not None:
            frames = self._prove(frames, nbytes)
        self._serve_frames(frames)

    def _serve_frames(self, frames: list[tuple]) -> None:
        invoker = self._invoker
        for call_id, meta, body in frames:
            if meta[0] == wire.CONTROL:
                self._control(call_id, meta, body)
                continue
            request = make_request(*wire.parse_request_meta(meta), body, self._info)
            if invoker.inline:
                self._answer(call_id, invoker.call_now(request), 0)
            else:
                task = self._loop.create_task(self._serve(call_id, request))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _serve(self, call_id: int, request: Request) -> None:
        self._answer(call_id, *await self._invoker.serve(request))

    def _answer(self, call_id: int, result: Result, batch: int) -> None:
        if type(result[2]) is not bytes:
            self._stream(call_id, result)
            return
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox += wire.response_frame(call_id, *result, batch)

    def _stream(self, call_id: int, result: Result) -> None:
        """A generator's answer, item by item, until END (streaming.py)."""
        invoker = self._invoker
        body: Stream = result[2]  # type: ignore[assignment]
        stream = StreamOut(
            self.emit, call_id, (*result[:2], body), invoker.error, invoker.threads, self._flush
        )
        self._streams[call_id] = stream
        task = stream.task = self._loop.create_task(stream.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._streams.pop(call_id, None))

    def _control(self, call_id: int, meta: bytes, body: bytes) -> None:
        """CREDIT or CANCEL from the gateway, for a stream that may have ended meanwhile."""
        stream = self._streams.get(call_id)
        if stream is None:
            return
        if meta == wire.CREDIT:
            stream.grant(body)
        elif meta == wire.CANCEL:
            stream.cancel()

    def emit(self, parts: list[bytes]) -> None:
        """Frames to write with this turn's other answers."""
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox += parts

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(outbox)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        # Nobody is left to read their answers: stop the work instead of finishing it.
        for task in list(self._tasks):
            task.cancel()


async def open_server(
    invoker: Invoker, address: str, info: dict[str, str], secret: bytes | None = None
) -> asyncio.AbstractServer:
    """Listen for the gateway on a unix socket or ``tcp://host:port`` (port 0: any free one)."""
    loop = asyncio.get_running_loop()

    def protocol() -> GatewayConnection:
        return GatewayConnection(invoker, info, secret)

    if address.startswith("tcp://"):
        host, port = address[len("tcp://") :].rsplit(":", 1)
        return await loop.create_server(protocol, host, int(port))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(address)
    server = await loop.create_unix_server(protocol, address)
    os.chmod(address, 0o600)
    return server


async def serve_socket(
    invoker: Invoker,
    address: str,
    info: dict[str, str],
    on_ready: Callable[[], None] | None = None,
    secret: bytes | None = None,
) -> None:
    """Serve the gateway on a unix socket (or ``tcp://host:port``) until cancelled."""
    server = await open_server(invoker, address, info, secret)
    if on_ready is not None:
        on_ready()
    async with server:
        await server.serve_forever()


def http_app(invoker: Invoker, info: dict[str, str], ready_file: str | None):  # noqa: ANN201
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
            request = make_request(
                scope["method"],
                path,
                scope["query_string"].decode("latin-1"),
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
                b"".join(chunks),
                info,
            )
            status, headers, out = await invoker(request)
            if type(out) is not bytes:
                await _send_stream(send, status, headers, out, invoker)
                return
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-length", str(len(out)).encode()),
                    *(
                        (k.encode("latin-1"), v.encode("latin-1"))
                        for k, v in headers
                        if k not in ("content-length", "transfer-encoding")
                    ),
                ],
            }
        )
        await send({"type": "http.response.body", "body": out})

    return app


async def _send_stream(  # noqa: ANN001 - ASGI's send
    send, status: int, headers: wire.Headers, stream: Stream, invoker: Invoker
) -> None:
    """A generator's items as HTTP chunks, when the replica is run alone (no gateway, no credit)."""
    items = Items(stream.source, invoker.threads)
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    started = False
    try:
        while True:
            item = await items.next()
            if items.done:
                break
            data = encode(item)
            if not started:
                started = True
                if not any(k == b"content-type" for k, _ in raw):
                    raw.append((b"content-type", content_type(item).encode()))
                await send({"type": "http.response.start", "status": status, "headers": raw})
            await send({"type": "http.response.body", "body": data, "more_body": True})
        if not started:
            await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await items.close()
