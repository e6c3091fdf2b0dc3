"""The alert state on disk (SQLite, WAL): alarms' lifecycles, operator history, seen ids, outbox.

One transaction per consumer batch (``save``) holds the batch's event ids, the alarms it changed,
the actions taken and every notification decided, one outbox row per channel keyed by the
notification's stable id: ``INSERT OR IGNORE``, so a replayed batch decides nothing twice. The
notifier commits its Kafka offsets only after that transaction. The channel senders take due rows
(``due``) and mark each sent, retried or given up; a row marked sent is never sent again, and a row
not yet marked when the process dies is sent after the restart.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gateway.processor.alerting.routing import Alert, Discipline, Notification, OutOfService

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    alarm_id TEXT PRIMARY KEY, plant_id TEXT NOT NULL, active INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS out_of_service (
    sensor_id TEXT PRIMARY KEY, until REAL NOT NULL, by TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS history (
    n INTEGER PRIMARY KEY AUTOINCREMENT, action TEXT NOT NULL, alarm_id TEXT NOT NULL,
    sensor_id TEXT NOT NULL, by TEXT NOT NULL, at REAL NOT NULL, until REAL, note TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY, channel TEXT NOT NULL, doc TEXT NOT NULL, created REAL NOT NULL,
    next_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, sent_at REAL, failed_at REAL,
    last_error TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (channel, next_at)
    WHERE sent_at IS NULL AND failed_at IS NULL;
"""
_ALERT_FIELDS = [f.name for f in fields(Alert)]


@dataclass(frozen=True)
class Pending:
    """An outbox row a sender is to deliver."""

    id: str
    channel: str
    doc: dict[str, Any]  # Notification.doc()
    attempts: int
    created: float


class StateDb:
    """The SQLite file; one connection shared by the notifier and its senders under a lock."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def load(self, into: Discipline) -> None:
        """The persisted alarms and out-of-service sensors, into a fresh discipline."""
        with self._lock:
            for (doc,) in self._db.execute("SELECT doc FROM alerts"):
                d = json.loads(doc)
                a = Alert(**{k: d[k] for k in _ALERT_FIELDS if k in d})
                into.alerts[a.alarm_id] = a
            for sensor, until, by, at in self._db.execute("SELECT * FROM out_of_service"):
                into.out_of_service[sensor] = OutOfService(sensor, until, by, at)

    def unseen(self, ids: Iterable[str]) -> set[str]:
        """Those of ``ids`` (event or action ids) not saved before."""
        wanted = set(ids)
        with self._lock:
            seen = {
                i
                for (i,) in self._db.execute(
                    f"SELECT id FROM seen WHERE id IN ({','.join('?' * len(wanted))})",
                    list(wanted),
                )
            }
        return wanted - seen

    def save(
        self, d: Discipline, ids: Iterable[str], notes: Iterable[Notification], now: float
    ) -> int:
        """One transaction: seen ids, changed alarms, history, out of service, outbox rows;
        the number of outbox rows that are new."""
        added = 0
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?)", [(i, now) for i in ids])
                for alarm_id in d.changed:
                    a = d.alerts[alarm_id]
                    db.execute(
                        "INSERT OR REPLACE INTO alerts VALUES (?, ?, ?, ?)",
                        (a.alarm_id, a.plant_id, int(a.active), json.dumps(a.to_dict())),
                    )
                for h in d.history:
                    db.execute(
                        "INSERT INTO history (action, alarm_id, sensor_id, by, at, until, note)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (h["action"], h["alarmId"], h["sensorId"], h["by"], h["at"],
                         h["until"], h["note"]),
                    )  # fmt: skip
                for o in d.out_of_service.values():
                    db.execute(
                        "INSERT OR REPLACE INTO out_of_service VALUES (?, ?, ?, ?)",
                        (o.sensor_id, o.until, o.by, o.at),
                    )
                for n in notes:
                    doc = json.dumps(n.doc())
                    for ch in n.channels:
                        cur = db.execute(
                            "INSERT OR IGNORE INTO outbox (id, channel, doc, created, next_at)"
                            " VALUES (?, ?, ?, ?, ?)",
                            (f"{n.id}|{ch}", ch, doc, now, now),
                        )
                        added += cur.rowcount
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        d.changed.clear()
        d.history.clear()
        return added

    # -- senders ---------------------------------------------------------------------------------

    def due(self, channel: str, now: float, limit: int = 10) -> list[Pending]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, channel, doc, attempts, created FROM outbox WHERE channel = ?"
                " AND sent_at IS NULL AND failed_at IS NULL AND next_at <= ?"
                " ORDER BY created, id LIMIT ?",
                (channel, now, limit),
            ).fetchall()
        return [Pending(i, ch, json.loads(doc), n, c) for i, ch, doc, n, c in rows]

    def sent(self, row_id: str, now: float) -> None:
        sql = "UPDATE outbox SET sent_at = ?, attempts = attempts + 1 WHERE id = ?"
        self._set(sql, now, row_id)

    def retry(self, row_id: str, next_at: float, error: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET next_at = ?, attempts = attempts + 1, last_error = ?"
                " WHERE id = ?",
                (next_at, error[:500], row_id),
            )

    def give_up(self, row_id: str, now: float) -> None:
        self._set("UPDATE outbox SET failed_at = ? WHERE id = ?", now, row_id)

    def _set(self, sql: str, value: float, row_id: str) -> None:
        with self._lock:
            self._db.execute(sql, (value, row_id))

    def backlog(self) -> dict[str, tuple[int, float | None]]:
        """Per channel: unsent rows and the oldest one's creation time."""
        with self._lock:
            rows = self._db.execute(
                "SELECT channel, COUNT(*), MIN(created) FROM outbox"
                " WHERE sent_at IS NULL AND failed_at IS NULL GROUP BY channel"
            ).fetchall()
        return {ch: (n, oldest) for ch, n, oldest in rows}

    def history(self, limit: int = 200) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT action, alarm_id, sensor_id, by, at, until, note FROM history"
                " ORDER BY n DESC LIMIT ?",
                (limit,),
            ).fetchall()
        keys = ("action", "alarmId", "sensorId", "by", "at", "until", "note")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def outbox(self) -> list[dict[str, Any]]:
        """Every outbox row (for tests and diagnosis), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, channel, attempts, sent_at, failed_at, last_error FROM outbox"
                " ORDER BY created, id"
            ).fetchall()
        keys = ("id", "channel", "attempts", "sentAt", "failedAt", "lastError")
        return [dict(zip(keys, r, strict=True)) for r in rows]
