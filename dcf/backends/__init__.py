"""Where replicas run. The gateway only sees ``Backend`` and ``Replica`` (base.py)."""

from dcf.backends.base import Backend, Replica, ReplicaFailed, ReplicaSpec

__all__ = ["Backend", "Replica", "ReplicaFailed", "ReplicaSpec", "create_backend"]


def create_backend(kind: str, run_dir: str) -> Backend:
    if kind == "local":
        from dcf.backends.local import LocalBackend

        return LocalBackend(run_dir)
    if kind == "ray":
        from dcf.backends.ray import RayBackend  # type: ignore[import-not-found]

        return RayBackend(run_dir)
    raise ValueError(f"unknown backend {kind!r}: choose local or ray")
