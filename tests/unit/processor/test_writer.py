"""The sink writer with several writes in flight: a slow write delays only its own batch, and
batches are still reported done for commit in the order they were handed over."""

from __future__ import annotations

import threading
import time
from typing import Any

from gateway.common.metrics import Metrics
from gateway.processor.publish import Delivery
from gateway.processor.store import InfluxConfig, Refused
from gateway.processor.writer import Batch, SinkWriter
from tests.support.wait import wait_until


class GatedStore:
    """Writes that finish when the test says: the first line of a request names its gate."""

    def __init__(self) -> None:
        self.config = InfluxConfig(batch_lines=1)  # one batch per request
        self.gates: dict[str, threading.Event] = {}
        self.written: list[str] = []

    def write(self, bucket: str, lines: list[str]) -> list[Refused]:
        gate = self.gates.get(lines[0])
        if gate is not None:
            assert gate.wait(5.0)
        self.written.append(lines[0])
        return []


class ConfirmedPublisher:
    def confirm(self, delivery: Delivery, abandon: threading.Event) -> None:
        pass

    def send(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("nothing is refused here")


def gated_writer(writes: int) -> tuple[SinkWriter, threading.Event, list[int]]:
    """A started writer whose write of the line "a" waits for the event; ``told`` gets the
    observer's Kafka timestamps in the order batches were stored and published."""
    store = GatedStore()
    slow = store.gates["a"] = threading.Event()
    told: list[int] = []
    writer = SinkWriter(
        store,  # type: ignore[arg-type]
        ConfirmedPublisher(),  # type: ignore[arg-type]
        Metrics(),
        writes=writes,
        observer=lambda produced, at: told.extend(produced),
    )
    writer.start()
    return writer, slow, told


def test_a_slow_write_delays_only_its_own_batch_and_commits_stay_in_order():
    writer, slow, told = gated_writer(writes=2)
    first = Batch(lines=["a"], produced_ms=[1])
    second = Batch(lines=["b"], produced_ms=[2])
    try:
        assert writer.put(first, 1.0) and writer.put(second, 1.0)
        wait_until(
            lambda: told == [2], 5, "the second batch"
        )  # stored and published while the first still writes
        assert writer.take_done() == []  # but not done for commit before the first
        slow.set()
        wait_until(lambda: told == [2, 1], 5, "the first batch")
        done: list[Batch] = []
        wait_until(lambda: done.extend(writer.take_done()) or len(done) == 2, 5, "both done", 0.005)
        assert done == [first, second]
        assert writer.wait_idle(1.0)
    finally:
        slow.set()
        writer.close()


def test_one_write_in_flight_keeps_everything_in_order():
    writer, slow, told = gated_writer(writes=1)
    store = writer.store
    try:
        writer.put(Batch(lines=["a"], produced_ms=[1]), 1.0)
        writer.put(Batch(lines=["b"], produced_ms=[2]), 1.0)
        time.sleep(0.1)
        assert told == [] and store.written == []  # type: ignore[attr-defined]
        slow.set()
        wait_until(lambda: told == [1, 2], 5, "both batches")
        assert store.written == ["a", "b"]  # type: ignore[attr-defined]
    finally:
        slow.set()
        writer.close()
