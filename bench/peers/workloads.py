"""What every peer serves, the same code in every venv: an echo and the example's COCO SSD.

Imported by the peer servers (``bench/peers/*_server.py``), each in its peer's own
venv, with the SSD example's directory and the checkout on ``sys.path`` (the
example's handler imports ``dcf`` for ``dcf.batch``, which needs nothing but the
standard library). The detector is the example's: its base64 and image decoding
(``Handler.parse``), its onnxruntime session with the example's thread settings
and its batch path (``detect_batch``: one forward pass for the batch, then its
decode and NMS), so every system runs exactly the work DCF's ``ssd-test`` runs.
"""

import json
import os

ENV = {"SSD_MODEL": "coco", "SSD_SCORE_THRESHOLD": "0.5"}
"""The example's config.yaml environment for ``ssd-test``."""

BATCH_SIZE = 8
BATCH_WAIT_S = 0.005
"""The example's ``@dcf.batch(max_size=8, max_wait_ms=5)``, given to every peer's batcher."""


def echo(body: bytes) -> bytes:
    return body


class Detector:
    """The example's handler, loaded once: ``batch`` answers a list of bodies at once."""

    def __init__(self) -> None:
        for key, value in ENV.items():
            os.environ.setdefault(key, value)
        from handler import Handler  # the example's, on sys.path

        self.handler = Handler()

    def batch(self, bodies: list[bytes]) -> list[bytes]:
        """One forward pass for all: the JSON detections of each body, in order."""
        jobs = [self.handler.parse(body, {}) for body in bodies]
        found = self.handler.detector.detect_batch(
            [job.image for job in jobs], [job.threshold for job in jobs]
        )
        return [json.dumps(detections).encode() for detections in found]
