"""The pure parts of live calibration, the decodings table, and the pipeline's out-of-service and
overdue flags."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.common.alarms import AlarmConfig, AlarmEngine
from gateway.common.model import Quality, Reading
from gateway.common.validate import ValidationConfig, Validator
from gateway.edge.acquire.modbus.registers import every_decoding
from gateway.edge.calibrate import (
    CalibrationStore,
    PhLimits,
    Standard,
    calibrate_linear,
    calibrate_ph,
)
from gateway.edge.calibrate_live import (
    drift_per_minute,
    match_lab,
    ph_raw_mv,
    read_lab_csv,
    residuals,
    stability,
)
from gateway.edge.pipeline import OUT_OF_SERVICE, OVERDUE, EdgePipeline


def test_drift_and_stability() -> None:
    flat = [(float(t), 12.0) for t in range(20)]
    assert drift_per_minute(flat) == 0.0
    assert stability(flat, 1.0, 10.0).stable
    rising = [(float(t), 12.0 + t / 10) for t in range(20)]  # 6 per minute
    assert drift_per_minute(rising) == pytest.approx(6.0)
    assert not stability(rising, 1.0, 10.0).stable
    assert not stability(flat[:5], 1.0, 10.0).stable  # not long enough yet
    step = [(float(t), 0.0 if t < 15 else 50.0) for t in range(20)]
    assert not stability(step, 1.0, 10.0).stable
    assert "STABLE" in stability(flat, 1.0, 10.0).indicator(1.0)


def test_ph_raw_mv_prefers_the_electrode_mv() -> None:
    assert ph_raw_mv({"electrode_mv": 12.5, "pH": 9.0}) == 12.5
    assert ph_raw_mv({"pH": 4.0, "temperature": 25.0}) == pytest.approx(3 * 59.16)
    with pytest.raises(ValueError):
        ph_raw_mv({"temperature": 25.0})


def test_ph_limits_are_configurable() -> None:
    worn = [Standard(7.0, 0.0), Standard(4.01, 0.88 * 59.16 * 2.99)]
    assert calibrate_ph("p", worn, operator="a").status == "warn"
    strict = PhLimits(offset_mv=30.0, slope_pass=(92.0, 105.0), slope_warn_min=90.0)
    rec = calibrate_ph("p", worn, operator="a", limits=strict)
    assert rec.status == "fail" and "92-105" in rec.criteria


def test_lab_csv_matching_and_residuals() -> None:
    lab = read_lab_csv(
        "time,cod_mg_l\n2026-12-07T04:00:00Z,100\n2026-12-07T05:00:00Z,200\n"
        "2026-12-07T06:00:00Z,300\n2026-12-07T09:00:00Z,50\n"
    )
    t0 = lab[0][0]
    readings = [(t0 + 30, 50.0), (t0 + 3600 - 20, 100.0), (t0 + 7200 + 60, 150.0)]
    points, unmatched = match_lab(lab, readings, window=300)
    assert [(p.nominal, p.raw) for p in points] == [(100, 50.0), (200, 100.0), (300, 150.0)]
    assert unmatched == [(t0 + 5 * 3600, 50.0)]
    rec = calibrate_linear("uv", "COD", points, operator="a")
    assert rec.k == pytest.approx(2.0) and rec.r2 == 1.0
    assert residuals(rec) == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)
    with pytest.raises(ValueError, match="line 3"):
        read_lab_csv("time,v\n2026-12-07T04:00:00Z,1\nyesterday,2\n")


def test_every_decoding_finds_the_float_vector_in_each_word_order() -> None:
    for order, regs in {
        "ABCD": [0x47F1, 0x2000],
        "CDAB": [0x2000, 0x47F1],
        "BADC": [0xF147, 0x0020],
        "DCBA": [0x0020, 0xF147],
    }.items():
        hits = [d for d in every_decoding(regs) if d.value == 123456.0]
        assert [(d.type, d.word_order) for d in hits] == [("float32", order)]
    ints = {(d.type, d.offset): d.value for d in every_decoding([0xFFFF]) if not d.word_order}
    assert ints == {("int16", 0): -1, ("uint16", 0): 65535}


def _pipeline(tmp_path: Path) -> tuple[EdgePipeline, CalibrationStore]:
    store = CalibrationStore(tmp_path / "cal.sqlite")
    alarms = AlarmEngine(AlarmConfig(), gateway_id="gw")
    return EdgePipeline(store, Validator(ValidationConfig()), alarms), store


def _ph(value: float) -> Reading:
    return Reading("ph-1", "pH", value, "pH", time.time(), "north", "aer")


def test_out_of_service_flags_readings_and_raises_no_alarm(tmp_path: Path) -> None:
    pipeline, _ = _pipeline(tmp_path)
    pipeline.take_out_of_service("ph-1", 60)
    out = pipeline.process(_ph(3.0))
    assert out == [out[0]] and OUT_OF_SERVICE in out[0].quality_reasons
    assert out[0].quality is Quality.UNCERTAIN
    assert pipeline.latest[("ph-1", "pH")] is out[0]
    pipeline.return_to_service("ph-1")
    assert len(pipeline.process(_ph(3.0))) > 1  # in service: the low pH alarm raises


def test_an_overdue_calibration_is_a_reason_on_the_readings(tmp_path: Path) -> None:
    pipeline, store = _pipeline(tmp_path)
    old = time.time() - 40 * 86400
    store.save(calibrate_ph("ph-1", [Standard(7.0, 0.0)], operator="a", at=old))
    (reading,) = [r for r in pipeline.process(_ph(7.0)) if isinstance(r, Reading)]
    assert OVERDUE in reading.quality_reasons and reading.quality is Quality.GOOD


def test_regression_due_and_export_commands(tmp_path: Path) -> None:
    store = str(tmp_path / "cal.sqlite")
    lab = tmp_path / "lab.csv"
    lab.write_text("time,lab\n1000,100\n2000,210\n3000,290\n4000,405\n")
    readings = tmp_path / "readings.jsonl"
    rows = [(990, 50.0), (2010, 101.0), (3005, 149.0), (3990, 201.0), (3990, 1.0)]
    readings.write_text(
        "".join(
            json.dumps(
                {
                    "sensorId": "uv-1" if i < 4 else "other",
                    "parameter": "COD",
                    "value": v,
                    "quality": "good",
                    "timestamp": t,
                }
            )
            + "\n"
            for i, (t, v) in enumerate(rows)
        )
    )
    run = CliRunner().invoke
    args = [
        "calibrate",
        "regression",
        "--sensor",
        "uv-1",
        "--parameter",
        "COD",
        "--lab",
        str(lab),
        "--readings",
        str(readings),
        "--operator",
        "lab",
        "--store",
        store,
    ]
    got = run(app, [*args, "--json"])
    assert got.exit_code == 0, got.output
    doc = json.loads(got.stdout)
    assert doc["record"]["method"] == "regression" and doc["record"]["r2"] > 0.99
    assert len(doc["residuals"]) == 4 and doc["activated"]
    assert "residual" in run(app, args).output
    due = run(app, ["calibrate", "due", "--store", store, "--within", "100", "--json"])
    assert due.exit_code == 0 and json.loads(due.stdout)[0]["sensor"] == "uv-1"
    CalibrationStore(store).save(
        calibrate_ph("ph-1", [Standard(7.0, 0.0)], operator="a", at=time.time() - 40 * 86400)
    )
    overdue = run(app, ["calibrate", "due", "--store", store])
    assert overdue.exit_code == 1 and "OVERDUE" in overdue.output
    csv_out = run(app, ["calibrate", "export", "--store", store, "--format", "csv"])
    assert csv_out.exit_code == 0
    assert len(list(csv.DictReader(io.StringIO(csv_out.stdout)))) == 3  # 2 regressions, 1 pH
    assert json.loads(
        run(app, ["calibrate", "export", "--store", store, "--format", "json"]).stdout
    )[0]["sensor_id"] in ("uv-1", "ph-1")


def test_the_daemon_api_refuses_records_it_could_not_apply(tmp_path: Path) -> None:
    from gateway.common.metrics import Metrics
    from gateway.edge.acquire.modbus.engine import ModbusConfig, ModbusEngine
    from gateway.edge.calibration_api import CalibrationApi

    pipeline, store = _pipeline(tmp_path)
    engine = ModbusEngine(ModbusConfig(), lambda *a, **k: None, Metrics())
    api = CalibrationApi(pipeline, store, engine, session_timeout=60)
    assert api.start(b'{"sensor": "ph-1"}')[0] == 200
    assert pipeline.out_of_service() == ["ph-1"]
    good = calibrate_ph("ph-1", [Standard(7.0, 3.0), Standard(4.01, 170.0)], operator="a")
    bad = {**good.to_dict(), "slope_pct": "ninety"}
    for body in (
        b"{",
        b'{"sensor": 3}',
        json.dumps({"sensor": "ph-1", "record": bad}).encode(),
        json.dumps({"sensor": "other", "record": good.to_dict()}).encode(),
    ):
        status, doc = api.finish(body)
        assert status == 400, doc
    assert store.active("ph-1", "pH") is None and pipeline.out_of_service() == ["ph-1"]
    status, doc = api.finish(json.dumps({"sensor": "ph-1", "record": good.to_dict()}).encode())
    assert status == 200 and doc["activated"]
    assert store.active("ph-1", "pH") == good and pipeline.out_of_service() == []
    assert api.probe(b'{"sensor": "ph-1"}')[0] == 404  # not a Modbus device here


def test_probe_writes_by_register_name() -> None:
    from gateway.edge.calibrate_live import probe_writes

    ph = calibrate_ph("p", [Standard(7.0, 12.0), Standard(4.01, 180.0)], operator="a")
    assert probe_writes(["zero_point", "slope"], ph) == {
        "zero_point": ph.offset_mv,
        "slope": ph.slope_mv,
    }
    cod = calibrate_linear("uv", "COD", [Standard(0, 2), Standard(100, 52)], operator="a")
    names = ["cod_k", "cod_b", "bod_k", "bod_b"]
    assert probe_writes(names, cod) == {"cod_k": 2.0, "cod_b": -4.0}
