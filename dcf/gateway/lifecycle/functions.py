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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dcf.backends import Backend, ReplicaFailed
from dcf.config import FunctionSpec
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
from dcf.gateway.limits import Limits
from dcf.gateway.observe.logs import LogStore
from dcf.gateway.observe.metrics import Metrics
from dcf.gateway.routing.router import Pool

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

    def __post_init__(self) -> None:
        self.invocations_before = self.record.invocations
        self.cold_starts_before = 0  # of versions no longer running: the counter never drops

    @property
    def cold_starts(self) -> int:
        running = [d for d in (self.live, *self.retired) if d is not None]
        return self.cold_starts_before + sum(d.cold_starts for d in running)

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
        self.routes: dict[str, Pool] = {}
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
                "list": shown.replicas_info() if shown else [],
            },
            "inflight": live.pool.inflight if live else 0,
            "queued": live.pool.queued if live else 0,
            "failure": (live.failure if live else None) or record.failure,
            "last_error": state.last_error,
            "updating": state.deploying is not None and live is not None,
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
                }
            )
        return out

    # changing -----------------------------------------------------------------

    async def deploy(
        self, spec: FunctionSpec, archive: bytes, update: bool, progress: Progress | None = None
    ) -> asyncio.Task[None]:
        """Accept a new function or version; the returned task builds and switches to it."""
        name = spec.name
        state = self.functions.get(name)
        if state is not None and not update:
            raise FunctionError(
                409, f"function {name!r} already exists; use --update (PUT) to replace it"
            )
        if (state is not None and state.deploying is not None) or name in self._unpacking:
            raise FunctionError(409, f"a deploy of {name!r} is already in progress")
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
            self._deploy(state, spec, version, code_dir, progress or (lambda _: None))
        )
        state.deploying = task
        return task

    async def _deploy(
        self,
        state: FunctionState,
        spec: FunctionSpec,
        version: int,
        code_dir: Path,
        progress: Progress,
    ) -> None:
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
            self._remove_code(code_dir)
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

    async def _retire(self, state: FunctionState, old: Deployment) -> None:
        await old.stop(drain=True)
        with contextlib.suppress(ValueError):
            state.retired.remove(old)
            state.cold_starts_before += old.cold_starts
        # The upload only: a build's directory is a cache other versions may share.
        self._remove_code(self.code_root / state.name / f"v{old.version}")

    def _on_failure(self, state: FunctionState, deployment: Deployment | None, reason: str) -> None:
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
        stopping = [d for d in (state.live, *state.retired, state.starting) if d is not None]
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
            deployments.extend(d for d in (state.live, *state.retired) if d is not None)
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
