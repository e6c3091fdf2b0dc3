"""``edge-gateway deadletter``: payloads that could not become readings, and rows Kafka refused.

Reads use a read-only connection beside the running gateway; ``purge`` and a successful ``retry``
delete rows by id in one short transaction (the daemon only appends to the table). ``retry``
hands a payload (fixed upstream, or corrected with ``--payload-file``) to the running gateway's
HTTP ingest (``[http] token`` needed), or, with no gateway running, straight to the buffer; the
dead letter is deleted once the readings are committed.

Exit codes: 0 done, 1 nothing matches / refused / not confirmed, 2 bad option or config, 3 the
gateway did not take the retried readings.
"""

from __future__ import annotations

import json
import logging
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gateway.cli.stores import (
    Config,
    JsonOut,
    Since,
    Until,
    Yes,
    confirm,
    connect,
    daemon_running,
    load,
    stamp,
    when,
    where_time,
)
from gateway.common.config import ConfigError, secret
from gateway.common.metrics import Metrics
from gateway.common.model import Rejection, reading_from_dict
from gateway.edge.buffer import Buffer
from gateway.edge.calibration_api import api_file
from gateway.edge.settings import GatewayConfig

log = logging.getLogger("gateway.cli.deadletter")
app = typer.Typer(
    help="List, show, export, retry and purge dead letters.",
    epilog="Exit codes: 0 done; 1 nothing matches, refused or not confirmed; 2 bad option or "
    "config; 3 the gateway (or the buffer) did not take the retried readings.",
    no_args_is_help=True,
)
COLUMNS = "id, ts, source, topic, reason, detail, size, payload"
Source = Annotated[str | None, typer.Option(help="Only from this source (mqtt, http, kafka).")]


def _doc(row: tuple[Any, ...], full: bool = False) -> dict[str, Any]:
    i, ts, source, topic, reason, detail, size, payload = row
    text = bytes(payload).decode(errors="replace")
    return {
        "id": i,
        "time": stamp(ts),
        "source": source,
        "topic": topic,
        "reason": reason,
        "detail": detail,
        "size": size,
        "payload": text if full else text[:80],
    }


def _select(
    con: Any, source: str | None, since: str | None, until: str | None, limit: int | None
) -> list[tuple[Any, ...]]:
    clause, params = where_time("ts", when(since), when(until))
    args: list[Any] = list(params)
    if source is not None:
        clause += " AND source = ?"
        args.append(source)
    sql = f"SELECT {COLUMNS} FROM dead_letters WHERE {clause} ORDER BY id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        args.append(limit)
    return list(con.execute(sql, args).fetchall())


@app.command("list")
def list_(
    config: Config,
    limit: Annotated[int, typer.Option(min=1)] = 20,
    source: Source = None,
    since: Since = None,
    until: Until = None,
    as_json: JsonOut = False,
) -> None:
    """The newest dead letters, newest first.

    Exit codes: 0 shown, 1 no dead-letter file, 2 bad option or config.
    """
    cfg = load(config)
    with connect(cfg.deadletter.path) as con:
        rows = [_doc(r) for r in _select(con, source, since, until, limit)]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    table = Table("id", "time", "source", "topic", "reason", "size", "detail")
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["time"],
            r["source"],
            r["topic"],
            r["reason"],
            str(r["size"]),
            r["detail"][:60],
        )
    Console().print(table if rows else "no dead letters")


def _one(cfg: GatewayConfig, ident: int) -> dict[str, Any]:
    with connect(cfg.deadletter.path) as con:
        row = con.execute(f"SELECT {COLUMNS} FROM dead_letters WHERE id = ?", (ident,)).fetchone()
    if row is None:
        typer.echo(f"no dead letter {ident}", err=True)
        raise typer.Exit(1)
    return _doc(row, full=True)


@app.command("show")
def show(
    config: Config, ident: Annotated[int, typer.Argument(metavar="ID")], as_json: JsonOut = False
) -> None:
    """One dead letter in full, its payload included.

    Exit codes: 0 shown, 1 no such dead letter, 2 bad config.
    """
    doc = _one(load(config), ident)
    if as_json:
        typer.echo(json.dumps(doc))
        return
    for k, v in doc.items():
        if k != "payload":
            typer.echo(f"{k}: {v}")
    typer.echo(f"payload:\n{doc['payload']}")


