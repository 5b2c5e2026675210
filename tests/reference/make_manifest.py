"""Decode sample photos with OpenCV into raw RGB files for coco_ssd_tfjs.js.

usage: python make_manifest.py SAMPLES_DIR manifest.json [--dump NAME ...]

The reference sees exactly the pixels the handler sees: OpenCV's decoding, BGR
turned into RGB. Raw files go beside the manifest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("samples", type=Path)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--dump", nargs="*", default=[], help="images whose tensors to dump")
    parser.add_argument("--thresholds", default="0.5,0.3")
    args = parser.parse_args()
    out = args.manifest.resolve().parent
    items = []
    for photo in sorted(args.samples.glob("*.jpg")):
        data = np.frombuffer(photo.read_bytes(), np.uint8)
        rgb = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        raw = out / f"{photo.name}.rgb"
        raw.write_bytes(np.ascontiguousarray(rgb).tobytes())
        item = {
            "name": photo.name,
            "width": rgb.shape[1],
            "height": rgb.shape[0],
            "rgb": str(raw),
            "thresholds": [float(t) for t in args.thresholds.split(",")],
        }
        if photo.name in args.dump:
            item["dump"] = str(out / photo.name)
        items.append(item)
    args.manifest.write_text(json.dumps(items, indent=1))


if __name__ == "__main__":
    main()
