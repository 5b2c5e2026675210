"""The gateway's spans: one per call, its queue wait, and an async job's run and callback.

Loaded only when tracing is on (``dcf gateway start --otlp-endpoint``, or the
standard ``OTEL_*`` variables): then ``active`` is set, and the router and the job
runner, which check it, call in here. With tracing off nothing here runs and
OpenTelemetry is never imported.

A call's span is started before the data plane sees the call, from the caller's
``traceparent`` (continued) or as a new trace; the call then goes on with the span's
own ``traceparent`` in place of the caller's, so the replica's spans (and a job, which
stores the call's headers) become its children. A call the sampler leaves out goes on
untouched, with no span at all: it costs a header lookup and, at a sampling ratio, a
random number.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from random import random
from typing import TYPE_CHECKING, Any, Literal

from dcf import __version__, telemetry

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext

    from dcf.gateway.jobs.store import Job
    from dcf.gateway.routing.router import ReplicaLink, Result
    from dcf.spans import RecordedSpan

active: GatewayTracing | None = None
"""Set once at start when tracing is on; None (the check on the hot path) when off."""

_call: ContextVar[RecordedSpan | None] = ContextVar("dcf_call_span", default=None)
"""The span of the call (or job run) this task serves, when it is traced."""

# As in routing/invoke.py, which imports the router, which imports this module.
PREFIX = "/function/"
ASYNC_PREFIX = "/async-function/"
V2_MODELS = "/v2/models/"
"""Open Inference Protocol calls, when the gateway's V2 door is wrapped too."""
_REPLICA_VERSION = re.compile(r".*-v(\d+)-\d+")
_JOBS = ASYNC_PREFIX + "jobs/"

ASGIApp = Callable[..., Awaitable[None]]


def start(settings: telemetry.TraceSettings) -> GatewayTracing:
    """Tracing on for this process; ValueError with one line if the SDK is missing."""
    global active
    active = GatewayTracing(settings)
    return active


