"""The Open Inference Protocol (V2, REST) for every function, as a bare ASGI app.

    GET  /v2                                   server metadata
    GET  /v2/health/live, /v2/health/ready     the gateway's health
    GET  /v2/models/NAME[/versions/V]          model metadata (config.yaml's inputs/outputs)
    GET  /v2/models/NAME[/versions/V]/ready    200 while the function can serve
    POST /v2/models/NAME[/versions/V]/infer    an inference: to a replica, like /function/NAME

An infer request's JSON header is checked against the function's declaration
before any replica is called (dcf/oip/check.py); the body then goes to the
replica as it came, with ``OIP_HEADER`` set, and the replica decodes the
tensors and encodes the answer (dcf/oip/codec.py). Function keys apply as to
``/function/NAME``; errors are the protocol's ``{"error": "..."}``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from dcf import __version__
from dcf.config import FunctionSpec
from dcf.gateway.body_timeout import BodyClock, BodyTimeout, BodyTooLarge
from dcf.gateway.observe.metrics import Metrics
from dcf.gateway.routing.invoke import _DROP, read_body, response_headers, send_json
from dcf.gateway.routing.router import CallError
from dcf.oip import HEADER_LENGTH, OIP_HEADER
from dcf.oip.check import BadRequest, Declaration

if TYPE_CHECKING:
    from dcf.gateway.lifecycle.functions import FunctionManager, FunctionState
    from dcf.gateway.security.keys import Guard

PREFIX = "/v2"
SERVER = {"name": "dcf", "version": __version__, "extensions": ["binary_tensor_data"]}
_GET = [(b"allow", b"GET")]
_POST = [(b"allow", b"POST")]
_SERVING = ("Ready", "Scaled to zero")
"""Statuses in which a function takes calls (from zero, a call starts a replica)."""


def is_v2(path: str) -> bool:
    return path == PREFIX or path.startswith("/v2/")


class V2:
    """Serves the V2 routes from the function manager's table (what serves, and its spec)."""

    def __init__(
        self,
        manager: FunctionManager,
        metrics: Metrics,
        max_body: int,
        *,
        guard: Guard,
        body_clock: BodyClock | None = None,
    ) -> None:
        self.manager = manager
        self.routes = manager.routes
        self.metrics = metrics
        self.max_body = max_body
        self.guard = guard
        self.body_clock = body_clock
        self._declarations: dict[str, tuple[FunctionSpec, Declaration]] = {}

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        parts = scope["path"].split("/")[2:]  # "", "v2", ...
        method = scope["method"]
        if parts in ([], [""], ["health", "live"], ["health", "ready"]):
            if method != "GET":
                await _not_allowed(send, method, _GET)
                return
            key = parts[1] if len(parts) == 2 else ""
            await send_json(
                send,
                200,
                {"live": True} if key == "live" else {"ready": True} if key == "ready" else SERVER,
            )
            return
        if len(parts) < 2 or parts[0] != "models" or not parts[1]:
            await _error(send, 404, f"no V2 route {scope['path']!r}")
            return
        name, rest = parts[1], parts[2:]
        version = None
        if rest[:1] == ["versions"]:
            if len(rest) < 2 or not rest[1]:
                await _error(send, 404, f"no V2 route {scope['path']!r}: name a version")
                return
            version, rest = rest[1], rest[2:]
        action = rest[0] if len(rest) == 1 else "" if not rest else None
        if action not in ("", "ready", "infer"):
            await _error(send, 404, f"no V2 route {scope['path']!r}")
            return
        wanted = "POST" if action == "infer" else "GET"
        if method != wanted:
            await _not_allowed(send, method, _POST if action == "infer" else _GET)
            return
        # Function keys, exactly as on /function/NAME (security/keys.py).
        door = {"path": "/function/" + name, "headers": scope["headers"], "method": method}
        refused = self.guard.admit(door)
        scope["headers"] = door["headers"]
        if refused is not None:
            status, payload, extra = refused
            await send_json(send, status, {"error": payload["error"]}, extra)
            return
        state = self.manager.functions.get(name)
        if state is None:
            if action == "infer":
                self.metrics.unknown.inc()
            await _error(send, 404, f"no model named {name!r}")
            return
        deployment = state.live or state.starting
        serving = deployment.version if deployment is not None else state.record.version
        if version is not None and version != str(serving):
            await _error(
                send,
                404,
                f"model {name!r} has no version {version!r} serving (version {serving} serves)",
            )
            return
        if action == "":
            await send_json(send, 200, self._metadata(name, state, serving))
        elif action == "ready":
            status = state.status
            if status in _SERVING:
                await send_json(send, 200, {"name": name, "ready": True})
            else:
                await _error(send, 400, f"model {name!r} is not ready: {status}")
        else:
            await self._infer(name, state, scope, receive, send)

    def _declaration(self, name: str, state: FunctionState) -> Declaration:
        """The declaration of the version that serves, compiled once per version."""
        deployment = state.live or state.starting
        cached = self._declarations.get(name)
        if deployment is not None and cached is not None and cached[0] is deployment.spec:
            return cached[1]
        spec = deployment.spec if deployment is not None else None
        if spec is None:
            spec = FunctionSpec.model_validate(state.record.spec)
        declaration = Declaration(name, spec.inputs, spec.outputs)
        if deployment is not None:
            self._declarations[name] = (spec, declaration)
        return declaration

    def _metadata(self, name: str, state: FunctionState, version: int) -> dict:
        inputs, outputs = self._declaration(name, state).metadata()
        return {
            "name": name,
            "versions": [str(version)],
            "platform": "dcf",
            "inputs": inputs,
            "outputs": outputs,
        }

    async def _infer(self, name: str, state: FunctionState, scope, receive, send) -> None:  # noqa: ANN001
        start = time.perf_counter()
        try:
            status, headers, body = await self._call(name, state, scope, receive)
        except CallError as exc:
            self.metrics.observe(name, exc.status, time.perf_counter() - start)
            extra = [(b"retry-after", str(exc.retry_after).encode())] if exc.retry_after else None
            if exc.status == 408:  # the rest of the body is not read: the connection ends
                extra = [(b"connection", b"close")]
            await send_json(send, exc.status, {"error": exc.message}, extra)
            return
        self.metrics.observe(name, status, time.perf_counter() - start)
        raw = response_headers(headers, body)
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    async def _call(self, name: str, state: FunctionState, scope, receive):  # noqa: ANN001, ANN202
        headers = []
        header_length = None
        for key, value in scope["headers"]:
            if key == b"content-length" and int(value or 0) > self.max_body:
                raise CallError(413, self._too_large())
            k = key.decode("latin-1")
            if k not in _DROP:
                headers.append((k, value.decode("latin-1")))
                if k == HEADER_LENGTH:
                    header_length = headers[-1][1]
        try:
            body = await read_body(receive, self.max_body, self.body_clock)
        except BodyTooLarge:
            raise CallError(413, self._too_large()) from None
        except BodyTimeout:
            raise CallError(408, self.body_clock.message()) from None  # type: ignore[union-attr]
        declaration = self._declaration(name, state)
        try:
            declaration.check(body, header_length)
        except BadRequest as exc:
            raise CallError(400, str(exc)) from None
        headers.append((OIP_HEADER, declaration.wire_value))
        # Looked up now: an update may have switched the function's pool while the body came.
        pool = self.routes.get(name)
        if pool is None:
            raise CallError(404, f"no model named {name!r}")
        query = scope["query_string"].decode("latin-1")
        return await pool.call("POST", scope["path"], query, headers, body)

    def _too_large(self) -> str:
        return f"request body is larger than the gateway's limit of {self.max_body} bytes"


async def _error(send, status: int, message: str) -> None:  # noqa: ANN001
    await send_json(send, status, {"error": message})


async def _not_allowed(send, method: str, allow: list) -> None:  # noqa: ANN001
    allowed = allow[0][1].decode()
    await send_json(
        send, 405, {"error": f"method {method} is not allowed here; use {allowed}"}, allow
    )