@app.command("export")
def export(config: Config, source: Source = None, since: Since = None, until: Until = None) -> None:
    """Dead letters as JSON lines on standard output, newest first.

    Exit codes: 0 exported, 1 no dead-letter file, 2 bad option or config.
    """
    cfg = load(config)
    with connect(cfg.deadletter.path) as con:
        rows = _select(con, source, since, until, None)
    for r in rows:
        sys.stdout.write(json.dumps(_doc(r, full=True)) + "\n")
    typer.echo(f"{len(rows)} dead letter(s) exported", err=True)


def _delete(cfg: GatewayConfig, ids: list[int]) -> int:
    with connect(cfg.deadletter.path, write=True) as con:
        con.execute("BEGIN IMMEDIATE")
        n = 0
        for i in ids:
            n += con.execute("DELETE FROM dead_letters WHERE id = ?", (i,)).rowcount
        con.execute("COMMIT")
    return n


def _through_gateway(cfg: GatewayConfig, items: list[Any]) -> None:
    try:
        token = secret(cfg.http.token, source=cfg.source, key="http.token")
    except ConfigError as e:
        raise _refused(f"{e}") from None
    if not token:
        raise _refused("the gateway runs and owns the buffer: set [http] token to retry through it")
    try:
        url = json.loads(api_file(cfg.calibration.store).read_text())["url"]
    except (OSError, ValueError, KeyError):
        url = f"http://{cfg.http.host}:{cfg.http.port}"
    req = urllib.request.Request(
        f"{url}/api/readings",
        data=json.dumps(items).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
    except urllib.error.HTTPError as e:
        raise _refused(f"the gateway answered {e.code}: {e.read()[:300].decode()}") from None
    except OSError as e:
        raise _refused(f"the gateway at {url} does not answer: {e}") from None


def _into_buffer(cfg: GatewayConfig, items: list[Any]) -> None:
    readings = []
    for item in items:
        got = reading_from_dict(item, plant_id=cfg.gateway.plant_id)
        if isinstance(got, Rejection):
            raise _refused(f"not a reading: {got.reason} {got.detail}")
        readings.append(got)
    buffer = Buffer(cfg.buffer, cfg.gateway.id, Metrics())
    buffer.start()
    try:
        buffer.submit_wait(readings, timeout=30)
    finally:
        buffer.stop()


def _refused(message: str) -> typer.Exit:
    typer.echo(f"retry refused: {message}", err=True)
    return typer.Exit(3)


@app.command("retry")
def retry(
    config: Config,
    ident: Annotated[int, typer.Argument(metavar="ID")],
    payload_file: Annotated[
        Path | None, typer.Option(help="A corrected payload (JSON reading or list) to use.")
    ] = None,
) -> None:
    """Put a dead letter's readings into the buffer (through the running gateway if there is
    one), then delete it.

    Exit codes: 0 retried and removed, 1 no such dead letter, 2 bad config, 3 refused (not a
    reading, or the gateway did not take it).
    """
    cfg = load(config)
    doc = _one(cfg, ident)
    text = payload_file.read_text() if payload_file else doc["payload"]
    try:
        parsed = json.loads(text)
    except ValueError:
        raise _refused("the payload is not JSON; fix it and pass --payload-file") from None
    items = parsed if isinstance(parsed, list) else [parsed]
    if daemon_running(cfg.buffer.path):
        _through_gateway(cfg, items)
        how = "through the running gateway"
    else:
        _into_buffer(cfg, items)
        how = "into the buffer"
    _delete(cfg, [ident])
    log.warning("dead letter %d retried %s and removed", ident, how)
    typer.echo(f"dead letter {ident}: {len(items)} reading(s) retried {how}, dead letter removed")


@app.command("purge")
def purge(
    config: Config,
    source: Source = None,
    since: Since = None,
    until: Until = None,
    everything: Annotated[bool, typer.Option("--all", help="Every dead letter.")] = False,
    yes: Yes = False,
) -> None:
    """Remove dead letters for good (a source, a time range or --all); asks first, logs it.

    Exit codes: 0 removed, 1 nothing matched or not confirmed, 2 bad option or config.
    """
    if not (everything or source or since or until):
        raise typer.BadParameter("say what to remove: --source, --since/--until or --all")
    cfg = load(config)
    with connect(cfg.deadletter.path) as con:
        ids = [r[0] for r in _select(con, source, since, until, None)]
    if not ids:
        typer.echo("no dead letter matches: nothing removed", err=True)
        raise typer.Exit(1)
    confirm(f"remove {len(ids)} dead letter(s) from {cfg.deadletter.path} for good?", yes)
    n = _delete(cfg, ids)
    line = f"purged {n} dead letter(s) (ids {min(ids)}-{max(ids)}) from {cfg.deadletter.path}"
    log.warning(line)
    typer.echo(line)
