"""Replica counts follow load: up at once while calls queue, down slowly, to zero when idle."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from weakref import WeakKeyDictionary

from dcf.gateway.lifecycle.deployment import Deployment
from dcf.gateway.lifecycle.functions import FunctionManager, FunctionState

INTERVAL = 0.25


class Autoscaler:
    def __init__(self, manager: FunctionManager, interval: float = INTERVAL) -> None:
        self.manager = manager
        self.interval = interval
        # Recent wants per deployment: scaling down waits for them all to be lower. Keyed
        # by the deployment itself, so a stopped one's history goes with it.
        self._history: WeakKeyDictionary[Deployment, deque[tuple[float, int]]] = WeakKeyDictionary()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            for state in list(self.manager.functions.values()):
                self.step(state, now)

    def step(self, state: FunctionState, now: float) -> None:
        live = state.live
        run = state.rollout
        low, high = state.record.min_replicas, state.record.max_replicas
        if run is None:
            self._size(state, live, low, high, now)
            return
        # In a rollout each version is sized to its share of the calls (at least one each).
        for deployment, share in ((live, 100 - run.share), (run.canary, run.share)):
            self._size(
                state,
                deployment,
                max(1, math.ceil(low * share / 100)),
                max(1, math.ceil(high * share / 100)),
                now,
            )

    def _size(
        self, state: FunctionState, live: Deployment | None, low: int, high: int, now: float
    ) -> None:
        if live is None or live.failure or live.stopping:
            if live is not None:
                self._history.pop(live, None)
            return
        spec = live.spec
        pool = live.pool
        per_replica = spec.replicas.target or spec.concurrency
        load = pool.inflight
        want = min(max(math.ceil(load / per_replica), low), high)
        if load and want == 0:
            want = 1
        history = self._history.setdefault(live, deque())
        history.append((now, want))
        while history and history[0][0] < now - spec.replicas.scale_down_delay:
            history.popleft()
        if want > live.desired:
            live.scale(want)
            return
        if live.desired > low:
            recent = max(w for _, w in history)
            if recent < live.desired:
                if recent == 0 and (load or now - pool.last_call < spec.replicas.idle_timeout):
                    recent = 1  # zero only after the idle period
                if recent < live.desired:
                    self.manager.logs.write(
                        state.name, "autoscaler", f"scaling {live.desired} → {recent} replicas"
                    )
                    live.scale(recent)
