"""A TensorFlow.js graph model (model.json + weight shards) as an ONNX model, without TensorFlow.

TF.js stores a frozen TensorFlow ``GraphDef`` as JSON and its constants as raw
little-endian shards. :func:`load_tfjs` reads both; :func:`convert` walks the part
of the graph between the given inputs and outputs and writes each TensorFlow op
as ONNX ops. It covers what convolutional detectors such as the TF Object
Detection API's SSDs use: ``Conv2D``, ``DepthwiseConv2dNative``, ``BiasAdd``,
``FusedBatchNorm``, ``Add``/``AddV2``/``AddN``/``Mul``/``Sub``, ``Relu``/``Relu6``,
``Sigmoid``, ``Reshape``, ``ConcatV2``, ``Identity`` and ``Const`` -- plus
``Shape``/``StridedSlice``/``Pack``, folded to constants where they only compute
a reshape's target shape. Anything else is refused with the node's name.

Layout: TensorFlow here is NHWC, ONNX convolutions are NCHW. A 4-D activation
is kept NCHW from its first convolution on (one ``Transpose`` in) and turned
back to NHWC only where the layout matters (``Reshape``, graph outputs);
constants that broadcast against it are transposed at conversion time, so
elementwise ops cost nothing extra.

:func:`add_ssd_decoding` appends the SSD box decoding (anchors and scale factors
taken from the TF graph) and the class sigmoid, so that the ONNX model answers
boxes and scores directly.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_, "float16": np.float16}
TF_DTYPES = {1: np.float32, 3: np.int32, 4: np.uint8, 9: np.int64, 10: np.bool_}
NHWC_TO_NCHW = (0, 3, 1, 2)
NCHW_TO_NHWC = (0, 2, 3, 1)


class ConversionError(ValueError):
    """The graph uses something this converter does not handle; the message names the node."""


# --- reading a TF.js graph model ---------------------------------------------------------


@dataclass
class TfjsGraph:
    """The nodes of a TF.js graph model and its constants, by name."""

    nodes: dict[str, dict[str, Any]]
    weights: dict[str, np.ndarray]


def _dequantize(raw: bytes, spec: Mapping[str, Any], count: int) -> np.ndarray:
    quant = spec["quantization"]
    qtype = quant["dtype"]
    if qtype == "float16":
        return np.frombuffer(raw, "<f2", count).astype(np.float32)
    if qtype in ("uint8", "uint16"):
        values = np.frombuffer(raw, "<u1" if qtype == "uint8" else "<u2", count)
        return (values * np.float32(quant["scale"]) + np.float32(quant["min"])).astype(np.float32)
    raise ConversionError(f"weight {spec['name']!r}: unsupported quantization {qtype!r}")


def read_weights(manifest: Sequence[Mapping[str, Any]], model_dir: Path) -> dict[str, np.ndarray]:
    """Every weight in a ``weightsManifest``: each group's shards, concatenated, sliced in order."""
    weights: dict[str, np.ndarray] = {}
    for group in manifest:
        data = b"".join((model_dir / name).read_bytes() for name in group["paths"])
        offset = 0
        for spec in group["weights"]:
            shape = [int(d) for d in spec["shape"]]
            count = math.prod(shape)
            if "quantization" in spec:
                qtype = spec["quantization"]["dtype"]
                size = count * {"uint8": 1, "uint16": 2, "float16": 2}.get(qtype, 0)
                value = _dequantize(data[offset : offset + size], spec, count)
            else:
                if spec["dtype"] not in DTYPES:
                    raise ConversionError(f"weight {spec['name']!r}: dtype {spec['dtype']!r}")
                dtype = np.dtype(DTYPES[spec["dtype"]]).newbyteorder("<")
                size = count * dtype.itemsize
                value = np.frombuffer(data, dtype, count, offset)
            if offset + size > len(data):
                raise ConversionError(f"weight {spec['name']!r} runs past the end of its shards")
            weights[spec["name"]] = value.reshape(shape).astype(value.dtype.newbyteorder("="))
            offset += size
    return weights


