"""The backend interface: start, stop and watch replicas, nothing else.

A replica, wherever it runs, serves the framing in ``dcf.wire`` at its
``address`` (a unix socket path, or ``tcp://host:port``), so the gateway's
router talks to every backend's replicas the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

LogSink = Callable[[str, str], None]
"""Called with (replica id, one line of its output)."""


@dataclass(frozen=True)
class ReplicaSpec:
    function: str
    version: int
    replica_id: str
    code_dir: str
    handler_file: str
    handler_name: str
    python: str
    environment: dict[str, str] = field(default_factory=dict)
    concurrency: int = 1
    cpu: float | None = None
    """Cores asked for (Ray: num_cpus, 1 when unset)."""
    memory: int | None = None
    """Bytes asked for (Ray schedules by it)."""
    memory_limit: int | None = None
    """Bytes a replica may use at most (the local backend caps its heap)."""
    gpu: float = 0
    resources: dict[str, float] = field(default_factory=dict)
    """Custom resources (Ray)."""
    placement: str = "spread"
    """Replicas of one function on different nodes (spread) or together (pack)."""
    requirements: tuple[str, ...] = ()
    """The function's requirements, for backends that install them where replicas run."""
    cpu_limit: float | None = None
    """Cores a sandboxed replica may use at most (a cgroup CPU quota)."""
    pids: int | None = None
    """Processes a sandboxed replica may run at once (default 512)."""
    tmp_size: int | None = None
    """Bytes of a sandboxed replica's private /tmp (default 1Gi)."""
    network: str = "host"
    """``none``: a sandboxed replica gets a network namespace of its own."""


class ReplicaFailed(Exception):
    """The replica could not start; ``reason`` is what the user must see (e.g. a traceback)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Replica(Protocol):
    id: str
    address: str
    secret: bytes | None
    """Sent as the first frame on every connection; None only for a replica that needs none."""
    detail: str | None
    """What a replica that is not ready yet is waiting for, for ``info``."""

    async def ready(self) -> None:
        """Return once the handler is loaded and serving; raise ``ReplicaFailed`` otherwise."""

    async def exited(self) -> str:
        """Wait until the replica ends; return why (e.g. 'exited with code 1')."""

    async def stop(self, grace: float = 5.0) -> None:
        """End the replica, forcefully after ``grace`` seconds."""

    def where(self) -> dict[str, Any]:
        """Where it runs, for ``info``: at least ``node`` (``local`` on this host)."""


class Backend(Protocol):
    name: str

    async def start(self, spec: ReplicaSpec, log: LogSink) -> Replica: ...

    async def close(self) -> None: ...
