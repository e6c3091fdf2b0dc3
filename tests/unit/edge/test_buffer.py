"""The disk buffer: group commit, seq across restarts, overflow policies, corrupt files, deletes."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from gateway.common.metrics import Metrics
from gateway.common.model import AlarmEvent, Reading, Receipt
from gateway.common.stage import Recall
from gateway.edge.buffer import MAX_FORGETS, Buffer, BufferConfig


def reading(i: int, sensor: str = "ph-1", plant: str = "north") -> Reading:
    return Reading(
        sensor_id=sensor, parameter="pH", value=7.0 + i / 1000, unit="pH",
        timestamp=1_790_000_000.0 + i, plant_id=plant,
    )  # fmt: skip


def open_buffer(tmp_path: Path, metrics: Metrics | None = None, **cfg: object) -> Buffer:
    config = BufferConfig(path=str(tmp_path / "buffer.db"), **cfg)  # type: ignore[arg-type]
    buf = Buffer(config, "gw-test", metrics or Metrics())
    buf.start()
    return buf


def eventually_healthy(buf: Buffer, want: bool) -> bool:
    """The health once it matches ``want`` (the writer notices a full buffer within ~1 s)."""
    deadline = time.monotonic() + 10
    while buf.health()[0] != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return buf.health()[0]


def all_rows(buf: Buffer) -> list:
    return buf.fetch(1_000_000)


def test_many_submissions_share_one_commit_and_get_increasing_seq(tmp_path):
    buf = open_buffer(tmp_path)
    release = threading.Event()
    # The first batch's callback runs in the writer thread and holds it, so every submission
    # made meanwhile must go out in the writer's next transaction.
    buf.submit([reading(0)], on_durable=lambda: release.wait(10))
    submitted = []

    def source(k: int) -> None:
        for i in range(250):
            buf.submit([reading(i, sensor=f"s{k}")], on_durable=lambda: None)
            submitted.append(1)

    threads = [threading.Thread(target=source, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    commits_before = buf.commits
    release.set()
    buf.submit_wait([], timeout=10)
    assert buf.commits - commits_before <= 2  # 1000 readings: one transaction (+ the empty one)
    rows = all_rows(buf)
    buf.stop()
    assert len(rows) == 1001
    payloads = [json.loads(r.payload) for r in rows]
    seqs = [p["seq"] for p in payloads]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [r.id for r in rows] == seqs
    assert {p["gatewayId"] for p in payloads} == {"gw-test"}
    assert {r.key for r in rows} == {"ph-1", "s0", "s1", "s2", "s3"}


def test_on_durable_runs_once_the_rows_are_committed(tmp_path):
    buf = open_buffer(tmp_path)
    seen: list[int] = []

    done = threading.Event()

    def durable() -> None:
        con = sqlite3.connect(buf.path)  # another connection sees only committed data
        seen.append(con.execute("SELECT count(*) FROM records").fetchone()[0])
        con.close()
        done.set()

    buf.submit([reading(1), reading(2)], on_durable=durable)
    assert done.wait(10)
    buf.stop()
    assert seen == [2]


def test_seq_keeps_growing_across_restarts_even_when_the_buffer_was_emptied(tmp_path):
    buf = open_buffer(tmp_path)
    first = [reading(i) for i in range(5)]
    buf.submit_wait(first, timeout=10)
    buf.delete([r.id for r in all_rows(buf)], wait=True)
    assert all_rows(buf) == []
    buf.stop()

    buf = open_buffer(tmp_path)
    later = reading(99)
    buf.submit_wait([later], timeout=10)
    (row,) = all_rows(buf)
    buf.stop()
    assert later.seq is not None and first[-1].seq is not None
    assert later.seq > first[-1].seq
    assert row.id == later.seq and json.loads(row.payload)["seq"] == later.seq


def test_stop_commits_what_is_still_queued(tmp_path):
    buf = open_buffer(tmp_path, commit_interval_ms=200)
    buf.submit([reading(i) for i in range(100)])
    buf.stop()
    buf = open_buffer(tmp_path)
    assert len(all_rows(buf)) == 100
    buf.stop()


def test_alarm_events_are_stored_beside_readings(tmp_path):
    buf = open_buffer(tmp_path)
    event = AlarmEvent(
        alarm_id="north:bod-1:BOD:HH", event_id="e1", sensor_id="bod-1", plant_id="north",
        parameter="BOD", condition="HH", level="critical", state="raised", value=120.0,
        threshold=100.0, timestamp=1_790_000_000.0, message="BOD above 100 mg/L",
    )  # fmt: skip
    buf.submit_wait([reading(1, sensor="bod-1"), event], timeout=10)
    rows = all_rows(buf)
    buf.stop()
    assert [(r.kind, r.key, r.plant_id) for r in rows] == [
        ("reading", "bod-1", "north"),
        ("alarm", "bod-1", "north"),
    ]
    doc = json.loads(rows[1].payload)
    assert doc["alarmId"] == "north:bod-1:BOD:HH" and doc["seq"] == rows[1].id


def test_fetch_pages_by_id_and_delete_removes_only_the_given_rows(tmp_path):
    metrics = Metrics()
    buf = open_buffer(tmp_path, metrics)
    buf.submit_wait([reading(i) for i in range(10)], timeout=10)
    first = buf.fetch(4)
    rest = buf.fetch(100, after_id=first[-1].id)
    assert len(first) == 4 and len(rest) == 6
    doomed = [first[1].id, first[2].id, rest[5].id]
    buf.delete(doomed, wait=True)
    left = [r.id for r in all_rows(buf)]
    assert left == [r.id for r in first + rest if r.id not in doomed]
    assert buf.stats()["rows"] == 7
    buf.stop()


def test_block_policy_holds_new_readings_until_rows_are_forwarded(tmp_path, caplog):
    buf = open_buffer(tmp_path, max_rows=10, overflow="block")
    buf.submit_wait([reading(i) for i in range(10)], timeout=10)
    with caplog.at_level(logging.WARNING, logger="gateway.edge.buffer"):
        with pytest.raises(TimeoutError):
            buf.submit_wait([reading(10)], timeout=1.5)
        ok = eventually_healthy(buf, False)
    detail = buf.health()[1]
    assert not ok and "full" in detail["error"]
    assert any("holding the sources back" in r.getMessage() for r in caplog.records)
    assert buf.stats()["rows"] == 10  # nothing dropped

    committed = threading.Event()
    buf.submit([reading(11)], on_durable=committed.set)
    buf.delete([r.id for r in buf.fetch(5)])
    assert committed.wait(10)
    rows = all_rows(buf)
    buf.stop()
    # Both held readings got in once there was room, in the order they were submitted.
    assert len(rows) == 7
    assert [json.loads(r.payload)["value"] for r in rows[-2:]] == [7.01, 7.011]


def test_block_policy_takes_a_batch_whole_once_it_fits(tmp_path):
    buf = open_buffer(tmp_path, max_rows=10, overflow="block")
    buf.submit_wait([reading(i) for i in range(8)], timeout=10)
    committed = threading.Event()
    buf.submit([reading(i) for i in range(100, 105)], on_durable=committed.set)
    assert not committed.wait(1.0)  # 8 + 5 would exceed 10: held whole, not split
    assert not eventually_healthy(buf, False)
    buf.delete([r.id for r in buf.fetch(3)])
    assert committed.wait(10)
    assert buf.stats()["rows"] == 10
    assert buf.health()[0]
    buf.stop()


def test_block_policy_also_honours_the_byte_bound(tmp_path):
    buf = open_buffer(tmp_path, max_bytes=2000, overflow="block")
    buf.submit_wait([reading(i) for i in range(8)], timeout=10)  # ~8 * 250 bytes: over the bound
    with pytest.raises(TimeoutError):
        buf.submit_wait([reading(99)], timeout=1.0)
    buf.stop()


def test_drop_oldest_keeps_the_newest_counts_drops_and_raises_an_alarm(tmp_path, caplog):
    metrics = Metrics()
    buf = open_buffer(tmp_path, metrics, max_rows=10, overflow="drop_oldest")
    with caplog.at_level(logging.ERROR, logger="gateway.edge.buffer"):
        for i in range(25):
            buf.submit_wait([reading(i)], timeout=10)
    rows = all_rows(buf)
    readings = [json.loads(r.payload) for r in rows if r.kind == "reading"]
    alarms = [json.loads(r.payload) for r in rows if r.kind == "alarm"]
    assert [r["value"] for r in readings] == [7.0 + i / 1000 for i in range(25 - len(readings), 25)]
    assert len(rows) <= 11  # the bound, plus the alarm that reports it
    dropped = metrics.registry.get_sample_value("iot_buffer_dropped_total", {"reason": "overflow"})
    assert dropped == 25 - len(readings)
    assert len(alarms) == 1  # one alarm per overflow episode, not one per dropped row
    assert alarms[0]["condition"] == "buffer_overflow" and alarms[0]["state"] == "raised"
    assert sum("dropping the oldest" in r.getMessage() for r in caplog.records) == 1

    buf.delete([r.id for r in rows], wait=True)  # the forwarder catches up
    buf.submit_wait([reading(100)], timeout=10)
    kinds = [(r.kind, json.loads(r.payload).get("state")) for r in all_rows(buf)]
    buf.stop()
    assert ("alarm", "cleared") in kinds


def test_a_file_that_is_not_a_database_is_moved_aside(tmp_path, caplog):
    path = tmp_path / "buffer.db"
    path.write_bytes(b"this is not an SQLite file\n" * 200)
    with caplog.at_level(logging.ERROR, logger="gateway.edge.buffer"):
        buf = open_buffer(tmp_path)
    buf.submit_wait([reading(1)], timeout=10)
    assert len(all_rows(buf)) == 1
    buf.stop()
    aside = list(tmp_path.glob("buffer.db.corrupt-*"))
    assert [p.name for p in aside if not p.name.endswith(("-wal", "-shm"))]
    assert any(p.read_bytes().startswith(b"this is not") for p in aside)
    assert any("corrupt" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("first_page", "salvageable"), [(0, 0), (40, 1800)], ids=["table-root", "leaf-pages"]
)
def test_a_damaged_database_is_moved_aside_and_what_reads_is_salvaged(
    tmp_path, caplog, first_page, salvageable
):
    buf = open_buffer(tmp_path)
    buf.submit_wait([reading(i) for i in range(2000)], timeout=10)
    before = {r.id: r.payload for r in all_rows(buf)}
    buf.stop()
    path = tmp_path / "buffer.db"
    if first_page == 0:  # the records table's root page, wherever the schema put it
        with sqlite3.connect(path) as con:
            (root,) = con.execute(
                "SELECT rootpage FROM sqlite_master WHERE name = 'records'"
            ).fetchone()
        con.close()
        first_page = root - 1  # 0-based
    data = bytearray(path.read_bytes())
    page = 4096
    data[page * first_page : page * (first_page + 3)] = b"\xa5" * (page * 3)  # b-tree pages
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="gateway.edge.buffer"):
        buf = open_buffer(tmp_path)
    salvaged = {r.id: r.payload for r in all_rows(buf)}
    assert all(before[i] == p for i, p in salvaged.items())  # the same rows, same ids
    assert salvageable <= len(salvaged) < 2000
    buf.submit_wait([reading(1)], timeout=10)
    assert len(all_rows(buf)) == len(salvaged) + 1
    buf.stop()
    assert list(tmp_path.glob("buffer.db.corrupt-*"))
    assert any("corrupt" in r.getMessage() for r in caplog.records)


def test_a_second_gateway_on_the_same_file_is_refused(tmp_path):
    buf = open_buffer(tmp_path)
    with pytest.raises(RuntimeError, match="in use"):
        open_buffer(tmp_path)
    buf.stop()


def test_size_metrics_follow_the_rows(tmp_path):
    metrics = Metrics()
    buf = open_buffer(tmp_path, metrics)
    buf.submit_wait([reading(i, plant="north") for i in range(3)], timeout=10)
    buf.submit_wait([reading(i, plant="south") for i in range(2)], timeout=10)
    buf.stop()  # reopening recounts from the file
    before = time.time()
    buf = open_buffer(tmp_path, metrics)
    after = time.time()
    oldest = buf.fetch(1)[0].created
    size = metrics.registry.get_sample_value
    assert size("iot_buffer_size", {"plant_id": "north"}) == 3
    assert size("iot_buffer_size", {"plant_id": "south"}) == 2
    # the gauges were set at start: the files as they are (nothing written since), and the age
    # of the oldest row at that moment
    files = [tmp_path / "buffer.db", tmp_path / "buffer.db-wal"]
    assert size("iot_buffer_bytes") == sum(p.stat().st_size for p in files if p.exists())
    age = size("iot_buffer_oldest_age_seconds")
    assert age is not None and before - oldest <= age <= after - oldest
    assert buf.health()[0]
    buf.stop()


# -- receipts: what lets a source recognise a redelivery ----------------------------------------


def receipt(key: str, fingerprint: bytes = b"fp-1", keep_s: float = 600.0) -> Receipt:
    return Receipt("mqtt:test", key, fingerprint, keep_s)


def test_a_receipt_is_committed_with_its_records_and_recalled_after_a_restart(tmp_path):
    buf = open_buffer(tmp_path)
    calls: list[str] = []
    assert buf.recall(receipt("7"), lambda: calls.append("x")) is Recall.NEW
    buf.submit_wait([reading(0), receipt("7")], 10)
    assert [r.id for r in all_rows(buf)] == [buf.last_id]  # the receipt is no row, takes no seq
    buf.stop()

    buf = open_buffer(tmp_path)
    try:
        assert buf.recall(receipt("7"), lambda: calls.append("same")) is Recall.SAME
        assert calls == ["same"]  # already durable: at once
        assert buf.recall(receipt("7", b"fp-2"), lambda: calls.append("other")) is Recall.OTHER
        assert buf.recall(Receipt("mqtt:another", "7", b"fp-1", 600), calls.append) is Recall.NEW
        assert calls == ["same"]
    finally:
        buf.stop()


def test_a_redelivery_of_a_queued_delivery_waits_for_its_commit(tmp_path):
    buf = open_buffer(tmp_path)
    hold = threading.Event()
    events: list[str] = []
    try:
        buf.submit([reading(0)], on_durable=lambda: hold.wait(10))  # holds the writer
        buf.submit([reading(1), receipt("9")], on_durable=lambda: events.append("first"))
        assert buf.recall(receipt("9"), lambda: events.append("again")) is Recall.SAME
        assert events == []  # not durable yet
        hold.set()
        buf.submit_wait([], 10)
        assert events == ["first", "again"]
        assert len(all_rows(buf)) == 2
    finally:
        hold.set()
        buf.stop()


def test_forget_drops_only_receipts_committed_before_the_ack(tmp_path):
    buf = open_buffer(tmp_path)
    try:
        buf.submit_wait([reading(0), receipt("1"), receipt("2")], 10)
        acked = time.time()
        buf.forget([(receipt("1"), acked), (receipt("2"), acked - 3600)])
        buf.submit_wait([], 10)
        assert buf.recall(receipt("1"), lambda: None) is Recall.NEW
        # "2" was committed after the time given: a later delivery under the key, kept.
        assert buf.recall(receipt("2"), lambda: None) is Recall.SAME
    finally:
        buf.stop()


def test_forgets_are_spread_over_transactions(tmp_path):
    """An MQTT ack barrier confirms a second's receipts at once; deleting them all in one
    transaction held up the commit of everything queued behind it (publish-to-commit p99)."""
    buf = open_buffer(tmp_path)
    hold = threading.Event()
    n = 2 * MAX_FORGETS + 1
    try:
        buf.submit_wait([reading(0), *(receipt(str(k)) for k in range(n))], 10)
        acked = time.time()
        commits = buf.commits
        buf.submit([reading(1)], on_durable=lambda: hold.wait(10))  # holds the writer
        buf.forget([(receipt(str(k)), acked) for k in range(n)])
        hold.set()
        deadline = time.monotonic() + 10
        while buf.recall(receipt(str(n - 1)), lambda: None) is not Recall.NEW:
            assert time.monotonic() < deadline, "the forgets were not committed"
            time.sleep(0.01)
        assert buf.commits - commits >= 3  # the reading's, then slices of MAX_FORGETS
        assert all(buf.recall(receipt(str(k)), lambda: None) is Recall.NEW for k in range(n))
    finally:
        hold.set()
        buf.stop()


def test_forget_older_keeps_the_keys_delivered_again(tmp_path):
    buf = open_buffer(tmp_path)
    try:
        buf.submit_wait([reading(0), receipt("1"), receipt("2"), receipt("3")], 10)
        before = time.time()
        buf.submit_wait([reading(1), receipt("4")], 10)
        buf.forget_older("mqtt:test", before, keep={"2"})
        buf.submit_wait([], 10)
        recalled = {k: buf.recall(receipt(k), lambda: None) for k in "1234"}
        assert recalled == {"1": Recall.NEW, "2": Recall.SAME, "3": Recall.NEW, "4": Recall.SAME}
    finally:
        buf.stop()


def test_an_expired_receipt_is_not_recalled(tmp_path):
    buf = open_buffer(tmp_path)
    try:
        buf.submit_wait([reading(0), receipt("1", keep_s=-1.0)], 10)
        assert buf.recall(receipt("1"), lambda: None) is Recall.NEW
    finally:
        buf.stop()
