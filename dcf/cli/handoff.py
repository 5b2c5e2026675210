"""Start the gateway again without its token in its arguments or environment.

A process's ``/proc/PID/cmdline`` and ``/proc/PID/environ`` show what it was
started with, whatever it does to ``os.environ`` later, and any process of the
same user can read them: a replica could, given the gateway's pid (its parent's).
So when ``dcf gateway start`` is given a token (``--token`` or ``$DCF_TOKEN``),
it writes the token into a pipe and replaces itself (same pid) with the same
command minus the token, plus ``--token-fd N``; the new image reads the token
from the pipe and closes it. Nothing readable from outside holds it after that.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import click
from click.core import ParameterSource

MAX_SECRET = 60_000  # a pipe holds 64 KiB before a write would wait for its reader


def reexec_without(ctx: click.Context, param: str, envvar: str, fd_option: str) -> NoReturn:
    """Exec this command again, the value of ``param`` passed through a pipe at ``fd_option``."""
    secret = str(ctx.params[param]).encode()
    if len(secret) > MAX_SECRET:
        raise click.BadParameter(f"longer than {MAX_SECRET} bytes", param_hint=f"--{param}")
    read_fd, write_fd = os.pipe()
    os.write(write_fd, secret)
    os.close(write_fd)
    os.set_inheritable(read_fd, True)
    names = []
    node: click.Context | None = ctx
    while node is not None and node.parent is not None:
        names.append(node.info_name or "")
        node = node.parent
    argv = [sys.executable, "-m", "dcf.cli.main", *reversed(names)]
    argv += _arguments(ctx, skip={param, fd_option.lstrip("-").replace("-", "_")})
    argv += [fd_option, str(read_fd)]
    env = {k: v for k, v in os.environ.items() if k != envvar}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def receive(fd: int) -> str:
    """The secret the previous image of this process left in pipe ``fd``."""
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        os.close(fd)
    except OSError as exc:
        raise click.BadParameter(f"cannot read fd {fd}: {exc}", param_hint="--token-fd") from None
    if not chunks:
        raise click.BadParameter(f"fd {fd} holds no token", param_hint="--token-fd")
    return b"".join(chunks).decode()


def _arguments(ctx: click.Context, skip: set[str]) -> list[str]:
    """The options given to this command (not their defaults), as command-line words."""
    args: list[str] = []
    for param in ctx.command.params:
        name = param.name or ""
        if not isinstance(param, click.Option) or name in skip:
            continue
        if ctx.get_parameter_source(name) in (None, ParameterSource.DEFAULT):
            continue
        value = ctx.params.get(name)
        if value is None:
            continue
        flag = max(param.opts, key=len)
        if param.is_flag:
            if param.secondary_opts:
                args.append(flag if value else max(param.secondary_opts, key=len))
            elif value:
                args.append(flag)
            continue
        for item in value if param.multiple else [value]:
            words = item if isinstance(item, tuple) else (item,)
            args += [flag, *(str(word) for word in words)]
    return args
