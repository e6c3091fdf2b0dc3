"""The processor's consumer group: raw readings in, validated readings, alarms and windows out.

One thread owns the Kafka consumer. Each turn takes what the partitions have (waiting for a first
message, then ``batch_linger`` for more, at most ``batch_size``), validates it (the ``Validator``'s
central checks: a function of the message, Kafka timestamp included, so replays flag alike) and
checks thresholds (the same ``AlarmEngine`` as the gateway), feeds the 1-minute windows
of each partition, produces the output messages and hands the batch to the sink writer
(``sinks``), which writes InfluxDB and waits for Kafka's confirmations while this thread goes on
with the next batch. Offsets are committed only for batches the writer reports done, all of whose
predecessors are done too. The offset committed for a partition is the lowest one an open window
still needs, with the window checkpoint as commit metadata (see ``aggregate``), so a crash or
rebalance replays exactly what is needed to rebuild the open windows and every sink sees each
reading at least once; InfluxDB's point identity makes that exactly once in storage. A partition
the group takes away is never brought back by this instance: messages of it still in hand when
the rebalance comes are left to its new owner, and commits go to assigned partitions only.

When a sink is down the writer holds its batches, the hand-over queue fills (memory stays bounded
to a few batches), every assigned partition is paused, and consumption resumes once the writer
takes batches again.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from gateway.common.alarms import AlarmEngine
from gateway.common.metrics import Metrics
from gateway.common.model import AlarmEvent, Quality, Reading, Rejection
from gateway.common.supervise import Heartbeat
from gateway.common.validate import Validator
from gateway.processor.aggregate import Outcome, PartitionWindows, WindowAggregate
from gateway.processor.checkpoint import Checkpoints, Key
from gateway.processor.codec import decode_keeping_ts, reading_json
from gateway.processor.events import Listener
from gateway.processor.provision import beyond_hourly_task
from gateway.processor.publish import HEADERS, Publisher, PublishFailed
from gateway.processor.store import InfluxStore, alarm_line, reading_line, window_line
from gateway.processor.writer import Batch, Observer, SinkWriter

if TYPE_CHECKING:
    from gateway.processor.settings import ProcessorConfig

log = logging.getLogger(__name__)

RAW_PREFIX = "sensors.raw."
# The group moved on: the commit is void, the next owner replays from the last good one.
_STALE_COMMIT = {
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.FENCED_MEMBER_EPOCH,
    KafkaError.STALE_MEMBER_EPOCH,
    KafkaError._NO_OFFSET,
}
# How long a revocation waits for handed-over batches, to commit them before letting go.
_REVOKE_DRAIN_SECONDS = 5.0

_Key = Key


def plant_from_topic(topic: str) -> str:
    return topic[len(RAW_PREFIX) :] if topic.startswith(RAW_PREFIX) else "default"


class RawConsumer:
    """The consume → process → hand over → commit loop, on its own thread."""

    def __init__(
        self,
        config: ProcessorConfig,
        kafka_conf: dict[str, Any],
        validator: Validator,
        alarms: AlarmEngine,
        store: InfluxStore,
        metrics: Metrics,
        observer: Observer | None = None,
        listeners: Sequence[Listener] = (),
    ) -> None:
        self.config = config
        self.validator = validator
        self.alarms = alarms
        self.store = store
        self.metrics = metrics
        self.observer = observer  # told when each batch is done (the bench measures latency)
        self.listeners = list(listeners)  # told what each batch produced (predictions, live feed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kafka_conf = kafka_conf
        self._windows: dict[_Key, PartitionWindows] = {}
        self._checkpoints = Checkpoints()
        self._last_commit_at = 0.0
        self._caught_up: set[_Key] = set()  # partitions read to their end (for idle flush)
        self._moved: set[_Key] = set()  # partitions a rebalance assigned or took (see _take)
        self._paused = False
        self._last_activity: dict[_Key, float] = {}  # monotonic time of the last message or EOF
        self._last_nudge = time.monotonic()
        self._plant_keys: dict[str, bytes] = {}
        self._consumer: Consumer | None = None
        self._publisher: Publisher | None = None
        self._writer: SinkWriter | None = None
        self._beat = Heartbeat("kafka consumer")
        self.running = False
        self.crashed: BaseException | None = None
        self.consumed = 0  # readings taken from Kafka since start, for the status line

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="processor-consume", daemon=True)
        self._thread.start()
        self._beat.watch(self._thread)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def heartbeats(self) -> list[Heartbeat]:
        writer = self._writer
        return [self._beat, *(writer.heartbeats() if writer is not None else [])]

    def _consumer_conf(self) -> dict[str, Any]:
        c = self.config
        return {
            **self._kafka_conf,
            "group.id": c.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            # how soon a new sensors.raw.<plant> topic is noticed by the regex subscription
            "topic.metadata.refresh.interval.ms": c.metadata_refresh_ms,
            "statistics.interval.ms": 5000,
            "stats_cb": self._on_stats,
            "error_cb": self._on_error,
            "max.poll.interval.ms": 300_000,
            "session.timeout.ms": c.session_timeout_ms,
            "heartbeat.interval.ms": max(1000, c.session_timeout_ms // 5),
            "fetch.max.bytes": 16 * 1024 * 1024,
            "fetch.wait.max.ms": 100,
            "enable.partition.eof": True,
        }

    def _run(self) -> None:
        try:
            self._publisher = Publisher(self._kafka_conf, self.metrics, self._stop)
            writer = self._writer = SinkWriter(
                self.store,
                self._publisher,
                self.metrics,
                dead_letter_topic=self.config.dead_letter_topic,
                max_lines=self.config.max_lines_in_flight,
                retry_max_seconds=self.config.retry_max_seconds,
                writes=self.config.writes_in_flight,
                observer=self.observer,
            )
            writer.start()
            consumer = self._consumer = Consumer(self._consumer_conf())
            consumer.subscribe(
                [self.config.topic_pattern],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self.running = True
            # What exists by now (modules, clients, config) lives as long as the process: out of
            # the collector's full passes, which otherwise walk it all while every thread waits
            # (measured at 10,000 readings/s: 29-67 ms once every 5-15 s, 4-7 ms once frozen).
            gc.collect()
            gc.freeze()
            try:
                while not self._stop.is_set():
                    self._beat.beat()
                    if writer.crashed is not None:
                        raise RuntimeError(f"sink writer stopped: {writer.crashed!r}")
                    msgs = self._take(consumer)
                    self._nudge_stale(msgs)
                    batch = self._process(msgs)
                    if not batch.empty and not self._hand_over(batch):
                        break
                    self._commit_done()
            except PublishFailed:  # only raised while stopping
                pass
            finally:
                self.running = False
                writer.close()
                self._commit_done(force=True)
                self._publisher.close()
                consumer.close()
        except BaseException as e:  # the service reports it unhealthy; systemd restarts us
            self.crashed = e
            log.exception("processor consumer stopped on an error")

    def _take(self, consumer: Consumer) -> list[Message]:
        """What the partitions have: wait for one message, then let the batch fill briefly.

        A rebalance may run inside the second call. Messages the first one gave us of a partition
        it moved are then void: revoked, the partition is its new owner's to read (from the
        committed offset); assigned again, it is read again from there. (librdkafka itself voids
        those a single call took before its callback.)"""
        c = self.config
        msgs = consumer.consume(c.batch_size, 0)
        if not msgs:
            msgs = consumer.consume(1, c.batch_timeout)
            if msgs and c.batch_size > 1:
                self._moved.clear()
                more = consumer.consume(c.batch_size - 1, c.batch_linger)
                if self._moved:
                    kept = [m for m in msgs if (m.topic(), m.partition()) not in self._moved]
                    if len(kept) < len(msgs):
                        log.info(
                            "left %d message(s) of partitions moved by a rebalance to their owner",
                            len(msgs) - len(kept),
                        )
                    msgs = kept
                msgs.extend(more)
        return msgs

    # -- rebalance -----------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._moved.update((tp.topic, tp.partition) for tp in partitions)
        for tp in self._committed(consumer, partitions):
            key = (tp.topic, tp.partition)
            checkpoint = tp.metadata if tp.offset >= 0 else None
            self._windows[key] = PartitionWindows(
                f"{tp.topic}/{tp.partition}",
                grace_seconds=self.config.grace_seconds,
                idle_flush_seconds=self.config.idle_flush_seconds,
                max_future_seconds=self.config.max_future_seconds,
                checkpoint=checkpoint,
            )
            self._checkpoints.forget(key)
            self._caught_up.discard(key)  # read to its end only once librdkafka says so again
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    def _committed(
        self, consumer: Consumer, partitions: list[TopicPartition]
    ) -> list[TopicPartition]:
        attempt = 0
        while True:
            try:
                return list(consumer.committed(partitions, timeout=10))
            except KafkaException as e:
                attempt += 1
                log.warning("cannot read committed offsets (%s), retrying", e)
                if self._stop.wait(min(10.0, 0.5 * attempt)):
                    raise

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Batches already handed over get a moment to finish, so the next owner starts from a
        # fresh commit (not when a sink is down: it would only delay the rebalance).
        if self._writer is not None and self._writer.wait_idle(_REVOKE_DRAIN_SECONDS):
            self._commit_done(force=True)
        self._on_lost(consumer, partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Open windows of a revoked partition are dropped, not flushed: the next owner rebuilds
        # them from the committed offset. Batches still in flight for it are written (harmless)
        # but never committed by us: their PartitionWindows is no longer the current one.
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._moved.add(key)
            self._windows.pop(key, None)
            self._checkpoints.forget(key)
            self._caught_up.discard(key)
            self._last_activity.pop(key, None)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
        log.info("revoked %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    # -- processing ----------------------------------------------------------------------------

    def _plant_key(self, plant: str) -> bytes:
        key = self._plant_keys.get(plant)
        if key is None:
            if len(self._plant_keys) > 10_000:
                self._plant_keys.clear()
            key = self._plant_keys[plant] = plant.encode()
        return key

    def _process(self, msgs: list[Message]) -> Batch:
        t0 = time.perf_counter()
        now = time.time()
        c = self.config
        batch = Batch(produced_ms=[] if self.observer is not None else None)
        assert self._publisher is not None
        send, delivery = self._publisher.send, batch.delivery
        produce, report = self._publisher.produce, delivery.report
        n_validated = 0
        lines, produced = batch.lines, batch.produced_ms
        validated, alerts = c.validated_topic, c.alerts_topic
        # per plant: [received, good, uncertain, bad, late, duplicate]
        stats: dict[str, list[int]] = {}
        quality_slot = {Quality.GOOD: 1, Quality.UNCERTAIN: 2, Quality.BAD: 3}
        raised: Counter[tuple[str, str]] = Counter()
        touched: set[_Key] = set()
        check, evaluate = self.validator.check_central, self.alarms.evaluate
        listening = bool(self.listeners)
        seen: list[Reading] = []
        alerted: list[AlarmEvent] = []
        closed: list[WindowAggregate] = []
        last: _Key | None = None
        pw: PartitionWindows | None = None
        topic_plant = ""
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._caught_up.add((msg.topic() or "", msg.partition() or 0))
                    last = None  # a message after the end means it is not caught up
                elif err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    log.info("no topic matches %s yet", self.config.topic_pattern)
                else:
                    log.warning("consume error: %s", err)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
            key = (topic, partition)
            if key != last or pw is None:
                pw = self._windows.get(key)
                if pw is None:
                    # Not (or no longer) ours: never bring a partition back by processing a
                    # message of it; its owner reads it from the committed offset.
                    log.warning(
                        "left a message of %s[%d]: the partition is not ours", topic, partition
                    )
                    last = None
                    continue
                last = key
                topic_plant = plant_from_topic(topic)
                self._caught_up.discard(key)
                touched.add(key)
            stamp_type, stamp = msg.timestamp()  # the sending gateway's clock (CreateTime)
            if produced is not None:
                produced.append(stamp)
            payload = msg.value()
            r, ts_text = decode_keeping_ts(payload, topic_plant)
            if isinstance(r, Rejection):
                stats.setdefault(topic_plant, [0] * 6)[0] += 1
                self.metrics.rejected_payloads.labels(source="kafka", reason=r.reason).inc()
                self.metrics.messages_processed.labels(
                    status="dead_letter", plant_id=topic_plant
                ).inc()
                headers = [
                    *HEADERS,
                    ("reason", r.reason.encode()),
                    ("detail", r.detail.encode()),
                    ("source-topic", topic.encode()),
                    ("source-partition", str(partition).encode()),
                    ("source-offset", str(offset).encode()),
                ]
                send(delivery, c.dead_letter_topic, payload or b"", msg.key() or b"", headers)
                pw.seen(offset)
                continue
            sent = stamp / 1000 if stamp_type != TIMESTAMP_NOT_AVAILABLE else None
            check(r, sent)
            events = evaluate(r)
            lines.append(reading_line(r))
            plant = r.plant_id
            plant_key = self._plant_keys.get(plant) or self._plant_key(plant)
            value = reading_json(r, ts_text)
            try:
                produce(validated, value, plant_key, on_delivery=report, headers=HEADERS)
                n_validated += 1
            except BufferError:
                send(delivery, validated, value, plant_key)
            if listening:
                seen.append(r)
                alerted.extend(events)
            for e in events:
                lines.append(alarm_line(e))
                send(delivery, alerts, orjson.dumps(e.to_dict()), plant_key)
                if e.state in ("raised", "re-raised"):
                    raised[(e.level, e.parameter)] += 1
            counts = stats.get(plant)
            if counts is None:
                counts = stats[plant] = [0] * 6
            counts[0] += 1
            counts[quality_slot[r.quality]] += 1
            outcome = pw.add(r, offset, now, sent)
            if outcome is Outcome.LATE:
                counts[4] += 1
            elif outcome is Outcome.DUPLICATE:
                counts[5] += 1
        delivery.sent += n_validated
        delivery.topics[validated] += n_validated
        batch.readings = sum(s[0] for s in stats.values())
        for key, pw in self._windows.items():
            # Idle means nothing more to read, not that we were slow to read it (a rebalance or
            # an outage must not close windows whose readings are still in the partition).
            if key in self._caught_up:
                pw.flush_idle(now)
            for w in pw.take_closed():
                if listening:
                    closed.append(w)
                touched.add(key)
                batch.window_lines.append(window_line(w))
                hour = w.start - w.start % 3600
                if beyond_hourly_task(hour, now):
                    batch.late_hours.add((w.plant_id, hour))
                send(delivery, c.aggregated_topic, orjson.dumps(w.to_dict()), w.plant_id.encode())
        for key in touched:
            pw = self._windows[key]
            cp = pw.commit_point()
            if cp is not None:
                batch.commits.append((key, pw, cp))
        self._count(stats, raised)
        for listener in self.listeners:
            try:
                listener.on_batch(seen, alerted, closed)
            except Exception:  # a listener's bug must not stop storage
                log.exception("processor listener %r failed", listener)
        if msgs:
            self.metrics.processing_latency.labels(stage="process").observe(
                time.perf_counter() - t0
            )
        return batch

    def _count(self, stats: dict[str, list[int]], raised: Counter[tuple[str, str]]) -> None:
        m = self.metrics
        for plant, (received, good, uncertain, bad, late, duplicate) in stats.items():
            m.messages_received.labels(source="kafka", plant_id=plant).inc(received)
            self.consumed += received
            for status, n in (("good", good), ("uncertain", uncertain), ("bad", bad)):
                if n:
                    m.messages_processed.labels(status=status, plant_id=plant).inc(n)
            if late:
                m.late_readings.labels(plant_id=plant).inc(late)
            if duplicate:
                m.duplicate_readings.labels(plant_id=plant).inc(duplicate)
        for (level, parameter), n in raised.items():
            m.alerts_triggered.labels(level=level, parameter=parameter).inc(n)

    # -- hand-over and commit ------------------------------------------------------------------

    def _hand_over(self, batch: Batch) -> bool:
        """Queue the batch for the writer. A queue that stays full (a sink is down or slow) pauses
        consumption while rebalances are still served; False only when stopping meanwhile."""
        assert self._writer is not None
        if self._writer.put(batch, timeout=1.0):
            return True
        self._pause()
        while not self._writer.put(batch, timeout=0.2):
            self._beat.beat()  # waiting on a down sink is progress: rebalances are served
            if self._stop.is_set() or self._writer.crashed is not None:
                return False
            self._commit_done()
            self._hold()
        self._resume()
        return True

    def _pause(self) -> None:
        assert self._consumer is not None
        if not self._paused:
            self._consumer.pause(self._consumer.assignment())
            self._paused = True
            # Data may arrive while we are paused: none of the partitions is known to be read to
            # its end any more (resuming makes librdkafka report the end again).
            self._caught_up.clear()

    def _resume(self) -> None:
        assert self._consumer is not None
        self._consumer.resume(self._consumer.assignment())
        self._paused = False

    def _hold(self) -> None:
        """Serve rebalances while paused. A partition assigned meanwhile is not paused yet: push
        anything it hands us back (seek) and pause it, so memory stays at a few batches."""
        assert self._consumer is not None
        consumer = self._consumer
        msgs = consumer.consume(1000, 0.1)
        first: dict[_Key, int] = {}
        for msg in msgs:
            if msg.error() is None:
                key = (msg.topic() or "", msg.partition() or 0)
                first.setdefault(key, msg.offset() or 0)
        for (topic, partition), offset in first.items():
            tp = TopicPartition(topic, partition, offset)
            consumer.pause([tp])
            consumer.seek(tp)
        if first:
            consumer.pause(consumer.assignment())

    def _commit_done(self, force: bool = False) -> None:
        """Commit where the batches the writer finished allow, at most every commit interval."""
        assert self._consumer is not None and self._writer is not None
        self._checkpoints.stored(self._writer.take_done())
        now = time.monotonic()
        if not self._checkpoints.pending:
            return
        if not force and now - self._last_commit_at < self.config.commit_interval:
            return
        offsets = self._checkpoints.due(self._windows)
        self._last_commit_at = now
        if offsets:  # only the partitions the group gives us now, whatever our bookkeeping says
            owned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
            foreign = [tp for tp in offsets if (tp.topic, tp.partition) not in owned]
            for tp in foreign:
                log.warning("not committing %s[%d]: not assigned here", tp.topic, tp.partition)
            offsets = [tp for tp in offsets if (tp.topic, tp.partition) in owned]
        if not offsets:
            return
        t0 = time.perf_counter()
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as e:
            err = e.args[0]
            if err.code() in _STALE_COMMIT:
                log.info("commit skipped during a rebalance: %s", err)
            else:
                log.warning("offset commit failed (retried with the next batch): %s", err)
                self._checkpoints.retry(offsets, self._windows)
            return
        self._checkpoints.committed(offsets)
        self.metrics.processing_latency.labels(stage="commit").observe(time.perf_counter() - t0)

    def _nudge_stale(self, msgs: list[Message]) -> None:
        """Partitions with open windows that neither deliver messages nor report their end (e.g.
        after Kafka came back) get paused and resumed, which makes librdkafka report the end again
        if they are there, so an idle plant's last window still closes."""
        now = time.monotonic()
        for msg in msgs:
            self._last_activity[(msg.topic() or "", msg.partition() or 0)] = now
        if self._paused or now - self._last_nudge < self.config.idle_flush_seconds / 2:
            return
        self._last_nudge = now
        assert self._consumer is not None
        stale = [
            TopicPartition(topic, partition)
            for (topic, partition), pw in self._windows.items()
            if pw.open_windows
            and (topic, partition) not in self._caught_up
            and now - self._last_activity.get((topic, partition), 0.0)
            >= self.config.idle_flush_seconds / 2
        ]
        if stale:
            self._consumer.pause(stale)
            self._consumer.resume(stale)

    # -- librdkafka callbacks ------------------------------------------------------------------

    def _on_stats(self, text: str) -> None:
        try:
            stats = json.loads(text)
        except ValueError:
            return
        for topic, t in stats.get("topics", {}).items():
            for part, p in t.get("partitions", {}).items():
                if part == "-1" or (topic, int(part)) not in self._windows:
                    continue
                lag = p.get("consumer_lag", -1)
                if lag >= 0:
                    self.metrics.consumer_lag.labels(topic=topic, partition=part).set(lag)

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._caught_up.clear()  # readings may be waiting on the far side: no idle flush
        log.warning("kafka: %s", err)

    # -- introspection (health, tests) ---------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def sink_down_since(self) -> float | None:
        return self._writer.down_since if self._writer is not None else None

    @property
    def last_error(self) -> str:
        return self._writer.last_error if self._writer is not None else ""

    def open_windows(self) -> int:
        return sum(pw.open_windows for pw in list(self._windows.values()))
