"""Durable disk buffer between the sources and the forwarder: SQLite in WAL mode, group commit.

A record counts as received once the transaction holding it is committed. One writer thread owns
every write (inserts, the forwarder's deletes, overflow drops), so there is never lock contention
between writers; it commits whatever has queued up at most every ``commit_interval_ms`` and then
calls the submitters' ``on_durable`` callbacks. Readers (the forwarder) use their own connection.

Failures never wedge the writer: a transaction that fails (disk full, I/O error) is rolled back,
its records go back to the head of the queue (not acknowledged), and it is tried again after a
back-off while deletes and ``stop()`` still get through; /health says so meanwhile. A file found
corrupt, at start or at run time, is moved aside; the rows a read-only pass can still read from it
are salvaged into the new file, with their ids (so their seq) unchanged.

The bounds count what the files take on disk: database pages in use plus the WAL, and the buffer
leaves ``min_free_bytes`` of the disk free. New files use incremental vacuum, so the file shrinks
after a drain.

Receipts (``model.Receipt``) handed in with records are committed in the same transaction into
their own table, never forwarded: a source asks ``recall`` whether a delivery that comes again
was already committed (or is queued), and says with ``forget`` when its sender will no longer
deliver one again. They expire after the sender's redelivery horizon (``keep_s``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal, NamedTuple

from gateway.common.logs import RateLimitedLog
from gateway.common.metrics import Metrics
from gateway.common.model import AlarmEvent, Reading, Receipt, Record
from gateway.common.stage import Health, OnDurable, Recall, SinkClosed, submit_and_wait
from gateway.common.supervise import Heartbeat

log = logging.getLogger(__name__)

ROW_OVERHEAD = 64  # bytes per row besides the payload (key, plant, id, index entry), roughly
RETRY_MIN_S, RETRY_MAX_S = 0.1, 5.0  # back-off between attempts at a failing transaction
VACUUM_PAGES = 2048  # pages released per incremental_vacuum step (8 MB at 4 KiB pages)
CONVERT_MAX_BYTES = 64 * 1024 * 1024  # an older file this small is converted to incremental vacuum

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,                -- the record's seq: never reused, even across restarts
    kind TEXT NOT NULL,                    -- 'reading' or 'alarm'
    plant_id TEXT NOT NULL,
    key TEXT NOT NULL,                     -- sensor id, the Kafka key
    payload BLOB NOT NULL,                 -- the record's wire JSON, gatewayId and seq filled
    created REAL NOT NULL                  -- commit time, epoch seconds
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS receipts (
    source TEXT NOT NULL,                  -- e.g. 'mqtt:<client id>', 'http'
    key TEXT NOT NULL,                     -- e.g. the MQTT packet id
    fingerprint BLOB NOT NULL,             -- tells a redelivery from another delivery of that key
    committed REAL NOT NULL,               -- commit time, epoch seconds
    expires REAL NOT NULL,                 -- after this its sender delivers it no more
    PRIMARY KEY (source, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS receipts_expires ON receipts (expires);
"""
PRUNE_INTERVAL_S = 60.0  # how often expired receipts are deleted
# Forgets per transaction. An MQTT ack barrier confirms a second's acks at once (5,000 receipts
# at 5,000 messages/s, 20 ms of deletes); carried over in slices, they delay no commit by much.
MAX_FORGETS = 256


