"""Process and socket settings for the large-body path, shared by the gateway and replicas.

A 600 KB body crosses the gateway↔replica link twice per call. With the kernel's
default socket buffers (about 200 KB) each crossing takes several writes, reads and
wake-ups; with buffers a few bodies large it takes one of each. And glibc's malloc
hands a freed large block back to the kernel (trim) and asks for fresh pages on the
next call, so every body pays its page faults again: keeping a few MB of freed heap
instead makes the next body's buffer a warm one. Neither changes what is sent.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import socket

SOCKET_BUFFER = 4 << 20
"""Send and receive buffer of a gateway↔replica link: several large bodies in flight."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 64 << 20
"""Freed heap kept before glibc returns it to the kernel (its default: 128 KB, adaptive)."""
MMAP_THRESHOLD = 16 << 20
"""Blocks below this come from the heap, not from a fresh mmap (whose pages all fault)."""


def tune_socket(sock: object) -> None:
    """Large buffers on a unix link, no Nagle delay on a TCP one; best effort.

    TCP's buffers are left to the kernel: setting them turns off its autotuning, which
    grows them further than any fixed size here would (tcp_rmem's max).
    """
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is None:
        return
    if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return
    with contextlib.suppress(OSError):
        setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


_tuned = False


def tune_malloc() -> None:
    """glibc only (elsewhere nothing happens): keep freed large blocks for the next body."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
