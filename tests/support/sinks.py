"""A sink that stands in for the buffer behind a source under test."""

from __future__ import annotations

import threading
from collections.abc import Callable

from gateway.common.model import Reading, Record


class RecordingSink:
    """Keeps each batch's readings in arrival order and, if ``durable``, reports them durable at
    once (as a buffer does after its commit)."""

    def __init__(self, durable: bool = True) -> None:
        self.durable = durable
        self.batches: list[list[Reading]] = []
        self._cond = threading.Condition()

    def __call__(
        self,
        records: list[Record],
        on_durable: Callable[[], object] | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        with self._cond:
            self.batches.append([r for r in records if isinstance(r, Reading)])
            self._cond.notify_all()
        if self.durable and on_durable is not None:
            on_durable()

    @property
    def readings(self) -> list[Reading]:
        with self._cond:
            return [r for b in self.batches for r in b]

    def values(self) -> list[float | None]:
        return [r.value for r in self.readings]

    def of(self, sensor: str) -> list[list[Reading]]:
        """The batches of one sensor."""
        with self._cond:
            return [b for b in self.batches if b and b[0].sensor_id == sensor]

    def wait_for(
        self, predicate: Callable[[list[list[Reading]]], bool], timeout: float = 15
    ) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.batches), timeout):
                raise AssertionError(f"condition not met; last batches: {self.batches[-4:]}")
