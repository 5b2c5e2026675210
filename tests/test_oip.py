"""The Open Inference Protocol (V2, REST) through a real gateway, called by Triton's own
client (``tritonclient.http``) as apps already do, and by raw HTTP where the client
cannot go (malformed requests). Expected results come from the handler's own
``compute`` called in this process, not from the code under test."""

from __future__ import annotations

import concurrent.futures
import json
import textwrap
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.conftest import GatewayProcess, deploy

httpclient = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]'")
from tritonclient.utils import InferenceServerException, np_to_triton_dtype  # noqa: E402

MAX_BODY = 1 << 20

TENSORS = """
import numpy as np

calls = 0


def compute(x, n, words):
    return {
        "doubled": (x * 2).astype(np.float32),
        "total": n.sum(axis=-1, keepdims=True).astype(np.int64),
        "upper": np.array([w.upper() for w in words.ravel()], dtype=object).reshape(words.shape),
    }


def Handler(req):
    global calls
    if req.tensors is None:  # /function/NAME: how many V2 calls reached this replica
        return {"calls": calls}
    calls += 1
    t = req.tensors
    return compute(t["x"], t["n"], t["words"])
"""
DECLARED = {
    "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "n", "datatype": "INT64", "shape": [-1, 3]},
        {"name": "words", "datatype": "BYTES", "shape": [-1]},
    ],
    "outputs": [
        {"name": "doubled", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "total", "datatype": "INT64", "shape": [-1, 1]},
        {"name": "upper", "datatype": "BYTES", "shape": [-1]},
    ],
}
# Declares nothing: takes any tensors, and answers each input back as an output.
ECHO_TENSORS = """
def Handler(req):
    return [{"name": name, "data": array} for name, array in req.tensors.items()]
"""
BATCHED = """
import numpy as np
import dcf


@dcf.batch(max_size=8, max_wait_ms=50)
def Handler(requests):
    stacked = np.concatenate([r.tensors["x"] for r in requests])
    total = stacked.sum(axis=1, keepdims=True)  # one "forward pass" for the batch
    out, at = [], 0
    for r in requests:
        rows = len(r.tensors["x"])
        out.append({"sum": total[at : at + rows], "batch": np.array([len(requests)], np.int32)})
        at += rows
    return out
"""


def handler_compute():  # noqa: ANN201
    namespace: dict = {}
    exec(textwrap.dedent(TENSORS), namespace)  # noqa: S102 - the very code deployed
    return namespace["compute"]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("oip")
    gateway = GatewayProcess(root / "home", extra=["--max-body", str(MAX_BODY)]).start()
    deploy(gateway, root, "tensors", TENSORS, **DECLARED)
    deploy(gateway, root, "echo-tensors", ECHO_TENSORS)
    yield gateway
    gateway.stop()


@pytest.fixture
def client(gw: GatewayProcess) -> Iterator:
    triton = httpclient.InferenceServerClient(gw.address, connection_timeout=30,
                                              network_timeout=60)
    yield triton
    triton.close()


def sample() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 3
    n = np.array([[1, 2, 3], [2**40, -5, 7]], dtype=np.int64)
    words = np.array([b"hello", "wörld".encode()], dtype=object)
    return x, n, words


def inputs_of(x, n, words, binary: bool) -> list:  # noqa: ANN001
    out = []
    for name, array in (("x", x), ("n", n), ("words", words)):
        tensor = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=binary)
        out.append(tensor)
    return out


def v2_calls(gw: GatewayProcess) -> int:
    return httpx.post(gw.url + "/function/tensors", timeout=30).json()["calls"]


def test_server_is_live_and_ready_and_says_what_it_speaks(client):  # noqa: ANN001
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "dcf" and "binary_tensor_data" in meta["extensions"]


