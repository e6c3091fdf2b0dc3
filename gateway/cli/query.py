"""``edge-gateway query``: latest values and history of a plant, from InfluxDB."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from typer import Option

from gateway.common.config import ConfigError

if TYPE_CHECKING:
    from gateway.processor.query import Queries

T = TypeVar("T")

app = typer.Typer(help="Read stored readings back from InfluxDB.", no_args_is_help=True)

ConfigOption = Annotated[
    Path, Option("--config", "-c", envvar="EDGE_GATEWAY_CONFIG", help="Config file (TOML).")
]
JsonOption = Annotated[bool, Option("--json", help="Print JSON instead of a table.")]


def _queries(config: Path) -> Queries:
    from gateway.processor.query import Queries
    from gateway.processor.settings import load_processor_config

    try:
        settings = load_processor_config(config)
        return Queries(settings.influxdb.client(settings.source), settings.influxdb)
    except ConfigError as e:
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    text = [
        [("" if v is None else f"{v:g}" if isinstance(v, float) else str(v)) for v in r]
        for r in rows
    ]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    typer.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for r in text:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _run(fn: Callable[[], T]) -> T:
    from gateway.processor.query import QueryInputError

    try:
        return fn()
    except QueryInputError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except Exception as e:
        typer.echo(f"query failed: {e}", err=True)
        raise typer.Exit(1) from None


@app.command()
def latest(
    plant: Annotated[str, Option(help="Plant id.")],
    config: ConfigOption = Path("config.toml"),
    as_json: JsonOption = False,
) -> None:
    """The newest reading of each parameter of a plant, with its quality."""
    q = _queries(config)
    items = _run(lambda: q.latest(plant))
    if as_json:
        typer.echo(json.dumps([i.to_dict() for i in items], indent=2))
        return
    if not items:
        typer.echo(f"no readings for plant {plant} in the last 7 days")
        return
    _table(
        ["parameter", "value", "unit", "quality", "time", "sensor"],
        [
            [i.parameter, i.value, i.unit, i.quality, i.to_dict()["timestamp"], i.sensor_id]
            for i in items
        ],
    )


@app.command()
def history(
    plant: Annotated[str, Option(help="Plant id.")],
    parameter: Annotated[str, Option(help="Parameter, e.g. pH or BOD.")],
    start: Annotated[str, Option(help="Start: -1h, -30m or RFC 3339.")] = "-1h",
    stop: Annotated[str, Option(help="Stop: now, a relative duration or RFC 3339.")] = "now",
    every: Annotated[
        str | None,
        Option(
            help="Mean/min/max/count per window, e.g. 1m, 1h, 1d: a multiple of 1m reads the "
            "stored windows (bad readings left out; 30 days per minute, a year per hour, then "
            "per day), other widths the raw readings (7 days)."
        ),
    ] = None,
    include_bad: Annotated[
        bool,
        Option(
            "--include-bad", help="With --every: count bad readings too (from the raw readings)."
        ),
    ] = False,
    config: ConfigOption = Path("config.toml"),
    as_json: JsonOption = False,
) -> None:
    """Readings of one parameter over time, raw or as mean/min/max/count per window."""
    q = _queries(config)
    rows = _run(
        lambda: q.history(
            plant, parameter, start=start, stop=stop, every=every, include_bad=include_bad
        )
    )
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    if every is None:
        _table(
            ["time", "value", "quality", "sensor"],
            [[r.to_dict()["timestamp"], r.value, r.quality, r.sensor_id] for r in rows],
        )
    else:
        _table(
            ["time", "mean", "min", "max", "count"],
            [[r.to_dict()["timestamp"], r.value, r.min, r.max, r.count] for r in rows],
        )
