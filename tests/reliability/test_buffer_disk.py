"""The disk buffer on a real, small filesystem (tmpfs): disk full, and what it must not lose."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from gateway.common.metrics import Metrics
from gateway.common.model import Reading
from gateway.edge.buffer import Buffer, BufferConfig
from tests.support.disk import fill
from tests.support.wait import wait_until


def reading(i: int, location: str = "inlet") -> Reading:
    return Reading(
        sensor_id="ph-1", parameter="pH", value=7.0 + i / 1000, unit="pH",
        timestamp=1_790_000_000.0 + i, plant_id="north", location=location,
    )  # fmt: skip


def open_buffer(directory: Path, metrics: Metrics, **cfg: object) -> Buffer:
    config = BufferConfig(path=str(directory / "buffer.db"), **cfg)  # type: ignore[arg-type]
    buf = Buffer(config, "gw-disk", metrics)
    buf.start()
    return buf


def commit_failing(buf: Buffer) -> bool:
    ok, detail = buf.health()
    return not ok and "full" in detail.get("error", "")


def test_drop_oldest_keeps_its_alarm_and_counts_once_when_a_commit_fails_on_a_full_disk(
    small_disk: Path,
) -> None:
    metrics = Metrics()
    buf = open_buffer(small_disk, metrics, max_rows=10, overflow="drop_oldest")
    try:
        buf.submit_wait([reading(i) for i in range(10)], timeout=10)
        filler = fill(small_disk)
        # The next reading needs one row dropped, which raises the overflow alarm; it is large,
        # so its transaction needs new disk space and fails: "database or disk is full".
        durable = threading.Event()
        buf.submit([reading(10, location="x" * 300_000)], on_durable=durable.set)
        wait_until(lambda: commit_failing(buf), 30, "the commit to fail on the full disk")
        filler.unlink()
        assert durable.wait(30), "not committed once the disk had room again"
        rows = buf.fetch(1000)
    finally:
        buf.stop()
    alarms = [json.loads(r.payload) for r in rows if r.kind == "alarm"]
    readings = [r for r in rows if r.kind == "reading"]
    assert [(a["condition"], a["state"]) for a in alarms] == [("buffer_overflow", "raised")]
    assert len(readings) == 10
    dropped = metrics.registry.get_sample_value("iot_buffer_dropped_total", {"reason": "overflow"})
    assert dropped == 1  # one reading dropped, counted once however often the commit was tried
