"""1-minute tumbling windows per plant and parameter, on event time, for one source partition.

Pure logic, no I/O: the consumer feeds readings with their Kafka offsets and takes closed windows.

Scale-out rests on two properties of this module:

- Windows are *partial*: one ``PartitionWindows`` sees only its own partition's readings, and a
  closed window is written with the partition as its ``source``. ``merge`` combines the partials of
  one (plant, parameter, minute) into the full aggregate; the result does not depend on how many
  processor instances share the partitions.
- Everything is a deterministic function of the partition's message sequence plus the checkpoint
  stored with the committed offset. The committed offset is the lowest offset still needed by an
  open window, and the checkpoint says which windows were already closed (``closed_through`` per
  plant), so replaying from it after a crash or a rebalance rebuilds the open windows exactly and
  never rewrites a closed window with a fragment of its readings.

Windows close when the plant's event-time watermark passes the window end plus the grace period,
or when the plant has sent nothing aggregatable for ``idle_flush_seconds`` of wall time. A reading
for a closed window is late: the caller counts it (it is still stored raw), it never reopens the
window.

The watermark is the newest time of the plant's *second* most advanced sensor in the partition
(of the only one, while there is one). One sensor, however far ahead its clock, is outvoted: a
probe 240 s fast neither closes the other sensors' windows nor makes their readings late. A sensor
that sent nothing for ``idle_flush_seconds`` while the partition was read to its end leaves the
vote. Readings flagged ``stale:future`` (ahead of their gateway's clock, see ``validate``) do not
vote at all. The two leading sensors go into the checkpoint, so a replay rebuilds the same
watermark (it never runs ahead of the one the windows were closed by).

A reading re-sent by a gateway (at least once delivery: same ``gatewayId`` and ``seq``, same key,
so the same partition) is stored once raw by point identity; the window it falls in counts it
once too. Each open window keeps the identities of its readings, (gatewayId, seq), or (sensorId,
parameter, timestamp in µs) for producers that send no gatewayId/seq, and drops them when it
closes, so memory follows the open windows only. A replay from the checkpoint re-reads every
message an open window holds (the committed offset is the lowest one an open window needs), so it
rebuilds these identities as exactly as the aggregates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from gateway.common.model import Quality, Reading
from gateway.common.validate import AHEAD

WINDOW_SECONDS = 60
CHECKPOINT_VERSION = 2  # 1: without the leading sensors ("wm"), still read
# Kafka's default offset.metadata.max.bytes is 4096; stay well below it.
MAX_CHECKPOINT_BYTES = 3000


def window_start(ts: float, seconds: int = WINDOW_SECONDS) -> int:
    return math.floor(ts / seconds) * seconds


def aggregatable(r: Reading) -> bool:
    """Bad readings and readings without a value are stored raw but kept out of aggregates."""
    return r.value is not None and math.isfinite(r.value) and r.quality is not Quality.BAD


@dataclass(slots=True)
class WindowAggregate:
    """min/max/avg/count/latest of one plant's parameter over one window.

    A partial (``source`` set) covers one source partition; ``merge`` gives the full window.
    ``sum`` is kept so partials and downsampled windows merge exactly into averages.
    """

    plant_id: str
    parameter: str
    start: int
    count: int
    sum: float
    min: float
    max: float
    latest: float
    latest_time: float
    latest_sensor: str
    unit: str = ""
    source: str = ""
    seconds: int = WINDOW_SECONDS

    @classmethod
    def first(cls, r: Reading, start: int, source: str, seconds: int) -> WindowAggregate:
        assert r.value is not None
        v = r.value
        return cls(
            r.plant_id,
            r.parameter,
            start,
            1,
            v,
            v,
            v,
            v,
            r.timestamp,
            r.sensor_id,
            r.unit,
            source,
            seconds,
        )

    @property
    def avg(self) -> float:
        return self.sum / self.count

    @property
    def end(self) -> int:
        return self.start + self.seconds

    def add(self, value: float, ts: float, sensor_id: str) -> None:
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        # Ties on (time, sensor) keep the later message: a re-sent reading replaces itself.
        if (ts, sensor_id) >= (self.latest_time, self.latest_sensor):
            self.latest, self.latest_time, self.latest_sensor = value, ts, sensor_id

    def to_dict(self) -> dict[str, object]:
        return {
            "plantId": self.plant_id,
            "parameter": self.parameter,
            "windowStart": self.start,
            "windowSeconds": self.seconds,
            "count": self.count,
            "sum": self.sum,
            "min": self.min,
            "max": self.max,
            "avg": self.avg,
            "latest": self.latest,
            "latestTime": self.latest_time,
            "latestSensorId": self.latest_sensor,
            "unit": self.unit,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WindowAggregate:
        """The window ``to_dict`` gave (as read back from the aggregated topic)."""
        return cls(
            str(d["plantId"]),
            str(d["parameter"]),
            int(d["windowStart"]),
            int(d["count"]),
            float(d["sum"]),
            float(d["min"]),
            float(d["max"]),
            float(d["latest"]),
            float(d["latestTime"]),
            str(d["latestSensorId"]),
            str(d.get("unit", "")),
            str(d.get("source", "")),
            int(d.get("windowSeconds", WINDOW_SECONDS)),
        )


def merge(parts: Iterable[WindowAggregate]) -> WindowAggregate:
    """Combine partials of one window (any order in, same result out)."""
    ordered = sorted(parts, key=lambda p: p.source)
    if not ordered:
        raise ValueError("merge needs at least one partial")
    head = ordered[0]
    out = WindowAggregate(
        head.plant_id,
        head.parameter,
        head.start,
        0,
        0.0,
        head.min,
        head.max,
        head.latest,
        head.latest_time,
        head.latest_sensor,
        head.unit,
        "",
        head.seconds,
    )
    sums = []
    for p in ordered:
        if (p.plant_id, p.parameter, p.start) != (out.plant_id, out.parameter, out.start):
            raise ValueError("merge: partials of different windows")
        out.count += p.count
        sums.append(p.sum)
        out.min = min(out.min, p.min)
        out.max = max(out.max, p.max)
        if (p.latest_time, p.latest_sensor) >= (out.latest_time, out.latest_sensor):
            out.latest, out.latest_time, out.latest_sensor = (
                p.latest,
                p.latest_time,
                p.latest_sensor,
            )
    out.sum = math.fsum(sums)
    return out


class Outcome(StrEnum):
    ADDED = "added"
    LATE = "late"  # its window had already closed: count it
    REPLAYED = "replayed"  # re-read after a restart, its window was already written
    SKIPPED = "skipped"  # not aggregatable (bad quality or no value)
    FUTURE = "future"  # timestamp too far ahead of the wall clock to trust
    DUPLICATE = "duplicate"  # the same reading is already in its (open) window


_MIN = -(2**62)


class _Open:
    """An open window, its first offset and the identities of the readings it holds."""

    __slots__ = ("agg", "first_offset", "foreign", "seqs")

    def __init__(self, agg: WindowAggregate, first_offset: int) -> None:
        self.agg = agg
        self.first_offset = first_offset
        self.seqs: dict[str, set[int]] = {}  # gatewayId -> seqs (ints keep the sets small)
        self.foreign: set[tuple[str, int]] = set()  # (sensorId, µs); parameter is the window's

    def first_time(self, r: Reading) -> bool:
        """Whether ``r`` is new to this window (and remember it)."""
        seq = r.seq
        if seq is not None and r.gateway_id:
            seen = self.seqs.get(r.gateway_id)
            if seen is None:
                self.seqs[r.gateway_id] = {seq}
                return True
            if seq in seen:
                return False
            seen.add(seq)
            return True
        key = (r.sensor_id, round(r.timestamp * 1_000_000))
        if key in self.foreign:
            return False
        self.foreign.add(key)
        return True


class _Front:
    """One plant's sensors in a partition: each one's newest event time and when it last sent
    (wall time), and the two most advanced ones, whose second is the watermark."""

    __slots__ = ("m1", "m2", "s1", "s2", "sensors")

    def __init__(self) -> None:
        self.sensors: dict[str, list[float]] = {}  # sensor -> [newest time, wall time or -1]
        self.s1: str | None = None
        self.m1 = -math.inf
        self.s2: str | None = None
        self.m2 = -math.inf

    @property
    def mark(self) -> float:
        return self.m2 if self.s2 is not None else self.m1

    def see(self, sensor: str, ts: float, now: float) -> float:
        """Account a reading of ``sensor`` at ``ts``; returns the watermark."""
        e = self.sensors.get(sensor)
        if e is None:
            self.sensors[sensor] = [ts, now]
        else:
            e[1] = now
            if ts <= e[0]:
                return self.mark
            e[0] = ts
        # The sensor's newest time rose to ts; others stay where they were, none above m2
        # unless it is s1 or s2: the two leaders follow without looking at the rest.
        if sensor == self.s1:
            self.m1 = ts
        elif sensor == self.s2:
            self.m2 = ts
            if ts > self.m1:
                self.s1, self.m1, self.s2, self.m2 = sensor, ts, self.s1, self.m1
        elif ts > self.m1:
            self.s2, self.m2, self.s1, self.m1 = self.s1, self.m1, sensor, ts
        elif ts > self.m2 or self.s2 is None:
            self.s2, self.m2 = sensor, ts
        return self.mark

    def expire(self, now: float, idle: float) -> None:
        """Sensors silent for ``idle`` seconds leave the vote (restored ones start their clock)."""
        gone = []
        for sensor, e in self.sensors.items():
            if e[1] < 0:
                e[1] = now
            elif now - e[1] >= idle:
                gone.append(sensor)
        if not gone:
            return
        for sensor in gone:
            del self.sensors[sensor]
        if self.s1 in self.sensors and (self.s2 is None or self.s2 in self.sensors):
            return
        ranked = sorted(self.sensors.items(), key=lambda kv: (kv[1][0], kv[0]), reverse=True)
        self.s1, self.m1 = (ranked[0][0], ranked[0][1][0]) if ranked else (None, -math.inf)
        self.s2, self.m2 = (ranked[1][0], ranked[1][1][0]) if len(ranked) > 1 else (None, -math.inf)

    def leaders(self) -> list[list[object]]:
        return [[s, round(m * 1000)] for s, m in ((self.s1, self.m1), (self.s2, self.m2)) if s]

    @classmethod
    def restore(cls, leaders: object) -> _Front:
        front = cls()
        if isinstance(leaders, list):
            for item in leaders:
                if isinstance(item, list) and len(item) == 2 and isinstance(item[1], int | float):
                    front.see(str(item[0]), item[1] / 1000, -1.0)
        return front


@dataclass(frozen=True, slots=True)
class CommitPoint:
    offset: int
    metadata: str


class PartitionWindows:
    """The open windows of one source partition, and where it is safe to commit."""

    def __init__(
        self,
        source: str,
        *,
        grace_seconds: float = 10.0,
        idle_flush_seconds: float = 70.0,
        max_future_seconds: float = 300.0,
        window_seconds: int = WINDOW_SECONDS,
        checkpoint: str | None = None,
    ) -> None:
        self.source = source
        self.grace = grace_seconds
        self.idle_flush = idle_flush_seconds
        self.max_future = max_future_seconds
        self.seconds = window_seconds
        self._open: dict[tuple[str, str, int], _Open] = {}
        self._closed: list[WindowAggregate] = []
        self._closed_through: dict[str, int] = {}  # plant -> windows starting before are closed
        self._fronts: dict[str, _Front] = {}  # plant -> its sensors' progress (the watermark)
        self._last_arrival: dict[
            str, float
        ] = {}  # plant -> wall time of its last aggregated reading
        self._replay_until = -1  # offsets below were processed before the checkpoint was taken
        self.next_offset: int | None = None
        if checkpoint:
            self._restore(checkpoint)

    # -- feeding -------------------------------------------------------------------------------

    def add(self, r: Reading, offset: int, now: float, sent: float | None = None) -> Outcome:
        """Account one reading at ``offset``. ``now`` is wall time (for idle flush); ``sent`` the
        Kafka timestamp the gateway sent it with, which "too far in the future" is judged
        against (wall time when unknown), so a replay judges alike."""
        if self.next_offset is None or offset >= self.next_offset:
            self.next_offset = offset + 1
        v = r.value
        if v is None or r.quality is Quality.BAD or not math.isfinite(v):
            return Outcome.SKIPPED
        ts = r.timestamp
        if ts > (now if sent is None else sent) + self.max_future:
            return Outcome.FUTURE
        seconds = self.seconds
        start = math.floor(ts / seconds) * seconds
        plant = r.plant_id
        closed_through = self._closed_through.get(plant, _MIN)
        if start < closed_through:
            return Outcome.REPLAYED if offset < self._replay_until else Outcome.LATE
        key = (plant, r.parameter, start)
        w = self._open.get(key)
        if w is None:
            w = _Open(WindowAggregate.first(r, start, self.source, seconds), offset)
            w.first_time(r)
            self._open[key] = w
        elif w.first_time(r):
            w.agg.add(v, ts, r.sensor_id)
        else:
            return Outcome.DUPLICATE
        self._last_arrival[plant] = now
        if r.quality_reasons and AHEAD in r.quality_reasons:
            return Outcome.ADDED  # its clock is known to be ahead: no vote on the watermark
        front = self._fronts.get(plant)
        if front is None:
            front = self._fronts[plant] = _Front()
        boundary = math.floor((front.see(r.sensor_id, ts, now) - self.grace) / seconds) * seconds
        if boundary > closed_through:
            self._advance(plant, boundary)
        return Outcome.ADDED

    def seen(self, offset: int) -> None:
        """Mark ``offset`` processed (also for messages that never become readings)."""
        if self.next_offset is None or offset + 1 > self.next_offset:
            self.next_offset = offset + 1

    def flush_idle(self, now: float) -> None:
        """Close every window of plants that have been silent for ``idle_flush_seconds``; sensors
        silent that long leave their plant's watermark vote."""
        for plant, front in list(self._fronts.items()):
            front.expire(now, self.idle_flush)
            if not front.sensors:
                del self._fronts[plant]
        for plant, last in list(self._last_arrival.items()):
            if now - last >= self.idle_flush:
                ends = [o.agg.end for k, o in self._open.items() if k[0] == plant]
                if ends:
                    self._advance(plant, max(ends))
                del self._last_arrival[plant]

    def _advance(self, plant: str, boundary: int) -> None:
        if boundary <= self._closed_through.get(plant, _MIN):
            return
        self._closed_through[plant] = boundary
        for key in [k for k in self._open if k[0] == plant and k[2] < boundary]:
            self._closed.append(self._open.pop(key).agg)

    # -- taking results ------------------------------------------------------------------------

    def take_closed(self) -> list[WindowAggregate]:
        closed, self._closed = self._closed, []
        return closed

    @property
    def open_windows(self) -> int:
        return len(self._open)

    @property
    def identities(self) -> int:
        """Reading identities held for de-duplication (only open windows hold any)."""
        return sum(
            len(o.foreign) + sum(len(seqs) for seqs in o.seqs.values()) for o in self._open.values()
        )

    def lowest_needed_offset(self) -> int | None:
        """The first offset an open window still needs; None when no window is open."""
        return min((o.first_offset for o in self._open.values()), default=None)

    def commit_point(self) -> CommitPoint | None:
        """Offset and checkpoint to commit once the windows taken so far are written.

        None before the first message: there is nothing to commit yet.
        """
        if self.next_offset is None:
            return None
        low = self.lowest_needed_offset()
        offset = self.next_offset if low is None else min(low, self.next_offset)
        return CommitPoint(offset, self._checkpoint())

    def _checkpoint(self) -> str:
        ct = dict(self._closed_through)
        wm = {plant: f.leaders() for plant, f in self._fronts.items() if f.s1 is not None}
        while True:
            text = json.dumps(
                {"v": CHECKPOINT_VERSION, "next": self.next_offset, "ct": ct, "wm": wm},
                separators=(",", ":"),
            )
            if len(text) <= MAX_CHECKPOINT_BYTES or not (ct or wm):
                return text
            # Too many plants share this partition: forget the one closed longest ago (its late
            # readings, if any ever come, would then start a new partial window).
            if ct:
                oldest = min(ct, key=lambda p: ct[p])
                del ct[oldest]
                wm.pop(oldest, None)
            else:
                wm.popitem()

    def _restore(self, text: str) -> None:
        try:
            data = json.loads(text)
        except ValueError:
            return  # not ours (e.g. committed by a tool): start without knowledge of closed windows
        if not isinstance(data, dict) or data.get("v") not in (1, CHECKPOINT_VERSION):
            return
        ct = data.get("ct", {})
        if isinstance(ct, dict):
            self._closed_through = {
                str(k): int(v) for k, v in ct.items() if isinstance(v, int | float)
            }
        wm = data.get("wm", {})
        if isinstance(wm, dict):
            self._fronts = {str(k): _Front.restore(v) for k, v in wm.items()}
        nxt = data.get("next")
        if isinstance(nxt, int):
            self._replay_until = nxt
