"""DCF function: SSD object detection on a posted image.

Send the image as base64 text (``base64 photo.jpg | curl --data-binary @- ...``,
newlines and all), as the raw image bytes, or as JSON
``{"image": "<base64>", "threshold": 0.3, "draw": false}``. The answer is a JSON
list, one object per detection, most confident first::

    [{"class": "cup", "class_id": 47, "confidence": 0.964,
      "xmin": 174, "ymin": 21, "xmax": 413, "ymax": 240}, ...]

Query parameters: ``threshold`` (0..1, overrides ``SSD_SCORE_THRESHOLD``) and
``draw=1``, which answers with the image as JPEG, boxes drawn on it.

The same model speaks the Open Inference Protocol (``POST /v2/models/ssd-test/infer``,
e.g. with ``tritonclient.http``): input ``image`` (BYTES [1], the encoded image) or
``pixels`` (UINT8 [H, W, 3], RGB), optionally ``threshold`` (FP32 [1]); outputs
``boxes`` (FP32 [N, 4]: xmin, ymin, xmax, ymax in pixels), ``scores`` (FP32 [N]),
``classes`` (INT64 [N], COCO ids) and ``labels`` (BYTES [N]), as config.yaml declares.

Concurrent calls are grouped (``dcf.batch``) so that one forward pass serves up
to ``SSD_BATCH_SIZE`` images. The model is ``SSD_MODEL``: ``coco`` (default, the
COCO SSD converted by ``fetch_model.py``, see ``coco_ssd.py``), ``face``, or a
file (an ``.onnx`` from the converter, or an OpenCV ``DetectionOutput`` SSD such
as the seed's VOC SSD300, see ``detector.py``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from detector import SSDConfig, SSDConfigError, SSDDetector, draw_detections
from images import DEFAULT_MAX_PIXELS, SUPPORTED, BadInput, decode_image, encode_jpeg, sniff

import dcf

EMPTY_BODY = (
    'empty body: send a base64 image (e.g. "base64 photo.jpg"), the raw image bytes, '
    'or JSON {"image": "<base64>"}'
)
NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=\-_\s]")
WHITESPACE = re.compile(rb"\s+")
DRAW_WORDS = {"1": True, "true": True, "yes": True, "on": True}
DRAW_WORDS |= {"0": False, "false": False, "no": False, "off": False, "": False}


def _env_number(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= minimum):
        raise SSDConfigError(f"{name} must be a number of at least {minimum:g}, got {raw!r}")
    return value


BATCH_SIZE = int(_env_number("SSD_BATCH_SIZE", 8, 1))
BATCH_WAIT_MS = _env_number("SSD_BATCH_WAIT_MS", 5, 0)


def load_detector(env: Mapping[str, str] | None = None) -> Any:
    """The detector ``SSD_MODEL`` names: the COCO SSD (default), the face model, or a file."""
    env = os.environ if env is None else env
    model = env.get("SSD_MODEL", "").strip() or "coco"
    if model == "coco" or model.lower().endswith(".onnx"):
        from coco_ssd import CocoSSD  # onnxruntime only where it is used

        return CocoSSD.from_env(env, max_batch=BATCH_SIZE)
    return SSDDetector(SSDConfig.from_env(env), max_batch=BATCH_SIZE)


@dataclass
class Job:
    """One parsed call: the decoded image and what the caller asked for."""

    image: np.ndarray
    threshold: float | None
    draw: bool
    v2: bool = False


def decode_base64(text: bytes, source: str = "body") -> bytes:
    """Base64 as ``base64`` prints it (76-column lines), URL-safe or as a ``data:`` URL.

    ``base64.decodebytes`` would silently skip stray characters and turn garbage
    into garbage bytes; validating first gives the caller a message that helps.
    """
    if text[:5].lower() == b"data:" and b"," in text[:200]:
        text = text.split(b",", 1)[1]
    bad = NOT_BASE64.search(text)
    if bad:
        char = bad.group()
        shown = repr(chr(char[0])) if char.isascii() else f"byte 0x{char[0]:02x}"
        raise BadInput(
            400,
            f"{source} is not valid base64 ({shown} at offset {bad.start()}), and not a raw "
            f"{SUPPORTED} image either",
        )
    compact = WHITESPACE.sub(b"", text)
    urlsafe = b"-" in compact or b"_" in compact
    if urlsafe and (b"+" in compact or b"/" in compact):
        raise BadInput(400, f"{source} is not valid base64 (mixes the +/ and -_ alphabets)")
    body = compact.rstrip(b"=")
    if len(body) % 4 == 1:
        raise BadInput(400, f"{source} is not valid base64 (length {len(body)} is impossible)")
    padded = body + b"=" * (-len(body) % 4)  # tolerate missing padding
    try:
        return base64.b64decode(padded, altchars=b"-_" if urlsafe else None, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInput(400, f"{source} is not valid base64 ({exc})") from None


def parse_threshold(value: Any, source: str) -> float | None:
    """A confidence in 0..1 from a query string or a JSON number; 400 otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        number = math.nan
    if not 0.0 <= number <= 1.0:
        raise BadInput(400, f"{source} must be a number between 0 and 1, got {value!r}")
    return number


