"""The contracts every stage of both services keeps.

- A **source** (Modbus, MQTT, HTTP ingest) hands its records to a :class:`Sink`; ``on_durable``
  runs once they are committed to disk, and only then may the source acknowledge them.
- Every stage answers health as :data:`Health`: ``(ok, detail)``, where ``detail`` says why when
  it is not ok. ``/health`` shows each stage's answer under its name.
- A :class:`Stage` owns its threads and resources between ``start()`` and ``stop()``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from gateway.common.model import Record

OnDurable = Callable[[], object]
Health = tuple[bool, dict[str, Any]]
HealthCheck = Callable[[], Health]


class SinkClosed(RuntimeError):
    """The sink is stopping and takes no more records."""


class Sink(Protocol):
    def __call__(
        self,
        records: list[Record],
        on_durable: OnDurable | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Take ``records``; ``on_durable`` runs once they are on disk. Blocks while the sink is
        full; raises TimeoutError after ``timeout`` seconds of that, SinkClosed when stopping."""


class Stage(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def health(self) -> Health: ...


def submit_and_wait(sink: Sink, records: list[Record], timeout: float) -> None:
    """Hand records to ``sink`` and return once they are durable; TimeoutError if they are not
    within ``timeout`` (they may still be committed later: at least once, never lost)."""
    done = threading.Event()
    deadline = time.monotonic() + timeout
    sink(records, done.set, timeout=timeout)
    if not done.wait(max(0.0, deadline - time.monotonic())):
        raise TimeoutError(f"records not committed within {timeout} s")
