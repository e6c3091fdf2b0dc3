"""``edge-gateway init``: write a commented first config for this machine.

It lists the serial ports it finds and, with ``--scan``, asks every unit id on them and names the
probes that answer with the shipped profile that fits (``gateway/edge/acquire/modbus/scan.py``).
The file is checked by the gateway's own config loader before it is written: a file ``init``
writes always passes ``edge-gateway config check``.

``render`` is pure (settings and scan results in, TOML text out); ``init`` is the command.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from typer import Option

from gateway.common.config import ConfigError
from gateway.edge.acquire.modbus.frames import ModbusError
from gateway.edge.acquire.modbus.scan import (
    DEFAULT_TIMEOUT,
    DRIVERS,
    Found,
    Progress,
    SerialPortInfo,
    detect_ports,
    load_profiles,
    parse_units,
    scan,
)

T = TypeVar("T")
INSTALLED_DRIVERS = Path("/etc/edge-gateway/drivers")
SERVICE_DIR = "/var/lib/edge-gateway"  # StateDirectory= and WorkingDirectory= of the unit
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # safe in a Kafka topic name and a sensor id
_TOPIC_NOTE = "readings go to Kafka topic sensors.raw.<plant_id>"
_PLANT_NOTE = "CHANGE to your plant's id: " + _TOPIC_NOTE
_COLUMN = 33  # comments start after this column, as in the repository's config.toml


# --- rendering (pure) ----------------------------------------------------------------------------


@dataclass
class PortScan:
    """What a scan of one port gave: the line settings tried, the slaves, or why it failed."""

    port: str
    lines: list[str]  # "9600 8N1", ...
    units: str  # as given, e.g. "1-247"
    seconds: float = 0.0
    found: list[Found] = field(default_factory=list)
    error: str = ""


@dataclass
class InitSettings:
    """Everything the written file depends on."""

    output: Path  # where it will be written: profile paths are relative to its folder
    gateway_id: str
    plant_id: str
    kafka: str = "127.0.0.1:9092"
    service: bool = False  # state files under /var/lib/edge-gateway instead of var/
    ports: list[SerialPortInfo] = field(default_factory=list)  # detected on this machine
    scans: list[PortScan] | None = None  # None: not scanned
    profiles: list[str] = field(default_factory=list)  # shipped profile paths, for the examples
    written_at: str = ""  # the header's date; empty: today


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string: JSON escapes are TOML escapes


def _kv(key: str, value: object, note: str = "", commented: bool = False) -> str:
    line = f"{'# ' if commented else ''}{key} = {_toml(value)}"
    if not note:
        return line
    return f"{line:<{_COLUMN}} # {note}" if len(line) < _COLUMN else f"{line}  # {note}"


def _comment(text: str, indent: str = "") -> list[str]:
    """``text`` as comment lines of at most 99 characters (paths are never broken)."""
    return textwrap.wrap(
        text,
        width=99,
        initial_indent="# " + indent,
        subsequent_indent="# " + indent + ("  " if indent else ""),
        break_on_hyphens=False,
        break_long_words=False,
    )


def _rule(title: str) -> str:
    head = f"# ---- {title} "
    return head + "-" * max(4, 99 - len(head))


def profile_ref(profile: str | Path, output: Path) -> str:
    """A profile's path as the config names it: relative to the config's folder when the profile
    lies under it (a clone of the repository), else absolute."""
    path = Path(profile).resolve()
    folder = output.resolve().parent
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def _state_path(s: InitSettings, name: str) -> str:
    return f"{SERVICE_DIR}/{name}" if s.service else f"var/{name}"


def _describe_port(p: SerialPortInfo) -> str:
    extra = [f"now {p.device}"] if p.device != p.path else []
    if p.description:
        extra.append(p.description)
    if not p.likely:
        extra.append("on-board UART, probably not wired")
    return f"#   {p.path}" + (f" ({', '.join(extra)})" if extra else "")


def _header(s: InitSettings) -> list[str]:
    day = s.written_at or datetime.now(UTC).strftime("%Y-%m-%d")
    return [
        *_comment(
            f"edge-gateway configuration for gateway {s.gateway_id}, written by `edge-gateway"
            f" init` on {day}."
        ),
        *_comment(f"Check it after every change: edge-gateway config check --config {s.output}"),
        "# A typo or a wrong type stops the gateway with the file, the key and what was expected;",
        "# the repository's config.toml explains every key.",
        '# Secrets never go in this file: write "file:/path" (read again at every reload),',
        '# "cred:NAME" (a systemd credential in /etc/edge-gateway/credentials/, loaded by the unit',
        '# at start) or "env:NAME" instead of the secret; cred: and env: secrets change only',
        "# with a restart.",
        "# Relative paths are relative to the working directory (/var/lib/edge-gateway under",
        "# systemd), except probe profiles, which are relative to this file.",
        "",
        "[gateway]",
        _kv("id", s.gateway_id, "carried by every reading: keep it for the device's life"),
        _kv("plant_id", s.plant_id, _PLANT_NOTE if s.plant_id == "default" else _TOPIC_NOTE),
        _kv("location", "", 'where the gateway is, e.g. "blower-house"'),
    ]


def _example_port(s: InitSettings, port: str) -> list[str]:
    lines = []
    example = "drivers/<model>.toml"
    if s.profiles:
        ph = [p for p in s.profiles if Path(p).stem == "ph-int16"] or s.profiles
        example = profile_ref(ph[0], s.output)
        names = ", ".join(Path(p).stem for p in s.profiles)
        folder = profile_ref(Path(ph[0]).parent, s.output)
        lines = _comment(f"Probe profiles in {folder}/: {names}")
    return [
        *lines,
        "# [[modbus.serial]]",
        _kv("port", port, commented=True),
        _kv("timeout", 0.5, "seconds per request", commented=True),
        "#",
        *_placeholder(s, example, 1, "the probe model's register map", "ph-aeration-1"),
    ]


def _placeholder(
    s: InitSettings, profile: str, unit: int, profile_note: str, sensor: str
) -> list[str]:
    return [
        "# [[modbus.serial.slaves]]",
        _kv("profile", profile, profile_note, commented=True),
        _kv("unit", unit, "the probe's Modbus address", commented=True),
        _kv("sensor_id", sensor, "names its readings", commented=True),
        _kv("plant_id", s.plant_id, commented=True),
        _kv("interval", 10.0, "seconds between polls", commented=True),
    ]


def _sensor_ids(found: list[Found]) -> dict[int, str]:
    out: dict[int, str] = {}
    for f in found:
        stem = Path(f.profile).stem if f.profile else "probe"
        out[f.unit] = f"{stem}-{f.unit}"
    return out


def _answered(f: Found) -> str:
    return f"unit {f.unit} answered at {f.line}" + (f" ({f.exception})" if f.exception else "")


def _slave(s: InitSettings, f: Found, sensor: str) -> list[str]:
    assert f.profile is not None
    return [
        *_comment(f"{_answered(f)}: {Path(f.profile).stem} ({f.details.get(f.profile, '')})"),
        "[[modbus.serial.slaves]]",
        _kv("profile", profile_ref(f.profile, s.output)),
        _kv("unit", f.unit, "the probe's Modbus address"),
        _kv("sensor_id", sensor, "names its readings: rename it after its place"),
        _kv("plant_id", s.plant_id),
        _kv("location", "", 'e.g. "aeration-1"'),
        _kv("interval", 10.0, "seconds between polls"),
    ]


def _commented_slave(s: InitSettings, f: Found, sensor: str, port_line: str = "") -> list[str]:
    """A slave entry to uncomment by hand: no single profile fits it, or it answered at another
    line setting than the port's (``port_line``)."""
    refs = [profile_ref(c, s.output) for c in f.candidates]
    if port_line:
        why = (
            f"{_answered(f)}, not at {port_line} like the others: a port has one line setting."
            f" Set the probe to {port_line} (or wire it to a port of its own), then uncomment:"
        )
    elif refs:
        why = f"{_answered(f)}; several profiles fit, keep the right one and uncomment it:"
    else:
        why = (
            f"{_answered(f)}; no shipped profile fits it: write a profile for its model (as in"
            " drivers/) or pick one, then uncomment:"
        )
    lines = _comment(why)
    for ref, c in zip(refs, f.candidates, strict=True):
        lines += _comment(f"{ref}: {f.details.get(c, '')}", indent="  ")
    profile = refs[0] if refs else "drivers/<model>.toml"
    others = "or " + ", ".join(refs[1:]) if len(refs) > 1 else ""
    return lines + _placeholder(s, profile, f.unit, others, sensor)


