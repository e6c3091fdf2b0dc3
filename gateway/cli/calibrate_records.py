"""``edge-gateway calibrate show|history|export|due``: the calibration records."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gateway.cli.calibrate import (
    Config,
    JsonOut,
    Sensor,
    _config,
    _print,
    _store_path,
    _when,
    app,
)
from gateway.edge.calibrate import CalibrationRecord, CalibrationStore


def _records_store(store: str | None, config: Path | None) -> CalibrationStore:
    return CalibrationStore(_store_path(store, _config(config)))


def _records(
    store: str | None, config: Path | None, sensor: str, parameter: str | None
) -> tuple[CalibrationStore, list[CalibrationRecord]]:
    """The store and a sensor's records, newest first; exit 1 if it has none."""
    s = _records_store(store, config)
    records = s.history(sensor, parameter)
    if not records:
        typer.echo(f"no calibration for {sensor}", err=True)
        raise typer.Exit(1)
    return s, records


StoreOpt = Annotated[str | None, typer.Option("--store", help="Calibration store file.")]


@app.command("show")
def show(
    sensor: Sensor,
    parameter: Annotated[str | None, typer.Option()] = None,
    history: Annotated[bool, typer.Option(help="Also show earlier calibrations.")] = False,
    store: StoreOpt = None,
    config: Config = None,
    as_json: JsonOut = False,
) -> None:
    """Show a sensor's active calibration per parameter (and the history).

    Exit codes: 0 shown, 1 no calibration for the sensor, 2 bad config.
    """
    s, records = _records(store, config, sensor, parameter)
    shown = []
    for rec in records:
        active = s.active(rec.sensor_id, rec.parameter)
        is_active = active is not None and active.id == rec.id
        if is_active or history:
            shown.append({**rec.to_dict(), "active": is_active})
            if not as_json:
                typer.echo("[active] " if is_active else "[history] ", nl=False)
                _print(rec)
    if as_json:
        typer.echo(json.dumps(shown))


@app.command("history")
def history(
    sensor: Sensor,
    parameter: Annotated[str | None, typer.Option()] = None,
    store: StoreOpt = None,
    config: Config = None,
    as_json: JsonOut = False,
) -> None:
    """Every calibration of a sensor, newest first, as a table (drift between them shows).

    Exit codes: 0 shown, 1 no calibration for the sensor, 2 bad config.
    """
    s, records = _records(store, config, sensor, parameter)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in records]))
        return
    table = Table("when (UTC)", "parameter", "method", "operator", "status", "results", "active")
    for rec in records:
        active = s.active(rec.sensor_id, rec.parameter)
        results = ", ".join(f"{k} {v:g}" for k, v in rec.results().items())
        mark = "yes" if active is not None and active.id == rec.id else ""
        table.add_row(
            _when(rec.calibrated_at),
            rec.parameter,
            rec.method,
            rec.operator,
            rec.status,
            results,
            mark,
        )
    Console().print(table)


CSV_FIELDS = tuple(f.name for f in dataclasses.fields(CalibrationRecord))


@app.command("export")
def export(
    fmt: Annotated[str, typer.Option("--format", help="csv or json")] = "csv",
    sensor: Annotated[str | None, typer.Option("--sensor", help="Only this sensor.")] = None,
    store: StoreOpt = None,
    config: Config = None,
) -> None:
    """Every calibration record (all sensors, or one) to standard output, newest first.

    Exit codes: 0 exported, 2 bad option or config.
    """
    if fmt not in ("csv", "json"):
        raise typer.BadParameter("csv or json", param_hint="--format")
    s = _records_store(store, config)
    records = s.history(sensor) if sensor else s.everything()
    if fmt == "json":
        typer.echo(json.dumps([r.to_dict() for r in records], indent=1))
        return
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in records:
        row = rec.to_dict()
        row["standards"] = json.dumps(row["standards"])
        row["previous"] = json.dumps(row["previous"])
        writer.writerow(row)
    typer.echo(out.getvalue(), nl=False)


@app.command("due")
def due(
    within: Annotated[float, typer.Option(help="Also list those due within DAYS.")] = 0.0,
    store: StoreOpt = None,
    config: Config = None,
    as_json: JsonOut = False,
) -> None:
    """Active calibrations that are overdue (or due within --within days), for a cron job.

    Exit codes: 0 nothing overdue, 1 something overdue, 2 bad config.
    """
    s = _records_store(store, config)
    now = time.time()
    rows: list[dict[str, Any]] = []
    for rec in sorted(s.all_active(), key=lambda r: r.due_at or 0.0):
        if rec.due_at is None or rec.due_at > now + within * 86400.0:
            continue
        rows.append(
            {
                "sensor": rec.sensor_id,
                "parameter": rec.parameter,
                "dueAt": rec.due_at,
                "overdue": rec.due_at < now,
                "id": rec.id,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows))
    else:
        table = Table("sensor", "parameter", "due (UTC)", "state")
        for r in rows:
            table.add_row(
                r["sensor"],
                r["parameter"],
                _when(r["dueAt"]),
                "OVERDUE" if r["overdue"] else "due soon",
            )
        Console().print(table if rows else "nothing due")
    if any(r["overdue"] for r in rows):
        raise typer.Exit(1)
