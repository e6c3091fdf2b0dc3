"""Taking one calibration point live: prompt, show the live value and how stable it is, accept.

Interactive (a terminal): the operator presses Enter once the indicator says STABLE (Enter before
that is refused). Scripted (``--no-prompt``): the point is taken as soon as it is stable. Either
way a point not stable within ``timeout`` seconds is an error.
"""

from __future__ import annotations

import select
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import typer

from gateway.cli.live import Link, LinkError, Live
from gateway.edge.calibrate_live import Sample, stability

POLL_S = 0.5


@dataclass(frozen=True)
class Point:
    raw: float
    temperature: float | None
    drift: float


class PointFailed(Exception):
    pass


def _enter_pressed() -> bool:
    try:
        ready = select.select([sys.stdin], [], [], 0)[0]
    except (OSError, ValueError):
        return False
    if ready:
        sys.stdin.readline()
        return True
    return False


def wait_for_enter() -> None:
    """Block until the operator presses Enter (end of input counts)."""
    sys.stdin.readline()


def measure(
    link: Link,
    sensor: str,
    prompt: str,
    raw_of: Callable[[Live], float],
    *,
    unit: str,
    drift_limit: float,
    seconds: float,
    interactive: bool,
    timeout: float,
) -> Point:
    """Wait for a stable raw value of ``sensor`` (``raw_of`` picks it from the live readings)."""
    typer.echo(prompt + (", press Enter when stable" if interactive else ""))
    samples: list[Sample] = []
    last_ts = None
    temperature = None
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        try:
            live = link.live(sensor)
            raw = raw_of(live)
        except (LinkError, ValueError, KeyError) as e:
            typer.echo(f"\r  waiting for {sensor}: {e}".ljust(78), nl=False)
            time.sleep(POLL_S)
            continue
        ts = max((v.get("timestamp") or 0.0) for v in live.values())
        temp = live.get("temperature", {}).get("raw")
        temperature = temp if isinstance(temp, int | float) else temperature
        if ts != last_ts:
            last_ts = ts
            samples.append((ts, raw))
            samples = samples[-600:]
        state = stability(samples, drift_limit, seconds)
        t_text = "" if temperature is None else f"  {temperature:.1f} °C"
        line = f"\r  live {raw:9.2f} {unit}{t_text}  {state.indicator(drift_limit)}"
        typer.echo(line.ljust(78), nl=False)
        if interactive and _enter_pressed():
            if state.stable:
                typer.echo("\n  accepted")
                return Point(raw, temperature, state.drift)
            typer.echo("\n  not stable yet: wait for STABLE, then press Enter")
        elif not interactive and state.stable:
            typer.echo("\n  accepted (stable)")
            return Point(raw, temperature, state.drift)
        time.sleep(POLL_S)
    typer.echo("")
    why = "no reading" if state is None else state.indicator(drift_limit)
    raise PointFailed(f"not stable within {timeout:g} s ({why})")
