"""Streamed answers in the gateway: from a replica's stream frames to the caller.

A streamed answer (``wire``'s stream frames) arrives as a ``StreamIn``, the
body of the call's result. The gateway keeps at most the replica's window of
unread items per call, and grants credit as its caller takes them, so a slow
caller slows the handler's generator instead of filling memory. The call's
replica slot stays taken until the replica's END: a caller that leaves, or a
stream past its function's timeout or idle for too long, is cancelled on the
replica (its generator's ``finally`` runs) and its slot freed when that is done.

Out of the gateway a stream is HTTP chunked transfer, or Server-Sent Events for
a caller that accepts ``text/event-stream``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from dcf import wire

if TYPE_CHECKING:
    from dcf.gateway.observe.metrics import Metrics

IDLE = 60.0
"""Seconds a stream may go without an item, unless its function's ``stream_idle_timeout``
says otherwise (never more than its function's timeout)."""

COALESCE = 256 << 10
"""Bytes of items already arrived that leave in one write (one chunk) rather than one each."""
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
SSE = "text/event-stream"


class StreamCut(Exception):
    """The stream ended before its END: ``reason`` is error, timeout, idle or disconnect."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Channel(Protocol):
    def control(self, call_id: int, kind: bytes, body: bytes = b"") -> None: ...


class StreamIn:
    """A streamed answer arriving on a replica channel; read it with ``next``."""

    def __init__(self, channel: Channel, call_id: int) -> None:
        self._channel = channel
        self._call_id = call_id
        self._items: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._cut: StreamCut | None = None  # stopped here: unread items are dropped
        self._failure: StreamCut | None = None  # failed on the replica, after the items it sent
        self._release: Callable[[], None] | None = None
        self._unacked_items = 0
        self._unacked_bytes = 0
        self.deadline = float("inf")
        """When the function's timeout cuts it (monotonic)."""
        self.timeout = 0.0
        self.idle = IDLE
        self.items = 0

    # the replica channel's side -------------------------------------------------

    def push(self, item: bytes) -> None:
        if self._cut is not None:
            return
        self._items.append(item)
        if len(self._items) > wire.STREAM_WINDOW_ITEMS + 1:  # the replica ignores its credit
            self.cancel(StreamCut("error", "the replica sent more items than it was granted"))
        self._wake()

    def end(self, error: bytes | str | None = None) -> None:
        """END (``error`` None), ERROR (the replica's JSON error), or the connection lost."""
        if not self._ended:
            self._ended = True
            if error is not None:
                self._failure = StreamCut("error", _message(error))
            self._wake()
        release, self._release = self._release, None
        if release is not None:
            release()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # the pool's side ----------------------------------------------------------------

    def hold(
        self, release: Callable[[], None], started: float, timeout: float, idle: float = IDLE
    ) -> None:
        """Run ``release`` (free the replica's slot) once the replica has ended the stream;
        until then it is cut past ``timeout`` in all, or ``idle`` seconds without an item."""
        self.deadline = started + timeout
        self.timeout = timeout
        self.idle = idle
        if self._ended:
            release()
        else:
            self._release = release

    # the reader's side --------------------------------------------------------------

    async def next(self) -> bytes | None:
        """The next item, None after the last; StreamCut when it ends otherwise."""
        while True:
            if self._items and self._cut is None:
                return self._items.popleft()
            if self._cut is not None:
                raise self._cut
            if self._ended:
                if self._failure is not None:
                    raise self._failure
                return None
            idle = min(self.idle, self.timeout) if self.timeout else self.idle
            left = self.deadline - time.monotonic()
            if left <= 0:
                self._expire(idle, timeout=True)
                continue
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, min(left, idle))
            except asyncio.TimeoutError:
                # Which bound it was, as chosen: a timer may fire a little early.
                self._expire(idle, timeout=left <= idle)
            finally:
                self._waiter = None

    def take(self) -> bytes | None:
        """The next item if it is here already, without waiting (to send several as one)."""
        if self._items and self._cut is None:
            return self._items.popleft()
        return None

    def _expire(self, idle: float, timeout: bool) -> None:
        if timeout:
            message = f"the stream did not end within {self.timeout:g}s (the function's timeout)"
            self.cancel(StreamCut("timeout", message))
        else:
            self.cancel(StreamCut("idle", f"the stream sent nothing for {idle:g}s"))

    def consumed(self, count: int, size: int) -> None:
        """The caller took ``count`` items, ``size`` bytes: grant the replica credit for more."""
        self.items += count
        items = self._unacked_items = self._unacked_items + count
        size = self._unacked_bytes = self._unacked_bytes + size
        if (
            not self._items
            or items >= wire.STREAM_WINDOW_ITEMS // 2
            or size >= wire.STREAM_WINDOW_BYTES // 2
        ) and not self._ended:
            self._unacked_items = self._unacked_bytes = 0
            self._channel.control(self._call_id, wire.CREDIT, wire.CREDIT_BODY.pack(items, size))

    def cancel(self, cut: StreamCut | None = None) -> None:
        """Stop the stream: the replica closes its generator; unread items are dropped."""
        if self._cut is None:
            self._cut = cut or StreamCut("disconnect", "the caller went away")
        self._items.clear()
        if not self._ended:
            self._channel.control(self._call_id, wire.CANCEL)
        self._wake()


