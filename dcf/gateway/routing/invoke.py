"""The data plane: ``POST /function/{name}[/path]`` as a bare ASGI app.

This is the hot path, so it skips the web framework: read the body (refusing
one over the limit before reading it), hand it to the function's pool, write
the answer. Everything the gateway answers itself is JSON naming the function.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from dcf.gateway.body_timeout import BodyClock, BodyTimeout, BodyTooLarge, read_all
from dcf.gateway.observe.metrics import Metrics
from dcf.gateway.routing.router import CallError, Pool, Result
from dcf.gateway.routing.split import VERSION_HEADER, Split, pinned
from dcf.gateway.routing.stream import relay

if TYPE_CHECKING:
    from dcf.gateway.security.keys import Guard

PREFIX = "/function/"
ASYNC_PREFIX = "/async-function/"
# Hop-by-hop headers (RFC 9110 §7.6.1) and ones the gateway sets itself.
_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "upgrade",
        "proxy-connection",
        "content-length",
        "host",
        "dcf-oip",  # dcf.oip.OIP_HEADER: only the V2 routes (v2.py) set it
    }
)
# Set by the gateway from the body it sends; a replica's own would be wrong or chunked.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
_JSON = [(b"content-type", b"application/json")]
# What a handler may be called with (req.method); TRACE, CONNECT and the rest get 405.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_ALLOW = [(b"allow", b"DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT")]


def response_headers(headers: list[tuple[str, str]], body: bytes) -> list[tuple[bytes, bytes]]:
    """ASGI headers with a content-length, so the server need not chunk (and copy) the body."""
    raw = [(b"content-length", str(len(body)).encode())]
    for key, value in headers:
        if key not in _FRAMING:
            raw.append((key.encode("latin-1"), value.encode("latin-1")))
    return raw


async def read_body(receive, limit: int, clock: BodyClock | None = None) -> bytes:  # noqa: ANN001
    """The whole body; BodyTooLarge past ``limit`` bytes, BodyTimeout past ``clock``'s
    deadline."""
    if clock is None:
        return await read_all(receive, limit)
    return await clock.read(receive, limit)


async def send_json(send, status: int, payload: dict, extra: list | None = None) -> None:  # noqa: ANN001
    body = json.dumps(payload).encode()
    headers = [*_JSON, (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


ASGIApp = Callable[..., Awaitable[None]]


class Invoke:
    """Calls a function synchronously; ``/async-function/`` goes to ``jobs`` (jobs.py)."""

    def __init__(
        self,
        routes: dict[str, Pool | Split],
        metrics: Metrics,
        max_body: int,
        jobs: ASGIApp,
        *,
        guard: Guard,
        body_clock: BodyClock | None = None,
    ) -> None:
        self.body_clock = body_clock
        self.routes = routes
        self.guard = guard
        self.metrics = metrics
        self.max_body = max_body
        self.jobs = jobs

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        # Function keys, and credentials out of the headers, for every path (security/keys.py).
        refused = self.guard.admit(scope)
        if refused is not None:
            await send_json(send, *refused)
            return
        path: str = scope["path"]
        if scope["method"] not in METHODS:
            error = f"method {scope['method']} is not served: functions take GET, POST, PUT, …"
            await send_json(send, 405, {"error": error, "function": None}, _ALLOW)
            return
        if path.startswith(ASYNC_PREFIX):
            await self.jobs(scope, receive, send)
            return
        name, _, rest = path[len(PREFIX) :].partition("/")
        start = time.perf_counter()
        try:
            status, headers, body = await self.call(name, "/" + rest, scope, receive)
        except CallError as exc:
            if exc.status != 404:
                self.metrics.observe(name, exc.status, time.perf_counter() - start)
            extra = [(b"retry-after", str(exc.retry_after).encode())] if exc.retry_after else None
            if exc.status == 408:  # the rest of the body is not read: the connection ends
                extra = [(b"connection", b"close")]
            await send_json(send, exc.status, {"error": exc.message, "function": name}, extra)
            return
        self.metrics.observe(name, status, time.perf_counter() - start)
        if type(body) is not bytes:  # a generator's items, as they come (stream.py)
            await relay(send, receive, scope, name, status, headers, body, self.metrics, start)
            return
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": response_headers(headers, body),
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def call(self, name: str, path: str, scope, receive) -> Result:  # noqa: ANN001
        pool = self.routes.get(name)
        if pool is None:
            self.metrics.unknown.inc()
            raise CallError(404, f"no function named {name!r}")
        headers = []
        pin = None
        for key, value in scope["headers"]:
            if key == b"content-length" and int(value or 0) > self.max_body:
                raise CallError(413, self._too_large())
            k = key.decode("latin-1")
            if k not in _DROP:
                headers.append((k, value.decode("latin-1")))
                if k == VERSION_HEADER:
                    pin = headers[-1][1]
        try:
            body = await read_body(receive, self.max_body, self.body_clock)
        except BodyTooLarge:
            raise CallError(413, self._too_large()) from None
        except BodyTimeout:
            raise CallError(408, self.body_clock.message()) from None  # type: ignore[union-attr]
        query = scope["query_string"].decode("latin-1")
        # Looked up again: an update may have switched the function's pool while the body
        # arrived, and the old one, drained, takes no more calls.
        pool = self.routes.get(name)
        if pool is None:
            raise CallError(404, f"no function named {name!r}")
        if pin is not None:
            pool = pinned(pool, pin, name)
        return await pool.call(scope["method"], path, query, headers, body)

    def _too_large(self) -> str:
        return f"request body is larger than the gateway's limit of {self.max_body} bytes"
