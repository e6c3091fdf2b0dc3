"""The disk buffer on a real, small filesystem (tmpfs): disk full, and what it must not lose."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from gateway.common.metrics import Metrics
from gateway.common.model import Reading
from gateway.edge.buffer import SCHEMA, Buffer, BufferConfig
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
    # min_free_bytes = 0: the bound on rows, not the free disk, is what drops here
    buf = open_buffer(small_disk, metrics, max_rows=10, overflow="drop_oldest", min_free_bytes=0)
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


def files_size(path: Path) -> int:
    """The buffer's database and WAL as they take space on disk."""
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def stop_within(buf: Buffer, seconds: float) -> bool:
    """Stop the buffer from another thread; whether stop() returned within ``seconds``."""
    stopper = threading.Thread(target=buf.stop, daemon=True)
    stopper.start()
    stopper.join(seconds)
    return not stopper.is_alive()


def test_a_full_disk_shows_in_health_stop_is_bounded_and_committed_rows_stay(
    small_disk: Path,
) -> None:
    metrics = Metrics()
    # min_free_bytes = 0: the disk is filled at once by another program, past any margin
    buf = open_buffer(small_disk, metrics, overflow="block", min_free_bytes=0)
    buf.submit_wait([reading(i) for i in range(100)], timeout=10)
    filler = fill(small_disk)  # another program takes the whole disk
    durable = threading.Event()
    buf.submit([reading(100, location="x" * 300_000)], on_durable=durable.set)
    wait_until(lambda: not buf.health()[0], 30, "/health to show the full disk")
    detail = buf.health()[1]
    assert "full" in detail["error"], detail
    # The reading cannot be committed: stop gives up on it (it was never acknowledged, so its
    # source still has it) instead of retrying forever.
    assert stop_within(buf, 30), "Buffer.stop() did not return with the disk full"
    assert not durable.is_set()
    filler.unlink()
    buf = open_buffer(small_disk, metrics)
    try:
        rows = buf.fetch(1000)
    finally:
        buf.stop()
    assert [json.loads(r.payload)["value"] for r in rows] == [7.0 + i / 1000 for i in range(100)]


def test_the_buffer_holds_the_sources_back_while_the_disk_is_below_min_free(
    small_disk: Path,
) -> None:
    min_free = 2_000_000  # of the 4 MB disk
    buf = open_buffer(small_disk, Metrics(), overflow="block", min_free_bytes=min_free)
    big = "x" * 50_000
    try:
        n = 0
        while True:
            try:
                buf.submit_wait([reading(n, location=big)], timeout=3)
            except TimeoutError:
                break
            n += 1
            assert n < 200, "the buffer never held the sources back"
        ok, detail = buf.health()
        free = shutil.disk_usage(small_disk).free
    finally:
        buf.stop()
    assert not ok and "disk" in detail["error"], detail
    assert free >= min_free - 200_000  # a batch may overshoot, by one reading here
    assert n > 0


def test_the_size_bound_counts_the_files_on_disk_wal_included(tmp_path: Path) -> None:
    max_bytes = 2_000_000
    buf = open_buffer(tmp_path, Metrics(), overflow="block", max_bytes=max_bytes)
    try:
        n = 0
        while True:
            try:
                buf.submit_wait([reading(n + k, location="y" * 2000) for k in range(20)], 3)
            except TimeoutError:
                break
            n += 20
        on_disk = files_size(buf.path)
    finally:
        buf.stop()
    assert n > 0
    assert on_disk <= max_bytes + 100_000, f"{on_disk} bytes on disk for a {max_bytes} bound"


def test_the_file_shrinks_after_a_drain(tmp_path: Path) -> None:
    buf = open_buffer(tmp_path, Metrics())
    try:
        for k in range(10):
            buf.submit_wait([reading(k * 300 + i, location="z" * 2000) for i in range(300)], 10)
        full = files_size(buf.path)
        assert full > 5_000_000
        buf.delete([r.id for r in buf.fetch(10_000)], wait=True)
        wait_until(lambda: files_size(buf.path) < 1_000_000, 60, "the file to shrink")
    finally:
        buf.stop()


def test_an_existing_file_without_incremental_vacuum_is_converted_at_start(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    con = sqlite3.connect(path)
    con.executescript(SCHEMA)  # as earlier versions created it: auto_vacuum = NONE
    con.execute("INSERT INTO meta VALUES ('seq', 1000)")
    con.execute(
        "INSERT INTO records VALUES (1000, 'reading', 'north', 'ph-1', ?, 1.0)",
        (reading(1).to_json(),),
    )
    con.commit()
    assert con.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    con.close()
    buf = open_buffer(tmp_path, Metrics())
    try:
        (row,) = buf.fetch(10)
    finally:
        buf.stop()
    con = sqlite3.connect(path)
    mode = con.execute("PRAGMA auto_vacuum").fetchone()[0]
    con.close()
    assert mode == 2  # INCREMENTAL
    assert row.id == 1000


def scribble(path: Path, first_page: int, pages: int) -> None:
    """Overwrite pages of the database file in place, as a failing disk would."""
    with path.open("r+b") as f:
        f.seek(first_page * 4096)
        f.write(b"\xa5" * (pages * 4096))
        f.flush()
        os.fsync(f.fileno())


def test_corruption_at_run_time_moves_the_file_aside_salvages_rows_and_carries_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    buf = open_buffer(tmp_path, Metrics())
    try:
        buf.submit_wait([reading(i) for i in range(3000)], timeout=10)
        before = {r.id: r.payload for r in buf.fetch(10_000)}
        con = sqlite3.connect(buf.path)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        with caplog.at_level(logging.ERROR, logger="gateway.edge.buffer"):
            scribble(buf.path, 40, 4)  # leaf pages in the middle of the table
            # the forwarder reads from the start: it meets the damage
            with contextlib.suppress(sqlite3.DatabaseError):
                buf.fetch(10_000)
            wait_until(
                lambda: list(tmp_path.glob("buffer.db.corrupt-*")), 30, "the file moved aside"
            )
            wait_until(lambda: buf.health()[0], 30, "the buffer healthy again")
        buf.submit_wait([reading(5000)], timeout=10)
        after = {r.id: r.payload for r in buf.fetch(10_000)}
    finally:
        buf.stop()
    new = [json.loads(p) for i, p in after.items() if i not in before]
    assert [d["value"] for d in new] == [7.0 + 5000 / 1000]
    salvaged = {i: p for i, p in after.items() if i in before}
    assert all(before[i] == p for i, p in salvaged.items())  # salvaged rows are the same rows
    assert len(salvaged) >= 2500, len(salvaged)  # all but those on the damaged pages
    assert any("corrupt" in r.getMessage() and "salvaged" in r.getMessage() for r in caplog.records)
