"""The function lifecycle: create, update, scale, delete, and restore after a restart.

Desired state lives in the registry; what runs lives in ``Deployment`` objects.
``routes`` is the data plane's table, swapped in one step when an update's
new replicas are ready, so no call ever finds a function half-switched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dcf.backends import Backend, ReplicaFailed
from dcf.config import FunctionSpec, Rollout
from dcf.gateway.build.environments import (
    Builder,
    BuildError,
    RequirementsError,
    check_requirements,
)
from dcf.gateway.build.sandbox import for_isolation as sandbox_for
from dcf.gateway.build.steps import BuildSteps
from dcf.gateway.build.unpack import ArchiveRefused, unpack
from dcf.gateway.lifecycle.deployment import Deployment
from dcf.gateway.lifecycle.registry import FunctionRecord, Registry
from dcf.gateway.lifecycle.rollout import RolloutRun, Verdict
from dcf.gateway.limits import Limits
from dcf.gateway.observe.logs import LogStore
from dcf.gateway.observe.metrics import Metrics
from dcf.gateway.routing.router import Pool
from dcf.gateway.routing.split import Split

Progress = Callable[[str], None]
REDACTED = "***"


class FunctionError(Exception):
    """A management request the gateway refuses: ``status`` and a message naming why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class FunctionState:
    name: str
    record: FunctionRecord
    live: Deployment | None = None
    deploying: asyncio.Task[None] | None = None
    starting: Deployment | None = None
    """The first version while its replicas start (before there is a live one)."""
    last_error: str | None = None
    retired: list[Deployment] = field(default_factory=list)
    rollout: RolloutRun | None = None
    """The canary rollout in progress, if one is."""
    last_rollout: dict | None = None
    """How the last rollout ended (promoted, or aborted and why), for ``rollout`` and info."""

    def __post_init__(self) -> None:
        self.invocations_before = self.record.invocations
        self.cold_starts_before = 0  # of versions no longer running: the counter never drops

    @property
    def cold_starts(self) -> int:
        running = [d for d in (self.live, *self.retired, self.canary) if d is not None]
        return self.cold_starts_before + sum(d.cold_starts for d in running)

    @property
    def canary(self) -> Deployment | None:
        return self.rollout.canary if self.rollout is not None else None

    def rollout_info(self) -> dict:
        """The rollout in progress, else how the last one ended, else ``state: none``."""
        if self.rollout is not None:
            return self.rollout.info()
        return self.last_rollout or {"state": "none"}

    def shares(self) -> dict[int, int]:
        """Percent of calls per serving version."""
        if self.rollout is not None:
            return self.rollout.shares()
        return {self.live.version: 100} if self.live is not None else {}

    @property
    def status(self) -> str:
        live = self.live
        if live is None:
            if self.deploying is not None:
                return "Not Ready" if self.starting is not None else "Building"
            return "Failed"
        if live.failure:
            return "Failed"
        if live.ready:
            return "Ready"
        if live.desired == 0:
            return "Scaled to zero"
        return "Not Ready"


