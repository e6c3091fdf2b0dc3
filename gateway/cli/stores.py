"""What the buffer and dead-letter commands share: the files from the config, SQLite opened the
safe way beside a running daemon, times, confirmations.

Concurrency with a running gateway: both stores are SQLite in WAL mode, so a reader here never
blocks the daemon's writer nor sees half a transaction. Reading commands use a read-only
connection; every write here is one short transaction with a busy timeout. The buffer's rows are
the daemon's alone while it runs (it holds ``<buffer>.lock``, and counts rows and bytes in
memory): ``buffer purge`` takes that lock itself, so it runs only while no gateway does, and
nothing can start one meanwhile. Dead letters are a plain table the daemon only appends to.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from gateway.common.config import ConfigError
from gateway.edge.calibrate_live import parse_time
from gateway.edge.settings import GatewayConfig, load_gateway_config

log = logging.getLogger("gateway.cli.stores")
BUSY_MS = 5000

Config = Annotated[Path, typer.Option("--config", "-c", help="The gateway's config file.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
Since = Annotated[str | None, typer.Option(help="From this time (RFC 3339 or epoch seconds).")]
Until = Annotated[str | None, typer.Option(help="Up to this time (RFC 3339 or epoch seconds).")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def load(config: Path) -> GatewayConfig:
    try:
        return load_gateway_config(config)
    except ConfigError as e:
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None


def when(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _must_exist(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        typer.echo(f"{p}: no such file (nothing stored yet?)", err=True)
        raise typer.Exit(1)
    return p


@contextlib.contextmanager
def connect(path: str | Path, *, write: bool = False) -> Iterator[sqlite3.Connection]:
    """A connection beside the daemon's: read-only unless ``write``; exit 1 if the file is
    missing (nothing was ever stored)."""
    p = _must_exist(path)
    uri = f"file:{p}?mode={'rw' if write else 'ro'}"
    con = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_MS / 1000)
    try:
        con.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def owning_buffer(path: str | Path) -> Iterator[None]:
    """Hold the buffer's lock (as the daemon does while it runs); exit 1 if a gateway holds it."""
    _must_exist(path)
    lock = open(f"{path}.lock", "w")  # noqa: SIM115 (held for the block)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            typer.echo(
                f"{path} is in use by a running gateway: stop it first "
                "(systemctl stop edge-gateway), nothing is lost, the buffer is on disk",
                err=True,
            )
            raise typer.Exit(1) from None
        yield
    finally:
        lock.close()


def daemon_running(buffer_path: str | Path) -> bool:
    """True while a gateway holds the buffer's lock."""
    lock_path = Path(f"{buffer_path}.lock")
    if not lock_path.exists():
        return False
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
    return False


def confirm(question: str, yes: bool) -> None:
    if not yes and not typer.confirm(question, default=False):
        typer.echo("nothing removed", err=True)
        raise typer.Exit(1)


def where_time(column: str, since: float | None, until: float | None) -> tuple[str, list[float]]:
    parts, params = [], []
    if since is not None:
        parts.append(f"{column} >= ?")
        params.append(since)
    if until is not None:
        parts.append(f"{column} <= ?")
        params.append(until)
    return " AND ".join(parts) or "1", params
