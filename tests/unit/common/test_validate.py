"""Validation rules on table-driven cases, config from TOML, and arbitrary input never raising."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.common.config import ConfigError, build
from gateway.common.model import PARAMETERS, Quality, Reading
from gateway.common.validate import SensorValidation, ValidationConfig, Validator

NOW = 1_780_000_000.0
GOOD, UNCERTAIN, BAD = Quality.GOOD, Quality.UNCERTAIN, Quality.BAD


def reading(parameter="pH", value=7.0, ts=NOW, sensor="s1", **kw) -> Reading:
    return Reading(sensor_id=sensor, parameter=parameter, value=value, unit="", timestamp=ts, **kw)


def validator(**cfg) -> Validator:
    return Validator(ValidationConfig(**cfg), clock=lambda: NOW)


@pytest.mark.parametrize(
    ("r", "quality", "reasons"),
    [
        (reading("pH", 7.0), GOOD, []),
        (reading("pH", None, quality=BAD, quality_reasons=["timeout"]), BAD, ["timeout"]),
        (reading("pH", None), BAD, ["no_value"]),
        (reading("pH", math.nan), BAD, ["nan"]),
        (reading("COD", -math.inf), BAD, ["inf"]),
        (reading("pH", 14.5), BAD, ["out_of_range"]),
        (reading("pH", 0.0), GOOD, []),
        (reading("BOD", 2000.1), BAD, ["out_of_range"]),
        (reading("COD", -1.0), BAD, ["out_of_range"]),
        (reading("TSS", 10_001.0), BAD, ["out_of_range"]),
        (reading("TDS", 50_000.0), GOOD, []),
        (reading("temperature", -10.5), BAD, ["out_of_range"]),
        (reading("flow_rate", 1e9), GOOD, []),
        (reading("flow_rate", -0.1), BAD, ["out_of_range"]),
        (reading("ORP", 1e9), GOOD, []),  # unknown parameter: no range
        (reading("ORP", math.nan), BAD, ["nan"]),
        (reading("pH", 7.0, ts=NOW - 301), UNCERTAIN, ["stale"]),
        (reading("pH", 7.0, ts=NOW + 60), UNCERTAIN, ["stale:future"]),
        (reading("pH", 15.0, ts=NOW - 400), BAD, ["out_of_range", "stale"]),
        (
            reading("pH", 7.0, quality=UNCERTAIN, quality_reasons=["status:drift"]),
            UNCERTAIN,
            ["status:drift"],
        ),
        (
            reading("pH", 20.0, quality=BAD, quality_reasons=["sentinel"]),
            BAD,
            ["sentinel", "out_of_range"],
        ),
    ],
)
def test_single_reading_rules(r, quality, reasons):
    out = validator().check(r)
    assert out is r
    assert (r.quality, r.quality_reasons) == (quality, reasons)
    if quality is BAD and "out_of_range" not in reasons:
        assert r.value is None  # NaN/Inf never travel on


def run(v: Validator, steps, parameter="pH", sensor="s1") -> list[tuple[Quality, list[str]]]:
    out = []
    for t, value in steps:
        r = v.check(reading(parameter, value, ts=NOW + t, sensor=sensor), now=NOW + t)
        out.append((r.quality, r.quality_reasons))
    return out


@pytest.mark.parametrize(
    ("cfg", "steps", "expected"),
    [
        # spike: pH may move 1.0 per second by default
        ({}, [(0, 7.0), (1, 7.5), (2, 9.0)], [GOOD, GOOD, UNCERTAIN]),
        ({}, [(0, 7.0), (10, 9.0)], [GOOD, GOOD]),  # 0.2 pH/s
        ({"max_rate": {"pH": 0.1}}, [(0, 7.0), (10, 9.0)], [GOOD, UNCERTAIN]),
        ({}, [(0, 7.0), (0, 12.0), (-5, 1.0)], [GOOD, GOOD, GOOD]),  # duplicate / out of order
        # normal band
        ({"normal_bands": {"pH": [6.0, 9.0]}}, [(0, 9.5), (60, 8.9)], [UNCERTAIN, GOOD]),
        # flatline: 3 equal suspect, 5 equal bad, a change resets
        (
            {"flatline_suspect": 3, "flatline_bad": 5},
            [(t, 7.0) for t in range(6)] + [(6, 7.1), (7, 7.1)],
            [GOOD, GOOD, UNCERTAIN, UNCERTAIN, BAD, BAD, GOOD, GOOD],
        ),
        (
            {"flatline_suspect": 3, "flatline_bad": 0, "flatline_tolerance": 0.05},
            [(0, 7.0), (1, 7.02), (2, 6.99)],
            [GOOD, GOOD, UNCERTAIN],
        ),
        ({"flatline_suspect": 0, "flatline_bad": 0}, [(t, 7.0) for t in range(5)], [GOOD] * 5),
        # out-of-range values do not become the spike reference
        ({}, [(0, 7.0), (1, 99.0), (2, 7.2)], [GOOD, BAD, GOOD]),
    ],
)
def test_sequence_rules(cfg, steps, expected):
    assert [q for q, _ in run(validator(**cfg), steps)] == expected


def test_reasons_name_the_rule():
    v = validator(flatline_suspect=2, flatline_bad=3)
    assert run(v, [(0, 7.0), (1, 9.5), (2, 9.5), (3, 9.5)]) == [
        (GOOD, []),
        (UNCERTAIN, ["spike"]),
        (UNCERTAIN, ["flatline"]),
        (BAD, ["flatline"]),
    ]


def test_state_is_per_sensor_and_parameter():
    v = validator(flatline_suspect=2, flatline_bad=0)
    assert v.check(reading("pH", 7.0, sensor="a")).quality is GOOD
    assert v.check(reading("pH", 7.0, sensor="b", ts=NOW + 1)).quality is GOOD
    assert v.check(reading("COD", 7.0, sensor="a", ts=NOW + 1)).quality is GOOD
    assert v.check(reading("pH", 7.0, sensor="a", ts=NOW + 2)).quality is UNCERTAIN


def test_sensor_overrides_win_for_that_sensor_only():
    cfg = ValidationConfig(
        sensors={"river": SensorValidation(ranges={"pH": [2.0, 12.0]}, max_age=0)}
    )
    v = Validator(cfg, clock=lambda: NOW)
    assert v.check(reading("pH", 1.0, sensor="river")).quality is BAD
    assert v.check(reading("pH", 1.0, sensor="other")).quality is GOOD
    assert v.check(reading("pH", 7.0, sensor="river", ts=NOW - 9999)).quality is GOOD
    assert v.check(reading("COD", 6000.0, sensor="river")).quality is BAD  # defaults still apply


def test_memory_stays_bounded_with_many_sensors():
    v = validator(max_states=10)
    for i in range(1000):
        v.check(reading("pH", 7.0, sensor=f"s{i}"))
    assert len(v._tracks) <= 10
    assert len(v._rules) <= 10


def test_config_from_toml_table():
    table = {
        "ranges": {"pH": [1, 13], "ORP": [-2000, 2000]},
        "normal_bands": {"pH": [6.0, 9.0]},
        "flatline_suspect": 10,
        "sensors": {"ph-01": {"max_rate": {"pH": 0.5}, "flatline_bad": 100}},
    }
    cfg = build(ValidationConfig, table, source="config.toml", prefix="validation")
    assert cfg.ranges["pH"] == [1.0, 13.0]
    assert cfg.ranges["COD"] == [0.0, 5000.0]  # defaults kept for the others
    assert cfg.ranges["flow_rate"] == [0.0, math.inf]
    assert cfg.sensors["ph-01"].max_rate == {"pH": 0.5}


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"ranges": {"pH": [14, 0]}}, "validation"),
        ({"flatline_suspect": 10, "flatline_bad": 5}, "validation"),
        ({"sensors": {"x": {"ranges": {"pH": [1]}}}}, "validation.sensors.x"),
        ({"max_age": "5m"}, "validation.max_age"),
        ({"max_agee": 5}, "validation.max_agee"),
    ],
)
def test_config_errors_name_the_key(table, key):
    with pytest.raises(ConfigError) as e:
        build(ValidationConfig, table, source="config.toml", prefix="validation")
    assert e.value.key == key


finite_or_not = st.one_of(
    st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**6), 10**6)
)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([*PARAMETERS, "ORP", ""]),
            st.text(max_size=5),
            finite_or_not,
            st.floats(-1e10, 1e10),
            st.sampled_from(list(Quality)),
        ),
        max_size=30,
    )
)
def test_arbitrary_readings_never_raise(items):
    v = Validator(ValidationConfig(flatline_suspect=2, flatline_bad=3, max_states=5))
    for parameter, sensor, value, ts, quality in items:
        r = v.check(reading(parameter, value, ts=ts, sensor=sensor, quality=quality))
        assert r.quality in Quality
        assert r.value is None or math.isfinite(r.value)
        assert r.quality.worst(quality) is r.quality  # quality never improves


def test_a_reading_ahead_of_its_gateways_clock_is_flagged_against_that_clock():
    """Centrally the gateway's clock is the Kafka timestamp it sent the reading with."""
    v = validator()
    fast = v.check_ahead(reading(ts=NOW + 240), clock=NOW)
    assert (fast.quality, fast.quality_reasons) == (UNCERTAIN, ["stale:future"])
    on_time = v.check_ahead(reading(ts=NOW + 4), clock=NOW)  # within max_future (5 s)
    assert (on_time.quality, on_time.quality_reasons) == (GOOD, [])
    old = v.check_ahead(reading(ts=NOW - 3600), clock=NOW)  # a backlog: not the rule's business
    assert (old.quality, old.quality_reasons) == (GOOD, [])


def test_central_checks_are_a_function_of_the_message_alone():
    """The processor's checks: whatever came before and whenever they run, the same message gets
    the same flags (history and staleness are the gateway's, carried in the reading)."""
    early, late = (
        Validator(ValidationConfig(), clock=lambda: NOW),
        Validator(ValidationConfig(), clock=lambda: NOW + 86_400),
    )
    for i in range(400):  # a flatline's worth of history for one of them only
        early.check_central(reading(value=7.0, ts=NOW + i), sent=NOW + i)
    for v in (early, late):
        r = v.check_central(reading(value=7.0, ts=NOW + 400), sent=NOW + 400)
        assert (r.quality, r.quality_reasons) == (GOOD, [])
        bad = v.check_central(reading(value=15.0, ts=NOW + 400), sent=NOW + 400)
        assert (bad.quality, bad.quality_reasons) == (BAD, ["out_of_range"])
        kept = v.check_central(
            reading(value=7.0, ts=NOW, quality=UNCERTAIN, quality_reasons=["flatline"]), sent=None
        )
        assert (kept.quality, kept.quality_reasons) == (UNCERTAIN, ["flatline"])
