import dataclasses
import json
import math
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.common import model
from gateway.common.model import (
    AlarmEvent,
    Quality,
    Reading,
    Receipt,
    Rejection,
    format_ts,
    parse_ts,
    reading_from_dict,
    reading_from_json,
)

GOOD = {
    "sensorId": "ph-1",
    "plantId": "north",
    "parameter": "pH",
    "value": 7.12,
    "unit": "pH",
    "timestamp": "2026-11-28T06:00:00.250Z",
    "location": "aeration-1",
}


def test_reading_round_trips_through_the_wire_json():
    r = reading_from_dict(GOOD)
    assert isinstance(r, Reading)
    r.gateway_id, r.seq = "gw-1", 42
    wire = json.loads(r.to_json())
    assert wire["sensorId"] == "ph-1" and wire["plantId"] == "north"
    assert wire["timestamp"] == "2026-11-28T06:00:00.250Z"
    assert wire["gatewayId"] == "gw-1" and wire["seq"] == 42
    assert wire["quality"] == "good" and wire["qualityReasons"] == []
    back = reading_from_dict(wire)
    assert isinstance(back, Reading)
    assert (back.value, back.timestamp, back.seq) == (7.12, r.timestamp, 42)


_FLOATS = [None, 1.5, 3, float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("value", _FLOATS)
@pytest.mark.parametrize("raw_value", _FLOATS)
@pytest.mark.parametrize("calibration_id", [None, "", "cal-1"])
@pytest.mark.parametrize("seq", [None, 5, 2**63 - 1, 2**64])
def test_to_json_is_to_dicts_json(value, raw_value, calibration_id, seq):
    """to_json takes a faster way than to_dict (the buffer writer encodes every reading); the
    stored bytes must stay the same."""
    r = Reading("s1", "pH", value, "mg/L", 1764312854.1234565, "p1", "loc é", Quality.BAD,
                ["a"], "gw", seq, raw_value, calibration_id)  # fmt: skip
    assert r.to_json() == model._dumps(r.to_dict())


def test_quality_only_gets_worse():
    r = Reading("s", "pH", 7.0, "pH", 0.0)
    r.flag(Quality.BAD, "out_of_range")
    r.flag(Quality.UNCERTAIN, "spike")
    assert r.quality is Quality.BAD
    assert r.quality_reasons == ["out_of_range", "spike"]


def test_non_finite_values_leave_as_null_so_the_json_stays_valid():
    r = Reading("s", "pH", math.nan, "pH", 0.0, quality=Quality.BAD)
    assert json.loads(r.to_json())["value"] is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"value": "7.1"}, "wrong_type"),
        ({"value": True}, "wrong_type"),
        ({"sensorId": None}, "missing_field"),
        ({"sensorId": ""}, "wrong_type"),
        ({"timestamp": "yesterday"}, "bad_timestamp"),
        ({"timestamp": "2026-11-28T06:00:00"}, "bad_timestamp"),
        ({"quality": "excellent"}, "wrong_type"),
        ({"seq": "1"}, "wrong_type"),
    ],
)
def test_bad_fields_are_rejected_with_a_reason(change, reason):
    d = {**GOOD, **change}
    d = {k: v for k, v in d.items() if v is not None}
    r = reading_from_dict(d)
    assert isinstance(r, Rejection)
    assert r.reason == reason


def test_garbage_is_rejected_not_raised():
    assert reading_from_json(b"\xff" * 1_000_000).reason == "not_json"
    assert reading_from_json(b"[1, 2]").reason == "not_an_object"
    assert reading_from_json(b"[" * 100_000).reason == "not_json"


def test_timestamps_are_utc_with_milliseconds():
    assert format_ts(parse_ts("2026-11-28T07:00:00.5+01:00")) == "2026-11-28T06:00:00.500Z"


def test_timestamps_keep_the_sources_microseconds():
    # Two readings of one sensor within one millisecond are two readings: cutting their times to
    # milliseconds on the wire would make them one point in InfluxDB.
    assert format_ts(parse_ts("2026-11-28T06:00:00.123456Z")) == "2026-11-28T06:00:00.123456Z"
    assert format_ts(parse_ts("2026-11-28T06:00:00.000001Z")) == "2026-11-28T06:00:00.000001Z"
    assert format_ts(parse_ts("2026-11-28T06:00:00.1234567Z")) == "2026-11-28T06:00:00.123456Z"


@given(st.integers(0, 4_102_444_800 * 10**6))
def test_every_microsecond_survives_the_wire(us):
    text = format_ts(us / 10**6)
    assert round(parse_ts(text) * 10**6) == us
    assert format_ts(parse_ts(text)) == text
    assert len(text) == (24 if us % 1000 == 0 else 27)  # milliseconds when they suffice


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)