def _scanned_port(s: InitSettings, ps: PortScan) -> list[str]:
    tried = ", ".join(ps.lines)
    head = f"Scanned {ps.port} at {tried}, units {ps.units}, in {ps.seconds:.1f} s"
    if ps.error:
        return [
            *_comment(f"{head}: the port could not be used ({ps.error})."),
            *_example_port(s, ps.port),
        ]
    if not ps.found:
        return [
            *_comment(f"{head}: no probe answered."),
            "# Check the wiring (A/B swapped?), termination, and the probes' address, baud rate",
            "# and parity (try --baud and --parity), or describe the probes here:",
            *_example_port(s, ps.port),
        ]
    counts = Counter(f.line for f in ps.found)
    line = max(counts, key=lambda k: (counts[k], -ps.lines.index(k) if k in ps.lines else 0))
    main = next(f for f in ps.found if f.line == line)
    configured = sum(1 for f in ps.found if f.profile and f.line == line)
    out = [
        *_comment(f"{head}: {len(ps.found)} answered, {configured} configured below."),
        "[[modbus.serial]]",
        _kv("port", ps.port),
        _kv("baudrate", main.baud, "as the scan found the probes"),
        _kv("parity", main.parity),
        _kv("stopbits", main.stopbits),
        _kv("timeout", 0.5, "seconds per request"),
        _kv("retries", 1, "extra attempts after a garbled answer; never after a timeout"),
        _kv("backoff_max", 60.0, "longest pause between attempts at a silent probe"),
    ]
    sensors = _sensor_ids(ps.found)
    for f in sorted(ps.found, key=lambda f: f.unit):
        out.append("")
        if f.line != line:
            out += _commented_slave(s, f, sensors[f.unit], line)
        elif f.profile:
            out += _slave(s, f, sensors[f.unit])
        else:
            out += _commented_slave(s, f, sensors[f.unit])
    return out


