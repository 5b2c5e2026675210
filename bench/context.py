"""What every part of the bench shares: settings, CPU split, load generators, timings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from bench import util
from bench.loadgen import Generator

ECHO_BODY = b"0123456789" * 10  # 100 bytes, as in the reference numbers


def big_body() -> bytes:
    """About 600 KB of base64 text: what a client posting a photo sends."""
    import base64

    return base64.b64encode(os.urandom(450_000))


@dataclass
class Context:
    quick: bool
    pin: bool
    example: Path
    ssd_wait: float
    prefer_wrk: bool = True
    quiet_wait: float = 0.0
    rounds: int | None = None
    """Interleaved rounds per echo row asked for (``--repeats``); None: the default."""
    results: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cpus = util.Cpus(self.pin)
        # Echo rows: the generator on a core of its own (when there are two).
        self.gen = Generator(self.cpus.client if self.cpus.pinned else None, self.prefer_wrk)
        # SSD rows: everything shares every core (the model uses all of them).
        self.gen_shared = Generator(None, self.prefer_wrk)

    def settle(self) -> None:
        """With ``--wait-quiet``: wait for the machine's other work to calm down."""
        util.wait_quiet(self.quiet_wait)

    # durations (seconds) -------------------------------------------------------------

    @property
    def echo_duration(self) -> float:
        return 2

    @property
    def ssd_duration(self) -> float:
        return 2 if self.quick else 8

    @property
    def warmup(self) -> float:
        return 1

    @property
    def repeats(self) -> int:
        """Interleaved rounds per echo row; the best is reported (see ``echo.best_of``)."""
        if self.rounds:
            return self.rounds
        return 1 if self.quick else 3
