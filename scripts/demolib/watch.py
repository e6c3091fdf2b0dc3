"""What the demo shows, gathered while it runs: the processor's output topics (validated readings,
alarm events, predictions) read from their ends at start, and each gateway's /health and /metrics.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

TOPICS = ("sensors.validated", "sensors.alerts", "sensors.predictions")


@dataclass
class Latest:
    value: float | None
    unit: str
    quality: str
    location: str


@dataclass
class PlantState:
    latest: dict[tuple[str, str], Latest] = field(default_factory=dict)  # (sensor, parameter)
    alarms: dict[str, dict[str, Any]] = field(default_factory=dict)  # sensor/param/condition
    events: dict[str, dict[str, Any]] = field(default_factory=dict)  # event id -> event
    predictions: list[tuple[float, str, float, str]] = field(default_factory=list)

    def active(self) -> list[dict[str, Any]]:
        return [e for e in self.alarms.values() if e.get("state") != "cleared"]

    def raised(self) -> Counter[str]:
        return Counter(e["level"] for e in self.events.values() if e.get("state") != "cleared")

    def classes(self) -> list[str]:
        """The prediction classes in the order they were made, repeats collapsed."""
        out: list[str] = []
        for _, p, _, _ in self.predictions:
            if not out or out[-1] != p:
                out.append(p)
        return out


def ensure_topics(bootstrap: str, topics: tuple[str, ...]) -> None:
    """Create the topics that do not exist yet (on a fresh broker), with the broker's defaults."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    have = admin.list_topics(timeout=10).topics
    missing = [NewTopic(t) for t in topics if t not in have]
    for future in admin.create_topics(missing).values() if missing else ():
        with contextlib.suppress(KafkaException):  # made meanwhile by another client
            future.result(30)


class TopicWatcher(threading.Thread):
    """Keeps a ``PlantState`` per plant from the processor's output topics."""

    def __init__(self, bootstrap: str, plants: tuple[str, ...]) -> None:
        super().__init__(name="topic-watcher", daemon=True)
        self.state = {p: PlantState() for p in plants}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"demo-view-{time.time_ns()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "topic.metadata.refresh.interval.ms": 5000,
            }
        )
        ensure_topics(bootstrap, TOPICS)
        self.consumer.subscribe(list(TOPICS))
        self.since_ms = int(time.time() * 1000)  # older messages (earlier runs) are skipped

    def run(self) -> None:
        while not self.stopped.is_set():
            for m in self.consumer.consume(1000, 0.5):
                if m.error() or m.timestamp()[1] < self.since_ms:
                    continue
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    self._take(m.topic(), json.loads(m.value()))
        self.consumer.close()

    def _take(self, topic: str, d: dict[str, Any]) -> None:
        st = self.state.get(d.get("plantId", ""))
        if st is None:
            return
        with self.lock:
            if topic == "sensors.validated":
                st.latest[d["sensorId"], d["parameter"]] = Latest(
                    d.get("value"), d.get("unit", ""), d.get("quality", "?"), d.get("location", "")
                )
            elif topic == "sensors.alerts":
                st.events[d["eventId"]] = d
                # the gateway's local alarm and the processor's are one alarm to an operator
                st.alarms[f"{d['sensorId']}/{d['parameter']}/{d['condition']}"] = d
            else:
                st.predictions.append(
                    (
                        time.time(),
                        d["prediction"],
                        float(d.get("confidence", 0)),
                        d.get("model", ""),
                    )
                )


def http_get(port: int, path: str, timeout: float = 2.0) -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return None
    return data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")


@dataclass
class GatewayStats:
    status: str = "down"
    buffered: int = 0
    received: float = 0.0
    rate: float = 0.0
    max_buffered: int = 0
    at: float = 0.0
    history: list[tuple[float, float]] = field(default_factory=list)  # (time, received), 10 s


def poll_gateway(port: int, prev: GatewayStats) -> GatewayStats:
    """The gateway's status, buffer depth and readings/s since the last poll."""
    now = time.monotonic()
    health_text = http_get(port, "/health")
    out = GatewayStats(
        max_buffered=prev.max_buffered, at=now, received=prev.received, history=prev.history
    )
    if health_text is None:
        return out
    with contextlib.suppress(ValueError):
        health = json.loads(health_text)
        out.status = health.get("status", "?")
        out.buffered = int(health.get("checks", {}).get("buffer", {}).get("rows", 0))
    received = 0.0
    for line in (http_get(port, "/metrics") or "").splitlines():
        m = re.match(r"^iot_messages_received_total(\{.*\})? ([0-9.e+-]+)$", line)
        if m:
            received += float(m.group(2))
    out.received = received
    out.history = [(t, n) for t, n in prev.history if now - t <= 10.0] + [(now, received)]
    t0, n0 = out.history[0]
    if now > t0:
        out.rate = max(0.0, received - n0) / (now - t0)
    out.max_buffered = max(prev.max_buffered, out.buffered)
    return out


def start_group_at_end(bootstrap: str, group: str, topics: tuple[str, ...]) -> None:
    """Commit ``group``'s offsets at the end of ``topics``, so a consumer group new to this run
    (the notifier's) starts with what happens now, not with earlier runs' history."""
    ensure_topics(bootstrap, topics)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        ends = []
        for topic in topics:
            for p in c.list_topics(topic, timeout=10).topics[topic].partitions:
                for _ in range(50):  # a partition just created may not have its leader yet
                    try:
                        end = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                        break
                    except KafkaException:
                        time.sleep(0.2)
                else:
                    raise RuntimeError(f"no leader for {topic}[{p}]")
                ends.append(TopicPartition(topic, p, end))
        c.commit(offsets=ends, asynchronous=False)
    finally:
        c.close()
