"""``edge-gateway buffer``: what waits in the disk buffer, per plant; peek, export, replay, purge.

Reads go straight to the SQLite file (WAL: safe beside a running gateway); purge only while no
gateway runs (see ``stores.py``). Exit codes: 0 done, 1 nothing there / refused / not confirmed /
Kafka did not confirm every row, 2 bad option or config.
"""

from __future__ import annotations

import json
import logging
import sys
import time
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
    load,
    owning_buffer,
    stamp,
    when,
    where_time,
)
from gateway.common.config import ConfigError
from gateway.edge.buffer import ROW_OVERHEAD
from gateway.edge.forward import HEADERS, topic_for

log = logging.getLogger("gateway.cli.buffer")
app = typer.Typer(
    help="Inspect, export, replay and purge the disk buffer.",
    epilog="Exit codes: 0 done; 1 nothing there, refused, not confirmed, or Kafka did not "
    "confirm every row; 2 bad option or config.",
    no_args_is_help=True,
)
Plant = Annotated[str | None, typer.Option("--plant", help="Only this plant's rows.")]


def _where(plant: str | None, since: str | None, until: str | None) -> tuple[str, list[Any]]:
    clause, params = where_time("created", when(since), when(until))
    if plant is not None:
        return f"{clause} AND plant_id = ?", [*params, plant]
    return clause, list(params)


@app.command("stats")
def stats(config: Config, as_json: JsonOut = False) -> None:
    """Depth, bytes and the oldest row's age per plant.

    Exit codes: 0 shown, 1 no buffer file, 2 bad config.
    """
    cfg = load(config)
    now = time.time()
    with connect(cfg.buffer.path) as con:
        rows = con.execute(
            "SELECT plant_id, COUNT(*), SUM(LENGTH(payload)), MIN(created) FROM records"
            " GROUP BY plant_id ORDER BY plant_id"
        ).fetchall()
    plants = [
        {
            "plant": p,
            "rows": n,
            "bytes": int(b or 0) + n * ROW_OVERHEAD,
            "oldestAgeS": round(now - oldest, 1),
        }
        for p, n, b, oldest in rows
    ]
    if as_json:
        typer.echo(json.dumps({"file": cfg.buffer.path, "plants": plants}))
        return
    table = Table("plant", "rows", "bytes", "oldest", title=cfg.buffer.path)
    for p in plants:
        table.add_row(p["plant"], str(p["rows"]), str(p["bytes"]), f"{p['oldestAgeS']:.0f} s ago")
    Console().print(table if plants else f"{cfg.buffer.path}: empty")


def _rows(con: Any, clause: str, params: list[Any], limit: int | None, newest: bool = False) -> Any:
    order = "DESC" if newest else "ASC"
    sql = f"SELECT id, kind, plant_id, key, payload, created FROM records WHERE {clause}"
    sql += f" ORDER BY id {order}" + (" LIMIT ?" if limit is not None else "")
    return con.execute(sql, [*params, limit] if limit is not None else params)


@app.command("peek")
def peek(
    config: Config,
    limit: Annotated[int, typer.Option(min=1)] = 10,
    newest: Annotated[bool, typer.Option(help="The newest rows, not the oldest.")] = False,
    plant: Plant = None,
    as_json: JsonOut = False,
) -> None:
    """The oldest (next to be forwarded) or newest rows.

    Exit codes: 0 shown, 1 no buffer file, 2 bad option or config.
    """
    cfg = load(config)
    clause, params = _where(plant, None, None)
    with connect(cfg.buffer.path) as con:
        rows = _rows(con, clause, params, limit, newest).fetchall()
    out = [
        {
            "seq": i,
            "kind": k,
            "plant": p,
            "key": key,
            "created": stamp(c),
            "record": json.loads(payload),
        }
        for i, k, p, key, payload, c in rows
    ]
    if as_json:
        typer.echo(json.dumps(out))
        return
    table = Table("seq", "created", "plant", "key", "kind", "record")
    for r in out:
        rec = r["record"]
        what = f"{rec.get('parameter', '')} {rec.get('value', '')} {rec.get('quality', '')}"
        table.add_row(str(r["seq"]), r["created"], r["plant"], r["key"], r["kind"], what)
    Console().print(table)


