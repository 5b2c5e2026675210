"""What the gateway checks of a V2 infer request before any replica is called.

Only the request's JSON header is read: names, datatypes and shapes against
the function's declaration, and the sizes of binary tensors against the body.
Tensor data is left for the replica to decode (codec.py), which checks that
JSON data holds as many elements as its shape says.
"""

from __future__ import annotations

import json
import math
from typing import Any

from dcf.oip import DATATYPES, MAX_RANK, MAX_TENSORS


class BadRequest(Exception):
    """A 400: the message names the tensor or field that is wrong."""


class Declaration:
    """A function's declared ``inputs`` and ``outputs``, ready to check requests against.

    A function that declares no inputs takes any; one that declares no outputs may
    answer any (the handler decides).
    """

    def __init__(self, model: str, inputs: list[Any], outputs: list[Any]) -> None:
        self.model = model
        self.inputs = {t.name: t for t in inputs}
        self.outputs = {t.name: t for t in outputs}
        self.required = [t.name for t in inputs if not t.optional]
        self.wire_value = ",".join(f"{t.name}={t.datatype}" for t in outputs)
        """What the replica is told of the outputs (``OIP_HEADER``): the datatypes to cast to."""

    def metadata(self) -> tuple[list[dict], list[dict]]:
        return (
            [t.metadata() for t in self.inputs.values()],
            [t.metadata() for t in self.outputs.values()],
        )

    def check(self, body: bytes, header_length: str | None) -> None:
        """Raise BadRequest naming what is wrong with the infer request ``body``."""
        header, binary = split(body, header_length)
        if not isinstance(header, dict):
            raise BadRequest("the inference request must be a JSON object with 'inputs'")
        inputs = header.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise BadRequest("the inference request needs 'inputs': a list of tensors")
        if len(inputs) > MAX_TENSORS:
            raise BadRequest(f"the request has {len(inputs)} inputs; at most {MAX_TENSORS}")
        declared = self.inputs
        seen: set[str] = set()
        binary_total = 0
        for tensor in inputs:
            name, datatype, shape = _tensor(tensor, "input")
            if name in seen:
                raise BadRequest(f"input {name!r} is given twice")
            seen.add(name)
            spec = declared.get(name)
            if declared and spec is None:
                raise BadRequest(
                    f"input {name!r}: model {self.model!r} has no such input;"
                    f" its inputs: {', '.join(declared)}"
                )
            if spec is not None:
                _matches(name, "input", datatype, shape, spec)
            size = _binary_size(tensor, name, datatype, shape)
            if size is None:
                if "data" not in tensor:
                    raise BadRequest(f"input {name!r} has no 'data' (nor binary_data_size)")
            else:
                binary_total += size
        missing = [name for name in self.required if name not in seen]
        if missing:
            raise BadRequest(f"input {missing[0]!r} is missing: model {self.model!r} needs it")
        if binary_total != binary:
            raise BadRequest(
                f"the binary tensor data is {binary} bytes but the inputs' binary_data_size"
                f" add up to {binary_total}"
            )
        self._check_outputs(header.get("outputs"))
        parameters = header.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise BadRequest("'parameters' must be an object")
        if "id" in header and not isinstance(header["id"], str):
            raise BadRequest("'id' must be a string")

    def _check_outputs(self, outputs: Any) -> None:
        if outputs is None:
            return
        if not isinstance(outputs, list) or len(outputs) > MAX_TENSORS:
            raise BadRequest(f"'outputs' must be a list of at most {MAX_TENSORS} requested outputs")
        for output in outputs:
            if not isinstance(output, dict) or not isinstance(output.get("name"), str):
                raise BadRequest("each requested output must be an object with a 'name'")
            name = output["name"]
            if self.outputs and name not in self.outputs:
                raise BadRequest(
                    f"output {name!r}: model {self.model!r} has no such output;"
                    f" its outputs: {', '.join(self.outputs)}"
                )
            parameters = output.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise BadRequest(f"output {name!r}: 'parameters' must be an object")


def split(body: bytes, header_length: str | None) -> tuple[Any, int]:
    """The parsed JSON header and the length of the binary data after it."""
    if header_length is None:
        end = len(body)
    else:
        try:
            end = int(header_length)
        except ValueError:
            end = -1
        if not 0 < end <= len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length {header_length!r} must be a number of bytes"
                f" between 1 and the body's {len(body)}"
            )
    try:
        header = json.loads(body[:end] if end != len(body) else body)
    except ValueError as exc:  # UnicodeDecodeError included
        raise BadRequest(f"the inference request is not valid JSON: {exc}") from None
    return header, len(body) - end


def _tensor(tensor: Any, kind: str) -> tuple[str, str, list[int]]:
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise BadRequest(f"each {kind} must be an object with a 'name', 'datatype' and 'shape'")
    name = tensor["name"]
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise BadRequest(
            f"{kind} {name!r}: datatype {datatype!r} is not a V2 datatype ({', '.join(DATATYPES)})"
        )
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise BadRequest(
            f"{kind} {name!r}: shape {shape!r} must be a list of at most {MAX_RANK}"
            " sizes (integers, 0 or more)"
        )
    return name, datatype, shape


def _matches(name: str, kind: str, datatype: str, shape: list[int], spec: Any) -> None:
    if datatype != spec.datatype:
        raise BadRequest(
            f"{kind} {name!r}: datatype {datatype} is not the declared {spec.datatype}"
        )
    want = spec.shape
    if len(shape) != len(want) or any(w not in (-1, d) for d, w in zip(shape, want, strict=True)):
        raise BadRequest(f"{kind} {name!r}: shape {shape} does not match the declared {want}")


def _binary_size(tensor: dict, name: str, datatype: str, shape: list[int]) -> int | None:
    parameters = tensor.get("parameters")
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise BadRequest(f"input {name!r}: 'parameters' must be an object")
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if type(size) is not int or size < 0:
        raise BadRequest(f"input {name!r}: binary_data_size {size!r} must be a number of bytes")
    if "data" in tensor:
        raise BadRequest(f"input {name!r} has both 'data' and binary_data_size")
    itemsize = DATATYPES[datatype][1]
    if itemsize and size != math.prod(shape) * itemsize:
        raise BadRequest(
            f"input {name!r}: binary_data_size {size} is not {math.prod(shape)} elements of"
            f" {datatype} ({math.prod(shape) * itemsize} bytes) as its shape {shape} says"
        )
    return size
