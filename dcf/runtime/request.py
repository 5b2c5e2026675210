"""The objects a handler sees and returns."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Request:
    """One invocation: the body as bytes (``input``), as the seed's handlers expect."""

    input: bytes = b""
    method: str = "POST"
    path: str = "/"
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)

    @property
    def body(self) -> bytes:
        return self.input

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
