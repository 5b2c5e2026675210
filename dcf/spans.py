"""The spans DCF starts on every sampled call, recorded without the SDK's tracer.

The gateway's call span and the replica's handler span are started after DCF has
made the sampling decision itself (``telemetry.should_sample``), so the SDK tracer's
work (a sampler, span processors' ``on_start``, locks, a span limits check) buys them
nothing, and it costs: ~20 µs a span when warm, and several times that on the one
call in a hundred that is sampled, when its code is out of the caches. A
``RecordedSpan`` costs ~7 µs warm. It implements OpenTelemetry's ``Span`` API (a
handler may annotate the current span as usual) and, once ended, is the SDK's own
``ReadableSpan`` to its span processor: the batching, the OTLP encoding and the
export stay OpenTelemetry's (bench/results/tracing-*: 1% sampling cost 12% of an
echo's req/s with the SDK's tracer, ~5% with these).

Imports OpenTelemetry: only imported when tracing is on.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, SpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from dcf import telemetry

SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
_ERROR = Status(StatusCode.ERROR)


def remote(parent: telemetry.Parent) -> SpanContext:
    """The caller's span, from its ``traceparent``, as a parent for ours."""
    trace_id, span_id, sampled = parent
    flags = SAMPLED if sampled else TraceFlags(0)
    return SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=flags)


class Recorder:
    """Starts spans that ``processor`` gets once they end."""

    def __init__(
        self, processor: SpanProcessor, resource: Resource, scope: str, version: str | None = None
    ) -> None:
        self.processor = processor
        self.resource = resource
        self.scope = InstrumentationScope(scope, version)
        self.limits = SpanLimits()  # the SDK's, from OTEL_SPAN_* / OTEL_ATTRIBUTE_*
        self._ids = RandomIdGenerator()

    def start(
        self,
        name: str,
        parent: SpanContext | None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        start_time: int | None = None,
    ) -> RecordedSpan:
        """A span under ``parent`` (None: the first of a new trace)."""
        trace_id = self._ids.generate_trace_id() if parent is None else parent.trace_id
        context = SpanContext(trace_id, self._ids.generate_span_id(), False, SAMPLED)
        return RecordedSpan(self, name, context, parent, kind, attributes, start_time)


class RecordedSpan(trace.Span, ReadableSpan):
    """A sampled span of DCF's, open until ``end``: OpenTelemetry's ``Span`` API, and,
    ended, the SDK's ``ReadableSpan`` the processor exports (as the SDK's own spans)."""

    def __init__(
        self,
        recorder: Recorder,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Mapping[str, Any] | None,
        start_time: int | None,
    ) -> None:
        self._recorder = recorder
        self._resource = recorder.resource
        self._instrumentation_scope = recorder.scope
        self._instrumentation_info = None
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        # DCF's own, as given; made BoundedAttributes (validated, bounded, as the SDK's)
        # once code calls the API's set_attribute.
        self._attributes: dict[str, Any] | BoundedAttributes = dict(attributes or ())
        self._events: list[Event] = []
        self._links: list[Link] = []
        self._status = _UNSET
        self._start_time = start_time or time.time_ns()
        self._end_time: int | None = None

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: Any) -> None:
        if self._end_time is not None:
            return
        attributes = self._attributes
        if type(attributes) is dict:
            limits = self._recorder.limits
            attributes = BoundedAttributes(
                limits.max_span_attributes,
                attributes,
                immutable=False,
                max_value_len=limits.max_span_attribute_length,
            )
            self._attributes = attributes
        attributes[key] = value

    def put(self, key: str, value: str | int | float | bool) -> None:
        """An attribute of DCF's own (of a valid type): set without the API's checks."""
        self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None
    ) -> None:
        limits = self._recorder.limits
        if self._end_time is None and len(self._events) < limits.max_events:
            bounded = BoundedAttributes(
                limits.max_event_attributes,
                attributes,
                max_value_len=limits.max_attribute_length,
            )
            self._events.append(Event(name, bounded, timestamp or time.time_ns()))

    def add_link(self, context: SpanContext, attributes: Mapping[str, Any] | None = None) -> None:
        limits = self._recorder.limits
        if self._end_time is None and context.is_valid and len(self._links) < limits.max_links:
            bounded = BoundedAttributes(
                limits.max_link_attributes, attributes, max_value_len=limits.max_attribute_length
            )
            self._links.append(Link(context, bounded))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return  # as the SDK: OK is final
        if isinstance(status, Status):
            self._status = status
        elif status is StatusCode.ERROR and not description:
            self._status = _ERROR
        else:
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, Any] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        kind = type(exception)
        module = kind.__module__
        described: dict[str, Any] = {
            "exception.type": kind.__qualname__
            if module in ("builtins", "")
            else f"{module}.{kind.__qualname__}",
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        self.add_event("exception", {**described, **(attributes or {})}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is None:
            self._end_time = end_time or time.time_ns()
            self._recorder.processor.on_end(self)
