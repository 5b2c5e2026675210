"""Routing calls to a function's replicas: least outstanding, bounded queue, deadline.

Each replica takes at most ``concurrency`` calls at once, multiplexed on one
persistent connection (``wire``). A call that finds every replica busy waits
in a FIFO queue and is handed the next free slot directly; a full queue is
refused at once (429).

A replica known to be dead is never sent a call: a call handed one that died
before the call was written to it goes to another replica instead, so when a
replica dies only the calls it had really received fail. A replica that stops
answering is reported (``ReplicaLink.on_unresponsive``) once ``unresponsive_after``
calls in a row time out on it, or once one call stays unanswered that many
timeouts past its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable

from dcf import tuning, wire
from dcf.gateway.observe import tracing
from dcf.gateway.routing.stream import IDLE, StreamIn

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
"""(status, headers, body); the body is a ``StreamIn`` for a streamed answer (stream.py)."""


class NotDelivered(ConnectionError):
    """The call never reached the replica (it was gone first): safe to send elsewhere."""


class CallError(Exception):
    """A call the gateway answers itself: ``status`` with a message naming why."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class ReplicaChannel(asyncio.BufferedProtocol):
    """The one connection to a replica; concurrent calls share it, matched by call id."""

    def __init__(
        self,
        on_batch: Callable[[int], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.on_batch = on_batch
        self.on_lost = on_lost
        """Told when the replica's side ends the connection (not when the gateway closes it)."""
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.closing = False
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, asyncio.Future[Result]] = {}
        self._streams: dict[int, StreamIn] = {}
        self._ids = itertools.count(1)
        self._reader = wire.BufferedFrameReader(wire.RESPONSE_HEAD)
        self._outbox: list[bytes] = []
        self._last_id = 0
        self._written_upto = 0
        """Calls with ids above this one are still in the outbox, unwritten."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        for call_id, status, batch, meta, body in self._reader.buffer_updated(nbytes):
            if batch:
                if batch == wire.STREAM:
                    self._streamed(call_id, status, meta, body)
                    continue
                if self.on_batch is not None:
                    self.on_batch(batch)
            future = self._pending.pop(call_id, None)
            if future is not None and not future.done():
                future.set_result((status, wire.parse_response_meta(meta), body))

    def _streamed(self, call_id: int, kind: int, meta: bytes, body: bytes) -> None:
        """A frame of a streamed answer: its OPEN resolves the call, with a StreamIn as body."""
        if kind == wire.ITEM:
            stream = self._streams.get(call_id)
            if stream is not None:
                stream.push(body)
        elif kind in (wire.END, wire.ERROR):
            stream = self._streams.pop(call_id, None)
            if stream is not None:
                stream.end(body if kind == wire.ERROR else None)
        else:
            stream = self._streams[call_id] = StreamIn(self, call_id)
            future = self._pending.pop(call_id, None)
            if future is not None and not future.done():
                future.set_result((kind, wire.parse_response_meta(meta), stream))  # type: ignore[arg-type]
            else:
                stream.cancel()

    def control(self, call_id: int, kind: bytes, body: bytes = b"") -> None:
        """A CREDIT or CANCEL frame for a stream, written with this turn's calls."""
        if self.closed:
            return
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox += wire.control_frame(call_id, kind, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.end(b'{"error": "the replica closed the connection during the stream"}')
        pending, self._pending = self._pending, {}
        written = self._written_upto
        for call_id, future in pending.items():
            if not future.done():
                future.set_exception(
                    ConnectionResetError("the replica closed the connection")
                    if call_id <= written
                    else NotDelivered("the replica was gone before the call was sent")
                )
        if not self.closing and self.on_lost is not None:
            self.on_lost()

    def send(
        self, method: str, path: str, query: str, headers: wire.Headers, body: bytes
    ) -> asyncio.Future[Result]:
        """Queue a call; the future resolves with the answer, or fails if the replica goes."""
        if self.closed:
            raise ConnectionResetError("the replica closed the connection")
        call_id = self._last_id = next(self._ids)
        future = self._loop.create_future()
        self._pending[call_id] = future
        if not self._outbox:
            # Calls made in this turn of the loop leave in one write.
            self._loop.call_soon(self._flush)
        self._outbox += wire.request_frame(call_id, method, path, query, headers, body)
        return future

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        if self.transport is not None and not self.closed:
            self.transport.writelines(outbox)
            self._written_upto = self._last_id

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


KEEPALIVE = {"idle": 5, "interval": 2, "count": 3, "unacked_ms": 10_000}
"""A TCP replica whose node vanishes without closing anything (power loss, a cut
cable) is found by the kernel's keepalive probes within idle + interval × count
= 11 s while the connection is quiet, and by the unacknowledged-data timeout
within 10 s while calls are being sent. A busy handler does not delay either:
the peer's kernel answers them, not its event loop."""


def _keep_alive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    options = [
        ("TCP_KEEPIDLE", KEEPALIVE["idle"]),
        ("TCP_KEEPINTVL", KEEPALIVE["interval"]),
        ("TCP_KEEPCNT", KEEPALIVE["count"]),
        ("TCP_USER_TIMEOUT", KEEPALIVE["unacked_ms"]),
    ]
    for name, value in options:
        if hasattr(socket, name):  # Linux has them all; others keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class ReplicaLink:
    """The gateway's side of one replica: its channel and in-flight count."""

    def __init__(
        self, replica_id: str, address: str, capacity: int, secret: bytes | None = None
    ) -> None:
        self.id = replica_id
        self.address = address
        self.capacity = capacity
        self.secret = secret
        self.inflight = 0
        self.served = 0
        self.on_batch: Callable[[int], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        """Told when the replica drops the connection: it is dead, or cut off."""
        self.on_unresponsive: Callable[[str], None] | None = None
        """Told (with why) when the replica stops answering: the pool's liveness check."""
        self.end_reason: Callable[[], Awaitable[str | None]] | None = None
        """Why the replica ended, when it did (e.g. its memory limit), for the 502 of a call."""
        self.dead = False
        """Closed by the gateway, or lost: nothing more is sent to it."""
        self.missed = 0
        """Calls in a row that timed out on it (an answer in time resets it)."""
        self._channel: ReplicaChannel | None = None
        self._connecting: asyncio.Future[ReplicaChannel] | None = None

    async def _open(self) -> ReplicaChannel:
        loop = asyncio.get_running_loop()

        def channel() -> ReplicaChannel:
            return ReplicaChannel(self.on_batch, self.on_lost)

        if self.address.startswith("tcp://"):
            host, port = self.address[len("tcp://") :].rsplit(":", 1)
            transport, opened = await loop.create_connection(channel, host, int(port))
            _keep_alive(transport.get_extra_info("socket"))
        else:
            transport, opened = await loop.create_unix_connection(channel, self.address)
        tuning.tune_socket(transport.get_extra_info("socket"))
        if self.secret is not None:
            transport.writelines(wire.hello_frame(self.secret))
        return opened

    async def channel(self) -> ReplicaChannel:
        channel = self._channel
        if channel is not None and not channel.closed:
            return channel
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        try:
            channel = self._channel = await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None
        return channel

    async def send(
        self, method: str, path: str, query: str, headers: wire.Headers, body: bytes
    ) -> asyncio.Future[Result]:
        channel = self._channel
        if channel is None or channel.closed:
            if self.dead:
                raise NotDelivered(f"replica {self.id} is gone")
            try:
                channel = await self.channel()
            except OSError as exc:
                # Its socket is gone or refuses: the replica is dead; let it be replaced.
                self._lose()
                raise NotDelivered(f"cannot connect to replica {self.id}: {exc}") from None
        self.served += 1
        return channel.send(method, path, query, headers, body)

    def _lose(self) -> None:
        if not self.dead:
            self.dead = True
            if self.on_lost is not None:
                self.on_lost()

    def close(self) -> None:
        self.dead = True
        if self._channel is not None:
            self._channel.close()


class Pool:
    """The replicas of a function's live version and the calls waiting for them."""

    def __init__(
        self, function: str, max_queue: int, timeout: float, unresponsive_after: int = 3
    ) -> None:
        self.function = function
        self.version: int | None = None
        """The version whose replicas these are (X-DCF-Version pins to it: split.py)."""
        self.max_queue = max_queue
        self.timeout = timeout
        self.unresponsive_after = unresponsive_after
        self.stream_idle = IDLE
        """Seconds a streamed answer may go without an item (the function's setting)."""
        self.replicas: list[ReplicaLink] = []
        self.waiters: deque[asyncio.Future[ReplicaLink]] = deque()
        self.inflight = 0
        self._turn = 0
        self.last_call = time.monotonic()
        self.unavailable: str | None = "no replica is ready yet"
        """Why calls are refused at once (503) instead of queued; None while replicas are coming."""
        self.on_batch: Callable[[int], None] | None = None
        """Told the size of every batch a replica ran (for the metrics)."""
        self.on_demand: Callable[[], None] | None = None
        """Called when a call has to wait: the autoscaler's cue (and scale-from-zero's)."""

    # replicas come and go ------------------------------------------------

    def add(self, link: ReplicaLink) -> None:
        link.on_batch = self.on_batch
        self.replicas.append(link)
        for _ in range(link.capacity):
            if not self._hand_over(link):
                break

    def remove(self, link: ReplicaLink) -> None:
        with contextlib.suppress(ValueError):
            self.replicas.remove(link)
        link.close()

    def withdraw(self, link: ReplicaLink) -> None:
        """Route no new call to ``link``; the calls on it go on (a replica retiring)."""
        with contextlib.suppress(ValueError):
            self.replicas.remove(link)

    async def settled(self, link: ReplicaLink, within: float) -> int:
        """Wait until ``link`` has no call in flight, or ``within`` seconds; the calls left."""
        deadline = time.monotonic() + within
        while link.inflight and not link.dead and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return 0 if link.dead else link.inflight

    @property
    def queued(self) -> int:
        return len(self.waiters)

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

    def _release_late(
        self, link: ReplicaLink, watch: asyncio.TimerHandle | None, answer: asyncio.Future[Result]
    ) -> None:
        """The answer to a call that already timed out: nobody reads it but the slot frees."""
        if watch is not None:
            watch.cancel()
        if not answer.cancelled():
            answer.exception()  # retrieved, so a lost replica's error is not reported as unread
            if answer.exception() is None and type(stream := answer.result()[2]) is not bytes:
                stream.cancel()  # nobody reads it: stop it, free the slot once it ended
                stream.hold(functools.partial(self._release, link), 0.0, 0.0)
                return
        self._release(link)

    def _timed_out(self, link: ReplicaLink, answer: asyncio.Future[Result]) -> None:
        """A call sent to ``link`` got no answer within the timeout (the rare path)."""
        watch = None
        limit = self.unresponsive_after
        if limit and not link.dead:
            link.missed += 1
            if link.missed >= limit:
                self._unresponsive(
                    link, f"{link.missed} calls in a row got no answer within {self.timeout:g}s"
                )
            else:
                # Still unanswered ``limit`` timeouts later: the replica is stuck, even
                # if nothing else reaches it (every slot taken by stuck calls).
                watch = asyncio.get_running_loop().call_later(
                    self.timeout * limit, self._still_unanswered, link, answer
                )
        answer.add_done_callback(functools.partial(self._release_late, link, watch))

    def _still_unanswered(self, link: ReplicaLink, answer: asyncio.Future[Result]) -> None:
        if not answer.done() and not link.dead:
            waited = self.timeout * (self.unresponsive_after + 1)
            self._unresponsive(link, f"a call got no answer in {waited:g}s")

    def _unresponsive(self, link: ReplicaLink, why: str) -> None:
        if link.on_unresponsive is not None and not link.dead:
            link.on_unresponsive(why)

    def _release(self, link: ReplicaLink) -> None:
        link.inflight -= 1
        if link in self.replicas and link.inflight < link.capacity:
            self._hand_over(link)

    def _take(self) -> ReplicaLink | None:
        """A free slot on a replica now, or None: then the call waits (``_wait``)."""
        link = self._pick()
        if link is not None:
            link.inflight += 1
        return link

    async def _wait(self) -> ReplicaLink:
        """A slot once one is free: a call with none free now queues (or is refused)."""
        link = self._take()
        if link is not None:
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
        started = self.last_call = time.monotonic()
        self.inflight += 1
        held = False  # a streamed answer: slot and count are given back when it ends
        try:
            async with deadline(self.timeout):
                while True:
                    link = self._take()
                    if link is None:
                        waiting = self._wait
                        if tracing.active is not None:  # the wait in a span (observe/tracing.py)
                            waiting = functools.partial(tracing.active.queued, self._wait)
                        link = await waiting()
                    if tracing.active is not None:
                        tracing.active.placed(link)
                    answer = None
                    try:
                        answer = await link.send(method, path, query, headers, body)
                        # Shielded: a call that times out still occupies the replica until
                        # it answers, so its slot is released then, not now.
                        result = await asyncio.shield(answer)
                        link.missed = 0
                        if type(result[2]) is not bytes:
                            held = True
                            ended = functools.partial(self._stream_ended, link)
                            result[2].hold(ended, started, self.timeout, self.stream_idle)
                        return result
                    except NotDelivered:
                        if link.dead:
                            self.remove(link)
                        continue  # it never reached that replica: another one takes it
                    except (ConnectionError, OSError) as exc:
                        why = await link.end_reason() if link.end_reason is not None else None
                        raise CallError(
                            502,
                            f"replica {link.id} of {self.function!r} failed during the call"
                            f" ({why or type(exc).__name__})",
                        ) from None
                    finally:
                        if held:
                            pass
                        elif answer is None or answer.done():
                            self._release(link)
                        else:
                            self._timed_out(link, answer)
        except TimeoutError:
            raise CallError(
                504, f"{self.function!r} did not answer within {self.timeout:g}s"
            ) from None
        finally:
            if not held:
                self.inflight -= 1
                self.last_call = time.monotonic()

    def _stream_ended(self, link: ReplicaLink) -> None:
        self._release(link)
        self.inflight -= 1
        self.last_call = time.monotonic()

    def reject_waiting(self, status: int, message: str) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(CallError(status, message))

    async def drained(self, within: float) -> int:
        """Wait until every call admitted to this pool has finished, or ``within`` seconds;
        the calls left."""
        deadline = time.monotonic() + within
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.inflight
