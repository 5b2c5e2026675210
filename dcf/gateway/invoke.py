"""The data plane: ``POST /function/{name}[/path]`` as a bare ASGI app.

This is the hot path, so it skips the web framework: read the body (refusing
one over the limit before reading it), hand it to the function's pool, write
the answer. Everything the gateway answers itself is JSON naming the function.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import OrderedDict

from dcf.gateway.metrics import Metrics
from dcf.gateway.router import CallError, Pool, Result

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
    }
)
# Set by the gateway from the body it sends; a replica's own would be wrong or chunked.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
_JSON = [(b"content-type", b"application/json")]


def response_headers(headers: list[tuple[str, str]], body: bytes) -> list[tuple[bytes, bytes]]:
    """ASGI headers with a content-length, so the server need not chunk (and copy) the body."""
    raw = [(b"content-length", str(len(body)).encode())]
    for key, value in headers:
        if key not in _FRAMING:
            raw.append((key.encode("latin-1"), value.encode("latin-1")))
    return raw


class BodyTooLarge(Exception):
    pass


async def read_body(receive, limit: int) -> bytes:  # noqa: ANN001 - ASGI callable
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise BodyTooLarge
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def send_json(send, status: int, payload: dict, extra: list | None = None) -> None:  # noqa: ANN001
    body = json.dumps(payload).encode()
    headers = [*_JSON, (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Invoke:
    """Calls a function synchronously, or as a job (``/async-function/``)."""

    def __init__(
        self, routes: dict[str, Pool], metrics: Metrics, max_body: int, max_jobs: int = 1000
    ) -> None:
        self.routes = routes
        self.metrics = metrics
        self.max_body = max_body
        self.jobs: OrderedDict[str, dict] = OrderedDict()
        self.max_jobs = max_jobs

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        path: str = scope["path"]
        if path.startswith(ASYNC_PREFIX):
            await self._async(scope, receive, send, path[len(ASYNC_PREFIX) :])
            return
        name, _, rest = path[len(PREFIX) :].partition("/")
        start = time.perf_counter()
        try:
            status, headers, body = await self.call(name, "/" + rest, scope, receive)
        except CallError as exc:
            if exc.status != 404:
                self.metrics.observe(name, exc.status, time.perf_counter() - start)
            extra = [(b"retry-after", str(exc.retry_after).encode())] if exc.retry_after else None
            await send_json(send, exc.status, {"error": exc.message, "function": name}, extra)
            return
        self.metrics.observe(name, status, time.perf_counter() - start)
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
        for key, value in scope["headers"]:
            if key == b"content-length" and int(value or 0) > self.max_body:
                raise CallError(413, self._too_large())
            k = key.decode("latin-1")
            if k not in _DROP:
                headers.append((k, value.decode("latin-1")))
        try:
            body = await read_body(receive, self.max_body)
        except BodyTooLarge:
            raise CallError(413, self._too_large()) from None
        query = scope["query_string"].decode("latin-1")
        return await pool.call(scope["method"], path, query, headers, body)

    def _too_large(self) -> str:
        return f"request body is larger than the gateway's limit of {self.max_body} bytes"

    # jobs ---------------------------------------------------------------------

    async def _async(self, scope, receive, send, rest: str) -> None:  # noqa: ANN001
        if rest.startswith("jobs/") and scope["method"] == "GET":
            job = self.jobs.get(rest[len("jobs/") :])
            if job is None:
                await send_json(send, 404, {"error": f"no job {rest[5:]!r}", "function": None})
            elif job["status"] != "done":
                await send_json(send, 202, {k: job[k] for k in ("id", "function", "status")})
            else:
                status, headers, body = job["result"]
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [
                            *response_headers(headers, body),
                            (b"x-dcf-job-status", b"done"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
            return
        name, _, sub = rest.partition("/")
        job_id = uuid.uuid4().hex
        job = {"id": job_id, "function": name, "status": "running"}
        try:
            if name not in self.routes:
                self.metrics.unknown.inc()
                raise CallError(404, f"no function named {name!r}")
            # Read the body now: the request ends when the 202 is sent.
            body = await read_body(receive, self.max_body)
        except BodyTooLarge:
            await send_json(send, 413, {"error": self._too_large(), "function": name})
            return
        except CallError as exc:
            await send_json(send, exc.status, {"error": exc.message, "function": name})
            return
        replay = _replay(body)
        self.jobs[job_id] = job
        while len(self.jobs) > self.max_jobs:
            self.jobs.popitem(last=False)
        asyncio.get_running_loop().create_task(self._run_job(job, name, "/" + sub, scope, replay))
        await send_json(send, 202, {"id": job_id, "function": name, "status": "running"})

    async def _run_job(self, job: dict, name: str, path: str, scope, receive) -> None:  # noqa: ANN001
        start = time.perf_counter()
        try:
            result = await self.call(name, path, scope, receive)
        except CallError as exc:
            payload = json.dumps({"error": exc.message, "function": name}).encode()
            result = (exc.status, [("content-type", "application/json")], payload)
        self.metrics.observe(name, result[0], time.perf_counter() - start)
        job["result"] = result
        job["status"] = "done"


def _replay(body: bytes):  # noqa: ANN202
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
