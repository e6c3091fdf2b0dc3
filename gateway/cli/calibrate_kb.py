"""``edge-gateway calibrate linear|conductivity|regression``: optical K/B (zero, zero/span, lab
regression) and conductivity cell constants, live through the gateway or from typed values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gateway.cli.calibrate import (
    Config,
    JsonOut,
    LiveOptions,
    Lot,
    NoPrompt,
    Notes,
    Operator,
    PointTimeout,
    Sensor,
    StableDrift,
    StableSeconds,
    Temperature,
    WriteToProbe,
    _compute,
    _config,
    _finish,
    _finish_live,
    _live_points,
    _measure_all,
    _store_path,
    app,
)
from gateway.cli.live import DaemonLink, LinkError, Live, daemon_api, raw_values
from gateway.edge import calibrate as cal
from gateway.edge.calibrate import CalibrationRecord, CalibrationStore, Standard
from gateway.edge.calibrate_live import match_lab, parse_time, read_lab_csv, residuals

StoreOpt = Annotated[str | None, typer.Option("--store", help="Calibration store file.")]


def _raw_of(parameter: str) -> Any:
    def raw(live: Live) -> float:
        values = raw_values(live)
        if parameter not in values:
            raise ValueError(f"no good {parameter} reading yet")
        return values[parameter]

    return raw


@app.command("linear")
def linear(
    sensor: Sensor,
    parameter: Annotated[str, typer.Option(help="e.g. COD, BOD, TSS, turbidity.")],
    point: Annotated[
        list[str],
        typer.Option(
            help="LAB_VALUE to measure live, or LAB_VALUE:RAW; once: zero, twice: zero/span, "
            "3+ times: regression."
        ),
    ],
    operator: Operator,
    notes: Notes = "",
    store: StoreOpt = None,
    config: Config = None,
    no_prompt: NoPrompt = False,
    stable_seconds: StableSeconds = None,
    stable_drift: StableDrift = None,
    point_timeout: PointTimeout = 300.0,
    lot: Lot = None,
    write_to_probe: WriteToProbe = False,
    as_json: JsonOut = False,
) -> None:
    """Linear K/B correlation (value = K x raw + B) for optical COD/BOD/TSS/turbidity.

    Exit codes: 0 pass or warn (activated), 1 fail (recorded, not activated), 2 bad option or
    config, 3 no gateway and no port, 4 a point was not stable in time or the gateway failed.
    """
    cfg = _config(config)
    path = _store_path(store, cfg)
    live, typed = _live_points(point, "LAB_VALUE:RAW", with_temperature=False)
    previous = CalibrationStore(path).active(sensor, parameter)
    k = previous.k if previous and previous.k else 1.0
    due = cfg.calibration.due_for(parameter) if cfg else 90.0

    def done(points: list[Standard]) -> CalibrationRecord:
        return cal.calibrate_linear(
            sensor, parameter, points, operator=operator, k=k, notes=notes, due_days=due
        )

    if typed:
        _finish(path, _compute(done, typed))
        return
    opts = LiveOptions(
        cfg, not no_prompt, stable_seconds, stable_drift, point_timeout, None, lot or []
    )

    def prompt(value: float) -> str:
        what = "zero water (clean)" if value == 0 else f"the standard or sample of {value:g}"
        return f"Clean the window, put the probe in {what}"

    rec, answer = _measure_all(
        opts, sensor, live, prompt, _raw_of(parameter), "raw", done, write_to_probe
    )
    _finish_live(rec, answer, as_json)


@app.command("conductivity")
def conductivity(
    sensor: Sensor,
    standard: Annotated[
        list[str],
        typer.Option(
            help="KCL_US_CM to measure live, or KCL_US_CM:RAW_US[:TEMP_C] (1413:1402:24.5)."
        ),
    ],
    operator: Operator,
    parameter: Annotated[str, typer.Option(help="conductivity or TDS.")] = "conductivity",
    alpha: Annotated[float, typer.Option(help="Temperature coefficient per °C.")] = (
        cal.DEFAULT_ALPHA
    ),
    tds_factor: Annotated[float, typer.Option(help="The site's TDS factor, 0.4-1.0.")] = 0.64,
    nominal_cell_constant: Annotated[float | None, typer.Option()] = None,
    notes: Notes = "",
    store: StoreOpt = None,
    config: Config = None,
    no_prompt: NoPrompt = False,
    stable_seconds: StableSeconds = None,
    stable_drift: StableDrift = None,
    point_timeout: PointTimeout = 300.0,
    temperature: Temperature = None,
    lot: Lot = None,
    write_to_probe: WriteToProbe = False,
    as_json: JsonOut = False,
) -> None:
    """Conductivity cell constant from KCl standards, temperature coefficient and TDS factor.

    Exit codes: as ``calibrate linear``.
    """
    cfg = _config(config)
    path = _store_path(store, cfg)
    live, typed = _live_points(standard, "KCL_US_CM:RAW_US[:TEMP_C]")
    due = cfg.calibration.due_for(parameter) if cfg else 30.0

    def done(points: list[Standard]) -> CalibrationRecord:
        return cal.calibrate_conductivity(
            sensor,
            points,
            operator=operator,
            parameter=parameter,
            alpha=alpha,
            tds_factor=tds_factor,
            nominal_cell_constant=nominal_cell_constant,
            notes=notes,
            due_days=due,
        )

    if typed:
        _finish(path, _compute(done, typed))
        return
    opts = LiveOptions(
        cfg, not no_prompt, stable_seconds, stable_drift, point_timeout, temperature, lot or []
    )

    def prompt(value: float) -> str:
        return f"Rinse the cell, place it in KCl {value:g} µS/cm"

    rec, answer = _measure_all(
        opts, sensor, live, prompt, _raw_of("conductivity"), "µS", done, write_to_probe
    )
    _finish_live(rec, answer, as_json)


def _readings(path: Path, sensor: str, parameter: str) -> list[tuple[float, float]]:
    """(time, raw value) of a sensor's readings in a JSON-lines file (``buffer export``, or an
    export of the stored readings): rawValue where calibrated, else value; bad ones left out."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if r.get("sensorId") != sensor or r.get("parameter") != parameter:
            continue
        raw = r.get("rawValue", r.get("value"))
        if isinstance(raw, int | float) and r.get("quality") != "bad":
            out.append((parse_time(str(r["timestamp"])), float(raw)))
    return out


