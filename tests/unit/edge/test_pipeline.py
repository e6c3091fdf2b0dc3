"""The gateway pipeline: calibrate, then validate, then alarms, with stage metrics."""

from __future__ import annotations

import copy

import pytest

from gateway.common.alarms import AlarmConfig, AlarmEngine
from gateway.common.metrics import Metrics
from gateway.common.model import AlarmEvent, Quality, Reading, now_ts
from gateway.common.validate import ValidationConfig, Validator
from gateway.edge.calibrate import CalibrationStore, Standard, calibrate_linear, calibrate_ph
from gateway.edge.pipeline import EdgePipeline


def reading(parameter, value, unit="mg/L", sensor="uv-01", dt=0.0) -> Reading:
    return Reading(sensor, parameter, value, unit, now_ts() + dt, plant_id="north")


@pytest.fixture
def store(tmp_path):
    return CalibrationStore(tmp_path / "cal.sqlite", reload_interval=0)


def pipeline(store=None, metrics=None) -> EdgePipeline:
    return EdgePipeline(
        store, Validator(ValidationConfig()), AlarmEngine(AlarmConfig(), "gw1"), metrics
    )


def test_calibrated_value_is_validated_and_alarmed(store):
    rec = store.save(
        calibrate_linear("uv-01", "COD", [Standard(0, 0), Standard(100, 10)], operator="a")
    )
    out = pipeline(store).process(reading("COD", 30.0))  # raw 30 -> 300 mg/L
    r, event = out
    assert isinstance(r, Reading) and isinstance(event, AlarmEvent)
    assert (r.value, r.raw_value, r.calibration_id, r.quality) == (
        300.0,
        30.0,
        rec.id,
        Quality.GOOD,
    )
    assert (event.condition, event.state, event.value, event.gateway_id) == (
        "H",
        "raised",
        300,
        "gw1",
    )

    too_high, fault = pipeline(store).process(reading("COD", 600.0))  # 6000 > range 5000
    assert isinstance(too_high, Reading) and isinstance(fault, AlarmEvent)
    assert (too_high.quality, too_high.quality_reasons) == (Quality.BAD, ["out_of_range"])
    assert fault.condition == "probe_fault"  # not HH: an impossible value is a probe problem


def test_uncalibrated_reading_passes_unchanged(store):
    for calibrations in (store, None):
        r = reading("BOD", 12.0)
        before = copy.deepcopy(r)  # the pipeline works on r in place: compare with a copy
        assert pipeline(calibrations).process(r) == [before]
        assert (r.value, r.raw_value, r.calibration_id) == (12.0, None, None)


def test_ph_calibration_uses_the_probe_temperature(store):
    # electrode at 95 % slope, +5 mV offset, calibrated at 25 °C
    standards = [Standard(7.00, 5.0, 25.0), Standard(4.01, 5.0 + 0.95 * 59.16 * 2.99, 25.0)]
    store.save(calibrate_ph("ph-01", standards, operator="a"))
    mv_at_ph4_35c = 5.0 + 0.95 * 59.16 * (35 + 273.15) / 298.15 * 3.0
    out = pipeline(store).process_batch(
        [
            reading("temperature", 35.0, "°C", sensor="ph-01"),
            reading("pH", mv_at_ph4_35c, "mV", sensor="ph-01"),
        ]
    )
    assert [type(r) for r in out] == [Reading, Reading, AlarmEvent, AlarmEvent]  # pH 4: L and LL
    ph = out[1]
    assert isinstance(ph, Reading)
    assert ph.value == pytest.approx(4.0, abs=1e-6)
    assert ph.unit == "pH"


def test_a_calibration_saved_elsewhere_is_picked_up(store, tmp_path):
    p = pipeline(store)
    before = reading("TSS", 10.0)
    p.process(before)
    assert before.calibration_id is None
    other = CalibrationStore(tmp_path / "cal.sqlite")
    rec = other.save(calibrate_linear("uv-01", "TSS", [Standard(5, 0)], operator="a"))
    (r,) = p.process(reading("TSS", 10.0))
    assert isinstance(r, Reading)
    assert (r.value, r.calibration_id) == (15.0, rec.id)


def test_bad_reading_is_kept_with_one_probe_fault():
    bad = Reading(
        "uv-01", "BOD", None, "mg/L", now_ts(), quality=Quality.BAD, quality_reasons=["crc"]
    )
    p = pipeline()
    out = p.process(bad)
    assert out[0] is bad
    events = [(e.condition, e.state) for e in out if isinstance(e, AlarmEvent)]
    assert events == [("probe_fault", "raised")]
    assert p.process(bad) == [bad]


def test_batch_keeps_order_and_fills_metrics():
    m = Metrics()
    readings = [reading("BOD", v, dt=i) for i, v in enumerate([10.0, 35.0, float("nan"), 20.0])]
    out = pipeline(metrics=m).process_batch(readings)
    assert [r for r in out if isinstance(r, Reading)] == readings
    kinds = [(e.condition, e.state) for e in out if isinstance(e, AlarmEvent)]
    assert kinds == [
        ("H", "raised"),
        ("probe_fault", "raised"),
        ("probe_fault", "cleared"),
        ("H", "cleared"),
    ]

    def sample(name, **labels):
        return m.registry.get_sample_value(name, labels)

    for stage in ("calibrate", "validate", "alarms"):
        assert sample("iot_processing_latency_seconds_count", stage=stage) == 1
    assert sample("iot_messages_processed_total", status="good", plant_id="north") == 3
    assert sample("iot_messages_processed_total", status="bad", plant_id="north") == 1
    assert sample("iot_alerts_triggered_total", level="warning", parameter="BOD") == 2
