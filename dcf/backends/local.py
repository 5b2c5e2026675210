"""The embedded default: each replica is an OS process on this host.

It needs nothing but Python. Output is piped back line by line for the logs;
readiness comes over a pipe the moment the handler is loaded, with no polling.
Each replica runs in a session of its own: stopping it signals its whole
process group, and once it has exited the group is killed, so a child its
handler forked never outlives it, nor keeps its pipes and socket open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from collections import Counter

from dcf.backends.base import LogSink, ReplicaFailed, ReplicaSpec
from dcf.backends.environment import clean_environment
from dcf.sandbox import bwrap, probe
from dcf.sandbox.cgroups import Limits, ReplicaCgroup

DEFAULT_PIDS = 512
DEFAULT_TMP = 1 << 30

DRAIN_TIMEOUT = 1.0
"""Seconds the last output of a replica that exited is waited for."""


def _visible_gpus() -> list[str]:
    if "DCF_GPUS" in os.environ:
        return [g for g in os.environ["DCF_GPUS"].split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


class LocalReplica:
    def __init__(
        self,
        spec: ReplicaSpec,
        proc: asyncio.subprocess.Process,
        address: str,
        status: asyncio.StreamReader,
        pumps: list[asyncio.Task[None]],
        release: list[str],
        backend: LocalBackend,
        secret: bytes,
        cgroup: ReplicaCgroup | None = None,
        limits: dict[str, str] | None = None,
    ) -> None:
        self.id = spec.replica_id
        self.address = address
        # Even a socket in the gateway's private dir is reachable by another replica of
        # the same OS user, so every connection must prove it is the gateway.
        self.secret: bytes | None = secret
        self.detail: str | None = None
        self.pid = proc.pid
        self._proc = proc
        self._status = status
        self._pumps = pumps
        self._gpus = release
        self._backend = backend
        self._ended: asyncio.Future[str] | None = None
        self._cgroup = cgroup
        self._where = {"node": "local", "isolation": backend.isolation}
        if limits:
            self._where["limits"] = limits  # type: ignore[assignment]
            self._where["limits_by"] = backend.limits_by

    async def ready(self) -> None:
        # Whichever comes first: its report, or its exit (a child it forked while loading
        # may hold the report pipe open, so the pipe's end says nothing).
        report = asyncio.ensure_future(self._status.readline())
        ended = asyncio.ensure_future(self.exited())
        await asyncio.wait({report, ended}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        if not report.done():  # it exited: its last report is in the pipe already, if any
            await asyncio.wait({report}, timeout=DRAIN_TIMEOUT)
            report.cancel()
        line = report.result() if report.done() and not report.cancelled() else b""
        message = json.loads(line) if line.strip() else {}
        if message.get("ready"):
            return
        if "failed" in message:
            raise ReplicaFailed(message["failed"])
        reason = await self.exited()
        raise ReplicaFailed(f"replica {self.id} {reason} before it was ready")

    async def exited(self) -> str:
        """The replica's end, known from its exit status (never from its pipes or socket,
        which a child it forked may hold open long after it died)."""
        if self._ended is None:
            self._ended = asyncio.ensure_future(self._watch())
        return await asyncio.shield(self._ended)

    async def _watch(self) -> str:
        code = await self._proc.wait()
        # Whatever it started goes with it: it runs in a session of its own, so its
        # process group holds its children, which would keep its pipe and socket open.
        self._kill_group(signal.SIGKILL)
        # Drain the output so the last lines (often the reason) reach the log, but only
        # briefly: a child that escaped the group may hold the pipe open forever.
        _, pending = await asyncio.wait(self._pumps, timeout=DRAIN_TIMEOUT)
        for pump in pending:
            pump.cancel()
        self._backend._release(self._gpus)
        self._gpus = []
        shutil.rmtree(os.path.dirname(self.address), ignore_errors=True)
        if self._cgroup is not None:
            oom = self._cgroup.oom_killed()
            await _remove(self._cgroup)
            if oom:
                limit = self._where.get("limits", {}).get("memory", "?")  # type: ignore[union-attr]
                return f"was OOM-killed (limit {limit}): it ran out of its memory limit"
        if self._cgroup is not None and code == JOIN_FAILED:
            return f"could not join its cgroup ({self._cgroup.dirs})"
        if self._backend.isolation == "sandbox" and code > 128:  # bwrap: 128 + the signal
            code = 128 - code
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by signal {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def _kill_group(self, sig: signal.Signals) -> None:
        # A sandbox's processes are in a group of their own, inside (bwrap.inner_group).
        inner = bwrap.inner_group(self.pid) if self._backend.isolation == "sandbox" else None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        if inner is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(inner, sig)

    def where(self) -> dict[str, str]:
        return dict(self._where)

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the replica and what it started, SIGKILL after ``grace`` seconds."""
        if self._proc.returncode is None:
            self._kill_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.exited()), grace)
            except asyncio.TimeoutError:
                self._kill_group(signal.SIGKILL)
        await self.exited()