class GatewayTracing:
    """The gateway's spans, as ``dcf.spans.RecordedSpan`` (not the SDK tracer's: each is
    started only once ``sampled`` said yes), exported by OpenTelemetry's processor."""

    def __init__(self, settings: telemetry.TraceSettings) -> None:
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.trace import SpanKind, StatusCode

            from dcf import spans

            processor = telemetry.span_processor(settings)
        except ImportError as exc:
            raise ValueError(_missing(exc)) from None
        self.settings = settings
        self._ratio = settings.root_ratio
        resource = Resource.create(
            {
                "service.name": os.environ.get("OTEL_SERVICE_NAME") or "dcf-gateway",
                "service.namespace": "dcf",
                "service.version": __version__,
            }
        )
        # Spans of DCF's own: every one starts after should_sample (dcf/spans.py).
        self.recorder = spans.Recorder(processor, resource, "dcf.gateway", __version__)
        self._remote = spans.remote
        self._server = SpanKind.SERVER
        self._consumer = SpanKind.CONSUMER
        self._client = SpanKind.CLIENT
        self._error = StatusCode.ERROR

    def close(self) -> None:
        """Export what is left."""
        self.recorder.processor.shutdown()

    def sampled(self, scope: dict) -> SpanContext | None | Literal[False]:
        """False when the call is not traced; else the caller's span it continues (its
        ``traceparent``), or None for a new trace."""
        for key, value in scope["headers"]:
            if key == b"traceparent":
                parent = telemetry.parse_traceparent(value.decode("latin-1"))
                if not telemetry.should_sample(self.settings, parent):
                    return False
                return None if parent is None else self._remote(parent)
        # No caller's context, the common case, decided here (as should_sample would).
        ratio = self._ratio
        return None if ratio >= 1.0 or (ratio > 0.0 and random() < ratio) else False

    # one call --------------------------------------------------------------------------

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """The data plane with a span around each call the sampler keeps."""

        def traced(scope, receive, send) -> Awaitable[None]:  # noqa: ANN001 - ASGI
            # A plain function: a call not sampled gets ``app``'s own coroutine, with no
            # frame of ours for each of its awaits to pass through.
            parent = self.sampled(scope)
            if parent is False:
                return app(scope, receive, send)
            return self._serve(app, scope, receive, send, parent)

        return traced

    async def _serve(self, app: ASGIApp, scope, receive, send, parent) -> None:  # noqa: ANN001
        name, attributes = _describe(scope["method"], scope["path"])
        span = self.recorder.start(name, parent, self._server, attributes)
        scope = dict(scope)
        scope["headers"] = _with_traceparent(scope["headers"], span)
        status = 0

        async def send_traced(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = _call.set(span)
        try:
            await app(scope, receive, send_traced)
        except BaseException as exc:
            span.record_exception(exc, escaped=True)
            raise
        finally:
            _call.reset(token)
            self._finish(span, status)

    def _finish(self, span: RecordedSpan, status: int) -> None:
        span.put("http.response.status_code", status)
        if status >= 500 or not status:
            span.set_status(self._error)
        span.end()

    async def queued(self, wait: Callable[[], Awaitable[ReplicaLink]]) -> ReplicaLink:
        """``wait`` for a replica slot in the function's queue, as the call's ``queue`` span.

        Only a call that found no free slot comes here (the router takes a free one
        itself), so one that did costs no span. A call refused (429, 503) gets its span
        with ``dcf.refused``."""
        call = _call.get()
        if call is None:
            return await wait()
        start = time.time_ns()
        attributes = None
        try:
            return await wait()
        except BaseException as exc:
            attributes = {"dcf.refused": getattr(exc, "status", 0) or type(exc).__name__}
            raise
        finally:
            context = call.get_span_context()
            self.recorder.start("queue", context, attributes=attributes, start_time=start).end()

    def placed(self, link: ReplicaLink) -> None:
        """The replica (and so the version) a call got goes on the call's span."""
        call = _call.get()
        if call is None:
            return
        call.put("dcf.replica", link.id)
        version = _REPLICA_VERSION.fullmatch(link.id)
        if version is not None:
            call.put("dcf.version", int(version.group(1)))

    def job_call(
        self, job: Job, call: Callable[..., Awaitable[Result]]
    ) -> Callable[..., Awaitable[Result]]:
        """``call`` (the pool's) for a run of ``job``, in a span of the submit's trace when
        the submit was traced (its stored headers hold the submit span's traceparent)."""
        parent = _stored_parent(job.headers)
        if parent is None:
            return call

        async def traced(method: str, path: str, query: str, headers: list, body: bytes) -> Result:
            attributes = {
                "dcf.function": job.function,
                "dcf.job.id": job.id,
                "dcf.job.attempt": job.attempts,
            }
            span = self.recorder.start(
                f"job {job.function}", self._remote(parent), self._consumer, attributes
            )
            headers = [(k, v) for k, v in headers if k != "traceparent"]
            headers.append(("traceparent", _traceparent(span)))
            token = _call.set(span)
            status = 0
            try:
                result = await call(method, path, query, headers, body)
                status = result[0]
                return result
            except BaseException as exc:
                status = getattr(exc, "status", 0)
                raise
            finally:
                _call.reset(token)
                self._finish(span, status)

        return traced

    def callback(self, job: Job, deliver: Callable[..., Awaitable[str | None]]) -> Callable:
        """``deliver`` for the callback of ``job``: in a span of the submit's trace, and
        with that span's traceparent, so the receiver can continue the trace."""
        parent = _stored_parent(job.headers)
        if parent is None:
            return deliver

        async def traced(url: str, headers: dict[str, str], *args: Any) -> str | None:
            span = self.recorder.start(
                f"callback {job.function}",
                self._remote(parent),
                self._client,
                {"dcf.function": job.function, "dcf.job.id": job.id},
            )
            headers = {**headers, "traceparent": _traceparent(span)}
            error = None
            try:
                error = await deliver(url, headers, *args)
                return error
            finally:
                span.put("dcf.callback.delivered", error is None)
                if error is not None:
                    span.set_status(self._error, error)
                span.end()

        return traced


def _describe(method: str, path: str) -> tuple[str, dict[str, Any]]:
    """A call's span name (by function, not by full path: few distinct names) and
    attributes."""
    attributes: dict[str, Any] = {"http.request.method": method, "url.path": path}
    if path.startswith(_JOBS):
        return f"{method} {_JOBS}{{id}}", attributes
    if path.startswith(V2_MODELS):  # /v2/models/NAME[/versions/V][/infer|/ready]
        function, _, rest = path[len(V2_MODELS) :].partition("/")
        attributes["dcf.function"] = function
        last = rest.rsplit("/", 1)[-1] if rest else ""
        action = f"/{last}" if last in ("infer", "ready") else ""
        return f"{method} {V2_MODELS}{function}{action}", attributes
    if not path.startswith((PREFIX, ASYNC_PREFIX)):
        return f"{method} {path}", attributes
    prefix = PREFIX if path.startswith(PREFIX) else ASYNC_PREFIX
    function = path[len(prefix) :].partition("/")[0]
    attributes["dcf.function"] = function
    return f"{method} {prefix}{function}", attributes


def _traceparent(span: RecordedSpan) -> str:
    context = span.get_span_context()
    return telemetry.traceparent(context.trace_id, context.span_id)


def _with_traceparent(headers: list[tuple[bytes, bytes]], span: RecordedSpan) -> list:
    """The call's headers with the span's traceparent in place of the caller's."""
    out = [(k, v) for k, v in headers if k != b"traceparent"]
    out.append((b"traceparent", _traceparent(span).encode("latin-1")))
    return out


def _stored_parent(headers: list[tuple[str, str]]) -> telemetry.Parent | None:
    """A job's traced submit: its headers hold the submit span's (sampled) traceparent."""
    for key, value in headers:
        if key == "traceparent":
            parent = telemetry.parse_traceparent(value)
            return parent if parent is not None and parent[2] else None
    return None


def _missing(exc: ImportError) -> str:
    return (
        f"tracing needs OpenTelemetry's SDK and OTLP/HTTP exporter ({exc.name} is missing):"
        " pip install 'dcf[tracing]'"
    )
