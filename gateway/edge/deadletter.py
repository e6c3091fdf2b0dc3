"""Payloads that could not become readings, and buffer rows Kafka refused for good, kept on disk so
an operator can see what was sent and why.

Bounded: beyond ``max_rows`` the oldest rows are dropped and counted in ``dropped``. Intake
payloads are truncated to ``max_payload_bytes`` (the original size is kept); a row Kafka refused is
kept whole, since the store is its only home.

Group commit: ``submit`` only queues (paho's network thread must not wait for an fsync per
message); one writer thread commits whatever has queued in one transaction, then runs each
``on_durable``. A source acknowledges a rejected message from that callback, never before.
``add`` is ``submit`` and wait.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.common.logs import RateLimitedLog
from gateway.common.model import now_ts
from gateway.common.stage import SinkClosed

log = logging.getLogger(__name__)

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
RETRY_MAX_S = 5.0


class DeadLetterStoreClosed(SinkClosed):
    pass


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


_Row = tuple[float, str, str, str, str, int, bytes]
_Item = tuple[_Row, Callable[[], object] | None]


class DeadLetterStore:
    def __init__(
        self, path: str | Path, max_rows: int = 100_000, max_payload_bytes: int = 4096
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_payload_bytes = max_payload_bytes
        self.dropped = 0
        self.commits = 0  # transactions committed, for tests and diagnostics
        self._lock = threading.Lock()  # the connection
        self._queue_lock = threading.Lock()
        self._has_work = threading.Condition(self._queue_lock)
        self._queue: deque[_Item] = deque()
        self._closing = False
        self._log = RateLimitedLog(log, 30.0)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a dead letter is acknowledged to its broker, so it must survive a power cut too.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)
        self._writer = threading.Thread(target=self._run, name="deadletter-writer", daemon=True)
        self._writer.start()

    def submit(
        self,
        source: str,
        topic: str,
        reason: str,
        payload: bytes,
        detail: str = "",
        *,
        whole: bool = False,
        on_durable: Callable[[], object] | None = None,
    ) -> None:
        """Queue one rejected payload; ``on_durable`` runs in the writer once it is committed.
        ``whole`` keeps the payload untruncated."""
        limit = len(payload) if whole else self.max_payload_bytes
        row = (now_ts(), source, topic, reason, detail[:500], len(payload), bytes(payload[:limit]))
        with self._queue_lock:
            if self._closing:
                raise DeadLetterStoreClosed("the dead-letter store is closed")
            self._queue.append((row, on_durable))
            self._has_work.notify()

    def add(
        self,
        source: str,
        topic: str,
        reason: str,
        payload: bytes,
        detail: str = "",
        *,
        whole: bool = False,
        timeout: float = 30.0,
    ) -> None:
        """Store one rejected payload durably: committed when this returns (TimeoutError if that
        takes longer than ``timeout``)."""
        done = threading.Event()
        self.submit(source, topic, reason, payload, detail, whole=whole, on_durable=done.set)
        if not done.wait(timeout):
            raise TimeoutError(f"dead letter not committed within {timeout} s")

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

    def close(self, timeout: float = 10.0) -> None:
        """Commit what was handed in (giving up after ``timeout`` if the disk refuses), close."""
        with self._queue_lock:
            self._closing = True
            self._has_work.notify()
        self._writer.join(timeout)
        if self._writer.is_alive():
            log.error("dead-letter store %s: its writer did not finish in time", self.path)
            return
        with self._lock:
            self._db.close()

    # -- writer thread -------------------------------------------------------------------------

    def _run(self) -> None:
        failures, deadline = 0, None
        while True:
            with self._queue_lock:
                self._has_work.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
                if self._closing and deadline is None:
                    deadline = time.monotonic() + 10.0
            try:
                self._commit([row for row, _ in batch])
            except sqlite3.Error as e:
                failures += 1
                with self._queue_lock:
                    self._queue.extendleft(reversed(batch))
                if deadline is not None and time.monotonic() > deadline:
                    log.error(
                        "dead-letter store %s: closing with %d entries not committed (%s); their "
                        "messages were not acknowledged and come again",
                        self.path,
                        len(batch),
                        e,
                    )
                    return
                wait = min(0.1 * 2**failures, RETRY_MAX_S)
                self._log.error(
                    "commit", "dead-letter store %s: commit failed (%s); retrying", self.path, e
                )
                time.sleep(wait)
                continue
            failures = 0
            for _, on_durable in batch:
                if on_durable is not None:
                    try:
                        on_durable()
                    except Exception:
                        log.exception("dead-letter on_durable callback failed")

    def _commit(self, rows: Sequence[_Row]) -> None:
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "INSERT INTO dead_letters (ts, source, topic, reason, detail, size, payload)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                # Only the oldest rows are ever deleted, so ids stay contiguous up to the newest.
                (last_id,) = db.execute("SELECT coalesce(max(id), 0) FROM dead_letters").fetchone()
                gone = 0
                if last_id > self.max_rows:
                    gone = db.execute(
                        "DELETE FROM dead_letters WHERE id <= ?", (last_id - self.max_rows,)
                    ).rowcount
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.rollback()
                raise
            self.dropped += gone
            self.commits += 1
