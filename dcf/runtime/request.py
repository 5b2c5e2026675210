"""The objects a handler sees and returns."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from dcf.telemetry import parse_traceparent


@dataclass(slots=True)
class Request:
    """One invocation: the body as bytes (``input``), as the seed's handlers expect."""

    input: bytes = b""
    method: str = "POST"
    path: str = "/"
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, Any] | None = None
    """A V2 (Open Inference Protocol) call's inputs: name → numpy array; None otherwise."""

    @property
    def body(self) -> bytes:
        return self.input

    @property
    def trace_id(self) -> str | None:
        """The trace this call belongs to (32 hex digits, from its W3C ``traceparent``
        header), or None. With tracing on, that header names the call's handler span."""
        parent = parse_traceparent(self.headers.get("traceparent"))
        return parent[0] if parent is not None else None

    def text(self) -> str:
        return self.input.decode("utf-8")

    def json(self) -> Any:
        """The body parsed as JSON; invalid JSON is the caller's error (400)."""
        try:
            return json.loads(self.input)
        except ValueError as exc:
            raise HTTPError(400, f"body is not valid JSON: {exc}") from None


@dataclass(slots=True)
class Response:
    """A handler's answer when it needs a status code or headers of its own."""

    body: bytes | str | dict | list | Iterator | AsyncIterator | None = b""
    """A generator (sync or async) streams; status and headers go before its first item."""
    status: int = 200
    headers: Mapping[str, str] | None = None


class HTTPError(Exception):
    """Raise to answer with ``status`` and a JSON error body naming what was wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
