"""Desired state that survives a gateway restart, in SQLite.

Only the control plane touches it; invocation counts are kept in memory on the
hot path and flushed here now and then.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,          -- the version that serves calls (0: none yet)
    spec TEXT NOT NULL,                -- FunctionSpec of that version, as JSON
    min_replicas INTEGER NOT NULL,     -- bounds, changed by create/update or by scale
    max_replicas INTEGER NOT NULL,
    failure TEXT,                      -- why it is Failed, if it is
    invocations INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    spec TEXT NOT NULL,
    code_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS version_numbers (
    name TEXT PRIMARY KEY,             -- the last version number given, trimmed or not,
    last INTEGER NOT NULL              -- so a number never names two uploads
);
CREATE TABLE IF NOT EXISTS rollouts (
    name TEXT PRIMARY KEY,             -- one rollout per function at a time
    stable INTEGER NOT NULL,           -- the version serving the rest of the calls
    canary INTEGER NOT NULL,           -- the version being rolled out
    plan TEXT NOT NULL,                -- config.Rollout as JSON
    step INTEGER NOT NULL,             -- index into the plan's steps
    started_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS function_keys (
    id TEXT PRIMARY KEY,               -- public: shown by list, named by revoke
    function TEXT NOT NULL,
    digest TEXT NOT NULL UNIQUE,       -- SHA-256 of the key, hex; the key itself is never kept
    rate TEXT,                         -- per-key rate limit as given ("5/s"), NULL for none
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


@dataclass
class FunctionRecord:
    name: str
    version: int
    spec: dict
    min_replicas: int
    max_replicas: int
    failure: str | None
    invocations: int
    created_at: float
    updated_at: float


class Registry:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _private(path)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        for side in ("-wal", "-shm"):  # made by SQLite with the database's mode; older ones not
            if Path(f"{path}{side}").exists():
                _private(Path(f"{path}{side}"))

    def close(self) -> None:
        self._db.close()

    def get(self, name: str) -> FunctionRecord | None:
        row = self._db.execute(
            "SELECT name, version, spec, min_replicas, max_replicas, failure, invocations,"
            " created_at, updated_at FROM functions WHERE name = ?",
            (name,),
        ).fetchone()
        return _record(row) if row else None

    def all(self) -> list[FunctionRecord]:
        rows = self._db.execute(
            "SELECT name, version, spec, min_replicas, max_replicas, failure, invocations,"
            " created_at, updated_at FROM functions ORDER BY name"
        ).fetchall()
        return [_record(row) for row in rows]

    def next_version(self, name: str) -> int:
        row = self._db.execute(
            "SELECT MAX(COALESCE((SELECT MAX(version) FROM versions WHERE name = ?), 0),"
            " COALESCE((SELECT last FROM version_numbers WHERE name = ?), 0))",
            (name, name),
        ).fetchone()
        return int(row[0]) + 1

    def add_version(self, name: str, version: int, spec: dict, code_hash: str) -> None:
        self._db.execute(
            "INSERT INTO versions (name, version, spec, code_hash, created_at) VALUES (?,?,?,?,?)",
            (name, version, json.dumps(spec), code_hash, time.time()),
        )
        self._db.execute(
            "INSERT INTO version_numbers (name, last) VALUES (?, ?) ON CONFLICT(name)"
            " DO UPDATE SET last = MAX(last, excluded.last)",
            (name, version),
        )

    def versions(self, name: str) -> list[dict]:
        """The kept versions of ``name``, newest first."""
        rows = self._db.execute(
            "SELECT version, spec, code_hash, created_at FROM versions WHERE name = ?"
            " ORDER BY version DESC",
            (name,),
        ).fetchall()
        fields = ("version", "spec", "code_hash", "created_at")
        out = [dict(zip(fields, row, strict=True)) for row in rows]
        for item in out:
            item["spec"] = json.loads(item["spec"])
        return out

    def delete_version(self, name: str, version: int) -> None:
        self._db.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, version))

    def rollout(self, name: str) -> dict | None:
        row = self._db.execute(
            "SELECT stable, canary, plan, step, started_at FROM rollouts WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            return None
        return {
            "stable": row[0],
            "canary": row[1],
            "plan": json.loads(row[2]),
            "step": row[3],
            "started_at": row[4],
        }

    def save_rollout(self, name: str, stable: int, canary: int, plan: dict, step: int) -> None:
        self._db.execute(
            "INSERT INTO rollouts (name, stable, canary, plan, step, started_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET stable = excluded.stable,"
            " canary = excluded.canary, plan = excluded.plan, step = excluded.step",
            (name, stable, canary, json.dumps(plan), step, time.time()),
        )

    def end_rollout(self, name: str) -> None:
        self._db.execute("DELETE FROM rollouts WHERE name = ?", (name,))

    def insert(self, name: str, spec: dict, min_replicas: int, max_replicas: int) -> None:
        now = time.time()
        self._db.execute(
            "INSERT INTO functions (name, version, spec, min_replicas, max_replicas,"
            " created_at, updated_at) VALUES (?, 0, ?, ?, ?, ?, ?)",
            (name, json.dumps(spec), min_replicas, max_replicas, now, now),
        )

    def set_live(self, name: str, version: int, spec: dict, min_r: int, max_r: int) -> None:
        self._db.execute(
            "UPDATE functions SET version = ?, spec = ?, min_replicas = ?, max_replicas = ?,"
            " failure = NULL, updated_at = ? WHERE name = ?",
            (version, json.dumps(spec), min_r, max_r, time.time(), name),
        )

    def set_failure(self, name: str, failure: str | None) -> None:
        self._db.execute(
            "UPDATE functions SET failure = ?, updated_at = ? WHERE name = ?",
            (failure, time.time(), name),
        )

    def set_bounds(self, name: str, min_r: int, max_r: int) -> None:
        self._db.execute(
            "UPDATE functions SET min_replicas = ?, max_replicas = ?, updated_at = ?"
            " WHERE name = ?",
            (min_r, max_r, time.time(), name),
        )

    def set_invocations(self, counts: dict[str, int]) -> None:
        self._db.executemany(
            "UPDATE functions SET invocations = ? WHERE name = ?",
            [(n, name) for name, n in counts.items()],
        )

    def delete(self, name: str) -> None:
        self._db.execute("DELETE FROM functions WHERE name = ?", (name,))
        self._db.execute("DELETE FROM versions WHERE name = ?", (name,))
        self._db.execute("DELETE FROM rollouts WHERE name = ?", (name,))
        self._db.execute("DELETE FROM version_numbers WHERE name = ?", (name,))
        self._db.execute("DELETE FROM function_keys WHERE function = ?", (name,))

    # function keys (dcf.gateway.security.keys) ---------------------------------------------

    def function_keys(self) -> list[dict]:
        rows = self._db.execute(
            "SELECT id, function, digest, rate, created_at, revoked_at FROM function_keys"
            " ORDER BY created_at"
        ).fetchall()
        fields = ("id", "function", "digest", "rate", "created_at", "revoked_at")
        return [dict(zip(fields, row, strict=True)) for row in rows]

    def add_key(
        self, key_id: str, function: str, digest: str, rate: str | None, created_at: float
    ) -> None:
        self._db.execute(
            "INSERT INTO function_keys (id, function, digest, rate, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (key_id, function, digest, rate, created_at),
        )

    def revoke_key(self, key_id: str, revoked_at: float) -> None:
        self._db.execute(
            "UPDATE function_keys SET revoked_at = ? WHERE id = ?", (revoked_at, key_id)
        )


def _private(path: Path) -> None:
    """Create ``path`` readable by its owner only (0600), or make it so.

    The registry holds every function's ``environment``, secrets included.
    """
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)


def _record(row: tuple) -> FunctionRecord:
    return FunctionRecord(
        name=row[0],
        version=row[1],
        spec=json.loads(row[2]),
        min_replicas=row[3],
        max_replicas=row[4],
        failure=row[5],
        invocations=row[6],
        created_at=row[7],
        updated_at=row[8],
    )
