"""Calibration maths against hand-computed values, applying records, the store and the CLI."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.common.model import Reading
from gateway.edge.calibrate import (
    CalibrationRecord,
    CalibrationStore,
    Standard,
    apply,
    buffer_ph,
    calibrate_conductivity,
    calibrate_linear,
    calibrate_ph,
    compensate_25,
    nernst_slope,
    ph_from_mv,
    tds,
)

T0 = 1_780_000_000.0


@pytest.mark.parametrize(("temp", "slope"), [(0.0, 54.20), (25.0, 59.16), (50.0, 64.12)])
def test_nernst_slope_scales_with_absolute_temperature(temp, slope):
    assert nernst_slope(temp) == pytest.approx(slope, abs=0.01)


@pytest.mark.parametrize(
    ("nominal", "temp", "actual"),
    [
        (7.00, 25.0, 7.00),
        (7.00, 10.0, 7.06),
        (7.00, 22.5, 7.01),  # halfway between 7.02 at 20 °C and 7.00 at 25 °C
        (4.01, 20.0, 4.00),
        (10.01, 0.0, 10.32),
        (10.01, 50.0, 9.83),
        (6.86, 30.0, 6.85),
        (9.18, 0.0, 9.46),
        (5.50, 10.0, 5.50),  # not a tabled buffer: nominal kept
    ],
)
def test_buffer_ph_follows_the_temperature_tables(nominal, temp, actual):
    assert buffer_ph(nominal, temp) == pytest.approx(actual, abs=0.001)


def test_buffer_outside_its_table_is_refused():
    with pytest.raises(ValueError, match="outside the table"):
        buffer_ph(7.00, 70.0)


def ideal_mv(ph: float, temp: float, slope_pct: float = 100.0, offset: float = 0.0) -> float:
    return offset - slope_pct / 100.0 * nernst_slope(temp) * (ph - 7.0)


@pytest.mark.parametrize(
    ("e7", "e4", "slope_pct", "offset", "status"),
    [
        (0.0, 176.89, 100.0, 0.0, "pass"),  # 2.99 pH x 59.16 mV
        (-3.0, 168.0, 96.67, -3.0, "pass"),  # 171 / 2.99 = 57.19 mV/pH
        (0.0, 153.89, 87.0, 0.0, "warn"),
        (0.0, 141.51, 80.0, 0.0, "fail"),
        (0.0, 192.81, 109.0, 0.0, "fail"),
        (35.0, 211.89, 100.0, 35.0, "fail"),  # offset beyond ±30 mV
    ],
)
def test_two_point_ph_at_25c(e7, e4, slope_pct, offset, status):
    rec = calibrate_ph(
        "ph-01", [Standard(7.00, e7, 25.0), Standard(4.01, e4, 25.0)], operator="ann", at=T0
    )
    assert rec.method == "ph_2point"
    assert rec.slope_pct == pytest.approx(slope_pct, abs=0.02)
    assert rec.offset_mv == pytest.approx(offset, abs=0.02)
    assert rec.status == status
    assert rec.due_at == T0 + 30 * 86400


def test_three_point_ph_uses_buffer_values_at_their_temperature():
    temp = 15.0
    standards = [
        Standard(nominal, ideal_mv(buffer_ph(nominal, temp), temp, 95.0, 4.0), temp, lot="L1")
        for nominal in (7.00, 4.01, 10.01)
    ]
    rec = calibrate_ph("ph-01", standards, operator="ann", at=T0)
    assert rec.method == "ph_3point"
    assert rec.slope_pct == pytest.approx(95.0, abs=0.01)
    assert rec.slope_mv == pytest.approx(0.95 * 59.16, abs=0.01)
    assert rec.offset_mv == pytest.approx(4.0, abs=0.01)
    assert rec.r2 == pytest.approx(1.0)
    assert [s.actual for s in rec.standards] == [7.04, 4.00, 10.12]


def test_one_point_ph_sets_the_offset_with_the_slope_assumed():
    rec = calibrate_ph("ph-01", [Standard(6.86, 12.0)], operator="ann", slope_pct=97.0, at=T0)
    # E = offset - 0.97 * 59.16 * (6.86 - 7) => offset = 12 - 8.03 = 3.97
    assert rec.method == "ph_1point"
    assert rec.offset_mv == pytest.approx(12.0 - 0.97 * 59.16 * 0.14, abs=0.01)
    assert rec.slope_pct == 97.0
    assert rec.status == "pass"


def test_ph_calibration_refuses_a_repeated_buffer():
    with pytest.raises(ValueError, match="only once"):
        calibrate_ph("ph-01", [Standard(7.0, 0.0), Standard(7.0, 1.0)], operator="ann")


def test_ph_from_mv_inverts_the_electrode_model():
    rec = calibrate_ph(
        "ph-01",
        [Standard(n, ideal_mv(n, 25.0, 92.0, -6.0), 25.0) for n in (7.00, 4.01)],
        operator="ann",
        at=T0,
    )
    for ph, temp in [(4.0, 30.0), (7.0, 5.0), (9.5, 40.0)]:
        assert ph_from_mv(ideal_mv(ph, temp, 92.0, -6.0), temp, rec) == pytest.approx(ph, abs=1e-3)


@pytest.mark.parametrize(
    ("points", "method", "k", "b", "r2", "status"),
    [
        ([(5.0, 3.0)], "zero", 1.0, 2.0, None, "pass"),
        ([(0.0, 2.0), (100.0, 52.0)], "zero_span", 2.0, -4.0, None, "pass"),
        (
            [(0.0, 0.0), (10.0, 5.0), (20.0, 10.0), (30.0, 15.0)],
            "regression",
            2.0,
            0.0,
            1.0,
            "pass",
        ),
        # lab 1,3,2,5 against raw 1..4: k = 5.5 / 5 = 1.1, b = 0, r² = 5.5² / (5 x 8.75) = 0.6914
        ([(1.0, 1.0), (3.0, 2.0), (2.0, 3.0), (5.0, 4.0)], "regression", 1.1, 0.0, 0.6914, "fail"),
        ([(100.0, 0.0), (0.0, 10.0)], "zero_span", -10.0, 100.0, None, "fail"),
    ],
)
def test_linear_calibration(points, method, k, b, r2, status):
    rec = calibrate_linear(
        "uv-01", "COD", [Standard(lab, raw) for lab, raw in points], operator="bo", at=T0
    )
    assert rec.method == method
    assert rec.k == pytest.approx(k)
    assert rec.b == pytest.approx(b, abs=1e-9)
    assert rec.r2 == (None if r2 is None else pytest.approx(r2, abs=1e-4))
    assert rec.status == status


def test_conductivity_compensation_and_tds():
    assert compensate_25(1271.7, 20.0, 0.02) == pytest.approx(1413.0)
    assert compensate_25(1413.0, 25.0) == 1413.0
    assert tds(1413.0, 0.5) == pytest.approx(706.5)
    with pytest.raises(ValueError):
        compensate_25(100.0, -30.0, 0.02)


def test_cell_constant_from_kcl_standards():
    one = calibrate_conductivity("ec-01", [Standard(1413.0, 1300.0, 25.0)], operator="cy", at=T0)
    assert one.cell_constant == pytest.approx(1413.0 / 1300.0, rel=1e-6)
    # At 20 °C the standards read 10 % low with alpha 0.02; a cell of K = 1.0 reads exactly that.
    two = calibrate_conductivity(
        "ec-01",
        [Standard(1413.0, 1271.7, 20.0), Standard(12880.0, 11592.0, 20.0)],
        operator="cy",
        nominal_cell_constant=1.0,
        tds_factor=0.55,
        at=T0,
    )
    assert two.cell_constant == pytest.approx(1.0, rel=1e-6)
    assert two.status == "pass"
    assert two.tds_factor == 0.55
    off = calibrate_conductivity(
        "ec-01", [Standard(1413.0, 1000.0)], operator="cy", nominal_cell_constant=1.0, at=T0
    )
    assert off.status == "fail"  # 41 % from the nominal cell constant


def reading(parameter="COD", value=100.0, unit="mg/L", **kw) -> Reading:
    return Reading(sensor_id="s1", parameter=parameter, value=value, unit=unit, timestamp=T0, **kw)


def test_apply_without_a_record_leaves_the_reading_alone():
    r = reading()
    assert apply(r, None) is r
    assert (r.value, r.raw_value, r.calibration_id) == (100.0, None, None)


def test_apply_linear_keeps_the_raw_value_and_names_the_record():
    rec = calibrate_linear("s1", "COD", [Standard(0, 2), Standard(100, 52)], operator="bo", at=T0)
    r = apply(reading(value=27.0), rec)
    assert (r.value, r.raw_value, r.calibration_id) == (50.0, 27.0, rec.id)
    source_raw = apply(reading(value=27.0, raw_value=2700.0), rec)
    assert source_raw.raw_value == 2700.0  # what the source recorded stays


def test_apply_ph_from_mv_and_corrects_probe_ph():
    rec = calibrate_ph(
        "s1", [Standard(n, ideal_mv(n, 25.0, 90.0, 10.0)) for n in (7.00, 4.01)], operator="a"
    )
    mv = apply(reading("pH", ideal_mv(5.0, 35.0, 90.0, 10.0), "mV"), rec, temp_c=35.0)
    assert mv.value == pytest.approx(5.0, abs=1e-6)
    assert mv.unit == "pH"
    # The probe turned the same mV into pH with an ideal electrode; the record corrects it.
    probe_ph = 7.0 - ideal_mv(5.0, 35.0, 90.0, 10.0) / nernst_slope(35.0)
    assert apply(reading("pH", probe_ph, "pH"), rec, 35.0).value == pytest.approx(5.0, abs=1e-6)


def test_apply_conductivity_and_tds():
    rec = calibrate_conductivity(
        "s1", [Standard(1413.0, 1413.0 / 1.2)], operator="c", tds_factor=0.5, parameter="TDS"
    )
    ec = apply(reading("conductivity", 1000.0, "uS"), rec, temp_c=20.0)
    assert ec.value == pytest.approx(1200.0 / 0.9)
    assert apply(reading("TDS", 1000.0, "uS"), rec, 25.0).value == pytest.approx(600.0)


@pytest.mark.parametrize("value", [None, math.nan, math.inf])
def test_apply_leaves_unusable_values_to_validation(value):
    rec = calibrate_linear("s1", "COD", [Standard(0, 2), Standard(100, 52)], operator="bo")
    r = apply(reading(value=value), rec)
    assert r.calibration_id is None
    assert r.value is value


def test_store_keeps_history_previous_values_and_refuses_failed_records(tmp_path):
    store = CalibrationStore(tmp_path / "cal.sqlite", reload_interval=0)
    first = store.save(
        calibrate_linear("s1", "COD", [Standard(0, 0), Standard(10, 5)], operator="a", at=T0)
    )
    assert store.active("s1", "COD") == first
    second = store.save(
        calibrate_linear("s1", "COD", [Standard(0, 0), Standard(10, 4)], operator="a", at=T0 + 1)
    )
    assert second.previous["k"] == pytest.approx(2.0)
    failed = store.save(
        calibrate_linear("s1", "COD", [Standard(10, 0), Standard(0, 4)], operator="a", at=T0 + 2)
    )
    assert failed.status == "fail"
    assert store.active("s1", "COD") == second
    assert [r.id for r in store.history("s1")] == [failed.id, second.id, first.id]
    assert store.active("s1", "BOD") is None

    other = CalibrationStore(tmp_path / "cal.sqlite", reload_interval=0)
    assert other.active("s1", "COD") == second
    third = other.save(
        calibrate_linear("s1", "COD", [Standard(0, 1), Standard(10, 6)], operator="a", at=T0 + 3)
    )
    assert store.reload_if_changed()  # another process's save is picked up
    assert store.active("s1", "COD") == third


def test_record_round_trips_and_keeps_its_id():
    rec = calibrate_ph("s1", [Standard(7.0, 1.0, 21.0, lot="A12")], operator="a", at=T0)
    again = CalibrationRecord.from_dict(rec.to_dict())
    assert again == rec
    assert calibrate_ph("s1", [Standard(7.0, 1.0, 21.0)], operator="a", at=T0).id == rec.id


def test_cli_calibrates_stores_and_shows(tmp_path):
    store = str(tmp_path / "cal.sqlite")
    runner = CliRunner()
    args = ["calibrate", "ph", "--sensor", "ph-01", "--operator", "ann", "--store", store]
    ok = runner.invoke(app, [*args, "--buffer", "7.00:-3:25", "--buffer", "4.01:168:25"])
    assert ok.exit_code == 0, ok.output
    assert "slope_pct = 96.67" in ok.output
    assert "PASS" in ok.output
    bad = runner.invoke(app, [*args, "--buffer", "7.00:0:25", "--buffer", "4.01:120:25"])
    assert bad.exit_code == 1
    assert "FAIL" in bad.output
    shown = runner.invoke(app, ["calibrate", "show", "--sensor", "ph-01", "--store", store])
    assert shown.exit_code == 0
    assert "[active]" in shown.output
    assert "96.67" in shown.output
    assert "[history]" not in shown.output
    wrong = runner.invoke(app, [*args, "--buffer", "seven"])
    assert wrong.exit_code == 2
    assert "NOMINAL:MV" in wrong.output


def test_cli_linear_and_conductivity(tmp_path):
    store = str(tmp_path / "cal.sqlite")
    runner = CliRunner()
    lin = runner.invoke(
        app,
        [
            "calibrate",
            "linear",
            "--sensor",
            "uv-01",
            "--parameter",
            "COD",
            "--operator",
            "bo",
            "--point",
            "0:2",
            "--point",
            "100:52",
            "--store",
            store,
        ],
    )
    assert lin.exit_code == 0, lin.output
    assert "k = 2" in lin.output
    ec = runner.invoke(
        app,
        [
            "calibrate",
            "conductivity",
            "--sensor",
            "ec-01",
            "--operator",
            "cy",
            "--standard",
            "1413:1300:25",
            "--store",
            store,
        ],
    )
    assert ec.exit_code == 0, ec.output
    assert "cell_constant = 1.08692" in ec.output
