"""LitServe serving the bench's workloads: ``python litserve_server.py PORT``.

``/echo`` (no batching) and ``/ssd`` with LitServe's dynamic batching
(``max_batch_size=8, batch_timeout=0.005``, the example's own settings); one
inference worker per API (``workers_per_device=1``), as DCF runs one replica.
The body is read raw (FastAPI's ``bytes`` body for a non-JSON content type).
No ``from __future__ import annotations``: LitServe reads the annotation of
``decode_request`` to know what to parse.
"""

import sys
from typing import Annotated

import litserve as ls
import workloads
from fastapi import Body, Response


class Echo(ls.LitAPI):
    def setup(self, device: str) -> None:
        pass

    def decode_request(self, request: Annotated[bytes, Body()]) -> bytes:
        return request

    def predict(self, x: bytes) -> bytes:
        return workloads.echo(x)

    def encode_response(self, output: bytes) -> Response:
        return Response(content=output, media_type="application/octet-stream")


class SSD(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.detector = workloads.Detector()

    def decode_request(self, request: Annotated[bytes, Body()]) -> bytes:
        return request

    def batch(self, inputs: list[bytes]) -> list[bytes]:
        return inputs

    def predict(self, x: list[bytes]) -> list[bytes]:
        return self.detector.batch(x)

    def unbatch(self, output: list[bytes]) -> list[bytes]:
        return output

    def encode_response(self, output: bytes) -> Response:
        return Response(content=output, media_type="application/json")


def main() -> None:
    port = int(sys.argv[1])
    apis = [
        Echo(api_path="/echo"),
        SSD(
            api_path="/ssd",
            max_batch_size=workloads.BATCH_SIZE,
            batch_timeout=workloads.BATCH_WAIT_S,
        ),
    ]
    server = ls.LitServer(apis, accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(
        host="127.0.0.1",
        port=port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