@dataclass
class BufferConfig:
    """TOML ``[buffer]``."""

    path: str = "var/buffer.db"
    max_rows: int = 5_000_000
    max_bytes: int = 2_000_000_000  # on disk: database pages in use + WAL; may overshoot by a batch
    min_free_bytes: int = 64 * 1024 * 1024  # disk the buffer leaves free: the bound shrinks to it
    overflow: Literal["block", "drop_oldest"] = "block"
    commit_interval_ms: float = 2.0  # the fsync rate bound (500/s) against the wait to a 202/ack
    max_batch: int = 5000  # records per transaction
    queue_max: int = 20000  # records waiting in memory before submit() blocks

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_bytes", "max_batch", "queue_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 <= self.commit_interval_ms <= 1000:
            raise ValueError("commit_interval_ms must be between 0 and 1000")
        if self.min_free_bytes < 0:
            raise ValueError("min_free_bytes must be at least 0")

    @property
    def wal_limit(self) -> int:
        """Bytes the WAL is truncated to after a checkpoint (and beyond which it is truncated)."""
        return min(64 * 1024 * 1024, max(64 * 1024, self.max_bytes // 16))


class Row(NamedTuple):
    id: int
    kind: str  # 'reading' or 'alarm'
    plant_id: str
    key: str
    payload: bytes
    created: float


_plant_of, _payload_of = itemgetter(2), itemgetter(4)  # of a records row


def _size_of(rows: list[tuple[int, str, str, str, bytes, float]]) -> int:
    """What ``rows`` count against max_bytes (summed in C: it runs for every committed row)."""
    return sum(map(len, map(_payload_of, rows))) + ROW_OVERHEAD * len(rows)


class BufferClosed(SinkClosed):
    pass


class _Corrupt(Exception):
    pass


@dataclass(slots=True)
class _Submission:
    records: list[Reading | AlarmEvent]
    on_durable: Callable[[], object] | None
    queued_at: float
    receipts: list[Receipt] = field(default_factory=list)
    # Callbacks of redeliveries recognised while this was queued: run once it is committed.
    waiters: list[OnDurable] = field(default_factory=list)


@dataclass(slots=True)
class _Drop:
    """What drop_oldest did in a transaction, applied only once it is committed."""

    n: int  # readings dropped
    bytes: int
    change: Literal["raised", "cleared"] | None  # the overflow alarm's new state, if it changed
    alarm: AlarmEvent | None


_Delete = tuple[list[int], threading.Event | None]
# forget: (receipt, acked at); forget_older: (source, before, keys kept)
_Forget = tuple[Receipt, float] | tuple[str, float, Collection[str]]
_Work = tuple[list[_Submission], list[_Delete], list[_Forget]]


class Buffer:
    def __init__(self, config: BufferConfig, gateway_id: str, metrics: Metrics) -> None:
        self.config = config
        self.gateway_id = gateway_id
        self.metrics = metrics
        self.path = Path(config.path)
        self.commits = 0  # transactions committed, for tests and diagnostics
        self.last_id = 0  # highest committed row id
        self.generation = 0  # grows when a corrupt file is replaced: row ids may repeat below it
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)
        self._has_room = threading.Condition(self._lock)
        self._committed = threading.Condition(self._lock)
        self._inserts: deque[_Submission] = deque()
        self._queued = 0
        self._deletes: list[_Delete] = []
        self._forgets: list[_Forget] = []
        self._pending: dict[tuple[str, str], _Submission] = {}  # queued receipts by (source, key)
        self._pruned = 0.0
        self._closing = False  # stop(): the writer ends once the queue is committed
        self._intake_closed = False  # close_intake(): no more records, the queue goes in now
        self._deadline = float("inf")  # when stopping: give up on failing commits after this
        self._writer: threading.Thread | None = None
        self._writer_beat = Heartbeat("buffer writer")
        self._maintainer_beat = Heartbeat("buffer maintenance")
        self._read_lock = threading.Lock()
        self._files_lock = threading.Lock()  # held while the files are replaced
        self._maint_con: sqlite3.Connection | None = None
        self._plants: Counter[str] = Counter()
        self._rows = 0
        self._bytes = 0
        self._seq = 0
        self._dropping = False
        self._blocked = False
        self._error = ""
        self._corrupt: sqlite3.Error | None = None  # met by a reader; the writer replaces the file
        self._failures = 0  # consecutive failed transactions
        self._failing_since = 0.0
        self._retry_at = 0.0
        self._last_commit = 0.0
        self._last_vacuum = 0.0
        self._page_size = 4096
        self._incremental = False
        self._disk_db = 0  # bytes of database pages in use
        self._disk_wal = 0  # bytes of the WAL file
        self._free_pages = 0
        self._free_disk = 0  # bytes free on the buffer's filesystem
        self._limit = config.max_bytes  # the byte bound now: max_bytes, or less when disk is short
        self._log = RateLimitedLog(log, 30.0)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lockfile = open(f"{self.path}.lock", "w")  # noqa: SIM115 (held until stop)
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise RuntimeError(f"buffer {self.path} is in use by another process") from None
        try:
            self._con = self._open()
            self._reader = self._connect(read_only=True)
            self._load_state()
        except BaseException:  # leave nothing held: the lock would refuse the next start
            _close_quietly(getattr(self, "_con", None), getattr(self, "_reader", None))
            self._lockfile.close()
            raise
        self._stopped = threading.Event()
        self._writer = threading.Thread(target=self._run, name="buffer-writer", daemon=True)
        self._writer.start()
        self._maintainer = threading.Thread(
            target=self._maintain, name="buffer-maintenance", daemon=True
        )
        self._maintainer.start()
        self._writer_beat.watch(self._writer)
        self._maintainer_beat.watch(self._maintainer)

    def stop(self, timeout: float = 10.0) -> None:
        """Commit everything queued (beyond the bound if need be: it is only in memory), close.

        Bounded: if the disk refuses commits for ``timeout`` seconds, what is still queued is
        given up (it was never acknowledged to its source) and logged; committed rows are safe.
        """
        with self._lock:
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._has_work.notify_all()
            self._has_room.notify_all()
        writer = self._writer
        if writer is None:
            return
        writer.join(timeout + 5.0)
        self._writer = None
        self._stopped.set()
        self._maintainer.join(5.0)
        if writer.is_alive():  # stuck in the kernel (a dead disk): leave it its files
            log.error("buffer %s: the writer did not finish within %.0f s", self.path, timeout)
            return
        with self._files_lock:
            _close_quietly(self._maint_con, self._reader, self._con)
            self._maint_con = None
        self._lockfile.close()

    def close_intake(self) -> None:
        """Take no more records: blocked and later ``submit`` calls raise BufferClosed, and what
        is queued is committed at once, beyond the bound if need be (it is only in memory). The
        first step of a shutdown, so no source stays blocked in ``submit``."""
        with self._lock:
            self._intake_closed = True
            self._has_work.notify_all()
            self._has_room.notify_all()

    def __enter__(self) -> Buffer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _connect(self, read_only: bool = False) -> sqlite3.Connection:
        new = _size(str(self.path)) == 0
        con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if read_only:
            con.execute("PRAGMA query_only = ON")
            return con
        if new:  # only a new file takes it (and an existing one, corrupt maybe, is not written)
            con.execute("PRAGMA auto_vacuum = INCREMENTAL")
        con.execute("PRAGMA journal_mode = WAL")
        # In WAL mode, NORMAL only syncs the WAL at checkpoints: a committed transaction survives
        # a process crash but can vanish in a power cut. FULL fsyncs the WAL on every commit, so a
        # reading reported durable survives the power cut too; group commit keeps that affordable.
        con.execute("PRAGMA synchronous = FULL")
        con.execute(f"PRAGMA journal_size_limit = {self.config.wal_limit}")
        # Checkpoints copy the WAL into the database and fsync it, which takes tens of ms: the
        # maintenance thread runs them, so they never delay a commit (and an on_durable).
        con.execute("PRAGMA wal_autocheckpoint = 0")
        return con

    def _open(self) -> sqlite3.Connection:
        try:
            return self._open_checked()
        except (sqlite3.DatabaseError, _Corrupt) as e:
            if not (isinstance(e, _Corrupt) or _is_corrupt(e)):
                raise
            return self._replace_corrupt(e, "at start")

    def _open_checked(self) -> sqlite3.Connection:
        con = self._connect()
        try:
            result = [r[0] for r in con.execute("PRAGMA quick_check")]
            if result != ["ok"]:
                raise _Corrupt("; ".join(result[:3]))
            con.executescript(SCHEMA)
            self._convert_vacuum(con)
            self._page_size = con.execute("PRAGMA page_size").fetchone()[0]
        except BaseException:
            con.close()
            raise
        return con

    def _convert_vacuum(self, con: sqlite3.Connection) -> None:
        """Files made before incremental vacuum never shrink: convert one while it is small (a
        VACUUM rewrites the file), otherwise say so; freed pages are reused either way."""
        self._incremental = con.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        if self._incremental:
            return
        size = self.path.stat().st_size
        if size > CONVERT_MAX_BYTES:
            log.warning(
                "buffer %s (%d MB) predates incremental vacuum: space freed by forwarded rows is "
                "reused but the file does not shrink; it is converted at a start when it holds "
                "at most %d MB",
                self.path,
                size >> 20,
                CONVERT_MAX_BYTES >> 20,
            )
            return
        try:
            con.execute("PRAGMA auto_vacuum = INCREMENTAL")
            con.execute("VACUUM")
        except sqlite3.Error as e:
            log.warning("buffer %s: cannot convert it to incremental vacuum (%s)", self.path, e)
            return
        self._incremental = con.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        log.info("buffer %s converted to incremental vacuum: it shrinks after a drain", self.path)

    def _load_state(self) -> None:
        con = self._con
        self._plants.clear()
        self._rows = self._bytes = 0
        for plant, n, size in con.execute(
            "SELECT plant_id, count(*), sum(length(payload)) FROM records GROUP BY plant_id"
        ):
            self._plants[plant] = n
            self._rows += n
            self._bytes += size + n * ROW_OVERHEAD
        last_id = con.execute("SELECT coalesce(max(id), 0) FROM records").fetchone()[0]
        row = con.execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()
        if row is None:
            # A new file (first start, or the old one was corrupt and moved aside) starts seq at
            # the clock in microseconds: far above any earlier seq of this gateway (which grows by
            # far less than a million a second), so downstream de-duplication by (gatewayId, seq)
            # never mistakes new readings for old ones.
            self._seq = max(int(time.time() * 1_000_000), self._seq, last_id)
            con.execute("INSERT INTO meta VALUES ('seq', ?)", (self._seq,))
        else:
            self._seq = row[0]
        with self._lock:
            self.last_id = last_id
        self._gauged: set[str] = set()
        self._measure()
        self._refresh_gauges(con)

    # -- producer side -----------------------------------------------------------------------

    def submit(
        self,
        records: Iterable[Record],
        on_durable: OnDurable | None = None,
        timeout: float | None = None,
    ) -> None:
        """Queue records for the next commit; ``on_durable`` runs in the writer after it.

        Blocks while the in-memory queue is full (back-pressure); raises TimeoutError after
        ``timeout`` seconds of that, BufferClosed once the buffer is stopping. The records are
        given away: the writer fills gateway_id/seq.
        """
        sub = _Submission([], on_durable, time.monotonic())
        for r in records:
            if isinstance(r, Reading | AlarmEvent):
                sub.records.append(r)
            elif isinstance(r, Receipt):
                sub.receipts.append(r)
            else:
                raise TypeError(f"the buffer stores readings, alarm events and receipts, not {r!r}")
        deadline = None if timeout is None else sub.queued_at + timeout
        with self._lock:
            while self._queued >= self.config.queue_max and not self._stopping():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("buffer queue full")
                self._has_room.wait(left)
            if self._stopping():
                raise BufferClosed("buffer is stopping")
            for receipt in sub.receipts:
                self._pending[receipt.source, receipt.key] = sub
            self._inserts.append(sub)
            self._queued += len(sub.records)
            self._has_work.notify()

    def _stopping(self) -> bool:
        return self._closing or self._intake_closed

    def submit_wait(self, records: Iterable[Record], timeout: float) -> None:
        """Submit and return once committed; TimeoutError if not durable within ``timeout``."""
        submit_and_wait(self.submit, list(records), timeout)

    # -- consumer side -----------------------------------------------------------------------

    def fetch(self, limit: int, after_id: int = 0) -> list[Row]:
        """Up to ``limit`` committed rows with id > ``after_id``, oldest first.

        Raises sqlite3.Error if the file cannot be read; if it is corrupt, the writer replaces it
        (the caller tries again later; ``generation`` then changes)."""
        with self._read_lock:
            try:
                cur = self._reader.execute(
                    "SELECT id, kind, plant_id, key, payload, created FROM records"
                    " WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, limit),
                )
                return list(map(Row._make, cur))
            except sqlite3.Error as e:
                if _is_corrupt(e):
                    self._flag_corrupt(e)
                raise

    def delete(self, ids: Iterable[int], *, wait: bool = False, timeout: float = 30.0) -> None:
        """Delete rows by id in the writer's next transaction.

        With ``wait``, return once that is committed, together with every delete queued before
        (so ``delete([], wait=True)`` is a barrier for earlier deletes).
        """
        batch = list(ids)
        if not batch and not wait:
            return
        done = threading.Event() if wait else None
        with self._lock:
            if self._closing and self._writer is None:
                raise BufferClosed("buffer is stopped")
            self._deletes.append((batch, done))
            self._has_work.notify()
        if done is not None and not done.wait(timeout):
            raise TimeoutError(f"delete not committed within {timeout} s")

    # -- receipts ------------------------------------------------------------------------------

    def recall(self, receipt: Receipt, on_durable: OnDurable) -> Recall:
        """Whether a delivery with ``receipt``'s source and key is committed or queued, and if it
        is the same one (fingerprint), run ``on_durable`` once it is durable (see stage.Receipts).
        """
        key = (receipt.source, receipt.key)
        with self._lock:
            sub = self._pending.get(key)
            if sub is not None:
                queued = next(r for r in sub.receipts if (r.source, r.key) == key)
                if queued.fingerprint != receipt.fingerprint:
                    return Recall.OTHER
                sub.waiters.append(on_durable)
                return Recall.SAME
        # Not queued: committed already (the writer drops _pending entries only after the
        # commit), or never taken.
        with self._read_lock:
            row = self._reader.execute(
                "SELECT fingerprint FROM receipts WHERE source = ? AND key = ? AND expires >= ?",
                (*key, time.time()),
            ).fetchone()
        if row is None:
            return Recall.NEW
        if bytes(row[0]) != receipt.fingerprint:
            return Recall.OTHER
        on_durable()
        return Recall.SAME

    def forget(self, receipts: Sequence[tuple[Receipt, float]]) -> None:
        """Drop receipts in the writer's next transaction (see stage.Receipts)."""
        self._queue_forgets(list(receipts))

    def forget_older(self, source: str, before: float, keep: Collection[str]) -> None:
        self._queue_forgets([(source, before, frozenset(keep))])

    def _queue_forgets(self, forgets: list[_Forget]) -> None:
        if not forgets:
            return
        with self._lock:
            if self._closing and self._writer is None:
                return  # stopped: they expire instead
            self._forgets.extend(forgets)
            self._has_work.notify()

    def wait_for_rows(self, after_id: int, timeout: float) -> bool:
        """Block until a row with id > ``after_id`` is committed (True) or ``timeout`` passes."""
        with self._lock:
            return self._committed.wait_for(lambda: self.last_id > after_id, timeout)

    def heartbeats(self) -> list[Heartbeat]:
        return [self._writer_beat, self._maintainer_beat]

    def stats(self) -> dict[str, Any]:
        return {"rows": self._rows, "bytes": self._bytes, "queued": self._queued}

    def health(self) -> Health:
        detail = {
            **self.stats(),
            "disk_bytes": self._disk_db + self._disk_wal,
            "free_disk_bytes": self._free_disk,
        }
        if self._writer is None or not self._writer.is_alive() or not self._maintainer.is_alive():
            return False, {**detail, "error": "buffer threads are not running"}
        if self._error:
            return False, {**detail, "error": self._error}
        if self._blocked:
            return False, {**detail, "error": f"{self._full_reason()}: sources are held back"}
        if self._dropping:
            error = "buffer full: the oldest readings are dropped (overflow=drop_oldest)"
            return False, {**detail, "error": error}
        return True, detail

    # -- writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        last_commit = 0.0  # when the last commit began: commits begin at most every interval
        try:
            while (work := self._take(last_commit)) is not None:
                self._writer_beat.beat()
                if self._corrupt is not None:
                    self._recover(self._corrupt)
                if any(work):
                    # The interval runs from this commit's start: its fsync and callbacks are
                    # time in which the next batch gathers, not time added to its wait.
                    last_commit = time.monotonic()
                    self._write(*work)
                self._vacuum()
        except Exception:
            log.exception("buffer writer stopped by an unexpected error")
            raise

    def _in_use(self) -> int:
        """Bytes the buffer takes on disk, for the bound. drop_oldest counts the WAL only up to
        the size checkpoints bring it back to: dropping readings cannot shrink a burst's WAL."""
        wal = self._disk_wal
        if self.config.overflow == "drop_oldest":
            wal = min(wal, self.config.wal_limit)
        return max(self._bytes, self._disk_db + wal)

    def _measure(self) -> None:
        """Refresh what the files take and what the disk has left, and so the byte bound."""
        con = self._con
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        self._free_pages = con.execute("PRAGMA freelist_count").fetchone()[0]
        self._disk_db = (pages - self._free_pages) * self._page_size
        self._disk_wal = _size(f"{self.path}-wal")
        self._free_disk = shutil.disk_usage(self.path.parent).free
        room = max(0, self._free_disk - self.config.min_free_bytes)
        self._limit = min(self.config.max_bytes, self._in_use() + room)

    def _try_measure(self) -> None:
        try:
            self._measure()
        except sqlite3.Error as e:
            self._log.warning("measure", "buffer %s: cannot measure its files (%s)", self.path, e)

    def _full_reason(self) -> str:
        cfg = self.config
        if self._free_disk < cfg.min_free_bytes:
            return (
                f"disk nearly full: {self._free_disk} bytes free under {self.path.parent}, "
                f"the buffer leaves min_free_bytes = {cfg.min_free_bytes}"
            )
        return (
            f"buffer full ({self._rows} rows, {self._disk_db + self._disk_wal} bytes on disk; "
            f"max_rows = {cfg.max_rows}, max_bytes = {cfg.max_bytes})"
        )

    def _fits(self, n: int, taken: int) -> bool:
        """Whether ``n`` more records may go in now (besides ``taken`` already in this batch)."""
        cfg = self.config
        if cfg.overflow != "block" or self._stopping():
            return True
        if self._free_disk < cfg.min_free_bytes:
            return False
        rows = self._rows + taken
        if rows == 0:  # a batch larger than the bound goes in alone
            return True
        if rows >= cfg.max_rows or self._in_use() >= self._limit:
            return False
        return rows + n <= cfg.max_rows

    def _take(self, last_commit: float) -> _Work | None:
        cfg = self.config
        self._try_measure()
        with self._lock:

            def ready() -> bool:
                if self._deletes or self._forgets or self._closing or self._corrupt is not None:
                    return True
                return (
                    bool(self._inserts)
                    and time.monotonic() >= self._retry_at
                    and self._fits(len(self._inserts[0].records), 0)
                )

            backing_off = self._retry_at - time.monotonic()
            wait = min(1.0, max(0.01, backing_off)) if backing_off > 0 else 1.0
            if not self._has_work.wait_for(ready, timeout=wait):
                self._set_blocked(bool(self._inserts) and time.monotonic() >= self._retry_at)
                return [], [], []
        # Group commit: let records gather until commit_interval has passed since the last one
        # began (not ended: a commit's own time would add to every reading's wait);
        # after a failure, until its back-off is over (bounded by the deadline when stopping).
        until = max(last_commit + cfg.commit_interval_ms / 1000, self._retry_at)
        pause = min(until, self._deadline) - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        self._try_measure()  # the bounds as they are now, for what is taken
        with self._lock:
            if self._closing and self._failures and time.monotonic() >= self._deadline:
                self._give_up()
                return None
            subs: list[_Submission] = []
            taken = 0
            while self._inserts and taken < cfg.max_batch:
                n = len(self._inserts[0].records)
                if not self._fits(n, taken):
                    break
                subs.append(self._inserts.popleft())
                taken += n
            self._set_blocked(bool(self._inserts) and not subs)
            deletes, self._deletes = self._deletes, []
            # a slice: the rest go in the next transactions (deleting a receipt later is safe)
            forgets = self._forgets[:MAX_FORGETS]
            del self._forgets[:MAX_FORGETS]
            self._queued -= taken
            if taken:
                self._has_room.notify_all()
            if self._closing and not (subs or deletes or forgets or self._inserts):
                return None
            return subs, deletes, forgets

    def _give_up(self) -> None:  # caller holds _lock
        n = self._queued
        log.error(
            "buffer %s: stopping with %d records not committed (%s); they were never "
            "acknowledged, so their sources still have them (MQTT redelivers, HTTP clients got "
            "no 202), except polled readings and alarm events, which are lost",
            self.path,
            n,
            self._error,
        )
        for _, done in self._deletes:
            if done is not None:
                done.set()  # nobody should wait on a stopped buffer

    def _set_blocked(self, blocked: bool) -> None:
        if blocked and not self._blocked:
            log.warning(
                "buffer %s: %s: holding the sources back until the forwarder drains it "
                "(overflow=block)",
                self.path,
                self._full_reason(),
            )
        elif self._blocked and not blocked:
            log.info("buffer %s has room again", self.path)
        self._blocked = blocked

    def _write(
        self, subs: list[_Submission], deletes: list[_Delete], forgets: list[_Forget]
    ) -> None:
        """Commit one batch; on failure put it back (nothing acknowledged) and back off."""
        try:
            self._commit(subs, deletes, forgets)
        except sqlite3.Error as e:
            self._rollback()
            if _is_corrupt(e):
                self._recover(e)
                self._requeue(subs, deletes, forgets)  # into the new file, at once
                return
            if subs and deletes:  # deletes free room: let them through on their own
                try:
                    self._commit([], deletes, [])
                    self._durable([], deletes)
                    deletes = []
                except sqlite3.Error:
                    self._rollback()
            self._requeue(subs, deletes, forgets)
            self._failed(e)
            return
        if self._failures:
            log.warning(
                "buffer %s: commits work again after %d failed attempts", self.path, self._failures
            )
        self._failures, self._retry_at, self._error = 0, 0.0, ""
        self._durable(subs, deletes)

    def _failed(self, e: sqlite3.Error) -> None:
        now = time.monotonic()
        if not self._failures:
            self._failing_since = now
        self._failures += 1
        backoff = min(RETRY_MIN_S * 2 ** (self._failures - 1), RETRY_MAX_S)
        self._retry_at = now + backoff
        self._error = (
            f"cannot commit to {self.path} ({e}) for {now - self._failing_since:.0f} s, "
            f"{self._failures} attempts; {self._queued} records wait in memory, not acknowledged"
        )
        self._log.error("commit", "buffer: %s; next attempt in %.1f s", self._error, backoff)

    def _rollback(self) -> None:
        try:
            if self._con.in_transaction:
                self._con.rollback()
        except sqlite3.Error as e:
            log.warning("buffer %s: rollback failed (%s)", self.path, e)

    def _requeue(
        self, subs: list[_Submission], deletes: list[_Delete], forgets: list[_Forget]
    ) -> None:
        with self._lock:
            self._inserts.extendleft(reversed(subs))
            self._queued += sum(len(sub.records) for sub in subs)
            self._deletes[:0] = deletes
            self._forgets[:0] = forgets

    def _durable(self, subs: list[_Submission], deletes: list[_Delete]) -> None:
        for _, done in deletes:
            if done is not None:
                done.set()
        now = time.monotonic()
        self._last_commit = now
        observe = self.metrics.processing_latency.labels("buffer").observe
        with self._lock:  # committed: a recall now finds them in the table, not queued
            for sub in subs:
                for receipt in sub.receipts:
                    if self._pending.get((receipt.source, receipt.key)) is sub:
                        del self._pending[receipt.source, receipt.key]
        for sub in subs:
            observe(now - sub.queued_at)
            with self._lock:
                waiters, sub.waiters = sub.waiters, []
            for callback in [sub.on_durable, *waiters]:
                if callback is None:
                    continue
                try:
                    callback()
                except Exception:
                    log.exception("on_durable callback failed")

    def _encode(
        self, r: Reading | AlarmEvent, seq: int, now: float
    ) -> tuple[int, str, str, str, bytes, float]:
        r.gateway_id = self.gateway_id
        r.seq = seq
        kind = "alarm" if isinstance(r, AlarmEvent) else "reading"
        return seq, kind, r.plant_id, r.sensor_id, r.to_json(), now

    def _commit(
        self, subs: list[_Submission], deletes: list[_Delete], forgets: list[_Forget]
    ) -> None:
        con = self._con
        now = time.time()
        seq = self._seq
        rows: list[tuple[int, str, str, str, bytes, float]] = []
        append, gateway_id = rows.append, self.gateway_id
        for sub in subs:  # _encode inlined: this runs for every record every source takes in
            for r in sub.records:
                seq += 1
                r.gateway_id, r.seq = gateway_id, seq
                kind = "reading" if type(r) is Reading else "alarm"
                append((seq, kind, r.plant_id, r.sensor_id, r.to_json(), now))
        receipts = [
            (r.source, r.key, r.fingerprint, now, now + r.keep_s)
            for sub in subs
            for r in sub.receipts
        ]
        removed: Counter[str] = Counter()
        removed_bytes = 0
        con.execute("BEGIN IMMEDIATE")
        for lo, hi in _ranges(i for batch, _ in deletes for i in batch):
            removed_bytes += self._remove("id BETWEEN ? AND ?", (lo, hi), removed)
        self._forget(forgets, now)
        if receipts:
            con.executemany("INSERT OR REPLACE INTO receipts VALUES (?,?,?,?,?)", receipts)
        drop: _Drop | None = None
        if self.config.overflow == "drop_oldest":
            new_bytes = _size_of(rows)
            drop = self._drop_oldest(len(rows), new_bytes, removed, removed_bytes, now)
            removed_bytes += drop.bytes
            if drop.alarm is not None:
                seq += 1
                rows.append(self._encode(drop.alarm, seq, now))
        if rows:
            con.executemany(
                "INSERT INTO records (id, kind, plant_id, key, payload, created)"
                " VALUES (?,?,?,?,?,?)",
                rows,
            )
            con.execute("UPDATE meta SET value = ? WHERE name = 'seq'", (seq,))
        con.execute("COMMIT")
        # Only now is the drop real: count it and change state (a failed commit is tried again,
        # and must then raise the alarm again and count nothing twice).
        if drop is not None:
            self._dropped(drop)
        self.commits += 1
        self._seq = seq
        self._plants.update(map(_plant_of, rows))  # Counter counts an iterable in C
        self._plants.subtract(removed)
        for plant in [p for p in removed if self._plants[p] <= 0]:
            del self._plants[plant]
        self._rows += len(rows) - sum(removed.values())
        self._bytes += _size_of(rows) - removed_bytes
        if rows:
            with self._lock:
                self.last_id = seq
                self._committed.notify_all()

    def _forget(self, forgets: list[_Forget], now: float) -> None:
        """Delete receipts as ``forget``/``forget_older`` asked, and the expired ones now and then
        (inside the writer's transaction)."""
        con = self._con
        one = [(f[0].source, f[0].key, f[0].fingerprint, f[1]) for f in forgets if len(f) == 2]
        if one:
            con.executemany(
                "DELETE FROM receipts"
                " WHERE source = ? AND key = ? AND fingerprint = ? AND committed <= ?",
                one,
            )
        for f in forgets:
            if len(f) == 3:
                source, before, keep = f
                old = con.execute(
                    "SELECT key FROM receipts WHERE source = ? AND committed < ?", (source, before)
                ).fetchall()
                con.executemany(
                    "DELETE FROM receipts WHERE source = ? AND key = ? AND committed < ?",
                    [(source, k, before) for (k,) in old if k not in keep],
                )
        if now - self._pruned >= PRUNE_INTERVAL_S:
            self._pruned = now
            con.execute("DELETE FROM receipts WHERE expires < ?", (now,))

    def _remove(self, where: str, params: tuple[Any, ...], removed: Counter[str]) -> int:
        """Delete rows matching ``where``, counting them per plant; returns their bytes."""
        size = 0
        for plant, n, payload_bytes in self._con.execute(
            f"SELECT plant_id, count(*), sum(length(payload)) FROM records WHERE {where}"
            " GROUP BY plant_id",
            params,
        ):
            removed[plant] += n
            size += payload_bytes + n * ROW_OVERHEAD
        self._con.execute(f"DELETE FROM records WHERE {where}", params)
        return size

    def _drop_oldest(
        self, n_new: int, new_bytes: int, removed: Counter[str], removed_bytes: int, now: float
    ) -> _Drop:
        """Make room for the incoming rows by deleting the oldest (in the open transaction); the
        alarm to raise or clear with them. Changes no state: ``_dropped`` does, after COMMIT."""
        cfg = self.config
        rows = self._rows - sum(removed.values())
        current_bytes = self._in_use() - removed_bytes
        need_rows = rows + n_new - cfg.max_rows
        need_bytes = current_bytes + new_bytes - self._limit
        cut, freed_rows, freed_bytes = 0, 0, 0
        while freed_rows < need_rows or freed_bytes < need_bytes:
            chunk = self._con.execute(
                "SELECT id, length(payload) FROM records WHERE id > ? AND kind = 'reading'"
                " ORDER BY id LIMIT 1000",
                (cut,),
            ).fetchall()
            if not chunk:
                break
            for row_id, length in chunk:
                if freed_rows >= need_rows and freed_bytes >= need_bytes:
                    break
                cut = row_id
                freed_rows += 1
                freed_bytes += length + ROW_OVERHEAD
        dropped: Counter[str] = Counter()
        # Readings only: the alarm saying that readings are being dropped must itself survive.
        size = self._remove("id <= ? AND kind = 'reading'", (cut,), dropped) if cut else 0
        removed.update(dropped)
        n_dropped = sum(dropped.values())
        low = rows - n_dropped < 0.9 * cfg.max_rows and current_bytes - size < 0.9 * self._limit
        if n_dropped and not self._dropping:
            return _Drop(n_dropped, size, "raised", self._overflow_alarm("raised", n_dropped, now))
        if self._dropping and not n_dropped and low:
            return _Drop(0, size, "cleared", self._overflow_alarm("cleared", 0, now))
        return _Drop(n_dropped, size, None, None)

    def _dropped(self, drop: _Drop) -> None:
        """A committed drop: count it; log and remember an alarm raised or cleared."""
        if drop.n:
            self.metrics.buffer_dropped.labels("overflow").inc(drop.n)
        if drop.change == "raised":
            self._dropping = True
            log.error(
                "buffer %s is full (%d rows): dropping the oldest rows (overflow=drop_oldest)",
                self.path,
                self._rows,
            )
        elif drop.change == "cleared":
            self._dropping = False
            log.warning("buffer %s is below its bound again: no longer dropping rows", self.path)

    def _overflow_alarm(self, state: str, dropped: int, now: float) -> AlarmEvent:
        alarm_id = f"{self.gateway_id}:buffer:overflow"
        message = (
            f"gateway buffer full: dropping the oldest readings ({dropped} so far)"
            if state == "raised"
            else "gateway buffer below its bound again: no longer dropping readings"
        )
        plant = self._plants.most_common(1)[0][0] if self._plants else "default"
        return AlarmEvent(
            alarm_id=alarm_id,
            event_id=f"{alarm_id}:{state}:{int(now * 1000)}",
            sensor_id=f"gateway:{self.gateway_id}",
            plant_id=plant,
            parameter="buffer",
            condition="buffer_overflow",
            level="critical" if state == "raised" else "warning",
            state=state,
            value=float(self._rows),
            threshold=float(self.config.max_rows),
            timestamp=now,
            message=message,
        )

    def _maintain(self) -> None:
        """Every second: checkpoint the WAL into the database (truncating it when idle or past
        its limit), refresh the size gauges."""
        while not self._stopped.wait(1.0):
            self._maintainer_beat.beat()
            with self._files_lock:
                try:
                    if self._maint_con is None:
                        self._maint_con = self._connect()
                    con = self._maint_con
                    idle = time.monotonic() - self._last_commit > 1.0
                    big = _size(f"{self.path}-wal") > self.config.wal_limit
                    con.execute(
                        f"PRAGMA wal_checkpoint({'TRUNCATE' if idle or big else 'PASSIVE'})"
                    )
                    self._refresh_gauges(con)
                except sqlite3.Error as e:
                    if _is_corrupt(e):
                        self._flag_corrupt(e)
                    self._log.warning(
                        "checkpoint", "buffer %s: checkpoint failed (%s); will retry", self.path, e
                    )

    def _vacuum(self) -> None:
        """In the writer, at most once a second: give pages freed by deleted rows back to the
        filesystem (incremental vacuum; the file shrinks at the next checkpoint)."""
        now = time.monotonic()
        if not self._incremental or self._free_pages < 64 or now - self._last_vacuum < 1.0:
            return
        self._last_vacuum = now
        try:
            # executescript steps the pragma to its end; execute() would free a single page
            self._con.executescript(f"PRAGMA incremental_vacuum({VACUUM_PAGES})")
            self._last_commit = time.monotonic()
        except sqlite3.Error as e:
            self._rollback()
            if _is_corrupt(e):
                self._flag_corrupt(e)
            self._log.warning("vacuum", "buffer %s: vacuum failed (%s)", self.path, e)

    # -- corrupt files -----------------------------------------------------------------------

    def _flag_corrupt(self, e: sqlite3.Error) -> None:
        with self._lock:
            if self._corrupt is None:
                self._corrupt = e
                self._has_work.notify_all()

    def _recover(self, e: BaseException) -> None:
        """In the writer: the file is corrupt. Replace it, as at start, and carry on."""
        expected = self._rows
        with self._files_lock, self._read_lock:
            # Every connection to the old file closes before it is renamed: the last one to close
            # deletes the WAL by its name, which would then be the new file's.
            _close_quietly(self._maint_con, self._reader, self._con)
            self._maint_con = None
            self._con = self._replace_corrupt(e, "at run time", expected)
            self._load_state()
            self._reader = self._connect(read_only=True)
            with self._lock:
                self._corrupt = None
                self.generation += 1
                self._committed.notify_all()

    def _replace_corrupt(
        self, e: BaseException, when: str, expected: int | None = None
    ) -> sqlite3.Connection:
        """Move the corrupt file aside, open a new one and salvage what can be read into it."""
        aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(f"{self.path}{suffix}"):
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        con = self._open_checked()
        salvaged = _salvage(aside, con, self._seq)
        lost = (
            f"the {expected - salvaged} rows it could not read"
            if expected is not None and expected > salvaged
            else "any rows it could not read"
        )
        log.error(
            "buffer %s is corrupt %s (%s): moved it aside to %s and started a new one; salvaged "
            "%d rows into it (same ids and seq), %s stay only in %s",
            self.path,
            when,
            e,
            aside,
            salvaged,
            lost,
            aside,
        )
        return con

    def _refresh_gauges(self, con: sqlite3.Connection) -> None:
        m = self.metrics
        plants = dict(self._plants)  # the writer changes it meanwhile: work on a copy
        for plant in self._gauged - plants.keys():
            m.buffer_size.labels(plant).set(0)
        for plant, n in plants.items():
            m.buffer_size.labels(plant).set(n)
        self._gauged = set(plants)
        files = (str(self.path), f"{self.path}-wal")
        m.buffer_bytes.set(sum(os.path.getsize(p) for p in files if os.path.exists(p)))
        oldest = con.execute("SELECT created FROM records ORDER BY id LIMIT 1").fetchone()
        m.buffer_oldest_age.set(max(0.0, time.time() - oldest[0]) if oldest else 0.0)


def _is_corrupt(e: BaseException) -> bool:
    code = getattr(e, "sqlite_errorname", "")
    return code.startswith("SQLITE_CORRUPT") or code == "SQLITE_NOTADB"


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _close_quietly(*cons: sqlite3.Connection | None) -> None:
    for con in cons:
        if con is not None:
            try:
                con.close()
            except sqlite3.Error as e:
                log.warning("closing a buffer connection failed (%s)", e)


_COLUMNS = "id, kind, plant_id, key, payload, created"


def _salvage(aside: str, into: sqlite3.Connection, seq_hint: int) -> int:
    """Copy every row a read-only pass can read from the corrupt file ``aside`` into ``into``;
    returns how many. Reads in id order; at damage, row by row, then leaps ahead (1, 2, 4, ...
    ids) until rows read again."""
    try:
        src = sqlite3.connect(f"file:{aside}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0
    try:
        try:
            top = src.execute("SELECT max(id) FROM records").fetchone()[0] or 0
        except sqlite3.Error:
            top = max(seq_hint, int(time.time() * 1_000_000))

        def rows_after(last: int, n: int) -> list[Any] | None:
            try:
                return src.execute(
                    f"SELECT {_COLUMNS} FROM records WHERE id > ? ORDER BY id LIMIT ?", (last, n)
                ).fetchall()
            except sqlite3.Error:
                return None

        salvaged, last = 0, 0
        while True:
            rows = rows_after(last, 500)
            if rows is None:
                rows = rows_after(last, 1)
            if rows is None:  # the next row is damaged: leap over the damage
                jump = 1
                while last + jump <= top and (found := rows_after(last + jump, 1)) is None:
                    jump *= 2
                if last + jump > top or not found:
                    break
                last = found[0][0] - 1
                continue
            if not rows:
                break
            into.executemany(
                f"INSERT OR IGNORE INTO records ({_COLUMNS}) VALUES (?,?,?,?,?,?)", rows
            )
            salvaged += len(rows)
            last = rows[-1][0]
        return salvaged
    finally:
        src.close()


def _ranges(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted ids as inclusive (first, last) runs: deleting a run is a fast range scan."""
    runs: list[tuple[int, int]] = []
    for i in sorted(ids):
        if runs and i <= runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], max(i, runs[-1][1]))
        else:
            runs.append((i, i))
    return runs
