"""The sink writer: InfluxDB writes and Kafka confirmations, overlapped with the next batches.

The consumer thread hands each processed batch over through a queue bounded in lines (its memory
bound, whatever the batch sizes) and goes on with the next one. ``writes`` writer threads each
take what is queued as soon as they are free, coalesced into requests of about ``batch_lines``
lines (small batches at a low rate, full ones under load), write it to InfluxDB, re-downsample the
hours (and ended days) that got windows too late for the hourly task (see ``provision``), then wait
for the Kafka confirmations of its messages. A group is stored and published (the observer is
told) as soon as its own writes are confirmed, so one slow InfluxDB request delays only its own
readings, not every batch queued behind it. Groups are reported done for commit strictly in the
order they were taken: the consumer commits the offsets a batch recorded once it is done, and
every batch before it has been written too.

Lines InfluxDB refuses for good go to the dead-letter topic (payload: the line; headers: reason
``influx_refused``, InfluxDB's message as detail, the bucket) and count into
``iot_influxdb_refused_lines_total``; the batch is done once their delivery is confirmed too.

A failing sink is retried with back-off, holding the batches; the queue then fills and the
consumer pauses consumption. Nothing is dropped except on ``close`` while a sink is down, where
the unwritten batches are abandoned uncommitted (the next run replays them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.common.metrics import Metrics
from gateway.common.supervise import Heartbeat
from gateway.processor.aggregate import CommitPoint, PartitionWindows
from gateway.processor.provision import ROLLUP_FLUX, rollups
from gateway.processor.publish import HEADERS, Delivery, Publisher, PublishFailed
from gateway.processor.store import InfluxStore, Refused, StoreUnavailable

log = logging.getLogger(__name__)

Observer = Callable[[list[int], float], None]  # Kafka timestamps (ms) of a batch, time it was done


@dataclass(eq=False)
class Batch:
    """What one consumed batch must get into the sinks before its offsets may be committed."""

    lines: list[str] = field(default_factory=list)  # raw bucket: readings and alarm events
    window_lines: list[str] = field(default_factory=list)  # 1-minute bucket
    delivery: Delivery = field(default_factory=Delivery)
    # (topic, partition), the PartitionWindows it was taken from, where it may commit to
    commits: list[tuple[tuple[str, int], PartitionWindows, CommitPoint]] = field(
        default_factory=list
    )
    readings: int = 0
    produced_ms: list[int] | None = None  # for an observer (the bench): Kafka timestamps
    # (plant, hour start) of hours that got a window after the hourly task stopped looking
    late_hours: set[tuple[str, int]] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        return not (self.lines or self.window_lines or self.delivery.sent or self.commits)

    @property
    def size(self) -> int:
        """What it weighs in the queue: its lines, or its messages if it has more of those."""
        return max(1, len(self.lines) + len(self.window_lines), self.delivery.sent)


class SinkWriter:
    """Owns the writer thread; ``put`` from the consumer thread, ``take_done`` for commits."""

    def __init__(
        self,
        store: InfluxStore,
        publisher: Publisher,
        metrics: Metrics,
        *,
        dead_letter_topic: str = "sensors.deadletter",
        max_lines: int = 20_000,
        retry_max_seconds: float = 10.0,
        writes: int = 2,
        observer: Observer | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.metrics = metrics
        self.retry_max = retry_max_seconds
        self.observer = observer
        self.max_lines = max_lines
        self.dead_letter_topic = dead_letter_topic
        self._cond = threading.Condition()
        self._queue: deque[Batch] = deque()
        self._queued = 0  # sum of the queued batches' sizes
        self._unfinished = 0  # batches handed over and not done yet
        self._done: deque[Batch] = deque()
        self._taken = 0  # groups taken by a writer thread, numbering them in queue order
        self._released = 0  # groups reported done (all before them are too)
        self._finished: dict[int, list[Batch]] = {}  # finished groups waiting for earlier ones
        self._closing = threading.Event()
        self._abandon = threading.Event()
        self._threads: list[threading.Thread] = []
        self._beats = [Heartbeat(f"influxdb writer {i}") for i in range(max(1, writes))]
        # For /health: when a sink started failing, and why.
        self.down_since: float | None = None
        self.last_error = ""
        self.crashed: BaseException | None = None

    # -- consumer side -------------------------------------------------------------------------

    def start(self) -> None:
        for i, beat in enumerate(self._beats):
            t = threading.Thread(
                target=self._run, args=(beat,), name=f"processor-sinks-{i}", daemon=True
            )
            self._threads.append(t)
            t.start()
            beat.watch(t)

    def heartbeats(self) -> list[Heartbeat]:
        return list(self._beats)

    def put(self, batch: Batch, timeout: float) -> bool:
        """Queue a batch; False if there was no room for it for ``timeout`` seconds."""
        size = batch.size
        with self._cond:
            room = self._cond.wait_for(
                lambda: not self._queue or self._queued + size <= self.max_lines, timeout
            )
            if not room:
                return False
            self._queue.append(batch)
            self._queued += size
            self._unfinished += 1
            self._cond.notify_all()
        return True

    def take_done(self) -> list[Batch]:
        done = []
        while self._done:
            done.append(self._done.popleft())
        return done

    def wait_idle(self, timeout: float) -> bool:
        """Until every batch handed over is done; False on timeout or while a sink is down."""
        deadline = time.monotonic() + timeout
        while self._unfinished:
            if self.down_since is not None or self.crashed is not None:
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued (unless a sink is down), then stop the thread."""
        self._closing.set()
        if self.down_since is not None:
            self._abandon.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            self._abandon.set()
            for t in self._threads:
                t.join(10.0)

    # -- writer thread -------------------------------------------------------------------------

    def _run(self, beat: Heartbeat) -> None:
        try:
            while not self._abandon.is_set():
                beat.beat()
                taken = self._next_group()
                if taken is None:
                    if self._closing.is_set():
                        return
                    continue
                seq, group = taken
                if not self._deliver(group, beat):
                    return
                if self.observer is not None:
                    now = time.time()
                    for b in group:
                        if b.produced_ms is not None:
                            self.observer(b.produced_ms, now)
                self._finish(seq, group)
        except BaseException as e:  # the consumer sees it and stops; systemd restarts us
            self.crashed = e
            self._abandon.set()  # the other writers stop too: nothing after a gap is committed
            log.exception("processor sink writer stopped on an error")

    def _next_group(self) -> tuple[int, list[Batch]] | None:
        """The next batch, plus any queued behind it while their lines fit one request, numbered
        in queue order."""
        limit = self.store.config.batch_lines
        with self._cond:
            if not self._cond.wait_for(lambda: self._queue, 0.1):
                return None
            first = self._queue.popleft()
            group, lines, size = [first], len(first.lines), first.size
            while self._queue and lines + len(self._queue[0].lines) <= limit:
                b = self._queue.popleft()
                group.append(b)
                lines += len(b.lines)
                size += b.size
            self._queued -= size
            seq = self._taken
            self._taken += 1
            self._cond.notify_all()
        return seq, group

    def _finish(self, seq: int, group: list[Batch]) -> None:
        """Report the group done once every group taken before it is (commits stay in order)."""
        with self._cond:
            self._finished[seq] = group
            while self._released in self._finished:
                released = self._finished.pop(self._released)
                self._done.extend(released)
                self._unfinished -= len(released)
                self._released += 1

    def _deliver(self, group: list[Batch], beat: Heartbeat) -> bool:
        """Write the group to every sink, retrying; False only when abandoned unwritten."""
        attempt, steps = 0, set[str]()
        letters = Delivery()  # the group's lines InfluxDB refused, on their way to dead letters
        while True:
            try:
                self._write(group, steps, letters)
                if self.down_since is not None:
                    log.warning("sinks back after %.1f s", time.time() - self.down_since)
                    self.down_since = None
                    self.last_error = ""
                return True
            except (StoreUnavailable, PublishFailed) as e:
                self.last_error = str(e)
                if self.down_since is None:
                    self.down_since = time.time()
                    log.error("sink down, consumption pauses when the queue is full: %s", e)
                beat.beat()  # retrying a down sink is progress, not a wedge
                if self._abandon.wait(min(self.retry_max, 0.2 * 2 ** min(attempt, 10))):
                    return False
                attempt += 1

    def _write(self, group: list[Batch], steps: set[str], letters: Delivery) -> None:
        hist = self.metrics.processing_latency
        store = self.store
        if "store" not in steps:
            lines = [line for b in group for line in b.lines]
            if lines:
                t0 = time.perf_counter()
                self._dead_letter(store.write(store.config.bucket, lines), letters)
                hist.labels(stage="store").observe(time.perf_counter() - t0)
            steps.add("store")
        if "windows" not in steps:
            window_lines = [line for b in group for line in b.window_lines]
            if window_lines:
                self._dead_letter(store.write(store.config.bucket_1m, window_lines), letters)
            steps.add("windows")
        if "rollup" not in steps:
            late = set[tuple[str, int]]().union(*(b.late_hours for b in group))
            for params in rollups(store.config, late, time.time()) if late else []:
                store.query(ROLLUP_FLUX, params)
                self.metrics.late_rollups.labels(bucket=params["targetBucket"]).inc()
            steps.add("rollup")
        t0 = time.perf_counter()
        for b in group:
            self.publisher.confirm(b.delivery, self._abandon)
        self.publisher.confirm(letters, self._abandon)
        if any(b.delivery.sent for b in group):
            hist.labels(stage="publish").observe(time.perf_counter() - t0)

    def _dead_letter(self, refused: list[Refused], letters: Delivery) -> None:
        for r in refused:
            headers = [
                ("content-type", b"text/plain; charset=utf-8"),
                *HEADERS[1:],
                ("reason", b"influx_refused"),
                ("detail", r.detail.encode()),
                ("bucket", r.bucket.encode()),
                ("influx-reason", r.reason.encode()),
            ]
            self.publisher.send(letters, self.dead_letter_topic, r.line.encode(), b"", headers)