def _message(error: bytes | str) -> str:
    if isinstance(error, str):
        return error
    try:
        return str(json.loads(error)["error"])
    except (ValueError, KeyError, TypeError):
        return error.decode(errors="replace")


# out of the gateway -----------------------------------------------------------------------


def wants_sse(scope: dict) -> bool:
    for key, value in scope["headers"]:
        if key == b"accept":
            return SSE.encode() in value.lower()
    return False


def sse_event(item: bytes, event: str | None = None) -> bytes:
    """One item as an SSE event: a ``data:`` line for each of its lines."""
    text = item.decode("utf-8", errors="replace")
    if text.endswith("\n"):
        text = text[:-1]
    lines = [f"event: {event}"] if event else []
    lines.extend(f"data: {line}" for line in text.splitlines() or [""])
    return ("\n".join(lines) + "\n\n").encode()


async def _gone(receive) -> None:  # noqa: ANN001 - ASGI
    """Returns once the caller has disconnected (the request body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def relay(
    send,  # noqa: ANN001 - ASGI
    receive,  # noqa: ANN001
    scope: dict,
    function: str,
    status: int,
    headers: wire.Headers,
    stream: StreamIn,
    metrics: Metrics,
    started: float,
) -> None:
    """A streamed answer to the caller, chunked or as SSE, each item as it arrives."""
    own_type = next((v for k, v in headers if k == "content-type"), "")
    speaks_sse = own_type.startswith(SSE)
    sse = not speaks_sse and wants_sse(scope)
    raw = [
        (k.encode("latin-1"), v.encode("latin-1"))
        for k, v in headers
        if k not in _FRAMING and not (sse and k == "content-type")
    ]
    if sse or speaks_sse:
        raw += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
    if sse:
        raw.append((b"content-type", SSE.encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    metrics.stream_started(function)
    watcher = asyncio.ensure_future(_gone(receive))
    watcher.add_done_callback(lambda _: stream.cancel())
    reason = "complete"
    try:
        while True:
            try:
                item = await stream.next()
            except StreamCut as cut:
                reason = cut.reason
                if reason != "disconnect" and (sse or speaks_sse):
                    error = json.dumps({"error": cut.message, "function": function}).encode()
                    await send(
                        {
                            "type": "http.response.body",
                            "body": sse_event(error, "error"),
                            "more_body": False,
                        }
                    )
                # Otherwise the chunked body ends without its last chunk: the caller sees
                # an incomplete answer, not a whole one.
                return
            if item is None:
                break
            if not stream.items:
                metrics.stream_first_item(function, time.perf_counter() - started)
            items, size = [item], len(item)
            while size < COALESCE and (more := stream.take()) is not None:
                items.append(more)
                size += len(more)
            if sse:
                body = b"".join(map(sse_event, items))
            else:
                body = item if len(items) == 1 else b"".join(items)
            await send({"type": "http.response.body", "body": body, "more_body": True})
            stream.consumed(len(items), size)
            metrics.stream_items(function, len(items))
        await send({"type": "http.response.body", "body": b""})
    finally:
        watcher.cancel()
        stream.cancel()  # a no-op once it ended
        metrics.stream_ended(function, reason)


async def collect(stream: StreamIn, limit: int) -> bytes:
    """The whole streamed answer (for a job), at most ``limit`` bytes of it."""
    from dcf.gateway.routing.router import CallError

    parts: list[bytes] = []
    size = 0
    try:
        while size <= limit:
            try:
                item = await stream.next()
            except StreamCut as cut:
                status = 504 if cut.reason in ("timeout", "idle") else 500
                raise CallError(
                    status, f"the stream broke off after {stream.items} items: {cut.message}"
                ) from None
            if item is None:
                break
            parts.append(item)
            size += len(item)
            stream.consumed(1, len(item))
        return b"".join(parts)
    finally:
        with contextlib.suppress(Exception):
            stream.cancel()