class LocalBackend:
    name = "local"

    def __init__(
        self, run_dir: str, isolation: str = "process", telemetry: dict[str, str] | None = None
    ) -> None:
        # Unix socket paths are limited to ~100 bytes, so they live in a short dir.
        self._run_dir = run_dir
        self.isolation = isolation
        self._telemetry = dict(telemetry or {})
        self._bwrap: str | None = None
        self._cgroups: int | None = None
        if isolation == "sandbox":
            problem = probe.sandbox_problem()
            if problem:
                raise ValueError(
                    f"cannot sandbox replicas on this host: {problem}. To run them unsandboxed"
                    " (plain processes of this user, reading what it can, no limits), start"
                    " with --isolation process"
                )
            self._bwrap = probe.bwrap_binary()
            self._cgroups = probe.cgroup_version()
            if self._cgroups is None:
                print(probe.without_cgroups(), file=sys.stderr, flush=True)
        self._gpus = _visible_gpus()
        self.limits_by = f"cgroup v{self._cgroups}" if self._cgroups else "rlimits"
        """What enforces a sandboxed replica's limits, as info shows it."""
        self._gpu_use: Counter[str] = Counter({g: 0 for g in self._gpus})

    def _claim(self, count: float, function: str) -> list[str]:
        if count != int(count):
            raise ReplicaFailed(
                f"function {function!r} asks for gpu: {count:g}; the local backend gives whole"
                " GPUs (fractions are shared on the ray backend)"
            )
        count = int(count)
        if count > len(self._gpus):
            raise ReplicaFailed(
                f"function {function!r} requests {count} GPU(s); this host has {len(self._gpus)}"
            )
        chosen = sorted(self._gpus, key=lambda g: self._gpu_use[g])[:count]
        self._gpu_use.update(chosen)
        return chosen

    def _release(self, gpus: list[str]) -> None:
        self._gpu_use.subtract(gpus)

    async def start(self, spec: ReplicaSpec, log: LogSink) -> LocalReplica:
        gpus = self._claim(spec.gpu, spec.function) if spec.gpu else []
        # Each replica's socket in a dir of its own, so a sandbox can be given only its own.
        sock_dir = os.path.join(self._run_dir, spec.replica_id)
        os.makedirs(sock_dir, mode=0o700, exist_ok=True)
        address = os.path.join(sock_dir, "wire.sock")
        secret = secrets.token_bytes(32)
        # Not the gateway's environment: the basics, where spans go (tracing on), the
        # function's own, then ours.
        env = clean_environment({**self._telemetry, **spec.environment})
        env.update(
            HANDLER_DIR=spec.code_dir,
            HANDLER_FILE=spec.handler_file,
            HANDLER_NAME=spec.handler_name,
            DCF_LISTEN=address,
            DCF_FUNCTION=spec.function,
            DCF_VERSION=str(spec.version),
            DCF_REPLICA=spec.replica_id,
            DCF_CONCURRENCY=str(spec.concurrency),
            PYTHONUNBUFFERED="1",
        )
        if self._gpus:
            # A CPU function must not take memory on a GPU another function was given.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        elif "CUDA_VISIBLE_DEVICES" in os.environ:  # the gateway's own choice of devices
            env.setdefault("CUDA_VISIBLE_DEVICES", os.environ["CUDA_VISIBLE_DEVICES"])
        cgroup, limits = None, None
        command = [spec.python, "-m", "dcf.runtime"]
        join = ""
        if self._bwrap is not None:
            limits = _shown_limits(spec)
            for name in ("HOME", "TMPDIR"):  # the gateway user's are not in the sandbox
                if name not in spec.environment:
                    env[name] = "/tmp"
            tmp = spec.tmp_size or DEFAULT_TMP
            command = bwrap.argv(
                self._bwrap,
                command,
                code_dir=spec.code_dir,
                socket_dir=sock_dir,
                python=spec.python,
                tmp_size=tmp,
                network=spec.network != "none",
                gpus=bool(gpus),
            )
            if self._cgroups is not None:
                wanted = Limits(spec.memory_limit, spec.cpu_limit, spec.pids or DEFAULT_PIDS)
                try:
                    cgroup = ReplicaCgroup(self._cgroups, spec.replica_id, wanted)
                except OSError as exc:
                    self._release(gpus)
                    raise ReplicaFailed(f"cannot create the replica's cgroup: {exc}") from None
                join = _joiner(cgroup.join_path())
            # bwrap ignores SIGTERM (a signal ignored stays so across exec; the runtime
            # restores it), so a stop reaches the runtime and bwrap outlives it to report
            # how it ended. Through sh: uvloop's spawn resets what a preexec_fn sets.
            # The shell joins the cgroup, not a preexec_fn: one would make the gateway fork
            # its whole self (no vfork) for every replica it starts.
            command = ["/bin/sh", "-c", f'trap "" TERM; {join}exec "$0" "$@"', *command]
        if spec.memory_limit and cgroup is None:
            env["DCF_MEMORY_LIMIT"] = str(spec.memory_limit)
        read_fd, write_fd = os.pipe()
        env["DCF_STATUS_FD"] = str(write_fd)
        # The secret travels in a pipe, not the environment (/proc/PID/environ shows that).
        secret_read, secret_write = os.pipe()
        os.write(secret_write, secret)
        os.close(secret_write)
        env["DCF_SECRET_FD"] = str(secret_read)
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=spec.code_dir,
                pass_fds=(write_fd, secret_read),
                start_new_session=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            os.close(read_fd)
            self._release(gpus)
            if cgroup is not None:
                cgroup.remove()
            raise ReplicaFailed(f"cannot start {spec.python}: {exc}") from None
        finally:
            os.close(write_fd)
            os.close(secret_read)
        loop = asyncio.get_running_loop()
        status = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(status), os.fdopen(read_fd, "rb", 0)
        )
        assert proc.stdout is not None
        pumps = [loop.create_task(_pump(proc.stdout, spec.replica_id, log))]
        return LocalReplica(spec, proc, address, status, pumps, gpus, self, secret, cgroup, limits)

    async def close(self) -> None:
        shutil.rmtree(self._run_dir, ignore_errors=True)


