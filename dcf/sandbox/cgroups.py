"""Limits for a whole replica (every process it starts) as a cgroup, v2 or v1.

The kernel enforces them: memory over the limit is OOM-killed inside the
group only, CPU time is throttled to the quota, forks past ``pids`` fail.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

ROOT = "/sys/fs/cgroup"
GROUP = "dcf"
PERIOD_US = 100_000
WEIGHT = 100 * (os.cpu_count() or 1)
"""cpu.weight of the dcf group and of each replica's (v1: cpu.shares, × 10.24). A group
competes for CPU as one task of its weight: at the default (100, one task's) a replica
whose model runs on every core got one core's share, less than the same process
unsandboxed, whenever anything else on the machine was busy. This weight gives it the
share of as many tasks as there are cores, as if it were not in a group."""


@dataclass(frozen=True)
class Limits:
    memory: int | None = None
    cpu: float | None = None
    pids: int | None = None


class ReplicaCgroup:
    """The cgroup(s) of one replica: created with its limits, joined by pid, removed after."""

    def __init__(self, version: int, name: str, limits: Limits) -> None:
        self.version = version
        self.limits = limits
        if version == 2:
            self.dirs = {"": os.path.join(ROOT, GROUP, name)}
        else:
            self.dirs = {c: os.path.join(ROOT, c, GROUP, name) for c in ("memory", "cpu", "pids")}
        for path in self.dirs.values():
            if version == 2:
                parent = os.path.dirname(path)
                os.makedirs(parent, exist_ok=True)
                with contextlib.suppress(OSError):  # enable what the root offers
                    _write(os.path.join(ROOT, "cgroup.subtree_control"), "+memory +cpu +pids")
                with contextlib.suppress(OSError):
                    _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +cpu +pids")
            os.makedirs(path, exist_ok=True)
        self._apply()

    def _weigh(self) -> None:
        """The CPU share of an unsandboxed process, for the dcf group and this one (WEIGHT)."""
        if self.version == 2:
            files = [os.path.join(os.path.dirname(self.dirs[""]), "cpu.weight")]
            files.append(os.path.join(self.dirs[""], "cpu.weight"))
            value = str(min(WEIGHT, 10_000))
        else:
            files = [os.path.join(os.path.dirname(self.dirs["cpu"]), "cpu.shares")]
            files.append(os.path.join(self.dirs["cpu"], "cpu.shares"))
            value = str(WEIGHT * 1024 // 100)
        for path in files:
            with contextlib.suppress(OSError):  # no cpu controller here: the default stays
                _write(path, value)

    def _apply(self) -> None:
        lim = self.limits
        self._weigh()
        if self.version == 2:
            d = self.dirs[""]
            if lim.memory:
                _write(os.path.join(d, "memory.max"), str(lim.memory))
                with contextlib.suppress(OSError):
                    _write(os.path.join(d, "memory.swap.max"), "0")
            if lim.cpu:
                _write(os.path.join(d, "cpu.max"), f"{int(lim.cpu * PERIOD_US)} {PERIOD_US}")
            if lim.pids:
                _write(os.path.join(d, "pids.max"), str(lim.pids))
            return
        if lim.memory:
            _write(os.path.join(self.dirs["memory"], "memory.limit_in_bytes"), str(lim.memory))
            with contextlib.suppress(OSError):  # no swap accounting on some kernels
                _write(
                    os.path.join(self.dirs["memory"], "memory.memsw.limit_in_bytes"),
                    str(lim.memory),
                )
        if lim.cpu:
            _write(os.path.join(self.dirs["cpu"], "cpu.cfs_period_us"), str(PERIOD_US))
            quota = str(int(lim.cpu * PERIOD_US))
            _write(os.path.join(self.dirs["cpu"], "cpu.cfs_quota_us"), quota)
        if lim.pids:
            _write(os.path.join(self.dirs["pids"], "pids.max"), str(lim.pids))

    def join_path(self) -> list[str]:
        """The ``cgroup.procs`` files a new process writes its pid into."""
        name = "cgroup.procs"
        return [os.path.join(d, name) for d in self.dirs.values()]

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of this group for its memory limit."""
        try:
            if self.version == 2:
                with open(os.path.join(self.dirs[""], "memory.events")) as f:
                    events = dict(line.split() for line in f if line.strip())
                return int(events.get("oom_kill", "0")) > 0
            with open(os.path.join(self.dirs["memory"], "memory.oom_control")) as f:
                events = dict(line.split() for line in f if line.strip())
            if "oom_kill" in events:
                return int(events["oom_kill"]) > 0
            with open(os.path.join(self.dirs["memory"], "memory.failcnt")) as f:
                return int(f.read().strip() or 0) > 0
        except (OSError, ValueError):
            return False

    def remove(self) -> None:
        """Remove the group (its processes are gone by then; rmdir fails while any is left)."""
        for path in self.dirs.values():
            with contextlib.suppress(OSError):
                os.rmdir(path)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)
