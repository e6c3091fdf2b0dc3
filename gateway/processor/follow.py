"""The live feed's view of every plant when several processor instances share the work.

An instance's consumer sees only the partitions it owns, so its ``LiveHub`` hears only of their
sensors. ``TopicFollower`` reads the small output topics every instance writes, alarm events and
closed 1-minute windows (``alerts_topic``, ``aggregated_topic``), in a consumer group of its own
(a fresh id per start, nothing committed), so every instance's feed has every plant. It starts an
hour back (the chart's span), so a restarted instance shows the last hour and the alarms still
active. The hub de-duplicates what it also heard from its own consumer (event ids; windows by
partial).

What the topics do not carry stays per instance: the newest raw reading of each sensor and its
gateway (the status messages) come only from the partitions the instance owns.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Protocol

import orjson
from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from gateway.common.logs import RateLimitedLog
from gateway.common.model import AlarmEvent
from gateway.common.supervise import Heartbeat
from gateway.processor.aggregate import WindowAggregate

log = logging.getLogger(__name__)

SINCE_SECONDS = 3600


class Followed(Protocol):
    def on_followed(self, alerts: list[AlarmEvent], windows: list[WindowAggregate]) -> None: ...


class TopicFollower:
    """One thread, one consumer of the alerts and aggregated topics; see the module docstring."""

    def __init__(
        self,
        kafka_conf: dict[str, Any],
        *,
        alerts_topic: str,
        aggregated_topic: str,
        group_prefix: str,
        hub: Followed,
        metadata_refresh_ms: int = 30_000,
        since_seconds: float = SINCE_SECONDS,
    ) -> None:
        self.alerts_topic = alerts_topic
        self.aggregated_topic = aggregated_topic
        self.hub = hub
        self.since_seconds = since_seconds
        self._conf = {
            **kafka_conf,
            "group.id": f"{group_prefix}-live-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "latest",
            "topic.metadata.refresh.interval.ms": metadata_refresh_ms,
            "fetch.wait.max.ms": 50,  # alarms of other instances' plants, soon
            "error_cb": self._on_error,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat = Heartbeat("live feed follower", progress=False)
        self._bad = RateLimitedLog(log, 60.0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="live-follow", daemon=True)
        self._thread.start()
        self._beat.watch(self._thread)

    def heartbeats(self) -> list[Heartbeat]:
        return [self._beat]

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except Exception:
                log.exception("live feed: following the output topics failed; again in 5 s")
                self._stop.wait(5.0)

    def _follow(self) -> None:
        consumer = Consumer(self._conf)
        consumer.subscribe([self.alerts_topic, self.aggregated_topic], on_assign=self._rewind)
        try:
            while not self._stop.is_set():
                # What is there, else wait for a first message and let a burst come with it
                # (consume waits for all it asks for: asking for 1000 would wait the timeout).
                msgs = consumer.consume(1000, 0)
                if not msgs:
                    msgs = consumer.consume(1, 0.5)
                    if msgs:
                        msgs.extend(consumer.consume(999, 0.005))
                if msgs:
                    self._hand_over(msgs)
        finally:
            consumer.close()

    def _rewind(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start each partition at the first message of the last hour (its end if none)."""
        since_ms = int((time.time() - self.since_seconds) * 1000)
        wanted = [TopicPartition(tp.topic, tp.partition, since_ms) for tp in partitions]
        try:
            found = consumer.offsets_for_times(wanted, timeout=10)
        except KafkaException as e:
            log.warning("live feed: cannot look an hour back (%s); following from now", e)
            found = [TopicPartition(tp.topic, tp.partition, OFFSET_END) for tp in partitions]
        consumer.assign(found)

    def _hand_over(self, msgs: list[Any]) -> None:
        alerts: list[AlarmEvent] = []
        windows: list[WindowAggregate] = []
        for msg in msgs:
            if msg.error() is not None:
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    self._bad.warning("consume", "live feed: %s", msg.error())
                continue
            try:
                doc = orjson.loads(msg.value())
                if msg.topic() == self.alerts_topic:
                    alerts.append(AlarmEvent.from_dict(doc))
                else:
                    windows.append(WindowAggregate.from_dict(doc))
            except (orjson.JSONDecodeError, KeyError, ValueError, TypeError) as e:
                self._bad.warning(
                    "decode", "live feed: skipped a message on %s: %s", msg.topic(), e
                )
        if alerts or windows:
            self.hub.on_followed(alerts, windows)

    def _on_error(self, err: KafkaError) -> None:
        self._bad.warning(str(err.code()), "live feed: kafka: %s", err)
