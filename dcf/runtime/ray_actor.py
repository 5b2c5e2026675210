"""A replica as a Ray actor: the runtime, hosted in the actor's own process
(or, with isolation ``sandbox``, in a bwrap sandbox the actor starts and
supervises on its node: ray_sandbox.py).

Ray places the actor, ships the function's code to its node and reports its
death; calls never go through Ray. The actor serves ``dcf.wire`` on a TCP port
of its node, only to connections that present the gateway's secret, exactly as
a local replica serves its unix socket. What the process prints (at the file
descriptor level, so C extensions too) is kept for the gateway to collect.

Imports nothing from the gateway, and Ray only inside methods: this module is
loaded on the nodes, in the actor's worker process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import os
import shutil
import sys
import tarfile
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Any

from dcf import tuning
from dcf.runtime import tracing
from dcf.runtime.handler import Invoker, handler_error, load_target
from dcf.runtime.ray_sandbox import SandboxedRuntime
from dcf.runtime.server import open_server


class Output:
    """This process's stdout and stderr, line by line, for the gateway's log.

    Lines still reach Ray's own log files. At most ``LIMIT`` lines of at most
    ``LINE`` bytes wait for the gateway to collect them; older ones go first.
    """

    LIMIT = 10_000
    LINE = 1 << 16  # a longer line is cut into pieces of this many bytes

    def __init__(self) -> None:
        self.lines: deque[str] = deque(maxlen=self.LIMIT)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = asyncio.Event()
        self._signalled = False
        read_fd, write_fd = os.pipe()
        self._copy = os.dup(1)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        threading.Thread(target=self._pump, args=(read_fd,), daemon=True).start()

    def _pump(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for raw in iter(lambda: pipe.readline(self.LINE), b""):
                with contextlib.suppress(OSError):
                    os.write(self._copy, raw)
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                loop = self._loop
                if loop is not None and not self._signalled:
                    self._signalled = True
                    with contextlib.suppress(RuntimeError):  # the loop is closing
                        loop.call_soon_threadsafe(self._ready.set)

    def wake(self) -> None:
        """End a ``collect`` that is waiting, though nothing was printed."""
        self._ready.set()

    async def collect(self, wait: float) -> list[str]:
        """The lines printed since the last call, waiting up to ``wait`` seconds for one."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if not self.lines:
            self._ready.clear()
            self._signalled = False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(), wait)
        out = []
        while self.lines:
            out.append(self.lines.popleft())
        return out


def unpack_once(archive: bytes, name: str) -> str:
    """The function's code on this node: unpacked by the first replica, shared by the rest."""
    root = Path(tempfile.gettempdir()) / f"dcf-ray-{os.getuid()}" / "code"
    target = root / name
    if target.is_dir():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=root, prefix=".unpacking-")
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        tar.extractall(scratch, filter="data")
    try:
        os.rename(scratch, target)
    except OSError:  # another replica on this node got there first
        shutil.rmtree(scratch, ignore_errors=True)
    return str(target)


class ReplicaActor:
    """Created by the ray backend with ``ray.remote(...)``; one per replica."""

    def __init__(self, spec: dict[str, Any], secret: bytes) -> None:
        self._spec = spec
        self._secret = secret
        self._server: asyncio.AbstractServer | None = None
        self._output = Output()
        self._sandbox: SandboxedRuntime | None = None
        tuning.tune_malloc()

    async def start(self, archive: bytes) -> dict[str, Any]:
        """Unpack the code, load the handler, listen; what the gateway needs to reach it."""
        import ray

        spec = self._spec
        if spec.get("isolation") == "sandbox":
            return await self._start_sandboxed(archive)
        info = {"function": spec["function"], "version": str(spec["version"])}
        info["replica"] = spec["replica_id"]
        os.environ.update(spec.get("telemetry") or {})  # the function's own settings win
        os.environ.update(spec["environment"])
        os.environ.update(
            DCF_FUNCTION=info["function"],
            DCF_VERSION=info["version"],
            DCF_REPLICA=info["replica"],
            DCF_CONCURRENCY=str(spec["concurrency"]),
        )
        try:
            code_dir = await asyncio.to_thread(unpack_once, archive, spec["code_name"])
            del archive
            target = await asyncio.to_thread(
                load_target, code_dir, spec["handler_file"], spec["handler_name"]
            )
            threads = int(os.environ.get("DCF_THREADS", "0") or 0)
            invoker = Invoker(target, info["function"], threads)  # refuses what it cannot serve
        except BaseException as exc:  # noqa: BLE001 - report any load failure to the gateway
            reason = handler_error(exc)
            sys.stderr.write(reason)
            return {"failed": reason}
        invoker = tracing.wrap(invoker, info)
        gc.collect()
        gc.freeze()  # as in a local replica: the model is not rescanned by full collections
        host = ray.util.get_node_ip_address()
        self._server = await open_server(invoker, f"tcp://{host}:0", info, self._secret)
        port = self._server.sockets[0].getsockname()[1]
        return {
            "address": f"tcp://{host}:{port}",
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": host,
            "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    async def _start_sandboxed(self, archive: bytes) -> dict[str, Any]:
        """The runtime in bwrap on this node, this actor supervising it (ray_sandbox.py)."""
        import ray

        spec = self._spec
        code_dir = await asyncio.to_thread(unpack_once, archive, spec["code_name"])
        del archive
        host = ray.util.get_node_ip_address()
        self._sandbox = SandboxedRuntime(spec, code_dir, host, self._secret)
        self._sandbox.on_end.append(self._output.wake)  # the gateway's log poll hears it
        started = await self._sandbox.start()
        if "failed" in started:
            return started
        return {
            **started,
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": host,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    async def logs(self, wait: float = 10.0) -> tuple[str, list[str], str | None]:
        """(this node's address, lines printed since the last call, why a sandboxed
        runtime ended once it has: the replica is over then, though this actor lives)."""
        import ray

        sandbox = self._sandbox
        ended = sandbox.reason if sandbox is not None else None
        lines = await self._output.collect(0 if ended else wait)
        if sandbox is not None and ended is None:
            ended = sandbox.reason
            if ended is not None:  # it ended while we waited: its last lines come next time
                ended = None if self._output.lines else ended
        return ray.util.get_node_ip_address(), lines, ended

    async def stop(self) -> str | None:
        """End the replica; why its sandboxed runtime ended, if it ended by itself."""
        if self._server is not None:
            self._server.close()
        ended = await self._sandbox.stop() if self._sandbox is not None else None
        # ray.kill ends this process only: what a handler forked would outlive it.
        kill_descendants()
        return ended


def kill_descendants() -> None:
    """SIGKILL every process this one started, and theirs."""
    import psutil  # Ray ships it to every node (ray/thirdparty_files)

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
