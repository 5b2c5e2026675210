"""The model both servers run in ``python -m bench oip``: a dense layer on 64 features.

Plain numpy, so DCF's handler and MLServer's model class call the very same code.
"""

from __future__ import annotations

import numpy as np

FEATURES, CLASSES = 64, 16
_RNG = np.random.default_rng(0)
WEIGHTS = _RNG.standard_normal((FEATURES, CLASSES)).astype(np.float32)
BIAS = _RNG.standard_normal(CLASSES).astype(np.float32)


def predict(x: np.ndarray) -> np.ndarray:
    """[N, 64] FP32 → [N, 16] FP32."""
    return np.tanh(x @ WEIGHTS + BIAS).astype(np.float32)