@app.command("export")
def export(
    config: Config,
    since: Since = None,
    until: Until = None,
    plant: Plant = None,
) -> None:
    """The rows' records as JSON lines on standard output, oldest first.

    Exit codes: 0 exported, 1 no buffer file, 2 bad option or config.
    """
    cfg = load(config)
    clause, params = _where(plant, since, until)
    n = 0
    with connect(cfg.buffer.path) as con:
        for _, _, _, _, payload, _ in _rows(con, clause, params, None):
            sys.stdout.write(bytes(payload).decode() + "\n")
            n += 1
    typer.echo(f"{n} record(s) exported", err=True)


@app.command("replay")
def replay(
    config: Config,
    since: Since = None,
    until: Until = None,
    plant: Plant = None,
    topic: Annotated[
        str | None, typer.Option(help="Send here instead of sensors.raw.<plant>.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for Kafka.")] = 60.0,
) -> None:
    """Send the rows of a time range to Kafka again (keys and headers as the forwarder sends
    them). Rows stay in the buffer; the receivers de-duplicate by gatewayId and seq.

    Exit codes: 0 every row confirmed by Kafka, 1 some not, 2 bad option or config.
    """
    from confluent_kafka import Producer

    cfg = load(config)
    try:
        settings = cfg.kafka.producer_config()
    except ConfigError as e:
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None
    clause, params = _where(plant, since, until)
    producer = Producer({**settings, "enable.idempotence": True})
    failed: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(str(err))

    sent = 0
    with connect(cfg.buffer.path) as con:
        for _, kind, plant_id, key, payload, _ in _rows(con, clause, params, None):
            target = topic or topic_for(cfg.kafka, kind, plant_id)
            producer.produce(
                target, bytes(payload), key.encode(), headers=HEADERS, on_delivery=delivered
            )
            producer.poll(0)
            sent += 1
    left = producer.flush(timeout)
    log.info("replayed %d row(s) of %s", sent, cfg.buffer.path)
    typer.echo(f"{sent} row(s) sent, {sent - left - len(failed)} confirmed by Kafka", err=True)
    if left or failed:
        typer.echo(f"not confirmed: {left} pending, {len(failed)} failed {failed[:3]}", err=True)
        raise typer.Exit(1)


@app.command("purge")
def purge(
    config: Config,
    since: Since = None,
    until: Until = None,
    plant: Plant = None,
    everything: Annotated[bool, typer.Option("--all", help="Every row.")] = False,
    yes: Yes = False,
) -> None:
    """Remove rows (a time range, a plant, or --all) for good; only while no gateway runs. Asks
    first (--yes for scripts) and logs what it removed.

    Exit codes: 0 removed, 1 nothing matched / not confirmed / a gateway runs, 2 bad option or
    config.
    """
    if not (everything or since or until or plant):
        raise typer.BadParameter("say what to remove: --since/--until, --plant or --all")
    cfg = load(config)
    clause, params = _where(plant, since, until)
    with owning_buffer(cfg.buffer.path), connect(cfg.buffer.path, write=True) as con:
        summary = con.execute(
            f"SELECT plant_id, COUNT(*), MIN(id), MAX(id) FROM records WHERE {clause}"
            " GROUP BY plant_id",
            params,
        ).fetchall()
        total = sum(n for _, n, _, _ in summary)
        if not total:
            typer.echo("no row matches: nothing removed", err=True)
            raise typer.Exit(1)
        confirm(f"remove {total} row(s) from {cfg.buffer.path} for good?", yes)
        con.execute("BEGIN IMMEDIATE")
        removed = con.execute(f"DELETE FROM records WHERE {clause}", params).rowcount
        con.execute("COMMIT")
    for plant_id, n, first, last in summary:
        line = f"purged {n} row(s) of plant {plant_id} (seq {first}-{last}) from {cfg.buffer.path}"
        log.warning(line)
        typer.echo(line, err=True)
    typer.echo(f"{removed} row(s) removed")