def test_model_ready_and_metadata_equal_config(gw: GatewayProcess, client):  # noqa: ANN001
    version = gw.http().get("/system/function/tensors").json()["version"]
    assert client.is_model_ready("tensors")
    assert client.is_model_ready("tensors", model_version=str(version))
    assert not client.is_model_ready("tensors", model_version=str(version + 5))
    assert not client.is_model_ready("no-such-model")
    meta = client.get_model_metadata("tensors")
    assert meta["name"] == "tensors" and meta["versions"] == [str(version)]
    assert meta["inputs"] == DECLARED["inputs"] and meta["outputs"] == DECLARED["outputs"]
    assert client.get_model_metadata("tensors", model_version=str(version)) == meta
    # A function that declares nothing still has metadata (and takes any tensors).
    bare = client.get_model_metadata("echo-tensors")
    assert bare["inputs"] == [] and bare["outputs"] == []


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_equals_the_handler_called_directly(client, binary: bool):  # noqa: ANN001
    x, n, words = sample()
    want = handler_compute()(x, n, words)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary)
               for name in ("doubled", "total", "upper")]
    result = client.infer("tensors", inputs_of(x, n, words, binary), outputs=outputs,
                          request_id="call-1")
    response = result.get_response()
    assert response["model_name"] == "tensors" and response["id"] == "call-1"
    assert result.as_numpy("doubled").dtype == np.float32
    np.testing.assert_array_equal(result.as_numpy("doubled"), want["doubled"])
    np.testing.assert_array_equal(result.as_numpy("total"), want["total"])
    upper = result.as_numpy("upper")
    got = [w if isinstance(w, bytes) else w.encode() for w in upper.ravel()]
    assert got == list(want["upper"].ravel())
    for output in response["outputs"]:
        assert ("parameters" in output) is binary  # binary_data_size, exactly when asked


def test_mixed_json_and_binary_and_the_default_outputs(client):  # noqa: ANN001
    """Binary inputs with JSON outputs, and outputs=None (tritonclient then asks for every
    output in binary, with binary_data_output)."""
    x, n, words = sample()
    want = handler_compute()(x, n, words)
    only = [httpclient.InferRequestedOutput("total", binary_data=False)]
    result = client.infer("tensors", inputs_of(x, n, words, True), outputs=only)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["total"]
    np.testing.assert_array_equal(result.as_numpy("total"), want["total"])
    result = client.infer("tensors", inputs_of(x, n, words, False))
    assert {o["name"] for o in result.get_response()["outputs"]} == set(want)
    np.testing.assert_array_equal(result.as_numpy("doubled"), want["doubled"])


