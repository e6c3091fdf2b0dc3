"""Which offsets the processor may commit, per partition.

A batch's commit point becomes safe once the writer has stored it (and the windows it fed). Only
the partition's current owner commits: a point recorded for a ``PartitionWindows`` that was revoked
(and maybe assigned again) since is dropped. A commit that failed for a reason other than a
rebalance is kept for the next attempt.
"""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import TopicPartition

from gateway.processor.aggregate import CommitPoint, PartitionWindows
from gateway.processor.writer import Batch

Key = tuple[str, int]  # topic, partition


class Checkpoints:
    def __init__(self) -> None:
        self._last: dict[Key, tuple[int, str]] = {}  # what was committed, per partition
        self._safe: dict[Key, tuple[PartitionWindows, CommitPoint]] = {}  # stored, not committed

    def stored(self, batches: Iterable[Batch]) -> None:
        """The writer finished these batches: their commit points are safe."""
        for batch in batches:
            for key, pw, cp in batch.commits:
                self._safe[key] = (pw, cp)

    @property
    def pending(self) -> bool:
        return bool(self._safe)

    def due(self, windows: dict[Key, PartitionWindows]) -> list[TopicPartition]:
        """Offsets to commit now, for partitions still owned by the same windows; taken."""
        offsets = []
        for key, (pw, cp) in self._safe.items():
            if windows.get(key) is not pw:
                continue  # revoked (and maybe assigned again) since: not ours to commit
            if self._last.get(key) != (cp.offset, cp.metadata):
                offsets.append(TopicPartition(key[0], key[1], cp.offset, cp.metadata))
        self._safe.clear()
        return offsets

    def committed(self, offsets: Iterable[TopicPartition]) -> None:
        for tp in offsets:
            self._last[(tp.topic, tp.partition)] = (tp.offset, tp.metadata or "")

    def retry(
        self, offsets: Iterable[TopicPartition], windows: dict[Key, PartitionWindows]
    ) -> None:
        """A commit failed: keep its offsets for the next attempt, unless newer ones came."""
        for tp in offsets:
            key = (tp.topic, tp.partition)
            current = windows.get(key)
            if current is not None and key not in self._safe:
                self._safe[key] = (current, CommitPoint(tp.offset, tp.metadata or ""))

    def forget(self, key: Key) -> None:
        """The partition was assigned anew or revoked."""
        self._last.pop(key, None)
        self._safe.pop(key, None)
