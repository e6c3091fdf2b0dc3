"""MQTT messages the gateway committed but whose acknowledgement never reached the broker: the
broker delivers them again (DUP set), and the gateway must recognise them instead of storing a
second copy with a new seq and, for payloads without a timestamp, a new time.

The gateway is the real process (``python -m gateway run``) and reaches Mosquitto through a relay
that drops what the gateway sends while the messages arrive, so the acks are lost for certain;
then either the connection is cut or the gateway is SIGKILLed, and the gateway (restarted) gets
every message again. Among the messages are byte-identical ones on one topic, which are distinct
messages (no DUP flag) and must all be stored. Afterwards Kafka holds each published message once,
and so do InfluxDB's raw points and 1-minute window counts (the processor run over the topic).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from gateway.common.model import Reading, reading_from_dict
from tests.support.gateway_harness import Gateway, GatewaySetup, KafkaCollector, Publisher
from tests.support.net import TcpRelay
from tests.support.processor_harness import (
    Dataset,
    Processor,
    ensure_buckets,
    influx_config,
    raw_points,
    stored_windows,
)
from tests.support.wait import wait_settled, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.timeout(400)]

SAME = 6  # byte-identical messages on one topic: distinct messages, each stored
OTHERS = 10  # messages with payloads of their own


def mqtt_healthy(gw: Gateway) -> bool:
    return bool(gw.health()[1]["checks"]["mqtt"]["status"] == "healthy")


def _mqtt_rows(kafka: KafkaCollector, setup: GatewaySetup, topic: str) -> list[Any]:
    return [m for m in kafka.snapshot(topic, setup.gateway_id) if m.key.startswith("mq-")]


@pytest.mark.parametrize("how", ["connection cut", "gateway SIGKILLed"])
def test_messages_committed_but_not_acknowledged_are_stored_once_when_redelivered(
    how: str,
    kafka_env: dict[str, str],
    mqtt_env: dict[str, str],
    influx_env: dict[str, str],
    tmp_path: Path,
) -> None:
    relay = TcpRelay(mqtt_env["MQTT_HOST"], int(mqtt_env["MQTT_PORT"]))
    setup = GatewaySetup(
        tmp_path,
        kafka_env["KAFKA_BOOTSTRAP_SERVERS"],
        mqtt={**mqtt_env, "MQTT_PORT": str(relay.port)},
    )
    plant = f"{setup.plant}-a"  # the processor harness reads the topics of p<run>-*
    topic = f"sensors.raw.{plant}"

    def number(sensor: str) -> str:
        return f"t/{setup.run}/num/{plant}/{sensor}/flow_rate"

    messages = [(number("mq-same"), b"100.0")] * SAME + [
        (number(f"mq-{i}"), f"{200 + i}.5".encode()) for i in range(OTHERS)
    ]
    gw = Gateway(setup.write(), tmp_path / "logs", env={"MQTT_PASSWORD": mqtt_env["MQTT_PASSWORD"]})
    publisher = None
    with relay, KafkaCollector(setup.kafka, [topic]) as kafka:
        try:
            gw.start()
            gw.wait_serving()
            wait_until(lambda: mqtt_healthy(gw), 60, "the gateway's MQTT subscription")
            publisher = Publisher(mqtt_env)
            relay.hold_upstream = True  # from now on the gateway's PUBACKs never reach the broker
            for n, (t, payload) in enumerate(messages):
                publisher.publish(t, payload, n)
            publisher.wait_all_acknowledged()
            # Committed (Kafka has them, so the buffer had them), never acknowledged.
            wait_until(
                lambda: len(_mqtt_rows(kafka, setup, topic)) >= len(messages),
                60,
                "the first deliveries in Kafka",
            )
            if how == "connection cut":
                relay.hold_upstream = False
                relay.cut()  # the gateway reconnects; the broker sends every message again
            else:
                gw.kill()
                relay.hold_upstream = False
                gw.start()
                gw.wait_serving()
            wait_until(lambda: mqtt_healthy(gw), 60, "the MQTT subscription after the break")
            publisher.publish(number("mq-marker"), b"1.0", "marker")
            publisher.wait_all_acknowledged()
            wait_until(
                lambda: any(m.key == "mq-marker" for m in _mqtt_rows(kafka, setup, topic)),
                60,
                "the marker in Kafka",
            )
            time.sleep(3)  # let a redelivered copy, if any were stored, reach Kafka too
            rows = _mqtt_rows(kafka, setup, topic)
        finally:
            if publisher is not None:
                publisher.close()
            gw.close()

    per_sensor: dict[str, int] = {}
    for m in rows:
        per_sensor[m.key] = per_sensor.get(m.key, 0) + 1
    expected = {"mq-same": SAME, "mq-marker": 1, **{f"mq-{i}": 1 for i in range(OTHERS)}}
    assert per_sensor == expected, f"{how}: rows per sensor in Kafka"
    assert len({m.value["seq"] for m in rows}) == len(rows)

    # InfluxDB, through the processor: one raw point per message, and windows counting each once.
    readings = [r for r in (reading_from_dict(m.value) for m in rows) if isinstance(r, Reading)]
    data = Dataset(setup.run, [plant], sorted(readings, key=lambda r: r.timestamp))
    env = {**kafka_env, **influx_env}
    ensure_buckets(env)
    cfg = influx_config(env)
    proc = Processor(data, env, env, tmp_path / "processor")
    (tmp_path / "processor").mkdir()
    proc.start()
    try:
        with cfg.client() as client:

            def stored() -> tuple[int, int]:
                points = raw_points(client, cfg, data)
                counted = sum(w.count for w in stored_windows(client, cfg, data).values())
                return len(points), counted

            wait_settled(stored, lambda: stored() == (len(rows), len(rows)), 180, "InfluxDB")
            assert stored() == (len(rows), len(rows)), "raw points and window counts"
    finally:
        proc.stop_all()
        proc.delete_topics()
