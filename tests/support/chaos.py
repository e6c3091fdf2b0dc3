"""What the chaos run does to the pipeline: SIGKILL a component and start it again, on a seeded
random schedule, and time how long the pipeline takes to catch up after each restart.

The servers (Kafka, Mosquitto, InfluxDB) are the ones ``scripts/services`` started for this clone
(their pid files under var/). As the outage tests do, it kills and restarts them: on a machine
where someone else's tests use them too, run it in a network namespace of its own (README).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.services import ROOT

VAR = Path(os.environ.get("EDGE_VAR", ROOT / "var"))
SERVERS = ("kafka", "mosquitto", "influxdb")
COMPONENTS = ("gateway", "processor", "kafka", "mosquitto", "influxdb", "serial")


def kill_server(name: str) -> None:
    """SIGKILL the server's process group (scripts/services starts each in its own session)."""
    pidfile = VAR / name / "pid"
    pid = int(pidfile.read_text())
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    pidfile.unlink(missing_ok=True)


def start_server(name: str) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "services"), "up", name],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@dataclass
class Event:
    component: str
    at: float  # seconds into the run the kill is due
    down_for: float  # seconds between the kill and the restart


def schedule(seed: int, seconds: float) -> list[Event]:
    """Every component once in a random order, in equal slots of the run; longer runs repeat with
    random components, about one kill every 20 s, and at least two serial cuts."""
    rng = random.Random(seed)
    rounds = max(1, round(seconds / (20.0 * len(COMPONENTS))))
    order: list[str] = []
    for _ in range(rounds):
        block = list(COMPONENTS)
        rng.shuffle(block)
        order += block
    if rounds > 1 and order.count("serial") < 2:
        order[-1] = "serial"
    slot = seconds / len(order)
    events = []
    for k, component in enumerate(order):
        down = rng.uniform(5.0, 10.0) if component == "serial" else rng.uniform(0.5, 3.0)
        events.append(Event(component, k * slot + rng.uniform(0.1, 0.4) * slot, down))
    return events


@dataclass
class CatchUp:
    """After each restart: the time until a reading made after it is stored. ``newest`` returns
    the newest stored marker (e.g. an MQTT publish's number), ``current`` the newest made."""

    newest: Callable[[], int]
    current: Callable[[], int]
    waiting: list[tuple[str, float, int]] = field(default_factory=list)
    done: list[tuple[str, float]] = field(default_factory=list)  # (component, seconds)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def restarted(self, component: str) -> None:
        with self._lock:
            self.waiting.append((component, time.monotonic(), self.current()))

    def run(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if not self.waiting:
                    continue
            try:
                newest = self.newest()
            except Exception:  # InfluxDB may be the component that is down
                continue
            now = time.monotonic()
            with self._lock:
                for item in [w for w in self.waiting if w[2] <= newest]:
                    self.waiting.remove(item)
                    self.done.append((item[0], now - item[1]))

    def start(self) -> CatchUp:
        threading.Thread(target=self.run, name="catch-up", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def longest(self) -> tuple[str, float]:
        return max(self.done, key=lambda d: d[1], default=("-", 0.0))
