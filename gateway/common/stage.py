"""The contracts every stage of both services keeps.

- A **source** (Modbus, MQTT, HTTP ingest) hands its records to a :class:`Sink`; ``on_durable``
  runs once they are committed to disk, and only then may the source acknowledge them. A source
  whose sender may deliver again adds a ``Receipt`` to the records and asks :class:`Receipts`
  whether a delivery that comes again was committed already.
- Every stage answers health as :data:`Health`: ``(ok, detail)``, where ``detail`` says why when
  it is not ok. ``/health`` shows each stage's answer under its name.
- A :class:`Stage` owns its threads and resources between ``start()`` and ``stop()``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from enum import Enum
from typing import Any, Protocol

from gateway.common.model import Receipt, Record

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


class Recall(Enum):
    """What the sink knows of a delivery's receipt (source and key)."""

    NEW = "new"  # never committed nor queued (or forgotten): take the delivery
    SAME = "same"  # committed or queued with the same fingerprint: a redelivery, do not take it
    OTHER = "other"  # the key names another delivery (e.g. a packet id used again): take it


class Receipts(Protocol):
    """The receipts a sink keeps with the records it committed (see ``model.Receipt``)."""

    def recall(self, receipt: Receipt, on_durable: OnDurable) -> Recall:
        """SAME: ``on_durable`` runs once the earlier delivery is durable (at once if it is);
        it is not called otherwise."""

    def forget(self, receipts: Sequence[tuple[Receipt, float]]) -> None:
        """The sender will not deliver these again (their acks reached it): drop each receipt
        committed at or before its time (epoch seconds)."""

    def forget_older(self, source: str, before: float, keep: Collection[str]) -> None:
        """Drop the receipts of ``source`` committed before ``before`` except those keyed
        ``keep``: the sender has said everything it may still deliver again."""


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
