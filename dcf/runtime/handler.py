"""Load the user's handler once and turn each call into (status, headers, body)."""

from __future__ import annotations

import asyncio
import contextvars
import importlib.util
import inspect
import json
import os
import sys
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dcf.oip import OIP_HEADER
from dcf.runtime.batching import Batcher, batch_options, is_async
from dcf.runtime.request import HTTPError, Request, Response
from dcf.runtime.streaming import SOURCES, Stream, is_generator_function

Result = tuple[int, list[tuple[str, str]], bytes]
"""(status, headers, body); the body is a ``Stream`` when the handler streams (streaming.py)."""

JSON = "application/json"


def load_target(handler_dir: str, handler_file: str, handler_name: str) -> Callable[..., Any]:
    """Import the handler module and return the callable to serve.

    A class is instantiated here, once, so its ``__init__`` (the model load)
    runs before the replica reports ready.
    """
    directory = Path(handler_dir).resolve()
    path = Path(handler_file)
    if not path.is_absolute():
        path = directory / path
    if not path.is_file():
        raise FileNotFoundError(f"handler file {path} does not exist")
    # Handlers import their sibling modules and open files relative to their
    # directory, as they did inside the seed's container.
    sys.path.insert(0, str(directory))
    os.chdir(directory)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    try:
        target = getattr(module, handler_name)
    except AttributeError:
        raise AttributeError(f"{path.name} defines no {handler_name!r}") from None
    if inspect.isclass(target):
        target = target()
    if not callable(target):
        raise TypeError(f"{handler_name!r} in {path.name} is not callable")
    return target


class Invoker:
    """Runs calls against a loaded handler.

    A sync handler runs one call at a time on the replica's loop, as Ray Serve
    and Triton's Python backend do: a model's work rarely gains from Python
    threads, and a thread hop per call costs more than an echo. Parallelism
    comes from replicas and batching; ``threads`` > 0 opts into a thread pool
    for handlers that block on I/O. Async handlers run on the loop, and a
    batched handler runs its batches on one thread so calls keep arriving.
    """

    def __init__(self, target: Callable[..., Any], function: str, threads: int = 0) -> None:
        self.function = function
        self._target = target
        self._async = is_async(target)
        options = batch_options(target) or batch_options(type(target).__call__)
        if options and is_generator_function(target):
            raise TypeError(
                f"{function!r}: a @dcf.batch handler cannot stream (it is a generator);"
                " return a list of whole answers, or drop @dcf.batch to stream"
            )
        self.inline = not self._async and options is None and threads < 1
        workers = 1 if options else threads
        self._pool = None if self._async or self.inline else ThreadPoolExecutor(workers)
        self.batch_options = options
        self.threads = self._pool
        """Where a sync generator's steps run: None for the replica's loop (streaming.py)."""
        self.batcher = Batcher(self._run, options) if options else None

    async def _run(self, arg: Any) -> Any:
        if self._async:
            return await self._target(arg)
        if self.inline:
            return self._target(arg)
        # In the call's context, which holds its span when it is traced (runtime/tracing.py).
        run = contextvars.copy_context().run
        return await asyncio.get_running_loop().run_in_executor(self._pool, run, self._target, arg)

    def call_now(self, request: Request) -> Result:
        """A sync handler's call, run right here: the replica's fast path when it is inline."""
        try:
            if OIP_HEADER in request.headers:
                call = v2_call(request)
                return call.encode(self._target(request))
            return render(self._target(request))
        except HTTPError as exc:
            return self.error(exc.status, exc.message)
        except Exception as exc:  # noqa: BLE001 - a handler bug must not end the replica
            traceback.print_exc(file=sys.stderr)
            return self.error(500, f"{type(exc).__name__}: {exc}")

    async def __call__(self, request: Request) -> Result:
        return (await self.serve(request))[0]

    async def serve(self, request: Request) -> tuple[Result, int]:
        """The call's result and the size of the batch it closed (0 if none)."""
        try:
            call = v2_call(request) if OIP_HEADER in request.headers else None
            if self.batcher is not None:
                value, batch = await self.batcher.submit(request)
                result = render(value) if call is None else call.encode(value)
                if type(result[2]) is not bytes:
                    message = "a @dcf.batch handler cannot stream: return whole answers"
                    return self.error(500, message), batch
                return result, batch
            value = await self._run(request)
            return (render(value) if call is None else call.encode(value)), 0
        except HTTPError as exc:
            return self.error(exc.status, exc.message), 0
        except Exception as exc:  # noqa: BLE001 - a handler bug must not end the replica
            traceback.print_exc(file=sys.stderr)
            return self.error(500, f"{type(exc).__name__}: {exc}"), 0

    def error(self, status: int, message: str) -> Result:
        body = json.dumps({"error": message, "function": self.function}).encode()
        return status, [("content-type", JSON)], body


def render(value: Any) -> Result:
    """The wire form of whatever a handler returned."""
    if isinstance(value, Response):
        status, headers, body = render(value.body)
        if value.headers:
            # Newlines would split a header (and the wire framing): drop them.
            given = {
                _clean(k.lower()).replace(":", ""): _clean(str(v)) for k, v in value.headers.items()
            }
            headers = [(k, v) for k, v in headers if k not in given] + list(given.items())
        return value.status, headers, body
    if isinstance(value, bytes | bytearray | memoryview):
        return 200, [("content-type", "application/octet-stream")], bytes(value)
    if isinstance(value, str):
        return 200, [("content-type", "text/plain; charset=utf-8")], value.encode()
    if value is None:
        return 200, [], b""
    if isinstance(value, SOURCES):
        return 200, [], Stream(value)  # type: ignore[return-value]
    return 200, [("content-type", JSON)], json.dumps(value).encode()


def v2_call(request: Request) -> Any:
    """Decode a V2 infer call (``request.tensors``); its ``encode`` makes the answer."""
    try:
        from dcf.oip.codec import decode  # numpy: loaded on the first V2 call only
    except ImportError as exc:
        raise HTTPError(
            500, f"V2 calls need numpy in the function's environment (requirements.txt): {exc}"
        ) from None
    return decode(request)


def _clean(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


def handler_error(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
