"""Prometheus metrics of the gateway and its functions.

Counters on the hot path are cached label children (no lookup per call);
gauges of pools and replicas are read at scrape time, costing calls nothing.
Labels stay bounded: function name and status code only.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

RECENT_WINDOW = 60.0
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self._calls = Counter(
            "dcf_function_calls",
            "Calls to a function by HTTP status code.",
            ["function", "code"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "dcf_function_call_seconds",
            "Time from request to response, gateway included.",
            ["function"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._batch = Histogram(
            "dcf_function_batch_size",
            "Calls per batch, for handlers that batch.",
            ["function"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.unknown = Counter(
            "dcf_gateway_unknown_function_calls",
            "Calls to names with no function.",
            registry=self.registry,
        )
        self._streams = Counter(
            "dcf_function_streams",
            "Streamed answers begun (a generator's items sent as they come).",
            ["function"],
            registry=self.registry,
        )
        self._stream_items = Counter(
            "dcf_function_stream_items",
            "Items of streamed answers sent to callers.",
            ["function"],
            registry=self.registry,
        )
        self._stream_ends = Counter(
            "dcf_function_stream_ends",
            "Streamed answers ended, by how: complete, error, timeout, idle or disconnect.",
            ["function", "reason"],
            registry=self.registry,
        )
        self._first_item = Histogram(
            "dcf_function_stream_first_item_seconds",
            "Time from request to a streamed answer's first item, gateway included.",
            ["function"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._stream_children: dict[str, tuple] = {}
        self._call_children: dict[tuple[str, int], object] = {}
        self._latency_children: dict[str, object] = {}
        self._windows: dict[str, deque[tuple[float, list[float]]]] = {}

    def observe(self, function: str, code: int, seconds: float) -> None:
        key = (function, code)
        child = self._call_children.get(key)
        if child is None:
            child = self._call_children[key] = self._calls.labels(function, str(code))
        child.inc()  # type: ignore[attr-defined]
        hist = self._latency_children.get(function)
        if hist is None:
            hist = self._latency_children[function] = self._latency.labels(function)
        hist.observe(seconds)  # type: ignore[attr-defined]

    def _stream_metrics(self, function: str) -> tuple:
        children = self._stream_children.get(function)
        if children is None:
            children = self._stream_children[function] = (
                self._streams.labels(function),
                self._stream_items.labels(function),
                self._first_item.labels(function),
            )
        return children

    def stream_started(self, function: str) -> None:
        self._stream_metrics(function)[0].inc()

    def stream_items(self, function: str, count: int) -> None:
        self._stream_metrics(function)[1].inc(count)

    def stream_first_item(self, function: str, seconds: float) -> None:
        self._stream_metrics(function)[2].observe(seconds)

    def stream_ended(self, function: str, reason: str) -> None:
        self._stream_ends.labels(function, reason).inc()

    def batch_observer(self, function: str) -> Callable[[int], None]:
        return self._batch.labels(function).observe

    def calls(self, function: str) -> dict[int, int]:
        """Calls so far by status code, read from the same counters /metrics exports."""
        return {
            code: int(child._value.get())  # type: ignore[attr-defined]
            for (name, code), child in self._call_children.items()
            if name == function
        }

    def _bucket_counts(self, function: str) -> list[float] | None:
        hist = self._latency_children.get(function)
        if hist is None:
            return None
        return [c.get() for c in hist._buckets]  # type: ignore[attr-defined]

    def tick(self, now: float) -> None:
        """Remember bucket counts now and then, so quantiles can cover a recent window."""
        for function in self._latency_children:
            window = self._windows.setdefault(function, deque())
            window.append((now, self._bucket_counts(function) or []))
            # Keep the newest snapshot that is a full window old: the baseline.
            while len(window) > 1 and window[1][0] <= now - RECENT_WINDOW:
                window.popleft()

    def latency_quantiles(self, function: str, recent: bool = True) -> dict[str, float | None]:
        """p50/p99 estimated from the histogram buckets, as Prometheus would: over the
        last minute or so (``recent``), else since the gateway started."""
        counts = self._bucket_counts(function)
        if counts is None:
            return {"p50": None, "p99": None}
        window = self._windows.get(function)
        if recent and window and window[0][0] <= time.monotonic() - RECENT_WINDOW:
            counts = [now - then for now, then in zip(counts, window[0][1], strict=True)]
        bounds = LATENCY_BUCKETS + (float("inf"),)
        return {name: _quantile(q, bounds, counts) for name, q in (("p50", 0.5), ("p99", 0.99))}

    def forget(self, function: str) -> None:
        for key in [k for k in self._call_children if k[0] == function]:
            self._calls.remove(*map(str, key))
            del self._call_children[key]
        if self._latency_children.pop(function, None) is not None:
            self._latency.remove(function)
        self._windows.pop(function, None)
        with contextlib.suppress(KeyError):
            self._batch.remove(function)
        if self._stream_children.pop(function, None) is not None:
            for metric in (self._streams, self._stream_items, self._first_item):
                with contextlib.suppress(KeyError):
                    metric.remove(function)
            for reason in ("complete", "error", "timeout", "idle", "disconnect"):
                with contextlib.suppress(KeyError):
                    self._stream_ends.remove(function, reason)

    def add_state_collector(self, snapshot: Callable[[], Iterable[dict]]) -> None:
        self.registry.register(_StateCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _quantile(q: float, bounds: tuple[float, ...], counts: list[float]) -> float | None:
    """Linear interpolation inside the bucket holding the q-th call (histogram_quantile)."""
    total = sum(counts)
    if not total:
        return None
    rank, seen, lower = q * total, 0.0, 0.0
    for upper, count in zip(bounds, counts, strict=True):
        if count and seen + count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
        lower = upper
    return lower


class _StateCollector:
    """Pool and replica gauges, computed when Prometheus scrapes."""

    def __init__(self, snapshot: Callable[[], Iterable[dict]]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable:
        inflight = GaugeMetricFamily(
            "dcf_function_inflight", "Calls in flight.", labels=["function"]
        )
        queued = GaugeMetricFamily(
            "dcf_function_queued", "Calls waiting for a replica.", labels=["function"]
        )
        ready = GaugeMetricFamily(
            "dcf_function_replicas_ready", "Replicas serving.", labels=["function"]
        )
        desired = GaugeMetricFamily(
            "dcf_function_replicas_desired", "Replicas wanted.", labels=["function"]
        )
        cold = CounterMetricFamily(
            "dcf_function_cold_starts", "Replicas started.", labels=["function"]
        )
        share = GaugeMetricFamily(
            "dcf_function_version_share",
            "Share of calls routed to each serving version (0 to 1; a canary's is its step).",
            labels=["function", "version"],
        )
        for s in self._snapshot():
            name = [s["name"]]
            for version, percent in s.get("shares", {}).items():
                share.add_metric([s["name"], str(version)], percent / 100)
            inflight.add_metric(name, s["inflight"])
            queued.add_metric(name, s["queued"])
            ready.add_metric(name, s["ready"])
            desired.add_metric(name, s["desired"])
            cold.add_metric(name, s["cold_starts"])
        return [inflight, queued, ready, desired, cold, share]
