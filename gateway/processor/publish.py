"""The processor's Kafka output: validated readings, alarm events, windows and dead letters.

Messages are produced as soon as a batch is processed (pre-encoded bytes, constant headers) and
confirmed later: each batch has a ``Delivery`` that its messages' reports count into, and the sink
writer waits for it before the batch's offsets may be committed. Only the writer threads serve
delivery reports (``poll``), one at a time (a lock), so a ``Delivery``'s counters each have a
single writer at a time: ``sent`` the consumer thread (or the writer, for retries, once the batch
is handed over), ``confirmed`` and ``failed`` whichever writer thread serves the report.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from gateway.common.metrics import Metrics

Header = tuple[str, str | bytes | None]
HEADERS: list[Header] = [("content-type", b"application/json"), ("source", b"edge-processor")]


class PublishFailed(Exception):
    """Some messages were not confirmed by Kafka; they are produced again on the next attempt."""


class Delivery:
    """Kafka confirmations for one batch's messages."""

    __slots__ = ("confirmed", "errors", "failed", "sent", "topics")

    def __init__(self) -> None:
        self.sent = 0
        self.confirmed = 0
        self.failed: list[tuple[str, bytes, bytes, list[Header]]] = []
        self.errors: Counter[str] = Counter()
        self.topics: Counter[str] = Counter()

    def report(self, err: KafkaError | None, msg: Message) -> None:
        self.confirmed += 1
        if err is not None:
            headers: list[Header] = list(msg.headers() or [])  # type: ignore[arg-type]
            self.failed.append((msg.topic() or "", msg.key() or b"", msg.value() or b"", headers))
            self.errors[err.name()] += 1

    @property
    def pending(self) -> int:
        return self.sent - self.confirmed


class Publisher:
    """Idempotent producer for the processor's output topics."""

    def __init__(self, conf: dict[str, Any], metrics: Metrics, stop: threading.Event) -> None:
        self.metrics = metrics
        self._stop = stop
        self._poll_lock = threading.Lock()  # reports are served by one writer thread at a time
        self._producer = Producer(
            {
                **conf,
                "enable.idempotence": True,
                "acks": "all",
                "compression.type": "lz4",
                "linger.ms": 5,
                "message.timeout.ms": 30000,
                # Far above what the bounded sink queue lets be in flight: produce never blocks.
                "queue.buffering.max.messages": 1_000_000,
            }
        )

    @property
    def produce(self) -> Any:
        """The producer's own ``produce``, for the hot loop: the caller counts into the Delivery
        and falls back to ``send`` on BufferError."""
        return self._producer.produce

    def send(
        self,
        delivery: Delivery,
        topic: str,
        value: bytes,
        key: bytes,
        headers: list[Header] = HEADERS,
    ) -> None:
        """Produce one message, counted into ``delivery``; never waits for the broker."""
        while True:
            try:
                self._producer.produce(
                    topic, value, key, on_delivery=delivery.report, headers=headers
                )
                break
            except BufferError:
                # Only the writer thread serves reports (it frees the queue); do not poll here.
                if self._stop.is_set():
                    raise PublishFailed("stopping with the producer queue full") from None
                time.sleep(0.005)
        delivery.sent += 1
        delivery.topics[topic] += 1

    def confirm(self, delivery: Delivery, abandon: threading.Event) -> None:
        """Wait until every message of ``delivery`` is confirmed (writer threads only). Failed ones
        are produced again and PublishFailed raised, for the caller's back-off and retry."""
        p, lock = self._producer, self._poll_lock
        while delivery.pending > 0:
            with lock:
                p.poll(0.005)
            if abandon.is_set():
                raise PublishFailed("stopping with messages unconfirmed")
        if delivery.failed:
            failed, errors = delivery.failed, delivery.errors
            delivery.failed, delivery.errors = [], Counter()
            for name, n in errors.items():
                self.metrics.kafka_delivery_failures.labels(reason=name).inc(n)
            for topic, key, value, headers in failed:
                delivery.topics[topic] -= 1
                self.send(delivery, topic, value, key, headers)
            raise PublishFailed(f"{len(failed)} messages not delivered ({', '.join(errors)})")
        for topic, n in delivery.topics.items():
            self.metrics.kafka_delivered.labels(topic=topic).inc(n)
        delivery.topics.clear()

    def poll(self) -> None:
        with self._poll_lock:
            self._producer.poll(0)

    def close(self) -> None:
        self._producer.flush(5.0)
