"""Canary rollouts: a new version takes a growing share of calls while it does as well
as the stable one, and none the moment it does worse.

The judge compares the two versions over the same window of calls (the ``Split``
counts them): the canary's error rate (5xx and timeouts) may exceed the stable one's
by at most ``max_error_rate``, its p95 latency may be at most ``max_p95_ratio`` times
the stable one's. Errors are judged as soon as the canary has ``min_calls`` in the
window, so a failing canary is aborted at once; latency at the end of the ``interval``,
over the whole window (the p95 of a few dozen calls is their maximum: noise). A good
canary moves to the next step only after the whole ``interval``. The last step (100)
is the promotion. The step survives a restart (``rollouts`` table, registry.py); the
manager (functions.py) does the switching.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from dcf.config import Rollout
from dcf.gateway.lifecycle.deployment import Deployment
from dcf.gateway.routing.split import Split, Window

LATENCY_FLOOR = 0.010
"""Seconds of p95 difference below which latency is never a reason to abort: at a few
milliseconds, scheduler noise alone makes ratios of 2 on a busy machine."""
TICK = 0.25
"""Seconds between looks at the window: how late an abort can be once min_calls is met."""


@dataclass
class Verdict:
    """What the judge decided: ``wait`` (too few calls), ``pass`` or ``fail`` (why)."""

    outcome: str
    reason: str = ""
    figures: dict = field(default_factory=dict)


def judge(
    plan: Rollout, canary_version: int, canary: Window, stable: Window, latency: bool = True
) -> Verdict:
    """The canary against the stable version over one window (``latency``: its p95 too)."""
    if canary.calls < plan.min_calls:
        return Verdict("wait")
    c_p95, s_p95 = canary.p95(), stable.p95()
    figures = {
        "calls": canary.calls,
        "stable_calls": stable.calls,
        "error_rate": round(canary.error_rate, 4),
        "stable_error_rate": round(stable.error_rate, 4),
        "p95": c_p95,
        "stable_p95": s_p95,
    }
    if canary.error_rate > stable.error_rate + plan.max_error_rate:
        return Verdict(
            "fail",
            f"canary v{canary_version} aborted: error rate {canary.error_rate:.2f} vs"
            f" {stable.error_rate:.2f} over {canary.calls} calls",
            figures,
        )
    if (
        latency
        and c_p95 is not None
        and s_p95 is not None
        and stable.calls
        and c_p95 > s_p95 * plan.max_p95_ratio
        and c_p95 - s_p95 > LATENCY_FLOOR
    ):
        return Verdict(
            "fail",
            f"canary v{canary_version} aborted: p95 latency {c_p95 * 1000:.1f}ms vs"
            f" {s_p95 * 1000:.1f}ms ({c_p95 / s_p95:.1f}x, at most {plan.max_p95_ratio:g}x)"
            f" over {canary.calls} calls",
            figures,
        )
    return Verdict("pass", "", figures)


class RolloutRun:
    """One rollout in progress: the two versions, the split between them, the step."""

    def __init__(
        self, plan: Rollout, stable: Deployment, canary: Deployment, step: int = 0
    ) -> None:
        self.plan = plan
        self.stable = stable
        self.canary = canary
        self.step = min(step, len(plan.steps) - 1)
        self.split = Split(
            stable.pool, stable.version, canary.pool, canary.version, plan.steps[self.step]
        )
        self.started_at = time.time()
        self.step_started = time.monotonic()
        self.last: Verdict | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def share(self) -> int:
        return self.plan.steps[self.step]

    def shares(self) -> dict[int, int]:
        """Percent of calls per version."""
        return {self.stable.version: 100 - self.share, self.canary.version: self.share}

    async def run(
        self,
        on_step: Callable[[int, Verdict], None],
        on_end: Callable[[bool, str, dict], Awaitable[None]],
    ) -> None:
        """Judge until the canary is promoted (``on_end(True, …)``) or aborted (``False``);
        ``on_step`` is told each step reached before the last."""
        plan = self.plan
        tick = min(TICK, plan.interval)
        while True:
            await asyncio.sleep(tick)
            if self.canary.failure:
                reason = f"canary v{self.canary.version} aborted: it failed: {self.canary.failure}"
                await on_end(False, reason.rstrip(), {})
                return
            canary, stable = self.split.windows_now()
            whole = time.monotonic() - self.step_started >= plan.interval
            verdict = judge(plan, self.canary.version, canary, stable, latency=whole)
            if verdict.outcome == "fail":
                self.last = verdict
                await on_end(False, verdict.reason, verdict.figures)
                return
            if not whole or verdict.outcome == "wait":
                continue
            self.last = verdict
            self.split.take_windows()
            self.step_started = time.monotonic()
            if plan.steps[self.step + 1] == 100:
                await on_end(True, f"canary v{self.canary.version} promoted", verdict.figures)
                return
            self.step += 1
            self.split.set_share(self.share)
            on_step(self.step, verdict)

    def info(self) -> dict:
        last = self.last
        return {
            "state": "running",
            "stable": self.stable.version,
            "canary": self.canary.version,
            "step": self.step,
            "steps": self.plan.steps,
            "share": self.share,
            "shares": {str(v): s for v, s in self.shares().items()},
            "plan": self.plan.model_dump(mode="json"),
            "started_at": self.started_at,
            "step_age": round(time.monotonic() - self.step_started, 1),
            "window": _window(self.split),
            "last": None if last is None else {"outcome": last.outcome, **last.figures},
        }


def _window(split: Split) -> dict:
    canary, stable = split.windows_now()
    return {
        "canary": {"calls": canary.calls, "errors": canary.errors, "p95": canary.p95()},
        "stable": {"calls": stable.calls, "errors": stable.errors, "p95": stable.p95()},
    }
