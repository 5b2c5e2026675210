"""``python -m dcf.runtime``: a replica.

Configured by environment, as the seed's Dockerfile does it:
HANDLER_DIR, HANDLER_FILE, HANDLER_NAME; and, when started by a backend,
DCF_LISTEN (socket to serve the gateway on) and DCF_STATUS_FD (pipe on which
it reports ready, or the reason it could not start). Without DCF_LISTEN it
serves plain HTTP on $PORT (8080) and touches DCF_READY_FILE (/tmp/.lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import sys

from dcf import tuning
from dcf.runtime import tracing
from dcf.runtime.handler import Invoker, handler_error, load_target
from dcf.runtime.server import http_app, serve_socket


def _die_with_parent() -> None:
    """A replica must not outlive the gateway that started it (Linux only).

    A gateway that died before we read its pid (a gateway may itself be pid 1, in
    a container, so that proves nothing) is caught when reporting ready finds
    the status pipe closed.
    """
    parent = os.getppid()
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died while the signal was being armed
        os._exit(1)


def _limit_memory(limit: str | None) -> None:
    if not limit:
        return
    import resource

    size = int(limit)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_DATA, (size, size))


def _report(fd: int | None, message: dict) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (json.dumps(message) + "\n").encode())
    except BrokenPipeError:  # nobody reads: the gateway that started us is gone
        os._exit(1)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        os.close(fd)


def _read_secret(fd: str | None) -> bytes | None:
    """The gateway's secret for this replica, read once from its pipe."""
    if not fd:
        return None
    with os.fdopen(int(fd), "rb", 0) as pipe:
        return pipe.read(256) or None


def main() -> None:
    env = os.environ
    if "DCF_STATUS_FD" in env:  # started by the local backend
        _die_with_parent()
    # A sandbox's bwrap hands SIGTERM down ignored (so it outlives us and tells our end).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _limit_memory(env.get("DCF_MEMORY_LIMIT"))
    tuning.tune_malloc()
    status_fd = int(env["DCF_STATUS_FD"]) if env.get("DCF_STATUS_FD") else None
    secret = _read_secret(env.get("DCF_SECRET_FD"))
    function = env.get("DCF_FUNCTION", "handler")
    info = {
        "function": function,
        "version": env.get("DCF_VERSION", ""),
        "replica": env.get("DCF_REPLICA", ""),
    }
    threads = int(env.get("DCF_THREADS", "0") or 0)
    try:
        target = load_target(
            env.get("HANDLER_DIR", "."),
            env.get("HANDLER_FILE", "handler.py"),
            env.get("HANDLER_NAME", "Handler"),
        )
        invoker = Invoker(target, function, threads)  # refuses a handler it cannot serve
    except BaseException as exc:  # noqa: BLE001 - report any load failure, then stop
        reason = handler_error(exc)
        sys.stderr.write(reason)
        sys.stderr.flush()
        _report(status_fd, {"failed": reason})
        sys.exit(3)
    invoker = tracing.wrap(invoker, info)
    # The model and the modules stay for the replica's life: keep full collections
    # from rescanning them under load.
    gc.collect()
    gc.freeze()

    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    listen = env.get("DCF_LISTEN")
    if listen:
        ready = {"ready": True, "pid": os.getpid()}
        asyncio.run(serve_socket(invoker, listen, info, lambda: _report(status_fd, ready), secret))
        return
    import uvicorn

    uvicorn.run(
        http_app(invoker, info, env.get("DCF_READY_FILE", "/tmp/.lock")),
        host=env.get("HOST", "0.0.0.0"),
        port=int(env.get("PORT", "8080")),
        log_level="warning",
    )


if __name__ == "__main__":
    main()
