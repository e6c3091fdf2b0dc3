"""The ML trigger and the circuit breaker on a fake clock, the ML API contract, the prediction's
InfluxDB point and the ``[ml]`` settings (``ML_API_URL`` overrides the file)."""

import pytest

from gateway.common.config import ConfigError
from gateway.common.model import Prediction, Quality, Reading
from gateway.processor.mlapi import (
    BreakerState,
    CircuitBreaker,
    ContractError,
    parse_request,
    parse_response,
)
from gateway.processor.predict import MlConfig, Trigger
from gateway.processor.settings import load_processor_config
from gateway.processor.store import prediction_line

T0 = 1_790_000_040.0  # the start of a minute
FIVE = {"pH": 7.0, "BOD": 180.0, "COD": 350.0, "TSS": 120.0, "TDS": 600.0}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def readings(values: dict[str, float], ts: float = T0 + 5, plant: str = "north") -> list[Reading]:
    return [Reading(f"{p}-1", p, v, "", ts, plant_id=plant) for p, v in values.items()]


def test_nothing_is_due_until_all_five_parameters_are_in_the_window():
    trigger = Trigger(60.0, Clock())
    for parameter in ("pH", "BOD", "COD", "TSS"):
        assert trigger.feed(readings({parameter: FIVE[parameter]})) == []
    (due,) = trigger.feed(readings({"TDS": 600.0}, ts=T0 + 7))
    assert (due.plant_id, due.window_start, due.timestamp) == ("north", T0, T0 + 7)
    assert due.inputs == {
        "flow_rate": 150.0,  # the design's defaults for the two optional inputs
        "influent_BOD": 180.0,
        "influent_COD": 350.0,
        "influent_TSS": 120.0,
        "influent_pH": 7.0,
        "influent_TDS": 600.0,
        "temperature": 25.0,
    }
    assert due.defaulted == ["flow_rate", "temperature"]


def test_the_inputs_are_the_windows_averages_and_measured_optionals_are_used():
    trigger = Trigger(60.0, Clock())
    batch = readings({**FIVE, "temperature": 12.0, "flow_rate": 90.0})
    batch += readings({"pH": 8.0, "BOD": 100.0}, ts=T0 + 20)
    (due,) = trigger.feed(batch)
    assert due.inputs["influent_pH"] == 7.5 and due.inputs["influent_BOD"] == 140.0
    assert (due.inputs["temperature"], due.inputs["flow_rate"], due.defaulted) == (12.0, 90.0, [])


def test_a_plant_triggers_at_most_once_per_60_seconds():
    clock = Clock()
    trigger = Trigger(60.0, clock)
    assert len(trigger.feed(readings(FIVE))) == 1
    clock.now += 59.9
    assert trigger.feed(readings(FIVE, ts=T0 + 30)) == []
    clock.now += 0.1  # 60 s after the last prediction
    assert len(trigger.feed(readings(FIVE, ts=T0 + 40))) == 1
    clock.now += 30
    assert trigger.feed(readings(FIVE, ts=T0 + 50)) == []


def test_plants_are_limited_independently():
    clock = Clock()
    trigger = Trigger(60.0, clock)
    assert [d.plant_id for d in trigger.feed(readings(FIVE, plant="a"))] == ["a"]
    clock.now += 1
    assert [d.plant_id for d in trigger.feed(readings(FIVE, plant="b"))] == ["b"]
    assert trigger.feed(readings(FIVE, plant="a") + readings(FIVE, plant="b")) == []


def test_a_new_minute_starts_a_new_window_and_older_minutes_are_ignored():
    clock = Clock()
    trigger = Trigger(60.0, clock)
    assert len(trigger.feed(readings(FIVE))) == 1
    clock.now += 120
    # the next minute has only pH so far: not due, though the interval has passed
    assert trigger.feed(readings({"pH": 7.0}, ts=T0 + 61)) == []
    # the rest arrives for the minute before: late for the current window
    assert trigger.feed(readings(FIVE, ts=T0 + 59)) == []
    (due,) = trigger.feed(readings({p: v for p, v in FIVE.items() if p != "pH"}, ts=T0 + 62))
    assert due.window_start == T0 + 60


def test_bad_or_missing_values_do_not_count_and_quiet_plants_are_not_retriggered():
    clock = Clock()
    trigger = Trigger(60.0, clock)
    batch = readings(FIVE)
    batch[0].flag(Quality.BAD, "out_of_range")
    batch[1].value = None
    assert trigger.feed(batch) == []
    assert len(trigger.feed(readings({"pH": 7.0, "BOD": 20.0}))) == 1
    clock.now += 600
    assert trigger.feed(readings({"TDS": 600.0}, plant="other")) == []  # north sent nothing


