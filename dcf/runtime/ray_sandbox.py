"""A sandboxed replica on a Ray node: the runtime inside bwrap, supervised by its actor.

The actor does on its node what the local backend does on the gateway's host:
it starts ``python -m dcf.runtime`` in bubblewrap (dcf.sandbox.bwrap), seeing
only its own code, read-only, and a private tmpfs /tmp; hands it the gateway's
secret through a pipe; caps the whole replica with a cgroup where this node's
Ray worker may create one, else with rlimits (and the Ray resources the limits
reserved); and reports how it ended, OOM kills by name.

On the host network the runtime listens on the node's TCP port itself: the
gateway's connection reaches it with no hop in between. With ``network: none``
it has no interface to listen on, so it serves a unix socket in a directory
shared with the actor, which relays the gateway's connections to it byte for
byte (the runtime still checks the HELLO secret).

Runs in the actor's process on the node: imports nothing from the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import dcf
from dcf.backends.environment import clean_environment
from dcf.sandbox import bwrap, probe
from dcf.sandbox.cgroups import Limits, ReplicaCgroup
from dcf.sandbox.summary import DEFAULT_PIDS, DEFAULT_TMP, oom_reason

DRAIN = 0.1
"""Seconds the last lines of a runtime that ended are given to reach the log."""
JOIN_FAILED = 97
"""The exit code of a replica whose shell could not join it to its cgroup."""
RELAY_CHUNK = 1 << 16


class SandboxedRuntime:
    """One replica's runtime in bwrap on this node, from start to its end."""

    def __init__(self, spec: dict[str, Any], code_dir: str, host: str, secret: bytes) -> None:
        self._spec = spec
        self._code_dir = code_dir
        self._host = host
        self._secret = secret
        self._proc: asyncio.subprocess.Process | None = None
        self._cgroup: ReplicaCgroup | None = None
        self._run_dir: str | None = None
        self._relay: asyncio.AbstractServer | None = None
        self._watch: asyncio.Task[str] | None = None
        self._runtime: Any = None
        """The runtime's psutil.Process, once it serves."""
        self._oom = False
        self._stopping = False
        self.reason: str | None = None
        """Why the runtime ended, once it has."""
        self.on_end: list[Any] = []
        """Called (no arguments) once it has ended."""

    async def start(self) -> dict[str, Any]:
        """Start the runtime and wait until it serves: its address, pid and how it is capped."""
        spec = self._spec
        binary = probe.bwrap_binary()
        problem = await asyncio.to_thread(probe.sandbox_problem)  # runs bwrap once
        if binary is None or problem:
            return {
                "failed": f"cannot sandbox replicas on the Ray node {self._host}: {problem};"
                " install bubblewrap there, or start the gateway with --isolation process"
            }
        root = Path(tempfile.gettempdir()) / f"dcf-ray-{os.getuid()}" / "run"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        _sweep(root)
        prefix = f"{spec['replica_id'][:40]}.{os.getpid()}."
        self._run_dir = tempfile.mkdtemp(prefix=prefix, dir=root)
        network = spec.get("network", "host") != "none"
        reserved: socket.socket | None = None
        if network:
            # The port is chosen here and held (bound, not listening) until the runtime
            # listens on it: its ready report does not say which port it took.
            reserved = socket.socket()
            reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            reserved.bind((self._host, 0))
            listen = f"tcp://{self._host}:{reserved.getsockname()[1]}"
        else:
            listen = os.path.join(self._run_dir, "wire.sock")
        try:
            enforced = self._make_cgroup()
            started = await self._spawn(binary, listen, network)
        finally:
            if reserved is not None:
                reserved.close()
        if "failed" in started:
            await self._ended()
            return started
        address = listen
        if not network:
            self._relay = await asyncio.start_server(
                functools.partial(_relay, path=listen), self._host, 0
            )
            address = f"tcp://{self._host}:{self._relay.sockets[0].getsockname()[1]}"
        self._watch = asyncio.ensure_future(self._ended())
        return {"address": address, "pid": self._runtime_pid(), "enforced_by": enforced}

    def _make_cgroup(self) -> str:
        """``cgroup`` when this node's worker may create the replica's group, else ``rlimit``."""
        spec = self._spec
        version = probe.cgroup_version()
        if version is not None:
            wanted = Limits(spec.get("memory_limit"), spec.get("cpu_limit"), spec.get("pids"))
            if wanted.pids is None:
                wanted = Limits(wanted.memory, wanted.cpu, DEFAULT_PIDS)
            try:
                self._cgroup = ReplicaCgroup(version, spec["replica_id"], wanted)
                return "cgroup"
            except OSError as exc:
                print(f"dcf: cannot create the replica's cgroup ({exc}): rlimits only", flush=True)
        return "rlimit"

    async def _spawn(self, binary: str, listen: str, network: bool) -> dict[str, Any]:
        spec = self._spec
        assert self._run_dir is not None
        # Where its spans go, with tracing on; the function's own settings win.
        telemetry = spec.get("telemetry") or {}
        env = clean_environment({**telemetry, **(spec.get("environment") or {})})
        # dcf reaches this node as one of Ray's py_modules: put it on the path by name.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(dcf.__file__)))
        path = [package_root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env.update(
            PYTHONPATH=os.pathsep.join(dict.fromkeys(path)),
            HANDLER_DIR=self._code_dir,
            HANDLER_FILE=spec["handler_file"],
            HANDLER_NAME=spec["handler_name"],
            DCF_LISTEN=listen,
            DCF_FUNCTION=spec["function"],
            DCF_VERSION=str(spec["version"]),
            DCF_REPLICA=spec["replica_id"],
            DCF_CONCURRENCY=str(spec["concurrency"]),
            PYTHONUNBUFFERED="1",
        )
        if "CUDA_VISIBLE_DEVICES" in os.environ:  # the devices Ray gave this actor
            env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
        if spec.get("memory_limit") and self._cgroup is None:
            env["DCF_MEMORY_LIMIT"] = str(spec["memory_limit"])
        command = bwrap.argv(
            binary,
            [sys.executable, "-m", "dcf.runtime"],
            code_dir=self._code_dir,
            socket_dir=self._run_dir,
            python=sys.executable,
            tmp_size=spec.get("tmp_size") or DEFAULT_TMP,
            network=network,
            gpus=bool(spec.get("gpu")),
        )
        # The shell joins the cgroup before it becomes bwrap, so every process of the
        # replica is in it (no preexec_fn in Ray's many-threaded worker). bwrap ignores
        # SIGTERM, so a stop reaches the runtime and bwrap outlives it to say how it ended.
        join = "".join(
            f"echo $$ > {shlex.quote(p)} || exit {JOIN_FAILED}; "
            for p in (self._cgroup.join_path() if self._cgroup else [])
        )
        command = ["/bin/sh", "-c", join + 'trap "" TERM; exec "$0" "$@"', *command]
        status_read, status_write = os.pipe()
        env["DCF_STATUS_FD"] = str(status_write)
        secret_read, secret_write = os.pipe()
        os.write(secret_write, self._secret)
        os.close(secret_write)
        env["DCF_SECRET_FD"] = str(secret_read)
        try:
            # Its output goes where the actor's does: to the lines the gateway collects.
            self._proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self._code_dir,
                pass_fds=(status_write, secret_read),
                start_new_session=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            os.close(status_read)
            return {"failed": f"cannot start the sandboxed runtime on {self._host}: {exc}"}
        finally:
            os.close(status_write)
            os.close(secret_read)
        return await self._first_report(status_read)

    async def _first_report(self, status_read: int) -> dict[str, Any]:
        """Its ready report, or why it ended before it was ready."""
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        status = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(status), os.fdopen(status_read, "rb", 0)
        )
        try:
            report = asyncio.ensure_future(status.readline())
            ended = asyncio.ensure_future(self._proc.wait())
            await asyncio.wait({report, ended}, return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
            if not report.done():  # it exited: its last report is in the pipe, if any
                await asyncio.wait({report}, timeout=1.0)
                report.cancel()
            line = report.result() if report.done() and not report.cancelled() else b""
        finally:
            transport.close()
        message = json.loads(line) if line.strip() else {}
        if message.get("ready"):
            return {}
        if "failed" in message:
            return {"failed": message["failed"]}
        code = await self._proc.wait()
        why = "could not join its cgroup" if code == JOIN_FAILED else _exit_reason(code)
        return {"failed": f"replica {self._spec['replica_id']} {why} before it was ready"}

    def _runtime_pid(self) -> int | None:
        """The runtime's pid on the node (bwrap's child's child), for ``info`` and stop."""
        assert self._proc is not None
        import psutil  # Ray ships it to every node (ray/thirdparty_files)

        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self._proc.pid).children(recursive=True):
                if child.cmdline()[1:3] == ["-m", "dcf.runtime"]:
                    self._runtime = child
                    return child.pid
        return self._proc.pid

    async def _ended(self) -> str:
        """Wait for the runtime's end, clean up after it, and say why it ended."""
        code = await self._proc.wait() if self._proc is not None else 1
        if self._proc is not None:
            self._kill_group(signal.SIGKILL)  # whatever it left behind goes too
        if self._relay is not None:
            self._relay.close()
        oom = self._oom = self._cgroup is not None and self._cgroup.oom_killed()
        if self._cgroup is not None:
            await _remove(self._cgroup)
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
        if not self._stopping:  # it ended by itself: its last lines (the why) are on their way
            await asyncio.sleep(DRAIN)
        self.reason = oom_reason(self._spec.get("memory_limit")) if oom else _exit_reason(code)
        for callback in self.on_end:
            callback()
        return self.reason

    def _kill_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def stop(self, grace: float = 0.5) -> str | None:
        """SIGTERM to the runtime and what it started, SIGKILL after ``grace`` seconds.

        Returns why it ended when that was not this stop (it had exited, or the kernel
        killed it for its memory): the gateway stops a replica whose connection dropped,
        and the call that was on it must still learn the reason."""
        if self._proc is None:
            return self.reason
        on_its_own = self._proc.returncode is not None
        self._stopping = not on_its_own
        if not on_its_own:
            # bwrap gives the runtime a session of its own, out of reach of our group's
            # signals: it is told to stop by its pid (psutil checks that pid is still it).
            if self._runtime is not None:
                with contextlib.suppress(Exception):  # psutil.Error: it is gone already
                    self._runtime.terminate()
            try:
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), grace)
            except asyncio.TimeoutError:
                self._kill_group(signal.SIGKILL)
        if self._watch is not None:
            await asyncio.shield(self._watch)
        return self.reason if on_its_own or self._oom else None


def _sweep(root: Path) -> None:
    """Remove the run dirs of actors that are gone: one killed (its node's end, a stop
    that outran its grace) had no time to remove its own."""
    for entry in root.iterdir():
        parts = entry.name.rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass  # alive, another user's


def _exit_reason(code: int) -> str:
    if code > 128:  # bwrap exits with 128 + the signal that ended the runtime
        code = 128 - code
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by signal {signal.Signals(-code).name}"
    return f"exited with code {code}"


async def _remove(cgroup: ReplicaCgroup) -> None:
    # The group's last processes may still be exiting: rmdir fails until they are gone.
    for _ in range(20):
        cgroup.remove()
        if not any(os.path.exists(d) for d in cgroup.dirs.values()):
            return
        await asyncio.sleep(0.05)


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> None:
    """One gateway connection to a ``network: none`` replica, relayed to its unix socket."""
    try:
        back_reader, back_writer = await asyncio.open_unix_connection(path)
    except OSError:
        writer.close()
        return
    await asyncio.gather(_pipe(reader, back_writer), _pipe(back_reader, writer))


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(RELAY_CHUNK):
            sink.write(data)
            await sink.drain()  # a slow reader holds the other side back, not our memory
    except OSError:
        pass
    finally:
        sink.close()
