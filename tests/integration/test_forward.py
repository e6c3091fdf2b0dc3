"""The forwarder against the real test Kafka (scripts/services): topics, keys, headers, order,
SASL_SSL, and a wrong password that must leave every reading buffered."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError

from gateway.common.metrics import Metrics
from gateway.common.model import AlarmEvent, Reading
from gateway.edge.buffer import Buffer, BufferConfig
from gateway.edge.deadletter import DeadLetterStore
from gateway.edge.forward import ForwardConfig, Forwarder
from tests.support.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def reading(i: int, sensor: str, plant: str) -> Reading:
    return Reading(
        sensor_id=sensor, parameter="COD", value=float(i), unit="mg/L",
        timestamp=1_790_000_000.0 + i, plant_id=plant, location="inlet",
    )  # fmt: skip


def plain(env: dict[str, str], **kw: Any) -> ForwardConfig:
    return ForwardConfig(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"], **kw)


def sasl(env: dict[str, str], password: str | None = None, **kw: Any) -> ForwardConfig:
    return ForwardConfig(
        bootstrap_servers=env["KAFKA_SASL_BOOTSTRAP_SERVERS"],
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username=env["KAFKA_SASL_USERNAME"],
        sasl_password=env["KAFKA_SASL_PASSWORD"] if password is None else password,
        ssl_ca_location=env["KAFKA_CA_FILE"],
        **kw,
    )


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def buffer(tmp_path: Path, metrics: Metrics) -> Iterator[Buffer]:
    buf = Buffer(BufferConfig(path=str(tmp_path / "buffer.db")), "gw-it", metrics)
    buf.start()
    yield buf
    buf.stop()


@pytest.fixture
def dead_letters(tmp_path: Path) -> Iterator[DeadLetterStore]:
    store = DeadLetterStore(tmp_path / "deadletter.db")
    yield store
    store.close()


def consume(env: dict[str, str], topics: list[str], want: Any, timeout: float = 60) -> list[Any]:
    """Read the topics from the start until ``want(messages)`` holds."""
    consumer = Consumer(
        {
            "bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"],
            "group.id": f"test-forward-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    got: list[Any] = []
    try:
        consumer.subscribe(topics)
        deadline = time.monotonic() + timeout
        while not want(got) and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.5):
                err = msg.error()
                if err is None:
                    got.append(msg)
                elif err.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise AssertionError(err)
    finally:
        consumer.close()
    return got


def by_sensor(messages: list[Any]) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = defaultdict(list)
    for m in messages:
        seqs[m.key().decode()].append(json.loads(m.value())["seq"])
    return seqs


def test_readings_and_alarms_reach_their_topics_with_keys_and_headers(
    kafka_env, buffer, metrics, dead_letters
):
    plant = f"it{uuid.uuid4().hex[:8]}"
    odd_plant = f"{plant}/east 2"  # not a legal topic name as it is
    records: list[Any] = [reading(i, f"cod-{i % 3}", plant) for i in range(300)]
    records += [reading(i, "cod-9", odd_plant) for i in range(20)]
    event_id = uuid.uuid4().hex
    alarm = AlarmEvent(
        alarm_id=f"{plant}:cod-1:COD:HH", event_id=event_id, sensor_id="cod-1",
        plant_id=plant, parameter="COD", condition="HH", level="critical", state="raised",
        value=600.0, threshold=500.0, timestamp=1_790_000_100.0, message="COD above 500 mg/L",
    )  # fmt: skip
    records.append(alarm)
    buffer.submit_wait(records, timeout=10)
    stored = {r.id: r.payload for r in buffer.fetch(1000)}
    fwd = Forwarder(plain(kafka_env), buffer, metrics, dead_letters)
    fwd.start()
    try:
        wait_until(lambda: buffer.stats()["rows"] == 0, 60, "the buffer to drain")
        assert fwd.health()[0]
    finally:
        fwd.stop()

    raw, odd = f"sensors.raw.{plant}", f"sensors.raw.{plant}_east_2"
    msgs = consume(kafka_env, [raw, odd], lambda got: len(got) >= 320)
    assert len(msgs) == 320
    assert {m.topic() for m in msgs} == {raw, odd}
    for m in msgs:
        doc = json.loads(m.value())
        assert m.key().decode() == doc["sensorId"]
        assert m.headers() == [("content-type", b"application/json"), ("source", b"iot-gateway")]
        assert m.value() == stored[doc["seq"]] and doc["gatewayId"] == "gw-it"
    for sensor, seqs in by_sensor(msgs).items():
        assert seqs == sorted(seqs), f"{sensor} out of order"
        assert len(seqs) == (20 if sensor == "cod-9" else 100)

    alerts = consume(
        kafka_env,
        ["sensors.alerts"],
        lambda got: any(json.loads(m.value())["eventId"] == event_id for m in got),
    )
    (alert,) = [m for m in alerts if json.loads(m.value())["eventId"] == event_id]
    assert alert.key() == b"cod-1"
    assert metrics.registry.get_sample_value("iot_kafka_delivered_total", {"topic": raw}) == 300
    assert metrics.registry.get_sample_value("iot_delivery_latency_seconds_count")


def test_order_per_sensor_holds_while_readings_keep_arriving(
    kafka_env, buffer, metrics, dead_letters
):
    plant = f"it{uuid.uuid4().hex[:8]}"
    sensors = [f"tss-{k}" for k in range(6)]
    fwd = Forwarder(
        plain(kafka_env, fetch_batch=200, max_in_flight=500), buffer, metrics, dead_letters
    )
    fwd.start()

    def source() -> None:
        for i in range(1000):
            buffer.submit([reading(i, s, plant) for s in sensors])
            if i % 50 == 0:
                time.sleep(0.01)

    feeder = threading.Thread(target=source)
    feeder.start()
    feeder.join()
    try:
        wait_until(lambda: buffer.stats() == {"rows": 0, "bytes": 0, "queued": 0}, 90, "drain")
    finally:
        fwd.stop()
    msgs = consume(kafka_env, [f"sensors.raw.{plant}"], lambda got: len(got) >= 6000)
    seqs = by_sensor(msgs)
    assert sorted(seqs) == sensors
    for sensor in sensors:
        values = [json.loads(m.value())["value"] for m in msgs if m.key().decode() == sensor]
        assert values == [float(i) for i in range(1000)], f"{sensor}: lost, doubled or reordered"
        assert seqs[sensor] == sorted(seqs[sensor])


def test_delivers_through_the_sasl_ssl_listener(kafka_env, buffer, metrics, dead_letters):
    plant = f"it{uuid.uuid4().hex[:8]}"
    buffer.submit_wait([reading(i, "ph-1", plant) for i in range(50)], timeout=10)
    fwd = Forwarder(sasl(kafka_env), buffer, metrics, dead_letters)
    fwd.start()
    try:
        wait_until(lambda: buffer.stats()["rows"] == 0, 60, "delivery over SASL_SSL")
    finally:
        fwd.stop()
    msgs = consume(kafka_env, [f"sensors.raw.{plant}"], lambda got: len(got) >= 50)
    assert by_sensor(msgs)["ph-1"] == sorted(by_sensor(msgs)["ph-1"])
    assert len(msgs) == 50


# By default librdkafka holds undelivered messages; with a message timeout they fail, and the
# forwarder keeps sending them again from the first failed row.
@pytest.mark.parametrize("extra", [{}, {"message.timeout.ms": 2000}], ids=["hold", "fail-resend"])
def test_wrong_password_logs_one_error_turns_unhealthy_and_keeps_the_rows(
    kafka_env, buffer, metrics, dead_letters, caplog, extra
):
    plant = f"it{uuid.uuid4().hex[:8]}"
    buffer.submit_wait([reading(i, "bod-1", plant) for i in range(40)], timeout=10)
    with caplog.at_level(logging.INFO, logger="gateway.edge.forward"):
        fwd = Forwarder(
            sasl(kafka_env, "not-the-password", extra=extra), buffer, metrics, dead_letters
        )
        fwd.start()
        try:
            wait_until(lambda: not fwd.health()[0], 30, "the forwarder to report the failure")
            time.sleep(12)  # librdkafka retries meanwhile: that must not add log lines
            ok, detail = fwd.health()
        finally:
            fwd.stop(timeout=1)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "Authentication failed" in errors[0].getMessage()
    assert "sasl_password" in errors[0].getMessage()  # says what to fix
    assert not ok and "refused" in detail["error"]
    assert buffer.stats()["rows"] == 40
    failures = metrics.registry.get_sample_value(
        "iot_kafka_delivery_failures_total", {"reason": "_MSG_TIMED_OUT"}
    )
    assert (failures or 0) >= (80 if extra else 0)  # failed, resent, failed again

    # Fixed credentials and a restart: everything goes out.
    fwd = Forwarder(sasl(kafka_env), buffer, metrics, dead_letters)
    fwd.start()
    try:
        wait_until(lambda: buffer.stats()["rows"] == 0, 60, "delivery after the fix")
    finally:
        fwd.stop()
    msgs = consume(kafka_env, [f"sensors.raw.{plant}"], lambda got: len(got) >= 40)
    assert sorted(json.loads(m.value())["value"] for m in msgs) == [float(i) for i in range(40)]


def test_a_buffer_it_cannot_read_does_not_stop_the_forwarder(
    kafka_env, buffer, metrics, dead_letters, caplog
):
    """The buffer file is damaged under the running gateway: the forwarder's read fails, it
    retries with back-off (saying so) instead of dying; the buffer moves the file aside and
    salvages what reads, and the forwarder sends the salvaged rows and the new ones."""
    plant = f"it{uuid.uuid4().hex[:8]}"
    buffer.submit_wait([reading(i, f"tds-{i % 4}", plant) for i in range(3000)], timeout=10)
    con = sqlite3.connect(buffer.path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    with open(buffer.path, "r+b") as f:  # leaf pages in the middle of the table, as a bad disk
        f.seek(40 * 4096)
        f.write(b"\xa5" * 4 * 4096)
    fwd = Forwarder(plain(kafka_env), buffer, metrics, dead_letters)
    with caplog.at_level(logging.WARNING, logger="gateway.edge.forward"):
        fwd.start()
        try:
            wait_until(lambda: buffer.generation == 1, 60, "the buffer to replace its file")
            buffer.submit_wait([reading(5000, "tds-0", plant)], timeout=10)
            wait_until(lambda: buffer.stats()["rows"] == 0, 60, "the buffer to drain")
            assert fwd._thread is not None and fwd._thread.is_alive()
            wait_until(lambda: fwd.health()[0], 30, "the forwarder healthy again")
        finally:
            fwd.stop()
    assert any("cannot read the buffer" in r.getMessage() for r in caplog.records)
    msgs = consume(kafka_env, [f"sensors.raw.{plant}"], lambda got: len(got) >= 2501)
    values = sorted(json.loads(m.value())["value"] for m in msgs)
    assert values[-1] == 5000.0
    assert len(values) == len(set(values)) >= 2501  # the salvaged readings, each once


@pytest.mark.parametrize("kind", ["env", "file"])
def test_a_refused_password_says_how_to_change_it(
    kafka_env, buffer, metrics, dead_letters, caplog, monkeypatch, tmp_path, kind
):
    """A reload cannot change the environment: for env: the log line says to restart (or to move
    the password to a credential file); for file: it names the file a reload reads again."""
    monkeypatch.setenv("TEST_KAFKA_PW", "not-the-password")
    wrong = tmp_path / "kafka-password"
    wrong.write_text("not-the-password")
    reference = "env:TEST_KAFKA_PW" if kind == "env" else f"file:{wrong}"
    with caplog.at_level(logging.INFO, logger="gateway.edge.forward"):
        fwd = Forwarder(sasl(kafka_env, reference), buffer, metrics, dead_letters)
        fwd.start()
        try:
            wait_until(lambda: not fwd.health()[0], 30, "the forwarder to report the failure")
        finally:
            fwd.stop(timeout=1)
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    if kind == "env":
        assert "environment variable TEST_KAFKA_PW" in error, error
        assert "restart" in error and "cannot change" in error, error
        assert "file:" in error and "cred:" in error, error  # the way that reloads
    else:
        assert str(wrong) in error and "reload" in error, error
        assert "restart" not in error, error


def test_the_heap_is_trimmed_once_a_backlog_is_out_not_for_live_readings(
    kafka_env, buffer, metrics, dead_letters, monkeypatch
):
    """After a backlog drains, what it took in librdkafka and Python is handed back to the system
    (glibc would keep it as RSS); the few rows in flight of a steady flow trim nothing."""
    trims: list[float] = []
    monkeypatch.setattr("gateway.edge.forward.trim_heap", lambda: trims.append(time.monotonic()))
    plant = f"trim{uuid.uuid4().hex[:8]}"
    buffer.submit_wait([reading(i, f"s{i % 10}", plant) for i in range(5000)], 30)
    fwd = Forwarder(plain(kafka_env), buffer, metrics, dead_letters)
    fwd.start()
    try:
        wait_until(lambda: buffer.stats()["rows"] == 0, 60, "the backlog sent")
        wait_until(lambda: len(trims) == 1, 10, "the heap trimmed")
        for i in range(20):
            buffer.submit_wait([reading(i, "live", plant)], 10)
        wait_until(lambda: buffer.stats()["rows"] == 0, 30, "the live rows sent")
        assert len(trims) == 1
    finally:
        fwd.stop()
