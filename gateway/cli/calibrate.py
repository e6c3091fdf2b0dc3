"""``edge-gateway calibrate``: compute a probe calibration, print it, store it; show history."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli import stores
from gateway.cli.live import Link, LinkError, Live, connect, raw_values
from gateway.cli.measure import PointFailed, measure, wait_for_enter
from gateway.common.config import ConfigError
from gateway.edge import calibrate as cal
from gateway.edge.calibrate import CalibrationRecord, CalibrationStore, Standard
from gateway.edge.calibrate_live import ph_raw_mv, probe_writes
from gateway.edge.settings import GatewayConfig

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


BUFFER_SETS = {"4.01,7.00,10.01": (7.00, 4.01, 10.01), "4.00,6.86,9.18": (6.86, 4.00, 9.18)}


def _config(path: Path | None) -> GatewayConfig | None:
    return None if path is None else stores.load(path)


def _store_path(store: str | None, cfg: GatewayConfig | None) -> str:
    if store:
        return store
    return cfg.calibration.store if cfg is not None else DEFAULT_STORE


def _live_points(
    texts: list[str], what: str, with_temperature: bool = True
) -> tuple[list[float], list[Standard]]:
    """Split --buffer/--point/--standard values: bare numbers are measured live, NOMINAL:RAW[:T]
    values were read by hand."""
    live: list[float] = []
    typed: list[Standard] = []
    for text in texts:
        if ":" in text:
            typed.append(_point(text, what, with_temperature))
            continue
        try:
            live.append(float(text))
        except ValueError:
            raise typer.BadParameter(f"{text!r}: expected NOMINAL (live) or {what}") from None
    if live and typed:
        raise typer.BadParameter("measure every point live or type every one, not both")
    return live, typed


@dataclass(frozen=True)
class LiveOptions:
    config: GatewayConfig | None
    interactive: bool
    stable_seconds: float | None
    stable_drift: float | None
    point_timeout: float
    temperature: float | None
    lots: list[str]


def _measure_all(
    opts: LiveOptions,
    sensor: str,
    nominals: list[float],
    prompt: Callable[[float], str],
    raw_of: Callable[[Live], float],
    unit: str,
    done: Callable[[list[Standard]], CalibrationRecord],
    write_to_probe: bool,
) -> tuple[CalibrationRecord, dict[str, Any]]:
    """Take each point live through the gateway (or the port), then let the gateway store the
    record; the sensor is out of service in between."""
    cfg = opts.config
    if cfg is None:
        raise typer.BadParameter("a live calibration needs --config (the gateway's file)")
    cal_cfg = cfg.calibration
    drift = opts.stable_drift if opts.stable_drift is not None else cal_cfg.stable_drift
    seconds = opts.stable_seconds if opts.stable_seconds is not None else cal_cfg.stable_seconds
    try:
        link = connect(cfg)
    except (LinkError, ConfigError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(3) from None
    typer.echo(f"calibrating {sensor} through {link.where}")
    try:
        link.start(sensor)
        typer.echo(f"{sensor} is out of service until the calibration ends")
        points: list[Standard] = []
        for i, nominal in enumerate(nominals):
            got = measure(
                link,
                sensor,
                prompt(nominal),
                raw_of,
                unit=unit,
                drift_limit=drift,
                seconds=seconds,
                interactive=opts.interactive,
                timeout=opts.point_timeout,
            )
            temp = opts.temperature if opts.temperature is not None else got.temperature
            lot = opts.lots[i] if i < len(opts.lots) else ""
            points.append(
                Standard(nominal=nominal, raw=round(got.raw, 4), temperature=temp, lot=lot)
            )
        record = done(points)
        if opts.interactive:
            typer.echo("Rinse the probe and put it back in the process, press Enter")
            wait_for_enter()
        if write_to_probe and record.status != "fail":
            record = _write_to_probe(link, record)
        answer = link.finish(record)
    except (PointFailed, LinkError, ValueError) as e:
        with contextlib.suppress(LinkError):
            link.abort(sensor)
        typer.echo(f"calibration abandoned: {e}", err=True)
        raise typer.Exit(4) from None
    except BaseException:
        with contextlib.suppress(LinkError):
            link.abort(sensor)
        raise
    finally:
        link.close()
    return record, answer


def _write_to_probe(link: Link, record: CalibrationRecord) -> CalibrationRecord:
    """Write the results to the probe's calibration registers and read them back."""
    writes = probe_writes(list(link.probe(record.sensor_id, {})), record)
    if not writes:
        raise LinkError(
            f"the profile declares no calibration register for {sorted(record.results())}"
        )
    back = link.probe(record.sensor_id, writes)
    for name, want in writes.items():
        got = back.get(name)
        ok = got is not None and abs(got - want) <= max(0.01 * abs(want), 0.1)
        typer.echo(
            f"  probe register {name}: wrote {want:g}, reads back {got}"
            + ("" if ok else "  MISMATCH")
        )
        if not ok:
            raise LinkError(f"probe register {name} reads back {got}, not {want:g}")
    return replace(record, applied_in="probe", notes=(record.notes + " written to probe").strip())


