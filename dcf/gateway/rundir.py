"""The gateway's run directory: where its local replicas' unix sockets live.

Socket paths are limited to about 100 bytes, so it sits in the system's short
temporary directory rather than under DCF_HOME. A gateway that is killed
(SIGKILL, power loss) cannot remove it, so each gateway holds an exclusive
lock on a file inside it for its whole life (the kernel lets go of it when
the process dies, however it dies), and a starting gateway removes every run
directory whose lock it can take: their gateways are gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "dcf-run-"
LOCK = ".gateway.lock"


class RunDir:
    """A fresh run directory, locked for this process's life; stale ones removed first."""

    def __init__(self, parent: str | None = None) -> None:
        parent = parent or tempfile.gettempdir()
        remove_stale(Path(parent))
        self.path = tempfile.mkdtemp(prefix=PREFIX, dir=parent)
        self._lock = open(os.path.join(self.path, LOCK), "w")  # noqa: SIM115 - held for life
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.close()


def remove_stale(parent: Path) -> list[Path]:
    """Remove the run directories (of this user) whose gateway is dead; return them."""
    removed = []
    for directory in parent.glob(PREFIX + "*"):
        try:
            if directory.stat().st_uid != os.getuid():
                continue
            with open(directory / LOCK) as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked (its gateway is alive), or not one of ours
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(directory)
            removed.append(directory)
    return removed
