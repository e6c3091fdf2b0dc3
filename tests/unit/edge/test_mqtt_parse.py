"""MQTT payloads become readings, or a labelled rejection; the parser never raises.

The payload cases are data: ``tests/cases/mqtt/*.toml``, one file per subscription. A file holds
``received_at`` (the gateway's clock for every message), an ``[mqtt]`` section as in the config
file with exactly one ``[[mqtt.subscriptions]]``, and ``[[case]]`` tables:

    name = "..."                  # the test id, with the file's name
    topic = "plant/p1/bod-3/BOD"
    payload = "12.5"              # text, sent as UTF-8; or payload_hex = "ff fe 00" for bytes
    repeat = 1025                 # optional: the payload repeated this many times
    readings = [...]              # the readings it becomes, in order (see below)
    reject = "not_a_number"       # instead of readings: the rejection reason
    detail_starts_with = "..."    # optional, with reject

Each expected reading is an inline table of sensor_id, plant_id, parameter, value, unit and
quality; one without ``value`` must have none. ``timestamp`` and ``quality_reasons`` are checked
when given.

Config mistakes in ``[mqtt]`` are config cases: ``tests/cases/config/mqtt-*.toml``.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.common.config import ConfigError
from gateway.common.model import Quality, Reading, Rejection
from gateway.edge.acquire.mqtt.payload import Subscription, parse_message
from gateway.edge.acquire.mqtt.source import MqttConfig
from tests.support.services import ROOT

CASE_FILES = sorted((ROOT / "tests" / "cases" / "mqtt").glob("*.toml"))
CASE_KEYS = {
    "name",
    "topic",
    "payload",
    "payload_hex",
    "repeat",
    "readings",
    "reject",
    "detail_starts_with",
}
READING_KEYS = {"sensor_id", "plant_id", "parameter", "value", "unit", "quality"}
OPTIONAL_READING_KEYS = {"timestamp", "quality_reasons"}

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
    "bad_timestamp", "invalid", "empty", "not_a_number", "field_too_long", "bad_characters",
}  # fmt: skip


def _load_case_file(path: Path) -> tuple[Subscription, int, float, list[dict[str, Any]]]:
    data = tomllib.loads(path.read_text())
    assert set(data) == {"received_at", "mqtt", "case"}, f"{path.name}: unknown top-level keys"
    config = MqttConfig.from_toml(data["mqtt"], source=path)
    (subscription,) = config.subscriptions
    return subscription, config.max_payload_bytes, data["received_at"], data["case"]


def _cases() -> list[Any]:
    params = []
    for path in CASE_FILES:
        sub, max_bytes, received_at, cases = _load_case_file(path)
        params += [
            pytest.param(sub, max_bytes, received_at, c, id=f"{path.stem}/{c['name']}")
            for c in cases
        ]
    return params


def check_payload_case(
    sub: Subscription, max_bytes: int, received_at: float, case: dict[str, Any]
) -> None:
    assert set(case) <= CASE_KEYS, f"unknown case keys {set(case) - CASE_KEYS}"
    assert ("readings" in case) != ("reject" in case), "a case expects readings or a rejection"
    if "payload_hex" in case:
        payload = bytes.fromhex(case["payload_hex"])
    else:
        payload = case["payload"].encode()
    payload *= case.get("repeat", 1)
    result = parse_message(
        case["topic"], payload, sub, max_payload_bytes=max_bytes, received_at=received_at
    )
    if "reject" in case:
        assert isinstance(result, Rejection), result
        assert result.reason == case["reject"], result
        assert result.detail.startswith(case.get("detail_starts_with", "")), result
        return
    assert isinstance(result, list), result
    assert len(result) == len(case["readings"]), result
    for r, want in zip(result, case["readings"], strict=True):
        assert READING_KEYS - {"value"} <= set(want) <= READING_KEYS | OPTIONAL_READING_KEYS
        got = {
            "sensor_id": r.sensor_id, "plant_id": r.plant_id, "parameter": r.parameter,
            "value": r.value, "unit": r.unit, "quality": r.quality.value,
            "timestamp": r.timestamp, "quality_reasons": r.quality_reasons,
        }  # fmt: skip
        expected = {"value": None, **want}
        assert {k: got[k] for k in expected} == expected
        r.to_json()  # every accepted reading can go on the wire


@pytest.mark.parametrize(("sub", "max_bytes", "received_at", "case"), _cases())
def test_payload_cases(sub, max_bytes, received_at, case):
    check_payload_case(sub, max_bytes, received_at, case)


@pytest.mark.parametrize(
    ("file", "name", "change"),
    [
        ("number.toml", "decimal", {"readings": [{"value": 12.0}]}),
        ("number.toml", "NaN is kept as bad", {"readings": [{"value": 0.0}]}),
        (
            "number.toml",
            "nan is kept as bad with reason nan",
            {"readings": [{"quality_reasons": []}]},
        ),
        ("json.toml", "array of two readings", {"readings": [{}]}),
        ("json.toml", "not json", {"reject": "empty"}),
        (
            "json.toml",
            "one bad item rejects the whole array and names it",
            {"detail_starts_with": "item 0:"},
        ),
        ("isa95.toml", "ts in epoch seconds", {"readings": [{"timestamp": 1777629600.0}]}),
    ],
)
def test_a_case_with_a_wrong_expectation_fails(file: str, name: str, change: dict[str, Any]):
    sub, max_bytes, received_at, cases = _load_case_file(ROOT / "tests" / "cases" / "mqtt" / file)
    case = next(c for c in cases if c["name"] == name)
    check_payload_case(sub, max_bytes, received_at, case)
    wrong = {**case, **change}
    if "readings" in change:
        wrong["readings"] = [{**case["readings"][0], **change["readings"][0]}]
    with pytest.raises(AssertionError):
        check_payload_case(sub, max_bytes, received_at, wrong)


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
