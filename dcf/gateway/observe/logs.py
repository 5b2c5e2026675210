"""Function logs: every replica's output and every lifecycle event, timestamped.

One file per function, rotated at a size so disk use stays bounded; recent
lines are kept in memory for ``tail`` and pushed to followers as they arrive.
A follower that stops reading holds at most ``follow_buffer`` bytes: the lines
after that are dropped, and once it has caught up it is told how many.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

MEMORY_LINES = 2000
MEMORY_BYTES = 1 << 20
"""Recent lines kept per function for ``tail``: this many at most, and this many bytes."""
FOLLOW_BUFFER = 1 << 20


class Follower:
    """One ``follow`` reader's lines, at most ``limit`` bytes of them waiting."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lines: deque[str] = deque()
        self.size = 0
        self.dropped = 0
        self._ready = asyncio.Event()

    def push(self, line: str) -> None:
        # Once dropping, keep dropping until the reader has caught up, so the marker
        # it is shown stands exactly where the gap is.
        if self.dropped or self.size + len(line) > self.limit:
            self.dropped += 1
        else:
            self.lines.append(line)
            self.size += len(line)
        self._ready.set()

    async def next(self) -> str:
        while not self.lines:
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                return (
                    f"[gateway] {dropped} lines dropped: this reader fell more than"
                    f" {self.limit} bytes behind"
                )
            self._ready.clear()
            await self._ready.wait()
        line = self.lines.popleft()
        self.size -= len(line)
        return line


class FunctionLog:
    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.recent: deque[str] = deque(maxlen=MEMORY_LINES)
        self._recent_size = 0
        for line in self._read_existing():
            self._remember(line)
        self.followers: set[Follower] = set()
        self._file: TextIO | None = None
        self._size = path.stat().st_size if path.exists() else 0

    def _read_existing(self) -> list[str]:
        lines: list[str] = []
        for n in range(self.backups, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                lines.extend(older.read_text(errors="replace").splitlines())
        if self.path.exists():
            lines.extend(self.path.read_text(errors="replace").splitlines())
        return lines[-MEMORY_LINES:]

    def _remember(self, line: str) -> None:
        recent = self.recent
        if len(recent) == MEMORY_LINES:
            self._recent_size -= len(recent[0])
        recent.append(line)
        self._recent_size += len(line)
        while self._recent_size > MEMORY_BYTES and len(recent) > 1:
            self._recent_size -= len(recent.popleft())

    def write(self, line: str) -> None:
        self._remember(line)
        for follower in self.followers:
            follower.push(line)
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", buffering=1, errors="replace")
        self._file.write(line + "\n")
        self._size += len(line) + 1
        if self._size > self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        for n in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{n}")
            if src.exists():
                src.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
        if self.backups:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self._size = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class LogStore:
    def __init__(
        self,
        root: Path,
        max_bytes: int = 5 << 20,
        backups: int = 2,
        follow_buffer: int = FOLLOW_BUFFER,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.backups = backups
        self.follow_buffer = follow_buffer
        self._logs: dict[str, FunctionLog] = {}

    def _log(self, function: str) -> FunctionLog:
        log = self._logs.get(function)
        if log is None:
            log = FunctionLog(self.root / f"{function}.log", self.max_bytes, self.backups)
            self._logs[function] = log
        return log

    def write(self, function: str, source: str, message: str) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self._log(function).write(f"{stamp} [{source}] {message}")

    def tail(self, function: str, lines: int = 100) -> list[str]:
        recent = self._log(function).recent
        return list(recent)[-lines:] if lines > 0 else []

    async def follow(self, function: str) -> AsyncIterator[str]:
        follower = Follower(self.follow_buffer)
        log = self._log(function)
        log.followers.add(follower)
        try:
            while True:
                yield await follower.next()
        finally:
            log.followers.discard(follower)

    def remove(self, function: str) -> None:
        log = self._logs.pop(function, None)
        if log is not None:
            log.close()
        for path in self.root.glob(f"{function}.log*"):
            with contextlib.suppress(OSError):
                path.unlink()

    def close(self) -> None:
        for log in self._logs.values():
            log.close()
