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
    args = [binary, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc"]
    args += ["--unshare-uts", "--unshare-cgroup-try"]
    if not network:
        args.append("--unshare-net")
    # /tmp first: what lives under the host's /tmp (a DCF_HOME, say) is bound over it.
    args += ["--size", str(tmp_size), "--tmpfs", "/tmp"]
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
    args += ["--proc", "/proc", "--dev", "/dev"]
    if gpus:
        for name in sorted(os.listdir("/dev")):
            if name.startswith("nvidia"):
                args += ["--dev-bind", f"/dev/{name}", f"/dev/{name}"]
    args += ["--ro-bind", code_dir, code_dir]
    args += ["--bind", socket_dir, socket_dir]
    args += ["--chdir", code_dir, "--"]
    return args + command