def load_tfjs(model_dir: str | Path) -> TfjsGraph:
    """Read ``model.json`` and its shards from a folder."""
    model_dir = Path(model_dir)
    doc = json.loads((model_dir / "model.json").read_text())
    topology = doc.get("modelTopology", {})
    if "node" not in topology:
        raise ConversionError(f"{model_dir / 'model.json'} is not a TF.js graph model (no nodes)")
    nodes = {node["name"]: node for node in topology["node"]}
    return TfjsGraph(nodes, read_weights(doc.get("weightsManifest", []), model_dir))


# --- node attributes -------------------------------------------------------------------


def _attr(node: Mapping[str, Any], name: str, default: Any = None) -> Any:
    value = node.get("attr", {}).get(name)
    if value is None:
        return default
    if "list" in value:
        return [int(i) for i in value["list"].get("i", [])]
    if "s" in value:  # protobuf JSON: bytes as base64 text, or TF.js' list of char codes
        raw = value["s"]
        return bytes(raw).decode() if isinstance(raw, list) else base64.b64decode(raw).decode()
    if "i" in value:
        return int(value["i"])
    if "f" in value:
        return float(value["f"])
    if "b" in value:
        return bool(value["b"])
    if "type" in value:
        return value["type"]
    return default


def _source(ref: str) -> tuple[str, int]:
    """``name:1`` → (``name``, 1); control inputs (``^name``) are not data."""
    name, _, index = ref.partition(":")
    return name, int(index or 0)


# --- the conversion ---------------------------------------------------------------------


@dataclass
class Value:
    """A TensorFlow tensor during conversion.

    ``shape`` is TensorFlow's (NHWC) shape, ``None`` for an unknown dimension.
    ``nchw`` says the ONNX tensor holds a 4-D NHWC tensor as NCHW. ``const`` is set
    for constants (kept as numpy until used) and ``folded`` for shape arithmetic
    that is evaluated here (a list that may contain ``None`` for the batch).
    """

    name: str | None = None
    shape: tuple[int | None, ...] | None = None
    nchw: bool = False
    const: np.ndarray | None = None
    folded: list[int | None] | int | None = None
    is_folded: bool = False


