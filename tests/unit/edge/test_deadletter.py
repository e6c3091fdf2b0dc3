"""The dead-letter store keeps rejected payloads durably, bounded, and safe to share by threads."""

from __future__ import annotations

import sqlite3
import threading
from functools import partial

from gateway.edge.deadletter import DeadLetterStore


def test_rows_keep_what_an_operator_needs(tmp_path):
    store = DeadLetterStore(tmp_path / "dl.db", max_rows=10)
    store.add("mqtt", "plant/p1/s1/pH", "not_a_number", b"abc", "'abc'")
    (row,) = store.list(10)
    assert (row.source, row.topic, row.reason, row.detail, row.payload, row.size) == (
        "mqtt", "plant/p1/s1/pH", "not_a_number", "'abc'", b"abc", 3,
    )  # fmt: skip
    assert row.timestamp > 1_700_000_000


def test_large_payloads_are_truncated_and_keep_their_size(tmp_path):
    store = DeadLetterStore(tmp_path / "dl.db", max_rows=10, max_payload_bytes=100)
    store.add("mqtt", "t", "too_large", b"x" * 1_000_000)
    (row,) = store.list(1)
    assert (len(row.payload), row.size) == (100, 1_000_000)


def test_oldest_rows_are_dropped_beyond_the_bound_and_counted(tmp_path):
    store = DeadLetterStore(tmp_path / "dl.db", max_rows=5)
    for i in range(12):
        store.add("mqtt", f"t/{i}", "not_json", b"%d" % i)
    assert store.count() == 5
    assert store.dropped == 7
    assert [r.topic for r in store.list(10)] == [f"t/{i}" for i in range(11, 6, -1)]


def test_rows_survive_reopening(tmp_path):
    store = DeadLetterStore(tmp_path / "dl.db", max_rows=3)
    for i in range(4):
        store.add("mqtt", f"t/{i}", "not_json", b"")
    store.close()
    again = DeadLetterStore(tmp_path / "dl.db", max_rows=3)
    again.add("mqtt", "t/4", "not_json", b"")
    assert [r.topic for r in again.list(10)] == ["t/4", "t/3", "t/2"]


def test_concurrent_writers_lose_nothing(tmp_path):
    store = DeadLetterStore(tmp_path / "dl.db", max_rows=10_000)

    def write(n: int) -> None:
        for i in range(200):
            store.add("mqtt", f"w{n}/{i}", "not_json", b"x")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count() == 800


def test_rejects_handed_in_from_one_thread_share_commits_and_are_acknowledged_once_durable(
    tmp_path,
):
    """paho's thread hands rejects in one after another: it must not wait for an fsync each
    time. They are group-committed, and each on_durable runs only once its row is on disk."""
    store = DeadLetterStore(tmp_path / "dl.db", max_rows=10_000)
    seen_on_disk: list[bool] = []
    done = threading.Event()
    n = 500

    def durable(i: int) -> None:
        con = sqlite3.connect(tmp_path / "dl.db")  # another connection sees only committed rows
        seen_on_disk.append(
            con.execute(
                "SELECT count(*) FROM dead_letters WHERE topic = ?", (f"t/{i}",)
            ).fetchone()[0]
            == 1
        )
        con.close()
        if len(seen_on_disk) == n:
            done.set()

    for i in range(n):
        store.submit("mqtt", f"t/{i}", "not_json", b"x", on_durable=partial(durable, i))
    assert done.wait(30)
    assert all(seen_on_disk)
    assert store.count() == n
    assert store.commits < n / 5  # group commit, not one fsync per message
    store.close()


def test_close_commits_what_was_handed_in(tmp_path):
    store = DeadLetterStore(tmp_path / "dl.db")
    acked: list[int] = []
    for i in range(100):
        store.submit("mqtt", f"t/{i}", "not_json", b"x", on_durable=partial(acked.append, i))
    store.close()
    assert sorted(acked) == list(range(100))
    assert DeadLetterStore(tmp_path / "dl.db").count() == 100