def _modbus(s: InitSettings) -> list[str]:
    out = [
        "",
        _rule("acquire: Modbus RTU probes on RS-485"),
        "# One worker per port polls its probes in turn; a probe that stops answering is retried",
        "# with back-off, so it never delays the others by more than one timeout.",
    ]
    if s.ports:
        out.append("# Serial ports on this machine (/dev/serial/by-id/ names survive reboots):")
        out += [_describe_port(p) for p in s.ports]
    else:
        out.append("# No serial port was found on this machine (USB RS-485 adapter plugged in?).")
    if s.scans is None:
        port = next((p.path for p in s.ports if p.likely), "/dev/ttyUSB0")
        out.append("# Find the probes with `edge-gateway init --scan --force`, or describe them:")
        return out + _example_port(s, port)
    if not s.scans:
        return [*out, "# Nothing was scanned. Describe the probes here:", *_example_port(s, "")]
    for ps in s.scans:
        out += ["", *_scanned_port(s, ps)]
    return out


def _rest(s: InitSettings) -> list[str]:
    return [
        "",
        _rule("acquire: MQTT"),
        "# Devices that publish to a broker; a message is acknowledged once its reading is stored.",
        "[mqtt]",
        _kv("enabled", False, "true, then set the broker and a subscription below"),
        _kv("host", "127.0.0.1"),
        _kv("port", 8883),
        _kv("tls", True),
        _kv("ca_file", "/etc/edge-gateway/ca.pem", commented=True),
        _kv("username", "edge-gateway", commented=True),
        _kv("password", "cred:mqtt-password", 'or "env:MQTT_PASSWORD"', commented=True),
        "#",
        "# [[mqtt.subscriptions]]",
        _kv("topic", f"plant/{s.plant_id}/+/+", commented=True),
        _kv("format", "number", "plain numbers; the topic names the reading", commented=True),
        _kv("pattern", "plant/{plantId}/{sensorId}/{parameter}", commented=True),
        "",
        _rule("calibrate"),
        "[calibration]",
        _kv("store", _state_path(s, "calibrations.sqlite"), "edge-gateway calibrate --store"),
        "",
        _rule("validate"),
        "# Physical ranges default to the design's table (pH 0-14, temperature -10-100 °C, ...).",
        "# Add this site's normal band (outside: uncertain) and spike rates, e.g.:",
        "# normal_bands = { pH = [6.0, 9.0], temperature = [5.0, 35.0] }",
        "[validation]",
        _kv("flatline_suspect", 60, "equal readings in a row: uncertain"),
        _kv("flatline_bad", 360, "... and bad"),
        _kv("max_age", 300.0, "seconds; older readings are stale"),
        "",
        _rule("alarms"),
        "# Default limits (mg/L, warning/critical): BOD 30/100, COD 250/500, TSS 100/300; pH",
        "# outside 6.5-8.5 warns, outside 6.0-9.0 is critical. Override per parameter, e.g.:",
        "# [alarms.thresholds.BOD]",
        "# high_warning = 30.0",
        "# high_critical = 100.0",
        "[alarms]",
        _kv("on_delay", 10.0, "seconds over a limit before the alarm raises"),
        _kv("off_delay", 30.0, "... and back inside before it clears"),
        _kv("realarm_interval", 3600.0, "re-raise a standing alarm every hour"),
        "",
        _rule("buffer"),
        "# Every reading is on disk here before anything acknowledges it, until Kafka confirms it.",
        "[buffer]",
        _kv("path", _state_path(s, "buffer.db"), "a disk that keeps data over a power cut"),
        _kv("max_rows", 5_000_000, "about two weeks of a 20-probe plant at 10 s"),
        _kv("max_bytes", 2_000_000_000),
        _kv("overflow", "block", 'hold the sources back; or "drop_oldest"'),
        "",
        "[deadletter]",
        _kv("path", _state_path(s, "deadletter.db"), "payloads that could not become readings"),
        "",
        _rule("forward"),
        "[kafka]",
        _kv("bootstrap_servers", s.kafka, "host:port[,host:port] of the plant's Kafka"),
        _kv("security_protocol", "PLAINTEXT", '"SASL_SSL" across a WAN, then set:'),
        _kv("sasl_mechanism", "SCRAM-SHA-256", commented=True),
        _kv("sasl_username", f"plant-{s.plant_id}", commented=True),
        _kv("sasl_password", "cred:kafka-password", 'or "env:KAFKA_PASSWORD"', commented=True),
        _kv("ssl_ca_location", "/etc/edge-gateway/ca.pem", commented=True),
        _kv("compression", "lz4"),
        "",
        _rule("serve"),
        "# /metrics (Prometheus), /health and POST /api/readings for devices that push.",
        "[http]",
        _kv("host", "127.0.0.1", '"0.0.0.0" to be reached from the plant network'),
        _kv("port", 8080),
        _kv("token", "cred:http-token", "ingest bearer token; unset: no ingest", commented=True),
        "",
    ]