@dataclass
class Converter:
    graph: TfjsGraph
    inputs: Mapping[str, tuple[int | None, ...]]
    input_names: Mapping[str, str] = field(default_factory=dict)
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    values: dict[str, Value] = field(default_factory=dict)
    outputs: dict[str, Value] = field(default_factory=dict)
    _names: set[str] = field(default_factory=set)

    # -- bookkeeping --

    def reserve(self, name: str) -> None:
        """Claim an exact ONNX name (a graph output), so that ``fresh`` never hands it out."""
        self._names.add(name)

    def fresh(self, hint: str) -> str:
        name = hint
        counter = 1
        while name in self._names:
            counter += 1
            name = f"{hint}_{counter}"
        self._names.add(name)
        return name

    def emit(self, op: str, inputs: Sequence[str], hint: str, **attrs: Any) -> str:
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def constant(self, array: np.ndarray, hint: str) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    # -- layouts --

    def as_nchw(self, value: Value, hint: str) -> str:
        if value.nchw:
            return value.name
        if value.shape is None or len(value.shape) != 4:
            raise ConversionError(f"{hint}: expected a 4-D NHWC tensor, got shape {value.shape}")
        return self.emit("Transpose", [value.name], f"{hint}/to_nchw", perm=list(NHWC_TO_NCHW))

    def as_plain(self, value: Value, hint: str) -> str:
        if not value.nchw:
            return value.name
        return self.emit("Transpose", [value.name], f"{hint}/to_nhwc", perm=list(NCHW_TO_NHWC))

    def operand(self, value: Value, nchw: bool, hint: str) -> str:
        """``value`` as an ONNX tensor name in the layout asked for."""
        if value.const is not None:
            array = value.const
            if nchw and array.ndim > 0:
                array = array.reshape((1,) * (4 - array.ndim) + array.shape)
                array = array.transpose(NHWC_TO_NCHW)
            return self.constant(array, f"{hint}/const")
        return self.as_nchw(value, hint) if nchw else self.as_plain(value, hint)

    # -- walking the graph --

    def order(self, outputs: Iterable[str]) -> list[str]:
        """Nodes needed for ``outputs``, inputs first (iterative DFS, stops at graph inputs)."""
        seen: set[str] = set()
        ordered: list[str] = []
        stack: list[tuple[str, bool]] = [(_source(o)[0], False) for o in outputs]
        while stack:
            name, done = stack.pop()
            if done:
                ordered.append(name)
                continue
            if name in seen:
                continue
            seen.add(name)
            if name not in self.graph.nodes and name not in self.inputs:
                raise ConversionError(f"the graph has no node {name!r}")
            stack.append((name, True))
            if name in self.inputs:
                continue
            for ref in self.graph.nodes[name].get("input", []):
                if not ref.startswith("^"):
                    stack.append((_source(ref)[0], False))
        return ordered

    def run(self, outputs: Sequence[str]) -> None:
        for name in self.order(outputs):
            if name in self.inputs:
                onnx_name = self.fresh(self.input_names.get(name, name))
                self.values[name] = Value(name=onnx_name, shape=tuple(self.inputs[name]))
                continue
            node = self.graph.nodes[name]
            handler = getattr(self, f"op_{node['op']}", None)
            if handler is None:
                raise ConversionError(f"node {name!r}: op {node['op']} is not supported")
            self.values[name] = handler(node, [self.value(ref) for ref in self.data_inputs(node)])

    @staticmethod
    def data_inputs(node: Mapping[str, Any]) -> list[str]:
        return [ref for ref in node.get("input", []) if not ref.startswith("^")]

    def value(self, ref: str) -> Value:
        name, index = _source(ref)
        if index != 0:
            raise ConversionError(f"output {index} of {name!r} is not supported")
        return self.values[name]

    # -- ops --

    def op_Const(self, node: Mapping[str, Any], _: list[Value]) -> Value:
        name = node["name"]
        if name not in self.graph.weights:
            raise ConversionError(f"constant {name!r} has no value in the weights manifest")
        array = self.graph.weights[name]
        return Value(shape=array.shape, const=array)

    def op_Identity(self, node: Mapping[str, Any], args: list[Value]) -> Value:
        return args[0]

    def op_Placeholder(self, node: Mapping[str, Any], _: list[Value]) -> Value:
        raise ConversionError(f"placeholder {node['name']!r} is not among the inputs given")

    def _conv(self, node: Mapping[str, Any], x: Value, weight: np.ndarray, group: int) -> Value:
        name = node["name"]
        if _attr(node, "data_format", "NHWC") != "NHWC":
            raise ConversionError(f"{name}: only NHWC convolutions are supported")
        strides = _attr(node, "strides", [1, 1, 1, 1])
        dilations = _attr(node, "dilations", [1, 1, 1, 1])
        padding = _attr(node, "padding", "VALID")
        if strides[0] != 1 or strides[3] != 1 or dilations[0] != 1 or dilations[3] != 1:
            raise ConversionError(f"{name}: strides/dilations over batch or channels")
        if x.shape is None or len(x.shape) != 4 or None in x.shape[1:]:
            raise ConversionError(f"{name}: input needs a known NHWC shape, got {x.shape}")
        kh, kw = weight.shape[2:]
        pads_begin, pads_end, out = [], [], []
        for size, k, s, d in zip(x.shape[1:3], (kh, kw), strides[1:3], dilations[1:3], strict=True):
            span = (k - 1) * d + 1
            if padding == "SAME":
                n = -(-size // s)
                total = max((n - 1) * s + span - size, 0)
                pads_begin.append(total // 2)  # TensorFlow puts the odd pixel at the end
                pads_end.append(total - total // 2)
            elif padding == "VALID":
                n = -(-(size - span + 1) // s)
                pads_begin.append(0)
                pads_end.append(0)
            else:
                raise ConversionError(f"{name}: padding {padding!r} is not supported")
            out.append(n)
        y = self.emit(
            "Conv",
            [self.as_nchw(x, name), self.constant(weight.astype(np.float32), f"{name}/weights")],
            name,
            strides=list(strides[1:3]),
            dilations=list(dilations[1:3]),
            pads=pads_begin + pads_end,
            group=group,
            kernel_shape=[kh, kw],
        )
        return Value(name=y, shape=(x.shape[0], out[0], out[1], weight.shape[0]), nchw=True)

    def op_Conv2D(self, node: Mapping[str, Any], args: list[Value]) -> Value:
        x, w = args
        if w.const is None:
            raise ConversionError(f"{node['name']}: weights must be constant")
        # TensorFlow HWIO → ONNX OIHW
        return self._conv(node, x, w.const.transpose(3, 2, 0, 1), group=1)

    def op_DepthwiseConv2dNative(self, node: Mapping[str, Any], args: list[Value]) -> Value:
        x, w = args
        if w.const is None:
            raise ConversionError(f"{node['name']}: weights must be constant")
        kh, kw, channels, multiplier = w.const.shape
        # [kh, kw, C, M] → [C*M, 1, kh, kw]: output channel c*M + m reads input channel c
        weight = w.const.transpose(2, 3, 0, 1).reshape(channels * multiplier, 1, kh, kw)
        return self._conv(node, x, weight, group=channels)

    def _elementwise(self, node: Mapping[str, Any], op: str, args: list[Value]) -> Value:
        name = node["name"]
        if all(a.const is not None for a in args):
            folded = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op]
            array = args[0].const
            for other in args[1:]:
                array = folded(array, other.const)
            return Value(shape=array.shape, const=array)
        nchw = any(a.nchw for a in args)
        shape = _broadcast(name, [a.shape for a in args])
        names = [self.operand(a, nchw, name) for a in args]
        out = names[0]
        for index, other in enumerate(names[1:]):
            out = self.emit(op, [out, other], name if index == len(names) - 2 else f"{name}/part")
        return Value(name=out, shape=shape, nchw=nchw)

    def op_Add(self, node: Mapping[str, Any], args: list[Value]) -> Value:
        return self._elementwise(node, "Add", args)

    op_AddV2 = op_Add
    op_AddN = op_Add

    def op_Sub(self, node: Mapping[str, Any], args: list[Value]) -> Value:
        return self._elementwise(node, "Sub", args)

    def op_Mul(self, node: Mapping[str, Any], args: list[Value]) -> Value:
        return self._elementwise(node, "Mul", args)

    def op_BiasAdd(self, node: Mapping[str, Any], args: list[Value]) -> Value:
        if _attr(node, "data_format", "NHWC") != "NHWC":
            raise ConversionError(f"{node['name']}: only NHWC BiasAdd is supported")
        return self._elementwise(node, "Add", args)

    def op_FusedBatchNorm(self, node: Mapping[str, Any], args: list[Value]) -> Value:
        name = node["name"]
        x, *params = args
        if _attr(node, "is_training", False):
            raise ConversionError(f"{name}: a training-mode batch norm cannot be frozen")
        if _attr(node, "data_format", "NHWC") != "NHWC" or any(p.const is None for p in params):
            raise ConversionError(f"{name}: needs NHWC data and constant parameters")
        scale, offset, mean, variance = (p.const.astype(np.float32) for p in params[:4])
        names = [self.constant(a, f"{name}/{part}") for a, part in
                 zip((scale, offset, mean, variance), ("scale", "offset", "mean", "var"),
                     strict=True)]
        y = self.emit(
            "BatchNormalization",
            [self.as_nchw(x, name), *names],
            name,
            epsilon=float(_attr(node, "epsilon", 1e-3)),
        )
        return Value(name=y, shape=x.shape, nchw=True)

    op_FusedBatchNormV2 = op_FusedBatchNorm
    op_FusedBatchNormV3 = op_FusedBatchNorm

    def _unary(self, node: Mapping[str, Any], x: Value, op: str, *extra: str) -> Value:
        if x.const is not None:
            raise ConversionError(f"{node['name']}: {node['op']} of a constant is not supported")
        return Value(name=self.emit(op, [x.name, *extra], node["name"]), shape=x.shape,
                     nchw=x.nchw)

    def op_Relu6(self, node: Mapping[str, Any], args: list[Value]) -> Value:
        low = self.constant(np.array(0, np.float32), f"{node['name']}/min")
        high = self.constant(np.array(6, np.float32), f"{node['name']}/max")
        return self._unary(node, args[0], "Clip", low, high)

    def op_Relu(self, node: Mapping[str, Any], args: list[Value]) -> Value:
        return self._unary(node, args[0], "Relu")

    def op_Sigmoid(self, node: Mapping[str, Any], args: list[Value]) -> Value:
        return self._unary(node, args[0], "Sigmoid")

    def op_Reshape(self, node: Mapping[str, Any], args: list[Value]) -> Value:
        name = node["name"]
        x, target = args
        dims = _folded_list(target, name)
        if x.shape is None:
            raise ConversionError(f"{name}: the input's shape is unknown")
        onnx_dims = []
        for index, dim in enumerate(dims):
            if dim is None:  # the batch, which only a copy (0) can express
                if index != 0 or x.shape[0] is not None:
                    raise ConversionError(f"{name}: unknown dimension {index} in {dims}")
                onnx_dims.append(0)
            else:
                onnx_dims.append(dim)
        known = math.prod(d for d in x.shape if d is not None)
        rest = math.prod(d for d in dims if d is not None and d != -1)
        shape = tuple(known // rest if d == -1 else d for d in dims)
        shape_name = self.constant(np.array(onnx_dims, np.int64), f"{name}/shape")
        y = self.emit("Reshape", [self.as_plain(x, name), shape_name], name)
        return Value(name=y, shape=shape)

    def op_ConcatV2(self, node: Mapping[str, Any], args: list[Value]) -> Value:
        name = node["name"]
        *parts, axis_value = args
        if axis_value.const is None:
            raise ConversionError(f"{name}: the axis must be constant")
        rank = len(parts[0].shape)
        axis = int(axis_value.const) % rank
        nchw = all(p.nchw for p in parts)
        onnx_axis = NHWC_TO_NCHW.index(axis) if nchw else axis
        names = [self.operand(p, nchw, name) for p in parts]
        sizes = [p.shape[axis] for p in parts]
        shape = list(parts[0].shape)
        shape[axis] = None if None in sizes else sum(sizes)
        y = self.emit("Concat", names, name, axis=onnx_axis)
        return Value(name=y, shape=tuple(shape), nchw=nchw)

    # shape arithmetic, evaluated here

    def op_Shape(self, node: Mapping[str, Any], args: list[Value]) -> Value:
        if args[0].shape is None:
            raise ConversionError(f"{node['name']}: shape of a tensor of unknown rank")
        return Value(folded=list(args[0].shape), is_folded=True, shape=(len(args[0].shape),))

    def op_StridedSlice(self, node: Mapping[str, Any], args: list[Value]) -> Value:
        name = node["name"]
        data = _folded_list(args[0], name)
        begin, end, strides = (_folded_list(a, name) for a in args[1:])
        masks = {k: _attr(node, f"{k}_mask", 0) for k in ("begin", "end", "ellipsis",
                                                          "new_axis", "shrink_axis")}
        if len(begin) != 1 or masks["ellipsis"] or masks["new_axis"]:
            raise ConversionError(f"{name}: only 1-D strided slices of shapes are supported")
        start = None if masks["begin"] & 1 else begin[0]
        stop = None if masks["end"] & 1 else end[0]
        if masks["shrink_axis"] & 1:
            return Value(folded=data[start], is_folded=True, shape=())
        part = data[start:stop:strides[0]]
        return Value(folded=part, is_folded=True, shape=(len(part),))

    def op_Pack(self, node: Mapping[str, Any], args: list[Value]) -> Value:
        items = []
        for a in args:
            item = a.folded if a.is_folded else (a.const if a.const is not None else None)
            if item is None and not a.is_folded:
                raise ConversionError(f"{node['name']}: only packs of constants are supported")
            items.append(None if item is None else int(np.asarray(item)))
        if _attr(node, "axis", 0) != 0:
            raise ConversionError(f"{node['name']}: only axis 0 is supported")
        return Value(folded=items, is_folded=True, shape=(len(items),))


def _broadcast(where: str, shapes: Sequence[Sequence[int | None]]) -> tuple[int | None, ...]:
    """NumPy broadcasting of TF shapes in which ``None`` is an unknown dimension."""
    rank = max(len(s) for s in shapes)
    out: list[int | None] = []
    for axis in range(rank):
        dims = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0} - {1}
        known = dims - {None}
        if len(known) > 1:
            raise ConversionError(f"{where}: shapes {list(shapes)} do not broadcast")
        out.append(known.pop() if known else (None if None in dims else 1))
    return tuple(out)


def _folded_list(value: Value, where: str) -> list[int | None]:
    if value.is_folded:
        return value.folded if isinstance(value.folded, list) else [value.folded]
    if value.const is not None:
        return [int(v) for v in np.asarray(value.const).reshape(-1)]
    raise ConversionError(f"{where}: needs a shape known at conversion time")


def convert(
    graph: TfjsGraph,
    inputs: Mapping[str, Sequence[int | None]],
    outputs: Mapping[str, str],
    input_names: Mapping[str, str] | None = None,
    doc: str = "",
) -> tuple[onnx.ModelProto, Converter]:
    """The subgraph from ``inputs`` (node name → NHWC shape) to ``outputs`` (ONNX name → node).

    Graph inputs and outputs keep TensorFlow's layout (NHWC for images).
    """
    conv = Converter(graph, {k: tuple(v) for k, v in inputs.items()}, dict(input_names or {}))
    conv.run(list(outputs.values()))
    finish_outputs(conv, {k: conv.value(v) for k, v in outputs.items()})
    return build_model(conv, doc), conv


def finish_outputs(conv: Converter, outputs: Mapping[str, Value]) -> None:
    """Name the graph outputs, in NHWC where an output is a 4-D activation."""
    for name, value in outputs.items():
        if value.name is None:
            raise ConversionError(f"output {name!r} is a constant")
        conv.nodes.append(helper.make_node("Identity", [conv.as_plain(value, name)], [name],
                                           name=f"{name}/output"))
        conv.reserve(name)
        conv.outputs[name] = value


def build_model(conv: Converter, doc: str = "") -> onnx.ModelProto:
    def info(name: str, shape: Sequence[int | None]) -> onnx.ValueInfoProto:
        dims = ["batch" if d is None else d for d in shape]
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    graph_inputs = [info(conv.values[n].name, conv.inputs[n]) for n in conv.inputs]
    graph_outputs = [info(name, value.shape) for name, value in conv.outputs.items()]
    graph = helper.make_graph(conv.nodes, "tfjs", graph_inputs, graph_outputs,
                              initializer=conv.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="dcf tfjs_onnx", doc_string=doc)
    model.ir_version = 8  # readable by onnxruntime and OpenCV releases of the last years
    onnx.checker.check_model(model)
    return model


def add_ssd_decoding(
    conv: Converter,
    encodings: str,
    logits: str,
    anchors: np.ndarray,
    scale_yx: float,
    scale_hw: float,
) -> None:
    """Replace the outputs by decoded ``boxes`` and class ``scores``.

    ``encodings`` [N, A, 1, 4] or [N, A, 4] are (ty, tx, th, tw) per anchor,
    ``anchors`` [A, 4] (ymin, xmin, ymax, xmax) in 0..1. As the TF Object
    Detection API decodes them::

        cy = ty * scale_yx * ah + acy        h = exp(th * scale_hw) * ah
        cx = tx * scale_yx * aw + acx        w = exp(tw * scale_hw) * aw

    ``scale_yx``/``scale_hw`` are the graph's reciprocals (0.1 and 0.2 for scale
    factors 10 and 5). Outputs: ``boxes`` [N, A, 4] (ymin, xmin, ymax, xmax) in 0..1
    and ``scores`` [N, A, classes - 1] = sigmoid of the logits without the
    background column.
    """
    anchors = np.asarray(anchors, np.float32).reshape(-1, 4)
    size = anchors[:, 2:] - anchors[:, :2]  # (ah, aw)
    center = anchors[:, :2] + size * np.float32(0.5)  # (acy, acx), as TF computes it
    count = anchors.shape[0]
    enc_value, logit_value = conv.value(encodings), conv.value(logits)
    enc = conv.emit("Reshape", [conv.as_plain(enc_value, "decode"),
                                conv.constant(np.array([0, count, 4], np.int64), "decode/shape")],
                    "decode/encodings")

    def part(start: int, stop: int, hint: str) -> str:
        return conv.emit("Slice", [enc, conv.constant(np.array([start], np.int64), f"{hint}/b"),
                                   conv.constant(np.array([stop], np.int64), f"{hint}/e"),
                                   conv.constant(np.array([2], np.int64), f"{hint}/axis")], hint)

    offset = part(0, 2, "decode/tyx")
    log_size = part(2, 4, "decode/thw")
    centers = conv.emit("Add", [
        conv.emit("Mul", [offset, conv.constant(size * np.float32(scale_yx), "decode/ahw_s")],
                  "decode/dyx"),
        conv.constant(center, "decode/acyx")], "decode/cyx")
    half = conv.emit("Mul", [
        conv.emit("Exp", [conv.emit("Mul", [log_size, conv.constant(
            np.array(scale_hw, np.float32), "decode/s_hw")], "decode/thw_s")], "decode/exp"),
        conv.constant(size * np.float32(0.5), "decode/ahw_half")], "decode/half")
    conv.nodes.append(helper.make_node("Concat", [
        conv.emit("Sub", [centers, half], "decode/min"),
        conv.emit("Add", [centers, half], "decode/max")], ["boxes"], name="boxes", axis=2))
    classes = logit_value.shape[-1]
    foreground = conv.emit("Slice", [
        conv.as_plain(logit_value, "scores"),
        conv.constant(np.array([1], np.int64), "scores/b"),
        conv.constant(np.array([classes], np.int64), "scores/e"),
        conv.constant(np.array([2], np.int64), "scores/axis")], "scores/foreground")
    conv.nodes.append(helper.make_node("Sigmoid", [foreground], ["scores"], name="scores"))
    batch = enc_value.shape[0]
    conv.outputs = {
        "boxes": Value(name="boxes", shape=(batch, count, 4)),
        "scores": Value(name="scores", shape=(batch, count, classes - 1)),
    }
    for name in conv.outputs:
        conv.reserve(name)


def constant(graph: TfjsGraph, name: str) -> np.ndarray:
    """A constant of the TF graph by node name, or a :class:`ConversionError` naming it."""
    if name not in graph.weights:
        raise ConversionError(f"the graph has no constant {name!r}")
    return graph.weights[name]


@dataclass(frozen=True)
class SSDCut:
    """Where the TF Object Detection API's SSD graph is cut, and its decoding constants."""

    image: str = "Preprocessor/map/TensorArrayStack/TensorArrayGatherV3"
    encodings: str = "concat"
    logits: str = "concat_1"
    anchors: str = "Postprocessor/ExpandDims"
    scale_yx: str = "ConstantFolding/Postprocessor/Decode/div_recip"
    scale_hw: str = "ConstantFolding/Postprocessor/Decode/div_2_recip"
    size: tuple[int, int] = (300, 300)


def convert_ssd(graph: TfjsGraph, cut: SSDCut = SSDCut(), doc: str = "") -> onnx.ModelProto:
    """A TF OD API SSD as ONNX: ``image`` [N, H, W, 3] RGB 0..255 → ``boxes``, ``scores``.

    The graph's own preprocessing (resize in a while loop, then ``x * 2/255 - 1``)
    is cut after the resize, so the caller resizes and the scaling stays in the model.
    """
    height, width = cut.size
    conv = Converter(graph, {cut.image: (None, height, width, 3)}, {cut.image: "image"})
    conv.run([cut.encodings, cut.logits])
    add_ssd_decoding(
        conv,
        cut.encodings,
        cut.logits,
        constant(graph, cut.anchors),
        float(constant(graph, cut.scale_yx)),
        float(constant(graph, cut.scale_hw)),
    )
    return build_model(conv, doc)
