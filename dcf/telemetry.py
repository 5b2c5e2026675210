"""Tracing settings shared by the gateway and the runtime: whether to trace, where to, how often.

Both read the standard OpenTelemetry variables (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_TRACES_SAMPLER`` …), the gateway also its flags. Nothing here imports
OpenTelemetry: with tracing off no process ever loads it. ``span_processor`` and
``start_provider`` do, once, when tracing is on.

Sampling is decided here, before any span exists, from the caller's ``traceparent``
and the sampler: a call that is not sampled costs a header lookup, not the SDK's
span machinery. Imports nothing from the gateway or the runtime.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
DEFAULT_SAMPLER = "parentbased_always_on"  # the OpenTelemetry default
TRACES_PATH = "/v1/traces"
PROTOCOL = "http/protobuf"

# What a replica may be given of the gateway's settings besides where to export: how spans
# are batched and limited. Never OTEL_EXPORTER_OTLP_HEADERS (collector credentials) nor
# key files: a replica runs the function's code.
FORWARDED_PREFIXES = ("OTEL_BSP_", "OTEL_SPAN_", "OTEL_ATTRIBUTE_")
FORWARDED = (
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_RESOURCE_ATTRIBUTES",
)

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
TRACEPARENT_MAX = 512
"""Longer headers are not looked at (W3C's version 00 has 55 characters)."""

Parent = tuple[str, str, bool]
"""A caller's trace context: (trace id, span id, sampled), hex as in the header."""


@dataclass(frozen=True)
class TraceSettings:
    endpoint: str
    """The OTLP/HTTP traces URL spans are POSTed to (…/v1/traces)."""
    sampler: str = DEFAULT_SAMPLER
    ratio: float = 1.0
    """For the ``traceidratio`` samplers: the share of new traces kept."""
    forwarded: tuple[tuple[str, str], ...] = ()
    """OTEL_ variables (batching, limits) a replica gets as they were set here."""
    parent_based: bool = field(init=False)
    """Whether a caller's sampled flag decides (``parentbased_*``)."""
    root_ratio: float = field(init=False)
    """The share of calls with no parent (or, not parent-based, of all calls) traced."""

    def __post_init__(self) -> None:
        # Decided once: should_sample runs for every call while tracing is on.
        root = self.sampler.removeprefix("parentbased_")
        ratio = {"always_on": 1.0, "always_off": 0.0}.get(root, self.ratio)
        object.__setattr__(self, "parent_based", self.sampler.startswith("parentbased_"))
        object.__setattr__(self, "root_ratio", ratio)


class TracingError(ValueError):
    """A tracing setting that cannot work; the message names the flag or variable."""


def from_environment(
    env: Mapping[str, str], endpoint: str | None = None, sample: float | None = None
) -> TraceSettings | None:
    """The settings, or None when tracing is off. ``endpoint`` (``--otlp-endpoint``, a base
    URL as ``OTEL_EXPORTER_OTLP_ENDPOINT``) and ``sample`` (``--trace-sample``) win over the
    variables. Raises TracingError naming what is wrong."""
    if endpoint is not None:
        url = _traces_url(endpoint, "--otlp-endpoint", base=True)
    elif env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        url = _traces_url(
            env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"], "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        )
    elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        url = _traces_url(env["OTEL_EXPORTER_OTLP_ENDPOINT"], "OTEL_EXPORTER_OTLP_ENDPOINT", True)
    elif sample is not None:
        raise TracingError(
            "--trace-sample traces nothing without --otlp-endpoint or"
            " $OTEL_EXPORTER_OTLP_ENDPOINT (where spans go)"
        )
    else:
        return None
    if endpoint is None:
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        exporter = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        if exporter == "none":
            return None
        if exporter != "otlp":
            raise TracingError(
                f"OTEL_TRACES_EXPORTER={exporter!r} is not supported: dcf exports OTLP"
                " (otlp), or nothing (none)"
            )
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(name, "").strip()
        if protocol and protocol != PROTOCOL:
            raise TracingError(
                f"{name}={protocol!r} is not supported: dcf exports OTLP over HTTP"
                f" ({PROTOCOL}); unset it or set it to {PROTOCOL}"
            )
    if sample is not None:
        if not 0.0 <= sample <= 1.0:
            raise TracingError(f"--trace-sample {sample:g} must be between 0 and 1")
        sampler, ratio = "parentbased_traceidratio", sample
    else:
        sampler, ratio = _sampler(env)
    forwarded = tuple(
        sorted(
            (k, v)
            for k, v in env.items()
            if k.startswith("OTEL_") and (k in FORWARDED or k.startswith(FORWARDED_PREFIXES))
        )
    )
    return TraceSettings(url, sampler, ratio, forwarded)


def _traces_url(value: str, source: str, base: bool = False) -> str:
    value = value.strip()
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise TracingError(f"{source} {value!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TracingError(
            f"{source} {value!r} must be an http:// or https:// URL of an OTLP/HTTP collector,"
            " e.g. http://127.0.0.1:4318"
        )
    if not base:
        return value
    return value.rstrip("/") + TRACES_PATH  # as the specification builds it from the base


def _sampler(env: Mapping[str, str]) -> tuple[str, float]:
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or DEFAULT_SAMPLER
    if sampler not in SAMPLERS:
        raise TracingError(
            f"OTEL_TRACES_SAMPLER={sampler!r} is not one dcf knows: choose one of"
            f" {', '.join(SAMPLERS)}"
        )
    ratio = 1.0
    if sampler.endswith("traceidratio"):
        raw = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        try:
            ratio = float(raw) if raw else 1.0
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise TracingError(
                f"OTEL_TRACES_SAMPLER_ARG={raw!r} must be a number between 0 and 1"
                f" (the share of traces {sampler} keeps)"
            )
    return sampler, ratio


def parse_traceparent(value: str | None) -> Parent | None:
    """A W3C ``traceparent`` header as (trace id, span id, sampled), None if invalid."""
    if not value or len(value) > TRACEPARENT_MAX:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def should_sample(settings: TraceSettings, parent: Parent | None) -> bool:
    """Whether a call with this caller's context is traced (the sampler's decision)."""
    if parent is not None and settings.parent_based:
        return parent[2]
    ratio = settings.root_ratio
    return ratio >= 1.0 or (ratio > 0.0 and random.random() < ratio)


def traceparent(trace_id: int, span_id: int) -> str:
    """The header that makes the receiver's spans children of this (sampled) span."""
    return f"00-{trace_id:032x}-{span_id:016x}-01"


def replica_environment(settings: TraceSettings) -> dict[str, str]:
    """What a replica started by the gateway needs to export its spans, and nothing else.

    Its sampler follows the gateway's decision only: a call the gateway did not sample
    comes without a sampled traceparent, and the replica starts no trace of its own.
    """
    env = dict(settings.forwarded)
    env.update(
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=settings.endpoint,
        OTEL_TRACES_SAMPLER="parentbased_always_off",
    )
    return env


def span_processor(settings: TraceSettings) -> SpanProcessor:
    """OpenTelemetry's batch span processor, exporting to ``settings.endpoint`` over
    OTLP/HTTP from its own thread."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.endpoint))


def start_provider(
    settings: TraceSettings, resource: dict[str, Any], processor: SpanProcessor
) -> TracerProvider:
    """The global SDK tracer provider, for spans that handler code starts itself
    (``trace.get_tracer``), exporting through ``processor``; those with no parent are
    kept as the sampler of ``settings`` says."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import (
        ALWAYS_OFF,
        ALWAYS_ON,
        ParentBased,
        TraceIdRatioBased,
    )

    if settings.root_ratio >= 1.0:
        chosen = ALWAYS_ON
    elif settings.root_ratio <= 0.0:
        chosen = ALWAYS_OFF
    else:
        chosen = TraceIdRatioBased(settings.ratio)
    sampler = ParentBased(chosen) if settings.parent_based else chosen
    provider = TracerProvider(sampler=sampler, resource=Resource.create(resource))
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider
