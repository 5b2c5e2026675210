"""One version of a function, running: its replicas and the pool that routes to them.

It keeps ``desired`` replicas alive: starts missing ones, restarts one that
dies (with backoff), and retires extra ones only after their calls finish.
A replica that cannot start (the handler fails to import, say) fails the
deployment with the reason instead of looping.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dcf.backends import Backend, Replica, ReplicaFailed, ReplicaSpec
from dcf.config import FunctionSpec
from dcf.gateway.router import Pool, ReplicaLink

Log = Callable[[str, str], None]
"""(source, message) → the function's log."""


@dataclass
class Member:
    id: str
    task: asyncio.Task[None] | None = None
    replica: Replica | None = None
    link: ReplicaLink | None = None
    retiring: bool = False
    started_at: float = field(default_factory=time.time)


class Deployment:
    def __init__(
        self,
        spec: FunctionSpec,
        version: int,
        code_dir: str,
        python: str,
        backend: Backend,
        log: Log,
    ) -> None:
        self.spec = spec
        self.version = version
        self.code_dir = code_dir
        self.python = python
        self.backend = backend
        self.log = log
        self.pool = Pool(spec.name, spec.max_queue, spec.timeout)
        self.members: dict[str, Member] = {}
        self.desired = 0
        self.failure: str | None = None
        self.restarts = 0
        self.cold_starts = 0
        self.stopping = False
        self._ids = itertools.count(1)
        self._first_ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_failure: Callable[[str], None] | None = None

    # status ---------------------------------------------------------------

    @property
    def ready(self) -> int:
        return len(self.pool.replicas)

    def replicas_info(self) -> list[dict]:
        return [
            {
                "id": m.id,
                "state": "retiring" if m.retiring else ("ready" if m.link else "starting"),
                "inflight": m.link.inflight if m.link else 0,
                "served": m.link.served if m.link else 0,
                "pid": getattr(m.replica, "pid", None),
                "started_at": m.started_at,
            }
            for m in self.members.values()
        ]

    # scaling --------------------------------------------------------------

    def scale(self, desired: int) -> None:
        """Converge on ``desired`` replicas; returns at once."""
        if self.stopping or self.failure:
            return
        self.desired = desired
        # Even at zero, calls queue: the pool's on_demand wakes a replica for them.
        self.pool.unavailable = None
        active = [m for m in self.members.values() if not m.retiring]
        for _ in range(desired - len(active)):
            self._start_member()
        if len(active) > desired:
            # Retire starting replicas first, then the least busy ready ones.
            active.sort(key=lambda m: (m.link is not None, m.link.inflight if m.link else 0))
            for member in active[: len(active) - desired]:
                self._retire(member)

    async def wait_ready(self) -> None:
        """Until one replica serves, or raise ReplicaFailed with the reason."""
        await asyncio.shield(self._first_ready)

    def _start_member(self) -> None:
        member = Member(id=f"{self.spec.name}-v{self.version}-{next(self._ids)}")
        self.members[member.id] = member
        member.task = asyncio.get_running_loop().create_task(self._run(member))

    def _retire(self, member: Member) -> None:
        member.retiring = True
        if member.link is not None:
            self.pool.remove(member.link)
        asyncio.get_running_loop().create_task(self._stop_member(member))

    async def _stop_member(self, member: Member) -> None:
        while member.link is not None and member.link.inflight:
            await asyncio.sleep(0.02)
        if member.replica is not None:
            await member.replica.stop()
        elif member.task is not None:
            member.task.cancel()

    # one replica's life -----------------------------------------------------

    def _replica_spec(self, replica_id: str) -> ReplicaSpec:
        s = self.spec
        return ReplicaSpec(
            function=s.name,
            version=self.version,
            replica_id=replica_id,
            code_dir=self.code_dir,
            handler_file=s.handler.file,
            handler_name=s.handler.name,
            python=self.python,
            environment=dict(s.environment),
            concurrency=s.concurrency,
            cpu=s.limits.cpu or s.requests.cpu,
            memory=s.limits.memory or s.requests.memory,
            gpu=max(s.requests.gpu, s.limits.gpu),
        )

    async def _run(self, member: Member) -> None:
        backoff = 0.5
        try:
            while not (self.stopping or member.retiring):
                started = time.monotonic()
                self.log("gateway", f"starting replica {member.id}")
                try:
                    member.replica = await self.backend.start(
                        self._replica_spec(member.id), self.log
                    )
                    await member.replica.ready()
                except ReplicaFailed as exc:
                    self._fail(member, exc.reason)
                    return
                if self.stopping or member.retiring:
                    await member.replica.stop()
                    return
                member.link = ReplicaLink(member.id, member.replica.address, self.spec.concurrency)
                self.cold_starts += 1
                self.log(
                    "gateway", f"replica {member.id} ready in {time.monotonic() - started:.2f}s"
                )
                self.pool.add(member.link)
                if not self._first_ready.done():
                    self._first_ready.set_result(None)
                reason = await member.replica.exited()
                self.pool.remove(member.link)
                member.link = None
                if self.stopping or member.retiring:
                    return
                self.restarts += 1
                self.log("gateway", f"replica {member.id} {reason}; restarting in {backoff:g}s")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        finally:
            self.members.pop(member.id, None)

    def _fail(self, member: Member, reason: str) -> None:
        self.log("gateway", f"replica {member.id} could not start:\n{reason.rstrip()}")
        if self.ready and not self.stopping:
            # Others serve: keep them, and say why this one is missing.
            self.failure = None
            member.retiring = True
            return
        self.failure = reason
        self.pool.unavailable = "the function failed to start"
        self.pool.reject_waiting(503, f"{self.spec.name!r} failed to start; see dcf function info")
        if not self._first_ready.done():
            self._first_ready.set_exception(ReplicaFailed(reason))
            self._first_ready.exception()  # retrieved here so an unawaited one is not reported
        if self.on_failure is not None:
            self.on_failure(reason)

    # the end ----------------------------------------------------------------

    async def stop(self, drain: bool = True) -> None:
        """Stop taking calls, let admitted ones finish (if ``drain``), end every replica."""
        self.stopping = True
        self.pool.unavailable = "the function is being removed"
        if drain:
            await self.pool.drained()
        members = list(self.members.values())
        for member in members:
            if member.link is not None:
                self.pool.remove(member.link)
        await asyncio.gather(
            *(m.replica.stop() for m in members if m.replica is not None),
            return_exceptions=True,
        )
        for member in members:
            if member.task is not None:
                member.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await member.task