def parse_draw(value: Any, source: str) -> bool:
    """``draw`` as 1/0, true/false, yes/no, on/off (or a JSON boolean)."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in DRAW_WORDS:
        return DRAW_WORDS[value.strip().lower()]
    raise BadInput(400, f"{source} must be true or false (1 or 0), got {value!r}")


class Handler:
    """One per replica: ``__init__`` loads the model, each call only runs it."""

    def __init__(self) -> None:
        self.detector = load_detector()
        self.max_pixels = int(_env_number("SSD_MAX_PIXELS", DEFAULT_MAX_PIXELS, 1))

    def parse(
        self, body: bytes, query: Mapping[str, str], headers: Mapping[str, str] | None = None
    ) -> Job:
        """Decode the image and options of one call, or raise :class:`BadInput`."""
        body = bytes(body or b"")
        query = query or {}
        headers = headers or {}
        threshold = parse_threshold(query.get("threshold"), "threshold")
        draw = parse_draw(query.get("draw"), "draw")
        stripped = body.strip()
        if not stripped:
            raise BadInput(400, EMPTY_BODY)
        if sniff(body):
            image = decode_image(body, self.max_pixels, "body")
        elif stripped[:1] == b"{" or "json" in headers.get("content-type", "").lower():
            try:
                doc = json.loads(body)
            except ValueError as exc:  # includes bad UTF-8
                raise BadInput(400, f"body is not valid JSON ({exc})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("image"), str):
                raise BadInput(400, 'JSON body needs an "image" field: the base64 image')
            # Query parameters win over the same fields in the body.
            if "threshold" not in query:
                threshold = parse_threshold(doc.get("threshold"), '"threshold"')
            if "draw" not in query:
                draw = parse_draw(doc.get("draw"), '"draw"')
            data = decode_base64(doc["image"].encode("utf-8"), 'the "image" field')
            if not data:
                raise BadInput(400, 'the "image" field is empty')
            image = decode_image(data, self.max_pixels, 'the decoded "image" field')
        else:
            image = decode_image(decode_base64(body), self.max_pixels, "decoded body")
        return Job(image, threshold, draw)

    def parse_tensors(self, tensors: Mapping[str, np.ndarray]) -> Job:
        """A V2 call's image (``image``: encoded bytes, or ``pixels``: RGB HWC) and threshold."""
        threshold = None
        if "threshold" in tensors:
            values = tensors["threshold"].ravel()
            if values.size != 1:
                raise BadInput(400, "input 'threshold' must hold one number")
            threshold = parse_threshold(float(values[0]), "input 'threshold'")
        if ("image" in tensors) == ("pixels" in tensors):
            raise BadInput(400, "send one of the inputs 'image' (BYTES) or 'pixels' (UINT8 HWC)")
        if "image" in tensors:
            encoded = tensors["image"].ravel()
            if encoded.size != 1:
                raise BadInput(400, "input 'image' must hold one encoded image")
            image = decode_image(bytes(encoded[0]), self.max_pixels, "input 'image'")
        else:
            pixels = tensors["pixels"]
            if pixels.size > self.max_pixels * 3:
                raise BadInput(413, f"input 'pixels' has more than {self.max_pixels} pixels")
            image = np.ascontiguousarray(pixels[:, :, ::-1])  # the detectors take BGR
        return Job(image, threshold, False, v2=True)

    def parse_call(self, req: dcf.Request) -> Job:
        if req.tensors is not None:
            return self.parse_tensors(req.tensors)
        return self.parse(req.input, req.query, req.headers)

    @staticmethod
    def tensors_of(detections: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Detections as V2 outputs: the same numbers as the JSON answer."""
        corners = [[d["xmin"], d["ymin"], d["xmax"], d["ymax"]] for d in detections]
        return {
            "boxes": np.array(corners, np.float32).reshape(-1, 4),
            "scores": np.array([d["confidence"] for d in detections], np.float32),
            "classes": np.array([d["class_id"] for d in detections], np.int64),
            "labels": np.array([d["class"].encode() for d in detections], dtype=object),
        }

    def answer(self, job: Job, detections: list[dict[str, Any]]) -> Any:
        """The detections (as V2 outputs for a V2 call), or with ``draw`` the JPEG."""
        if job.v2:
            return self.tensors_of(detections)
        if job.draw:
            return encode_jpeg(draw_detections(job.image, detections))
        return detections

    def process(
        self, body: bytes, query: Mapping[str, str], headers: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]] | bytes:
        """One call without the runtime: raises :class:`BadInput` for the caller's mistakes."""
        job = self.parse(body, query, headers)
        return self.answer(job, self.detector.detect(job.image, job.threshold))

    @dcf.batch(max_size=BATCH_SIZE, max_wait_ms=BATCH_WAIT_MS)
    def __call__(self, requests: dcf.Request | list[dcf.Request]) -> Any:
        """Serve a batch (a list, one result each) or a single request.

        Both shapes are accepted so the handler works whether or not the runtime
        batches it.
        """
        if not isinstance(requests, list):
            try:
                job = self.parse_call(requests)
                return self._reply(self.answer(job, self.detector.detect(job.image, job.threshold)))
            except BadInput as exc:
                raise dcf.HTTPError(exc.status, exc.message) from None
        results: list[Any] = [None] * len(requests)
        jobs: dict[int, Job] = {}
        for index, req in enumerate(requests):
            try:
                jobs[index] = self.parse_call(req)
            except BadInput as exc:
                results[index] = dcf.HTTPError(exc.status, exc.message)
        if jobs:
            found = self.detector.detect_batch(
                [job.image for job in jobs.values()], [job.threshold for job in jobs.values()]
            )
            for (index, job), detections in zip(jobs.items(), found, strict=True):
                results[index] = self._reply(self.answer(job, detections))
        return results

    @staticmethod
    def _reply(result: Any) -> Any:
        if isinstance(result, bytes):
            return dcf.Response(result, headers={"content-type": "image/jpeg"})
        return result
