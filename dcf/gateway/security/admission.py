"""What reaches the management API: the token first, then a bounded body.

FastAPI reads a request's whole body before it runs any dependency, so a
token check written as a dependency comes too late: an unauthenticated
caller could make the gateway hold a body of any size before its 401. This
ASGI layer sits in front of the FastAPI app and decides from the headers
alone: no token, 401; a Content-Length over the limit, 413; then, while the
app reads, the body is counted and cut off with a 413 at the first byte over
the limit. A refused request with a body closes its connection, so nothing
more of it is read.

Two limits: a deploy (``/system/functions``) carries a code archive in base64,
so it may be as large as the largest upload allows; every other request here
is a small JSON document, or nothing, and gets ``CONTROL_BODY``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

ASGIApp = Callable[[dict, Any, Any], Awaitable[None]]
TOKEN_HELP = "this gateway needs a token: pass --token or set DCF_TOKEN"
CONTROL_BODY = 1 << 20
DEPLOY_PATH = "/system/functions"


def deploy_body_limit(max_upload: int, max_body: int) -> int:
    """A deploy's JSON: the archive in base64 (4 bytes per 3), the config, some slack."""
    return max(max_body, 4 * -(-max_upload // 3) + CONTROL_BODY)


def protected(path: str) -> bool:
    """Paths that need the admin token: the management API and the metrics."""
    return path == "/metrics" or path == "/system" or path.startswith("/system/")


class Admission:
    """An ASGI middleware: the admin token and the body limit, checked before the body is read."""

    def __init__(self, app: ASGIApp, token: str | None, deploy_body: int) -> None:
        self.app = app
        self.token = token.encode() if token is not None else None
        self.deploy_body = deploy_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length: int | None = None
        has_body = False
        authorization = b""
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
                has_body = has_body or length != 0
            elif name == b"transfer-encoding":
                has_body = True
            elif name == b"authorization":
                authorization = value
        if self.token is not None and protected(scope["path"]) and not self._valid(authorization):
            headers = [(b"www-authenticate", b"Bearer")]
            await _refuse(scope, send, 401, TOKEN_HELP, headers, close=has_body)
            return
        limit = self.deploy_body if scope["path"] == DEPLOY_PATH else CONTROL_BODY
        if length is not None and length > limit:
            await _refuse(scope, send, 413, _too_large(limit), [], close=True)
            return
        await self._bounded(scope, receive, send, limit)

    def _valid(self, authorization: bytes) -> bool:
        scheme, _, value = authorization.strip().partition(b" ")
        assert self.token is not None
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token)

    async def _bounded(self, scope: dict, receive: Any, send: Any, limit: int) -> None:
        """Run the app with its body counted as it is read, and cut off past the limit."""
        seen = 0
        started = refused = False

        async def counted() -> dict:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit and not started:
                    refused = True
                    await _refuse(scope, send, 413, _too_large(limit), [], close=True)
                    return {"type": "http.disconnect"}
            return message

        async def tracked(message: dict) -> None:
            nonlocal started
            if refused:  # the 413 is the answer; whatever the app says after it is dropped
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except Exception:
            if not refused:
                raise


def _too_large(limit: int) -> str:
    return f"request body is larger than the gateway's limit of {limit} bytes for this route"


async def _refuse(
    scope: dict,
    send: Any,
    status: int,
    message: str,
    headers: list[tuple[bytes, bytes]],
    close: bool,
) -> None:
    parts = scope["path"].split("/")  # /system/function/NAME/...: name the function
    function = parts[3] if len(parts) > 3 and parts[1:3] == ["system", "function"] else None
    body = json.dumps({"error": message, "function": function or None}).encode()
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    if close:  # the body was not read and will not be: end the connection with the answer
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
