"""Kafka stopped for 60 s while readings flow: every reading still arrives, in order per sensor.

Stops and starts the shared test broker with scripts/services, so other Kafka tests running at
the same time will see the outage too.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections import defaultdict

import pytest
from confluent_kafka import Consumer, KafkaError, Message

from gateway.common.metrics import Metrics
from gateway.common.model import Reading
from gateway.edge.buffer import Buffer, BufferConfig
from gateway.edge.deadletter import DeadLetterStore
from gateway.edge.forward import ForwardConfig, Forwarder
from tests.support.services import ROOT
from tests.support.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.timeout(900)]

SENSORS = [f"flow-{k}" for k in range(5)]


def kafka(action: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "services"), action, "kafka"], check=True)


def read_all(bootstrap: str, topic: str, n: int, timeout: float = 120) -> dict[str, list[float]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-outage-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    values: dict[str, list[float]] = defaultdict(list)
    got = 0

    def add(msg: Message) -> None:
        key, value = msg.key(), msg.value()
        assert key is not None and value is not None
        values[key.decode()].append(json.loads(value)["value"])

    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        while got < n and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=0.5):
                err = msg.error()
                if err is not None:
                    assert err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART, err
                    continue
                add(msg)
                got += 1
        # a little longer, so duplicates would show up too
        for msg in consumer.consume(1000, timeout=3):
            if msg.error() is None:
                add(msg)
    finally:
        consumer.close()
    return values


def test_kafka_down_for_60_s_loses_and_reorders_nothing(kafka_env, tmp_path):
    plant = f"outage{uuid.uuid4().hex[:8]}"
    metrics = Metrics()
    buffer = Buffer(BufferConfig(path=str(tmp_path / "buffer.db")), "gw-outage", metrics)
    buffer.start()
    dead_letters = DeadLetterStore(tmp_path / "deadletter.db")
    fwd = Forwarder(
        ForwardConfig(bootstrap_servers=kafka_env["KAFKA_BOOTSTRAP_SERVERS"]),
        buffer,
        metrics,
        dead_letters,
    )
    fwd.start()
    stop = threading.Event()
    sent = [0]

    def source() -> None:  # 5 sensors x 100 readings/s, steadily
        i = 0
        while not stop.is_set():
            now = time.time()
            buffer.submit([Reading(s, "flow_rate", float(i), "m3/h", now, plant) for s in SENSORS])
            i += 1
            sent[0] = i
            time.sleep(0.01)

    feeder = threading.Thread(target=source)
    feeder.start()
    try:
        time.sleep(10)
        kafka("down")
        down_at = time.monotonic()
        wait_until(lambda: not fwd.health()[0], 45, "the forwarder to notice the outage")
        rows_during = buffer.stats()["rows"]
        time.sleep(max(0.0, 60 - (time.monotonic() - down_at)))
        assert buffer.stats()["rows"] > rows_during  # the buffer grew meanwhile
    finally:
        kafka("up")
    try:
        time.sleep(15)
        stop.set()
        feeder.join()
        wait_until(lambda: buffer.stats()["rows"] == 0, 300, "the buffer to drain")
        wait_until(lambda: fwd.health()[0], 60, "the forwarder to report healthy")
    finally:
        stop.set()
        fwd.stop()
        buffer.stop()
        dead_letters.close()

    n = sent[0]
    values = read_all(kafka_env["KAFKA_BOOTSTRAP_SERVERS"], f"sensors.raw.{plant}", n * 5)
    assert sorted(values) == SENSORS
    for sensor in SENSORS:
        assert values[sensor] == [float(i) for i in range(n)], f"{sensor}: lost or reordered"
