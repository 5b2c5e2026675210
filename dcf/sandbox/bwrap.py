"""The bwrap argv that starts a replica in its own namespaces, seeing only what it needs.

Read-only: the system (/usr, /lib*, /bin, /etc minus its secrets), the Python
install and packages the runtime imports, the function's own code. Writable:
a private tmpfs /tmp of ``tmp_size`` bytes. Its socket's own directory, and
nothing else of the gateway's: no DCF_HOME, no other function, no job store.
"""

from __future__ import annotations

import os
import site
import sys

import dcf

SECRETS = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-", "/etc/sudoers")
SYSTEM = ("/usr", "/etc", "/opt")
LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def python_paths(python: str) -> list[str]:
    """What the runtime's interpreter needs to import: its env, its install, our packages."""
    env = os.path.dirname(os.path.dirname(os.path.abspath(python)))
    paths = [env, os.path.dirname(os.path.dirname(os.path.realpath(python)))]
    # An environment is layered over the gateway's packages, and dcf may be a checkout.
    paths += [sys.prefix, sys.base_prefix, *site.getsitepackages()]
    paths.append(os.path.dirname(os.path.abspath(dcf.__file__)))
    return [p for p in dict.fromkeys(paths) if os.path.isdir(p)]


# Its own PID, IPC, UTS and cgroup namespaces, in a session of its own, gone with its parent.
NAMESPACES = (
    "--die-with-parent",
    "--new-session",
    "--unshare-pid",
    "--unshare-ipc",
    "--unshare-uts",
    "--unshare-cgroup-try",
)


def _system(python: str) -> list[str]:
    """The read-only view every sandbox has: the system minus its secrets, Python, /proc."""
    args: list[str] = []
    for path in SYSTEM:
        if os.path.isdir(path) and not os.path.islink(path):
            args += ["--ro-bind", path, path]
    for path in LINKS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in SECRETS:
        if os.path.exists(path):
            args += ["--ro-bind", "/dev/null", path]
    for path in python_paths(python):
        args += ["--ro-bind", path, path]
    return args + ["--proc", "/proc", "--dev", "/dev"]


def argv(
    binary: str,
    command: list[str],
    *,
    code_dir: str,
    socket_dir: str,
    python: str,
    tmp_size: int,
    network: bool = True,
    gpus: bool = False,
) -> list[str]:
    """``bwrap ... -- command``: the runtime sees only what a replica of this function needs."""
    args = [binary, *NAMESPACES]
    if not network:
        args.append("--unshare-net")
    # /tmp first: what lives under the host's /tmp (a DCF_HOME, say) is bound over it.
    args += ["--size", str(tmp_size), "--tmpfs", "/tmp", *_system(python)]
    if gpus:
        for name in sorted(os.listdir("/dev")):
            if name.startswith("nvidia"):
                args += ["--dev-bind", f"/dev/{name}", f"/dev/{name}"]
    args += ["--ro-bind", code_dir, code_dir]
    args += ["--bind", socket_dir, socket_dir]
    args += ["--chdir", code_dir, "--"]
    return args + command


def build_argv(
    binary: str,
    command: list[str],
    *,
    python: str,
    writable: list[str],
    chdir: str,
    scratch: str,
) -> list[str]:
    """``bwrap ... -- command`` for a build step or a requirements install.

    It sees what a replica sees of the system and of Python, the host network (it may
    fetch weights and packages), ``writable`` (its upload copy, or the environment being
    built) and ``scratch`` as its ``/tmp`` (on disk: a download may be larger than RAM).
    """
    # /tmp first, as for a replica: what lives under the host's /tmp is bound over it.
    args = [binary, *NAMESPACES, "--bind", scratch, "/tmp", *_system(python)]
    for path in writable:  # after the read-only binds: an environment is among them
        args += ["--bind", path, path]
    args += ["--chdir", chdir, "--"]
    return args + command


def inner_group(outer: int) -> int | None:
    """The process group inside a sandbox whose bwrap is ``outer``, or None once it is gone.

    ``--new-session`` puts what bwrap starts in a session (and group) of its own, which
    a signal to bwrap's group does not reach: a stop signals this one too.
    """
    try:
        with open(f"/proc/{outer}/task/{outer}/children") as f:
            children = f.read().split()
    except OSError:
        return None
    return int(children[0]) if children else None
