"""The alarm state machine on table-driven cases, operator actions, helpers, and fuzzing."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.common.alarms import AlarmConfig, AlarmEngine, Limits, is_chattering, is_flood
from gateway.common.config import ConfigError, build
from gateway.common.model import PARAMETERS, Quality, Reading

T0 = 1_780_000_000.0
BAD = "bad"


def reading(t, value, parameter="BOD", sensor="s1", plant="default", quality=Quality.GOOD):
    if value is BAD:
        value, quality = None, Quality.BAD
    return Reading(
        sensor_id=sensor,
        parameter=parameter,
        value=value,
        unit="mg/L",
        timestamp=T0 + t,
        plant_id=plant,
        quality=quality,
        quality_reasons=["timeout"] if quality is Quality.BAD else [],
    )


def run(engine, steps, parameter="BOD", **kw):
    """Feed (t, value) steps; return the (t, condition, state) of every event."""
    out = []
    for t, value in steps:
        for e in engine.evaluate(reading(t, value, parameter, **kw)):
            out.append((t, e.condition, e.state))
    return out


@pytest.mark.parametrize(
    ("cfg", "parameter", "steps", "events"),
    [
        pytest.param(
            {}, "BOD", [(0, 20), (1, 30), (2, 35), (3, 40)], [(2, "H", "raised")], id="high"
        ),
        pytest.param(
            {},
            "BOD",
            [(0, 35), (1, 29.5), (2, 29.0)],
            [(0, "H", "raised"), (2, "H", "cleared")],
            id="deadband-1",
        ),
        pytest.param(
            {},
            "BOD",
            [(0, 120), (1, 99.5), (2, 98), (3, 28)],
            [(0, "HH", "raised"), (0, "H", "raised"), (2, "HH", "cleared"), (3, "H", "cleared")],
            id="critical-and-warning",
        ),
        pytest.param(
            {},
            "pH",
            [(0, 7.0), (1, 6.4), (2, 5.9), (3, 6.05), (4, 6.2), (5, 6.7)],
            [(1, "L", "raised"), (2, "LL", "raised"), (4, "LL", "cleared"), (5, "L", "cleared")],
            id="ph-low-deadband-0.1",
        ),
        pytest.param(
            {}, "pH", [(0, 8.6), (1, 9.1)], [(0, "H", "raised"), (1, "HH", "raised")], id="ph-high"
        ),
        pytest.param(
            {"on_delay": 10},
            "BOD",
            [(0, 35), (5, 35), (10, 35)],
            [(10, "H", "raised")],
            id="on-delay",
        ),
        pytest.param(
            {"on_delay": 10},
            "BOD",
            [(0, 35), (5, 20), (10, 35), (15, 35), (20, 35)],
            [(20, "H", "raised")],
            id="on-delay-restarts-after-a-dip",
        ),
        pytest.param(
            {"off_delay": 10},
            "BOD",
            [(0, 35), (1, 20), (5, 35), (6, 20), (11, 20), (16, 20)],
            [(0, "H", "raised"), (16, "H", "cleared")],
            id="off-delay",
        ),
        pytest.param(
            {"realarm_interval": 60},
            "BOD",
            [(0, 35), (30, 35), (60, 35), (90, 35), (120, 35), (121, 20)],
            [
                (0, "H", "raised"),
                (60, "H", "re-raised"),
                (120, "H", "re-raised"),
                (121, "H", "cleared"),
            ],
            id="re-alarm",
        ),
        pytest.param(
            {},
            "BOD",
            [(0, BAD), (1, BAD), (2, BAD), (3, 20)],
            [(0, "probe_fault", "raised"), (3, "probe_fault", "cleared")],
            id="one-probe-fault",
        ),
        pytest.param(
            {},
            "BOD",
            [(0, 35), (1, BAD), (2, 20)],
            [
                (0, "H", "raised"),
                (1, "probe_fault", "raised"),
                (2, "probe_fault", "cleared"),
                (2, "H", "cleared"),
            ],
            id="fault-freezes-process-alarms",
        ),
        pytest.param(
            {"on_delay": 10},
            "BOD",
            [(0, 35), (5, BAD), (6, 35), (12, 35), (16, 35)],
            [(5, "probe_fault", "raised"), (6, "probe_fault", "cleared"), (16, "H", "raised")],
            id="fault-restarts-on-delay",
        ),
        pytest.param(
            {"fault_on_delay": 30},
            "BOD",
            [(0, BAD), (10, 20), (20, BAD), (40, BAD), (50, BAD)],
            [(50, "probe_fault", "raised")],
            id="fault-on-delay",
        ),
        pytest.param({}, "ORP", [(0, 1e9), (1, BAD)], [(1, "probe_fault", "raised")], id="unknown"),
        pytest.param(
            {"thresholds": {"BOD": Limits(enabled=False)}},
            "BOD",
            [(0, 500)],
            [],
            id="disabled",
        ),
    ],
)
def test_state_machine(cfg, parameter, steps, events):
    assert run(AlarmEngine(AlarmConfig(**cfg)), steps, parameter) == events


def test_a_bad_reading_with_a_value_raises_no_process_alarm():
    engine = AlarmEngine(AlarmConfig())
    events = engine.evaluate(reading(0, 500.0, quality=Quality.BAD))
    assert [(e.condition, e.level, e.state) for e in events] == [
        ("probe_fault", "warning", "raised")
    ]
    assert "timeout" in events[0].message


def test_overrides_per_plant_then_per_sensor():
    cfg = AlarmConfig(
        plants={"north": {"BOD": Limits(high_warning=20.0)}},
        sensors={"s9": {"BOD": Limits(high_warning=50.0)}},
    )
    engine = AlarmEngine(cfg)
    assert run(engine, [(0, 25)], plant="default") == []
    assert run(engine, [(0, 25)], plant="north") == [(0, "H", "raised")]
    assert run(engine, [(0, 45)], plant="north", sensor="s9") == []
    assert run(engine, [(0, 120)], plant="north", sensor="s9") == [(0, "H", "raised")]  # no HH
    assert run(engine, [(0, 300)], parameter="COD") == [(0, "H", "raised")]


def test_event_content_and_ids_are_deterministic():
    steps = [(0, 35.0), (1, 20.0), (2, 36.0)]

    def replay(engine):
        return [e for t, v in steps for e in engine.evaluate(reading(t, v))]

    a = replay(AlarmEngine(AlarmConfig(), "gw1"))
    engine = AlarmEngine(AlarmConfig(), "gw1")
    b = replay(engine)
    assert [e.event_id for e in a] == [e.event_id for e in b]
    assert len({e.event_id for e in b}) == 3
    assert len({e.alarm_id for e in b}) == 1
    assert b[0].alarm_id == engine.alarm_id("default", "s1", "BOD", "H")
    assert b[0].alarm_id != AlarmEngine(AlarmConfig(), "gw2").alarm_id("default", "s1", "BOD", "H")
    first = b[0]
    assert (first.level, first.threshold, first.value, first.gateway_id) == (
        "warning",
        30.0,
        35.0,
        "gw1",
    )
    assert first.timestamp == T0
    assert first.message == "BOD 35 mg/L above warning limit 30 (H)"


def test_acknowledge_follows_isa_states():
    engine = AlarmEngine(AlarmConfig())
    (raised,) = engine.evaluate(reading(0, 35))
    aid = raised.alarm_id
    assert engine.state(aid) == "active_unacknowledged"
    ack = engine.acknowledge(aid, at=T0 + 1)
    assert ack is not None and ack.state == "acknowledged"
    assert engine.acknowledge(aid) is None
    assert engine.state(aid) == "active_acknowledged"
    engine.evaluate(reading(2, 20))
    assert engine.state(aid) == "normal"
    # returned to normal before anyone acknowledged it
    engine.evaluate(reading(3, 35))
    engine.evaluate(reading(4, 20))
    assert engine.state(aid) == "returned_unacknowledged"
    engine.acknowledge(aid)
    assert engine.state(aid) == "normal"
    with pytest.raises(KeyError):
        engine.acknowledge("nope")


def test_shelved_alarm_stays_quiet_then_returns_if_still_active():
    engine = AlarmEngine(AlarmConfig(realarm_interval=10))
    (raised,) = engine.evaluate(reading(0, 35))
    shelved = engine.shelve(raised.alarm_id, until=T0 + 100, at=T0 + 1)
    assert shelved is not None and shelved.state == "shelved"
    assert engine.state(raised.alarm_id) == "shelved"
    assert run(engine, [(20, 35), (40, 20), (60, 40), (99, 40)]) == []
    assert run(engine, [(100, 40)]) == [(100, "H", "raised")]


def test_shelved_alarm_that_cleared_meanwhile_stays_quiet():
    engine = AlarmEngine(AlarmConfig())
    (raised,) = engine.evaluate(reading(0, 35))
    engine.shelve(raised.alarm_id, until=T0 + 100)
    assert run(engine, [(50, 20), (150, 20), (160, 35)]) == [(160, "H", "raised")]


def test_unshelve_early():
    engine = AlarmEngine(AlarmConfig())
    (raised,) = engine.evaluate(reading(0, 35))
    engine.shelve(raised.alarm_id, until=T0 + 1000)
    back = engine.unshelve(raised.alarm_id, at=T0 + 5)
    assert back is not None and back.state == "raised"
    assert run(engine, [(6, 20)]) == [(6, "H", "cleared")]


def test_out_of_service_during_calibration():
    engine = AlarmEngine(AlarmConfig())
    engine.evaluate(reading(0, 120))
    events = engine.out_of_service("s1", at=T0 + 1)
    assert sorted((e.condition, e.state) for e in events) == [
        ("H", "out_of_service"),
        ("HH", "out_of_service"),
    ]
    assert run(engine, [(2, 500), (3, BAD), (4, 20)]) == []
    assert engine.state(events[0].alarm_id) == "out_of_service"
    assert run(engine, [(5, 35)], sensor="s2") == [(5, "H", "raised")]  # other sensors unaffected
    engine.return_to_service("s1")
    assert run(engine, [(6, 35)]) == [(6, "H", "raised")]


def test_chattering_alarm_is_marked():
    engine = AlarmEngine(AlarmConfig(chatter_count=3, chatter_window=60))
    messages = [
        e.message
        for t in range(0, 50, 10)
        for e in engine.evaluate(reading(t, 35 if t % 20 == 0 else 20))
    ]
    raised = [m for m in messages if "above" in m]
    assert [m.endswith("(chattering)") for m in raised] == [False, False, True]


@pytest.mark.parametrize(
    ("times", "flood"),
    [
        ([0] * 10, False),
        ([0] * 11, True),
        ([-601] * 5 + [0] * 10, False),  # older ones fell out of the window
        ([-599] * 5 + [0] * 6, True),
        ([], False),
    ],
)
def test_flood_is_more_than_ten_alarms_in_ten_minutes(times, flood):
    assert is_flood([T0 + t for t in times], now=T0) is flood


@pytest.mark.parametrize(
    ("times", "chattering"),
    [([0, 10, 20], True), ([0, 40, 80], False), ([0, 100, 130, 150], True), ([0, 1], False)],
)
def test_chattering_helper(times, chattering):
    assert is_chattering(times, count=3, window=60) is chattering


def test_config_from_toml_table():
    table = {
        "on_delay": 5,
        "realarm_interval": 3600,
        "thresholds": {"BOD": {"high_warning": 25, "high_critical": 45, "deadband": 2}},
        "plants": {"north": {"pH": {"low_critical": 5.5, "high_critical": 9.5}}},
        "sensors": {"uv-01": {"COD": {"high_warning": 125}}},
    }
    cfg = build(AlarmConfig, table, source="config.toml", prefix="alarms")
    assert cfg.thresholds["BOD"].high_critical == 45.0
    assert cfg.thresholds["COD"].high_critical == 500.0  # defaults kept
    assert cfg.limits_for("north", "x", "pH") == Limits(low_critical=5.5, high_critical=9.5)
    assert cfg.limits_for("north", "uv-01", "COD") == Limits(high_warning=125.0)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        (
            {"thresholds": {"BOD": {"high_warning": 200, "high_critical": 100}}},
            "alarms.thresholds.BOD",
        ),
        ({"thresholds": {"BOD": {"deadband": -1}}}, "alarms.thresholds.BOD"),
        ({"thresholds": {"BOD": {"hi": 1}}}, "alarms.thresholds.BOD.hi"),
        ({"on_delay": -1}, "alarms"),
    ],
)
def test_config_errors_name_the_key(table, key):
    with pytest.raises(ConfigError) as e:
        build(AlarmConfig, table, source="config.toml", prefix="alarms")
    assert e.value.key == key


@given(
    st.lists(
        st.tuples(
            st.sampled_from([*PARAMETERS, "ORP"]),
            st.sampled_from(["a", "b", ""]),
            st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
            st.floats(-1e6, 1e6),
            st.sampled_from(list(Quality)),
        ),
        max_size=40,
    ),
    st.floats(0, 100),
    st.floats(0, 100),
)
def test_arbitrary_readings_never_raise(items, on_delay, realarm):
    engine = AlarmEngine(
        AlarmConfig(on_delay=on_delay, off_delay=on_delay, realarm_interval=realarm, max_alarms=3)
    )
    for parameter, sensor, value, t, quality in items:
        r = Reading(sensor, parameter, value, "", T0 + t, quality=quality)
        for e in engine.evaluate(r):
            assert e.state in ("raised", "cleared", "re-raised")
            assert e.condition in ("H", "HH", "L", "LL", "probe_fault")
            assert e.value is None or math.isfinite(e.value) or e.condition == "probe_fault"
