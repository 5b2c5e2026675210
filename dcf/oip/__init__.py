"""The Open Inference Protocol (V2, REST), shared by the gateway and the runtime.

``types`` (no numpy) holds the datatypes and the ``inputs``/``outputs``
declarations of config.yaml; ``check`` (no numpy) is what the gateway checks
of an infer request before any replica is called; ``codec`` (numpy) is the
replica's side: the request's tensors as arrays, the answer encoded as JSON or
with the binary tensor data extension, as the request asked.
"""

from __future__ import annotations

DATATYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "UINT8": ("uint8", 1),
    "UINT16": ("<u2", 2),
    "UINT32": ("<u4", 4),
    "UINT64": ("<u8", 8),
    "INT8": ("int8", 1),
    "INT16": ("<i2", 2),
    "INT32": ("<i4", 4),
    "INT64": ("<i8", 8),
    "FP16": ("<f2", 2),
    "FP32": ("<f4", 4),
    "FP64": ("<f8", 8),
    "BYTES": ("object", 0),
}
"""V2 datatype → (numpy dtype, bytes per element in the binary extension; 0: variable).
Binary tensor data is little-endian, so the dtypes say so."""

MAX_RANK = 16
MAX_TENSORS = 64
"""Inputs (or outputs) one function may declare, and one request may carry."""

OIP_HEADER = "dcf-oip"
"""Set by the gateway on a V2 infer call to a replica (its value: the declared outputs,
``name=DATATYPE,...``); stripped from what callers send, so only V2 calls have it."""
HEADER_LENGTH = "inference-header-content-length"
