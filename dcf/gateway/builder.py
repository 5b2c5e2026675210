"""Turns a function's requirements into a Python environment a replica can run in.

Environments are cached by the hash of the normalised requirements, so a
redeploy with the same requirements installs nothing. A function with no
requirements runs on the gateway's own interpreter. Each environment is a
venv layered over the gateway's packages (a .pth file), so the runtime and
anything already installed are importable without copies, and the function's
own pins take precedence.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import site
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import dcf


class BuildError(Exception):
    """The environment could not be built; the message holds the installer's last lines."""


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
    def __init__(self, root: Path) -> None:
        self.root = root
        self._locks: dict[str, asyncio.Lock] = {}

    def python_for(self, digest: str) -> str | None:
        """The interpreter of a built environment, or None if it is not built."""
        if digest == "base":
            return sys.executable
        env = self.root / digest
        return str(env / "bin" / "python") if (env / ".complete").exists() else None

    async def build(self, requirements: str, log: Callable[[str], None]) -> tuple[str, str]:
        """Return (hash, python) for these requirements, installing them if needed."""
        digest = env_hash(requirements)
        cached = self.python_for(digest)
        if cached:
            log(f"environment {digest}: cached, nothing to install")
            return digest, cached
        async with self._locks.setdefault(digest, asyncio.Lock()):
            cached = self.python_for(digest)
            if cached:
                return digest, cached
            return digest, await self._create(digest, requirements, log)

    async def _create(self, digest: str, requirements: str, log: Callable[[str], None]) -> str:
        env = self.root / digest
        shutil.rmtree(env, ignore_errors=True)
        log(f"environment {digest}: creating")
        await _run([sys.executable, "-m", "venv", "--without-pip", str(env)], log)
        python = env / "bin" / "python"
        purelib = await _output(
            [str(python), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"]
        )
        Path(purelib.strip(), "_dcf_platform.pth").write_text("\n".join(_platform_paths()) + "\n")
        req_file = env / "requirements.txt"
        req_file.write_text("\n".join(normalise(requirements)) + "\n")
        log(f"environment {digest}: installing {', '.join(normalise(requirements))}")
        await _run(
            [
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
            ],
            log,
        )
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


async def _run(cmd: list[str], log: Callable[[str], None]) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    tail: list[str] = []
    async for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        log(line)
        tail = [*tail[-19:], line]
    if await proc.wait():
        raise BuildError(f"{Path(cmd[0]).name} {' '.join(cmd[1:4])} failed:\n" + "\n".join(tail))
