"""Stage supervision for both daemons: heartbeats, the watchdog and the signal loop.

Every stage thread beats a :class:`Heartbeat` once a turn of its loop. The supervisor looks at all
of them every interval: a thread that has died ends the daemon non-zero (systemd restarts it); a
thread alive but silent for longer than the stall limit is wedged, and the daemon stops sending
``WATCHDOG=1``, so systemd kills and restarts it after ``WatchdogSec``. Each look also sends a
one-line ``STATUS=``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.common.notify import Notifier, watchdog_seconds

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 5.0  # seconds between looks when systemd's watchdog is off
MIN_STALL = 5.0


class StageDied(RuntimeError):
    """A stage thread ended while the daemon was running."""


class Heartbeat:
    """A stage thread's sign of life and progress. ``progress=False`` watches a thread that is not
    ours to instrument (paho's network loop): only whether it is alive."""

    def __init__(self, name: str, *, progress: bool = True) -> None:
        self.name = name
        self.progress = progress
        self.thread: threading.Thread | None = None
        self.last = time.monotonic()

    def watch(self, thread: threading.Thread | None) -> None:
        self.thread = thread
        self.beat()

    def beat(self) -> None:
        self.last = time.monotonic()

    def dead(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def silent_for(self, now: float) -> float:
        return now - self.last if self.progress and self.thread is not None else 0.0


@dataclass
class Look:
    """What one look found."""

    dead: list[str]
    wedged: list[str]

    @property
    def ok(self) -> bool:
        return not self.dead and not self.wedged


class Supervisor:
    def __init__(
        self,
        heartbeats: Callable[[], Iterable[Heartbeat]],
        status: Callable[[], str],
        notifier: Notifier,
        *,
        watchdog: float | None = None,
    ) -> None:
        self._heartbeats = heartbeats
        self._status = status
        self.notifier = notifier
        watchdog = watchdog_seconds() if watchdog is None else watchdog
        self.watchdog = watchdog
        self.interval = watchdog / 2 if watchdog else DEFAULT_INTERVAL
        self.stall_limit = max(MIN_STALL, self.interval)
        self._reported: set[str] = set()

    def look(self) -> Look:
        now = time.monotonic()
        dead, wedged = [], []
        for hb in self._heartbeats():
            if hb.dead():
                dead.append(hb.name)
            elif (silent := hb.silent_for(now)) > self.stall_limit:
                wedged.append(f"{hb.name} silent {silent:.0f} s")
        return Look(dead, wedged)

    def tick(self) -> None:
        """Look, ping the watchdog only if all is well, report status; StageDied if one died."""
        found = self.look()
        problems = [f"{n} died" for n in found.dead] + found.wedged
        for p in problems:
            if p.split(" silent")[0] not in self._reported:
                log.error("stage problem: %s", p)
        self._reported = {p.split(" silent")[0] for p in problems}
        status = "; ".join(problems) if problems else self._status()
        fields = [f"STATUS={status}"]
        if found.ok and self.watchdog:
            fields.append("WATCHDOG=1")
        self.notifier.send(*fields)
        if found.dead:
            raise StageDied(f"stage thread(s) died: {', '.join(found.dead)}")


class Signals:
    """SIGTERM/SIGINT ask to stop, SIGHUP to reload; ``wait`` sleeps until one comes or timeout."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()
        self._wake = threading.Event()
        for sig, flag in (
            (signal.SIGTERM, self.stop),
            (signal.SIGINT, self.stop),
            (signal.SIGHUP, self.reload),
        ):
            signal.signal(sig, self._handler(flag))

    def _handler(self, flag: threading.Event) -> Callable[..., None]:
        def handler(*_: object) -> None:
            flag.set()
            self._wake.set()

        return handler

    def wait(self, timeout: float) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    def take_reload(self) -> bool:
        if self.reload.is_set() and not self.stop.is_set():
            self.reload.clear()
            return True
        return False


def reloading_fields() -> list[str]:
    """``RELOADING=1`` with the monotonic time newer systemd versions ask for."""
    return ["RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"]
