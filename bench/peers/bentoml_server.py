"""BentoML serving the bench's workloads: ``bentoml serve bentoml_server:Peer --port PORT``.

One service, one worker: ``/echo`` (a positional-only ``bytes`` parameter: the raw
body in, the raw body out) and ``/ssd``, a batchable API with BentoML's adaptive
batching (``max_batch_size=8, max_latency_ms=...``). A batchable API takes a list
per request (BentoML concatenates them into a batch), so its callers send the
base64 text as a JSON list of one string: the same base64 the others get.
"""

from __future__ import annotations

import bentoml
import workloads


@bentoml.service(workers=1, traffic={"timeout": 60})
class Peer:
    def __init__(self) -> None:
        self.detector = workloads.Detector()

    @bentoml.api(route="/echo")
    async def echo(self, body: bytes, /) -> bytes:
        return workloads.echo(body)

    @bentoml.api(
        route="/ssd",
        batchable=True,
        max_batch_size=workloads.BATCH_SIZE,
        max_latency_ms=60_000,
    )
    def ssd(self, bodies: list[str], /) -> list[str]:
        return [out.decode() for out in self.detector.batch([b.encode() for b in bodies])]
