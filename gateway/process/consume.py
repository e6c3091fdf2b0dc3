"""The processor's consumer group: raw readings in, validated readings, alarms and windows out.

One thread owns the Kafka consumer. Each turn takes a batch (``consume(num_messages, timeout)``),
validates it and checks thresholds (the same ``Validator`` and ``AlarmEngine`` as the gateway),
feeds the 1-minute windows of each partition, writes everything to InfluxDB and Kafka, and only
then commits. The offset committed for a partition is the lowest one an open window still needs,
with the window checkpoint as commit metadata (see ``aggregate``), so a crash or rebalance replays
exactly what is needed to rebuild the open windows and every sink sees each reading at least once;
InfluxDB's point identity makes that exactly once in storage.

When a sink is down the batch is held (memory stays bounded to one batch), every assigned partition
is paused, and the batch is retried with back-off; consumption resumes once it is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from gateway.alarms import AlarmEngine
from gateway.metrics import Metrics
from gateway.model import AlarmEvent, Quality, Reading, Rejection, reading_from_dict
from gateway.process.aggregate import Outcome, PartitionWindows, WindowAggregate
from gateway.process.store import InfluxStore, StoreUnavailable
from gateway.validate import Validator

if TYPE_CHECKING:
    from gateway.process.service import ProcessorConfig

log = logging.getLogger(__name__)

RAW_PREFIX = "sensors.raw."
HEADERS: list[tuple[str, str | bytes | None]] = [
    ("content-type", b"application/json"),
    ("source", b"edge-processor"),
]
# The group moved on: the commit is void, the next owner replays from the last good one.
_STALE_COMMIT = {
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.FENCED_MEMBER_EPOCH,
    KafkaError.STALE_MEMBER_EPOCH,
    KafkaError._NO_OFFSET,
}

_Key = tuple[str, int]  # topic, partition
_Header = tuple[str, str | bytes | None]
_Out = tuple[str, bytes, bytes, list[_Header]]  # topic, key, value, extra headers


def plant_from_topic(topic: str) -> str:
    return topic[len(RAW_PREFIX) :] if topic.startswith(RAW_PREFIX) else "default"


def decode(payload: bytes | None, plant_id: str) -> Reading | Rejection:
    """A raw message as a Reading, or the reason it cannot be one. Never raises.

    A value that is not a number (e.g. ``"7.1"`` or ``"ERR"``) still makes a reading: stored with
    quality bad, so the operator sees the probe sending garbage. Anything without the identity of a
    reading (sensor, parameter, timestamp) is a rejection, for the dead-letter topic.
    """
    if payload is None:
        return Rejection("empty", "message has no value")
    try:
        d = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return Rejection("not_json", str(e)[:200])
    if not isinstance(d, dict):
        return Rejection("not_an_object", f"expected a JSON object, got {type(d).__name__}")
    value = d.get("value")
    not_numeric = value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float)
    )
    if not_numeric:
        d = {**d, "value": None}
    r = reading_from_dict(d, plant_id=plant_id)
    if isinstance(r, Reading) and not_numeric:
        r.flag(Quality.BAD, f"not_numeric:{type(value).__name__}")
    return r


@dataclass
class _Batch:
    readings: list[Reading] = field(default_factory=list)
    alarms: list[AlarmEvent] = field(default_factory=list)
    windows: list[WindowAggregate] = field(default_factory=list)
    messages: list[_Out] = field(default_factory=list)
    done: set[str] = field(default_factory=set)


class PublishFailed(Exception):
    """Some messages were not confirmed by Kafka; they stay queued for the next attempt."""


class Publisher:
    """Idempotent producer for the processor's output topics; ``publish`` returns only once every
    message of the batch is confirmed (or raises, keeping the unconfirmed ones for a retry)."""

    def __init__(self, conf: dict[str, Any], metrics: Metrics, stop: threading.Event) -> None:
        self.metrics = metrics
        self._stop = stop
        self._producer = Producer(
            {
                **conf,
                "enable.idempotence": True,
                "acks": "all",
                "compression.type": "lz4",
                "linger.ms": 10,
                "message.timeout.ms": 30000,
                "queue.buffering.max.messages": 200_000,
            }
        )

    def publish(self, messages: list[_Out]) -> None:
        failed: list[int] = []
        errors: Counter[str] = Counter()

        def report(i: int) -> Callable[[KafkaError | None, Message], None]:
            def cb(err: KafkaError | None, msg: Message) -> None:
                if err is not None:
                    failed.append(i)
                    errors[err.name()] += 1

            return cb

        p = self._producer
        for i, (topic, key, value, headers) in enumerate(messages):
            while True:
                try:
                    p.produce(topic, value, key, on_delivery=report(i), headers=HEADERS + headers)
                    break
                except BufferError:
                    p.poll(0.05)
        while p.flush(1.0) > 0:
            if self._stop.is_set():
                raise PublishFailed("stopping with messages unconfirmed")
        for name, n in errors.items():
            self.metrics.kafka_delivery_failures.labels(reason=name).inc(n)
        if failed:
            keep = set(failed)
            messages[:] = [m for i, m in enumerate(messages) if i in keep]
            raise PublishFailed(f"{len(keep)} messages not delivered ({', '.join(errors)})")
        for topic, n in Counter(m[0] for m in messages).items():
            self.metrics.kafka_delivered.labels(topic=topic).inc(n)

    def close(self) -> None:
        self._producer.flush(5.0)


class RawConsumer:
    """The consume → process → store/publish → commit loop, on its own thread."""

    def __init__(
        self,
        config: ProcessorConfig,
        kafka_conf: dict[str, Any],
        validator: Validator,
        alarms: AlarmEngine,
        store: InfluxStore,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.validator = validator
        self.alarms = alarms
        self.store = store
        self.metrics = metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kafka_conf = kafka_conf
        self._windows: dict[_Key, PartitionWindows] = {}
        self._last_commit: dict[_Key, tuple[int, str]] = {}
        self._caught_up: set[_Key] = set()  # partitions read to their end (for idle flush)
        self._paused = False
        self._last_activity: dict[_Key, float] = {}  # monotonic time of the last message or EOF
        self._last_nudge = time.monotonic()
        self._consumer: Consumer | None = None
        self._publisher: Publisher | None = None
        # For /health: when the sinks started failing, and why.
        self.sink_down_since: float | None = None
        self.last_error = ""
        self.running = False
        self.crashed: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="processor-consume", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

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
            "enable.partition.eof": True,
        }

    def _run(self) -> None:
        try:
            self._publisher = Publisher(self._kafka_conf, self.metrics, self._stop)
            consumer = self._consumer = Consumer(self._consumer_conf())
            consumer.subscribe(
                [self.config.topic_pattern],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_revoke,
            )
            self.running = True
            try:
                while not self._stop.is_set():
                    msgs = consumer.consume(self.config.batch_size, self.config.batch_timeout)
                    self._nudge_stale(msgs)
                    batch = self._process(msgs)
                    if not self._deliver(batch):
                        break
                    self._commit()
            finally:
                self.running = False
                self._publisher.close()
                consumer.close()
        except BaseException as e:  # the service reports it unhealthy; systemd restarts us
            self.crashed = e
            log.exception("processor consumer stopped on an error")

    # -- rebalance -----------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
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
            self._last_commit.pop(key, None)
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
        # Open windows of a revoked partition are dropped, not flushed: the next owner rebuilds
        # them from the committed offset. Everything before it is already written and committed.
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._windows.pop(key, None)
            self._last_commit.pop(key, None)
            self._caught_up.discard(key)
            self._last_activity.pop(key, None)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
        log.info("revoked %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    # -- processing ----------------------------------------------------------------------------

    def _windows_for(self, topic: str, partition: int) -> PartitionWindows:
        key = (topic, partition)
        pw = self._windows.get(key)
        if pw is None:  # assignment callback missed (should not happen): recover the checkpoint
            assert self._consumer is not None
            self._on_assign(self._consumer, [TopicPartition(topic, partition)])
            pw = self._windows[key]
        return pw

    def _process(self, msgs: list[Message]) -> _Batch:
        t0 = time.perf_counter()
        now = time.time()
        batch = _Batch()
        c = self.config
        received: Counter[str] = Counter()
        processed: Counter[tuple[str, str]] = Counter()
        late: Counter[str] = Counter()
        raised: Counter[tuple[str, str]] = Counter()
        check, evaluate = self.validator.check, self.alarms.evaluate
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._caught_up.add((msg.topic() or "", msg.partition() or 0))
                elif err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    log.info("no topic matches %s yet", self.config.topic_pattern)
                else:
                    log.warning("consume error: %s", err)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
            self._caught_up.discard((topic, partition))
            pw = self._windows_for(topic, partition)
            topic_plant = plant_from_topic(topic)
            payload = msg.value()
            r = decode(payload, topic_plant)
            if isinstance(r, Rejection):
                received[topic_plant] += 1
                processed[("dead_letter", topic_plant)] += 1
                self.metrics.rejected_payloads.labels(source="kafka", reason=r.reason).inc()
                batch.messages.append(
                    (
                        c.dead_letter_topic,
                        msg.key() or b"",
                        payload or b"",
                        [
                            ("reason", r.reason.encode()),
                            ("detail", r.detail.encode()),
                            ("source-topic", topic.encode()),
                            ("source-partition", str(partition).encode()),
                            ("source-offset", str(offset).encode()),
                        ],
                    )
                )
                pw.seen(offset)
                continue
            check(r, now)
            events = evaluate(r)
            plant = r.plant_id
            received[plant] += 1
            processed[(r.quality.value, plant)] += 1
            batch.readings.append(r)
            plant_key = plant.encode()
            batch.messages.append((c.validated_topic, plant_key, r.to_json(), []))
            for e in events:
                batch.alarms.append(e)
                batch.messages.append((c.alerts_topic, plant_key, e.to_json(), []))
                if e.state in ("raised", "re-raised"):
                    raised[(e.level, e.parameter)] += 1
            if pw.add(r, offset, now) is Outcome.LATE:
                late[plant] += 1
        for key, pw in self._windows.items():
            # Idle means nothing more to read, not that we were slow to read it (a rebalance or
            # an outage must not close windows whose readings are still in the partition).
            if key in self._caught_up:
                pw.flush_idle(now)
            batch.windows.extend(pw.take_closed())
        for w in batch.windows:
            batch.messages.append(
                (c.aggregated_topic, w.plant_id.encode(), json.dumps(w.to_dict()).encode(), [])
            )
        m = self.metrics
        for plant, n in received.items():
            m.messages_received.labels(source="kafka", plant_id=plant).inc(n)
        for (status, plant), n in processed.items():
            m.messages_processed.labels(status=status, plant_id=plant).inc(n)
        for plant, n in late.items():
            m.late_readings.labels(plant_id=plant).inc(n)
        for (level, parameter), n in raised.items():
            m.alerts_triggered.labels(level=level, parameter=parameter).inc(n)
        if msgs:
            m.processing_latency.labels(stage="process").observe(time.perf_counter() - t0)
        return batch

    # -- sinks ---------------------------------------------------------------------------------

    def _deliver(self, batch: _Batch) -> bool:
        """Write the batch to every sink; False only when stopping before it was all written."""
        attempt = 0
        while True:
            try:
                self._write(batch)
                if self._paused:
                    self._resume()
                return True
            except (StoreUnavailable, PublishFailed) as e:
                self.last_error = str(e)
                if self.sink_down_since is None:
                    self.sink_down_since = time.time()
                    log.error("sink down, consumption paused: %s", e)
                self._pause()
                if self._stop.wait(min(self.config.retry_max_seconds, 0.2 * 2 ** min(attempt, 10))):
                    return False
                attempt += 1
                self._hold()

    def _write(self, batch: _Batch) -> None:
        hist = self.metrics.processing_latency
        steps: list[tuple[str, Callable[[], None]]] = [
            ("store", lambda: self.store.write_readings(batch.readings)),
            ("alarms", lambda: self.store.write_alarms(batch.alarms)),
            ("windows", lambda: self.store.write_windows(batch.windows)),
        ]
        for name, step in steps:
            if name not in batch.done:
                t0 = time.perf_counter()
                step()
                batch.done.add(name)
                if name == "store" and batch.readings:
                    hist.labels(stage="store").observe(time.perf_counter() - t0)
        if "publish" not in batch.done:
            assert self._publisher is not None
            t0 = time.perf_counter()
            self._publisher.publish(batch.messages)
            batch.done.add("publish")
            if batch.messages:
                hist.labels(stage="publish").observe(time.perf_counter() - t0)
        if self.sink_down_since is not None:
            log.warning("sinks back after %.1f s", time.time() - self.sink_down_since)
            self.sink_down_since = None
            self.last_error = ""

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
        anything it hands us back (seek) and pause it, so memory stays at one batch."""
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

    def _commit(self) -> None:
        assert self._consumer is not None
        offsets = []
        for (topic, partition), pw in self._windows.items():
            cp = pw.commit_point()
            if cp is None or self._last_commit.get((topic, partition)) == (cp.offset, cp.metadata):
                continue
            offsets.append(TopicPartition(topic, partition, cp.offset, cp.metadata))
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
            return
        for tp in offsets:
            self._last_commit[(tp.topic, tp.partition)] = (tp.offset, tp.metadata or "")
        self.metrics.processing_latency.labels(stage="commit").observe(time.perf_counter() - t0)

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
        self.last_error = f"kafka: {err}"
        log.warning("kafka: %s", err)

    # -- introspection (health, tests) ---------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused

    def open_windows(self) -> int:
        return sum(pw.open_windows for pw in list(self._windows.values()))
