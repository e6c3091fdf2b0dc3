"""``edge-gateway calibrate``: compute a probe calibration, print it, store it; show history."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from gateway.edge import calibrate as cal
from gateway.edge.calibrate import CalibrationRecord, CalibrationStore, Standard

app = typer.Typer(help="Calibrate probes and show their calibration history.", no_args_is_help=True)

Store = Annotated[str, typer.Option("--store", help="Calibration store file.")]
Sensor = Annotated[str, typer.Option("--sensor", help="Sensor id as the gateway names it.")]
Operator = Annotated[str, typer.Option("--operator", help="Who calibrated.")]
Notes = Annotated[str, typer.Option("--notes")]
DEFAULT_STORE = "var/calibrations.sqlite"


def _point(text: str, what: str, with_temperature: bool = True) -> Standard:
    parts = text.split(":")
    n = 3 if with_temperature else 2
    try:
        if not 2 <= len(parts) <= n:
            raise ValueError
        nums = [float(p) for p in parts]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected {what}") from None
    return Standard(nominal=nums[0], raw=nums[1], temperature=nums[2] if len(nums) > 2 else None)


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _print(rec: CalibrationRecord) -> None:
    typer.echo(
        f"{rec.sensor_id} {rec.parameter}: {rec.method} by {rec.operator}, "
        f"{_when(rec.calibrated_at)}, id {rec.id}"
    )
    for s in rec.standards:
        actual = f" (= {s.actual:g} at temperature)" if s.actual not in (None, s.nominal) else ""
        temp = "" if s.temperature is None else f" at {s.temperature:g} °C"
        typer.echo(f"  standard {s.nominal:g}{actual}: raw {s.raw:g}{temp}")
    for name, value in rec.results().items():
        before = rec.previous.get(name)
        drift = "" if before is None else f" (was {before:g})"
        typer.echo(f"  {name} = {value:g}{drift}")
    typer.echo(f"  result: {rec.status.upper()}  [{rec.criteria}]")
    typer.echo(f"  due: {_when(rec.due_at)}")


def _finish(store_path: str, rec: CalibrationRecord) -> None:
    rec = CalibrationStore(store_path).save(rec)
    _print(rec)
    if rec.status == "fail":
        typer.echo(
            "calibration FAILED: kept in the history, the previous one stays active", err=True
        )
        raise typer.Exit(1)


def _compute(fn: Callable[..., CalibrationRecord], *args: Any, **kwargs: Any) -> CalibrationRecord:
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@app.command("ph")
def ph(
    sensor: Sensor,
    buffer: Annotated[list[str], typer.Option(help="NOMINAL:MV[:TEMP_C], 1 to 3 times.")],
    operator: Operator,
    parameter: Annotated[str, typer.Option()] = "pH",
    notes: Notes = "",
    store: Store = DEFAULT_STORE,
) -> None:
    """pH calibration from electrode mV in buffers (4.01/7.00/10.01 or 6.86/9.18)."""
    points = [_point(b, "NOMINAL:MV[:TEMP_C]") for b in buffer]
    previous = CalibrationStore(store).active(sensor, parameter)
    slope = previous.slope_pct if previous and previous.slope_pct else 100.0
    rec = _compute(
        cal.calibrate_ph,
        sensor,
        points,
        operator=operator,
        parameter=parameter,
        slope_pct=slope,
        notes=notes,
    )
    _finish(store, rec)


@app.command("linear")
def linear(
    sensor: Sensor,
    parameter: Annotated[str, typer.Option(help="e.g. COD, BOD, TSS.")],
    point: Annotated[
        list[str],
        typer.Option(help="LAB_VALUE:RAW; once: zero, twice: zero/span, 3+ times: regression."),
    ],
    operator: Operator,
    notes: Notes = "",
    store: Store = DEFAULT_STORE,
) -> None:
    """Linear K/B correlation: value = K x raw + B."""
    points = [_point(p, "LAB_VALUE:RAW", with_temperature=False) for p in point]
    previous = CalibrationStore(store).active(sensor, parameter)
    k = previous.k if previous and previous.k else 1.0
    rec = _compute(
        cal.calibrate_linear, sensor, parameter, points, operator=operator, k=k, notes=notes
    )
    _finish(store, rec)


@app.command("conductivity")
def conductivity(
    sensor: Sensor,
    standard: Annotated[
        list[str],
        typer.Option(help="KCL_US_CM:RAW_US[:TEMP_C], e.g. 1413:1402:24.5 or 12880:12790:25."),
    ],
    operator: Operator,
    parameter: Annotated[str, typer.Option(help="conductivity or TDS.")] = "conductivity",
    alpha: Annotated[float, typer.Option(help="Temperature coefficient per °C.")] = (
        cal.DEFAULT_ALPHA
    ),
    tds_factor: Annotated[float, typer.Option()] = 0.64,
    nominal_cell_constant: Annotated[float | None, typer.Option()] = None,
    notes: Notes = "",
    store: Store = DEFAULT_STORE,
) -> None:
    """Conductivity cell constant from KCl standards, temperature coefficient and TDS factor."""
    points = [_point(s, "KCL_US_CM:RAW_US[:TEMP_C]") for s in standard]
    rec = _compute(
        cal.calibrate_conductivity,
        sensor,
        points,
        operator=operator,
        parameter=parameter,
        alpha=alpha,
        tds_factor=tds_factor,
        nominal_cell_constant=nominal_cell_constant,
        notes=notes,
    )
    _finish(store, rec)


@app.command("show")
def show(
    sensor: Sensor,
    parameter: Annotated[str | None, typer.Option()] = None,
    history: Annotated[bool, typer.Option(help="Also show earlier calibrations.")] = False,
    store: Store = DEFAULT_STORE,
) -> None:
    """Show a sensor's active calibration per parameter (and the history)."""
    s = CalibrationStore(store)
    records = s.history(sensor, parameter)
    if not records:
        typer.echo(f"no calibration for {sensor}", err=True)
        raise typer.Exit(1)
    for rec in records:
        active = s.active(rec.sensor_id, rec.parameter)
        is_active = active is not None and active.id == rec.id
        if is_active or history:
            typer.echo("[active] " if is_active else "[history] ", nl=False)
            _print(rec)
