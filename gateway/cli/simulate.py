"""``edge-gateway simulate``: serve probe profiles as Modbus slaves on a pty or over TCP."""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from pathlib import Path
from typing import Annotated, Literal, cast

import typer
from typer import Option

from gateway.common.config import ConfigError
from gateway.edge.acquire.modbus.profiles import SerialDefaults, load_profile
from gateway.edge.acquire.modbus.simulate import (
    FAULTS,
    SCENARIOS,
    PtyLine,
    RtuSimulator,
    SimBus,
    SimSlave,
    TcpSimulator,
)

LINE = re.compile(r"^(\d+)-8([NEO])([12])$")


def _line(text: str, spec: str) -> SerialDefaults:
    m = LINE.match(text)
    if m is None:
        raise typer.BadParameter(
            f"{spec!r}: expected PROFILE[:UNIT[:BAUD-8N1]]", param_hint="--slave"
        )
    parity = cast(Literal["N", "E", "O"], m.group(2))
    return SerialDefaults(
        baudrate=int(m.group(1)), parity=parity, stopbits=cast(Literal[1, 2], int(m.group(3)))
    )


def _slave_specs(
    profile: Path | None, unit: int | None, slaves: list[str]
) -> list[tuple[str, int | None, SerialDefaults | None]]:
    specs: list[tuple[str, int | None, SerialDefaults | None]] = []
    if profile is not None:
        specs.append((str(profile), unit, None))
    for spec in slaves:
        path, _, rest = spec.partition(":")
        unit_text, _, line_text = rest.partition(":")
        if unit_text and not unit_text.isdigit():
            raise typer.BadParameter(
                f"{spec!r}: expected PROFILE[:UNIT[:BAUD-8N1]]", param_hint="--slave"
            )
        line = _line(line_text, spec) if line_text else None
        specs.append((path, int(unit_text) if unit_text else None, line))
    if not specs:
        raise typer.BadParameter("give --profile or at least one --slave PROFILE[:UNIT]")
    return specs


def simulate(
    profile: Annotated[Path | None, Option(help="Probe profile (drivers/*.toml) to serve.")] = None,
    unit: Annotated[
        int | None, Option(help="Unit id of --profile (default: the profile's).")
    ] = None,
    slave: Annotated[
        list[str] | None,
        Option(help="A probe on the same port: PROFILE[:UNIT[:BAUD-8N1]] (line: with --pty)."),
    ] = None,
    port: Annotated[
        str | None, Option(help="Serial port to serve (one end of a pty pair).")
    ] = None,
    pty: Annotated[
        Path | None,
        Option(
            help="Make a pty linked at PATH and serve it; each probe answers only at its line "
            "settings (as given, else its profile's)."
        ),
    ] = None,
    tcp: Annotated[str | None, Option(help="Serve Modbus TCP on HOST:PORT instead.")] = None,
    scenario: Annotated[
        str, Option(help=f"Values over time: {', '.join(SCENARIOS)}.")
    ] = "constant",
    fault: Annotated[str, Option(help=f"Fault to inject: {', '.join(FAULTS)}.")] = "none",
    exception_code: Annotated[int, Option(help="Exception code of --fault exception.")] = 4,
    step_after: Annotated[float, Option(help="Seconds before the step scenario steps.")] = 30.0,
    baud: Annotated[int, Option(help="Baud rate of the port (and of --line-timing).")] = 9600,
    line_timing: Annotated[bool, Option(help="Answer after the frames' time on a wire.")] = False,
    control: Annotated[
        Path | None, Option(help='JSON {"<unit>": {"fault": ..}}, reread live.')
    ] = None,
    seed: Annotated[int, Option(help="Seed of the noise scenario.")] = 0,
) -> None:
    """Serve probe profiles as Modbus RTU slaves (--port) or Modbus TCP (--tcp) until stopped."""
    if sum(x is not None for x in (port, tcp, pty)) != 1:
        raise typer.BadParameter("give exactly one of --port, --pty and --tcp")
    if scenario not in SCENARIOS or fault not in FAULTS:
        raise typer.BadParameter(f"--scenario: one of {SCENARIOS}; --fault: one of {FAULTS}")
    sims = []
    for path, slave_unit, line in _slave_specs(profile, unit, slave or []):
        try:
            p = load_profile(path)
        except ConfigError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        u = p.serial.unit if slave_unit is None else slave_unit
        sims.append(SimSlave(p, u, scenario, fault, exception_code, step_after, seed))
        if pty is not None:
            sims[-1].line = line or p.serial
    bus = SimBus(sims, control)
    server: RtuSimulator | TcpSimulator
    if pty is not None:
        server = RtuSimulator(str(pty), bus, line_timing=line_timing, pty=PtyLine(pty))
        where = str(pty)
    elif port is not None:
        server = RtuSimulator(port, bus, baudrate=baud, line_timing=line_timing)
        where = port
    else:
        host, _, tcp_port = str(tcp).rpartition(":")
        server = TcpSimulator(host or "127.0.0.1", int(tcp_port), bus)
        where = "{}:{}".format(*server.address)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with server:
        units = ", ".join(f"{s.unit} ({s.profile.model})" for s in sims)
        typer.echo(f"serving units {units} on {where}", err=True)
        with contextlib.suppress(KeyboardInterrupt):
            done.wait()
