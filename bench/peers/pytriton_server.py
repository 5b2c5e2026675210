"""PyTriton (the Triton server its wheel ships) serving the bench's workloads over
Triton's HTTP endpoint: ``python pytriton_server.py HTTP_PORT GRPC_PORT METRICS_PORT``.

Models ``echo`` (no batching) and ``ssd`` with Triton's dynamic batcher
(``max_batch_size=8``, ``max_queue_delay_microseconds=5000``: the example's
settings), each one BYTES input and output. Callers use the V2 binary tensor
extension (``Inference-Header-Content-Length``), as ``tritonclient.http`` does, so
a body is not turned into JSON text.
"""

from __future__ import annotations

import sys

import numpy as np
import workloads
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main() -> None:
    http_port, grpc_port, metrics_port = (int(a) for a in sys.argv[1:4])
    detector = workloads.Detector()

    def echo(data: np.ndarray) -> dict[str, np.ndarray]:
        return {"data": data}

    def infer_echo(requests: list[dict]) -> list[dict]:
        return [echo(r["data"]) for r in requests]

    @batch
    def infer_ssd(data: np.ndarray) -> dict[str, np.ndarray]:
        bodies = [bytes(row[0]) for row in data]
        out = detector.batch(bodies)
        return {"detections": np.array([[o] for o in out], dtype=np.object_)}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=http_port,
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name="echo",
            infer_func=infer_echo,
            inputs=[Tensor(name="data", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="data", dtype=np.bytes_, shape=(1,))],
            config=ModelConfig(batching=False),
            strict=False,
        )
        triton.bind(
            model_name="ssd",
            infer_func=infer_ssd,
            inputs=[Tensor(name="data", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="detections", dtype=np.bytes_, shape=(1,))],
            config=ModelConfig(
                max_batch_size=workloads.BATCH_SIZE,
                batcher=DynamicBatcher(
                    max_queue_delay_microseconds=int(workloads.BATCH_WAIT_S * 1e6)
                ),
            ),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
