"""A sandboxed replica's limits as ``info`` shows them, the same on every backend.

Kept apart from any backend so that the gateway (which shows them) and a Ray
node's actor (which names the memory limit when the kernel enforces it) agree.
"""

from __future__ import annotations

DEFAULT_PIDS = 512
DEFAULT_TMP = 1 << 30


def format_memory(size: int) -> str:
    """``268435456`` -> ``256Mi``, as config.yaml writes it."""
    for unit, shift in (("Gi", 30), ("Mi", 20), ("Ki", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def shown_limits(
    *,
    memory_limit: int | None = None,
    cpu_limit: float | None = None,
    pids: int | None = None,
    tmp_size: int | None = None,
    network: str = "host",
) -> dict[str, str]:
    """What a replica may use at most, in config.yaml's words."""
    shown = {
        "pids": str(pids or DEFAULT_PIDS),
        "tmp": format_memory(tmp_size or DEFAULT_TMP),
        "network": network,
    }
    if memory_limit:
        shown["memory"] = format_memory(memory_limit)
    if cpu_limit:
        shown["cpu"] = f"{cpu_limit:g}"
    return shown


def oom_reason(memory_limit: int | None) -> str:
    """Why a replica the kernel killed for its memory ended, for the 502 and ``info``."""
    limit = format_memory(memory_limit) if memory_limit else "?"
    return f"was OOM-killed (limit {limit}): it ran out of its memory limit"
