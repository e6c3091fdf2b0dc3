"""Payloads that could not become readings, kept on disk so an operator can see what was sent.

Bounded: beyond ``max_rows`` the oldest rows are dropped and counted in ``dropped``. Payloads are
truncated to ``max_payload_bytes``; the original size is kept.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from gateway.common.model import now_ts

SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    source TEXT NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    timestamp: float
    source: str
    topic: str
    reason: str
    detail: str
    size: int  # of the original payload; ``payload`` may be truncated
    payload: bytes


class DeadLetterStore:
    def __init__(
        self, path: str | Path, max_rows: int = 100_000, max_payload_bytes: int = 4096
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.max_rows = max_rows
        self.max_payload_bytes = max_payload_bytes
        self.dropped = 0
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a dead letter is acknowledged to its broker, so it must survive a power cut too.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)

    def add(
        self,
        source: str,
        topic: str,
        reason: str,
        payload: bytes,
        detail: str = "",
        *,
        whole: bool = False,
    ) -> None:
        """Store one rejected payload durably (committed when this returns); ``whole`` keeps it
        untruncated (a committed reading Kafka refused: the store is its only home now)."""
        limit = len(payload) if whole else self.max_payload_bytes
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO dead_letters (ts, source, topic, reason, detail, size, payload)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    now_ts(),
                    source,
                    topic,
                    reason,
                    detail[:500],
                    len(payload),
                    bytes(payload[:limit]),
                ),
            )
            # Only the oldest rows are ever deleted, so ids stay contiguous up to the newest.
            last_id = cur.lastrowid or 0
            if last_id > self.max_rows:
                gone = self._db.execute(
                    "DELETE FROM dead_letters WHERE id <= ?", (last_id - self.max_rows,)
                )
                self.dropped += gone.rowcount

    def list(self, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, ts, source, topic, reason, detail, size, payload FROM dead_letters"
                " ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [DeadLetter(*row) for row in rows]

    def count(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()
        return int(n)

    def close(self) -> None:
        with self._lock:
            self._db.close()
