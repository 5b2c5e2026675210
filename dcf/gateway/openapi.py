"""The OpenAPI document, made to match what the gateway really answers.

FastAPI documents a 422 for every route with parameters, while the gateway
answers 400 (app.py's handler); it cannot know the statuses a route raises
(404, 409, 413 …), nor the data plane's routes, which no FastAPI route serves
(``/function/{name}``, ``/async-function/…``: bare ASGI, invoke.py and jobs.py).
So the generated document is corrected here, in one place, and checked by
running schemathesis over it with every check (tests/test_openapi.py).

Also here: a 405 answer lists in ``Allow`` every method its path serves
(Starlette names only those of the first route that matched the path).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dcf.config import NAME
from dcf.gateway.routing.v2_doc import paths as v2_paths

ERROR = {
    "type": "object",
    "description": "What the gateway answers itself when it refuses or fails a request",
    "properties": {
        "error": {"type": "string", "description": "Why, in one line"},
        "function": {
            "anyOf": [{"type": "string"}, {"type": "null"}],
            "description": "The function the request named, if any",
        },
    },
    "required": ["error"],
}
_REF = {"$ref": "#/components/schemas/Error"}

WHY = {
    400: "Bad input: a malformed request, or one the gateway refuses (the error says why)",
    401: "Missing or wrong token (the admin token, or a function key)",
    404: "No such function (or job, or key)",
    405: "Method not allowed on this path",
    408: "The request body did not arrive within the gateway's body timeout",
    409: "Conflict: the name exists (use PUT), or a deploy or a rollout is in progress",
    410: "The job is gone: it expired or was lost",
    413: "Body (or upload) over the gateway's limit",
    500: "The gateway could not do it (the error says why)",
    429: "Queue or job store full; retry after Retry-After seconds",
    502: "The replica died during the call",
    503: "No replica can serve (the function failed to start)",
    504: "The function did not answer within its timeout",
    507: "The job or its answer could not be stored",
}
EXTRA = {
    ("/system/functions", "post"): (400, 409),
    ("/system/functions", "put"): (400, 409),
    ("/system/function/{name}/scale", "post"): (400,),
    ("/system/function/{name}/rollback", "post"): (409, 500),
    ("/system/function/{name}/rollout/promote", "post"): (409,),
    ("/system/function/{name}/rollout/abort", "post"): (409,),
}
"""Statuses routes raise (FunctionError) that FastAPI cannot see."""
TEXT = (("/metrics", "get"), ("/system/function/{name}/logs", "get"))
"""Routes that answer text/plain."""
_RETRY = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
_ANY = {"*/*": {"schema": {}}}


def error(status: int, why: str | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": why or WHY[status],
        "content": {"application/json": {"schema": _REF}},
    }
    if status == 429:
        response["headers"] = _RETRY
    return response


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): error(s) for s in statuses}


def _name_param(description: str) -> dict[str, Any]:
    return {
        "name": "name",
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


_STREAMED = {
    **_ANY,
    # A generator's items as they are made: dict/list items one JSON line each, or SSE.
    "application/x-ndjson": {"schema": {"type": "string"}},
    "text/event-stream": {"schema": {"type": "string"}},
}


def _data_plane() -> dict[str, Any]:
    """The routes served before FastAPI: sync invocation (invoke.py) and jobs (jobs.py)."""
    raw_body = {
        "required": False,
        "description": "Handed to the handler as is (req.input)",
        "content": {"*/*": {"schema": {}}},
    }
    invoke = {
        "summary": "Invoke a function",
        "description": "The body goes to the handler as bytes; its answer comes back as is, "
        "with the status and headers the handler gave (so any status may come back). "
        "A handler that yields (a generator) streams: each item leaves as it is made, in "
        "chunked transfer, or as Server-Sent Events (data: per item, event: error if it "
        "fails midway) for a caller that sends Accept: text/event-stream. "
        "Errors the gateway answers itself are JSON {error, function}.",
        "operationId": "invoke",
        "parameters": [
            _name_param("The function"),
            {
                "name": "X-DCF-Version",
                "in": "header",
                "required": False,
                "description": "Pin the call to this serving version (during a rollout, the"
                " stable or the canary one); 404 naming it if it does not serve",
                "schema": {"type": "string"},
            },
        ],
        "requestBody": raw_body,
        "responses": {
            "200": {"description": "The handler's answer", "content": _STREAMED},
            **_errors(400, 401, 404, 408, 413, 429, 502, 503, 504),
            "default": {
                "description": "The handler's answer, with its own status",
                "content": _ANY,
            },
        },
    }
    submit = {
        "summary": "Invoke a function as a durable job",
        "description": "The job is stored before the 202; it runs at least once, across "
        "gateway restarts. With X-Callback-Url the answer is POSTed there when done "
        "(only to hosts the gateway's --callback-allow permits).",
        "operationId": "submit_job",
        "parameters": [
            _name_param("The function"),
            {
                "name": "X-Callback-Url",
                "in": "header",
                "required": False,
                "description": "Where to POST the answer when the job is done",
                "schema": {"type": "string"},
            },
        ],
        "requestBody": raw_body,
        "responses": {
            "202": {
                "description": "Stored; poll Location for the answer",
                "headers": {
                    "Location": {"schema": {"type": "string"}},
                    "X-DCF-Job-Id": {"schema": {"type": "string"}},
                },
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "id": {"type": "string"},
                                "function": {"type": "string"},
                                "state": {"type": "string"},
                            },
                            "required": ["id"],
                        }
                    }
                },
            },
            **_errors(400, 401, 404, 408, 413, 429, 507),
        },
    }
    job = {
        "summary": "A job's state, or its answer",
        "description": "202 while queued or running; the handler's answer (its status, "
        "headers and body) once done; the error of a failed job with its status; 410 once "
        "its result expired or it was lost; 404 for an id this gateway never issued.",
        "operationId": "get_job",
        "parameters": [
            {
                "name": "id",
                "in": "path",
                "required": True,
                "description": "The job's id",
                "schema": {"type": "string"},
            }
        ],
        "responses": {
            "200": {"description": "The job's answer", "content": _ANY},
            "202": {
                "description": "Queued or running",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            **_errors(404, 410),
            "default": {
                "description": "The job's answer or failure, with its status",
                "content": _ANY,
            },
        },
    }
    # A handler sees the method (req.method), so every one it may be called with is listed.
    return {
        "/function/{name}": _each_method(invoke),
        "/async-function/{name}": _each_method(submit),
        "/async-function/jobs/{id}": {"get": job},
    }


def _each_method(operation: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for method in ("get", "post", "put", "patch", "delete"):
        copied = copy.deepcopy(operation)
        copied["operationId"] = f"{operation['operationId']}_{method}"
        if method in ("get", "delete"):
            copied.pop("requestBody", None)
        out[method] = copied
    return out


def document(api: FastAPI, protected: bool) -> dict[str, Any]:
    """FastAPI's OpenAPI document with the statuses, content types and routes it misses."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(
        title=api.title, version=api.version, description=api.description, routes=api.routes
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Error"] = ERROR
    paths = doc.setdefault("paths", {})
    paths.update(_data_plane())
    paths.update(v2_paths())  # the Open Inference Protocol (routing/v2.py)
    if protected:
        doc["components"]["securitySchemes"] = {
            "token": {"type": "http", "scheme": "bearer", "description": "The admin token"}
        }
    deploy = schemas.get("DeployRequest", {}).get("properties", {})
    if "function" in deploy:
        deploy["function"] = {
            "type": "object",
            "description": deploy["function"].get("description", ""),
            "properties": {"name": {"type": "string", "pattern": NAME.pattern}},
            "required": ["name"],
            "additionalProperties": True,
        }
    for (path, method), statuses in EXTRA.items():
        operation = paths.get(path, {}).get(method)
        if operation is not None:
            for status in statuses:
                operation["responses"].setdefault(str(status), error(status))
    for path, method in TEXT:
        operation = paths.get(path, {}).get(method)
        if operation is not None:
            operation["responses"]["200"]["content"] = {
                "text/plain": {"schema": {"type": "string"}}
            }
    for path, operations in paths.items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            takes_input = bool(operation.get("parameters") or operation.get("requestBody"))
            if takes_input and "400" not in responses and not path.startswith("/function/"):
                responses["400"] = error(400)
            if "{name}" in path and path.startswith("/system/"):
                responses.setdefault("404", error(404))
            if operation.get("requestBody") and path.startswith("/system/"):
                responses.setdefault("408", error(408))
                responses.setdefault("413", error(413))
            admin = path == "/metrics" or path.startswith("/system")
            if protected and admin:
                operation["security"] = [{"token": []}]
                responses.setdefault("401", error(401))
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400 and not response.get("content"):
                    response["content"] = {"application/json": {"schema": _REF}}
    return doc


def install(api: FastAPI, protected: bool) -> None:
    """Serve the corrected document, and complete ``Allow`` on 405 answers."""
    cached: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "doc" not in cached:
            cached["doc"] = document(api, protected)
            cached["allow"] = [
                (re.compile("^" + re.sub(r"\\{[^}/]+\\}", "[^/]+", re.escape(p)) + "$"), ops)
                for p, ops in cached["doc"]["paths"].items()
            ]
        return copy.deepcopy(cached["doc"])

    api.openapi = openapi  # type: ignore[method-assign]

    @api.exception_handler(405)
    async def not_allowed(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # The methods the document lists for this path: what a client was told it may use.
        openapi()
        path = request.url.path
        methods = sorted(
            m.upper() for regex, ops in cached["allow"] if regex.match(path) for m in ops
        )
        allow = ", ".join(methods) or "GET"
        return JSONResponse(
            {
                "error": f"method {request.method} is not allowed here; use {allow}",
                "function": request.path_params.get("name"),
            },
            status_code=405,
            headers={"Allow": allow},
        )
