"""The COCO SSD: SSDLite-MobileNetV2 from the TF Object Detection API, run by onnxruntime.

``fetch_model.py`` converts the TF.js model behind TF.js' coco-ssd into
``coco_ssd.onnx`` (``image`` [N, 300, 300, 3] RGB 0..255 → ``boxes`` [N, 1917, 4],
``scores`` [N, 1917, 90]). What the TF graph did around that cut is done here
the way TF.js' coco-ssd does it: the image resized by TensorFlow's (legacy,
``align_corners=False``) bilinear resize, each box's best class, then
class-agnostic non-maximum suppression at IoU 0.5, at most 20 boxes.

Environment (all optional; a bad value fails at load time, naming the variable):

``SSD_MODEL``            ``coco`` (default: ``coco_ssd.onnx`` beside this file) or a path to
                         such an ``.onnx`` file
``SSD_LABELS``           ``coco`` (default) or a labels file, line N naming class id N
``SSD_SCORE_THRESHOLD``  minimum confidence reported, 0..1 (default ``0.5``)
``SSD_NMS_IOU``          boxes overlapping a better one by more than this are dropped (``0.5``)
``SSD_MAX_DETECTIONS``   at most this many detections per image (``20``)
``SSD_THREADS``          onnxruntime's threads per forward pass (default: its own choice)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from detector import (
    BatchDetector,
    Detection,
    SSDConfigError,
    clip_coordinate,
    load_labels,
    parse_threshold,
    sort_detections,
)

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "coco_ssd.onnx"
FETCH_HINT = "run `python fetch_model.py` in the example's folder (config.yaml's build step does)"


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise SSDConfigError(f"{name} must be a whole number of at least 1, got {raw!r}")
    return value


@dataclass(frozen=True)
class CocoConfig:
    model: str
    labels: tuple[str, ...]
    score_threshold: float = 0.5
    nms_iou: float = 0.5
    max_detections: int = 20
    threads: int = 0  # 0: onnxruntime decides

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CocoConfig:
        env = os.environ if env is None else env
        model = env.get("SSD_MODEL", "").strip() or "coco"
        path = DEFAULT_MODEL if model == "coco" else Path(model)
        if not path.is_file():
            hint = FETCH_HINT if model == "coco" else "set SSD_MODEL to an existing .onnx file"
            raise SSDConfigError(f"SSD_MODEL: the COCO SSD model {str(path)!r} is missing: {hint}")
        return cls(
            model=str(path),
            labels=tuple(load_labels(env.get("SSD_LABELS", "").strip() or "coco")),
            score_threshold=parse_threshold(
                "SSD_SCORE_THRESHOLD", env.get("SSD_SCORE_THRESHOLD", "0.5")
            ),
            nms_iou=parse_threshold("SSD_NMS_IOU", env.get("SSD_NMS_IOU", "0.5")),
            max_detections=_positive_int(env, "SSD_MAX_DETECTIONS", 20),
            threads=_positive_int(env, "SSD_THREADS", 0),
        )


def _lerp_axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TensorFlow's legacy sampling: output i reads input ``i * in/out`` (no half-pixel shift)."""
    where = np.arange(size_out, dtype=np.float32) * np.float32(size_in / size_out)
    low = np.floor(where).astype(np.intp)
    return low, np.minimum(low + 1, size_in - 1), where - low.astype(np.float32)


def resize_bilinear_tf(image: np.ndarray, height: int, width: int,
                       out: np.ndarray | None = None) -> np.ndarray:
    """``tf.image.resize_bilinear(align_corners=False)`` as TF 1 (and TF.js) compute it, float32.

    OpenCV's ``INTER_LINEAR`` samples half a pixel elsewhere, which moves every
    input pixel the model sees; this matches the graph the weights were trained
    and exported with. Rows and columns are gathered as uint8 first, so the cost
    depends on the output size, not the photo's.
    """
    rows, cols, channels = image.shape
    y0, y1, fy = _lerp_axis(rows, height)
    x0, x1, fx = _lerp_axis(cols, width)
    lanes = np.arange(channels)
    left = (x0[:, None] * channels + lanes).ravel()
    right = (x1[:, None] * channels + lanes).ravel()
    fx = np.repeat(fx, channels)
    flat = image.reshape(rows, cols * channels)
    top, bottom = flat[y0], flat[y1]
    result = np.empty((height, width * channels), np.float32) if out is None else out.reshape(
        height, width * channels)
    np.copyto(result, np.take(top, left, axis=1), casting="unsafe")
    step = np.take(top, right, axis=1).astype(np.float32)
    step -= result
    step *= fx
    result += step  # top = tl + (tr - tl) * dx
    lower = np.take(bottom, left, axis=1).astype(np.float32)
    step = np.take(bottom, right, axis=1).astype(np.float32)
    step -= lower
    step *= fx
    lower += step  # bottom = bl + (br - bl) * dx
    lower -= result
    lower *= fy[:, None]
    result += lower  # top + (bottom - top) * dy
    return result.reshape(height, width, channels)