def test_the_interval_is_configurable_down_to_every_batch():
    trigger = Trigger(0.0, Clock())
    assert len(trigger.feed(readings(FIVE))) == 1
    assert len(trigger.feed(readings(FIVE))) == 1


# --- circuit breaker ------------------------------------------------------------------------------


def test_the_breaker_opens_after_n_consecutive_failures_and_probes_after_the_cool_down():
    clock = Clock()
    b = CircuitBreaker(3, 30.0, clock)
    b.failure()
    b.failure()
    b.success()  # not consecutive any more
    b.failure()
    b.failure()
    assert b.allow() and b.state is BreakerState.CLOSED
    b.failure()
    assert b.state is BreakerState.OPEN and not b.allow()
    clock.now += 29.9
    assert not b.allow()
    clock.now += 0.1
    assert b.allow() and b.state is BreakerState.HALF_OPEN
    assert not b.allow()  # one probe at a time
    b.failure()  # the probe failed: open for another cool-down
    assert b.state is BreakerState.OPEN and not b.allow()
    clock.now += 30
    assert b.allow()
    b.success()
    assert b.state is BreakerState.CLOSED and b.allow() and b.failures == 0


# --- contract -------------------------------------------------------------------------------------


def test_a_request_takes_the_design_defaults_for_missing_inputs():
    inputs, defaulted, plant = parse_request({"influent_BOD": 200, "plant_id": "north"})
    assert inputs["influent_BOD"] == 200.0 and inputs["influent_COD"] == 350.0
    assert "influent_BOD" not in defaulted and len(defaulted) == 6 and plant == "north"
    assert parse_request({})[0]["temperature"] == 25.0


@pytest.mark.parametrize(
    "body",
    [
        [1],
        {"influent_pH": "7"},
        {"temperature": True},
        {"flow_rate": float("nan")},
        {"plant_id": 3},
    ],
)
def test_a_request_that_breaks_the_contract_is_refused(body):
    with pytest.raises(ContractError):
        parse_request(body)


def test_a_response_must_carry_a_prediction_and_a_confidence_from_0_to_1():
    assert parse_response({"prediction": "class A", "confidence": 1, "x": 2}) == ("class A", 1.0)
    for bad in (
        {"prediction": "A"},
        {"prediction": "", "confidence": 0.5},
        "A",
        [],
        {"prediction": "A", "confidence": 1.5},
        {"prediction": "A", "confidence": True},
    ):
        with pytest.raises(ContractError):
            parse_response(bad)


# --- storage and settings -------------------------------------------------------------------------


def test_a_prediction_is_one_point_tagged_with_plant_and_model_carrying_its_inputs():
    p = Prediction(
        "north",
        T0 + 7.5,
        int(T0),
        "builtin",
        "class A",
        0.54,
        {"influent_pH": 7.0, "flow_rate": 150.0},
        ["flow_rate"],
        {"BOD": 6.3},
    )
    assert prediction_line(p) == (
        'predictions,model=builtin,plant_id=north prediction="class A",confidence=0.54,'
        "window_start=1790000040i,flow_rate=150.0,influent_pH=7.0,effluent_BOD=6.3,"
        'defaulted="flow_rate" 1790000047500000'
    )


def test_ml_api_url_from_the_environment_overrides_the_file(tmp_path, monkeypatch):
    path = tmp_path / "p.toml"
    path.write_text('[ml]\napi_url = "http://file:1"\ninterval_seconds = 5\n')
    monkeypatch.delenv("ML_API_URL", raising=False)
    assert load_processor_config(path).ml.api_url == "http://file:1"
    monkeypatch.setenv("ML_API_URL", "http://env:2")
    ml = load_processor_config(path).ml
    assert (ml.api_url, ml.interval_seconds) == ("http://env:2", 5.0)
    monkeypatch.setenv("ML_API_URL", "")  # set but empty: the built-in estimator only
    assert load_processor_config(path).ml.api_url == ""
    monkeypatch.setenv("ML_API_URL", "ftp://x")
    with pytest.raises(ConfigError) as e:
        load_processor_config(path)
    assert e.value.key == "ML_API_URL (environment)"


def test_ml_defaults_are_the_designs():
    ml = MlConfig()
    assert (ml.enabled, ml.api_url, ml.interval_seconds) == (True, "", 60.0)
