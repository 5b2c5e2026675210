"""DCF: deploy deep-learning models as serverless functions.

What a function author imports: ``Request`` and ``Response`` to read calls and
shape answers, ``HTTPError`` to reject bad input with a status, and ``batch``
to receive calls in groups. They load on first use, so the ``dcf`` command,
which needs none of them, starts without asyncio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dcf.runtime.batching import batch
    from dcf.runtime.request import HTTPError, Request, Response

__version__ = "0.1.0"
__all__ = ["HTTPError", "Request", "Response", "batch", "__version__"]

_LAZY = {
    "batch": "dcf.runtime.batching",
    "HTTPError": "dcf.runtime.request",
    "Request": "dcf.runtime.request",
    "Response": "dcf.runtime.request",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dcf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