ALL_TYPES = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], np.uint8),
    "UINT16": np.array([[0, 7, 65535]], np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], np.uint32),
    "UINT64": np.array([[0, 7, 2**63]], np.uint64),
    "INT8": np.array([[-128, 0, 127]], np.int8),
    "INT16": np.array([[-(2**15), 0, 2**15 - 1]], np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], np.int64),
    "FP16": np.array([[0.5, -1.25, 65504]], np.float16),
    "FP32": np.array([[0.1, -3.0e38, 1e-30]], np.float32),
    "FP64": np.array([[0.1, -1e300, 5e-324]], np.float64),
    "BYTES": np.array([[b"a", b"", b"xyz"]], dtype=object),
}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_datatype_round_trips(client, binary: bool):  # noqa: ANN001
    inputs, outputs = [], []
    for datatype, array in ALL_TYPES.items():
        tensor = httpclient.InferInput(datatype.lower(), list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
        outputs.append(httpclient.InferRequestedOutput(datatype.lower(), binary_data=binary))
    result = client.infer("echo-tensors", inputs, outputs=outputs)
    by_name = {o["name"]: o for o in result.get_response()["outputs"]}
    for datatype, array in ALL_TYPES.items():
        got = result.as_numpy(datatype.lower())
        assert by_name[datatype.lower()]["datatype"] == datatype
        if datatype == "BYTES":
            got = np.array([g if isinstance(g, bytes) else g.encode() for g in got.ravel()],
                           dtype=object).reshape(got.shape)
        assert got.shape == array.shape, datatype
        np.testing.assert_array_equal(got, array, err_msg=datatype)


def test_json_data_may_be_nested(gw: GatewayProcess):
    body = {"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [[1, 2, 3, 4], [5, 6, 7, 8]]},
        {"name": "n", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]},
        {"name": "words", "datatype": "BYTES", "shape": [1], "data": ["hi"]},
    ]}
    r = httpx.post(gw.url + "/v2/models/tensors/infer", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["doubled"] == {"name": "doubled", "datatype": "FP32", "shape": [2, 4],
                                  "data": [2, 4, 6, 8, 10, 12, 14, 16]}
    assert outputs["total"]["data"] == [6] and outputs["upper"]["data"] == ["HI"]


WRONG = {
    "name": ({"name": "y"}, "input 'y'"),
    "shape": ({"shape": [2, 5]}, "input 'x': shape [2, 5]"),
    "datatype": ({"datatype": "FP64"}, "input 'x': datatype FP64"),
}


@pytest.mark.parametrize("what", sorted(WRONG))
def test_a_wrong_tensor_is_a_400_naming_it_before_any_replica(gw: GatewayProcess, client,  # noqa: ANN001
                                                              what: str):
    change, named = WRONG[what]
    before = v2_calls(gw)
    x, n, words = sample()
    if what == "shape":
        x = np.zeros((2, 5), np.float32)
    if what == "datatype":
        x = x.astype(np.float64)
    tensors = inputs_of(x, n, words, True)
    if what == "name":
        tensors[0] = httpclient.InferInput("y", [2, 4], "FP32")
        tensors[0].set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("tensors", tensors)
    assert raised.value.status() == "400" and named in raised.value.message(), raised.value
    assert v2_calls(gw) == before  # the replica never saw it
    # The same over raw HTTP: the V2 error body.
    r = httpx.post(gw.url + "/v2/models/tensors/infer", timeout=30, json={"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4], **change}]})
    assert r.status_code == 400 and list(r.json()) == ["error"] and named in r.json()["error"]


def test_bad_requests_are_400s_that_say_why(gw: GatewayProcess):
    url = gw.url + "/v2/models/tensors/infer"
    good = [{"name": "n", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]},
            {"name": "words", "datatype": "BYTES", "shape": [1], "data": ["a"]}]
    cases = [
        (b"{not json", {}, "not valid JSON"),
        (json.dumps({"inputs": good}).encode(), {}, "input 'x' is missing"),
        (json.dumps({"inputs": []}).encode(), {}, "needs 'inputs'"),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                  "data": [1, 2, 3]}, *good]}).encode(), {},
         "input 'x': data holds 3 elements; shape [1, 4] needs 4"),  # found by the replica
        (json.dumps({"inputs": good}).encode(), {"inference-header-content-length": "ab"},
         "Inference-Header-Content-Length 'ab'"),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                  "parameters": {"binary_data_size": 12}}, *good]}).encode(),
         {}, "binary_data_size 12 is not 4 elements"),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, -4],
                                  "data": []}, *good]}).encode(), {}, "shape [1, -4]"),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                  "data": [1, 2, 3, 4]}, *good],
                     "outputs": [{"name": "nope"}]}).encode(), {}, "output 'nope'"),
    ]
    for body, headers, message in cases:
        r = httpx.post(url, content=body, headers=headers, timeout=30)
        assert r.status_code == 400, (message, r.text)
        assert message in r.json()["error"], (message, r.json())


