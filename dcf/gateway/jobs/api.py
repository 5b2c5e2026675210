"""Durable async invocation: ``/async-function/{name}[/path]`` and ``/async-function/jobs/{id}``.

A job is written to the store (store.py) before its 202, and runs at least
once: one that was running when the gateway stopped, or died, runs again when it
starts. Jobs go through the function's pool like sync calls, so they obey its
queue, concurrency and scaling; at most the pool's capacity plus half its queue
are dispatched at once per function, and the rest wait on disk. A result lives
in a file until its TTL; the gateway holds a body or an answer in memory only
while its call is in flight. A full store refuses new jobs (429) and never
evicts one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from dcf.gateway.jobs.callbacks import DEFAULT_ALLOW, AllowList, CallbackRefused, Deliverer
from dcf.gateway.jobs.store import (
    DONE,
    EXPIRED,
    FAILED,
    LOST,
    QUEUED,
    RUNNING,
    Job,
    JobStore,
)
from dcf.gateway.observe import tracing
from dcf.gateway.routing.invoke import (
    _DROP,
    _FRAMING,
    ASYNC_PREFIX,
    BodyTooLarge,
    read_body,
    send_json,
)
from dcf.gateway.routing.router import CallError
from dcf.gateway.routing.stream import collect

if TYPE_CHECKING:
    from pathlib import Path

    from dcf.gateway.lifecycle.functions import FunctionManager
    from dcf.gateway.observe.metrics import Metrics

T = TypeVar("T")
JOBS = "jobs/"
TICK = 0.5
"""Seconds between looks at the queue besides the wake-ups (capacity changes, retry times)."""
MAX_RUNNING = 64
"""Jobs in flight at once, all functions together: what bounds the memory jobs take."""
MAX_ATTEMPTS = 5
"""Runs of a job that end with its replica dying (502) or no replica (503), or with the
gateway stopping, before it fails; a 429 (queue full) retries without counting."""
CHUNK = 1 << 20


@dataclass
class JobSettings:
    ttl: float = 24 * 3600.0
    """Seconds a result (or failure) is kept after the job ends."""
    result_max: int = 32 << 20
    """Largest answer kept; a larger one fails the job (507)."""
    max_jobs: int = 10_000
    """Jobs queued, running or holding a result; more are refused (429)."""
    max_bytes: int = 2 << 30
    """Bytes of bodies and results on disk before new jobs are refused (429)."""
    callback_allow: tuple[str, ...] = DEFAULT_ALLOW
    own_ports: tuple[int, ...] = ()
    """The ports the gateway serves on: callbacks to them on this machine are refused."""


class Jobs:
    """The ASGI endpoint for jobs, and the runner that works through them."""

    def __init__(
        self,
        home: Path,
        manager: FunctionManager,
        metrics: Metrics,
        max_body: int,
        settings: JobSettings,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.max_body = max_body
        self.settings = settings
        self.allow = AllowList(settings.callback_allow, settings.own_ports)
        self.store = JobStore(home)
        self.count = 0
        self.bytes = 0
        self._disk = ThreadPoolExecutor(1, thread_name_prefix="dcf-jobs")
        self._callbacks = Deliverer(self.allow)
        self._running: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._closing = False

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store method on the store's thread: the event loop never waits on the disk."""
        return await asyncio.get_running_loop().run_in_executor(self._disk, fn, *args)

    # start and stop -------------------------------------------------------------

    async def start(self) -> None:
        """After the functions are restored: requeue what was running, resume callbacks."""
        await self._io(self.store.recover)
        self.count, self.bytes = await self._io(self.store.usage)
        for job in await self._io(self.store.pending_callbacks):
            self._spawn(self._call_back(job))
        self._spawn(self._dispatch_forever())
        self._spawn(self._sweep_forever())

    async def close(self) -> None:
        """Stop before the replicas do: jobs in flight stay ``running`` in the store and
        run again at the next start, instead of failing with their replicas."""
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._callbacks.close()
        await self._io(self.store.close)
        self._disk.shutdown(wait=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # HTTP -------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        rest = scope["path"][len(ASYNC_PREFIX) :]
        if rest.startswith(JOBS) and scope["method"] in ("GET", "HEAD"):
            await self._get(rest[len(JOBS) :], scope["method"] == "HEAD", send)
        else:
            await self._submit(scope, receive, send, rest)

    async def _submit(self, scope, receive, send, rest: str) -> None:  # noqa: ANN001
        name, _, sub = rest.partition("/")
        state = self.manager.functions.get(name)
        if state is None:
            self.metrics.unknown.inc()
            await send_json(send, 404, {"error": f"no function named {name!r}", "function": name})
            return
        headers: list[tuple[str, str]] = []
        callback = None
        for key, value in scope["headers"]:
            if key == b"content-length" and int(value or 0) > self.max_body:
                await self._error(send, 413, self._too_large(), name)
                return
            k = key.decode("latin-1")
            if k == "x-callback-url":
                callback = value.decode("latin-1").strip()
            elif k not in _DROP:
                headers.append((k, value.decode("latin-1")))
        if self.count >= self.settings.max_jobs:
            await self._full(send, name, f"it holds {self.count} jobs, its limit")
            return
        if callback is not None:
            server = scope.get("server")
            if server and server[1] is not None:  # the port this call came in on is ours too
                self.allow.own_ports.add(server[1])
            try:
                await self.allow.vet(callback)
            except CallbackRefused as exc:
                await self._error(send, 400, str(exc), name)
                return
        gone = False

        async def watched() -> dict:
            nonlocal gone
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            return message

        try:
            body = await read_body(watched, self.max_body)
        except BodyTooLarge:
            await self._error(send, 413, self._too_large(), name)
            return
        if gone:  # the caller left (or was cut off) before its body arrived: nothing to store
            return
        if self.count >= self.settings.max_jobs:  # others were accepted while this one read
            await self._full(send, name, f"it holds {self.count} jobs, its limit")
            return
        if self.bytes + len(body) > self.settings.max_bytes:
            await self._full(
                send,
                name,
                f"its bodies and results take {self.bytes} bytes and this body would pass"
                f" its limit of {self.settings.max_bytes}",
            )
            return
        job = Job(
            id=self.store.ids.new(),
            function=name,
            generation=state.record.created_at,
            method=scope["method"],
            path="/" + sub,
            query=scope["query_string"].decode("latin-1"),
            headers=headers,
            callback=callback,
            body_size=len(body),
            callback_state="pending" if callback else None,
        )
        self.count += 1  # held before the write, so concurrent submits cannot overshoot
        self.bytes += len(body)
        try:
            await self._io(self.store.add, job, body)
        except Exception as exc:  # noqa: BLE001 - disk full, read-only: say so, hold nothing
            self.count -= 1
            self.bytes -= len(body)
            await self._error(send, 507, f"the job could not be stored: {exc}", name)
            return
        del body
        self._wake.set()
        location = f"{ASYNC_PREFIX}{JOBS}{job.id}".encode()
        await send_json(
            send,
            202,
            {"id": job.id, "function": name, "state": QUEUED},
            [(b"location", location), (b"x-dcf-job-id", job.id.encode())],
        )

    async def _get(self, job_id: str, head: bool, send) -> None:  # noqa: ANN001
        if not self.store.ids.issued(job_id):
            error = f"no job {job_id!r}: this gateway never issued that id"
            await send_json(send, 404, {"error": error, "function": None})
            return
        job = await self._io(self.store.get, job_id)
        if job is None:
            await self._gone(send, job_id, None, "it expired or was lost")
            return
        if job.state in (QUEUED, RUNNING):
            if self._function_gone(job):
                await self._lose(job.function, job.generation)
                await self._gone(send, job_id, job.function, _deleted(job.function))
                return
            payload = {
                "id": job.id,
                "function": job.function,
                "state": job.state,
                "attempts": job.attempts,
                "created_at": job.created_at,
            }
            await send_json(send, 202, payload, _job_headers(job))
        elif job.state in (EXPIRED, LOST) or (job.expires_at or 0) < time.time():
            await self._gone(send, job_id, job.function, job.error or "its result expired")
        elif job.state == FAILED:
            payload = {"error": job.error, "function": job.function, "id": job.id, "state": FAILED}
            await send_json(send, job.status or 500, payload, _job_headers(job))
        else:
            await self._send_result(job, head, send)

    async def _send_result(self, job: Job, head: bool, send) -> None:  # noqa: ANN001
        """The stored answer, read from its file a chunk at a time."""
        loop = asyncio.get_running_loop()
        try:
            file = await loop.run_in_executor(None, open, self.store.result_path(job.id), "rb")
        except FileNotFoundError:  # expired just now
            await self._gone(send, job.id, job.function, "its result expired")
            return
        try:
            headers = [(b"content-length", str(job.result_size).encode())]
            headers += [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in job.result_headers
                if k not in _FRAMING
            ]
            headers += _job_headers(job)
            await send({"type": "http.response.start", "status": job.status, "headers": headers})
            left = 0 if head else job.result_size
            while left > 0:
                chunk = await loop.run_in_executor(None, file.read, min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": left > 0})
            if head or left:
                await send({"type": "http.response.body", "body": b""})
        finally:
            file.close()

    async def _gone(self, send, job_id: str, function: str | None, why: str) -> None:  # noqa: ANN001
        hours = self.settings.ttl / 3600
        await send_json(
            send,
            410,
            {
                "error": f"job {job_id} is gone: {why} (results are kept {hours:g} h)",
                "function": function,
                "id": job_id,
            },
            [(b"x-dcf-job-status", b"gone")],
        )

    async def _full(self, send, name: str, why: str) -> None:  # noqa: ANN001
        earliest = await self._io(self.store.earliest_expiry)
        wait = self.settings.ttl if earliest is None else earliest - time.time()
        retry = max(1, math.ceil(min(wait, self.settings.ttl)) + 1)
        await send_json(
            send,
            429,
            {
                "error": f"the gateway's job store is full: {why}; no job is evicted to make room,"
                f" so try again when results expire (after {retry}s at the latest)",
                "function": name,
            },
            [(b"retry-after", str(retry).encode())],
        )

    async def _error(self, send, status: int, message: str, name: str) -> None:  # noqa: ANN001
        await send_json(send, status, {"error": message, "function": name})

    def _too_large(self) -> str:
        return f"request body is larger than the gateway's limit of {self.max_body} bytes"

    # running jobs -------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._dispatch()
            except Exception as exc:  # noqa: BLE001 - a bad turn must not stop every job
                _complain(f"dispatching jobs failed: {exc!r}")
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK)

    async def _dispatch(self) -> None:
        room = MAX_RUNNING - sum(self._running.values())
        wants: dict[str, tuple[float, int]] = {}
        for name, generation in await self._io(self.store.queued_functions):
            state = self.manager.functions.get(name)
            if state is None or state.record.created_at != generation:
                await self._lose(name, generation)
                continue
            free = min(self._limit(name) - self._running.get(name, 0), room)
            if free > 0:
                wants[name] = (generation, free)
        if not wants or room <= 0:
            return
        for job in await self._io(self.store.claim, wants, time.time()):
            self._running[job.function] = self._running.get(job.function, 0) + 1
            self._spawn(self._run(job))

    def _limit(self, name: str) -> int:
        """Jobs of ``name`` in flight at once: what its replicas can take now plus half its
        queue (which is what makes the autoscaler add replicas), at most what all its
        replicas could take. None while it cannot take calls (building, failed, its
        replicas starting: a job waits on disk, not against the function's timeout),
        and one to wake it when it is scaled to zero."""
        state = self.manager.functions.get(name)
        pool = self.manager.routes.get(name)
        if state is None or state.live is None or pool is None or pool.unavailable:
            return 0
        capacity = sum(link.capacity for link in pool.replicas)
        if not capacity:
            return 1 if state.live.desired == 0 else 0
        spec = state.live.spec
        most = state.record.max_replicas * spec.concurrency
        return min(most, capacity + max(1, spec.max_queue // 2))

    async def _run(self, job: Job) -> None:
        name = job.function
        try:
            await self._attempt(job)
        except Exception as exc:  # noqa: BLE001 - fail the job, not the runner
            _complain(f"job {job.id} of {name!r}: {exc!r}")
            with contextlib.suppress(Exception):
                await self._fail(job, 500, f"the gateway could not run the job: {exc}")
        finally:
            self._running[name] -= 1
            if not self._running[name]:
                del self._running[name]
            self._wake.set()

    async def _attempt(self, job: Job) -> None:
        name = job.function
        if self._function_gone(job):
            await self._lose(name, job.generation, job)
            return
        try:
            body = await self._io(self.store.read_body, job.id)
        except FileNotFoundError:
            await self._fail(job, 500, "the job's body is missing from the job store")
            return
        # Looked up after the read (as a sync call's after its body): an update or a
        # rollout may have switched the function's pool meanwhile, and the old one, being
        # drained, would answer 503 and cost the job an attempt.
        pool = self.manager.routes.get(name)
        if pool is None or self._function_gone(job):
            await self._lose(name, job.generation, job)
            return
        start = time.perf_counter()
        call = pool.call if tracing.active is None else tracing.active.job_call(job, pool.call)
        try:
            status, headers, answer = await call(job.method, job.path, job.query, job.headers, body)
            if type(answer) is not bytes:  # streamed: the job keeps the whole answer
                answer = await collect(answer, self.settings.result_max)
        except CallError as exc:
            del body
            if exc.status != 404 and not self._function_gone(job):
                self.metrics.observe(name, exc.status, time.perf_counter() - start)
            await self._call_failed(job, exc)
            return
        del body
        self.metrics.observe(name, status, time.perf_counter() - start)
        if self._closing:
            return
        if len(answer) > self.settings.result_max:
            size = len(answer)
            del answer
            await self._fail(
                job,
                507,
                f"the answer of {name!r} was {size} bytes, more than the gateway keeps for a"
                f" job ({self.settings.result_max} bytes; dcf gateway start --job-result-max)",
            )
            return
        try:
            await self._io(self.store.finish, job, status, headers, answer, self.settings.ttl)
        except OSError as exc:
            del answer
            await self._fail(job, 507, f"the answer could not be stored: {exc}")
            return
        self.bytes += len(answer) - job.body_size
        del answer
        if job.callback:
            self._spawn(self._call_back(job))

    async def _call_failed(self, job: Job, exc: CallError) -> None:
        if self._closing:
            return
        if self._function_gone(job):
            await self._lose(job.function, job.generation, job)
            return
        now = time.time()
        if exc.status == 429:  # the queue filled with sync calls: wait, it is not the job's fault
            await self._io(self.store.requeue, job.id, now + 1.0, False)
        elif exc.status in (502, 503) and job.attempts < MAX_ATTEMPTS:
            retry = min(0.25 * 2**job.attempts, 10.0)
            await self._io(self.store.requeue, job.id, now + retry, True)
        else:
            tries = f" after {job.attempts} attempts" if job.attempts > 1 else ""
            await self._fail(job, exc.status, f"the job failed{tries}: {exc.message}")

    async def _fail(self, job: Job, status: int, error: str) -> None:
        self.bytes -= job.body_size
        await self._io(self.store.fail, job, status, error, self.settings.ttl)
        self.manager.logs.write(job.function, "jobs", f"job {job.id} failed: {error}")
        if job.callback:
            self._spawn(self._call_back(job))

    def _function_gone(self, job: Job) -> bool:
        state = self.manager.functions.get(job.function)
        return state is None or state.record.created_at != job.generation

    async def _lose(self, name: str, generation: float, running: Job | None = None) -> None:
        """Jobs of a function deleted (or deleted and created anew) will never run: 410."""
        why = _deleted(name)
        if running is not None:
            self.count -= 1
            self.bytes -= running.body_size
            await self._io(self.store.tombstone, running.id, LOST, why, self.settings.ttl)
        count, size = await self._io(self.store.lose, name, generation, why, self.settings.ttl)
        self.count -= count
        self.bytes -= size

    # results: callbacks and expiry ---------------------------------------------------------

    async def _call_back(self, job: Job) -> None:
        assert job.callback is not None
        headers = {
            "x-dcf-job-id": job.id,
            "x-dcf-job-status": job.state,
            "x-dcf-function": job.function,
            "x-dcf-status": str(job.status),
        }
        if job.state == DONE:
            headers.update((k, v) for k, v in job.result_headers if k not in _FRAMING)
            path = self.store.result_path(job.id)

            def body() -> Any:
                return open(path, "rb")  # noqa: SIM115 - the deliverer closes it

        else:
            headers["content-type"] = "application/json"
            body = json.dumps(
                {"error": job.error, "function": job.function, "id": job.id, "state": job.state}
            ).encode()

        def attempt_failed(attempt: int, error: str) -> None:
            self.manager.logs.write(
                job.function, "jobs", f"callback of job {job.id}, attempt {attempt}: {error}"
            )

        deliver = self._callbacks.deliver
        if tracing.active is not None:
            deliver = tracing.active.callback(job, deliver)
        error = await deliver(job.callback, headers, body, attempt_failed)
        with contextlib.suppress(Exception):  # the store closed as the gateway stopped
            await self._io(
                self.store.set_callback_state, job.id, "failed" if error else "delivered"
            )

    async def _sweep_forever(self) -> None:
        interval = min(60.0, max(self.settings.ttl / 4, 0.25))
        while True:
            await asyncio.sleep(interval)
            try:
                count, size = await self._io(self.store.expire, time.time(), self.settings.ttl)
            except Exception as exc:  # noqa: BLE001 - try again next time
                _complain(f"sweeping expired jobs failed: {exc!r}")
                continue
            self.count -= count
            self.bytes -= size


def _complain(message: str) -> None:
    """To the gateway's own output: what no request is there to be told."""
    print(f"dcf jobs: {message}", file=sys.stderr, flush=True)


def _deleted(name: str) -> str:
    return f"its function {name!r} was deleted"


def _job_headers(job: Job) -> list[tuple[bytes, bytes]]:
    return [(b"x-dcf-job-status", job.state.encode()), (b"x-dcf-job-id", job.id.encode())]
