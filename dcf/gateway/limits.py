"""What one upload, build, request body or log reader may take from the gateway.

Each bound keeps one client from freezing or filling the gateway for every
other: a gzip bomb, a requirements file that never finishes installing, a
body that never arrives, a log reader that stops reading, a replica that
stops answering. Every field is a flag of ``dcf gateway start`` (README,
"Limits").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_upload: int = 64 << 20
    """Bytes of one code archive as uploaded (compressed); more is refused with 413."""
    max_upload_files: int = 10_000
    """Members of one code archive."""
    max_unpacked: int = 1 << 30
    """Bytes of one code archive once unpacked, as its tar headers declare them."""
    install_timeout: float = 600.0
    """Seconds pip may take to install one requirements set; then it is killed."""
    body_timeout: float = 30.0
    """Seconds a client may take to send a request's whole body; then 408."""
    unresponsive_after: int = 3
    """Calls in a row that time out on a replica (or timeouts one call stays unanswered
    past its own) before the replica is replaced; 0 never replaces one."""
    healthy_after: float = 5.0
    """Seconds a replica must serve before its next death restarts at the first backoff."""
    follow_buffer: int = 1 << 20
    """Bytes of log lines held for one ``logs?follow=true`` reader that is behind;
    newer lines are dropped (and counted) until it catches up."""
    keep_versions: int = 5
    """Versions of a function kept on disk for ``rollback``; older ones not serving are
    removed."""
