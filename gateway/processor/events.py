"""What the consumer tells the stages downstream of storage (predictions, the live feed).

``on_batch`` runs on the consumer thread once per processed batch, so it must only hand off (queue,
copy) and never block: the readings are validated, the alerts are the alarm events they raised,
the windows are the 1-minute aggregates that closed. A replay after a crash or a rebalance tells
them again; listeners that care de-duplicate.
"""

from __future__ import annotations

from typing import Protocol

from gateway.common.model import AlarmEvent, Reading
from gateway.processor.aggregate import WindowAggregate


class Listener(Protocol):
    def on_batch(
        self, readings: list[Reading], alerts: list[AlarmEvent], windows: list[WindowAggregate]
    ) -> None: ...
