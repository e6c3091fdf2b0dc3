"""``edge-gateway alerts``: list the processor's alerts, acknowledge, shelve, take out of service.

Talks to a running processor's HTTP API (``/api/alerts``) with its bearer token
(``processor.http_token``): ``--url`` or ``EDGE_PROCESSOR_URL``, ``--token`` or
``EDGE_PROCESSOR_TOKEN``.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated, Any

import aiohttp
import typer
from typer import Option

app = typer.Typer(
    help="The processor's alerts: list, acknowledge, shelve, out of service. Talks to the "
    "processor's HTTP API: --url (or EDGE_PROCESSOR_URL) and its bearer token, --token (or "
    "EDGE_PROCESSOR_TOKEN; the processor's processor.http_token).",
    no_args_is_help=True,
)

UrlOption = Annotated[
    str,
    Option("--url", envvar="EDGE_PROCESSOR_URL", help="The processor's HTTP address."),
]
TokenOption = Annotated[
    str,
    Option(
        "--token",
        envvar="EDGE_PROCESSOR_TOKEN",
        help="Bearer token (processor.http_token); better from EDGE_PROCESSOR_TOKEN.",
        show_default=False,
    ),
]
ByOption = Annotated[str, Option("--by", help="Who acts (recorded in the history).")]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DEFAULT_URL = "http://127.0.0.1:9181"


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``1d`` or plain seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if m is None:
        raise typer.BadParameter(f"expected a duration like 30m, 2h or 1d, got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _call(url: str, token: str, method: str, path: str, body: Any = None) -> Any:
    async def go() -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = aiohttp.ClientTimeout(total=15)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, url.rstrip("/") + path, json=body, headers=headers) as r,
        ):
            return r.status, await r.json(content_type=None)

    try:
        status, doc = asyncio.run(go())
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        typer.echo(f"cannot reach the processor at {url}: {e}", err=True)
        raise typer.Exit(1) from None
    if status != 200:
        typer.echo(f"error ({status}): {doc.get('error', doc)}", err=True)
        raise typer.Exit(1 if status >= 500 else 2)
    return doc


def _act(url: str, token: str, **body: Any) -> None:
    doc = _call(url, token, "POST", "/api/alerts/action", {k: v for k, v in body.items() if v})
    typer.echo(json.dumps(doc, indent=2))


@app.command("list")
def list_(
    active: Annotated[bool, Option("--active", help="Only alarms still active.")] = False,
    plant: Annotated[str, Option("--plant", help="Only this plant.")] = "",
    as_json: Annotated[bool, Option("--json", help="Print JSON.")] = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = "",
) -> None:
    """Alarms (newest first) with who acknowledged or shelved them and when, sensors out of
    service, and the history of operator actions."""
    query = "&".join(
        q for q in (f"plant={plant}" if plant else "", "active=1" if active else "") if q
    )
    doc = _call(url, token, "GET", "/api/alerts" + (f"?{query}" if query else ""))
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    for a in doc["alerts"]:
        notes = []
        if a["ackedBy"]:
            notes.append(f"acked by {a['ackedBy']} at {a['ackedAt']}")
        if a["shelvedUntil"]:
            notes.append(
                f"shelved by {a['shelvedBy']} at {a['shelvedAt']} until {a['shelvedUntil']}"
            )
        typer.echo(
            f"{a['alarmId']}  {a['state']:7}  {a['level']:8}  {a['plantId']}/{a['sensorId']} "
            f"{a['parameter']} {a['condition']} {a['value']}  {a['raisedAt']}  {'; '.join(notes)}"
        )
    for o in doc["outOfService"]:
        typer.echo(f"out of service: {o['sensorId']} until {o['until']} by {o['by']} at {o['at']}")
    for h in doc["history"]:
        target = h["alarmId"] or h["sensorId"]
        typer.echo(f"history: {h['action']} {target} by {h['by']} at {h['at']} {h['note']}")


@app.command()
def ack(
    alarm_id: Annotated[str, typer.Argument(help="The alarm's id (see alerts list).")],
    by: ByOption,
    note: Annotated[str, Option("--note", help="Why, what is being done.")] = "",
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = "",
) -> None:
    """Acknowledge an alarm: no more reminders for it while it stays active."""
    _act(url, token, action="ack", id=alarm_id, by=by, note=note)


@app.command()
def shelve(
    alarm_id: Annotated[str, typer.Argument(help="The alarm's id.")],
    by: ByOption,
    for_: Annotated[str, Option("--for", help="How long: 30m, 2h, 1d.")] = "2h",
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = "",
) -> None:
    """Shelve an alarm: no notifications for it for a while."""
    _act(url, token, action="shelve", id=alarm_id, by=by, seconds=parse_duration(for_))


@app.command()
def unshelve(
    alarm_id: Annotated[str, typer.Argument(help="The alarm's id.")],
    by: Annotated[str, Option("--by", help="Who acts.")] = "cli",
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = "",
) -> None:
    """End an alarm's shelving now."""
    _act(url, token, action="unshelve", id=alarm_id, by=by)


@app.command("out-of-service")
def out_of_service(
    sensor: Annotated[str, typer.Argument(help="The sensor id.")],
    by: ByOption,
    for_: Annotated[str, Option("--for", help="How long: 30m, 4h, 1d.")] = "4h",
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = "",
) -> None:
    """Take a sensor out of service (calibration, maintenance): its process alarms are not
    notified until then."""
    _act(url, token, action="out_of_service", sensorId=sensor, by=by, seconds=parse_duration(for_))
