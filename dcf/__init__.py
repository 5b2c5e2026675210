"""DCF: deploy deep-learning models as serverless functions.

What a function author imports: ``Request`` and ``Response`` to read calls and
shape answers, ``HTTPError`` to reject bad input with a status, and ``batch``
to receive calls in groups.
"""

from dcf.runtime.batching import batch
from dcf.runtime.request import HTTPError, Request, Response

__version__ = "0.1.0"
__all__ = ["HTTPError", "Request", "Response", "batch", "__version__"]