def test_unknown_model_and_version_are_404(gw: GatewayProcess, client):  # noqa: ANN001
    x, n, words = sample()
    with pytest.raises(InferenceServerException) as raised:
        client.infer("no-such-model", inputs_of(x, n, words, True))
    assert raised.value.status() == "404" and "no-such-model" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("no-such-model")
    assert raised.value.status() == "404"
    r = httpx.post(gw.url + "/v2/models/tensors/versions/99/infer", json={}, timeout=30)
    assert r.status_code == 404 and "version '99'" in r.json()["error"]
    r = httpx.get(gw.url + "/v2/models/tensors/wrong", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(gw.url + "/v2/models/tensors/infer", timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_body_over_the_limit_is_a_413_with_the_v2_error(client):  # noqa: ANN001
    big = np.zeros((MAX_BODY // 16 + 1, 4), np.float32)
    tensor = httpclient.InferInput("x", list(big.shape), "FP32")
    tensor.set_data_from_numpy(big)
    _, n, words = sample()
    with pytest.raises(InferenceServerException) as raised:
        client.infer("tensors", [tensor, *inputs_of(big, n, words, True)[1:]])
    assert raised.value.status() == "413" and "limit" in raised.value.message()


def test_function_keys_guard_the_v2_routes(gw: GatewayProcess, tmp_path):  # noqa: ANN001
    deploy(gw, tmp_path, "keyed-tensors", TENSORS, auth="key", **DECLARED)
    created = gw.dcf("function", "keys", "keyed-tensors", "create", check=True).stdout.decode()
    key = next(line.split()[-1] for line in created.splitlines() if line.startswith("Key:"))
    x, n, words = sample()
    triton = httpclient.InferenceServerClient(gw.address)
    try:
        for call in (lambda h: triton.infer("keyed-tensors", inputs_of(x, n, words, True),
                                            headers=h),
                     lambda h: triton.get_model_metadata("keyed-tensors", headers=h)):
            with pytest.raises(InferenceServerException) as raised:
                call({})
            assert raised.value.status() == "401" and "needs a key" in raised.value.message()
            with pytest.raises(InferenceServerException):
                call({"X-DCF-Key": "dcf_wrong"})
            assert call({"X-DCF-Key": key}) is not None
            assert call({"Authorization": f"Bearer {key}"}) is not None
    finally:
        triton.close()
        gw.dcf("function", "delete", "keyed-tensors")


def test_batching_receives_v2_requests(gw: GatewayProcess, tmp_path):  # noqa: ANN001
    deploy(gw, tmp_path, "batched", BATCHED, concurrency=8,
           inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 3]}])
    rows = [np.full((i % 3 + 1, 3), i, np.float32) for i in range(16)]

    def call(x: np.ndarray):  # noqa: ANN202
        triton = httpclient.InferenceServerClient(gw.address)
        try:
            tensor = httpclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            return triton.infer("batched", [tensor])
        finally:
            triton.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, rows))
    for x, result in zip(rows, results, strict=True):
        np.testing.assert_array_equal(result.as_numpy("sum"), x.sum(axis=1, keepdims=True))
    assert max(int(r.as_numpy("batch")[0]) for r in results) > 1
    gw.dcf("function", "delete", "batched")


def test_ssd_through_tritonclient_gives_the_cli_boxes(gw: GatewayProcess, client):  # noqa: ANN001
    """The README's example: the SSD called by tritonclient returns the boxes, scores and
    classes that `dcf function call` prints, from an encoded image or from RGB pixels."""
    import base64
    import shutil

    import yaml

    from tests.ssd_example import EXAMPLE, SAMPLES

    cv2 = pytest.importorskip("cv2")
    pytest.importorskip("onnxruntime")
    if shutil.which("npm") is None:
        pytest.skip("npm is missing: ssd-test's build step cannot fetch the COCO SSD")
    gw.dcf("function", "create", "-f", "config.yaml", "ssd-test", cwd=EXAMPLE, check=True)
    gw.wait_status("ssd-test", "Ready", timeout=300)
    declared = yaml.safe_load((EXAMPLE / "config.yaml").read_text())["functions"]["ssd-test"]
    meta = client.get_model_metadata("ssd-test")
    assert meta["inputs"] == [{k: t[k] for k in ("name", "datatype", "shape")}
                              for t in declared["inputs"]]
    assert [o["name"] for o in meta["outputs"]] == ["boxes", "scores", "classes", "labels"]
    for photo in ("coffee.jpg", "grace_hopper.jpg"):
        data = (SAMPLES / photo).read_bytes()
        cli = json.loads(gw.dcf("function", "call", "ssd-test", input=base64.encodebytes(data),
                                check=True).stdout)
        assert cli, photo
        pixels = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                              cv2.COLOR_BGR2RGB)
        for name, array, datatype in (("image", np.array([data], dtype=object), "BYTES"),
                                      ("pixels", pixels, "UINT8")):
            tensor = httpclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            result = client.infer("ssd-test", [tensor])
            boxes = result.as_numpy("boxes")
            assert boxes.dtype == np.float32 and boxes.shape == (len(cli), 4)
            assert boxes.tolist() == [[d["xmin"], d["ymin"], d["xmax"], d["ymax"]] for d in cli]
            assert result.as_numpy("classes").tolist() == [d["class_id"] for d in cli]
            assert [w.decode() for w in result.as_numpy("labels")] == [d["class"] for d in cli]
            np.testing.assert_allclose(result.as_numpy("scores"),
                                       [d["confidence"] for d in cli], atol=1e-3)


