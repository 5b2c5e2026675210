"""One version of a function, running: its replicas and the pool that routes to them.

It keeps ``desired`` replicas alive: starts missing ones, restarts one that
dies (with backoff, reset once a replica has served for ``healthy_after``
seconds), replaces one that stops answering (the pool's liveness check), and
retires extra ones only after their calls finish. A replica that cannot start
(the handler fails to import, say) fails the deployment with the reason
instead of looping.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dcf.backends import Backend, Replica, ReplicaFailed, ReplicaSpec
from dcf.config import FunctionSpec
from dcf.gateway.build.environments import normalise
from dcf.gateway.limits import Limits
from dcf.gateway.routing.router import Pool, ReplicaLink

Log = Callable[[str, str], None]
"""(source, message) → the function's log."""

RESTART_BACKOFF = 0.5
"""Seconds before the first restart of a replica that died; doubles up to 30 s, and starts
again from here once a replica has served for ``Limits.healthy_after`` seconds."""


@dataclass
class Member:
    id: str
    task: asyncio.Task[None] | None = None
    replica: Replica | None = None
    link: ReplicaLink | None = None
    retiring: bool = False
    started_at: float = field(default_factory=time.time)
    why: str | None = None
    """Why the gateway ended its replica (it stopped answering), for the log and ``info``."""


