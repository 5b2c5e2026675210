"""Replicas on a Ray cluster: each one a Ray actor hosting the runtime in-process
(with isolation ``sandbox``: in bwrap on the actor's node, see runtime/ray_sandbox.py).

Ray is the control plane only. It places replicas (num_cpus, num_gpus, memory
and custom resources from the config), ships the function's code to their
nodes through its object store and installs their requirements there
(runtime_env ``pip``), and reports their death. Calls never go through Ray: a
replica serves ``dcf.wire`` on a TCP port of its node, and the gateway's router
keeps one multiplexed connection to it, as to a local replica. The first frame
on that connection carries a secret made for this gateway's life; a replica
closes any connection without it.

The gateway joins the cluster as a driver, so it must run on one of its nodes
(usually the head). Replica actors are not detached: they end with the
gateway, and a restarted gateway creates them anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import ipaddress
import secrets
import socket
import tarfile
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import dcf
from dcf.backends.base import LogSink, ReplicaFailed, ReplicaSpec
from dcf.sandbox.summary import shown_limits

try:
    import ray
    from ray.exceptions import RayActorError, RayError, RuntimeEnvSetupError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ValueError(
        f"the ray backend needs Ray on this host: pip install 'dcf[ray]' ({exc.msg})"
    ) from None

from dcf.runtime.ray_actor import ReplicaActor

LOG_POLL = 10.0
"""Seconds a replica holds a log request open when it has printed nothing."""

# Ray's own bookkeeping resources, never asked for by a function.
_INTERNAL = ("node:", "accelerator_type:", "object_store_memory")
_NAMES = {"CPU": "cpu", "GPU": "gpu", "memory": "memory"}


def _resolve(address: str | None) -> str:
    """``auto`` (or nothing): the cluster ``ray start --head`` left on this host."""
    if address and address != "auto":
        return address
    from ray._private.services import get_ray_address_from_environment

    try:
        found = get_ray_address_from_environment("auto", None)
    except ConnectionError:
        found = None
    if not found or found == "auto":
        raise ValueError(
            "no Ray cluster is running on this host: start one with `ray start --head`,"
            " or pass --ray-address HOST:PORT"
        )
    return found


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


def connect(address: str | None, namespace: str) -> None:
    """Join the cluster as a driver, or raise ValueError with one line saying why not."""
    address = _resolve(address)
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray-address {address!r} is not HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        raise ValueError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}): start one with"
            " `ray start --head`, or pass the address it printed with --ray-address"
        ) from None
    try:
        ray.init(
            address=address,
            namespace=namespace,
            # Ray would swap a loopback address for the host's LAN address; on a
            # cluster started on loopback, the driver must stay there too.
            _node_ip_address=host if _is_loopback(host) else None,
            log_to_driver=False,  # replicas' output reaches the function's log instead
            logging_level="WARNING",
            # The runtime replicas run is this gateway's: nodes need Ray, not DCF.
            runtime_env={"py_modules": [str(Path(dcf.__file__).parent)]},
        )
    except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; say it in one line
        raise ValueError(f"cannot join the Ray cluster at {address}: {exc}") from None


def _demand(spec: ReplicaSpec) -> dict[str, float]:
    """What one replica asks of a node, in Ray's resource names."""
    demand = {"CPU": 1.0 if spec.cpu is None else spec.cpu, "GPU": spec.gpu}
    if spec.memory:
        demand["memory"] = float(spec.memory)
    demand.update(spec.resources)
    return {name: amount for name, amount in demand.items() if amount}


def _reserve_limits(spec: ReplicaSpec) -> ReplicaSpec:
    """A limit with no request is also the request, as in Kubernetes: Ray reserves what a
    sandboxed replica may use, so a node holds no more replicas than it can cap (and where
    its cgroups are not writable, the reservation is what stands for the CPU limit)."""
    cpu = spec.cpu if spec.cpu is not None else spec.cpu_limit
    return replace(spec, cpu=cpu, memory=spec.memory or spec.memory_limit)


def _show(resources: dict[str, float]) -> str:
    parts = []
    for name, amount in sorted(resources.items()):
        if name.startswith(_INTERNAL):
            continue
        if name == "memory":
            parts.append(f"memory {amount / (1 << 30):.1f}Gi")
        else:
            parts.append(f"{_NAMES.get(name, name)} {amount:g}")
    return ", ".join(parts) or "nothing"


