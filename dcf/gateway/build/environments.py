"""Turns a function's requirements into a Python environment a replica can run in.

Environments are cached by the hash of the normalised requirements, so a
redeploy with the same requirements installs nothing. A function with no
requirements runs on the gateway's own interpreter. Each environment is a
venv layered over the gateway's packages (a .pth file), so the runtime and
anything already installed are importable without copies, and the function's
own pins take precedence.

requirements.txt goes to pip on the gateway's host, so only plain PEP 508
specifiers (a name, extras, versions, markers) are accepted: no options (``-r``,
``-e``, ``--index-url`` …), no paths and no URLs, which would let a deployer
read the gateway's files or fetch code from anywhere. pip runs in a session of
its own, with a timeout, and is killed with everything it started when the
function is deleted or the gateway stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import site
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import dcf
from dcf.gateway.build.sandbox import BuildSandbox, pip_environment

DEFAULT_INSTALL_TIMEOUT = 600.0


class BuildError(Exception):
    """The environment could not be built; the message holds the installer's last lines."""


class RequirementsError(ValueError):
    """A line of requirements.txt that is not a plain requirement specifier."""


def check_requirements(requirements: str) -> None:
    """Refuse anything but PEP 508 specifiers by name, naming the first bad line.

    A line is shown cut to 80 characters; nothing read from elsewhere is ever shown.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    for number, raw in enumerate(requirements.splitlines(), 1):
        line = _strip_comment(raw)
        if not line:
            continue
        shown = line if len(line) <= 80 else line[:80] + "…"
        where = f"requirements.txt line {number} ({shown!r})"
        if line.startswith("-"):
            raise RequirementsError(
                f"{where}: option lines are not allowed (-r, -e, -c, --index-url, …):"
                " list packages by name, e.g. numpy>=1.26"
            )
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            raise RequirementsError(
                f"{where}: not a requirement specifier (a package name with optional"
                " extras, versions and markers, e.g. numpy>=1.26); paths and URLs are"
                " not installed: put local code in the function's directory"
            ) from None
        if requirement.url:
            raise RequirementsError(
                f"{where}: direct URL references are not allowed: name a package of the"
                " index, e.g. numpy>=1.26"
            )


def _strip_comment(raw: str) -> str:
    return raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""


def normalise(requirements: str) -> list[str]:
    lines = []
    for raw in requirements.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return sorted(set(lines))


def env_hash(requirements: str) -> str:
    reqs = normalise(requirements)
    if not reqs:
        return "base"
    key = "\n".join(reqs) + f"\npython={sys.version_info[:2]}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _platform_paths() -> list[str]:
    """Where the gateway's own packages (and dcf itself) are importable from."""
    paths = [str(Path(dcf.__file__).resolve().parent.parent)]
    for path in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]:
        if path not in paths:
            paths.append(path)
    return paths


class Builder:
    def __init__(
        self,
        root: Path,
        install_timeout: float = DEFAULT_INSTALL_TIMEOUT,
        sandbox: BuildSandbox | None = None,
    ) -> None:
        self.root = root
        self.install_timeout = install_timeout
        self.sandbox = sandbox
        self._locks: dict[str, asyncio.Lock] = {}
        # Environments a stopped gateway left half built.
        if root.is_dir():
            for env in root.iterdir():
                if env.is_dir() and not (env / ".complete").exists():
                    shutil.rmtree(env, ignore_errors=True)

    def python_for(self, digest: str) -> str | None:
        """The interpreter of a built environment, or None if it is not built."""
        if digest == "base":
            return sys.executable
        env = self.root / digest
        return str(env / "bin" / "python") if (env / ".complete").exists() else None

    async def build(self, requirements: str, log: Callable[[str], None]) -> tuple[str, str]:
        """Return (hash, python) for these requirements, installing them if needed."""
        try:
            check_requirements(requirements)
        except RequirementsError as exc:
            raise BuildError(str(exc)) from None
        digest = env_hash(requirements)
        cached = self.python_for(digest)
        if cached:
            log(f"environment {digest}: cached, nothing to install")
            return digest, cached
        async with self._locks.setdefault(digest, asyncio.Lock()):
            cached = self.python_for(digest)
            if cached:
                return digest, cached
            try:
                return digest, await self._create(digest, requirements, log)
            except BaseException:
                # Failed, timed out or cancelled (the function was deleted): leave nothing.
                shutil.rmtree(self.root / digest, ignore_errors=True)
                with contextlib.suppress(OSError):
                    self.root.rmdir()
                raise

    async def _create(self, digest: str, requirements: str, log: Callable[[str], None]) -> str:
        env = self.root / digest
        shutil.rmtree(env, ignore_errors=True)
        log(f"environment {digest}: creating")
        await _run([sys.executable, "-m", "venv", "--without-pip", str(env)], log, 60)
        python = env / "bin" / "python"
        purelib = await _output(
            [str(python), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"]
        )
        Path(purelib.strip(), "_dcf_platform.pth").write_text("\n".join(_platform_paths()) + "\n")
        req_file = env / "requirements.txt"
        req_file.write_text("\n".join(normalise(requirements)) + "\n")
        log(f"environment {digest}: installing {', '.join(normalise(requirements))}")
        pip = [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "-r",
            str(req_file),
        ]
        if self.sandbox is None:
            await _run(pip, log, self.install_timeout)
        else:  # setup scripts are code the gateway did not write: only this env is writable
            with self.sandbox.scratch(self.root) as scratch:
                wrapped = self.sandbox.argv(
                    pip, python=str(python), writable=[env], cwd=env, scratch=scratch
                )
                await _run(wrapped, log, self.install_timeout, pip_environment(), _name(pip))
        (env / ".complete").touch()
        log(f"environment {digest}: ready")
        return str(python)


async def _output(cmd: list[str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode:
        raise BuildError(out.decode(errors="replace"))
    return out.decode()


def _name(cmd: list[str]) -> str:
    return f"{Path(cmd[0]).name} {' '.join(cmd[1:4])}"


async def _run(
    cmd: list[str],
    log: Callable[[str], None],
    timeout: float,
    env: dict[str, str] | None = None,
    name: str | None = None,
) -> None:
    """Run ``cmd`` in a session of its own, its output to ``log``; kill the session if it
    runs past ``timeout`` or the build is cancelled."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    assert proc.stdout is not None
    tail: list[str] = []

    async def pump() -> None:
        nonlocal tail
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            log(line)
            tail = [*tail[-19:], line]

    name = name or _name(cmd)
    try:
        await asyncio.wait_for(asyncio.gather(pump(), proc.wait()), timeout)
    except asyncio.TimeoutError:
        _kill_session(proc)
        await proc.wait()
        raise BuildError(
            f"{name} did not finish within the gateway's install timeout ({timeout:g}s,"
            " --install-timeout) and was killed; its last lines:\n" + "\n".join(tail)
        ) from None
    except BaseException:
        _kill_session(proc)
        raise
    if proc.returncode:
        raise BuildError(f"{name} failed:\n" + "\n".join(tail))


def _kill_session(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
