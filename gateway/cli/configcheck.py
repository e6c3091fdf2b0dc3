"""``edge-gateway config check``: every mistake in a config file at once.

The loaders stop at the first problem (the gateway must not start on a bad file). To report them
all, the check loads the parsed file, and after each error takes the offending key out (its
default then applies; a missing required key takes out the table that needs it) and loads again,
until the file loads or nothing more can be taken out.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gateway.common.config import PROCESSOR_SECTIONS, ConfigError, load_toml

MAX_ERRORS = 100
_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


@dataclass(frozen=True)
class Problem:
    file: str
    key: str
    value: Any  # the value the file gives the key (None: missing or a whole table)
    expected: str


def key_path(key: str) -> list[str | int]:
    """``modbus.serial[0].slaves[1].unit`` -> ["modbus", "serial", 0, "slaves", 1, "unit"]."""
    return [int(i) if i else name for name, i in _PART.findall(key)]


def _lookup(data: Any, path: list[str | int]) -> tuple[Any, bool]:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None, False
    return data, True


def _drop(data: dict[str, Any], path: list[str | int]) -> bool:
    """Take the deepest existing part of ``path`` out of ``data``; False if nothing could be."""
    while path:
        parent, found = _lookup(data, path[:-1])
        last = path[-1]
        if found and isinstance(parent, dict) and isinstance(last, str) and last in parent:
            del parent[last]
            return True
        if found and isinstance(parent, list) and isinstance(last, int) and last < len(parent):
            del parent[last]
            return True
        path = path[:-1]
    return False


def _load(data: dict[str, Any], path: Path) -> None:
    from gateway.edge.settings import gateway_config_from
    from gateway.processor.settings import processor_config_from

    gateway_config_from(copy.deepcopy(data), path)
    if PROCESSOR_SECTIONS & data.keys():
        processor_config_from(copy.deepcopy(data), path)


def problems(path: Path) -> list[Problem]:
    """Every problem in the file at ``path``; [] for a valid file."""
    try:
        data = load_toml(path)
    except ConfigError as e:
        return [Problem(e.source, e.key, None, e.expected)]
    original = copy.deepcopy(data)
    found: list[Problem] = []
    for _ in range(MAX_ERRORS):
        try:
            _load(data, path)
            return found
        except ConfigError as e:
            value, _ = _lookup(original, key_path(e.key))
            found.append(Problem(e.source, e.key, value, e.expected))
            if not e.key or not _drop(data, key_path(e.key)):
                return found
    return found


def check(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The config file to check.")
    ] = Path("config.toml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the problems as JSON.")] = False,
) -> None:
    """Check a config file and every probe profile it names, without starting anything; report
    every problem at once (file, key, bad value, what was expected).

    Exit codes: 0 the file is valid, 2 it has problems (all listed).
    """
    found = problems(config)
    if as_json:
        rows = [
            {"file": p.file, "key": p.key, "value": p.value, "expected": p.expected} for p in found
        ]
        typer.echo(
            json.dumps({"file": str(config), "ok": not found, "problems": rows}, default=str)
        )
    elif found:
        table = Table("file", "key", "value", "expected", title=f"{len(found)} problem(s)")
        for p in found:
            value = "" if p.value is None or isinstance(p.value, dict | list) else repr(p.value)
            table.add_row(p.file, p.key or "-", value, p.expected)
        Console(stderr=True).print(table)
        for p in found:  # plain lines too, for logs and grep
            typer.echo(f"config error: {p.file}: {p.key}: {p.expected}", err=True)
    if found:
        raise typer.Exit(2)
    if not as_json:
        _summary(config)


def _summary(config: Path) -> None:
    from gateway.edge.settings import load_gateway_config

    cfg = load_gateway_config(config)
    buses = len(cfg.modbus.serial) + len(cfg.modbus.tcp)
    typer.echo(
        f"{config}: OK (gateway {cfg.gateway.id}, plant {cfg.gateway.plant_id}, "
        f"{buses} Modbus connection(s), MQTT {'on' if cfg.mqtt.enabled else 'off'}, "
        f"Kafka {cfg.kafka.bootstrap_servers})"
    )
