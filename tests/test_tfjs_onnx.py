"""The TF.js → ONNX converter, op by op, against NumPy references of TensorFlow's ops.

Each test builds a small TF.js graph (nodes as model.json has them, random
weights), converts it, runs it with onnxruntime on random inputs, and compares
with the op computed here in NumPy the way TensorFlow defines it (NHWC, SAME
padding with the odd pixel at the end, ...). The references share no code
with the converter.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.ssd_example import example_module

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
tfjs_onnx = example_module("tfjs_onnx")

RNG = np.random.default_rng(20240610)


# --- NumPy references (NHWC, as TensorFlow computes) -------------------------------------


def same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int, int]:
    span = (kernel - 1) * dilation + 1
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + span - size, 0)
    return total // 2, total - total // 2, out


def ref_conv2d(x, w, strides=(1, 1), padding="SAME", dilations=(1, 1)):
    """x [N,H,W,C], w [kh,kw,C,O]: a sum of shifted slices times the kernel's taps."""
    kh, kw, _, out_ch = w.shape
    if padding == "SAME":
        top, bottom, oh = same_pads(x.shape[1], kh, strides[0], dilations[0])
        left, right, ow = same_pads(x.shape[2], kw, strides[1], dilations[1])
    else:
        top = bottom = left = right = 0
        oh = math.ceil((x.shape[1] - (kh - 1) * dilations[0]) / strides[0])
        ow = math.ceil((x.shape[2] - (kw - 1) * dilations[1]) / strides[1])
    xp = np.pad(x.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    y = np.zeros((x.shape[0], oh, ow, out_ch))
    for i in range(kh):
        for j in range(kw):
            r, c = i * dilations[0], j * dilations[1]
            patch = xp[:, r : r + strides[0] * oh : strides[0]]
            patch = patch[:, :, c : c + strides[1] * ow : strides[1]]
            y += patch[:, :oh, :ow] @ w[i, j].astype(np.float64)
    return y


def ref_depthwise(x, w, strides=(1, 1), padding="SAME"):
    """w [kh,kw,C,M]: output channel c*M+m = input channel c convolved with w[..., c, m]."""
    kh, kw, channels, mult = w.shape
    top, bottom, oh = same_pads(x.shape[1], kh, strides[0], 1)
    left, right, ow = same_pads(x.shape[2], kw, strides[1], 1)
    if padding == "VALID":
        top = bottom = left = right = 0
        oh = math.ceil((x.shape[1] - kh + 1) / strides[0])
        ow = math.ceil((x.shape[2] - kw + 1) / strides[1])
    xp = np.pad(x.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    y = np.zeros((x.shape[0], oh, ow, channels, mult))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i : i + strides[0] * oh : strides[0]]
            patch = patch[:, :, j : j + strides[1] * ow : strides[1]]
            y += patch[:, :oh, :ow, :, None] * w[i, j]
    return y.reshape(x.shape[0], oh, ow, channels * mult)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# --- building TF.js graphs ----------------------------------------------------------------


class Graph:
    """A TF.js graph under construction: nodes as in model.json, weights by name."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}
        self.weights: dict[str, np.ndarray] = {}

    def node(self, op: str, name: str, inputs=(), **attr) -> str:
        self.nodes[name] = {"name": name, "op": op, "input": list(inputs), "attr": attr}
        return name

    def const(self, name: str, value) -> str:
        self.weights[name] = np.asarray(value)
        return self.node("Const", name)

    def tfjs(self):
        return tfjs_onnx.TfjsGraph(self.nodes, self.weights)


def ints(*values: int) -> dict:
    return {"list": {"i": [str(v) for v in values]}}


def text(value: str) -> dict:
    return {"s": list(value.encode())}  # TF.js writes strings as lists of char codes


def conv_attrs(strides=(1, 1), padding="SAME", dilations=(1, 1)) -> dict:
    return {
        "strides": ints(1, *strides, 1),
        "dilations": ints(1, *dilations, 1),
        "padding": text(padding),
        "data_format": text("NHWC"),
    }


def run(graph: Graph, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    shapes = {name: (None, *x.shape[1:]) for name, x in inputs.items()}
    names = {f"out{i}": o for i, o in enumerate(outputs)}
    model, _ = tfjs_onnx.convert(graph.tfjs(), shapes, names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[name] for i, name in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feeds)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# --- ops ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "kernel", "strides", "padding", "dilations"),
    [
        ((9, 7), (3, 3), (2, 2), "SAME", (1, 1)),  # odd sizes, stride 2: TF pads more at the end
        ((8, 8), (3, 3), (2, 2), "SAME", (1, 1)),
        ((6, 10), (1, 1), (1, 1), "SAME", (1, 1)),
        ((7, 9), (3, 2), (1, 2), "VALID", (1, 1)),
        ((10, 11), (3, 3), (1, 1), "SAME", (2, 2)),
    ],
)
def test_conv2d(size, kernel, strides, padding, dilations):
    g = Graph()
    x = g.node("Placeholder", "x")
    w = rand(*kernel, 5, 6)
    y = g.node("Conv2D", "conv", [x, g.const("w", w)], **conv_attrs(strides, padding, dilations))
    data = rand(2, *size, 5)
    (got,) = run(g, {"x": data}, [y])
    np.testing.assert_allclose(got, ref_conv2d(data, w, strides, padding, dilations),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("strides", "mult", "padding"),
                         [((1, 1), 1, "SAME"), ((2, 2), 1, "SAME"), ((2, 1), 2, "VALID")])
def test_depthwise_conv2d(strides, mult, padding):
    g = Graph()
    x = g.node("Placeholder", "x")
    w = rand(3, 3, 4, mult)
    y = g.node("DepthwiseConv2dNative", "dw", [x, g.const("w", w)], **conv_attrs(strides, padding))
    data = rand(3, 9, 8, 4)
    (got,) = run(g, {"x": data}, [y])
    np.testing.assert_allclose(got, ref_depthwise(data, w, strides, padding), rtol=1e-4, atol=1e-4)


def test_bias_add_batch_norm_relu6_after_conv():
    g = Graph()
    x = g.node("Placeholder", "x")
    w = rand(1, 1, 3, 4)
    conv = g.node("Conv2D", "conv", [x, g.const("w", w)], **conv_attrs())
    bias, gamma, beta, mean = rand(4), rand(4), rand(4), rand(4)
    var = RNG.uniform(0.5, 2, 4).astype(np.float32)
    biased = g.node("BiasAdd", "bias", [conv, g.const("b", bias)], data_format=text("NHWC"))
    normed = g.node("FusedBatchNorm", "bn", [biased, g.const("gamma", gamma), g.const("beta", beta),
                                             g.const("mean", mean), g.const("var", var)],
                    epsilon={"f": 0.001}, is_training={"b": False}, data_format=text("NHWC"))
    y = g.node("Relu6", "relu6", [normed])
    data = rand(2, 5, 6, 3) * 4
    (got,) = run(g, {"x": data}, [y])
    z = ref_conv2d(data, w) + bias
    z = gamma * (z - mean) / np.sqrt(var + 0.001) + beta
    want = np.clip(z, 0, 6)
    assert 0 < (want == 6).mean() < 1 and 0 < (want == 0).mean() < 1  # both bounds exercised
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_elementwise_with_constants_and_activations():
    """Add/AddV2/AddN/Mul/Sub of activations and of broadcast constants, in both layouts."""
    g = Graph()
    x = g.node("Placeholder", "x")
    w = rand(1, 1, 3, 3)
    a = g.node("Conv2D", "a", [x, g.const("w", w)], **conv_attrs())  # NCHW inside ONNX
    per_channel, scalar, full = rand(3), np.float32(0.75), rand(1, 1, 4, 3)
    m = g.node("Mul", "m", [a, g.const("pc", per_channel)])
    s = g.node("Sub", "s", [g.const("k", scalar), m])  # constant first
    f = g.node("Add", "f", [s, g.const("full", full)])  # a 4-D NHWC constant
    v2 = g.node("AddV2", "v2", [f, x])  # an activation in the other layout
    n = g.node("AddN", "n", [v2, a, x], N={"i": "3"})
    plain = g.node("Mul", "plain", [x, g.const("k2", np.float32(2.0))])  # stays NHWC
    data = rand(2, 5, 4, 3)
    got_n, got_plain = run(g, {"x": data}, [n, plain])
    av = ref_conv2d(data, w)
    want = (scalar - av * per_channel) + full + data
    np.testing.assert_allclose(got_n, want + av + data, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_plain, data * 2, rtol=1e-6)


def test_reshape_from_folded_shape_and_concat():
    """An SSD head: conv → Reshape([batch, -1, 1, 4]) with the batch from Shape → ConcatV2."""
    g = Graph()
    x = g.node("Placeholder", "x")
    heads = []
    for k in range(2):  # two feature maps (6x6, 3x3), like BoxPredictor_0..5
        w = rand(1, 1, 2, 8)
        kernel = g.const(f"pw{k}", rand(3, 3, 2, 1))
        pooled = g.node("DepthwiseConv2dNative", f"pool{k}", [x, kernel],
                        **conv_attrs((2, 2) if k else (1, 1)))
        conv = g.node("Conv2D", f"head{k}", [pooled, g.const(f"hw{k}", w)], **conv_attrs())
        shape = g.node("Shape", f"shape{k}", [conv])
        batch = g.node("StridedSlice", f"batch{k}", [shape, g.const(f"b{k}", [0]),
                                                     g.const(f"e{k}", [1]), g.const(f"s{k}", [1])],
                       shrink_axis_mask={"i": "1"}, begin_mask={"i": "0"}, end_mask={"i": "0"},
                       ellipsis_mask={"i": "0"}, new_axis_mask={"i": "0"})
        dims = g.node("Pack", f"dims{k}", [batch, g.const(f"n{k}", -1), g.const(f"one{k}", 1),
                                           g.const(f"four{k}", 4)], axis={"i": "0"})
        heads.append(g.node("Reshape", f"reshape{k}", [conv, dims]))
    y = g.node("ConcatV2", "concat", [*heads, g.const("axis", 1)], N={"i": "2"})
    channels = g.node("ConcatV2", "channels", [x, x, g.const("axis_c", -1)], N={"i": "2"})
    data = rand(3, 6, 6, 2)
    got, got_channels = run(g, {"x": data}, [y, channels])
    want = []
    for k in range(2):
        pooled = ref_depthwise(data, g.weights[f"pw{k}"], (2, 2) if k else (1, 1))
        conv = ref_conv2d(pooled, g.weights[f"hw{k}"])
        want.append(conv.reshape(3, -1, 1, 4))  # NHWC order, as TF reshapes
    np.testing.assert_allclose(got, np.concatenate(want, 1), rtol=1e-4, atol=1e-4)
    assert got.shape == (3, 6 * 6 * 2 + 3 * 3 * 2, 1, 4)
    np.testing.assert_array_equal(got_channels, np.concatenate([data, data], -1))


def test_ssd_decoding_matches_the_formula():
    g = Graph()
    enc = g.node("Placeholder", "enc")
    logits = g.node("Placeholder", "logits")
    enc_id = g.node("Identity", "enc_id", [enc])
    log_id = g.node("Identity", "log_id", [logits])
    anchors = np.sort(RNG.uniform(0, 1, (7, 2, 2)), axis=1).transpose(0, 2, 1).reshape(7, 4)
    anchors = anchors[:, [0, 1, 2, 3]].astype(np.float32)  # ymin, xmin, ymax, xmax
    conv = tfjs_onnx.Converter(g.tfjs(), {enc: (None, 7, 1, 4), logits: (None, 7, 5)})
    conv.run([enc_id, log_id])
    tfjs_onnx.add_ssd_decoding(conv, enc_id, log_id, anchors, 0.1, 0.2)
    model = tfjs_onnx.build_model(conv)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    e, lg = rand(2, 7, 1, 4), rand(2, 7, 5)
    boxes, scores = session.run(["boxes", "scores"], {"enc": e, "logits": lg})
    ah, aw = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    acy, acx = anchors[:, 0] + ah / 2, anchors[:, 1] + aw / 2
    ty, tx, th, tw = np.moveaxis(e[:, :, 0, :], -1, 0)
    cy, cx = ty / 10 * ah + acy, tx / 10 * aw + acx
    h, w = np.exp(th / 5) * ah, np.exp(tw / 5) * aw
    want = np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], -1)
    np.testing.assert_allclose(boxes, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, sigmoid(lg[:, :, 1:]), rtol=1e-5, atol=1e-6)


# --- reading model.json and shards --------------------------------------------------------


def test_load_tfjs_reads_shards_and_quantized_weights(tmp_path):
    w = rand(2, 3)
    q = np.array([0, 128, 255], np.uint8)
    half = rand(4).astype(np.float16)
    idx = np.array([3, -1], np.int32)
    blob = w.tobytes() + q.tobytes() + half.tobytes() + idx.tobytes()
    (tmp_path / "s1").write_bytes(blob[:10])  # a weight split across two shards
    (tmp_path / "s2").write_bytes(blob[10:])
    manifest = [{
        "paths": ["s1", "s2"],
        "weights": [
            {"name": "w", "shape": [2, 3], "dtype": "float32"},
            {"name": "q", "shape": [3], "dtype": "float32",
             "quantization": {"dtype": "uint8", "scale": 0.5, "min": -1.0}},
            {"name": "half", "shape": [4], "dtype": "float32",
             "quantization": {"dtype": "float16"}},
            {"name": "idx", "shape": [2], "dtype": "int32"},
        ],
    }]
    nodes = [{"name": n, "op": "Const"} for n in ("w", "q", "half", "idx")]
    (tmp_path / "model.json").write_text(json.dumps(
        {"modelTopology": {"node": nodes}, "weightsManifest": manifest}))
    graph = tfjs_onnx.load_tfjs(tmp_path)
    np.testing.assert_array_equal(graph.weights["w"], w)
    np.testing.assert_array_equal(graph.weights["q"], [-1.0, 63.0, 126.5])
    np.testing.assert_array_equal(graph.weights["half"], half.astype(np.float32))
    np.testing.assert_array_equal(graph.weights["idx"], idx)
    assert set(graph.nodes) == {"w", "q", "half", "idx"}


def test_unsupported_op_is_refused_naming_the_node():
    g = Graph()
    x = g.node("Placeholder", "x")
    g.node("ResizeBilinear", "Preprocessor/resize", [x, g.const("size", [3, 3])])
    with pytest.raises(tfjs_onnx.ConversionError, match="Preprocessor/resize.*ResizeBilinear"):
        tfjs_onnx.convert(g.tfjs(), {"x": (None, 4, 4, 3)}, {"y": "Preprocessor/resize"})


def test_not_a_graph_model(tmp_path):
    (tmp_path / "model.json").write_text('{"modelTopology": {"class_name": "Sequential"}}')
    with pytest.raises(tfjs_onnx.ConversionError, match="not a TF.js graph model"):
        tfjs_onnx.load_tfjs(tmp_path)
