"""A replica's spans: the handler's run of each traced call, and its wait for a batch.

On when the replica's environment says where to export (``OTEL_EXPORTER_OTLP_*``:
a backend sets it when the gateway traces, and anyone running ``python -m
dcf.runtime`` alone may). Then ``wrap`` puts a ``TracedInvoker`` in front of the
invoker; off, it returns the invoker itself and OpenTelemetry is never imported.

A call is traced when its ``traceparent`` is sampled (the gateway decided), or, with
no traceparent, when the sampler starts a trace (a replica started by the gateway never
does). Its ``handler`` span is the current span while the handler runs, and the
request's ``traceparent`` header names it, so the handler's own spans, and the calls
it makes with that header, nest under it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dcf import telemetry
from dcf.runtime.batching import Batcher

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from dcf.runtime.handler import Invoker, Result
    from dcf.runtime.request import Request


def wrap(invoker: Invoker, info: dict[str, str], env: Mapping[str, str] | None = None) -> Any:
    """``invoker`` with tracing when the environment turns it on, else ``invoker`` itself."""
    try:
        settings = telemetry.from_environment(os.environ if env is None else env)
    except telemetry.TracingError as exc:
        _say(f"tracing is off: {exc}")
        return invoker
    if settings is None:
        return invoker
    try:
        return TracedInvoker(invoker, settings, info)
    except ImportError as exc:
        _say(
            f"tracing is off: {exc.name} is not installed where this replica runs"
            " (pip install 'dcf[tracing]')"
        )
        return invoker


def _say(message: str) -> None:
    print(f"dcf: {message}", file=sys.stderr, flush=True)


class TracedInvoker:
    """The invoker's interface (``inline``, ``call_now``, ``serve``, call), with spans."""

    def __init__(
        self, inner: Invoker, settings: telemetry.TraceSettings, info: dict[str, str]
    ) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind, StatusCode

        resource = {
            "service.name": os.environ.get("OTEL_SERVICE_NAME") or info.get("function") or "dcf",
            "service.namespace": "dcf",
        }
        if info.get("version"):
            resource["service.version"] = info["version"]
        if info.get("replica"):
            resource["service.instance.id"] = info["replica"]
        self.provider = telemetry.start_provider(
            settings, resource, root_sampled=False, register=True
        )
        self.tracer = self.provider.get_tracer("dcf.runtime")
        self.settings = settings
        self.inline = inner.inline
        self.function = inner.function
        self._inner = inner
        self._attributes = {"dcf.function": info.get("function", "")}
        if info.get("version", "").isdigit():
            self._attributes["dcf.version"] = int(info["version"])
        self._context, self._in_span = context, trace.set_span_in_context
        self._server, self._error = SpanKind.SERVER, StatusCode.ERROR
        # With no parent, the sampler may only ever say no: skip asking it.
        root = settings.sampler.removeprefix("parentbased_")
        self._no_roots = root == "always_off"
        self._root = context.Context()  # a new trace: no parent, whatever is current
        self._waiting: dict[int, tuple[Span, Any]] = {}
        """Per traced call waiting for its batch (by id of its request): span, parent."""
        self._handling: dict[int, Span] = {}
        """Per traced call in a running batch: its handler span."""
        if inner.batcher is not None:
            # The batch's start ends each call's wait and starts its handler span.
            inner.batcher = Batcher(self._run_batch, inner.batch_options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    # which calls are traced --------------------------------------------------------------

    def _parent(self, request: Request) -> tuple[bool, Any]:
        """(traced?, the parent context) for a call: a header lookup when not traced."""
        value = request.headers.get("traceparent")
        if value is None and self._no_roots:
            return False, None
        parent = telemetry.parse_traceparent(value)
        if parent is None:
            return (not self._no_roots), self._root
        if self.settings.sampler.startswith("parentbased_"):
            return parent[2], telemetry.parent_context(parent)
        return True, telemetry.parent_context(parent)  # the sampler decides on the span

    def _span(self, request: Request, name: str, parent: Any) -> Span | None:
        span = self.tracer.start_span(
            name, context=parent, kind=self._server, attributes=self._attributes
        )
        if not span.is_recording():
            return None
        if name == "handler":
            span_context = span.get_span_context()
            request.headers["traceparent"] = telemetry.traceparent(
                span_context.trace_id, span_context.span_id
            )
        return span

    def _end(self, span: Span, status: int) -> None:
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(self._error)
        span.end()

    # the invoker's interface ---------------------------------------------------------------

    def call_now(self, request: Request) -> Result:
        traced, parent = self._parent(request)
        span = self._span(request, "handler", parent) if traced else None
        if span is None:
            return self._inner.call_now(request)
        token = self._context.attach(self._in_span(span))
        try:
            result = self._inner.call_now(request)
        finally:
            self._context.detach(token)
        self._end(span, result[0])
        return result

    async def __call__(self, request: Request) -> Result:
        return (await self.serve(request))[0]

    async def serve(self, request: Request) -> tuple[Result, int]:
        traced, parent = self._parent(request)
        if not traced:
            return await self._inner.serve(request)
        if self._inner.batcher is not None:
            return await self._serve_batched(request, parent)
        span = self._span(request, "handler", parent)
        if span is None:
            return await self._inner.serve(request)
        token = self._context.attach(self._in_span(span))
        try:
            answer = await self._inner.serve(request)
        finally:
            self._context.detach(token)
        self._end(span, answer[0][0])
        return answer

    # batches -------------------------------------------------------------------------------

    async def _serve_batched(self, request: Request, parent: Any) -> tuple[Result, int]:
        wait = self._span(request, "batch wait", parent)
        if wait is None:
            return await self._inner.serve(request)
        key = id(request)
        self._waiting[key] = (wait, parent)
        answer = None
        try:
            answer = await self._inner.serve(request)
            return answer
        finally:
            left = self._waiting.pop(key, None)
            if left is not None:  # never reached a batch (cancelled)
                left[0].end()
            handler = self._handling.pop(key, None)
            if handler is not None:
                self._end(handler, answer[0][0] if answer is not None else 0)

    async def _run_batch(self, items: list[Request]) -> Any:
        size = len(items)
        current = None
        for request in items:
            waiting = self._waiting.pop(id(request), None)
            if waiting is not None:
                wait, parent = waiting
                wait.set_attribute("dcf.batch.size", size)
                wait.end()
                handler = self._span(request, "handler", parent)
                if handler is not None:
                    handler.set_attribute("dcf.batch.size", size)
                    self._handling[id(request)] = handler
            if current is None:
                current = self._handling.get(id(request))
        if current is None:
            return await self._inner._run(items)
        # One run serves the whole batch: the handler's own spans go under the first
        # traced call's handler span.
        token = self._context.attach(self._in_span(current))
        try:
            return await self._inner._run(items)
        finally:
            self._context.detach(token)
