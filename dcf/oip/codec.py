"""The replica's side of a V2 infer call: the request's tensors as numpy arrays, the
handler's answer encoded as the request asked (JSON, or the binary tensor data extension).

The gateway has checked the request's names, datatypes and shapes (check.py);
what is left here is the data itself: as many elements as the shape says, of
the datatype given. Binary tensors become arrays over the request's own bytes
(read-only, no copy).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

from dcf.oip import DATATYPES, HEADER_LENGTH, OIP_HEADER
from dcf.runtime.request import HTTPError, Request, Response

Result = tuple[int, list[tuple[str, str]], bytes]

NUMPY = {name: np.dtype(dtype) for name, (dtype, _) in DATATYPES.items()}
_FROM_NUMPY = {np.dtype(dtype).str: name for name, (dtype, _) in DATATYPES.items()}
_LENGTH = struct.Struct("<I")
_DECLARED: dict[str, dict[str, str]] = {}
"""The gateway's ``OIP_HEADER`` values, parsed once each (a replica sees one or two)."""


class V2Call:
    """One decoded infer request: what to answer (which outputs, JSON or binary) and for whom."""

    __slots__ = ("binary", "declared", "id", "info", "requested")

    def __init__(self, header: dict, declared: dict[str, str], info: dict[str, str]) -> None:
        self.id = header.get("id")
        self.info = info
        self.declared = declared
        parameters = header.get("parameters") or {}
        self.binary = parameters.get("binary_data_output") is True
        self.requested: list[tuple[str, bool]] | None = None
        if header.get("outputs") is not None:
            self.requested = [
                (o["name"], (o.get("parameters") or {}).get("binary_data", self.binary) is True)
                for o in header["outputs"]
            ]

    def encode(self, value: Any) -> Result:
        """The V2 inference response for what the handler returned."""
        status, extra = 200, None
        if isinstance(value, Response):
            status, extra, value = value.status, value.headers, value.body
        produced = self._outputs(value)
        if self.requested is None:
            wanted = [(name, self.binary) for name in produced]
        else:
            wanted = self.requested
        entries, raws = [], []
        for name, binary in wanted:
            if name not in produced:
                raise HTTPError(
                    400, f"output {name!r} was asked for, but the model gave {', '.join(produced)}"
                )
            datatype, array = produced[name]
            entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
            if binary:
                raw = _to_binary(array, datatype)
                entry["parameters"] = {"binary_data_size": len(raw)}
                raws.append(raw)
            else:
                entry["data"] = _to_json(name, array, datatype)
            entries.append(entry)
        response: dict[str, Any] = {
            "model_name": self.info.get("function", ""),
            "model_version": self.info.get("version", ""),
        }
        if self.id is not None:
            response["id"] = self.id
        response["outputs"] = entries
        head = json.dumps(response).encode()
        if raws:
            headers = [
                ("content-type", "application/octet-stream"),
                (HEADER_LENGTH, str(len(head))),
            ]
            body = b"".join([head, *raws])
        else:
            headers, body = [("content-type", "application/json")], head
        if extra:
            headers += [(str(k).lower(), str(v)) for k, v in extra.items()]
        return status, headers, body

    def _outputs(self, value: Any) -> dict[str, tuple[str, np.ndarray]]:
        """name → (datatype, array) of a dict of arrays or a list of V2 output dicts."""
        out: dict[str, tuple[str, np.ndarray]] = {}
        if isinstance(value, dict):
            for name, data in value.items():
                out[str(name)] = self._array(str(name), data, None, None)
        elif isinstance(value, list | tuple) and all(
            isinstance(o, dict) and "name" in o for o in value
        ):
            for output in value:
                name = str(output["name"])
                out[name] = self._array(
                    name, output.get("data"), output.get("datatype"), output.get("shape")
                )
        else:
            raise TypeError(
                "a V2 call's handler must return a dict of output name → array (or a list"
                f" of V2 output dicts), not {_describe(value)}"
            )
        return out

    def _array(
        self, name: str, data: Any, datatype: str | None, shape: list[int] | None
    ) -> tuple[str, np.ndarray]:
        datatype = datatype or self.declared.get(name)
        if datatype is None:
            array = data if isinstance(data, np.ndarray) else np.asarray(data)
            datatype = _datatype_of(name, array)
        elif datatype not in NUMPY:
            raise TypeError(f"output {name!r}: {datatype!r} is not a V2 datatype")
        if datatype == "BYTES":
            array = np.asarray(data, dtype=object)
        else:
            array = np.asarray(data, dtype=NUMPY[datatype])
        if shape is not None:
            array = array.reshape(shape)
        return datatype, array


