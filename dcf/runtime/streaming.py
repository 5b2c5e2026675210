"""Streamed answers on the replica: a handler's generator, sent item by item.

A handler that returns (or is) a generator, sync or async, answers with its
items as they are made (``wire``'s stream frames). A sync generator is stepped
where its handler runs (``Invoker``): on the replica's loop, one step at a time
between the other calls' work, or on the handler's threads when it has some
(``DCF_THREADS``); an async one runs on the loop.

The gateway grants credit for items as its caller reads them: the generator is
not stepped while ``STREAM_WINDOW_*`` items or bytes wait unread, so a slow
reader slows the generator. A CANCEL from the gateway (its caller left, or the
stream outlived its timeout) closes the generator, which runs its ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import traceback
import types
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from dcf import wire
from dcf.runtime.request import HTTPError

SOURCES = (types.GeneratorType, types.AsyncGeneratorType)
"""What a handler returns to stream."""

ITEM_MAX = 64 << 20
"""Bytes one item may hold: a raw 4K video frame fits."""

_DONE = object()


class Stream:
    """The body of a rendered answer that streams: the generator its items come from."""

    __slots__ = ("source",)

    def __init__(self, source: Any) -> None:
        self.source = source


def is_generator_function(target: Any) -> bool:
    """Whether calling ``target`` (a function or an instance's ``__call__``) makes a generator."""
    from inspect import isasyncgenfunction, isgeneratorfunction

    call = getattr(type(target), "__call__", None)  # noqa: B004 - instances with __call__
    return any(isgeneratorfunction(f) or isasyncgenfunction(f) for f in (target, call))


def encode(item: Any) -> bytes:
    """One item's bytes: bytes as they are, str as UTF-8, anything else as one JSON line."""
    if isinstance(item, bytes):
        data = item
    elif isinstance(item, bytearray | memoryview):
        data = bytes(item)
    elif isinstance(item, str):
        data = item.encode()
    else:
        data = json.dumps(item).encode() + b"\n"
    if len(data) > ITEM_MAX:
        raise ValueError(
            f"an item of {len(data)} bytes is more than a streamed item may hold ({ITEM_MAX} bytes)"
        )
    return data


def content_type(first: Any) -> str:
    """The stream's type when the handler set none, from its first item."""
    if isinstance(first, bytes | bytearray | memoryview):
        return "application/octet-stream"
    if isinstance(first, str):
        return "text/plain; charset=utf-8"
    return "application/x-ndjson"


class Items:
    """Steps a handler's generator: a sync one on ``threads`` if given, else on the loop."""

    YIELD_EVERY = 0.001
    """Seconds of sync steps on the loop before the loop gets a turn (to read a CANCEL)."""

    def __init__(
        self,
        source: Any,
        threads: ThreadPoolExecutor | None = None,
        flush: Callable[[], None] | None = None,
    ) -> None:
        self._source = source
        self._async = isinstance(source, types.AsyncGeneratorType)
        self._threads = threads
        self._flush = flush
        self._step: Future | None = None  # a sync step under way on its thread
        self._yielded = time.monotonic()
        self.done = False

    async def next(self) -> Any:
        """The next item as the handler yielded it; ``_DONE`` when there are no more."""
        if self._async:
            try:
                return await self._source.__anext__()
            except StopAsyncIteration:
                self.done = True
                return _DONE
        if self._threads is None:
            # A step may take long (a sleep, a model's next token): what was made so far
            # leaves first, and the loop gets a turn now and then to read what came.
            if time.monotonic() - self._yielded > self.YIELD_EVERY or self._flush is None:
                await asyncio.sleep(0)
                self._yielded = time.monotonic()
            else:
                self._flush()
            item = next(self._source, _DONE)
        else:
            self._step = self._threads.submit(next, self._source, _DONE)
            item = await asyncio.wrap_future(self._step)
            self._step = None
        if item is _DONE:
            self.done = True
        return item

    async def close(self) -> None:
        """End the generator early: its ``finally`` runs (after the step under way, if any)."""
        if self.done:
            return
        self.done = True
        with contextlib.suppress(BaseException):
            if self._async:
                await self._source.aclose()
                return
            step = self._step
            if step is not None and not step.cancel():
                with contextlib.suppress(BaseException):
                    await asyncio.wrap_future(step)
            if self._threads is None:
                self._source.close()
            else:
                await asyncio.wrap_future(self._threads.submit(self._source.close))


class StreamOut:
    """One streamed answer on a gateway connection, from the first item to END."""

    def __init__(
        self,
        emit: Callable[[list[bytes]], None],
        call_id: int,
        result: tuple[int, wire.Headers, Stream],
        error: Callable[[int, str], tuple[int, wire.Headers, bytes]],
        threads: ThreadPoolExecutor | None = None,
        flush: Callable[[], None] | None = None,
    ) -> None:
        self._emit = emit
        self._call_id = call_id
        self._status, self._headers, stream = result
        self._items = Items(stream.source, threads, flush)
        self._error = error
        self._unread_items = 0
        self._unread_bytes = 0
        self._room: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None

    def grant(self, body: bytes) -> None:
        """A CREDIT frame: the gateway's caller read this many items and bytes."""
        items, size = wire.CREDIT_BODY.unpack(body)
        self._unread_items -= items
        self._unread_bytes -= size
        if self._room is not None:
            self._room.set()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def _has_room(self) -> bool:
        return self._unread_items <= 0 or (
            self._unread_items < wire.STREAM_WINDOW_ITEMS
            and self._unread_bytes < wire.STREAM_WINDOW_BYTES
        )

    def _send_item(self, data: bytes) -> None:
        self._unread_items += 1
        self._unread_bytes += len(data)
        self._emit(wire.stream_frame(self._call_id, wire.ITEM, data))

    async def run(self) -> None:
        call_id, items = self._call_id, self._items
        opened = False
        try:
            first = await items.next()
            headers = self._headers
            if first is not _DONE and not any(k == "content-type" for k, _ in headers):
                headers = [*headers, ("content-type", content_type(first))]
            data = b"" if first is _DONE else encode(first)
            self._emit(wire.stream_open_frame(call_id, self._status, headers))
            opened = True
            if first is not _DONE:
                self._send_item(data)
            while not items.done:
                while not self._has_room():
                    self._room = self._room or asyncio.Event()
                    self._room.clear()
                    await self._room.wait()
                item = await items.next()
                if item is not _DONE:
                    self._send_item(encode(item))
            self._emit(wire.stream_frame(call_id, wire.END))
        except asyncio.CancelledError:
            await items.close()
            self._emit(wire.stream_frame(call_id, wire.END))  # the gateway frees the slot on it
        except Exception as exc:  # noqa: BLE001 - a handler bug must not end the replica
            status, message = (
                (exc.status, exc.message)
                if isinstance(exc, HTTPError)
                else (500, f"{type(exc).__name__}: {exc}")
            )
            if status >= 500:
                traceback.print_exc(file=sys.stderr)
            await items.close()
            answer = self._error(status, message)
            if opened:
                self._emit(wire.stream_frame(call_id, wire.ERROR, answer[2]))
            else:  # nothing was sent yet: an ordinary error answer
                self._emit(wire.response_frame(call_id, *answer))
