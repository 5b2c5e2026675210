"""Weighted routing between two versions of a function, per call: a canary's share.

A ``Split`` stands in the routing table where a ``Pool`` does (same ``call``), so the
data plane, jobs and V2 route through it unchanged. Calls are dealt out by a running
credit rather than at random, so any run of calls is within one call of the share:
a 10% canary gets exactly 1 call in 10, which is what makes short judging windows fair.
Each version's outcomes (status, latency) are counted for the rollout judge
(dcf.gateway.lifecycle.rollout), over windows it takes and resets.

``X-DCF-Version: N`` pins a call to one version (``pinned``); pinned calls are for
testing a version by hand and are not judged.
"""

from __future__ import annotations

import math
import random
import time

from dcf import wire
from dcf.gateway.routing.router import CallError, Pool, Result

VERSION_HEADER = "x-dcf-version"
MAX_SAMPLES = 10_000
"""Latencies kept per version and window; past it a uniform sample (reservoir) of them."""


class Window:
    """One version's calls since the judge last looked: count, errors, latencies."""

    __slots__ = ("calls", "errors", "latencies")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.latencies: list[float] = []

    def add(self, status: int, seconds: float) -> None:
        self.calls += 1
        if status >= 500:  # the version's fault: failures, 502s, timeouts; not 4xx
            self.errors += 1
        if len(self.latencies) < MAX_SAMPLES:
            self.latencies.append(seconds)
        else:
            slot = random.randrange(self.calls)  # noqa: S311 - sampling, not secrets
            if slot < MAX_SAMPLES:
                self.latencies[slot] = seconds

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    def p95(self) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class Split:
    """Routes ``share`` percent of calls to the canary's pool, the rest to the stable one."""

    def __init__(
        self, stable: Pool, stable_version: int, canary: Pool, canary_version: int, share: int
    ) -> None:
        self.stable, self.canary = stable, canary
        self.stable_version, self.canary_version = stable_version, canary_version
        self.pools = {stable_version: stable, canary_version: canary}
        self.share = share
        self._credit = 0
        self.windows = {stable_version: Window(), canary_version: Window()}
        self.window_started = time.monotonic()

    # what the jobs runner and tracing read of a route
    @property
    def function(self) -> str:
        return self.stable.function

    @property
    def unavailable(self) -> str | None:
        return self.stable.unavailable

    @property
    def replicas(self) -> list:
        return self.stable.replicas + self.canary.replicas

    @property
    def inflight(self) -> int:
        return self.stable.inflight + self.canary.inflight

    @property
    def queued(self) -> int:
        return self.stable.queued + self.canary.queued

    def set_share(self, share: int) -> None:
        self.share = share
        self._credit = 0

    def windows_now(self) -> tuple[Window, Window]:
        """(canary, stable) so far, still counting."""
        return self.windows[self.canary_version], self.windows[self.stable_version]

    def take_windows(self) -> tuple[Window, Window]:
        """(canary, stable) since the last take; counting starts afresh."""
        canary, stable = self.windows[self.canary_version], self.windows[self.stable_version]
        self.windows = {self.stable_version: Window(), self.canary_version: Window()}
        self.window_started = time.monotonic()
        return canary, stable

    def _next_is_canary(self) -> bool:
        self._credit += self.share
        if self._credit >= 100:
            self._credit -= 100
            return True
        return False

    async def call(
        self, method: str, path: str, query: str, headers: wire.Headers, body: bytes
    ) -> Result:
        version = self.canary_version if self._next_is_canary() else self.stable_version
        started = time.perf_counter()
        try:
            result = await self.pools[version].call(method, path, query, headers, body)
        except CallError as exc:
            # Counted in the window open when it ends (a take may have come meanwhile).
            self.windows[version].add(exc.status, time.perf_counter() - started)
            raise
        self.windows[version].add(result[0], time.perf_counter() - started)
        return result


def pinned(route: Pool | Split, value: str, function: str) -> Pool:
    """The pool of the version ``X-DCF-Version`` names, or a 400/404 naming what is wrong."""
    value = value.strip().removeprefix("v")
    if not value.isdigit() or len(value) > 9:
        raise CallError(400, f"X-DCF-Version must be a version number, got {value!r}")
    version = int(value)
    pools = route.pools if isinstance(route, Split) else {route.version: route}
    pool = pools.get(version)
    if pool is None:
        serving = ", ".join(str(v) for v in sorted(v for v in pools if v is not None)) or "none"
        raise CallError(
            404, f"function {function!r} has no version {version} serving (serving: {serving})"
        )
    return pool
