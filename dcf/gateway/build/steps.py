"""Build steps: the shell commands of a function's ``build:``, run once per set of inputs.

A model often needs work before it can serve: fetch weights, convert them,
compile something. The commands run in a copy of the uploaded directory, in
the function's environment, and the directory they leave is what every
replica of the version runs from, so their results travel with the version
(to a remote node too). The result is cached by the hash of everything that
can change it: the code, the requirements' environment, the commands and the
function's ``environment`` map. A redeploy with the same inputs runs nothing.
A build is written to a temporary directory and renamed into place only when
every command succeeded, so a failed or interrupted build leaves nothing.

Each command runs as ``/bin/sh -c`` in a session of its own: a timeout, a
deleted function or a gateway shutdown kills it with everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from dcf.backends.environment import clean_environment
from dcf.config import FunctionSpec
from dcf.gateway.build.environments import BuildError
from dcf.gateway.build.sandbox import BuildSandbox

Log = Callable[[str], None]
TAIL_LINES = 20
MAX_LINE = 8192


class BuildSteps:
    """Runs ``build:`` commands and keeps each result under ``root/<hash>/``."""

    def __init__(self, root: Path, sandbox: BuildSandbox | None = None) -> None:
        self.root = root
        self.sandbox = sandbox
        self._locks: dict[str, asyncio.Lock] = {}
        # Temporary dirs of builds a stopped gateway left half done.
        if root.is_dir():
            for stale in root.glob(".*"):
                shutil.rmtree(stale, ignore_errors=True)

    async def build(
        self, source: Path, spec: FunctionSpec, env_digest: str, python: str, log: Log
    ) -> Path:
        """The directory replicas of this version run from, building it if needed."""
        try:
            digest = await asyncio.to_thread(build_hash, source, spec, env_digest)
            target = self.root / digest
            async with self._locks.setdefault(digest, asyncio.Lock()):
                if target.is_dir():
                    log(f"build steps {digest}: cached, nothing to run")
                    return target
                await self._build(source, target, spec, python, log)
                return target
        except OSError as exc:  # the disk, not the commands
            raise BuildError(f"build steps could not run: {exc}") from None

    async def _build(
        self, source: Path, target: Path, spec: FunctionSpec, python: str, log: Log
    ) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=self.root))
        started = time.monotonic()
        deadline = started + spec.build_timeout
        try:
            await _finish_in_thread(
                shutil.copytree, source, work, symlinks=True, dirs_exist_ok=True
            )
            env = environment(python, spec.environment)
            count = len(spec.build)
            with contextlib.ExitStack() as stack:
                wrap = None
                if self.sandbox is not None:
                    env = self.sandbox.environment(env, spec.environment)
                    wrap = self._wrapper(
                        python, work, stack.enter_context(self.sandbox.scratch(self.root))
                    )
                for n, command in enumerate(spec.build, 1):
                    log(f"build step {n}/{count}: {command}")
                    await run_command(command, work, env, deadline, spec.build_timeout, log, wrap)
            work.rename(target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        log(f"build steps {target.name}: done in {time.monotonic() - started:.1f}s")

    def _wrapper(self, python: str, work: Path, scratch: str) -> Callable[[list[str]], list[str]]:
        """A step in the sandbox: its upload copy writable, its environment read-only."""
        assert self.sandbox is not None
        sandbox = self.sandbox

        def wrap(argv: list[str]) -> list[str]:
            return sandbox.argv(argv, python=python, writable=[work], cwd=work, scratch=scratch)

        return wrap


def build_hash(source: Path, spec: FunctionSpec, env_digest: str) -> str:
    """What a build's result depends on: code, environment, commands, environment map."""
    key = json.dumps(
        {
            "code": tree_hash(source),
            "env": env_digest,
            "commands": spec.build,
            "environment": spec.environment,
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def tree_hash(directory: Path) -> str:
    """A directory's content (names, bytes, executable bits, links), not its timestamps.

    The upload's own bytes will not do: a tar.gz records the time it was made.
    """
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory).encode(errors="surrogateescape")
            if os.path.islink(path):
                digest.update(b"L%d:%s" % (len(relative), relative))
                digest.update(os.readlink(path).encode(errors="surrogateescape") + b"\0")
                continue
            mode = os.stat(path).st_mode
            digest.update(b"F%d:%s%d:" % (len(relative), relative, bool(mode & 0o111)))
            with open(path, "rb") as file:
                digest.update(b"%d:" % os.fstat(file.fileno()).st_size)
                while chunk := file.read(1 << 20):
                    digest.update(chunk)
        for name in dirs:
            relative = os.path.relpath(os.path.join(root, name), directory).encode(
                errors="surrogateescape"
            )
            digest.update(b"D%d:%s" % (len(relative), relative))
    return digest.hexdigest()


def environment(python: str, extra: dict[str, str]) -> dict[str, str]:
    """The function's environment: its interpreter first on PATH, its ``environment`` set.

    Not the gateway's: as for replicas, the basics only (dcf.backends.environment).
    """
    env = clean_environment({})
    env.pop("PYTHONHOME", None)
    bin_dir = Path(python).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', os.defpath)}"
    if (bin_dir.parent / "pyvenv.cfg").exists():
        env["VIRTUAL_ENV"] = str(bin_dir.parent)
    else:
        env.pop("VIRTUAL_ENV", None)
    env["PYTHONUNBUFFERED"] = "1"  # so a Python step's output streams as it is printed
    env.update(extra)
    return env


async def run_command(
    command: str,
    cwd: Path,
    env: dict[str, str],
    deadline: float,
    timeout: float,
    log: Log,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> None:
    """Run one command to completion, its output line by line to ``log``.

    Raises BuildError with its last lines if it fails or runs past ``deadline``
    (monotonic); kills its whole process group if cancelled. ``wrap`` puts the
    command in a sandbox (whose death takes everything inside with it).
    """
    argv = ["/bin/sh", "-c", command]
    try:
        proc = await asyncio.create_subprocess_exec(
            *(wrap(argv) if wrap else argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        raise BuildError(f"build step `{command}` could not start: {exc}") from None
    tail: deque[str] = deque(maxlen=TAIL_LINES)

    def emit(line: str) -> None:
        tail.append(line)
        log(line)

    assert proc.stdout is not None
    reader = asyncio.get_running_loop().create_task(_read_lines(proc.stdout, emit))
    try:
        try:
            status = await asyncio.wait_for(proc.wait(), max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            status = None
        # What the command left running in the background dies with it, and
        # the pipe it may still hold open closes.
        _kill_group(proc.pid)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), 5)
    except BaseException:
        _kill_group(proc.pid)
        raise
    finally:
        reader.cancel()
    last = "\n".join(tail)
    if wrap and status and status > 128:  # bwrap: 128 + the signal that ended the command
        status = 128 - status
    if status is None:
        raise BuildError(
            f"build step `{command}` did not finish within build_timeout"
            f" ({_duration(timeout)}) and was killed"
            + (f"; its last lines:\n{last}" if last else "")
        )
    if status:
        why = f"exit status {status}" if status > 0 else f"signal {_signal_name(-status)}"
        raise BuildError(
            f"build step `{command}` failed with {why}"
            + (f"; its last lines:\n{last}" if last else " and printed nothing")
        )


async def _finish_in_thread(fn: Callable[..., object], *args: object, **kwargs: object) -> None:
    """``fn`` in a thread; if cancelled, only once it is done, so nothing writes behind us."""
    job = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        await asyncio.shield(job)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await job
        raise


async def _read_lines(stream: asyncio.StreamReader, emit: Callable[[str], None]) -> None:
    pending = b""
    while chunk := await stream.read(1 << 16):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            emit(_decode(line))
        if len(pending) > MAX_LINE:  # a progress bar that never ends its line
            emit(_decode(pending))
            pending = b""
    if pending:
        emit(_decode(pending))


def _decode(raw: bytes) -> str:
    """A line as a terminal would show it: what follows the last carriage return."""
    line = raw.decode(errors="replace").rstrip("\r").rsplit("\r", 1)[-1]
    return line if len(line) <= MAX_LINE else line[:MAX_LINE] + " …"


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
