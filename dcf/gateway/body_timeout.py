"""Request bodies must arrive in time: a client that sends its headers and then
trickles its body, or never sends it, is answered 408 and cut off.

uvicorn has no such timeout, and a per-request timer would cost the hot path a
few microseconds; so a reader registers itself in a table (two dict operations)
and one sweeper, running only while bodies are being read, cancels the reads
that passed their deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

ASGIApp = Callable[[dict, Any, Any], Awaitable[None]]


class BodyTooLarge(Exception):
    """The body is over the limit (it is not read further)."""


class BodyTimeout(Exception):
    """The body did not arrive within the timeout."""


class BodyClock:
    """Deadlines for reading request bodies, ``timeout`` seconds from the first read."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._reading: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def message(self) -> str:
        return (
            f"the request body did not arrive within the gateway's body timeout of"
            f" {self.timeout:g}s (--body-timeout)"
        )

    async def read(self, receive: Any, limit: int) -> bytes:
        """The whole body, or BodyTooLarge past ``limit`` bytes, or BodyTimeout."""
        task = self._watch()
        try:
            return await read_all(receive, limit)
        except asyncio.CancelledError:
            if self._expire(task):
                raise BodyTimeout from None
            raise
        finally:
            self._reading.pop(task, None)

    def guard(self, app: ASGIApp) -> ASGIApp:
        """``app`` with its body reads under the deadline: on expiry the client gets a 408
        and ``app`` sees the client disconnect (its later messages are dropped)."""

        async def guarded(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            state = {"reading": True, "started": False, "cut": False}

            async def timed_receive() -> dict:
                if not state["reading"]:
                    return await receive()
                task = self._watch()
                try:
                    message = await receive()
                except asyncio.CancelledError:
                    if not self._expire(task):
                        raise
                    state["cut"], state["reading"] = True, False
                    if not state["started"]:
                        await _send_timeout(send, self.message())
                    return {"type": "http.disconnect"}
                finally:
                    self._reading.pop(task, None)
                if message["type"] != "http.request" or not message.get("more_body"):
                    state["reading"] = False
                return message

            async def guarded_send(message: dict) -> None:
                if state["cut"]:
                    return
                state["started"] = True
                await send(message)

            await app(scope, timed_receive, guarded_send)

        return guarded

    # the sweeper ---------------------------------------------------------------

    def _watch(self) -> asyncio.Task[Any]:
        task = asyncio.current_task()
        assert task is not None
        # A task already registered (one read inside another) keeps its first deadline.
        self._reading.setdefault(task, time.monotonic() + self.timeout)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return task

    def _expire(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task`` was cancelled by the sweeper (then its cancellation is spent)."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        uncancel = getattr(task, "uncancel", None)
        if uncancel is not None:  # Python 3.11+: an outer asyncio.timeout must not see it
            uncancel()
        return True

    async def _sweep(self) -> None:
        interval = min(1.0, self.timeout / 4)
        try:
            while self._reading:
                await asyncio.sleep(interval)
                now = time.monotonic()
                for task, deadline in list(self._reading.items()):
                    if deadline <= now and task not in self._expired:
                        self._expired.add(task)
                        task.cancel()
        finally:
            self._sweeper = None


async def read_all(receive: Any, limit: int) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise BodyTooLarge
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def _send_timeout(send: Any, error: str) -> None:
    body = json.dumps({"error": error, "function": None}).encode()
    with contextlib.suppress(Exception):  # the client may be gone already
        await send(
            {
                "type": "http.response.start",
                "status": 408,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
