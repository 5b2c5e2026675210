"""Durable jobs: SQLite rows, and bodies and results as files under ``$DCF_HOME/jobs``.

A job is on disk before the gateway acknowledges it: its body is written and
fsynced, and its row committed with ``synchronous=FULL``, so a crash of the
gateway (or of the machine) after the 202 loses nothing. Nothing here keeps a
body or a result in memory. Every method blocks on the disk: the gateway calls
them on the store's own thread, never on its event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
EXPIRED, LOST = "expired", "lost"
"""Tombstones: the job's files are gone; its row says why, until it is purged too."""
HOLDING = (QUEUED, RUNNING, DONE, FAILED)
"""States that take room in the store (its job count and bytes)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- arrival order: jobs of a function run FIFO
    id TEXT NOT NULL UNIQUE,
    function TEXT NOT NULL,
    generation REAL NOT NULL,     -- created_at of the function it was sent to
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    query TEXT NOT NULL,
    headers TEXT NOT NULL,        -- JSON [[name, value], ...] for the handler
    callback TEXT,                -- X-Callback-Url
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    body_size INTEGER NOT NULL,   -- bytes of its body file, while queued or running
    result_size INTEGER NOT NULL DEFAULT 0,
    status INTEGER,               -- the answer's (done) or the failure's (failed) HTTP status
    result_headers TEXT,          -- JSON, done only
    error TEXT,                   -- why it failed, expired or was lost
    callback_state TEXT,          -- pending, delivered or failed; NULL without a callback
    created_at REAL NOT NULL,
    finished_at REAL,
    expires_at REAL               -- done/failed: result TTL; tombstones: when the row goes
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, function, seq);
CREATE INDEX IF NOT EXISTS jobs_by_expiry ON jobs (expires_at);
"""
_COLUMNS = (
    "id, function, generation, method, path, query, headers, callback, state, attempts,"
    " body_size, result_size, status, result_headers, error, callback_state, created_at,"
    " finished_at, expires_at"
)


@dataclass
class Job:
    id: str
    function: str
    generation: float
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    callback: str | None
    state: str = QUEUED
    attempts: int = 0
    body_size: int = 0
    result_size: int = 0
    status: int | None = None
    result_headers: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    callback_state: str | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    expires_at: float | None = None


class JobIds:
    """Unguessable ids that prove the gateway issued them: 128 random bits and their MAC.

    So a job whose row is gone (expired, lost, purged) still answers 410, and
    only an id this gateway never made answers 404, with no list of old ids kept.
    """

    def __init__(self, key_file: Path) -> None:
        try:
            self._key = key_file.read_bytes()
        except FileNotFoundError:
            self._key = b""
        if len(self._key) != 32:  # new, or cut short by a crash while it was written
            self._key = secrets.token_bytes(32)
            tmp = key_file.with_name(key_file.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(self._key)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, key_file)

    def new(self) -> str:
        nonce = secrets.token_hex(16)
        return nonce + self._mac(nonce)

    def issued(self, job_id: str) -> bool:
        if len(job_id) != 48:
            return False
        nonce, mac = job_id[:32], job_id[32:]
        return hmac.compare_digest(self._mac(nonce), mac)

    def _mac(self, nonce: str) -> str:
        return hmac.new(self._key, nonce.encode(), hashlib.sha256).hexdigest()[:16]