def infeasible(function: str, demand: dict[str, float], nodes: list[dict]) -> str | None:
    """Why no alive node could ever hold a replica (None if one could).

    Ray would leave such an actor pending forever (with a warning in its own
    log), so the deploy must fail at once instead, naming what is missing.
    """
    totals = [n["Resources"] for n in nodes if n.get("Alive")]
    if any(all(t.get(k, 0) >= v for k, v in demand.items()) for t in totals):
        return None
    short = [k for k, v in demand.items() if not any(t.get(k, 0) >= v for t in totals)]
    lacking = "; ".join(
        f"no node has {_NAMES.get(k, k)} {demand[k]:g}"
        f" (the most on one node is {max((t.get(k, 0) for t in totals), default=0):g})"
        for k in short
    )
    where = "; ".join(
        f"{n['NodeManagerAddress']}: {_show(n['Resources'])}" for n in nodes if n.get("Alive")
    )
    return (
        f"no node of the Ray cluster can ever hold a replica of {function!r}: it asks for"
        f" {_show(demand)}; {lacking or 'no single node has all of it'}."
        f" The cluster's nodes have: {where or 'none alive'}"
    )


def _why_dead(exc: BaseException, node_ip: str | None) -> str:
    text = str(exc)
    if "node" in text.lower() and ("died" in text or "dead" in text):
        return f"was lost with its node {node_ip or ''}".rstrip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"died ({lines[0] if lines else type(exc).__name__})"


def _tail(exc: BaseException, count: int = 20) -> str:
    return "\n".join(str(exc).rstrip().splitlines()[-count:])


class RayReplica:
    def __init__(self, spec: ReplicaSpec, actor: Any, started: Any, backend: RayBackend) -> None:
        self.id = spec.replica_id
        self.address = ""
        self.secret: bytes | None = backend.secret
        self.node = "pending"
        self.counted: str | None = None
        """The node the backend counts it on."""
        self.node_ip: str | None = None
        self.pid: int | None = None
        self.detail: str | None = "waiting for the cluster to place it and set up its environment"
        self._spec = spec
        self._actor = actor
        self._started = started
        self._backend = backend
        self._ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._enforced_by: str | None = None

    def watch(self, log: LogSink) -> None:
        asyncio.get_running_loop().create_task(self._watch(log))

    async def _watch(self, log: LogSink) -> None:
        """Collect what the replica prints until it ends; its end is this loop's error."""
        reason = "ended"
        try:
            while True:
                node_ip, lines, ended = await self._actor.logs.remote(LOG_POLL)
                source = f"{self.id}@{node_ip}"
                for line in lines:
                    log(source, line)
                if ended is not None:  # its sandboxed runtime is gone: so is the replica
                    reason = ended
                    with contextlib.suppress(RayError):
                        await asyncio.to_thread(ray.kill, self._actor, no_restart=True)
                    break
        except RuntimeEnvSetupError as exc:
            reason = f"could not set up its environment:\n{_tail(exc)}"
        except RayActorError as exc:
            reason = _why_dead(exc, self.node_ip)
        except RayError as exc:
            reason = f"failed ({_tail(exc, 3)})"
        finally:
            self._backend._release(self)
            if not self._ended.done():
                self._ended.set_result(reason)

    async def ready(self) -> None:
        try:
            info = await self._started
        except RuntimeEnvSetupError as exc:
            raise ReplicaFailed(
                f"installing the requirements of {self._spec.function!r} on the Ray cluster"
                f" failed:\n{_tail(exc)}"
            ) from None
        except RayError as exc:
            why = _why_dead(exc, self.node_ip)
            raise ReplicaFailed(f"replica {self.id} {why} before it was ready") from None
        if "failed" in info:
            raise ReplicaFailed(info["failed"])
        self.address = info["address"]
        self.node = info["node_id"]
        self.node_ip = info["node_ip"]
        self.pid = info["pid"]
        self._enforced_by = info.get("enforced_by")
        self.detail = None
        self._backend._placed(self)

    async def exited(self) -> str:
        return await asyncio.shield(self._ended)

    async def stop(self, grace: float = 5.0) -> None:
        if not self._ended.done():
            with contextlib.suppress(RayError, asyncio.TimeoutError):
                ended = await asyncio.wait_for(self._actor.stop.remote(), min(grace, 1.0))
                if ended and not self._ended.done():  # its runtime had ended by itself
                    self._ended.set_result(ended)
            await asyncio.to_thread(ray.kill, self._actor, no_restart=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.exited(), grace)
            if not self._ended.done():
                self._ended.set_result("was stopped")

    def where(self) -> dict[str, Any]:
        where: dict[str, Any] = {"node": self.node, "node_ip": self.node_ip}
        if self._backend.isolation == "sandbox":
            spec = self._spec
            limits = shown_limits(
                memory_limit=spec.memory_limit,
                cpu_limit=spec.cpu_limit,
                pids=spec.pids,
                tmp_size=spec.tmp_size,
                network=spec.network,
            )
            if self._enforced_by:  # known once its node has started it
                limits["enforced_by"] = self._enforced_by
            where.update(isolation="sandbox", limits=limits)
        return where


