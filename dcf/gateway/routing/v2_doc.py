"""The OpenAPI description of the V2 routes (v2.py), which no FastAPI route serves."""

from __future__ import annotations

import copy
from typing import Any

from dcf.oip import DATATYPES, MAX_RANK, MAX_TENSORS

_ERROR = {"$ref": "#/components/schemas/Error"}
_WHY = {
    400: "A malformed request, or a tensor whose name, datatype or shape the model does not "
    "declare (the error names it); for /ready: the model is not ready",
    401: "The function needs a key (X-DCF-Key or Authorization: Bearer), or this is not one",
    404: "No such model (function), version or V2 route",
    405: "Method not allowed on this path (Allow lists the one it takes)",
    408: "The request body did not arrive within the gateway's body timeout",
    413: "Body over the gateway's limit",
    429: "The function's queue is full, or its key's rate limit is reached",
    502: "The replica died during the call",
    503: "No replica can serve",
    504: "The function did not answer within its timeout",
}
_RETRY = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}

_DIM = {"type": "integer", "minimum": 0}
TENSOR_METADATA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": list(DATATYPES)},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}},
    },
    "required": ["name", "datatype", "shape"],
}
REQUEST_INPUT = {
    "type": "object",
    "description": "One input: its data as JSON (flat or nested; BYTES as strings), or "
    "parameters.binary_data_size bytes of the binary data after the JSON header",
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": list(DATATYPES)},
        "shape": {"type": "array", "items": _DIM, "maxItems": MAX_RANK},
        "parameters": {
            "type": "object",
            "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
        },
        "data": {"type": "array"},
    },
    "required": ["name", "datatype", "shape"],
}
INFER_REQUEST = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "parameters": {
            "type": "object",
            "properties": {"binary_data_output": {"type": "boolean"}},
        },
        "inputs": {
            "type": "array",
            "items": REQUEST_INPUT,
            "minItems": 1,
            "maxItems": MAX_TENSORS,
        },
        "outputs": {
            "type": "array",
            "maxItems": MAX_TENSORS,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "parameters": {
                        "type": "object",
                        "properties": {"binary_data": {"type": "boolean"}},
                    },
                },
                "required": ["name"],
            },
        },
    },
    "required": ["inputs"],
}
INFER_RESPONSE = {
    "type": "object",
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "datatype": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "parameters": {"type": "object"},
                    "data": {"type": "array"},
                },
                "required": ["name", "datatype", "shape"],
            },
        },
    },
    "required": ["model_name", "outputs"],
}


def _error(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _WHY[status],
        "content": {"application/json": {"schema": _ERROR}},
    }
    if status == 429:
        response["headers"] = _RETRY
    return response


def _json(description: str, schema: dict) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _get(op: str, summary: str, ok: dict, *errors: int, params: list | None = None) -> dict:
    operation: dict[str, Any] = {
        "summary": summary,
        "operationId": op,
        "tags": ["Open Inference Protocol (V2)"],
        "responses": {"200": ok, **{str(s): _error(s) for s in (*errors, 405)}},
    }
    if params:
        operation["parameters"] = params
    return {"get": operation}


def paths() -> dict[str, Any]:
    """The V2 routes, in and out of ``/versions/{version}``."""
    name = {
        "name": "name",
        "in": "path",
        "required": True,
        "description": "The function (the V2 model)",
        "schema": {"type": "string"},
    }
    version = {
        "name": "version",
        "in": "path",
        "required": True,
        "description": "A DCF version number of the function: 404 unless it is the one serving",
        "schema": {"type": "string"},
    }
    server = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "version", "extensions"],
    }
    model = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": TENSOR_METADATA},
            "outputs": {"type": "array", "items": TENSOR_METADATA},
        },
        "required": ["name", "platform", "inputs", "outputs"],
    }
    ready = {"type": "object", "properties": {"name": {"type": "string"}, "ready": {}}}
    live = {"type": "object", "properties": {"live": {"type": "boolean"}}}
    up = {"type": "object", "properties": {"ready": {"type": "boolean"}}}
    infer = {
        "summary": "Run an inference (V2)",
        "description": "The inputs are checked against the function's declared inputs "
        "(config.yaml) before any replica is called. With the binary tensor data extension "
        "the body is the JSON header (Inference-Header-Content-Length bytes) and the "
        "tensors' bytes after it, and so is a 200 whose outputs asked for binary_data.",
        "operationId": "v2_infer",
        "tags": ["Open Inference Protocol (V2)"],
        "parameters": [
            name,
            {
                "name": "Inference-Header-Content-Length",
                "in": "header",
                "required": False,
                "description": "Bytes of the JSON header, when binary tensor data follows it",
                "schema": {"type": "integer", "minimum": 1},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": INFER_REQUEST},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "responses": {
            "200": {
                "description": "The outputs (JSON, or a JSON header and binary data)",
                "headers": {
                    "Inference-Header-Content-Length": {
                        "description": "Bytes of the JSON header (binary outputs only)",
                        "schema": {"type": "integer"},
                    }
                },
                "content": {
                    "application/json": {"schema": INFER_RESPONSE},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **{str(s): _error(s) for s in (400, 401, 404, 405, 408, 413, 429, 502, 503, 504)},
        },
    }
    at_version = copy.deepcopy(infer)
    at_version["operationId"] = "v2_infer_version"
    at_version["parameters"].insert(1, version)
    docs = {
        "/v2": _get("v2_server_metadata", "V2 server metadata", _json("The server", server)),
        "/v2/health/live": _get("v2_live", "V2 liveness", _json("Live", live)),
        "/v2/health/ready": _get("v2_ready", "V2 readiness", _json("Ready", up)),
        "/v2/models/{name}": _get(
            "v2_model_metadata",
            "V2 model metadata: the inputs and outputs config.yaml declares",
            _json("The model", model),
            400,
            401,
            404,
            params=[name],
        ),
        "/v2/models/{name}/ready": _get(
            "v2_model_ready",
            "V2 model readiness (200 while the function can serve)",
            _json("Ready", ready),
            400,
            401,
            404,
            params=[name],
        ),
        "/v2/models/{name}/infer": {"post": infer},
        "/v2/models/{name}/versions/{version}": _get(
            "v2_model_version_metadata",
            "V2 model metadata of one version",
            _json("The model", model),
            400,
            401,
            404,
            params=[name, version],
        ),
        "/v2/models/{name}/versions/{version}/ready": _get(
            "v2_model_version_ready",
            "V2 readiness of one version",
            _json("Ready", ready),
            400,
            401,
            404,
            params=[name, version],
        ),
        "/v2/models/{name}/versions/{version}/infer": {"post": at_version},
    }
    return docs