class Deployment:
    def __init__(
        self,
        spec: FunctionSpec,
        version: int,
        code_dir: str,
        python: str,
        backend: Backend,
        log: Log,
        limits: Limits | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.spec = spec
        self.version = version
        self.code_dir = code_dir
        self.python = python
        self.requirements = tuple(normalise(_read(Path(code_dir) / "requirements.txt")))
        self.backend = backend
        self.log = log
        self.pool = Pool(spec.name, spec.max_queue, spec.timeout, self.limits.unresponsive_after)
        self.pool.stream_idle = spec.stream_idle_timeout
        self.pool.version = version
        self.members: dict[str, Member] = {}
        self.desired = 0
        self.failure: str | None = None
        self.restarts = 0
        self.last_restart: str | None = None
        """Why the last replica was restarted, for ``info``."""
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
                "address": m.replica.address if m.replica else None,
                "detail": m.replica.detail if m.replica else None,
                "started_at": m.started_at,
                **(m.replica.where() if m.replica else {"node": "pending"}),
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
            # New calls go elsewhere; the connection stays open for the calls on it.
            self.pool.withdraw(member.link)
        asyncio.get_running_loop().create_task(self._stop_member(member))

    async def _stop_member(self, member: Member) -> None:
        link = member.link
        if link is not None:
            # Every call admitted before the retire has met its deadline by then.
            left = await self.pool.settled(link, self.spec.timeout)
            if left:
                self.log(
                    "gateway",
                    f"replica {member.id} stopped with {left} call{'s' if left > 1 else ''}"
                    f" still in it after the timeout of {self.spec.timeout:g}s",
                )
            self.pool.remove(link)
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
            cpu=s.requests.cpu if s.requests.cpu is not None else s.limits.cpu,
            memory=s.requests.memory or s.limits.memory,
            memory_limit=s.limits.memory or s.requests.memory,
            gpu=max(s.requests.gpu, s.limits.gpu),
            resources=dict(s.resources),
            placement=s.placement,
            requirements=self.requirements,
            cpu_limit=s.limits.cpu,
            pids=s.limits.pids,
            tmp_size=s.limits.ephemeral_storage,
            network=s.network,
        )

    async def _start(self, member: Member) -> Replica:
        """A new replica, ready within the function's start timeout (or ReplicaFailed)."""
        replica = member.replica = await self.backend.start(self._replica_spec(member.id), self.log)
        try:
            await asyncio.wait_for(replica.ready(), self.spec.start_timeout)
        except asyncio.TimeoutError:
            waiting = f" (it was {replica.detail})" if replica.detail else ""
            await replica.stop(grace=1.0)
            raise ReplicaFailed(
                f"replica {member.id} was not ready within the start timeout of"
                f" {self.spec.start_timeout:g}s{waiting}"
            ) from None
        except ReplicaFailed:
            raise
        except Exception as exc:
            # Whatever went wrong, the replica may be running: it must not outlive the failure.
            await replica.stop(grace=1.0)
            raise ReplicaFailed(_unexpected(member.id, exc)) from exc
        return replica

    async def _run(self, member: Member) -> None:
        backoff = RESTART_BACKOFF
        try:
            while not (self.stopping or member.retiring):
                started = time.monotonic()
                self.log("gateway", f"starting replica {member.id}")
                try:
                    replica = await self._start(member)
                except Exception as exc:  # noqa: BLE001 - any start error counts as a failure
                    reason = exc.reason if isinstance(exc, ReplicaFailed) else None
                    reason = reason or _unexpected(member.id, exc)
                    if not self.ready or self.stopping:
                        self._fail(member, reason)
                        return
                    # Others serve, so the function is not failed: this replica is still
                    # wanted (a node lost mid-restart, say) and tries again, backing off.
                    self.last_restart = f"replica {member.id} could not start: {reason}"
                    self.log(
                        "gateway",
                        f"replica {member.id} could not start (trying again in {backoff:g}s):"
                        f"\n{reason.rstrip()}",
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                if self.stopping or member.retiring:
                    await replica.stop()
                    return
                link = member.link = ReplicaLink(
                    member.id, replica.address, self.spec.concurrency, replica.secret
                )
                link.on_lost = functools.partial(self._lost, member, link)
                link.end_reason = functools.partial(_end_reason, replica)
                link.on_unresponsive = functools.partial(self._unresponsive, member, link)
                self.cold_starts += 1
                where = replica.where()
                node = where.get("node_ip") or where["node"]
                self.log(
                    "gateway",
                    f"replica {member.id} ready"
                    + (f" on {node}" if node != "local" else "")
                    + f" in {time.monotonic() - started:.2f}s",
                )
                self.pool.add(link)
                if not self._first_ready.done():
                    self._first_ready.set_result(None)
                serving = time.monotonic()
                reason = await replica.exited()
                self.pool.remove(link)
                member.link = None
                if self.stopping or member.retiring:
                    return
                self.restarts += 1
                if time.monotonic() - serving >= self.limits.healthy_after:
                    backoff = RESTART_BACKOFF  # it had recovered: a new crash starts afresh
                why = f"{member.why} (it {reason})" if member.why else reason
                member.why = None
                self.last_restart = f"replica {member.id} {why}"
                self.log("gateway", f"replica {member.id} {why}; restarting in {backoff:g}s")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        finally:
            self.members.pop(member.id, None)

    def _lost(self, member: Member, link: ReplicaLink) -> None:
        """The replica dropped its connection: route nothing more to it and replace it."""
        self.pool.remove(link)
        if member.replica is not None and not (self.stopping or member.retiring):
            self.log("gateway", f"lost the connection to replica {member.id}; replacing it")
            asyncio.get_running_loop().create_task(member.replica.stop(grace=1.0))

    def _unresponsive(self, member: Member, link: ReplicaLink, why: str) -> None:
        """The replica stopped answering: its calls fail, and a new one takes its place."""
        if member.link is not link or self.stopping or member.retiring:
            return
        member.why = f"answered nothing: {why}; replaced"
        self.log("gateway", f"replica {member.id} {member.why}")
        self.pool.remove(link)  # the calls still on it fail now (502)
        if member.replica is not None:
            asyncio.get_running_loop().create_task(member.replica.stop(grace=1.0))

    def _fail(self, member: Member, reason: str) -> None:
        self.log("gateway", f"replica {member.id} could not start:\n{reason.rstrip()}")
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
            left = await self.pool.drained(self.spec.timeout)
            if left:
                self.log(
                    "gateway",
                    f"version {self.version} stopped with {left} call{'s' if left > 1 else ''}"
                    f" still in it after the timeout of {self.spec.timeout:g}s",
                )
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


def _unexpected(replica_id: str, exc: BaseException) -> str:
    """The reason for a start that failed in a way the backend did not name."""
    return f"replica {replica_id} could not be started: {type(exc).__name__}: {exc}"


async def _end_reason(replica: Replica) -> str | None:
    """Why a replica that dropped a call ended, if it ends within a moment."""
    try:
        return await asyncio.wait_for(asyncio.shield(replica.exited()), 1.0)
    except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the 502 stands without it
        return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
