"""Routing calls to a function's replicas: least outstanding, bounded queue, deadline.

Each replica takes at most ``concurrency`` calls at once, one per persistent
connection. A call that finds every replica busy waits in a FIFO queue and is
handed the next free slot directly; a full queue is refused at once (429).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import deque
from collections.abc import Callable

from dcf import wire

if sys.version_info >= (3, 11):
    from asyncio import timeout as deadline
else:  # pragma: no cover - Python 3.10

    @contextlib.asynccontextmanager
    async def deadline(seconds: float):  # noqa: ANN201
        task = asyncio.current_task()
        fired = False

        def fire() -> None:
            nonlocal fired
            fired = True
            task.cancel()

        handle = asyncio.get_running_loop().call_later(seconds, fire)
        try:
            yield
        except asyncio.CancelledError:
            if fired:
                raise TimeoutError from None
            raise
        finally:
            handle.cancel()


Result = tuple[int, wire.Headers, bytes]


class CallError(Exception):
    """A call the gateway answers itself: ``status`` with a message naming why."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class ReplicaLink:
    """The gateway's side of one replica: its idle connections and in-flight count."""

    def __init__(self, replica_id: str, address: str, capacity: int) -> None:
        self.id = replica_id
        self.address = address
        self.capacity = capacity
        self.inflight = 0
        self.served = 0
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.address.startswith("tcp://"):
            host, port = self.address[len("tcp://") :].rsplit(":", 1)
            return await asyncio.open_connection(host, int(port), limit=1 << 20)
        return await asyncio.open_unix_connection(self.address, limit=1 << 20)

    async def call(self, frame: bytes) -> Result:
        conn = self._idle.pop() if self._idle else await self._connect()
        reader, writer = conn
        try:
            writer.write(frame)
            result = await wire.read_response(reader)
        except BaseException:
            # Cancelled or broken mid-call: the stream's state is unknown, drop it.
            writer.close()
            raise
        self._idle.append(conn)
        self.served += 1
        return result

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class Pool:
    """The replicas of a function's live version and the calls waiting for them."""

    def __init__(self, function: str, max_queue: int, timeout: float) -> None:
        self.function = function
        self.max_queue = max_queue
        self.timeout = timeout
        self.replicas: list[ReplicaLink] = []
        self.waiters: deque[asyncio.Future[ReplicaLink]] = deque()
        self.inflight = 0
        self._turn = 0
        self.last_call = time.monotonic()
        self.unavailable: str | None = "no replica is ready yet"
        """Why calls are refused at once (503) instead of queued; None while replicas are coming."""
        self.on_demand: Callable[[], None] | None = None
        """Called when a call has to wait: the autoscaler's cue (and scale-from-zero's)."""

    # replicas come and go ------------------------------------------------

    def add(self, link: ReplicaLink) -> None:
        self.replicas.append(link)
        for _ in range(link.capacity):
            if not self._hand_over(link):
                break

    def remove(self, link: ReplicaLink) -> None:
        with contextlib.suppress(ValueError):
            self.replicas.remove(link)
        link.close()

    @property
    def queued(self) -> int:
        return len(self.waiters)

    @property
    def capacity(self) -> int:
        return sum(r.capacity for r in self.replicas)

    # one call ------------------------------------------------------------

    def _pick(self) -> ReplicaLink | None:
        """The least busy replica with a free slot; ties go round-robin to spread load."""
        replicas = self.replicas
        count = len(replicas)
        if count == 1:
            link = replicas[0]
            return link if link.inflight < link.capacity else None
        best = None
        start = self._turn = (self._turn + 1) % count if count else 0
        for i in range(count):
            link = replicas[(start + i) % count]
            if link.inflight < link.capacity and (best is None or link.inflight < best.inflight):
                best = link
        return best

    def _hand_over(self, link: ReplicaLink) -> bool:
        """Give a free slot of ``link`` to the longest-waiting call, if any."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                link.inflight += 1
                waiter.set_result(link)
                return True
        return False

    def _release(self, link: ReplicaLink) -> None:
        link.inflight -= 1
        if link in self.replicas and link.inflight < link.capacity:
            self._hand_over(link)

    async def _acquire(self) -> ReplicaLink:
        link = self._pick()
        if link is not None:
            link.inflight += 1
            return link
        if not self.replicas and self.unavailable:
            raise CallError(503, f"no replica of {self.function!r} is ready: {self.unavailable}")
        if len(self.waiters) >= self.max_queue:
            raise CallError(
                429, f"{self.function!r} is at capacity and its queue is full", retry_after=1
            )
        waiter: asyncio.Future[ReplicaLink] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        if self.on_demand is not None:
            self.on_demand()
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # handed a slot just as we gave up
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            raise

    async def call(
        self, method: str, path: str, query: str, headers: wire.Headers, body: bytes
    ) -> Result:
        self.last_call = time.monotonic()
        self.inflight += 1
        try:
            async with deadline(self.timeout):
                link = await self._acquire()
                try:
                    return await link.call(wire.encode_request(method, path, query, headers, body))
                except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
                    raise CallError(
                        502,
                        f"replica {link.id} of {self.function!r} failed during the call"
                        f" ({type(exc).__name__})",
                    ) from None
                finally:
                    self._release(link)
        except TimeoutError:
            raise CallError(
                504, f"{self.function!r} did not answer within {self.timeout:g}s"
            ) from None
        finally:
            self.inflight -= 1
            self.last_call = time.monotonic()

    def reject_waiting(self, status: int, message: str) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(CallError(status, message))

    async def drained(self) -> None:
        """Wait until every call admitted to this pool has finished."""
        while self.inflight:
            await asyncio.sleep(0.02)