@app.command("regression")
def regression(
    sensor: Sensor,
    parameter: Annotated[str, typer.Option(help="e.g. COD, BOD, TSS.")],
    lab: Annotated[Path, typer.Option(help="CSV of lab samples: time,lab_value.")],
    readings: Annotated[
        Path, typer.Option(help="The sensor's stored readings as JSON lines (buffer export).")
    ],
    operator: Operator,
    window: Annotated[float, typer.Option(help="Seconds a reading may be from a sample.")] = 300.0,
    notes: Notes = "",
    store: StoreOpt = None,
    config: Config = None,
    as_json: JsonOut = False,
) -> None:
    """K/B regression of lab samples against the readings at their times, with r² and the
    residuals; stored (and used at once by a running gateway) unless it fails.

    Exit codes: 0 pass or warn, 1 fail (recorded, not activated), 2 bad option or input.
    """
    cfg = _config(config)
    path = _store_path(store, cfg)
    try:
        samples = read_lab_csv(lab.read_text())
        points, unmatched = match_lab(samples, _readings(readings, sensor, parameter), window)
    except (OSError, ValueError, KeyError) as e:
        raise typer.BadParameter(str(e)) from None
    if len(points) < 3:
        raise typer.BadParameter(
            f"{len(points)} sample(s) matched a reading: a regression needs 3+"
        )
    due = cfg.calibration.due_for(parameter) if cfg else 90.0
    rec = _compute(
        cal.calibrate_linear,
        sensor,
        parameter,
        points,
        operator=operator,
        notes=notes,
        due_days=due,
    )
    res = residuals(rec)
    try:
        api = daemon_api(cfg) if cfg else None
        answer = DaemonLink(*api).finish(rec) if api else _saved(CalibrationStore(path).save(rec))
    except LinkError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(4) from None
    if as_json:
        typer.echo(
            json.dumps(
                {"record": rec.to_dict(), "residuals": res, "unmatched": unmatched, **answer}
            )
        )
    else:
        table = Table(
            "lab time",
            "lab value",
            "raw",
            "fitted",
            "residual",
            title=f"K {rec.k:.5g}, B {rec.b:.5g}, r² {rec.r2}",
        )
        for s, r in zip(rec.standards, res, strict=True):
            fitted = s.nominal - r
            table.add_row(s.lot, f"{s.nominal:g}", f"{s.raw:g}", f"{fitted:.4g}", f"{r:+.4g}")
        Console().print(table)
        if unmatched:
            typer.echo(f"{len(unmatched)} sample(s) had no reading within {window:g} s", err=True)
        typer.echo(f"result: {rec.status.upper()} [{rec.criteria}]")
    if rec.status == "fail":
        raise typer.Exit(1)


def _saved(rec: CalibrationRecord) -> dict[str, Any]:
    return {"id": rec.id, "status": rec.status, "activated": rec.status != "fail"}