class RayBackend:
    name = "ray"

    def __init__(
        self,
        address: str | None = "auto",
        namespace: str = "dcf",
        isolation: str = "process",
        telemetry: dict[str, str] | None = None,
    ) -> None:
        connect(address, namespace)
        self.isolation = isolation
        self._telemetry = dict(telemetry or {})
        self.secret = secrets.token_bytes(32)
        self._actor_class = ray.remote(ReplicaActor)
        self._archives: dict[str, asyncio.Task[tuple[Any, str]]] = {}
        self._archive_users: Counter[str] = Counter()
        self._nodes: dict[str, Counter[str]] = {}
        """Replicas of each function on each node (where they were sent, then where they are)."""
        self._load: Counter[str] = Counter()
        """This gateway's replicas on each node."""
        self._live: set[RayReplica] = set()

    async def start(self, spec: ReplicaSpec, log: LogSink) -> RayReplica:
        if self.isolation == "sandbox":
            spec = _reserve_limits(spec)
        demand = _demand(spec)
        nodes = await asyncio.to_thread(ray.nodes)
        why = infeasible(spec.function, demand, nodes)
        if why:
            raise ReplicaFailed(why)
        archive, code_name = await self._archive(spec.code_dir, spec)
        options: dict[str, Any] = {
            "num_cpus": demand.get("CPU", 0),
            "num_gpus": spec.gpu,
            "resources": dict(spec.resources),
            "max_restarts": 0,  # the gateway replaces replicas itself
            "max_task_retries": 0,
        }
        target = self._choose(spec, demand, nodes)
        if target is not None:
            # Soft, and spilling when the node is busy: a preference, never a wait.
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                target, soft=True, _spill_on_unavailable=True
            )
        if spec.memory:
            options["memory"] = spec.memory
        if spec.requirements:
            options["runtime_env"] = {
                "pip": {"packages": list(spec.requirements), "pip_check": False}
            }
        payload = asdict(spec)
        payload["code_name"] = code_name
        payload["telemetry"] = self._telemetry  # where its spans go, with tracing on
        payload["isolation"] = self.isolation
        actor = self._actor_class.options(**options).remote(payload, self.secret)
        replica = RayReplica(spec, actor, actor.start.remote(archive), self)
        self._count(replica, target)
        self._archive_users[spec.code_dir] += 1
        self._live.add(replica)
        replica.watch(log)
        return replica

    def _choose(self, spec: ReplicaSpec, demand: dict[str, float], nodes: list[dict]) -> str | None:
        """The node a new replica should go to, or None to let Ray choose.

        Ray's own SPREAD turns round-robin over every actor of the cluster, so
        two replicas of one function can share a node while another is idle;
        the choice is made here instead, from the replicas this gateway placed.
        spread: the node with the fewest replicas of the function (then the
        fewest of all). pack: the one with the most (then the most of all).
        """
        fits = [
            n["NodeID"]
            for n in nodes
            if n.get("Alive") and all(n["Resources"].get(k, 0) >= v for k, v in demand.items())
        ]
        if not fits:
            return None
        mine = self._nodes.get(spec.function, Counter())
        if spec.placement == "pack":
            return max(fits, key=lambda node: (mine[node], self._load[node]))
        return min(fits, key=lambda node: (mine[node], self._load[node]))

    def _count(self, replica: RayReplica, node: str | None) -> None:
        """Move the replica's count to ``node`` (None: not counted anywhere)."""
        function = replica._spec.function
        if replica.counted is not None:
            self._nodes[function][replica.counted] -= 1
            self._load[replica.counted] -= 1
        replica.counted = node
        if node is not None:
            self._nodes.setdefault(function, Counter())[node] += 1
            self._load[node] += 1

    async def _archive(self, code_dir: str, spec: ReplicaSpec) -> tuple[Any, str]:
        """The code as one object in Ray's store, shared by every replica of the version."""
        task = self._archives.get(code_dir)
        if task is None or (task.done() and task.exception() is not None):
            task = self._archives[code_dir] = asyncio.get_running_loop().create_task(
                asyncio.to_thread(_put_archive, code_dir, spec.function, spec.version)
            )
        return await asyncio.shield(task)

    def _placed(self, replica: RayReplica) -> None:
        if replica.node != replica.counted:  # Ray spilled it elsewhere
            self._count(replica, replica.node)

    def _release(self, replica: RayReplica) -> None:
        if replica not in self._live:
            return
        self._live.discard(replica)
        spec = replica._spec
        self._count(replica, None)
        self._archive_users[spec.code_dir] -= 1
        if self._archive_users[spec.code_dir] <= 0:
            del self._archive_users[spec.code_dir]
            self._archives.pop(spec.code_dir, None)  # its object leaves Ray's store

    async def close(self) -> None:
        await asyncio.gather(*(r.stop(grace=1.0) for r in list(self._live)), return_exceptions=True)
        await asyncio.to_thread(ray.shutdown)


def _put_archive(code_dir: str, function: str, version: int) -> tuple[Any, str]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(code_dir, arcname=".")
    data = buffer.getvalue()
    name = f"{function}-v{version}-{hashlib.sha256(data).hexdigest()[:16]}"
    return ray.put(data), name
