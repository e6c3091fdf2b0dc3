"""``[mqtt] workers = 2`` against the real Mosquitto: worker processes on shared subscriptions feed
the one buffer; every QoS 1 message is stored exactly once, also when a worker is SIGKILLed
mid-stream (its unacknowledged messages come again, to its restarted process, and those already
committed are recognised); the daemon leaves no worker behind when it stops."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from gateway.common.metrics import Metrics
from gateway.edge.acquire.mqtt.source import MqttConfig, Subscription
from gateway.edge.acquire.mqtt.workers import MqttWorkers
from gateway.edge.buffer import Buffer, BufferConfig
from gateway.edge.deadletter import DeadLetterStore
from gateway.edge.intake import Intake
from tests.support.gateway_harness import Gateway, GatewaySetup, Publisher
from tests.support.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MESSAGES = 4000


def stored_sensors(path: Path) -> Counter[str]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute("SELECT payload FROM records WHERE kind = 'reading'").fetchall()
    finally:
        con.close()
    return Counter(json.loads(p)["sensorId"] for (p,) in rows)


def forget_session(env: dict[str, str], client_id: str) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.username_pw_set(env["MQTT_USERNAME"], env["MQTT_PASSWORD"])
    c.connect(env["MQTT_HOST"], int(env["MQTT_PORT"]), clean_start=True)
    c.loop_start()
    time.sleep(0.3)
    c.disconnect()
    c.loop_stop()


def worker_config(env: dict[str, str], client_id: str, topic: str, **kw: Any) -> MqttConfig:
    return MqttConfig(
        enabled=True,
        host=env["MQTT_HOST"],
        port=int(env["MQTT_PORT"]),
        username=env["MQTT_USERNAME"],
        password=env["MQTT_PASSWORD"],
        client_id=client_id,
        subscriptions=[Subscription(topic=topic, plant_id="p1")],
        **kw,
    )


def test_two_workers_store_each_message_once_also_when_one_is_killed(
    mqtt_env: dict[str, str], tmp_path: Path
) -> None:
    prefix, client_id = f"t/{uuid.uuid4().hex[:10]}", f"gw-test-{uuid.uuid4().hex[:10]}"
    metrics = Metrics()
    buffer = Buffer(BufferConfig(path=str(tmp_path / "buffer.db")), "gw-1", metrics)
    dead = DeadLetterStore(tmp_path / "deadletter.db", max_rows=10_000)
    config = worker_config(
        mqtt_env, client_id, f"{prefix}/json/#", session_expiry=300, receive_maximum=200, workers=2
    )
    intake = Intake(buffer.submit, metrics)
    workers = MqttWorkers(config, intake.sink_for("mqtt"), metrics, dead, "gw-1", receipts=buffer)
    buffer.start()
    workers.start()
    publisher = None
    try:
        wait_until(lambda: workers.health()[0], 30, "both workers connected and subscribed")
        first = workers.pids()
        publisher = Publisher(mqtt_env)
        for i in range(MESSAGES):
            body = {"sensorId": f"k{i}", "parameter": "COD", "value": float(i), "unit": "mg/L"}
            publisher.publish(f"{prefix}/json/s{i % 10}", json.dumps(body).encode(), i)
            if i == MESSAGES // 4:
                wait_until(lambda: sum(stored_sensors(buffer.path).values()) > 200, 30, "rows")
                os.kill(first[0], signal.SIGKILL)  # mid-stream, with messages in flight
        publisher.wait_all_acknowledged()
        wait_until(
            lambda: len(stored_sensors(buffer.path)) >= MESSAGES, 120, "every message stored"
        )
        time.sleep(2)  # a redelivered copy, if one were stored again, would be there by now
        counts = stored_sensors(buffer.path)
        assert workers.pids()[0] != first[0], "the killed worker was started again"
        wait_until(lambda: workers.health()[0], 30, "the restarted worker subscribed")
    finally:
        if publisher is not None:
            publisher.close()
        workers.stop()
        buffer.stop()
        dead.close()
        for i in range(2):
            forget_session(mqtt_env, f"{client_id}-w{i}")
    assert set(counts) == {f"k{i}" for i in range(MESSAGES)}
    assert [k for k, n in counts.items() if n != 1] == []
    for pid in first:
        assert not _alive(pid)


@pytest.mark.parametrize("level", [logging.WARNING, logging.INFO])
def test_workers_log_at_the_gateways_level(
    mqtt_env: dict[str, str], tmp_path: Path, capfd: pytest.CaptureFixture[str], level: int
) -> None:
    """A worker shares the gateway's stderr: at --log-level warning its "connected" lines stay
    out (they leaked into the bench's output at INFO whatever the gateway's level)."""
    client_id = f"gw-test-{uuid.uuid4().hex[:10]}"
    config = worker_config(mqtt_env, client_id, f"t/{client_id}/#", session_expiry=60, workers=1)
    metrics, root = Metrics(), logging.getLogger()
    buffer = Buffer(BufferConfig(path=str(tmp_path / "buffer.db")), "gw-1", metrics)
    dead = DeadLetterStore(tmp_path / "deadletter.db", max_rows=100)
    workers = MqttWorkers(config, Intake(buffer.submit, metrics).sink_for("mqtt"), metrics, dead,
                          "gw-1", receipts=buffer)  # fmt: skip
    saved = root.level
    root.setLevel(level)
    buffer.start()
    try:
        workers.start()
        wait_until(lambda: workers.health()[0], 30, "the worker connected and subscribed")
    finally:
        workers.stop()
        root.setLevel(saved)
        buffer.stop()
        dead.close()
        forget_session(mqtt_env, f"{client_id}-w0")
    said = "mqtt-w0 INFO MQTT connected" in capfd.readouterr().err
    assert said is (level <= logging.INFO)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out.extend(int(c) for c in text)
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_the_daemon_with_workers_stores_mqtt_and_leaves_no_worker_behind_on_sigterm(
    kafka_env: dict[str, str], mqtt_env: dict[str, str], tmp_path: Path
) -> None:
    setup = GatewaySetup(
        tmp_path,
        kafka_env["KAFKA_BOOTSTRAP_SERVERS"],
        mqtt=mqtt_env,
        extra={"mqtt": {"workers": 2}},
    )
    gw = Gateway(setup.write(), tmp_path / "logs", env={"MQTT_PASSWORD": mqtt_env["MQTT_PASSWORD"]})
    publisher = None
    try:
        gw.start()
        gw.wait_serving()
        wait_until(
            lambda: gw.health()[1]["checks"]["mqtt"]["status"] == "healthy", 60, "MQTT workers"
        )
        assert gw.proc is not None
        workers = _children(gw.proc.pid)
        assert len(workers) == 2
        publisher = Publisher(mqtt_env)
        for i in range(50):
            body = {"sensorId": f"d{i}", "parameter": "pH", "value": 7.1, "unit": "pH"}
            publisher.publish(setup.json_topic(f"d{i}"), json.dumps(body).encode(), i)
        publisher.wait_all_acknowledged()
        wait_until(
            lambda: (
                gw.metric("iot_messages_received_total", source="mqtt", plant_id=setup.plant) >= 50
            ),
            60,
            "the readings durable",
        )
        assert gw.terminate() == 0
        assert not [p for p in workers if _alive(p)], "a worker outlived the daemon"
    finally:
        if publisher is not None:
            publisher.close()
        gw.close()
        for i in range(2):
            forget_session(mqtt_env, f"{setup.mqtt_client_id}-w{i}")