def render(s: InitSettings) -> str:
    """The config file's text."""
    return "\n".join([*_header(s), *_modbus(s), *_rest(s)])


# --- the command ---------------------------------------------------------------------------------


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _check(text: str, output: Path) -> None:
    """Load ``text`` as the gateway would from ``output`` (its folder resolves the profiles);
    raises ConfigError naming ``output``."""
    from gateway.edge.settings import load_gateway_config

    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".toml", dir=output.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        load_gateway_config(tmp)
    except ConfigError as e:
        source = str(output) if e.source == tmp else e.source
        raise ConfigError(source, e.key, e.expected) from None
    finally:
        os.unlink(tmp)


def _write(text: str, output: Path, force: bool) -> None:
    """Write atomically; without ``force`` an existing file is never replaced."""
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if force:
            os.replace(tmp, output)
        else:
            os.link(tmp, output)  # fails if the file appeared meanwhile
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _Printer:
    """Scan progress on stderr: every probe that answers, and where the scan is every few
    seconds (in place on a terminal)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.shown = time.monotonic()

    def __call__(self, p: Progress) -> None:
        clear = "\r\033[K" if self.tty else ""
        where = f"{p.baud} 8{p.parity}1"
        if p.found is not None:
            f = p.found
            if f.profile:
                what = Path(f.profile).stem
            elif f.candidates:
                what = "several profiles fit: " + ", ".join(Path(c).stem for c in f.candidates)
            else:
                what = "no shipped profile fits"
            typer.echo(f"{clear}  {where} unit {p.unit}: answered{_exc(f)} -> {what}", err=True)
        elif p.note:
            typer.echo(f"{clear}  {where} unit {p.unit}: {p.note}", err=True)
        now = time.monotonic()
        if self.tty:
            typer.echo(f"{clear}  {where}: unit {p.unit} ({p.done}/{p.total})", err=True, nl=False)
            if p.done == p.total:
                typer.echo(clear, err=True, nl=False)
        elif now - self.shown >= 5.0 or p.done == p.total:
            typer.echo(f"  {where}: unit {p.unit} ({p.done}/{p.total})", err=True)
            self.shown = now


def _exc(f: Found) -> str:
    return f" with {f.exception}" if f.exception else ""


def _parse_list(text: str, name: str, convert: Callable[[str], T]) -> list[T]:
    try:
        items = [convert(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: a comma-separated list", param_hint=name) from None
    if not items:
        raise typer.BadParameter("must not be empty", param_hint=name)
    return items


def profile_folder(output: Path) -> Path:
    """Where the probe profiles are: drivers/ next to the config (as scripts/install lays out
    /etc/edge-gateway), else those shipped with this code (a clone), else the installed ones."""
    for folder in (output.parent / "drivers", DRIVERS, INSTALLED_DRIVERS):
        if any(folder.glob("*.toml")):
            return folder
    return DRIVERS


def stable_name(port: str, detected: list[SerialPortInfo]) -> str:
    """The /dev/serial/by-id name of ``port`` if it has one: it survives reboots and re-plugging."""
    device = os.path.realpath(port)
    return next((p.path for p in detected if p.device == device and p.path != p.device), port)


def _scan_ports(
    ports: list[str], bauds: list[int], parities: list[str], units: str, timeout: float,
    drivers: Path, detected: list[SerialPortInfo],
) -> list[PortScan]:  # fmt: skip
    profiles, errors = load_profiles(drivers)
    for e in errors:
        typer.echo(f"warning: profile skipped: {e}", err=True)
    if not profiles:
        raise _fail(f"no probe profile in {drivers} to identify probes with (--drivers)")
    unit_ids = parse_units(units)
    lines = [f"{b} 8{p}1" for b in bauds for p in parities]
    results = []
    for port in ports:
        worst = len(lines) * len(unit_ids) * timeout
        typer.echo(
            f"scanning {port} at {', '.join(lines)}, units {units} "
            f"({timeout:g} s per silent unit, at most ~{worst:.0f} s)",
            err=True,
        )
        ps = PortScan(stable_name(port, detected), lines, units)
        start = time.monotonic()
        try:
            ps.found = scan(port, bauds, unit_ids, timeout, parities,
                            profiles=profiles, progress=_Printer())  # fmt: skip
        except ModbusError as e:
            ps.error = str(e)
            typer.echo(f"  {port}: {e}", err=True)
        ps.seconds = time.monotonic() - start
        typer.echo(f"  {port}: {len(ps.found)} answered, in {ps.seconds:.1f} s", err=True)
        results.append(ps)
    return results


def init(
    output: Annotated[Path, Option("--output", "-o", help="File to write.")] = Path("config.toml"),
    force: Annotated[bool, Option("--force", help="Replace an existing file.")] = False,
    plant_id: Annotated[
        str, Option(help="Plant id: readings go to Kafka topic sensors.raw.<plant-id>.")
    ] = "default",
    gateway_id: Annotated[
        str | None, Option(help="Gateway id carried by every reading (default: host name).")
    ] = None,
    kafka: Annotated[str, Option(help="Kafka bootstrap servers, host:port[,...].")] = (
        "127.0.0.1:9092"
    ),
    service: Annotated[
        bool, Option(help=f"State files under {SERVICE_DIR} (edge-gateway.service), not var/.")
    ] = False,
    do_scan: Annotated[
        bool, Option("--scan", help="Ask every unit id on the serial ports and identify probes.")
    ] = False,
    port: Annotated[
        list[str] | None, Option(help="Serial port to scan, repeatable (default: those found).")
    ] = None,
    baud: Annotated[str, Option(help="Baud rates to try, comma-separated.")] = "9600,19200",
    parity: Annotated[str, Option(help="Parities to try (N, E, O), comma-separated.")] = "N",
    units: Annotated[str, Option(help="Unit ids to ask, e.g. 1-247 or 1-20,100.")] = "1-247",
    timeout: Annotated[
        float, Option(help="Seconds to wait for each answer while scanning.")
    ] = DEFAULT_TIMEOUT,
    drivers: Annotated[
        Path | None,
        Option(help="Folder of probe profiles (default: drivers/ next to --output, else shipped)."),
    ] = None,
) -> None:
    """Write a commented config for this machine that passes `edge-gateway config check`.

    With --scan, the serial ports are probed (stop the gateway first: it must not poll the same
    port) and every probe that answers gets a slave entry with the profile that fits it.
    """
    gateway_id = gateway_id or socket.gethostname()
    for name, value in (("--plant-id", plant_id), ("--gateway-id", gateway_id)):
        if not _ID.match(value):
            raise typer.BadParameter(f"{value!r}: letters, digits, '.', '_', '-'", param_hint=name)
    if not 0 < timeout <= 5:
        raise typer.BadParameter("between 0 and 5 seconds", param_hint="--timeout")
    bauds = _parse_list(baud, "--baud", int)
    parities = [p.upper() for p in _parse_list(parity, "--parity", str)]
    if any(b <= 0 for b in bauds) or not set(parities) <= {"N", "E", "O"}:
        raise typer.BadParameter("positive baud rates; parity N, E or O", param_hint="--baud")
    try:
        parse_units(units)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--units") from None
    if output.exists() and not force:
        raise _fail(f"{output} exists; pass --force to replace it", 1)

    drivers = drivers or profile_folder(output)
    detected = detect_ports()
    settings = InitSettings(
        output=output,
        gateway_id=gateway_id,
        plant_id=plant_id,
        kafka=kafka,
        service=service,
        ports=detected,
        profiles=[str(p) for p in sorted(drivers.glob("*.toml"))],
    )
    if do_scan:
        targets = list(port) if port else [p.path for p in detected if p.likely]
        if not targets:
            typer.echo("no serial port to scan (plug in the adapter, or give --port)", err=True)
        settings.scans = _scan_ports(targets, bauds, parities, units, timeout, drivers, detected)
    elif port:
        known = {p.path for p in detected}
        settings.ports += [SerialPortInfo(p, p) for p in port if p not in known]

    text = render(settings)
    created = [d for d in [output.parent, *output.parent.parents] if not d.exists()]
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        _check(text, output)
        _write(text, output, force)
    except ConfigError as e:
        for d in created:
            d.rmdir()
        raise _fail(f"the generated config does not load, nothing written: {e}") from None
    except FileExistsError:
        raise _fail(f"{output} exists; pass --force to replace it", 1) from None
    except OSError as e:
        raise _fail(f"cannot write {output}: {e}", 1) from None
    found = [f for ps in settings.scans or [] for f in ps.found]
    identified = sum(1 for f in found if f.profile)
    summary = f", {identified} of {len(found)} probes identified" if do_scan else ""
    typer.echo(f"wrote {output}{summary}; check it: edge-gateway config check --config {output}")
