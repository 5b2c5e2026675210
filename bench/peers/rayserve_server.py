"""Ray Serve serving the bench's workloads: ``python rayserve_server.py PORT TEMP_DIR``.

A local Ray instance (2 CPUs, no dashboard), Serve's HTTP proxy on PORT, and two
deployments of one replica each: ``/echo`` (async, ``max_ongoing_requests=64``) and
``/ssd`` behind ``@serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)`` (the
example's settings; ``max_ongoing_requests=16`` so that a batch can fill). Runs
until its stdin closes.
"""

from __future__ import annotations

import sys

import ray
import workloads
from ray import serve
from starlette.requests import Request
from starlette.responses import Response


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
class Echo:
    async def __call__(self, request: Request) -> Response:
        return Response(workloads.echo(await request.body()))


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 0})
class SSD:
    def __init__(self) -> None:
        self.detector = workloads.Detector()

    @serve.batch(max_batch_size=workloads.BATCH_SIZE, batch_wait_timeout_s=workloads.BATCH_WAIT_S)
    async def detect(self, bodies: list[bytes]) -> list[bytes]:
        return self.detector.batch(bodies)

    async def __call__(self, request: Request) -> Response:
        return Response(await self.detect(await request.body()), media_type="application/json")


def main() -> None:
    port, temp_dir = int(sys.argv[1]), sys.argv[2]
    # A Ray of its own ("local"), never a cluster another program left on this machine.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=temp_dir,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    serve.run(SSD.bind(), name="ssd", route_prefix="/ssd")
    print("RAYSERVE READY", flush=True)
    sys.stdin.read()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
