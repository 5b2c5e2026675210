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
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from dcf import telemetry
from dcf.runtime.batching import Batcher

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext

    from dcf.runtime.handler import Invoker, Result
    from dcf.runtime.request import Request
    from dcf.spans import RecordedSpan


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

        from dcf import spans

        # Who made the spans is said once per export, in the resource, not on each span
        # (each attribute of a span costs ~2 µs more to encode).
        resource = {
            "service.name": os.environ.get("OTEL_SERVICE_NAME") or info.get("function") or "dcf",
            "service.namespace": "dcf",
            "dcf.function": info.get("function", ""),
        }
        if info.get("version"):
            resource["service.version"] = info["version"]
        if info.get("replica"):
            resource["service.instance.id"] = info["replica"]
        processor = telemetry.span_processor(settings)
        # The SDK's provider, for the spans handler code starts itself (trace.get_tracer);
        # DCF's own go straight to the same processor (dcf/spans.py).
        self.provider = telemetry.start_provider(settings, resource, processor)
        self.recorder = spans.Recorder(processor, self.provider.resource, "dcf.runtime")
        self._remote = spans.remote
        self.settings = settings
        self.inline = inner.inline
        self.function = inner.function
        self._inner = inner
        self._context, self._in_span = context, trace.set_span_in_context
        self._server, self._error = SpanKind.SERVER, StatusCode.ERROR
        # With no parent, the sampler may only ever say no: skip asking it.
        self._no_roots = settings.root_ratio <= 0.0
        self._waiting: dict[int, tuple[RecordedSpan, SpanContext | None]] = {}
        """Per traced call waiting for its batch (by id of its request): span, parent."""
        self._handling: dict[int, RecordedSpan] = {}
        """Per traced call in a running batch: its handler span."""
        if inner.batcher is not None:
            # The batch's start ends each call's wait and starts its handler span.
            inner.batcher = Batcher(self._run_batch, inner.batch_options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    # which calls are traced --------------------------------------------------------------

    def _parent(self, request: Request) -> SpanContext | None | Literal[False]:
        """False when the call is not traced (a header lookup); else the caller's span it
        continues, or None for a new trace."""
        value = request.headers.get("traceparent")
        if value is None and self._no_roots:
            return False
        parent = telemetry.parse_traceparent(value)
        if not telemetry.should_sample(self.settings, parent):
            return False
        return None if parent is None else self._remote(parent)

    def _span(self, request: Request, name: str, parent: SpanContext | None) -> RecordedSpan:
        span = self.recorder.start(name, parent, self._server)
        if name == "handler":
            span_context = span.get_span_context()
            request.headers["traceparent"] = telemetry.traceparent(
                span_context.trace_id, span_context.span_id
            )
        return span

    def _end(self, span: RecordedSpan, status: int) -> None:
        span.put("http.response.status_code", status)
        if status >= 500:
            span.set_status(self._error)
        span.end()

    # the invoker's interface ---------------------------------------------------------------

    def call_now(self, request: Request) -> Result:
        parent = self._parent(request)
        if parent is False:
            return self._inner.call_now(request)
        span = self._span(request, "handler", parent)
        token = self._context.attach(self._in_span(span))
        try:
            result = self._inner.call_now(request)
        finally:
            self._context.detach(token)
        self._end(span, result[0])
        return result

    async def __call__(self, request: Request) -> Result:
        return (await self.serve(request))[0]

    def serve(self, request: Request) -> Awaitable[tuple[Result, int]]:
        # A plain function: a call not traced gets the invoker's own coroutine, with no
        # frame of ours for its awaits to pass through.
        parent = self._parent(request)
        if parent is False:
            return self._inner.serve(request)
        if self._inner.batcher is not None:
            return self._serve_batched(request, parent)
        return self._serve_traced(request, parent)

    async def _serve_traced(
        self, request: Request, parent: SpanContext | None
    ) -> tuple[Result, int]:
        span = self._span(request, "handler", parent)
        token = self._context.attach(self._in_span(span))
        try:
            answer = await self._inner.serve(request)
        finally:
            self._context.detach(token)
        self._end(span, answer[0][0])
        return answer

    # batches -------------------------------------------------------------------------------

    async def _serve_batched(
        self, request: Request, parent: SpanContext | None
    ) -> tuple[Result, int]:
        wait = self._span(request, "batch wait", parent)
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
                wait.put("dcf.batch.size", size)
                wait.end()
                handler = self._span(request, "handler", parent)
                handler.put("dcf.batch.size", size)
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
