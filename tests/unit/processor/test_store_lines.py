"""What InfluxDB receives: line protocol whose identity makes replays harmless, and raw messages
that become readings (bad ones included) or dead letters with a reason."""

from __future__ import annotations

import json

from gateway.common.model import AlarmEvent, Quality, Reading, Rejection
from gateway.processor.aggregate import WindowAggregate
from gateway.processor.codec import decode
from gateway.processor.store import alarm_line, reading_line, window_line

TS = 1_790_000_000.123


def test_a_reading_becomes_one_water_quality_point_with_the_design_schema():
    r = Reading("ph-1", "pH", 7.0, "pH", TS, plant_id="north", location="aeration 1")
    assert reading_line(r) == (
        "water_quality,location=aeration\\ 1,parameter=pH,plant_id=north,sensor_id=ph-1 "
        'quality="good",unit="pH",value=7.0,reasons="" 1790000000123000'
    )


def test_the_same_reading_twice_gives_the_same_point_identity():
    a = Reading("ph-1", "pH", 7.0, "pH", TS, plant_id="north")
    again = Reading("ph-1", "pH", 7.0, "pH", TS, plant_id="north")
    assert reading_line(a) == reading_line(again)


def test_two_readings_within_one_millisecond_are_two_points():
    a = Reading("ph-1", "pH", 7.0, "pH", 1_790_000_000.123456, plant_id="north")
    b = Reading("ph-1", "pH", 7.0, "pH", 1_790_000_000.123789, plant_id="north")
    assert reading_line(a).endswith(" 1790000000123456")
    assert reading_line(b).endswith(" 1790000000123789")


def test_every_reading_point_carries_reasons_so_a_rewrite_replaces_them():
    """InfluxDB merges the fields of a rewritten point: a field left out keeps its old value. A
    replay that clears a flag must therefore write ``reasons`` empty, not leave it out."""
    flagged = Reading("ph-1", "pH", 7.0, "pH", TS, plant_id="north")
    flagged.flag(Quality.UNCERTAIN, "stale")
    clean = Reading("ph-1", "pH", 7.0, "pH", TS, plant_id="north")
    fields = [reading_line(r).split(" ")[1].split(",") for r in (flagged, clean)]
    assert [sorted(f.split("=")[0] for f in fs) for fs in fields] == [
        ["quality", "reasons", "unit", "value"]
    ] * 2
    assert 'reasons=""' in fields[1]


def test_tag_and_string_values_are_escaped():
    r = Reading('s,1="x"', "pH", None, 'p"H', TS, plant_id="a b=c")
    r.flag(Quality.BAD, "timeout")
    line = reading_line(r)
    assert line.startswith('water_quality,parameter=pH,plant_id=a\\ b\\=c,sensor_id=s\\,1\\="x" ')
    assert 'unit="p\\"H"' in line and "value=" not in line and 'reasons="timeout"' in line


def test_a_newline_in_a_tag_or_string_field_never_splits_the_line():
    """Line protocol ends a point at a newline: one inside a value would cut the point in two
    (and let the second half be read as a point of its own)."""
    r = Reading("s\n1", "pH", 7.0, "p\nH", TS, plant_id="north\r\nx", location="in\nlet")
    r.flag(Quality.UNCERTAIN, "spike\nx")
    line = reading_line(r)
    assert "\n" not in line and "\r" not in line
    assert line == (
        "water_quality,location=in\\ let,parameter=pH,plant_id=north\\ \\ x,sensor_id=s\\ 1 "
        'quality="uncertain",unit="p H",value=7.0,reasons="spike x" 1790000000123000'
    )
    e = AlarmEvent(
        "a1", "e1", "b\n1", "north", "BOD", "HH", "critical", "raised", 1.0, 0.5, TS, "two\nlines"
    )
    assert "\n" not in alarm_line(e)
    w = WindowAggregate("north", "BOD", 1_790_000_040, 1, 1.0, 1.0, 1.0, 1.0, TS, "b\n1")
    assert "\n" not in window_line(w)


def test_windows_and_alarms_are_points_too():
    w = WindowAggregate(
        "north",
        "BOD",
        1_790_000_040,
        3,
        60.0,
        10.0,
        30.0,
        20.0,
        TS,
        "b-1",
        "mg/L",
        "sensors.raw.north/2",
    )
    assert window_line(w).startswith(
        "water_quality,parameter=BOD,plant_id=north,source=sensors.raw.north/2 count=3i,sum=60.0"
    )
    assert window_line(w).endswith(" 1790000040000000")
    assert ",latest_time=1790000000123000i," in window_line(w)
    e = AlarmEvent(
        "a1",
        "e1",
        "b-1",
        "north",
        "BOD",
        "HH",
        "critical",
        "raised",
        120.0,
        100.0,
        TS,
        "BOD 120 mg/L above critical limit 100 (HH)",
    )
    assert alarm_line(e).startswith(
        "alerts,condition=HH,level=critical,parameter=BOD,plant_id=north,sensor_id=b-1,"
        "state=raised "
    )
    assert alarm_line(e).endswith(" 1790000000123000")


def test_a_string_value_becomes_a_bad_reading_without_value():
    payload = json.dumps(
        {"sensorId": "ph-1", "parameter": "pH", "value": "ERR", "timestamp": "2026-11-28T06:00:00Z"}
    ).encode()
    r = decode(payload, "north")
    assert isinstance(r, Reading)
    assert (r.value, r.quality, r.quality_reasons, r.plant_id) == (
        None,
        Quality.BAD,
        ["not_numeric:str"],
        "north",
    )


def test_payloads_without_a_readings_identity_are_rejected_with_a_reason():
    assert decode(b'{"parameter": "pH", "value": 7}', "north") == Rejection(
        "missing_field", "sensorId", field="sensorId"
    )
    assert isinstance(decode(b"\xff\xfe", "north"), Rejection)
    assert decode(None, "north").reason == "empty"
    assert decode(b"[1, 2]", "north").reason == "not_an_object"