def _finish_live(rec: CalibrationRecord, answer: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"record": rec.to_dict(), **answer}))
    else:
        _print(rec)
        typer.echo(
            "activated: the gateway uses it from the next reading"
            if answer.get("activated")
            else "NOT activated"
        )
    if rec.status == "fail":
        typer.echo(
            "calibration FAILED: kept in the history, the previous one stays active", err=True
        )
        raise typer.Exit(1)


Config = Annotated[
    Path | None, typer.Option("--config", "-c", help="The gateway's config (live calibration).")
]
NoPrompt = Annotated[
    bool, typer.Option("--no-prompt", help="Scripted: take each point once it is stable.")
]
StableSeconds = Annotated[float | None, typer.Option(help="Seconds a point must stay stable.")]
StableDrift = Annotated[float | None, typer.Option(help="Largest drift per minute of a point.")]
PointTimeout = Annotated[float, typer.Option(help="Seconds to wait for each stable point.")]
Temperature = Annotated[
    float | None, typer.Option(help="Standards' temperature, °C (default: the probe's).")
]
Lot = Annotated[list[str] | None, typer.Option(help="Lot of each standard, in order.")]
WriteToProbe = Annotated[
    bool, typer.Option(help="Write the result to the probe's calibration registers, read back.")
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


@app.command("ph")
def ph(
    sensor: Sensor,
    operator: Operator,
    buffer: Annotated[
        list[str] | None,
        typer.Option(help="NOMINAL to measure live, or NOMINAL:MV[:TEMP_C] read by hand."),
    ] = None,
    buffer_set: Annotated[str, typer.Option(help=" or ".join(BUFFER_SETS))] = "4.01,7.00,10.01",
    points: Annotated[int, typer.Option(min=1, max=3, help="Live: 1, 2 or 3 buffers.")] = 3,
    parameter: Annotated[str, typer.Option()] = "pH",
    notes: Notes = "",
    store: Annotated[str | None, typer.Option("--store", help="Calibration store file.")] = None,
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
    """pH calibration: live through the gateway (buffers 7.00 first, then 4.01 and 10.01, or the
    6.86 set), or from electrode mV read by hand (--buffer NOMINAL:MV[:TEMP_C]).

    Exit codes: 0 pass or warn (activated), 1 fail (recorded, not activated), 2 bad option or
    config, 3 no gateway and no port, 4 a point was not stable in time or the gateway failed.
    """
    cfg = _config(config)
    path = _store_path(store, cfg)
    live, typed = _live_points(buffer or [], "NOMINAL:MV[:TEMP_C]")
    if buffer_set not in BUFFER_SETS:
        raise typer.BadParameter(f"one of {list(BUFFER_SETS)}", param_hint="--buffer-set")
    if not buffer:
        live = list(BUFFER_SETS[buffer_set][:points])
    previous = CalibrationStore(path).active(sensor, parameter)
    slope = previous.slope_pct if previous and previous.slope_pct else 100.0
    due = cfg.calibration.due_for(parameter) if cfg else 30.0
    limits = cfg.calibration.ph_limits() if cfg else None

    def done(standards: list[Standard]) -> CalibrationRecord:
        rec = cal.calibrate_ph(
            sensor,
            standards,
            operator=operator,
            parameter=parameter,
            slope_pct=slope,
            notes=notes,
            due_days=due,
            limits=limits,
        )
        return replace(rec, previous=previous.results()) if previous else rec

    if typed:
        _finish(path, _compute(done, typed))
        return
    opts = LiveOptions(
        cfg, not no_prompt, stable_seconds, stable_drift, point_timeout, temperature, lot or []
    )

    def prompt(nominal: float) -> str:
        return f"Rinse the electrode, place it in buffer {nominal:.2f}"

    def raw_of(values: Live) -> float:
        return ph_raw_mv(raw_values(values))

    rec, answer = _measure_all(opts, sensor, live, prompt, raw_of, "mV", done, write_to_probe)
    _finish_live(rec, answer, as_json)


# The other commands register on ``app`` from their modules.
from gateway.cli import calibrate_kb, calibrate_records  # noqa: E402, F401
