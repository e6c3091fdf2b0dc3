"""The demo's terminal view: a full-screen layout updated in place (rich.live), made for 80x24,
or plain status lines every few seconds when stdout is not a terminal."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from scripts.demolib.watch import GatewayStats, PlantState

QUALITY = {"good": "green", "uncertain": "yellow", "bad": "bold red"}
LEVEL = {"critical": "bold red", "warning": "yellow"}
PARAMETERS = (
    ("pH", "pH"),
    ("COD", "COD"),
    ("BOD", "BOD"),
    ("TSS", "TSS"),
    ("turbidity", "turb"),
    ("TDS", "TDS"),
    ("temperature", "temp"),
    ("flow_rate", "flow"),
    ("dissolved_oxygen", "DO"),
)
PLACE = {"influent": "in", "effluent": "ef", "clarifier": "cl", "aeration-1": "ae", "basin-1": "ba"}


@dataclass
class Snapshot:
    """Everything one frame shows."""

    elapsed: float
    plants: dict[str, PlantState]
    gateways: dict[str, GatewayStats]
    mails: int
    webhooks: int
    notifier: bool
    dashboard: str
    story: list[str] = field(default_factory=list)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def plant_panel(name: str, st: PlantState, gw: GatewayStats) -> Panel:
    colour = "green" if gw.status == "healthy" else "yellow" if gw.status != "down" else "red"
    head = Text.assemble(
        ("gw ", "dim"), (gw.status, colour), f" {gw.rate:4.1f}/s buf ", (str(gw.buffered), "bold")
    )
    values = Table.grid(padding=(0, 1))
    values.add_column(width=4, style="cyan")
    values.add_column()
    for parameter, label in PARAMETERS:
        cells = Text()
        for (_sensor, p), latest in sorted(st.latest.items()):
            if p != parameter:
                continue
            cells.append(_fmt(latest.value), QUALITY.get(latest.quality, "white"))
            cells.append(PLACE.get(latest.location, latest.location[:2]) + " ", "dim")
        values.add_row(label, cells)
    alarms = Text()
    active = sorted(st.active(), key=lambda e: (e["level"] != "critical", e["sensorId"]))
    for e in active[:3]:
        alarms.append(f"{e['level'][:4].upper()} ", LEVEL.get(e["level"], ""))
        alarms.append(f"{e['parameter']} {e['sensorId'][:13]} {e['state']}\n")
    if len(active) > 3:
        alarms.append(f"+{len(active) - 3} more active\n", "dim")
    if not active:
        alarms.append("no active alarms\n", "green")
    pred = Text("predicted ", "dim")
    if st.predictions:
        _, p, conf, _ = st.predictions[-1]
        pred.append(f"{p} ({conf:.2f})", "bold")
        if len(st.classes()) > 1:
            pred.append(f" was {st.classes()[-2]}", "dim")
    else:
        pred.append("none yet")
    body = Group(head, values, alarms, pred)
    return Panel(body, title=f"[bold]{name}[/]", padding=(0, 0))


def render(s: Snapshot) -> Layout:
    layout = Layout()
    header = Text.assemble(
        ("edge-gateway demo ", "bold"),
        f"t+{s.elapsed:.0f}s  ",
        (" | ".join(s.story[-1:]) or "two plants, one processor", "dim"),
        overflow="ellipsis",
        no_wrap=True,
    )
    notes = Text.assemble(
        ("notifications ", "dim"),
        f"mail {s.mails}  webhook {s.webhooks}",
        ("" if s.notifier else "  (the processor has no notifier yet)", "dim"),
    )
    url = Text.assemble(("dashboard ", "dim"), s.dashboard, no_wrap=True, overflow="ellipsis")
    plants = Layout()
    plants.split_row(*(Layout(plant_panel(n, st, s.gateways[n])) for n, st in s.plants.items()))
    layout.split_column(Layout(header, size=1), plants, Layout(Group(notes, url), size=2))
    return layout


def plain_line(s: Snapshot) -> str:
    parts = [time.strftime("%H:%M:%S"), f"t+{s.elapsed:.0f}s"]
    for name, st in s.plants.items():
        gw = s.gateways[name]
        levels = Counter(e["level"] for e in st.active())
        alarms = ", ".join(f"{n} {lvl}" for lvl, n in sorted(levels.items())) or "none"
        pred = st.predictions[-1][1] if st.predictions else "-"
        parts.append(
            f"{name}: gateway {gw.status} {gw.rate:.1f}/s buffer {gw.buffered}, "
            f"alarms {alarms}, prediction {pred}"
        )
    parts.append(f"mail {s.mails} webhook {s.webhooks}")
    return " | ".join(parts)


class View:
    """``update(snapshot)`` redraws in place on a terminal; else prints a line every ``every`` s."""

    def __init__(self, console: Console | None = None, every: float = 5.0) -> None:
        self.console = console or Console()
        self.tty = self.console.is_terminal
        self.every, self._last, self._told = every, 0.0, 0
        self.live: Live | None = None

    def __enter__(self) -> View:
        if self.tty:
            self.live = Live(console=self.console, screen=True, auto_refresh=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
            self.live = None

    def update(self, s: Snapshot) -> None:
        if self.live is not None:
            self.live.update(render(s), refresh=True)
            return
        for event in s.story[self._told :]:  # story events as they happen
            print(f"{time.strftime('%H:%M:%S')} | {event}", flush=True)
        self._told = len(s.story)
        if time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            print(plain_line(s), flush=True)