def non_max_suppression(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int
) -> list[int]:
    """Greedy NMS as ``tf.image.non_max_suppression``: best first, drop boxes with IoU above.

    ``boxes`` are (ymin, xmin, ymax, xmax) rows; indices of the kept boxes, best first.
    """
    y1 = np.minimum(boxes[:, 0], boxes[:, 2])
    x1 = np.minimum(boxes[:, 1], boxes[:, 3])
    y2 = np.maximum(boxes[:, 0], boxes[:, 2])
    x2 = np.maximum(boxes[:, 1], boxes[:, 3])
    areas = (y2 - y1) * (x2 - x1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < limit:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        height = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        width = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        inter = height * width
        union = areas[best] + areas[rest] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where((areas[best] > 0) & (areas[rest] > 0), inter / union, 0.0)
        order = rest[iou <= iou_threshold]
    return keep


class CocoSSD(BatchDetector):
    """Loads the ONNX model once; ``detect_batch`` runs a whole batch as one forward pass."""

    def __init__(self, config: CocoConfig, max_batch: int = 16) -> None:
        import onnxruntime as ort  # here, so that the face model's replicas never load it

        self.config = config
        self.max_batch = max(1, max_batch)
        options = ort.SessionOptions()
        if config.threads:
            options.intra_op_num_threads = config.threads
        # Idle pool threads sleep instead of spinning: the cores are shared with the
        # gateway and the replica's own I/O, which a spinning pool would starve.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                config.model, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise SSDConfigError(
                f"SSD_MODEL: onnxruntime cannot load {config.model!r}: {str(exc).strip()}"
            ) from None
        inputs = self.session.get_inputs()
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        shape = inputs[0].shape if len(inputs) == 1 else []
        if (
            len(shape) != 4
            or shape[3] != 3
            or not all(isinstance(d, int) for d in shape[1:3])
            or set(outputs) != {"boxes", "scores"}
        ):
            raise SSDConfigError(
                f"SSD_MODEL: {config.model!r} is not a converted SSD (one NHWC RGB input; outputs "
                f"boxes and scores); it has inputs {[i.shape for i in inputs]} and outputs "
                f"{sorted(outputs)}: {FETCH_HINT}"
            )
        self.input_name = inputs[0].name
        self.input_size = (int(shape[1]), int(shape[2]))  # height, width
        # onnxruntime sessions may run concurrently, but the reused input buffer may not.
        self._lock = threading.Lock()
        height, width = self.input_size
        self._buffer = np.zeros((self.max_batch, height, width, 3), np.float32)
        self._forward([np.zeros((height, width, 3), np.uint8)])  # warm-up, and a load-time check

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, max_batch: int = 16) -> CocoSSD:
        return cls(CocoConfig.from_env(env), max_batch)

    def _forward(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Boxes and scores for up to ``max_batch`` BGR images."""
        height, width = self.input_size
        with self._lock:
            batch = self._buffer[: len(images)]
            for slot, image in zip(batch, images, strict=True):
                rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
                resize_bilinear_tf(rgb, height, width, out=slot)
            boxes, scores = self.session.run(None, {self.input_name: batch})
        return boxes, scores

    def _detections(
        self,
        outputs: tuple[np.ndarray, np.ndarray],
        index: int,
        shape: tuple[int, ...],
        threshold: float,
    ) -> list[Detection]:
        boxes, scores = outputs
        return self._to_detections(boxes[index], scores[index], shape, threshold)

    def _to_detections(
        self, boxes: np.ndarray, scores: np.ndarray, shape: tuple[int, ...], threshold: float
    ) -> list[Detection]:
        best = scores.argmax(axis=1)
        confidence = scores[np.arange(len(best)), best]
        # NaN fails the test too, so a broken output never becomes a detection.
        candidates = np.flatnonzero(confidence >= threshold)
        candidates = candidates[np.isfinite(boxes[candidates]).all(axis=1)]
        keep = non_max_suppression(
            boxes[candidates], confidence[candidates], self.config.nms_iou,
            self.config.max_detections,
        )
        height, width = shape[:2]
        found: list[Detection] = []
        for index in candidates[keep]:
            ymin, xmin, ymax, xmax = boxes[index].tolist()
            box = (
                clip_coordinate(xmin * width, width),
                clip_coordinate(ymin * height, height),
                clip_coordinate(xmax * width, width),
                clip_coordinate(ymax * height, height),
            )
            if box[2] <= box[0] or box[3] <= box[1]:
                continue  # wholly outside the image
            class_id = int(best[index]) + 1  # column 0 is class id 1: background was dropped
            found.append(
                {
                    "class": self._name(class_id),
                    "class_id": class_id,
                    "confidence": float(confidence[index]),
                    "xmin": box[0],
                    "ymin": box[1],
                    "xmax": box[2],
                    "ymax": box[3],
                }
            )
        return sort_detections(found)
