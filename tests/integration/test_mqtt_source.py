"""The MQTT source against the real Mosquitto: readings arrive, garbage is dead-lettered without
stopping anything, and a message is acknowledged only once its reading is durable."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from gateway.common.metrics import Metrics
from gateway.edge.acquire.mqtt.source import MqttConfig, MqttSource, Subscription
from gateway.edge.deadletter import DeadLetterStore
from gateway.edge.intake import Intake
from tests.support.sinks import RecordingSink
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration


class Harness:
    def __init__(self, env: dict[str, str], tmp_path: Path) -> None:
        self.env = env
        self.prefix = f"t/{uuid.uuid4().hex[:10]}"
        self.client_id = f"gw-test-{uuid.uuid4().hex[:10]}"
        self.dead = DeadLetterStore(tmp_path / "deadletter.db", max_rows=10_000)
        self.metrics = Metrics()
        self.sources: list[MqttSource] = []

    def config(self, *subs: Subscription, tls: bool = False, **kw: object) -> MqttConfig:
        env = self.env
        settings: dict[str, object] = {
            "enabled": True,
            "host": env["MQTT_HOST"],
            "port": int(env["MQTT_TLS_PORT"] if tls else env["MQTT_PORT"]),
            "tls": tls,
            "ca_file": env["MQTT_CA_FILE"] if tls else "",
            "username": env["MQTT_USERNAME"],
            "password": env["MQTT_PASSWORD"],
            "client_id": self.client_id,
            "session_expiry": 300,
            "subscriptions": list(subs) or [self.json_sub(), self.number_sub()],
        }
        return MqttConfig(**{**settings, **kw})  # type: ignore[arg-type]

    def json_sub(self) -> Subscription:
        return Subscription(topic=f"{self.prefix}/json/#")

    def number_sub(self) -> Subscription:
        return Subscription(
            topic=f"{self.prefix}/num/#",
            format="number",
            pattern=f"{self.prefix}/num/{{plantId}}/{{sensorId}}/{{parameter}}",
            unit="mg/L",
        )

    def start(self, sink: RecordingSink, config: MqttConfig | None = None) -> MqttSource:
        intake = Intake(sink, self.metrics)  # counts received readings, as in the daemon
        source = MqttSource(
            config or self.config(), intake.sink_for("mqtt"), self.metrics, self.dead, "gw-1"
        )
        source.start()
        self.sources.append(source)
        wait_until(lambda: source.health()[0], 20, "source connected and subscribed")
        return source

    def publisher(self) -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
        c.username_pw_set(self.env["MQTT_USERNAME"], self.env["MQTT_PASSWORD"])
        c.max_inflight_messages_set(500)
        c.connect(self.env["MQTT_HOST"], int(self.env["MQTT_PORT"]))
        c.loop_start()
        self.pub = c
        return c

    def publish(self, items: list[tuple[str, bytes]]) -> None:
        infos = [self.pub.publish(topic, payload, qos=1) for topic, payload in items]
        for info in infos:
            info.wait_for_publish(30)

    def sample(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(name)
        return 0.0 if value is None else value

    def rejected(self, reason: str) -> float:
        labels = {"source": "mqtt", "reason": reason}
        return self.metrics.registry.get_sample_value("iot_rejected_payloads_total", labels) or 0.0

    def close(self) -> None:
        for s in self.sources:
            s.stop(drain_timeout=0)
        if hasattr(self, "pub"):
            self.pub.disconnect()
            self.pub.loop_stop()
        self.dead.close()


@pytest.fixture
def h(mqtt_env: dict[str, str], tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(mqtt_env, tmp_path)
    yield harness
    harness.close()


def reading_json(sensor: str, value: float, plant: str = "north") -> bytes:
    return json.dumps(
        {"sensorId": sensor, "plantId": plant, "parameter": "pH", "value": value, "unit": "pH"}
    ).encode()


def test_json_and_plain_number_payloads_become_readings(h):
    sink = RecordingSink()
    h.start(sink)
    h.publisher()
    h.publish(
        [
            (f"{h.prefix}/json/any", reading_json("ph-01", 7.2)),
            (f"{h.prefix}/num/south/bod-3/BOD", b"12.5"),
        ]
    )
    wait_until(lambda: len(sink.values()) == 2, 20, "both readings")
    got = sorted(
        (r.sensor_id, r.plant_id, r.parameter, r.value, r.unit, r.gateway_id) for r in sink.readings
    )
    assert got == [
        ("bod-3", "south", "BOD", 12.5, "mg/L", "gw-1"),
        ("ph-01", "north", "pH", 7.2, "pH", "gw-1"),
    ]
    for plant in ("north", "south"):
        labels = {"source": "mqtt", "plant_id": plant}
        assert h.metrics.registry.get_sample_value("iot_messages_received_total", labels) == 1
    assert h.sample("iot_active_connections") == 1


def malformed(prefix: str, i: int) -> tuple[str, bytes, str]:
    """The i-th malformed message: (topic, payload, expected reason)."""
    kind = i % 10
    num = f"{prefix}/num/north/s{i}/BOD"
    jsn = f"{prefix}/json/x"
    if kind == 0:
        return jsn, b"{not json " + str(i).encode(), "not_json"
    if kind == 1:
        return (
            jsn,
            json.dumps({"sensorId": "a", "parameter": "pH", "value": "7"}).encode(),
            ("wrong_type"),
        )
    if kind == 2:
        return jsn, json.dumps({"sensorId": "a", "parameter": "pH"}).encode(), "missing_field"
    if kind == 3:
        return jsn, b"[1, 2, 3]", "not_an_object"
    if kind == 4:
        return num, b"twelve", "not_a_number"
    if kind == 5:
        return f"{prefix}/num/north/s{i}", b"12.5", "topic_mismatch"
    if kind == 6:
        return jsn, reading_json("a", 1)[:-1] + b', "timestamp": "soon"}', "bad_timestamp"
    if kind == 7:
        return num, bytes(range(256)), "not_a_number"
    if kind == 8 and i % 100 == 8:  # ten payloads of 1 MB garbage
        return jsn, (b"\x00\xff garbage " * 100_000)[:1_000_000], "too_large"
    return jsn, b"", "not_json"


def test_a_thousand_malformed_payloads_are_dead_lettered_and_valid_ones_all_arrive(h, caplog):
    caplog.set_level(logging.WARNING, logger="gateway.edge.acquire.mqtt.source")
    sink = RecordingSink()
    source = h.start(sink)
    h.publisher()
    bad = [malformed(h.prefix, i) for i in range(1000)]
    messages: list[tuple[str, bytes]] = []
    expected_values = []
    for i, (topic, payload, _) in enumerate(bad):
        messages.append((topic, payload))
        if i % 2 == 0:  # a valid reading between every other pair of bad ones
            value = float(i)
            expected_values.append(value)
            if i % 4 == 0:
                messages.append((f"{h.prefix}/json/x", reading_json(f"ph-{i}", value)))
            else:
                messages.append((f"{h.prefix}/num/north/bod-{i}/BOD", str(value).encode()))
    h.publish(messages)

    wait_until(lambda: len(sink.values()) == len(expected_values), 20, "all valid readings")
    wait_until(lambda: h.dead.count() == 1000, 20, "every malformed payload dead-lettered")
    assert sorted(v for v in sink.values() if v is not None) == sorted(expected_values)
    assert source.health()[0]

    by_reason: dict[str, int] = {}
    for _, _, reason in bad:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    assert {r: h.rejected(r) for r in by_reason} == by_reason
    rows = h.dead.list(1000)
    assert {r.reason for r in rows} == set(by_reason)
    big = [r for r in rows if r.reason == "too_large"]
    assert len(big) == 10 and all(r.size == 1_000_000 and len(r.payload) <= 4096 for r in big)
    assert all(r.topic.startswith(h.prefix) and r.source == "mqtt" for r in rows)
    # Logged with rate limiting: about one line per reason, not one per payload.
    lines = [r for r in caplog.records if "rejected MQTT payload" in r.getMessage()]
    assert len(by_reason) <= len(lines) <= 2 * len(by_reason)

    # Every message was acknowledged: a new connection of the same session gets nothing back.
    source.stop()
    again = RecordingSink()
    h.start(again)
    h.publish([(f"{h.prefix}/num/north/marker/BOD", b"1")])
    wait_until(lambda: len(again.values()) >= 1, 20, "the marker")
    assert [r.sensor_id for r in again.readings] == ["marker"]


def test_messages_published_while_the_source_is_stopped_arrive_after_restart(h):
    first = h.start(RecordingSink())
    first.stop()
    h.publisher()
    h.publish([(f"{h.prefix}/num/north/s{i}/BOD", str(i).encode()) for i in range(50)])
    sink = RecordingSink()
    h.start(sink)
    wait_until(lambda: len(sink.values()) == 50, 20, "the 50 queued messages")
    assert sorted(sink.values()) == [float(i) for i in range(50)]


def test_a_message_never_made_durable_is_redelivered_after_reconnect(h):
    lost = RecordingSink(durable=False)
    first = h.start(lost)
    h.publisher()
    h.publish([(f"{h.prefix}/num/north/s{i}/BOD", str(i).encode()) for i in range(5)])
    wait_until(lambda: len(lost.values()) == 5, 20, "the first delivery")
    first.stop(drain_timeout=0)  # e.g. the gateway died before the buffer committed

    second = RecordingSink()
    source = h.start(second)
    wait_until(lambda: len(second.values()) == 5, 20, "the redelivery")
    assert sorted(second.values()) == [0.0, 1.0, 2.0, 3.0, 4.0]

    # The second delivery was durable, hence acknowledged: a third connection only gets new data.
    source.stop()
    third = RecordingSink()
    h.start(third)
    h.publish([(f"{h.prefix}/num/north/marker/BOD", b"9")])
    wait_until(lambda: len(third.values()) >= 1, 20, "the marker")
    assert [r.sensor_id for r in third.readings] == ["marker"]


def test_tls_with_ca_verification(h):
    sink = RecordingSink()
    h.start(sink, h.config(tls=True))
    h.publisher()
    h.publish([(f"{h.prefix}/json/x", reading_json("ph-tls", 6.5))])
    wait_until(lambda: len(sink.values()) == 1, 20, "the reading over TLS")
    assert sink.readings[0].sensor_id == "ph-tls"


def test_refused_credentials_leave_the_source_unhealthy_but_running(h):
    config = h.config(password="wrong", reconnect_min_delay=1, reconnect_max_delay=1)
    source = MqttSource(config, RecordingSink(), h.metrics, h.dead, "gw-1")
    source.start()
    h.sources.append(source)
    wait_until(lambda: "refused" in source.last_error, 20, "the broker's refusal")
    assert not source.health()[0]
    assert h.sample("iot_active_connections") == 0


def test_a_dropped_connection_is_re_established_and_readings_keep_arriving(h):
    sink = RecordingSink()
    source = h.start(sink, h.config(reconnect_min_delay=1, reconnect_max_delay=2))
    h.publisher()
    h.publish([(f"{h.prefix}/num/north/before/BOD", b"1")])
    wait_until(lambda: len(sink.values()) == 1, 20, "the first reading")

    # Another client taking over the session makes the broker drop the source's connection.
    kicker = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=h.client_id, protocol=mqtt.MQTTv5
    )
    kicker.username_pw_set(h.env["MQTT_USERNAME"], h.env["MQTT_PASSWORD"])
    kicker.on_connect = lambda c, *a: c.disconnect()
    kicker.connect(h.env["MQTT_HOST"], int(h.env["MQTT_PORT"]), clean_start=False)
    kicker.loop_forever()
    wait_until(lambda: source.last_error.startswith("connection lost"), 20, "the drop")

    wait_until(lambda: source.health()[0], 20, "the source reconnected")
    h.publish([(f"{h.prefix}/num/north/after/BOD", b"2")])
    wait_until(lambda: len(sink.values()) == 2, 20, "the reading after reconnect")
    assert [r.sensor_id for r in sink.readings] == ["before", "after"]
    assert h.sample("iot_active_connections") == 1


def test_fields_too_long_or_with_control_characters_are_dead_lettered_with_the_reason(h):
    sink = RecordingSink()
    h.start(sink)
    h.publisher()
    good = json.loads(reading_json("ph-ok", 7.0))
    bad = [
        # a newline in a tag would be escaped to a bare space in line protocol and lose the point
        ({**good, "sensorId": "ph\n1"}, "bad_characters", "sensorId"),
        ({**good, "location": "inlet\nchannel 2"}, "bad_characters", "location"),
        ({**good, "location": "x" * 1000}, "field_too_long", "location"),
    ]
    h.publish([(f"{h.prefix}/json/x", json.dumps(d).encode()) for d, _, _ in bad])
    # Topic levels become fields too; Mosquitto refuses control characters in topics itself.
    h.publish(
        [
            (f"{h.prefix}/num/north/{'s' * 129}/BOD", b"1"),
            (f"{h.prefix}/num/north/bod 3/BOD", b"2"),
            (f"{h.prefix}/num/north/marker/BOD", b"3"),
        ]
    )
    wait_until(lambda: h.dead.count() == 5, 20, "five dead letters")
    wait_until(lambda: len(sink.values()) == 1, 20, "the marker")
    assert [r.sensor_id for r in sink.readings] == ["marker"]
    rows = sorted(h.dead.list(10), key=lambda r: r.id)
    assert [(r.reason, r.detail.split(":")[0]) for r in rows] == [
        *((reason, field) for _, reason, field in bad),
        ("field_too_long", "sensorId"),
        ("bad_characters", "sensorId"),
    ]
    assert h.rejected("bad_characters") == 3 and h.rejected("field_too_long") == 2
