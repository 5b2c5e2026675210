"""Dynamic batching: calls that arrive together run as one list.

A model's forward pass costs about the same for one input as for several, so a
replica under load answers more calls per second when it groups them. The
batcher waits at most ``max_wait_ms`` after the first call for others to join,
and never holds more than ``max_size``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class BatchOptions:
    max_size: int
    max_wait_ms: float


def batch(max_size: int = 16, max_wait_ms: float = 5) -> Callable[[F], F]:
    """Mark a handler (function or ``__call__``) as taking a list of requests.

    It must return a list of the same length, in the same order. An item may be
    an exception instance (e.g. ``dcf.HTTPError(400, ...)``): only that call fails.
    """
    if max_size < 1:
        raise ValueError("batch max_size must be at least 1")
    if max_wait_ms < 0:
        raise ValueError("batch max_wait_ms must be 0 or more")

    def mark(fn: F) -> F:
        fn.__dcf_batch__ = BatchOptions(max_size, max_wait_ms)  # type: ignore[attr-defined]
        return fn

    return mark


def batch_options(target: Callable[..., Any] | None) -> BatchOptions | None:
    return getattr(target, "__dcf_batch__", None)


class BatchFailure(Exception):
    """The batch returned something other than one result per request."""


class Batcher:
    """Collects single calls into batches for ``run_batch`` (a list → list callable)."""

    def __init__(
        self,
        run_batch: Callable[[list[Any]], Awaitable[list[Any]]],
        options: BatchOptions,
    ) -> None:
        self._run_batch = run_batch
        self._options = options
        self._pending: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._last_size = 0

    async def submit(self, item: Any) -> tuple[Any, int]:
        """Run ``item`` in a batch; return its result and, for one call per batch, the
        batch's size (0 for the others), so that sizes are counted once per batch."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.put_nowait((item, future))
        return await future

    async def _collect(self) -> list[tuple[Any, asyncio.Future[Any]]]:
        group = [await self._pending.get()]
        if self._pending.empty() and self._last_size <= 1:
            # Nothing came while the last batch ran: the load is one call at a time,
            # and waiting for company would only add max_wait_ms to each.
            self._last_size = 1
            return group
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._options.max_wait_ms / 1000
        while len(group) < self._options.max_size:
            # Calls that queued while the previous batch ran join without waiting.
            if not self._pending.empty():
                group.append(self._pending.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                group.append(await asyncio.wait_for(self._pending.get(), remaining))
            except asyncio.TimeoutError:
                break
        self._last_size = len(group)
        return group

    async def _work(self) -> None:
        while True:
            group = await self._collect()
            group = [(item, fut) for item, fut in group if not fut.done()]
            if not group:
                continue
            items = [item for item, _ in group]
            try:
                results = await self._run_batch(items)
                if not isinstance(results, list | tuple) or len(results) != len(items):
                    raise BatchFailure(
                        f"batch handler returned {_describe(results)} for {len(items)} requests;"
                        " it must return a list with one result per request"
                    )
            except Exception as exc:  # noqa: BLE001 - isolate the failing item below
                if len(group) == 1 or isinstance(exc, BatchFailure):
                    for _, fut in group:
                        _settle(fut, exc)
                    continue
                # One bad input must not fail its neighbours: retry each alone.
                results = []
                for item in items:
                    try:
                        (result,) = await self._run_batch([item])
                    except Exception as item_exc:  # noqa: BLE001
                        result = item_exc
                    results.append(result)
            size = len(group)
            for (_, fut), result in zip(group, results, strict=True):
                if _settle(fut, result, size):
                    size = 0


def _settle(fut: asyncio.Future[Any], result: Any, size: int = 0) -> bool:
    """Resolve one call; True if it carried the batch size."""
    if fut.done():
        return False
    if isinstance(result, BaseException):
        fut.set_exception(result)
        return False
    fut.set_result((result, size))
    return True


def _describe(value: Any) -> str:
    if isinstance(value, list | tuple):
        return f"{len(value)} results"
    return f"a {type(value).__name__}"


def is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - instances with async __call__
    )
