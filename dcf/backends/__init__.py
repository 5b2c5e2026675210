"""Where replicas run. The gateway only sees ``Backend`` and ``Replica`` (base.py)."""

from dcf.backends.base import Backend, Replica, ReplicaFailed, ReplicaSpec

__all__ = ["Backend", "Replica", "ReplicaFailed", "ReplicaSpec", "create_backend"]


def create_backend(
    kind: str,
    run_dir: str,
    ray_address: str | None = "auto",
    ray_namespace: str = "dcf",
    isolation: str = "process",
    telemetry: dict[str, str] | None = None,
) -> Backend:
    """The backend named ``kind``; ValueError with one line if it cannot start here.

    ``telemetry``: the OTEL_ variables every replica gets so that its spans are exported
    (``dcf.telemetry.replica_environment``); None with tracing off.
    """
    if kind == "local":
        from dcf.backends.local import LocalBackend

        return LocalBackend(run_dir, isolation, telemetry)
    if kind == "ray":
        # Imported only here: the local backend must work without Ray installed.
        from dcf.backends.ray import RayBackend

        return RayBackend(ray_address, ray_namespace, isolation, telemetry)
    raise ValueError(f"unknown backend {kind!r}: choose local or ray")