JOIN_FAILED = 97
"""The exit code of a replica whose shell could not join it to its cgroup."""


def _joiner(procs: list[str]) -> str:
    """Shell that puts itself, and so all it will exec and start, in the replica's cgroup."""
    writes = " && ".join(f"echo $$ > {shlex.quote(path)}" for path in procs)
    return f"{{ {writes}; }} || exit {JOIN_FAILED}; "


def _format_memory(size: int) -> str:
    for unit, shift in (("Gi", 30), ("Mi", 20), ("Ki", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def _shown_limits(spec: ReplicaSpec) -> dict[str, str]:
    shown = {
        "pids": str(spec.pids or DEFAULT_PIDS),
        "tmp": _format_memory(spec.tmp_size or DEFAULT_TMP),
        "network": spec.network,
    }
    if spec.memory_limit:
        shown["memory"] = _format_memory(spec.memory_limit)
    if spec.cpu_limit:
        shown["cpu"] = f"{spec.cpu_limit:g}"
    return shown


async def _remove(cgroup: ReplicaCgroup) -> None:
    # The group's last processes may still be exiting: rmdir fails until they are gone.
    for _ in range(20):
        cgroup.remove()
        if not any(os.path.exists(d) for d in cgroup.dirs.values()):
            return
        await asyncio.sleep(0.05)


async def _pump(stream: asyncio.StreamReader, replica_id: str, log: LogSink) -> None:
    while True:
        try:
            line = await stream.readline()
        except ValueError:  # a line longer than the stream limit: take what there is
            line = await stream.read(1 << 16)
        if not line:
            return
        log(replica_id, line.decode(errors="replace").rstrip("\n"))
