"""``edge-gateway diag``: what is on a bus, raw registers, one poll, a daemon's health.

Every command talks to the port itself (stop the gateway first if it owns the port: a serial port
has one owner) through the engine's own transport and frames. Broker checks are in
``diag_brokers.py``.

Exit codes: 0 done (and, for scan, something answered); 1 nothing found, a read failed or a
check is unhealthy; 2 bad option, profile or config; 3 the port cannot be opened.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from gateway.cli import diag_brokers, stores
from gateway.common.config import ConfigError
from gateway.edge.acquire.modbus import scan as scanning
from gateway.edge.acquire.modbus.frames import ModbusError
from gateway.edge.acquire.modbus.profiles import Profile, SerialDefaults, load_profile
from gateway.edge.acquire.modbus.registers import decode_value, every_decoding
from gateway.edge.settings import GatewayConfig

app = typer.Typer(
    help="Diagnose buses, probes, brokers and a running gateway.",
    epilog="Exit codes: 0 done and healthy (scan: something answered); 1 nothing found, a read "
    "failed, a value not good, a check failed; 2 bad option, profile or config; 3 the port or "
    "the gateway cannot be reached.",
    no_args_is_help=True,
)

Port = Annotated[str, typer.Option("--port", help="Serial port, e.g. /dev/ttyUSB0.")]
Unit = Annotated[int, typer.Option("--unit", min=1, max=247, help="Modbus unit id.")]
Baud = Annotated[int, typer.Option(help="Baud rate.")]
Parity = Annotated[str, typer.Option(help="N, E or O.")]
Stopbits = Annotated[int, typer.Option(min=1, max=2)]
Timeout = Annotated[float, typer.Option(help="Seconds to wait for each answer.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _profile(path: str | None) -> Profile | None:
    if path is None:
        return None
    try:
        return load_profile(path)
    except ConfigError as e:
        raise _fail(str(e), 2) from None


def _line(baud: int, parity: str, stopbits: int) -> SerialDefaults:
    if parity not in ("N", "E", "O"):
        raise typer.BadParameter("N, E or O", param_hint="--parity")
    return SerialDefaults(
        baudrate=baud,
        parity=cast(Literal["N", "E", "O"], parity),
        stopbits=cast(Literal[1, 2], stopbits),
    )


# --- scan ----------------------------------------------------------------------------------------


@app.command("scan")
def scan(
    port: Port,
    baud: Annotated[str, typer.Option(help="Baud rates to try, e.g. 9600,19200.")] = "9600,19200",
    parity: Annotated[str, typer.Option(help="Parities to try, e.g. N,E.")] = "N",
    ids: Annotated[str, typer.Option("--ids", help="Unit ids, e.g. 1-247 or 3,17.")] = "1-247",
    stopbits: Stopbits = 1,
    timeout: Timeout = scanning.DEFAULT_TIMEOUT,
    as_json: JsonOut = False,
) -> None:
    """Which slaves answer on a port, at which line settings, and which profile fits each.

    Exit codes: 0 at least one slave answered, 1 none did, 2 bad option, 3 port not usable.
    """
    try:
        bauds = [int(b) for b in baud.split(",")]
        parities = [p.strip().upper() for p in parity.split(",")]
        units = scanning.parse_units(ids)
        for p in parities:
            _line(bauds[0], p, stopbits)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    err = Console(stderr=True)
    total = len(bauds) * len(parities) * len(units)
    started = time.monotonic()
    asked = 0
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=err,
        transient=not err.is_terminal,
    ) as bar:
        task = bar.add_task("scanning", total=total)

        def progress(p: scanning.Progress) -> None:
            nonlocal asked
            asked += 1
            per_id = (time.monotonic() - started) / asked
            bar.update(
                task,
                advance=1,
                description=f"{p.baud} 8{p.parity}{stopbits} unit {p.unit:3d} "
                f"({per_id * 1000:.0f} ms/id)",
            )
            if p.found is not None:
                bar.console.print(f"found unit {p.unit} at {p.found.line}")
            elif p.note:
                bar.console.print(f"unit {p.unit} at {p.baud} 8{p.parity}: {p.note}")

        try:
            found = scanning.scan(
                port, bauds, units, timeout, parities, stopbits=stopbits, progress=progress
            )
        except ModbusError as e:
            raise _fail(f"{port}: {e}", 3) from None
    seconds = time.monotonic() - started
    rows: list[dict[str, Any]] = [
        {
            "unit": f.unit,
            "baud": f.baud,
            "parity": f.parity,
            "stopbits": f.stopbits,
            "line": f.line,
            "profile": f.profile,
            "candidates": list(f.candidates),
            "exception": f.exception,
        }
        for f in found
    ]
    if as_json:
        typer.echo(json.dumps({"port": port, "seconds": round(seconds, 2), "found": rows}))
    else:
        table = Table("unit", "line", "profile", "note", title=f"{port}: {len(rows)} slave(s)")
        for r in rows:
            fits = r["profile"] or (", ".join(r["candidates"]) or "no shipped profile fits")
            table.add_row(str(r["unit"]), r["line"], fits, r["exception"] or "")
        Console().print(table)
        typer.echo(f"{asked} ids asked in {seconds:.1f} s ({seconds / max(asked, 1):.3f} s/id)")
    if not rows:
        raise typer.Exit(1)


# --- read ----------------------------------------------------------------------------------------


def _with_port(port: str, line: SerialDefaults, unit: int, timeout: float, fn: Any) -> Any:
    link = scanning.rtu_transport(port, line)
    try:
        return fn(scanning.reader(link, unit, timeout))
    except ModbusError as e:
        raise _fail(f"{port} unit {unit}: {e}", 3 if e.kind == "port" else 1) from None
    finally:
        link.close()


@app.command("read")
def read(
    port: Port,
    unit: Unit,
    address: Annotated[int, typer.Option(min=0, max=65535, help="Zero-based wire address.")],
    count: Annotated[int, typer.Option(min=1, max=125)] = 2,
    table: Annotated[str, typer.Option(help="holding or input.")] = "holding",
    baud: Baud = 9600,
    parity: Parity = "N",
    stopbits: Stopbits = 1,
    timeout: Timeout = 1.0,
    scale: Annotated[float, typer.Option(help="Multiply every decoding by this.")] = 1.0,
    profile: Annotated[str | None, typer.Option(help="Also decode as this profile does.")] = None,
    as_json: JsonOut = False,
) -> None:
    """Registers in hex and every decoding (int16/uint16/int32/uint32/float32, four word orders).

    Exit codes: 0 read, 1 the slave did not answer well, 2 bad option, 3 port not usable.
    """
    if table not in ("holding", "input"):
        raise typer.BadParameter("holding or input", param_hint="--table")
    prof = _profile(profile)
    line = _line(baud, parity, stopbits)
    regs: list[int] = _with_port(port, line, unit, timeout, lambda r: r(table, address, count))
    decodings = every_decoding(regs)
    as_profile = []
    if prof is not None:
        image = {(table, address + i): v for i, v in enumerate(regs)}
        for spec in prof.values:
            d = decode_value(spec, image)
            if "missing_registers" not in d.reasons:
                as_profile.append(
                    {
                        "name": spec.name,
                        "value": d.number,
                        "unit": spec.unit,
                        "quality": d.quality.value,
                        "reasons": d.reasons,
                    }
                )
    if as_json:
        doc = {
            "registers": [
                {"address": address + i, "hex": f"0x{v:04X}", "value": v}
                for i, v in enumerate(regs)
            ],
            "decodings": [
                {
                    "address": address + d.offset,
                    "type": d.type,
                    "wordOrder": d.word_order,
                    "value": d.value,
                    "scaled": d.scaled(scale),
                }
                for d in decodings
            ],
            "profile": as_profile,
        }
        typer.echo(json.dumps(doc))
        return
    con = Console()
    hexes = Table("address", "hex", "uint16", title=f"{table} registers of unit {unit}")
    for i, v in enumerate(regs):
        hexes.add_row(str(address + i), f"0x{v:04X}", str(v))
    con.print(hexes)
    dec = Table("address", "type", "ABCD", "CDAB", "BADC", "DCBA", title=f"decodings x {scale:g}")
    rows: dict[tuple[int, str], dict[str, str]] = {}
    for dd in decodings:
        n = dd.scaled(scale)
        text = "-" if n is None else f"{n:.7g}"
        rows.setdefault((dd.offset, dd.type), {})[dd.word_order or "ABCD"] = text
    for (offset, type_name), cells in rows.items():
        orders = [cells.get(o, "") for o in ("ABCD", "CDAB", "BADC", "DCBA")]
        dec.add_row(str(address + offset), type_name, *orders)
    con.print(dec)
    if as_profile:
        _values_table(con, as_profile, f"as {prof.model if prof else ''}")


def _values_table(con: Console, rows: list[dict[str, Any]], title: str) -> None:
    t = Table("value", "number", "unit", "quality", "reasons", title=title)
    for r in rows:
        number = "-" if r["value"] is None else f"{r['value']:g}"
        t.add_row(r["name"], number, r["unit"], r["quality"], ", ".join(r["reasons"]))
    con.print(t)


# --- poll ----------------------------------------------------------------------------------------


def _device_of(cfg: GatewayConfig, sensor: str) -> tuple[str, SerialDefaults, int, Profile, float]:
    from gateway.edge.acquire.modbus.engine import resolve_buses

    for bus in resolve_buses(cfg.modbus):
        for dev in bus.devices:
            if sensor in {dev.sensor_id(v.name) for v in dev.profile.values}:
                if bus.line is None:
                    raise _fail(f"{sensor} is on Modbus TCP ({bus.label}): not supported here", 2)
                return bus.label, bus.line, dev.unit, dev.profile, dev.timeout
    raise _fail(f"no Modbus device with sensor {sensor!r} in {cfg.source}", 2)


@app.command("poll")
def poll(
    config: Annotated[Path | None, typer.Option("--config", "-c")] = None,
    sensor: Annotated[str | None, typer.Option(help="A sensor of --config.")] = None,
    profile: Annotated[str | None, typer.Option(help="Profile, with --port and --unit.")] = None,
    port: Annotated[str | None, typer.Option()] = None,
    unit: Annotated[int | None, typer.Option(min=1, max=247)] = None,
    baud: Annotated[int | None, typer.Option(help="Default: the profile's.")] = None,
    parity: Annotated[str | None, typer.Option(help="Default: the profile's.")] = None,
    timeout: Timeout = 1.0,
    as_json: JsonOut = False,
) -> None:
    """One poll of a probe as the gateway does it, as a table with quality and reasons.

    Exit codes: 0 every value good, 1 a value is not good or the probe did not answer, 2 bad
    option or config, 3 port not usable.
    """
    if config is not None and sensor is not None:
        try:
            port_, line, unit_, prof, timeout = _device_of(stores.load(config), sensor)
        except ConfigError as e:
            raise _fail(str(e), 2) from None
    elif profile is not None and port is not None:
        loaded = _profile(profile)
        assert loaded is not None
        prof, port_ = loaded, port
        unit_ = unit if unit is not None else prof.serial.unit
        line = _line(
            baud or prof.serial.baudrate, parity or prof.serial.parity, prof.serial.stopbits
        )
    else:
        raise typer.BadParameter("give --config and --sensor, or --profile and --port [--unit]")
    decoded = _with_port(port_, line, unit_, timeout, lambda r: scanning.poll_once(prof, r))
    rows = [
        {
            "name": d.spec.name,
            "parameter": d.spec.parameter,
            "value": d.number,
            "unit": d.spec.unit,
            "quality": d.quality.value,
            "reasons": d.reasons,
        }
        for d in decoded
    ]
    if as_json:
        typer.echo(json.dumps({"port": port_, "unit": unit_, "model": prof.model, "values": rows}))
    else:
        _values_table(Console(), rows, f"{port_} unit {unit_} ({prof.model})")
    if any(r["quality"] != "good" for r in rows):
        raise typer.Exit(1)


# --- health --------------------------------------------------------------------------------------


@app.command("health")
def health(
    url: Annotated[str | None, typer.Option(help="The gateway's base URL.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c")] = None,
    as_json: JsonOut = False,
) -> None:
    """A running daemon's /health as a table (URL from --url, or the daemon's API file / [http]).

    Exit codes: 0 healthy, 1 unhealthy, 3 nothing answers.
    """
    if url is None:
        url = _daemon_url(config or Path("config.toml"))
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10) as r:
            doc = json.loads(r.read())
    except urllib.error.HTTPError as e:
        doc = json.loads(e.read() or b"{}")
    except (OSError, ValueError) as e:
        raise _fail(f"{url}/health does not answer: {e}", 3) from None
    if as_json:
        typer.echo(json.dumps(doc))
    else:
        t = Table("check", "status", "detail", title=f"{url}: {doc.get('status')}")
        for name, check in (doc.get("checks") or {}).items():
            detail = {k: v for k, v in check.items() if k != "status"}
            t.add_row(name, str(check.get("status")), json.dumps(detail)[:200])
        Console().print(t)
    if doc.get("status") != "healthy":
        raise typer.Exit(1)


def _daemon_url(config: Path) -> str:
    from gateway.edge.calibration_api import api_file

    cfg = stores.load(config)
    try:
        return str(json.loads(api_file(cfg.calibration.store).read_text())["url"])
    except (OSError, ValueError, KeyError):
        return f"http://{cfg.http.host}:{cfg.http.port}"


# --- brokers -------------------------------------------------------------------------------------

app.command("mqtt")(diag_brokers.mqtt)
app.command("kafka")(diag_brokers.kafka)
app.command("influx")(diag_brokers.influx)
