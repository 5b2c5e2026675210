"""A small multi-node Ray cluster on loopback (``python -m bench.ray_cluster``).

Run by ``bench.ray_backend`` as a process of its own, so that every process of
the cluster (GCS, raylets, workers, the replicas' actors) is below it: the
bench pins them all at once and stops them all at the end. It starts a head
with no CPUs and ``--workers`` worker nodes, every node on 127.0.0.2 (traffic
stays on loopback), prints one ``CLUSTERJSON {...}`` line (the address to join,
timings), then waits until its stdin closes and removes its nodes (only its
own: never ``ray stop``, which would end every Ray on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

NODE_IP = "127.0.0.2"
OBJECT_STORE = 128 * 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker-cpus", type=float, default=2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.perf_counter()

    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "node_ip_address": NODE_IP,
            "include_dashboard": False,
            "object_store_memory": OBJECT_STORE,
        },
    )
    for i in range(args.workers):
        cluster.add_node(
            num_cpus=args.worker_cpus,
            node_ip_address=NODE_IP,
            object_store_memory=OBJECT_STORE,
            resources={f"bench-worker{i}": 1},
        )
    cluster.wait_for_nodes()
    info = {
        "address": cluster.address,
        "node_ip": NODE_IP,
        "nodes": 1 + args.workers,
        "worker_cpus": args.worker_cpus,
        "start_s": round(time.perf_counter() - started, 2),
        "pid": os.getpid(),
    }
    print("CLUSTERJSON " + json.dumps(info), flush=True)
    sys.stdin.read()  # serve until the bench closes our stdin
    cluster.shutdown()


if __name__ == "__main__":
    main()
