"""The one sink every source feeds (Modbus, MQTT, HTTP ingest).

Readings go through the edge pipeline (calibrate, validate, alarms), then to the disk buffer. A
reading counts in ``iot_messages_received_total{source,plant_id}`` here and nowhere else, once it is
durable: the moment its source may acknowledge it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from gateway.common.metrics import Metrics
from gateway.common.model import Reading, Record
from gateway.common.stage import OnDurable, Sink

Process = Callable[[Sequence[Reading]], list[Record]]


class Intake:
    def __init__(self, downstream: Sink, metrics: Metrics, process: Process | None = None) -> None:
        self._downstream = downstream
        self._metrics = metrics
        self._process = process
        self._counters: dict[tuple[str, str], Any] = {}
        self.received = 0  # readings made durable since start, for the daemon's status line

    def sink_for(self, source: str) -> Sink:
        """The sink a source named ``source`` (the metric's label) hands its records to."""
        return partial(self._take, source)

    def _take(
        self,
        source: str,
        records: list[Record],
        on_durable: OnDurable | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        readings = [r for r in records if isinstance(r, Reading)]
        if self._process is not None:
            out = self._process(readings)
            out.extend(r for r in records if not isinstance(r, Reading))
        else:
            out = list(records)
        n = len(readings)
        # One reading (an MQTT message, a single HTTP reading): no Counter to build.
        per_plant = {readings[0].plant_id: 1} if n == 1 else Counter(r.plant_id for r in readings)

        def durable() -> None:
            self.received += n
            for plant, count in per_plant.items():
                self._received(source, plant).inc(count)
            if on_durable is not None:
                on_durable()

        self._downstream(out, durable, timeout=timeout)

    def _received(self, source: str, plant: str) -> Any:
        # Label lookups cost more than the increment on a one-reading batch (an MQTT message).
        counter = self._counters.get((source, plant))
        if counter is None:
            counter = self._metrics.messages_received.labels(source, plant)
            self._counters[(source, plant)] = counter
        return counter
