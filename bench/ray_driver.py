"""Ray Serve serving the bench's echo and SSD functions (``python -m bench.ray_driver``).

Run by ``bench.ray_serve`` as a process of its own: it starts a local Ray,
deploys the apps, prints one ``RAYJSON {...}`` line (ports, timings), then
serves until its stdin closes, and shuts Ray down.

``--mode proxy``: Ray Serve's defaults, called through its HTTP proxy.
``--mode direct``: ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, which turns on direct
ingress: each ingress replica serves HTTP on a port of its own, found here by
asking ``/-/routes`` on the ports of the direct-ingress range.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request


def _post(url: str, body: bytes, timeout: float = 60) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def _build(serve, args: argparse.Namespace):  # noqa: ANN001, ANN202
    """The deployments, defined here so that Ray ships them by value to its workers."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment(max_ongoing_requests=args.echo_max_ongoing, ray_actor_options={"num_cpus": 0})
    class Echo:
        async def __call__(self, request: Request) -> Response:
            return Response(await request.body(), media_type="application/octet-stream")

    def load_example(directory: str):  # noqa: ANN202
        sys.path.insert(0, directory)
        os.chdir(directory)
        import handler  # the SSD example, from its directory

        return handler.Handler()

    def error(exc: Exception) -> Response:
        body = json.dumps({"error": str(exc)}).encode()
        return Response(body, status_code=400, media_type="application/json")

    @serve.deployment(max_ongoing_requests=args.ssd_max_ongoing, ray_actor_options={"num_cpus": 0})
    class SSD:
        """One image per call, on a thread pool of 8 (as DCF's ``concurrency: 8``)."""

        def __init__(self, directory: str) -> None:
            self.example = load_example(directory)
            self.pool = ThreadPoolExecutor(8)

        async def __call__(self, request: Request) -> Response:
            body = await request.body()
            loop = asyncio.get_running_loop()
            try:
                result = await loop.run_in_executor(
                    self.pool, self.example.process, body, dict(request.query_params), {}
                )
            except ValueError as exc:
                return error(exc)
            return Response(json.dumps(result).encode(), media_type="application/json")

    @serve.deployment(
        max_ongoing_requests=args.ssd_batch_max_ongoing, ray_actor_options={"num_cpus": 0}
    )
    class SSDBatch:
        """The same detector behind ``@serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)``,
        running the example's batch path (as DCF's ``@dcf.batch(max_size=16, max_wait_ms=5)``)."""

        def __init__(self, directory: str) -> None:
            self.example = load_example(directory)
            self.pool = ThreadPoolExecutor(1)

        def _batch(self, bodies: list[bytes]) -> list:
            from dcf import Request as DcfRequest

            requests = [DcfRequest(input=b) for b in bodies]
            return type(self.example).__call__(self.example, requests)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
        async def detect(self, bodies: list[bytes]) -> list:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.pool, self._batch, bodies)

        async def __call__(self, request: Request) -> Response:
            result = await self.detect(await request.body())
            if isinstance(result, Exception):
                return error(result)
            return Response(json.dumps(result).encode(), media_type="application/json")

    return Echo, SSD, SSDBatch


def _direct_ports(base: int, span: int, want: set[str]) -> dict[str, int]:
    """Route prefix → the port of the replica serving it (direct ingress)."""
    found: dict[str, int] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not want <= set(found):
        for port in range(base, base + span):
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/-/routes", timeout=1
                ) as response:
                    for prefix in json.loads(response.read()):
                        found[prefix] = port
            except (OSError, ValueError):
                continue
        if not want <= set(found):
            time.sleep(0.5)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["proxy", "direct"], default="proxy")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ssd-dir")
    parser.add_argument("--echo-max-ongoing", type=int, default=64)
    parser.add_argument("--ssd-max-ongoing", type=int, default=8)
    parser.add_argument("--ssd-batch-max-ongoing", type=int, default=16)
    parser.add_argument("--direct-base-port", type=int, default=30000)
    args = parser.parse_args()
    started = time.perf_counter()
    span = 100
    if args.mode == "direct":
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
        os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(args.direct_base_port)
        os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(args.direct_base_port + span)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    from ray import serve

    ray.init(
        num_cpus=os.cpu_count(),
        # Ray would use the host's LAN address for its nodes' traffic; keep it on loopback.
        _node_ip_address="127.0.0.2",
        include_dashboard=False,
        object_store_memory=128 * 1024 * 1024,
        log_to_driver=False,
        logging_level="warning",
    )
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    echo_cls, ssd_cls, batch_cls = _build(serve, args)
    serve.run(echo_cls.bind(), name="echo", route_prefix="/echo")
    info: dict = {
        "mode": args.mode,
        "ray_version": ray.__version__,
        "max_ongoing_requests": {
            "echo": args.echo_max_ongoing,
            "ssd": args.ssd_max_ongoing,
            "ssd-batch": args.ssd_batch_max_ongoing,
        },
        "proxy_port": args.port,
        "pid": os.getpid(),
    }
    proxy = f"http://127.0.0.1:{args.port}"
    status, answer = _post(proxy + "/echo", b"hello")
    info["start_to_first_answer_s"] = round(time.perf_counter() - started, 2)
    assert status == 200 and answer == b"hello", (status, answer)
    routes = {"/echo": "echo"}
    if args.ssd_dir:
        serve.run(ssd_cls.bind(args.ssd_dir), name="ssd", route_prefix="/ssd")
        serve.run(batch_cls.bind(args.ssd_dir), name="ssd-batch", route_prefix="/ssd-batch")
        routes.update({"/ssd": "ssd", "/ssd-batch": "ssd-batch"})
    info["deployed_s"] = round(time.perf_counter() - started, 2)
    info["urls"] = {app: proxy + prefix for prefix, app in routes.items()}
    if args.mode == "direct":
        ports = _direct_ports(args.direct_base_port, span, set(routes))
        info["direct_ports"] = ports
        # On its own port a replica still routes by its app's prefix.
        info["urls"] = {
            app: f"http://127.0.0.1:{ports[prefix]}{prefix}"
            for prefix, app in routes.items()
            if prefix in ports
        }
    print("RAYJSON " + json.dumps(info), flush=True)
    sys.stdin.read()  # serve until the bench closes our stdin
    ray.shutdown()  # ends Serve's actors with the cluster, without draining them first


if __name__ == "__main__":
    main()