def decode(request: Request) -> V2Call:
    """Set ``request.tensors`` from the infer request's body; HTTPError(400) if its data is bad."""
    value = request.headers.get(OIP_HEADER, "")
    declared = _DECLARED.get(value)
    if declared is None:
        declared = dict(pair.split("=", 1) for pair in value.split(",") if "=" in pair)
        if len(_DECLARED) < 64:
            _DECLARED[value] = declared
    body = request.input
    length = request.headers.get(HEADER_LENGTH)
    end = int(length) if length else len(body)
    try:
        header = json.loads(body if end == len(body) else body[:end])
        view = memoryview(body)
        offset = end
        tensors = {}
        for tensor in header["inputs"]:
            name, datatype, shape = tensor["name"], tensor["datatype"], tensor["shape"]
            size = (tensor.get("parameters") or {}).get("binary_data_size")
            if size is None:
                tensors[name] = _from_json(name, datatype, shape, tensor.get("data"))
            else:
                tensors[name] = _from_binary(name, datatype, shape, view[offset : offset + size])
                offset += size
        call = V2Call(header, declared, request.info)
    except HTTPError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError, AttributeError) as exc:
        raise HTTPError(400, f"bad inference request: {type(exc).__name__}: {exc}") from None
    request.tensors = tensors
    return call


def _from_json(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        items = []
        for item in _flat(data):
            if not isinstance(item, str):
                raise HTTPError(400, f"input {name!r}: BYTES data must be strings, not {item!r}")
            items.append(item.encode())
        array = np.empty(len(items), dtype=object)
        array[:] = items
    else:
        try:
            array = np.asarray(data, dtype=NUMPY[datatype])
        except (ValueError, TypeError, OverflowError) as exc:
            raise HTTPError(400, f"input {name!r}: data is not {datatype}: {exc}") from None
    if array.size != count:
        raise HTTPError(
            400, f"input {name!r}: data holds {array.size} elements; shape {shape} needs {count}"
        )
    return array.reshape(shape)


def _from_binary(name: str, datatype: str, shape: list[int], raw: memoryview) -> np.ndarray:
    count = math.prod(shape)
    if datatype != "BYTES":
        array = np.frombuffer(raw, dtype=NUMPY[datatype])
        if array.size != count:
            raise HTTPError(400, f"input {name!r}: {len(raw)} bytes do not make shape {shape}")
        return array.reshape(shape)
    items, at, end = [], 0, len(raw)
    while at < end:
        if at + 4 > end:
            raise HTTPError(400, f"input {name!r}: BYTES data ends inside an element's length")
        (size,) = _LENGTH.unpack_from(raw, at)
        at += 4
        if at + size > end:
            raise HTTPError(
                400, f"input {name!r}: BYTES element of {size} bytes runs past its data"
            )
        items.append(bytes(raw[at : at + size]))
        at += size
    if len(items) != count:
        raise HTTPError(
            400,
            f"input {name!r}: BYTES data holds {len(items)} elements; shape {shape} needs {count}",
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def _to_json(name: str, array: np.ndarray, datatype: str) -> list:
    if datatype != "BYTES":
        return array.ravel().tolist()
    out = []
    for item in array.ravel():
        if isinstance(item, bytes | bytearray):
            try:
                item = bytes(item).decode()
            except UnicodeDecodeError:
                raise HTTPError(
                    400,
                    f"output {name!r} holds bytes that are not UTF-8: ask for it as binary data",
                ) from None
        out.append(item if isinstance(item, str) else str(item))
    return out


def _to_binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype != "BYTES":
        return array.tobytes()
    parts = []
    for item in array.ravel():
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _datatype_of(name: str, array: np.ndarray) -> str:
    if array.dtype.kind in "OSU":
        return "BYTES"
    found = _FROM_NUMPY.get(array.dtype.newbyteorder("<").str) or _FROM_NUMPY.get(array.dtype.str)
    if found is None:
        raise TypeError(f"output {name!r}: numpy dtype {array.dtype} has no V2 datatype")
    return found


def _flat(data: Any) -> Iterator[Any]:
    if isinstance(data, list):
        for item in data:
            yield from _flat(item)
    else:
        yield data


def _describe(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"