def test_v2_on_the_ray_backend(cluster, tmp_path):  # noqa: ANN001
    """The same V2 calls to replicas that are Ray actors (they run the same runtime)."""
    pytest.importorskip("ray")
    gateway = GatewayProcess(
        tmp_path / "home", extra=["--backend", "ray", "--ray-address", cluster.address]
    ).start()
    try:
        deploy(gateway, tmp_path, "tensors", TENSORS, **DECLARED)
        x, n, words = sample()
        want = handler_compute()(x, n, words)
        triton = httpclient.InferenceServerClient(gateway.address, network_timeout=60)
        try:
            assert triton.is_model_ready("tensors")
            for binary in (False, True):
                outputs = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in want]
                result = triton.infer("tensors", inputs_of(x, n, words, binary), outputs=outputs)
                np.testing.assert_array_equal(result.as_numpy("doubled"), want["doubled"])
                np.testing.assert_array_equal(result.as_numpy("total"), want["total"])
            with pytest.raises(InferenceServerException) as raised:
                triton.infer("tensors", inputs_of(x.astype(np.float64), n, words, True))
            assert raised.value.status() == "400" and "input 'x'" in raised.value.message()
        finally:
            triton.close()
    finally:
        gateway.stop()


SLOW = """
import time


def Handler(req):
    time.sleep(float(req.tensors["seconds"][0]))
    return {"slept": req.tensors["seconds"]}
"""


def test_timeout_and_full_queue_answer_the_v2_error_body(gw: GatewayProcess, tmp_path):  # noqa: ANN001
    deploy(gw, tmp_path, "slow-tensors", SLOW, timeout="1s", concurrency=1, max_queue=0)
    url = gw.url + "/v2/models/slow-tensors/infer"

    def body(seconds: float) -> dict:
        return {"inputs": [{"name": "seconds", "datatype": "FP32", "shape": [1],
                            "data": [seconds]}]}

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, url, json=body(1.5), timeout=30)
        deadline = 50
        while gw.http().get("/system/function/slow-tensors").json()["inflight"] == 0:
            deadline -= 1
            assert deadline, "the slow call never started"
            time.sleep(0.02)
        full = httpx.post(url, json=body(0), timeout=30)
        late = slow.result()
    assert full.status_code == 429 and full.headers["retry-after"] == "1"
    assert list(full.json()) == ["error"] and "queue is full" in full.json()["error"]
    assert late.status_code == 504 and list(late.json()) == ["error"]
    assert "did not answer within 1s" in late.json()["error"]
    for _ in range(100):  # the slot is free once the timed-out call's handler returns
        ok = httpx.post(url, json=body(0.01), timeout=30)
        if ok.status_code != 429:
            break
        time.sleep(0.05)
    assert ok.status_code == 200, ok.text
    assert abs(ok.json()["outputs"][0]["data"][0] - 0.01) < 1e-6
    gw.dcf("function", "delete", "slow-tensors")