class FunctionManager:
    def __init__(
        self,
        home: Path,
        backend: Backend,
        logs: LogStore,
        metrics: Metrics,
        limits: Limits | None = None,
        isolation: str = "process",
    ) -> None:
        self.home = home
        self.backend = backend
        self.logs = logs
        self.metrics = metrics
        self.limits = limits or Limits()
        self.registry = Registry(home / "dcf.db")
        build_sandbox = sandbox_for(isolation)  # builds run code the gateway did not write
        self.builder = Builder(home / "envs", self.limits.install_timeout, build_sandbox)
        self.build_steps = BuildSteps(home / "builds", build_sandbox)
        self.code_root = home / "functions"
        self.routes: dict[str, Pool | Split] = {}
        self.functions: dict[str, FunctionState] = {}
        self._unpacking: set[str] = set()
        """Names whose upload is being unpacked (a second deploy of one is refused)."""
        _remove_trash(self.code_root)
        # Told the spec that governs calls to a function (None once it is gone), before
        # any call can reach it: the gateway's function keys (security/keys.py) listen here.
        self.on_spec: Callable[[str, FunctionSpec | None], None] = lambda _name, _spec: None

    # reading ----------------------------------------------------------------

    def get(self, name: str) -> FunctionState:
        state = self.functions.get(name)
        if state is None:
            raise FunctionError(404, f"no function named {name!r}")
        return state

    def invocations(self, state: FunctionState) -> int:
        """Calls before this gateway started (registry) plus calls since (the metrics)."""
        return state.invocations_before + sum(self.metrics.calls(state.name).values())

    def info(self, name: str) -> dict:
        state = self.get(name)
        record, live = state.record, state.live
        spec = live.spec if live else FunctionSpec.model_validate(record.spec)
        shown = live or state.starting
        calls = self.metrics.calls(name)
        errors = sum(n for code, n in calls.items() if code >= 500)
        return {
            "name": name,
            "status": state.status,
            "version": live.version if live else record.version,
            "runtime": spec.runtime,
            "image": spec.image,
            "desc": spec.desc,
            "maintainer": spec.maintainer,
            "invocations": self.invocations(state),
            "errors": errors,
            "latency": self.metrics.latency_quantiles(name),
            "latency_total": self.metrics.latency_quantiles(name, recent=False),
            "replicas": {
                "min": record.min_replicas,
                "max": record.max_replicas,
                "desired": live.desired if live else 0,
                "ready": live.ready if live else 0,
                "restarts": live.restarts if live else 0,
                "last_restart": live.last_restart if live else None,
                "list": (shown.replicas_info() if shown else [])
                + (state.canary.replicas_info() if state.canary else []),
            },
            "inflight": live.pool.inflight if live else 0,
            "queued": live.pool.queued if live else 0,
            "failure": (live.failure if live else None) or record.failure,
            "last_error": state.last_error,
            "updating": state.deploying is not None and live is not None,
            "rollout": state.rollout_info(),
            "spec": redacted(spec),
            "created_at": record.created_at,
            "updated_at": record.updated_at,
        }

    def list(self) -> list[dict]:
        return [self.summary(name) for name in sorted(self.functions)]

    def summary(self, name: str) -> dict:
        state = self.functions[name]
        live = state.live
        spec = live.spec if live else FunctionSpec.model_validate(state.record.spec)
        return {
            "name": name,
            "status": state.status,
            "runtime": spec.runtime,
            "image": spec.image,
            "maintainer": spec.maintainer,
            "invocations": self.invocations(state),
            "replicas": {
                "ready": live.ready if live else 0,
                "desired": live.desired if live else 0,
            },
            "version": live.version if live else state.record.version,
            "rollout": _brief(state),
        }

    def snapshot(self) -> list[dict]:
        """Gauges for /metrics."""
        out = []
        for name, state in self.functions.items():
            live = state.live
            out.append(
                {
                    "name": name,
                    "inflight": live.pool.inflight if live else 0,
                    "queued": live.pool.queued if live else 0,
                    "ready": live.ready if live else 0,
                    "desired": live.desired if live else 0,
                    "cold_starts": state.cold_starts,
                    "shares": state.shares(),
                }
            )
        return out

    # changing -----------------------------------------------------------------

    async def deploy(
        self,
        spec: FunctionSpec,
        archive: bytes,
        update: bool,
        progress: Progress | None = None,
        canary: int | None = None,
    ) -> asyncio.Task[None]:
        """Accept a new function or version; the returned task builds and switches to it,
        or starts it as a canary (``canary`` percent, or the spec's ``rollout``)."""
        name = spec.name
        state = self.functions.get(name)
        if state is not None and not update:
            raise FunctionError(
                409, f"function {name!r} already exists; use --update (PUT) to replace it"
            )
        if state is not None and state.rollout is not None:
            raise FunctionError(409, _rollout_busy(state))
        if (state is not None and state.deploying is not None) or name in self._unpacking:
            raise FunctionError(409, f"a deploy of {name!r} is already in progress")
        plan = self._plan(spec, state, canary)
        version = self.registry.next_version(name)
        code_dir = self.code_root / name / f"v{version}"
        self._unpacking.add(name)
        try:
            # Off the event loop: a large upload must not stall every other call.
            code_hash = await asyncio.to_thread(self._unpack, archive, code_dir, spec)
        finally:
            self._unpacking.discard(name)
        if not code_dir.is_dir():
            raise FunctionError(409, f"function {name!r} was deleted during this deploy")
        state = self.functions.get(name)  # it may have been deleted meanwhile
        self.registry.add_version(name, version, spec.model_dump(mode="json"), code_hash)
        if state is None:
            self.registry.insert(
                name, spec.model_dump(mode="json"), spec.replicas.min, spec.replicas.max or 1
            )
            record = self.registry.get(name)
            assert record is not None
            state = self.functions[name] = FunctionState(name, record)
            self.on_spec(name, spec)
            self.routes[name] = _unavailable(spec, "it is still being built")
        state.last_error = None
        task = asyncio.get_running_loop().create_task(
            self._deploy(state, spec, version, code_dir, progress or (lambda _: None), plan)
        )
        state.deploying = task
        return task

    def _plan(
        self, spec: FunctionSpec, state: FunctionState | None, canary: int | None
    ) -> Rollout | None:
        """The rollout an update is to follow, or None for a switch of every replica at once."""
        healthy = state is not None and state.live is not None and not state.live.failure
        if canary is None and (spec.rollout is None or not healthy):
            return None  # nothing serving to compare a canary with: it just serves
        if state is None or state.live is None or state.live.failure:
            raise FunctionError(
                409, f"function {spec.name!r} has no version serving to compare a canary with"
            )
        plan = spec.rollout or Rollout()
        if canary is not None:
            try:
                plan = plan.starting_at(canary)
            except ValueError as exc:
                raise FunctionError(400, f"function {spec.name!r}: canary: {exc}") from None
        return plan

    async def _deploy(
        self,
        state: FunctionState,
        spec: FunctionSpec,
        version: int,
        code_dir: Path,
        progress: Progress,
        plan: Rollout | None = None,
        kept: bool = False,
    ) -> None:
        """Build (cached builds run nothing), start, then switch to or roll out ``version``;
        ``kept``: a kept version (rollback), whose code stays whatever happens."""
        name = spec.name

        def log(message: str) -> None:
            self.logs.write(name, "build", message)
            progress(message)

        deployment: Deployment | None = None
        try:
            log(f"deploying {name} version {version}")
            requirements = code_dir / "requirements.txt"
            reqs = requirements.read_text() if requirements.exists() else ""
            env_digest, python = await self.builder.build(reqs, log)
            run_dir = code_dir
            if spec.build:
                run_dir = await self.build_steps.build(code_dir, spec, env_digest, python, log)
            deployment = self._deployment(state, spec, version, run_dir, python)
            if state.live is None:
                # Calls made while the first replica starts wait for it instead of failing.
                self.routes[name] = deployment.pool
                state.starting = deployment
            deployment.scale(max(spec.replicas.min, 1))
            await deployment.wait_ready()
            if plan is not None and state.live is not None and not state.live.failure:
                log(f"{name} version {version} is ready")
                self._start_rollout(state, deployment, plan, 0)
            else:
                self._switch(state, deployment, spec)
                log(f"{name} version {version} is ready")
        except Exception as exc:  # noqa: BLE001 - whatever failed, it is all undone
            # A full disk, say: no reason is too odd to be told, or to leave state behind.
            expected = isinstance(exc, (BuildError, ReplicaFailed))
            reason = str(exc) if expected else f"the deploy failed: {type(exc).__name__}: {exc}"
            if deployment is not None:
                await deployment.stop(drain=False)
            if state.live is not None:
                state.last_error = (
                    f"update to version {version} failed; still serving version"
                    f" {state.live.version}:\n{reason}"
                )
                log(state.last_error)
            else:
                state.record.failure = reason
                self.registry.set_failure(name, reason)
                self.routes[name] = _unavailable(spec, "the function failed to start")
                log(f"{name} failed:\n{reason}")
            if not kept:
                self._remove_code(code_dir)
                self.registry.delete_version(name, version)
        except asyncio.CancelledError:
            if deployment is not None:
                await deployment.stop(drain=False)
            raise
        finally:
            state.deploying = None
            state.starting = None

    def _switch(self, state: FunctionState, deployment: Deployment, spec: FunctionSpec) -> None:
        old = state.live
        min_r, max_r = spec.replicas.min, spec.replicas.max or 1
        state.live = deployment
        self.on_spec(state.name, spec)
        self.routes[state.name] = deployment.pool
        self.registry.set_live(
            state.name, deployment.version, spec.model_dump(mode="json"), min_r, max_r
        )
        state.record.version = deployment.version
        state.record.spec = spec.model_dump(mode="json")
        state.record.min_replicas, state.record.max_replicas = min_r, max_r
        state.record.failure = None
        if old is not None:
            state.retired.append(old)
            asyncio.get_running_loop().create_task(self._retire(state, old))

        self._trim(state)

    async def _retire(self, state: FunctionState, old: Deployment) -> None:
        await old.stop(drain=True)
        with contextlib.suppress(ValueError):
            state.retired.remove(old)
            state.cold_starts_before += old.cold_starts
        if self.functions.get(state.name) is state:
            self._trim(state)

    def _trim(self, state: FunctionState) -> None:
        """Keep the newest ``keep_versions`` versions, and every one that runs; remove the
        rest (the upload only: a build's directory is a cache other versions may share)."""
        running = {d.version for d in (state.live, state.canary, *state.retired) if d is not None}
        if state.deploying is not None:
            return  # the version being deployed is not running yet; trim after it
        kept = len(running)
        for item in self.registry.versions(state.name):
            version = item["version"]
            if version in running:
                continue
            if kept < self.limits.keep_versions:
                kept += 1
                continue
            self.registry.delete_version(state.name, version)
            self._remove_code(self.code_root / state.name / f"v{version}")
            self.logs.write(state.name, "gateway", f"version {version} removed (--keep-versions)")

    # versions and rollback -----------------------------------------------------------

    def _kept(self, name: str) -> list[dict]:
        """Versions whose code is on disk, newest first (a gateway before kept versions
        removed the code of each replaced one; its rows are not versions to go back to)."""
        return [
            item
            for item in self.registry.versions(name)
            if (self.code_root / name / f"v{item['version']}").is_dir()
        ]

    def versions(self, name: str) -> list[dict]:
        """The kept versions, newest first, with whether each serves and its share."""
        state = self.get(name)
        shares = state.shares()
        role = {}
        if state.live is not None:
            role[state.live.version] = "stable" if state.rollout else "serving"
        if state.canary is not None:
            role[state.canary.version] = "canary"
        return [
            {
                "version": item["version"],
                "created_at": item["created_at"],
                "code_hash": item["code_hash"],
                "serving": item["version"] in shares,
                "share": shares.get(item["version"], 0),
                "role": role.get(item["version"], "kept"),
            }
            for item in self._kept(name)
        ]

    async def rollback(self, name: str, to: int | None) -> dict:
        """Make a kept version serve again, from its code and cached build, with the same
        switch as an update (no call fails); returns ``info`` once it serves."""
        state = self.get(name)
        if state.rollout is not None:
            raise FunctionError(409, _rollout_busy(state))
        if state.deploying is not None or name in self._unpacking:
            raise FunctionError(409, f"a deploy of {name!r} is in progress; roll back after it")
        current = state.live.version if state.live is not None else state.record.version
        kept = {item["version"]: item for item in self._kept(name)}
        if to is None:
            older = [v for v in kept if v < current]
            if not older:
                raise FunctionError(409, f"function {name!r} has no version older than {current}")
            to = max(older)
        if to not in kept:
            have = ", ".join(str(v) for v in sorted(kept, reverse=True)) or "none"
            raise FunctionError(404, f"function {name!r} has no version {to} kept (kept: {have})")
        if to == current and state.live is not None and not state.live.failure:
            raise FunctionError(409, f"version {to} of {name!r} is already serving")
        spec = FunctionSpec.model_validate(kept[to]["spec"])
        code_dir = self.code_root / name / f"v{to}"
        self.logs.write(name, "gateway", f"rolling back from version {current} to {to}")
        task = asyncio.get_running_loop().create_task(
            self._deploy(state, spec, to, code_dir, lambda _: None, kept=True)
        )
        state.last_error = None
        state.deploying = task
        await asyncio.wait({task})  # not cancelled with this request: the switch completes
        if self.functions.get(name) is not state:
            raise FunctionError(404, f"function {name!r} was deleted during the rollback")
        if state.live is None or state.live.version != to:
            raise FunctionError(
                500, state.last_error or state.record.failure or f"rollback to {to} failed"
            )
        return self.info(name)

    # rollouts --------------------------------------------------------------------------

    def _start_rollout(
        self,
        state: FunctionState,
        canary: Deployment,
        plan: Rollout,
        step: int,
        resumed: bool = False,
    ) -> None:
        """Route ``plan``'s share to ``canary`` beside the live version, and judge it."""
        assert state.live is not None
        run = RolloutRun(plan, state.live, canary, step)
        state.rollout = run
        state.last_rollout = None
        self.routes[state.name] = run.split
        self.registry.save_rollout(
            state.name, state.live.version, canary.version, plan.model_dump(mode="json"), run.step
        )
        steps = ", ".join(f"{s}%" for s in plan.steps)
        what = "resumed" if resumed else "started"
        self.logs.write(
            state.name,
            "rollout",
            f"rollout of v{canary.version} {what}: {run.share}% of calls"
            f" (steps {steps}, every {plan.interval:g}s; stable v{state.live.version})",
        )

        def stepped(index: int, verdict: Verdict) -> None:
            self.registry.save_rollout(
                state.name, run.stable.version, canary.version, plan.model_dump(mode="json"), index
            )
            self.logs.write(
                state.name,
                "rollout",
                f"canary v{canary.version} at {run.share}% of calls ({_figures(verdict.figures)})",
            )

        async def ended(promote: bool, reason: str, figures: dict) -> None:
            if promote:
                self._promote(state, reason, figures)
            else:
                self._abort(state, reason, figures)

        run.task = asyncio.get_running_loop().create_task(run.run(stepped, ended))

    def _end(self, state: FunctionState) -> RolloutRun:
        run = state.rollout
        assert run is not None
        state.rollout = None
        if run.task is not None and run.task is not asyncio.current_task():
            run.task.cancel()
        self.registry.end_rollout(state.name)
        return run

    def _promote(self, state: FunctionState, reason: str, figures: dict) -> None:
        run = self._end(state)
        canary = run.canary
        state.last_rollout = {
            "state": "promoted",
            "stable": run.stable.version,
            "canary": canary.version,
            "reason": reason,
            "figures": figures,
            "ended_at": time.time(),
        }
        self._switch(state, canary, canary.spec)
        judged = f" ({_figures(figures)})" if figures else ""
        self.logs.write(state.name, "rollout", f"{reason}: 100% of calls{judged}")

    def _abort(self, state: FunctionState, reason: str, figures: dict) -> None:
        run = self._end(state)
        stable = run.stable
        # All calls back on the stable version at once; those already on the canary finish.
        self.routes[state.name] = stable.pool
        state.last_rollout = {
            "state": "aborted",
            "stable": stable.version,
            "canary": run.canary.version,
            "reason": reason,
            "figures": figures,
            "ended_at": time.time(),
        }
        state.last_error = reason
        self.logs.write(state.name, "rollout", f"{reason}; all calls back on v{stable.version}")
        state.retired.append(run.canary)
        asyncio.get_running_loop().create_task(self._retire(state, run.canary))

    def rollout(self, name: str) -> dict:
        return self.get(name).rollout_info()

    def decide(self, name: str, promote: bool) -> dict:
        """Promote or abort the rollout in progress by hand."""
        state = self.get(name)
        run = state.rollout
        if run is None:
            raise FunctionError(409, f"function {name!r} has no rollout in progress")
        if promote:
            self._promote(state, f"canary v{run.canary.version} promoted by hand", {})
        else:
            self._abort(state, f"canary v{run.canary.version} aborted by hand", {})
        return state.rollout_info()

    def _on_failure(self, state: FunctionState, deployment: Deployment | None, reason: str) -> None:
        if deployment is not None and deployment is state.canary:
            return  # the rollout's judge sees it and aborts (rollout.py)
        if deployment is not None and deployment is state.live:
            state.record.failure = reason
            self.registry.set_failure(state.name, reason)

    def _on_demand(self, state: FunctionState) -> None:
        """A call is waiting: wake a function that was scaled to zero."""
        live = state.live
        if live is not None and live.desired == 0 and not live.failure:
            self.logs.write(state.name, "gateway", "call waiting: scaling up from zero")
            live.scale(1)

    async def delete(self, name: str) -> None:
        """Remove a function. Routing, memory, the registry and its code directory forget
        it in one step, before anything is awaited, so the name can be created again at
        once and no caller ever sees it half deleted; then its build and replicas stop."""
        state = self.get(name)
        self.routes.pop(name, None)
        self.functions.pop(name, None)
        self.on_spec(name, None)
        self.registry.delete(name)
        trash = self._trash(name)
        if state.rollout is not None and state.rollout.task is not None:
            state.rollout.task.cancel()
        stopping = [
            d for d in (state.live, *state.retired, state.starting, state.canary) if d is not None
        ]
        for deployment in stopping:
            deployment.pool.reject_waiting(404, f"function {name!r} was deleted")
        waits = [d.stop(drain=False) for d in stopping]
        if state.deploying is not None:
            state.deploying.cancel()  # kills its installer or build commands
            waits.append(state.deploying)
        await asyncio.gather(*waits, return_exceptions=True)
        if name not in self.functions and name not in self._unpacking:  # not created anew
            self.metrics.forget(name)
            self.logs.remove(name)
        if trash is not None:
            await asyncio.to_thread(shutil.rmtree, trash, True)

    def _trash(self, name: str) -> Path | None:
        """Move a deleted function's code out of the way of a new one of the same name."""
        code = self.code_root / name
        trash = self.code_root / f".deleted-{name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(code, trash)
        except FileNotFoundError:
            return None
        return trash

    def scale(self, name: str, min_replicas: int | None, max_replicas: int | None) -> dict:
        state = self.get(name)
        low = state.record.min_replicas if min_replicas is None else min_replicas
        high = state.record.max_replicas if max_replicas is None else max_replicas
        if low < 0 or high < 1:
            raise FunctionError(400, "replicas: min must be 0 or more and max 1 or more")
        if low > high:
            raise FunctionError(400, f"replicas: min ({low}) is more than max ({high})")
        if high > 64:
            raise FunctionError(400, f"replicas: max ({high}) is more than 64")
        self.registry.set_bounds(name, low, high)
        state.record.min_replicas, state.record.max_replicas = low, high
        live = state.live
        if live is not None and not live.failure:
            live.scale(min(max(live.desired, low), high))
        return self.info(name)

    # restart ------------------------------------------------------------------------

    async def restore(self) -> None:
        """Bring back every function the registry holds, as it was before a restart."""
        tasks = []
        for record in self.registry.all():
            state = self.functions[record.name] = FunctionState(record.name, record)
            self.on_spec(record.name, FunctionSpec.model_validate(record.spec))
            if record.version == 0:
                self.routes[record.name] = _unavailable(
                    FunctionSpec.model_validate(record.spec), "the function failed to start"
                )
                if not record.failure:
                    record.failure = "the gateway stopped during the first deploy; run create again"
                    self.registry.set_failure(record.name, record.failure)
                continue
            tasks.append(self._restore(state))
        await asyncio.gather(*tasks)

    async def _restore(self, state: FunctionState) -> None:
        record = state.record
        spec = FunctionSpec.model_validate(record.spec)
        code_dir = self.code_root / record.name / f"v{record.version}"
        log = lambda message: self.logs.write(record.name, "build", message)  # noqa: E731
        try:
            reqs_file = code_dir / "requirements.txt"
            env_digest, python = await self.builder.build(
                reqs_file.read_text() if reqs_file.exists() else "", log
            )
            if spec.build:  # the cached build, or the same commands run again
                code_dir = await self.build_steps.build(code_dir, spec, env_digest, python, log)
        except (BuildError, OSError) as exc:
            record.failure = f"could not restore after restart: {exc}"
            self.registry.set_failure(record.name, record.failure)
            return
        deployment = self._deployment(state, spec, record.version, code_dir, python)
        state.live = deployment
        self.routes[record.name] = deployment.pool
        deployment.scale(record.min_replicas)
        saved = self.registry.rollout(record.name)
        if saved is not None:
            await self._resume_rollout(state, saved)

    async def _resume_rollout(self, state: FunctionState, saved: dict) -> None:
        """A rollout the gateway stopped in: the canary back, at the step it had reached."""
        name = state.name
        version = saved["canary"]
        kept = {item["version"]: item for item in self.registry.versions(name)}
        code_dir = self.code_root / name / f"v{version}"
        if version not in kept or not code_dir.is_dir():
            self.registry.end_rollout(name)
            return
        spec = FunctionSpec.model_validate(kept[version]["spec"])
        log = lambda message: self.logs.write(name, "build", message)  # noqa: E731
        try:
            reqs_file = code_dir / "requirements.txt"
            env_digest, python = await self.builder.build(
                reqs_file.read_text() if reqs_file.exists() else "", log
            )
            if spec.build:
                code_dir = await self.build_steps.build(code_dir, spec, env_digest, python, log)
        except (BuildError, OSError) as exc:
            self.registry.end_rollout(name)
            state.last_error = f"rollout of v{version} not resumed after restart: {exc}"
            return
        canary = self._deployment(state, spec, version, code_dir, python)
        canary.scale(max(1, spec.replicas.min))
        plan = Rollout.model_validate(saved["plan"])
        self._start_rollout(state, canary, plan, saved["step"], resumed=True)

    def _deployment(
        self, state: FunctionState, spec: FunctionSpec, version: int, code_dir: Path, python: str
    ) -> Deployment:
        """A version of ``state``'s function, wired to its log, metrics and lifecycle."""
        name = state.name
        deployment = Deployment(
            spec,
            version,
            str(code_dir),
            python,
            self.backend,
            lambda source, msg: self.logs.write(name, source, msg),
            self.limits,
        )
        deployment.on_failure = lambda reason: self._on_failure(state, deployment, reason)
        deployment.pool.on_batch = self.metrics.batch_observer(name)
        # It acts on the live version only, so it can be set before this one is live.
        deployment.pool.on_demand = lambda: self._on_demand(state)
        return deployment

    def flush(self) -> None:
        """Persist invocation counts (the hot path only counts in memory)."""
        self.registry.set_invocations(
            {name: self.invocations(state) for name, state in self.functions.items()}
        )

    async def close(self) -> None:
        deployments = []
        deploying = []
        for state in self.functions.values():
            if state.deploying is not None:
                state.deploying.cancel()
                deploying.append(state.deploying)
            if state.rollout is not None and state.rollout.task is not None:
                state.rollout.task.cancel()  # its state stays in the registry: it resumes
            deployments.extend(
                d for d in (state.live, *state.retired, state.canary) if d is not None
            )
        # A cancelled deploy kills its build commands before the gateway exits.
        await asyncio.gather(*deploying, return_exceptions=True)
        await asyncio.gather(*(d.stop(drain=False) for d in deployments), return_exceptions=True)
        self.registry.close()

    def _unpack(self, archive: bytes, code_dir: Path, spec: FunctionSpec) -> str:
        """The upload into ``code_dir``, checked, and its hash; FunctionError (nothing
        left) otherwise."""
        try:
            unpack(archive, code_dir, spec.handler.file, self.limits)
            requirements = code_dir / "requirements.txt"
            if requirements.is_file():
                try:
                    check_requirements(requirements.read_text())
                except UnicodeDecodeError:
                    raise RequirementsError("requirements.txt is not UTF-8 text") from None
        except ArchiveRefused as exc:
            self._remove_code(code_dir)
            raise FunctionError(exc.status, f"function {spec.name!r}: {exc.message}") from None
        except RequirementsError as exc:
            self._remove_code(code_dir)
            raise FunctionError(400, f"function {spec.name!r}: {exc}") from None
        return hashlib.sha256(archive).hexdigest()[:16]

    def _remove_code(self, code_dir: Path) -> None:
        shutil.rmtree(code_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # the function's directory, once it is empty
            code_dir.parent.rmdir()


def redacted(spec: FunctionSpec) -> dict:
    """A spec as the API shows it: ``environment`` names, never their values (secrets)."""
    shown = spec.model_dump(mode="json")
    shown["environment"] = {key: REDACTED for key in spec.environment}
    return shown


def _rollout_busy(state: FunctionState) -> str:
    run = state.rollout
    assert run is not None
    return (
        f"function {state.name!r} has a rollout of version {run.canary.version} in progress"
        f" ({run.share}% of calls, step {run.step + 1} of {len(run.plan.steps)}); finish it"
        f" first: dcf function promote {state.name} or dcf function abort {state.name}"
    )


def _brief(state: FunctionState) -> dict | None:
    """The rollout in a line of the list (the dashboard's rollout bar)."""
    if state.rollout is not None:
        run = state.rollout
        return {
            "state": "running",
            "stable": run.stable.version,
            "canary": run.canary.version,
            "share": run.share,
            "steps": run.plan.steps,
        }
    last = state.last_rollout
    if last is None:
        return None
    return {k: last[k] for k in ("state", "stable", "canary", "reason")}


def _figures(figures: dict) -> str:
    if not figures:
        return ""
    parts = [
        f"{figures['calls']} calls, error rate {figures['error_rate']:.2f}"
        f" vs {figures['stable_error_rate']:.2f}"
    ]
    if figures.get("p95") is not None and figures.get("stable_p95") is not None:
        parts.append(f"p95 {figures['p95'] * 1000:.1f}ms vs {figures['stable_p95'] * 1000:.1f}ms")
    return ", ".join(parts)


def _unavailable(spec: FunctionSpec, why: str) -> Pool:
    """The route of a function with nothing to serve yet: calls get 503 naming why."""
    pool = Pool(spec.name, spec.max_queue, spec.timeout)
    pool.unavailable = why
    return pool


def _remove_trash(code_root: Path) -> None:
    """Code of functions whose delete a stopped gateway did not finish removing."""
    if code_root.is_dir():
        for trash in code_root.glob(".deleted-*"):
            shutil.rmtree(trash, ignore_errors=True)
