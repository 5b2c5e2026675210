"""Where replicas run. The gateway only sees ``Backend`` and ``Replica`` (base.py)."""

from dcf.backends.base import Backend, Replica, ReplicaFailed, ReplicaSpec

__all__ = ["Backend", "Replica", "ReplicaFailed", "ReplicaSpec", "create_backend"]


def create_backend(kind: str, run_dir: str) -> Backend:
    if kind == "local":
        from dcf.backends.local import LocalBackend

        return LocalBackend(run_dir)
    if kind == "ray":
        raise ValueError(
            "the ray backend is not in this release yet; start the gateway with --backend local"
        )
    raise ValueError(f"unknown backend {kind!r}: choose local")