class JobStore:
    def __init__(self, home: Path) -> None:
        self.dir = home / "jobs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)  # bodies and results are the callers' data
        db_path = home / "jobs.db"
        os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT, 0o600))  # its WAL files follow suit
        db_path.chmod(0o600)
        self._db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self.ids = JobIds(home / "jobs.key")

    def close(self) -> None:
        self._db.close()

    # files -----------------------------------------------------------------------

    def body_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.body"

    def result_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.out"

    def _write(self, path: Path, data: bytes) -> None:
        """Whole or not at all: a temporary file, fsynced, renamed into place."""
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _unlink(self, *paths: Path) -> None:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def read_body(self, job_id: str) -> bytes:
        return self.body_path(job_id).read_bytes()

    # the life of a job -------------------------------------------------------------

    def add(self, job: Job, body: bytes) -> None:
        """Persist a new job: its body first, then the row that makes it exist."""
        self._write(self.body_path(job.id), body)
        try:
            self._db.execute(
                f"INSERT INTO jobs ({_COLUMNS}) VALUES ({','.join('?' * 19)})",
                _row(job),
            )
        except sqlite3.Error:
            self._unlink(self.body_path(job.id))
            raise

    def claim(self, wants: dict[str, tuple[float, int]], now: float) -> list[Job]:
        """Mark up to ``n`` due jobs of each function (of its current generation) running."""
        claimed: list[Job] = []
        for name, (generation, n) in wants.items():
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state = ? AND function = ? AND generation = ?"
                " AND not_before <= ? ORDER BY seq LIMIT ?",
                (QUEUED, name, generation, now, n),
            ).fetchall()
            claimed.extend(_job(row) for row in rows)
        if claimed:
            self._db.executemany(
                "UPDATE jobs SET state = ?, attempts = attempts + 1 WHERE id = ?",
                [(RUNNING, job.id) for job in claimed],
            )
            for job in claimed:
                job.state, job.attempts = RUNNING, job.attempts + 1
        return claimed

    def requeue(self, job_id: str, not_before: float, attempt_counts: bool) -> None:
        self._db.execute(
            "UPDATE jobs SET state = ?, not_before = ?, attempts = attempts - ?"
            " WHERE id = ? AND state = ?",
            (QUEUED, not_before, 0 if attempt_counts else 1, job_id, RUNNING),
        )

    def finish(
        self, job: Job, status: int, headers: list[tuple[str, str]], result: bytes, ttl: float
    ) -> None:
        """The answer: its body to a file, then the row says done; the job's body goes."""
        self._write(self.result_path(job.id), result)
        now = time.time()
        job.state, job.status, job.result_headers = DONE, status, headers
        job.result_size, job.body_size = len(result), 0
        job.finished_at, job.expires_at = now, now + ttl
        self._db.execute(
            "UPDATE jobs SET state = ?, status = ?, result_headers = ?, result_size = ?,"
            " body_size = 0, finished_at = ?, expires_at = ? WHERE id = ?",
            (DONE, status, json.dumps(headers), len(result), now, now + ttl, job.id),
        )
        self._unlink(self.body_path(job.id))

    def fail(self, job: Job, status: int, error: str, ttl: float) -> None:
        now = time.time()
        job.state, job.status, job.error, job.body_size = FAILED, status, error, 0
        job.finished_at, job.expires_at = now, now + ttl
        self._db.execute(
            "UPDATE jobs SET state = ?, status = ?, error = ?, body_size = 0, finished_at = ?,"
            " expires_at = ? WHERE id = ?",
            (FAILED, status, error, now, now + ttl, job.id),
        )
        self._unlink(self.body_path(job.id))

    def set_callback_state(self, job_id: str, state: str) -> None:
        self._db.execute("UPDATE jobs SET callback_state = ? WHERE id = ?", (state, job_id))

    def get(self, job_id: str) -> Job | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    # housekeeping ----------------------------------------------------------------------

    def usage(self) -> tuple[int, int]:
        """Jobs that take room in the store, and their bytes on disk."""
        count, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(body_size + result_size), 0) FROM jobs"
            f" WHERE state IN ({','.join('?' * len(HOLDING))})",
            HOLDING,
        ).fetchone()
        return int(count), int(size)

    def recover(self) -> int:
        """At start: jobs that were running when the gateway stopped run again; stray files go."""
        requeued = self._db.execute(
            "UPDATE jobs SET state = ?, not_before = 0 WHERE state = ?", (QUEUED, RUNNING)
        ).rowcount
        keep = {
            row[0]
            for row in self._db.execute(
                f"SELECT id FROM jobs WHERE state IN ({','.join('?' * len(HOLDING))})", HOLDING
            )
        }
        for path in self.dir.iterdir():
            if path.name.split(".", 1)[0] not in keep or path.name.endswith(".tmp"):
                self._unlink(path)
        return requeued

    def queued_functions(self) -> list[tuple[str, float]]:
        return self._db.execute(
            "SELECT DISTINCT function, generation FROM jobs WHERE state = ?", (QUEUED,)
        ).fetchall()

    def lose(self, function: str, generation: float, reason: str, ttl: float) -> tuple[int, int]:
        """Queued jobs of a function that is gone become tombstones; returns (count, bytes)."""
        rows = self._db.execute(
            "SELECT id, body_size FROM jobs WHERE state = ? AND function = ? AND generation = ?",
            (QUEUED, function, generation),
        ).fetchall()
        for job_id, _ in rows:
            self.tombstone(job_id, LOST, reason, ttl)
        return len(rows), sum(size for _, size in rows)

    def tombstone(self, job_id: str, state: str, reason: str, ttl: float) -> None:
        self._db.execute(
            "UPDATE jobs SET state = ?, error = ?, body_size = 0, result_size = 0,"
            " callback_state = NULL, expires_at = ? WHERE id = ?",
            (state, reason, time.time() + ttl, job_id),
        )
        self._unlink(self.body_path(job_id), self.result_path(job_id))

    def expire(self, now: float, ttl: float) -> tuple[int, int]:
        """Results past their TTL go (rows stay a TTL longer as tombstones); returns what
        was freed as (count, bytes)."""
        rows = self._db.execute(
            "SELECT id, result_size FROM jobs WHERE state IN (?, ?) AND expires_at < ?",
            (DONE, FAILED, now),
        ).fetchall()
        for job_id, _ in rows:
            self.tombstone(job_id, EXPIRED, "its result expired", ttl)
        self._db.execute(
            "DELETE FROM jobs WHERE state IN (?, ?) AND expires_at < ?", (EXPIRED, LOST, now)
        )
        return len(rows), sum(size for _, size in rows)

    def earliest_expiry(self) -> float | None:
        row = self._db.execute(
            "SELECT MIN(expires_at) FROM jobs WHERE state IN (?, ?)", (DONE, FAILED)
        ).fetchone()
        return row[0]

    def pending_callbacks(self) -> list[Job]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE callback_state = 'pending' AND state IN (?, ?)",
            (DONE, FAILED),
        ).fetchall()
        return [_job(row) for row in rows]


def _row(job: Job) -> tuple:
    return (
        job.id,
        job.function,
        job.generation,
        job.method,
        job.path,
        job.query,
        json.dumps(job.headers),
        job.callback,
        job.state,
        job.attempts,
        job.body_size,
        job.result_size,
        job.status,
        json.dumps(job.result_headers),
        job.error,
        job.callback_state,
        job.created_at,
        job.finished_at,
        job.expires_at,
    )


def _job(row: tuple) -> Job:
    return Job(
        id=row[0],
        function=row[1],
        generation=row[2],
        method=row[3],
        path=row[4],
        query=row[5],
        headers=[tuple(h) for h in json.loads(row[6])],
        callback=row[7],
        state=row[8],
        attempts=row[9],
        body_size=row[10],
        result_size=row[11],
        status=row[12],
        result_headers=[tuple(h) for h in json.loads(row[13] or "[]")],
        error=row[14],
        callback_state=row[15],
        created_at=row[16],
        finished_at=row[17],
        expires_at=row[18],
    )
