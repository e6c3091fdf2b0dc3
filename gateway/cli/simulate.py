"""``edge-gateway simulate``: serve probe profiles as Modbus slaves on a pty or over TCP."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from typer import Option

from gateway.common.config import ConfigError
from gateway.edge.acquire.modbus.profiles import load_profile
from gateway.edge.acquire.modbus.simulate import (
    FAULTS,
    SCENARIOS,
    RtuSimulator,
    SimBus,
    SimSlave,
    TcpSimulator,
)


def _slave_specs(
    profile: Path | None, unit: int | None, slaves: list[str]
) -> list[tuple[str, int | None]]:
    specs: list[tuple[str, int | None]] = []
    if profile is not None:
        specs.append((str(profile), unit))
    for spec in slaves:
        path, _, unit_text = spec.partition(":")
        if unit_text and not unit_text.isdigit():
            raise typer.BadParameter(f"{spec!r}: expected PROFILE[:UNIT]", param_hint="--slave")
        specs.append((path, int(unit_text) if unit_text else None))
    if not specs:
        raise typer.BadParameter("give --profile or at least one --slave PROFILE[:UNIT]")
    return specs


def simulate(
    profile: Annotated[Path | None, Option(help="Probe profile (drivers/*.toml) to serve.")] = None,
    unit: Annotated[
        int | None, Option(help="Unit id of --profile (default: the profile's).")
    ] = None,
    slave: Annotated[
        list[str] | None, Option(help="A probe on the same port: PROFILE[:UNIT].")
    ] = None,
    port: Annotated[
        str | None, Option(help="Serial port to serve (one end of a pty pair).")
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
    if (port is None) == (tcp is None):
        raise typer.BadParameter("give exactly one of --port and --tcp")
    if scenario not in SCENARIOS or fault not in FAULTS:
        raise typer.BadParameter(f"--scenario: one of {SCENARIOS}; --fault: one of {FAULTS}")
    sims = []
    for path, slave_unit in _slave_specs(profile, unit, slave or []):
        try:
            p = load_profile(path)
        except ConfigError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        u = p.serial.unit if slave_unit is None else slave_unit
        sims.append(SimSlave(p, u, scenario, fault, exception_code, step_after, seed))
    bus = SimBus(sims, control)
    server: RtuSimulator | TcpSimulator
    if port is not None:
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