@given(st.dictionaries(st.sampled_from([*GOOD, "seq", "quality", "qualityReasons"]), json_values))
def test_any_object_gives_a_reading_or_a_rejection(d):
    r = reading_from_dict(d)
    assert isinstance(r, Reading | Rejection)


@given(st.binary(max_size=512))
def test_any_bytes_give_a_reading_or_a_rejection(payload):
    assert isinstance(reading_from_json(payload), Reading | Rejection)


def test_alarm_event_round_trips_through_the_wire_json():
    e = AlarmEvent(
        alarm_id="a1", event_id="e1", sensor_id="bod-1", plant_id="north", parameter="BOD",
        condition="HH", level="critical", state="raised", value=140.5, threshold=100.0,
        timestamp=parse_ts("2026-11-28T06:00:00.250Z"), message="BOD high", location="inlet",
        gateway_id="gw-1", seq=7,
    )  # fmt: skip
    assert AlarmEvent.from_dict(json.loads(e.to_json())) == e
    fault = AlarmEvent.from_dict({**e.to_dict(), "value": None, "threshold": None, "seq": None})
    assert (fault.value, fault.threshold, fault.seq) == (None, None, None)
    with pytest.raises(KeyError):
        AlarmEvent.from_dict({"alarmId": "a1"})


# Identity fields are bounded and printable at intake (see README "Reading fields"): a field
# InfluxDB or Kafka cannot carry must be refused with a reason, never accepted and lost later.
@pytest.mark.parametrize(
    ("change", "reason", "field"),
    [
        ({"location": "x" * 1_000_000}, "field_too_long", "location"),
        ({"location": "x" * 257}, "field_too_long", "location"),
        ({"location": "inlet\nchannel 2"}, "bad_characters", "location"),
        ({"location": "inlet\tleft"}, "bad_characters", "location"),
        ({"location": "inlet\\"}, "bad_characters", "location"),
        ({"sensorId": "ph\n1"}, "bad_characters", "sensorId"),
        ({"sensorId": "ph 1"}, "bad_characters", "sensorId"),
        ({"sensorId": "ph\x001"}, "bad_characters", "sensorId"),
        ({"sensorId": "ph\u200b1"}, "bad_characters", "sensorId"),  # zero-width space
        ({"sensorId": "s" * 129}, "field_too_long", "sensorId"),
        ({"plantId": "north\n"}, "bad_characters", "plantId"),
        ({"plantId": "north works"}, "bad_characters", "plantId"),  # it names a Kafka topic
        ({"plantId": "p" * 129}, "field_too_long", "plantId"),
        ({"parameter": "p\rH"}, "bad_characters", "parameter"),
        ({"parameter": "p" * 129}, "field_too_long", "parameter"),
        ({"unit": "mg/L\n"}, "bad_characters", "unit"),
        ({"unit": "u" * 33}, "field_too_long", "unit"),
        ({"gatewayId": "gw\n1"}, "bad_characters", "gatewayId"),
        ({"gatewayId": "g" * 129}, "field_too_long", "gatewayId"),
    ],
)
def test_identity_fields_are_bounded_and_printable(change, reason, field):
    r = reading_from_dict({**GOOD, **change})
    assert isinstance(r, Rejection), r
    assert (r.reason, r.field) == (reason, field)
    assert r.detail.startswith(f"{field}: ")


@pytest.mark.parametrize(
    "change",
    [
        {"location": "x" * 256},
        {"location": "Zulauf Süd, Becken 2 (links)"},
        {"sensorId": "s" * 128, "parameter": "p" * 128, "plantId": "p" * 128},
        {"sensorId": "gateway:gw-1/ph#2@inlet", "plantId": "north_works.2-a"},
        {"unit": "µS/cm"},
        {"unit": "m³/h"},
        {"gatewayId": "g" * 128},
    ],
)
def test_fields_within_the_limits_are_accepted(change):
    assert isinstance(reading_from_dict({**GOOD, **change}), Reading)


def test_readings_and_receipts_pickle_with_every_field():
    """MQTT workers send them over a pipe, pickled as their constructor's arguments: a field
    added to the dataclass must come through too."""
    reading = Reading(
        sensor_id="s1", parameter="pH", value=7.1, unit="pH", timestamp=1_790_000_000.25,
        plant_id="north", location="effluent", quality=Quality.UNCERTAIN, quality_reasons=["a"],
        gateway_id="gw", seq=5, raw_value=7.0, calibration_id="cal-1",
    )  # fmt: skip
    assert {f.name for f in dataclasses.fields(Reading)} == set(Reading.__slots__)
    assert all(getattr(reading, f.name) != f.default for f in dataclasses.fields(Reading))
    receipt = Receipt("mqtt:gw-w0", "17", b"fp", 600.0)
    for record in (reading, receipt):
        assert pickle.loads(pickle.dumps(record)) == record
