"""MQTT payloads become readings, or a labelled rejection; the parser never raises."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.common.config import ConfigError
from gateway.common.model import Quality, Reading, Rejection
from gateway.edge.acquire.mqtt.payload import Subscription, parse_message
from gateway.edge.acquire.mqtt.source import MqttConfig

T0 = 1_780_000_000.0
PATTERN = "plant/{plantId}/{sensorId}/{parameter}"
JSON = Subscription(topic="#")
NUMBER = Subscription(topic="plant/#", format="number", pattern=PATTERN, unit="mg/L")
ISA95 = Subscription(
    topic="site/#", format="isa95", pattern="site/{plantId}/{sensorId}/{parameter}"
)
FIXED = Subscription(
    topic="line1/ph", format="number", sensor_id="ph-01", parameter="pH", plant_id="north"
)
REASONS = {
    "too_large", "topic_mismatch", "not_json", "not_an_object", "missing_field", "wrong_type",
    "bad_timestamp", "invalid", "empty", "not_a_number",
}  # fmt: skip


def reading(**kw: object) -> bytes:
    d = {"sensorId": "ph-01", "plantId": "north", "parameter": "pH", "value": 7.2, "unit": "pH"}
    d.update(kw)
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()


def parse(sub: Subscription, topic: str, payload: bytes) -> list[Reading] | Rejection:
    return parse_message(topic, payload, sub, max_payload_bytes=1024, received_at=T0)


ACCEPTED = [
    # (subscription, topic, payload, expected (sensor, plant, parameter, value, unit, quality))
    (JSON, "readings/x", reading(), [("ph-01", "north", "pH", 7.2, "pH", "good")]),
    (
        JSON,
        "readings/x",
        b"[" + reading() + b"," + reading(sensorId="ph-02", value=6) + b"]",
        [("ph-01", "north", "pH", 7.2, "pH", "good"), ("ph-02", "north", "pH", 6.0, "pH", "good")],
    ),
    (JSON, "readings/x", reading(plantId=...), [("ph-01", "default", "pH", 7.2, "pH", "good")]),
    (JSON, "readings/x", reading(value=None), [("ph-01", "north", "pH", None, "pH", "bad")]),
    (JSON, "r/x", reading(value=float("nan")), [("ph-01", "north", "pH", None, "pH", "bad")]),
    (JSON, "r/x", reading(quality="uncertain"), [("ph-01", "north", "pH", 7.2, "pH", "uncertain")]),
    (NUMBER, "plant/p1/bod-3/BOD", b"12.5", [("bod-3", "p1", "BOD", 12.5, "mg/L", "good")]),
    (NUMBER, "plant/p1/bod-3/BOD", b" -4e2\n", [("bod-3", "p1", "BOD", -400.0, "mg/L", "good")]),
    (NUMBER, "plant/p1/bod-3/BOD", b"NaN", [("bod-3", "p1", "BOD", None, "mg/L", "bad")]),
    (NUMBER, "plant/p1/bod-3/BOD", b"1e999", [("bod-3", "p1", "BOD", None, "mg/L", "bad")]),
    (FIXED, "line1/ph", b"7", [("ph-01", "north", "pH", 7.0, "", "good")]),
    (
        ISA95,
        "site/s1/tss-1/TSS",
        b'{"ts": "2026-05-01T10:00:00Z", "value": 88, "unit": "mg/L", "quality": "good", "seq": 9}',
        [("tss-1", "s1", "TSS", 88.0, "mg/L", "good")],
    ),
    (ISA95, "site/s/t1/TSS", b'{"value":3,"quality":"bad"}', [("t1", "s", "TSS", 3.0, "", "bad")]),
]  # fmt: skip


@pytest.mark.parametrize(("sub", "topic", "payload", "expected"), ACCEPTED)
def test_accepted_payloads_become_readings(sub, topic, payload, expected):
    result = parse(sub, topic, payload)
    assert isinstance(result, list), result
    got = [(r.sensor_id, r.plant_id, r.parameter, r.value, r.unit, r.quality.value) for r in result]
    assert got == expected
    for r in result:
        r.to_json()  # every accepted reading can go on the wire


def test_timestamps_come_from_the_payload_or_the_time_of_receipt():
    (a,) = parse(JSON, "readings/x", reading(timestamp="2026-05-01T10:00:00.250Z"))
    (b,) = parse(ISA95, "site/s/t/TSS", b'{"value": 1, "ts": 1777629600250}')  # epoch ms
    (c,) = parse(ISA95, "site/s/t/TSS", b'{"value": 1, "ts": 1777629600.25}')  # epoch s
    (d,) = parse(NUMBER, "plant/p/s/BOD", b"1")
    assert a.timestamp == b.timestamp == c.timestamp == 1777629600.25
    assert d.timestamp == T0


def test_unusable_values_are_kept_and_say_why():
    (nan,) = parse(NUMBER, "plant/p/s/BOD", b"nan")
    (null,) = parse(JSON, "readings/x", reading(value=None))
    assert (nan.quality, nan.quality_reasons) == (Quality.BAD, ["nan"])
    assert (null.quality, null.quality_reasons) == (Quality.BAD, ["no_value"])


REJECTED = [
    (JSON, "readings/x", b"{not json", "not_json"),
    (JSON, "readings/x", b"\xff\xfe\x00garbage", "not_json"),
    (JSON, "readings/x", b"42", "not_an_object"),
    (JSON, "readings/x", b"[]", "empty"),
    (JSON, "readings/x", reading(value="7.2"), "wrong_type"),
    (JSON, "readings/x", reading(value=True), "wrong_type"),
    (JSON, "readings/x", reading(value=...), "missing_field"),
    (JSON, "readings/x", reading(sensorId=...), "missing_field"),
    (JSON, "readings/x", reading(sensorId=12), "wrong_type"),
    (JSON, "readings/x", reading(quality="great"), "wrong_type"),
    (JSON, "readings/x", reading(timestamp="yesterday"), "bad_timestamp"),
    (JSON, "readings/x", reading(timestamp="2026-05-01T10:00:00"), "bad_timestamp"),
    (JSON, "readings/x", b"[" + reading() + b", 5]", "not_an_object"),
    (JSON, "readings/x", b"[" * 100_000, "too_large"),
    (JSON, "readings/x", b"x" * 1025, "too_large"),
    (NUMBER, "plant/p1/bod-3", b"12.5", "topic_mismatch"),
    (NUMBER, "plant/p1/bod-3/BOD/extra", b"12.5", "topic_mismatch"),
    (NUMBER, "plant/p1//BOD", b"12.5", "topic_mismatch"),
    (NUMBER, "plant/p1/bod-3/BOD", b"twelve", "not_a_number"),
    (NUMBER, "plant/p1/bod-3/BOD", b"", "not_a_number"),
    (NUMBER, "plant/p1/bod-3/BOD", b"1_000", "not_a_number"),
    (NUMBER, "plant/p1/bod-3/BOD", b"\xc3\xa9", "not_a_number"),
    (NUMBER, "plant/p1/bod-3/BOD", b'{"value": 1}', "not_a_number"),
    (ISA95, "site/s1/tss-1/TSS", b'{"ts": 1}', "missing_field"),
    (ISA95, "site/s1/tss-1/TSS", b'{"value": "88"}', "wrong_type"),
    (ISA95, "site/s1/tss-1/TSS", b'{"value": 1, "unit": 5}', "wrong_type"),
    (ISA95, "site/s1/tss-1/TSS", b'{"value": 1, "seq": "a"}', "wrong_type"),
    (ISA95, "site/s1/tss-1/TSS", b'{"value": 1, "quality": 192}', "wrong_type"),
    (ISA95, "site/s1/tss-1/TSS", b'{"value": 1, "ts": 1e300}', "bad_timestamp"),
    (ISA95, "site/s1/tss-1/TSS", b'{"value": 1, "ts": [1]}', "bad_timestamp"),
    (ISA95, "site/s1/tss-1/TSS", b"[1, 2]", "not_an_object"),
]


@pytest.mark.parametrize(("sub", "topic", "payload", "reason"), REJECTED)
def test_malformed_payloads_are_rejected_with_a_reason(sub, topic, payload, reason):
    result = parse(sub, topic, payload)
    assert isinstance(result, Rejection), result
    assert result.reason == reason


def test_one_bad_item_rejects_the_whole_array_and_names_it():
    result = parse(JSON, "readings/x", b"[" + reading() + b"," + reading(value="x") + b"]")
    assert isinstance(result, Rejection)
    assert (result.reason, result.detail.split(":")[0]) == ("wrong_type", "item 1")


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"subscriptions": [{"topic": "a/#", "format": "xml"}]}, "mqtt.subscriptions[0].format"),
        ({"subscriptions": [{"topic": "a/#", "qos": 3}]}, "mqtt.subscriptions[0]"),
        ({"subscriptions": [{"topic": "a/#/b"}]}, "mqtt.subscriptions[0]"),
        ({"subscriptions": [{"topic": "a/#", "format": "number"}]}, "mqtt.subscriptions[0]"),
        (
            {"subscriptions": [{"topic": "a/#", "pattern": "a/{plant}/{sensorId}"}]},
            "mqtt.subscriptions[0]",
        ),
        ({"subscriptions": [{"topic": "a/#", "patern": "a"}]}, "mqtt.subscriptions[0].patern"),
        ({"enabled": True}, "mqtt"),
        ({"port": 0}, "mqtt"),
    ],
)
def test_config_mistakes_name_the_key(table, key):
    with pytest.raises(ConfigError) as e:
        MqttConfig.from_toml(table, source="gw.toml")
    assert (e.value.source, e.value.key) == ("gw.toml", key)


def test_config_resolves_the_password(monkeypatch, tmp_path):
    monkeypatch.setenv("MQTT_PW_TEST", "s3cret")
    table = {
        "enabled": True,
        "password": "env:MQTT_PW_TEST",
        "subscriptions": [{"topic": "plant/#", "format": "number", "pattern": PATTERN}],
    }
    cfg = MqttConfig.from_toml(table, source="gw.toml")
    assert cfg.password == "s3cret"
    assert cfg.subscriptions[0].qos == 1
    with pytest.raises(ConfigError) as e:
        MqttConfig.from_toml({**table, "password": "env:MQTT_PW_UNSET_X"}, source="gw.toml")
    assert e.value.key == "mqtt.password"
    # A disabled source needs no secret: the file still checks on a machine without it.
    off = MqttConfig.from_toml({"password": "env:MQTT_PW_UNSET_X"}, source="gw.toml")
    assert not off.enabled


# -------------------------------------------------------------------------- property tests

topics = st.lists(st.text(max_size=12), min_size=1, max_size=6).map("/".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
reading_keys = st.sampled_from(
    ["sensorId", "plantId", "parameter", "value", "unit", "quality", "timestamp", "seq", "ts"]
)
reading_like = st.dictionaries(reading_keys, json_values, max_size=8)
payloads = (
    st.binary(max_size=300)
    | st.text(max_size=100).map(str.encode)
    | json_values.map(lambda v: json.dumps(v).encode())
    | reading_like.map(lambda v: json.dumps(v).encode())
    | st.lists(reading_like, max_size=3).map(lambda v: json.dumps(v).encode())
)
subscriptions = st.sampled_from([JSON, NUMBER, ISA95, FIXED])


@settings(max_examples=600, deadline=None)
@given(sub=subscriptions, topic=topics, payload=payloads)
def test_arbitrary_topics_and_payloads_never_raise(sub, topic, payload):
    result = parse_message(topic, payload, sub, max_payload_bytes=200)
    if isinstance(result, Rejection):
        assert result.reason in REASONS
    else:
        assert result and all(isinstance(r, Reading) for r in result)
        for r in result:
            r.to_json()  # an accepted reading must be forwardable
            if r.value is None:
                assert r.quality is Quality.BAD and r.quality_reasons
            else:
                assert math.isfinite(r.value)


def test_deeply_nested_json_is_rejected_not_a_crash():
    payload = b"[" * 30_000 + b"]" * 30_000
    result = parse_message("readings/x", payload, JSON, max_payload_bytes=65536)
    assert isinstance(result, Rejection) and result.reason == "not_json"
