"""1-minute windows: grace, late readings, idle flush, partial merge and the offsets they pin."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.common.model import Quality, Reading
from gateway.processor.aggregate import (
    Outcome,
    PartitionWindows,
    WindowAggregate,
    merge,
    window_start,
)

T0 = 1_790_000_040  # a minute boundary
NOW = T0 + 3600.0  # wall clock well after the data (historical replay)


def reading(ts: float, value: float = 1.0, *, plant="north", parameter="pH", sensor="ph-1"):
    return Reading(sensor, parameter, value, "pH", ts, plant_id=plant)


def windows(**kw) -> PartitionWindows:
    kw.setdefault("grace_seconds", 10)
    kw.setdefault("idle_flush_seconds", 30)
    return PartitionWindows("sensors.raw.north/0", **kw)


def test_window_closes_once_the_watermark_passes_end_plus_grace():
    pw = windows()
    for i, v in enumerate([7.0, 6.5, 8.0]):
        assert pw.add(reading(T0 + 10 * i, v), offset=i, now=NOW) is Outcome.ADDED
    assert pw.add(reading(T0 + 69.9, 7.2), offset=3, now=NOW) is Outcome.ADDED
    assert pw.take_closed() == []  # 69.9 - 10 < 60: still within grace
    pw.add(reading(T0 + 70, 7.3), offset=4, now=NOW)
    (w,) = pw.take_closed()
    assert (w.plant_id, w.parameter, w.start, w.end) == ("north", "pH", T0, T0 + 60)
    assert (w.count, w.min, w.max, w.latest) == (3, 6.5, 8.0, 8.0)
    assert w.avg == pytest.approx(21.5 / 3)
    assert w.source == "sensors.raw.north/0"


def test_a_reading_within_grace_still_counts_in_its_window():
    pw = windows()
    pw.add(reading(T0 + 1, 1.0), 0, NOW)
    pw.add(reading(T0 + 65, 2.0), 1, NOW)
    assert pw.add(reading(T0 + 59, 3.0), 2, NOW) is Outcome.ADDED  # 6 s late, grace is 10 s
    pw.add(reading(T0 + 130, 4.0), 3, NOW)
    first, second = sorted(pw.take_closed(), key=lambda w: w.start)
    assert (first.count, first.latest) == (2, 3.0)
    assert (second.count, second.latest) == (1, 2.0)


def test_late_beyond_grace_is_reported_and_never_reopens_the_window():
    pw = windows()
    pw.add(reading(T0 + 1, 1.0), 0, NOW)
    pw.add(reading(T0 + 75, 2.0), 1, NOW)
    (w,) = pw.take_closed()
    assert pw.add(reading(T0 + 30, 9.0), 2, NOW) is Outcome.LATE
    assert pw.take_closed() == []
    assert w.count == 1


def test_idle_flush_closes_a_quiet_plant_on_wall_time():
    pw = windows(idle_flush_seconds=30)
    pw.add(reading(T0 + 5, 1.0), 0, now=100.0 + NOW)
    pw.add(reading(T0 + 6, 2.0, plant="south"), 1, now=120.0 + NOW)
    pw.flush_idle(now=129.0 + NOW)
    assert pw.take_closed() == []
    pw.flush_idle(now=130.0 + NOW)
    (w,) = pw.take_closed()
    assert w.plant_id == "north"
    # the quiet plant's next reading for that minute is late; the other plant is unaffected
    assert pw.add(reading(T0 + 50, 3.0), 2, now=131.0 + NOW) is Outcome.LATE
    assert pw.add(reading(T0 + 50, 3.0, plant="south"), 3, now=131.0 + NOW) is Outcome.ADDED


def test_bad_and_valueless_readings_are_kept_out_of_windows():
    pw = windows()
    bad = reading(T0 + 1, 99.0)
    bad.flag(Quality.BAD, "out_of_range")
    assert pw.add(bad, 0, NOW) is Outcome.SKIPPED
    assert pw.add(Reading("ph-1", "pH", None, "pH", T0 + 2, plant_id="north"), 1, NOW) is (
        Outcome.SKIPPED
    )
    uncertain = reading(T0 + 3, 5.0)
    uncertain.flag(Quality.UNCERTAIN, "spike")
    assert pw.add(uncertain, 2, NOW) is Outcome.ADDED
    assert pw.open_windows == 1


def test_a_timestamp_far_in_the_future_does_not_close_everything():
    pw = windows()
    pw.add(reading(T0 + 1), 0, NOW)
    assert pw.add(reading(NOW + 86_400), 1, NOW) is Outcome.FUTURE
    assert pw.take_closed() == []
    # Within max_future (so stored and aggregated): a probe whose clock is 240 s fast must not
    # close the windows of the plant's on-time sensors either.
    assert pw.add(reading(T0 + 240, sensor="ph-fast"), 2, NOW) is Outcome.ADDED
    assert pw.take_closed() == []
    assert pw.add(reading(T0 + 30), 3, NOW) is Outcome.ADDED


def test_one_fast_probe_leaves_the_other_sensors_readings_in_their_windows():
    """Reproduces the review: a probe 240 s ahead made on-time readings LATE. One sensor, however
    far ahead, is outvoted: the watermark is the second most advanced sensor's time."""
    pw = windows()
    outcomes = []
    for i in range(150):  # two on-time sensors for 2.5 minutes, a fast one alongside
        t = T0 + i
        outcomes.append(pw.add(reading(t, 7.0, sensor="ph-1"), 3 * i, NOW))
        outcomes.append(
            pw.add(reading(t + 0.5, 50.0, parameter="BOD", sensor="bod-1"), 3 * i + 1, NOW)
        )
        outcomes.append(
            pw.add(reading(t + 240, 20.0, parameter="temperature", sensor="t-fast"), 3 * i + 2, NOW)
        )
    assert set(outcomes) == {Outcome.ADDED}
    closed = {(w.parameter, w.start): w.count for w in pw.take_closed()}
    # closed by the on-time sensors' progress (149.5 s): the first two minutes, each complete
    assert closed == {(p, T0 + m): 60 for p in ("pH", "BOD") for m in (0, 60)}
    pw.flush_idle(NOW + 1000)
    counts = {(w.parameter, w.start): w.count for w in pw.take_closed()}
    assert counts[("pH", T0 + 120)] == counts[("BOD", T0 + 120)] == 30
    assert sum(n for (p, _), n in counts.items() if p == "temperature") == 150


def test_a_reading_flagged_ahead_of_its_gateways_clock_never_moves_the_watermark():
    """The first reading of a partition may come from the fast probe: flagged by the validator
    (stale:future), it is aggregated in its own window but closes nobody's."""
    pw = windows()
    fast = reading(T0 + 240, sensor="ph-fast")
    fast.flag(Quality.UNCERTAIN, "stale:future")
    assert pw.add(fast, 0, NOW) is Outcome.ADDED
    assert pw.add(reading(T0 + 1), 1, NOW) is Outcome.ADDED
    assert pw.add(reading(T0 + 30), 2, NOW) is Outcome.ADDED
    assert pw.take_closed() == []


def test_commit_point_is_the_lowest_offset_an_open_window_needs():
    pw = windows()
    assert pw.commit_point() is None
    pw.add(reading(T0 + 1, parameter="pH"), 10, NOW)
    pw.add(reading(T0 + 2, parameter="BOD"), 11, NOW)
    pw.seen(12)  # a dead-lettered message
    assert pw.lowest_needed_offset() == 10
    assert pw.commit_point().offset == 10
    pw.add(reading(T0 + 61, parameter="BOD"), 13, NOW)  # next minute, both still within grace
    assert pw.commit_point().offset == 10
    pw.add(reading(T0 + 71, parameter="BOD"), 14, NOW)  # closes the first minute of both
    assert {w.parameter for w in pw.take_closed()} == {"pH", "BOD"}
    assert pw.commit_point().offset == 13
    pw.flush_idle(now=NOW + 31)
    assert len(pw.take_closed()) == 1
    assert pw.commit_point().offset == 15  # nothing open: everything up to the last message


def test_without_open_windows_commit_moves_past_unaggregated_messages():
    pw = windows()
    pw.seen(41)
    assert pw.commit_point().offset == 42


def _feed(pw: PartitionWindows, msgs, start=0, stop=None, now=NOW):
    for off in range(start, len(msgs) if stop is None else stop):
        pw.add(msgs[off], off, now)


def _stream(seed: int, n: int = 600) -> list[Reading]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        ts = T0 + i * 0.5 + rnd.uniform(-6, 6)  # out of order, within the 10 s grace
        out.append(reading(ts, round(rnd.uniform(6, 8), 2), parameter=rnd.choice(["pH", "BOD"])))
    return out


def _by_window(ws: list[WindowAggregate]) -> dict:
    return {(w.parameter, w.start): (w.count, w.min, w.max, w.latest, w.sum) for w in ws}


def _without_crash(msgs: list[Reading]) -> dict:
    ref = windows()
    _feed(ref, msgs)
    ref.flush_idle(NOW + 1000)
    return _by_window(ref.take_closed())


def _crash_and_replay(msgs: list[Reading], crash_at: int, commit_every: int) -> dict:
    """The windows written when the processor crashes before message ``crash_at`` and the next
    run replays from the last commit."""
    written: dict = {}
    pw = windows()
    committed = None
    for off in range(crash_at):
        pw.add(msgs[off], off, NOW)
        if off % commit_every == 0:
            written.update(_by_window(pw.take_closed()))  # written, then committed
            committed = pw.commit_point()
    # crash: uncommitted progress and open windows are lost; closed-but-unwritten ones too
    restart = windows(checkpoint=committed.metadata if committed else None)
    _feed(restart, msgs, start=committed.offset if committed else 0)
    restart.flush_idle(NOW + 1000)
    written.update(_by_window(restart.take_closed()))
    return written


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), crash_at=st.integers(1, 599), commit_every=st.integers(1, 50))
def test_replay_from_the_committed_checkpoint_rebuilds_exactly(seed, crash_at, commit_every):
    """A crash anywhere, replayed from the last commit, writes the same windows as no crash."""
    msgs = _stream(seed)
    assert _crash_and_replay(msgs, crash_at, commit_every) == _without_crash(msgs)


def _stream_with_a_fast_probe(seed: int, n: int = 600) -> list[Reading]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        sensor, ahead = rnd.choice([("ph-1", 0.0), ("ph-2", 0.0), ("ph-fast", 240.0)])
        ts = T0 + i * 0.5 + ahead + rnd.uniform(-6, 6)
        out.append(reading(ts, round(rnd.uniform(6, 8), 2), sensor=sensor))
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), crash_at=st.integers(1, 599), commit_every=st.integers(1, 50))
def test_replay_with_a_fast_probe_rebuilds_the_same_watermark(seed, crash_at, commit_every):
    """The watermark's two leading sensors travel in the checkpoint: a crash anywhere, replayed
    from the last commit, closes the same windows with the same readings as no crash."""
    msgs = _stream_with_a_fast_probe(seed)
    assert _crash_and_replay(msgs, crash_at, commit_every) == _without_crash(msgs)


def test_a_silent_sensor_leaves_the_vote_once_the_partition_is_read_to_its_end():
    pw = windows(idle_flush_seconds=30)
    pw.add(reading(T0 + 1, sensor="ph-1"), 0, now=NOW)  # then goes silent
    for i in range(5):
        pw.add(reading(T0 + 5 + 20 * i, sensor="ph-2"), 1 + i, now=NOW + 5 + 20 * i)
    assert pw.take_closed() == []  # ph-1 holds the watermark at T0 + 1
    pw.flush_idle(now=NOW + 90)  # ph-1 silent for 90 s: out; ph-2 alone sets it
    pw.add(reading(T0 + 90, sensor="ph-2"), 6, now=NOW + 90)
    assert [w.start for w in pw.take_closed()] == [T0]


def test_replayed_readings_of_written_windows_are_not_counted_as_late():
    pw = windows()
    pw.add(reading(T0 + 61), 0, NOW)  # minute 1 opens at offset 0
    pw.add(reading(T0 + 55), 1, NOW)  # minute 0, within grace
    pw.add(reading(T0 + 75), 2, NOW)  # closes minute 0 only
    (w,) = pw.take_closed()
    assert (w.start, w.count) == (T0, 1)
    cp = pw.commit_point()
    assert cp.offset == 0  # minute 1 is still open and needs offset 0
    again = windows(checkpoint=cp.metadata)
    assert again.add(reading(T0 + 61), 0, NOW) is Outcome.ADDED
    assert again.add(reading(T0 + 55), 1, NOW) is Outcome.REPLAYED  # already written
    assert again.add(reading(T0 + 75), 2, NOW) is Outcome.ADDED
    assert again.add(reading(T0 + 56), 3, NOW) is Outcome.LATE  # new message, closed window


def test_merging_partials_equals_aggregating_everything_at_once():
    rnd = random.Random(7)
    rs = [
        reading(T0 + rnd.uniform(0, 59.999), rnd.uniform(0, 14), sensor=f"s{i % 5}")
        for i in range(300)
    ]
    whole = windows()
    parts = [windows(), windows(), windows()]
    for i, r in enumerate(rs):
        whole.add(r, i, NOW)
    for i, r in enumerate(rs):
        p = parts[int(r.sensor_id[1:]) % 3]
        p.source = f"t/{int(r.sensor_id[1:]) % 3}"
        p.add(r, i, NOW)
    for p in [whole, *parts]:
        p.flush_idle(NOW + 1000)
    (all_in_one,) = whole.take_closed()
    partials = [w for p in parts for w in p.take_closed()]
    merged = merge(partials)
    assert merged == merge(reversed(partials))
    assert (merged.count, merged.min, merged.max, merged.latest, merged.latest_time) == (
        all_in_one.count,
        all_in_one.min,
        all_in_one.max,
        all_in_one.latest,
        all_in_one.latest_time,
    )
    assert merged.avg == pytest.approx(all_in_one.avg, rel=1e-12)


def test_merge_refuses_partials_of_different_windows():
    a = WindowAggregate.first(reading(T0 + 1), T0, "t/0", 60)
    b = WindowAggregate.first(reading(T0 + 61), T0 + 60, "t/1", 60)
    with pytest.raises(ValueError):
        merge([a, b])


def test_window_start_floors_to_the_minute():
    assert window_start(T0 + 59.999) == T0
    assert window_start(T0 - 0.001) == T0 - 60


def test_checkpoint_from_someone_else_is_ignored():
    pw = windows(checkpoint="not json")
    assert pw.add(reading(T0), 0, NOW) is Outcome.ADDED


# --- a reading re-sent by the gateway (at least once delivery) counts once ---------------------


def sent(ts: float, value: float, seq: int, *, gateway="gw-1", sensor="ph-1", parameter="pH"):
    r = reading(ts, value, sensor=sensor, parameter=parameter)
    r.gateway_id, r.seq = gateway, seq
    return r


def _stats(w: WindowAggregate) -> tuple:
    return (w.count, w.sum, w.min, w.max, w.avg, w.latest, w.latest_time)


def test_a_resent_reading_does_not_change_its_window():
    once, twice = windows(), windows()
    rs = [sent(T0 + 1, 7.0, 1), sent(T0 + 2, 6.5, 2), sent(T0 + 3, 8.0, 3)]
    for i, r in enumerate(rs):
        once.add(r, i, NOW)
    stream = [rs[0], rs[1], rs[1], rs[2], rs[0], rs[2]]  # re-sent after a gateway crash
    outcomes = [twice.add(sent(r.timestamp, r.value, r.seq), i, NOW) for i, r in enumerate(stream)]
    assert outcomes.count(Outcome.DUPLICATE) == 3
    for pw in (once, twice):
        pw.flush_idle(NOW + 1000)
    (a,), (b,) = once.take_closed(), twice.take_closed()
    assert _stats(b) == _stats(a) == (3, 21.5, 6.5, 8.0, 21.5 / 3, 8.0, T0 + 3)


def test_readings_without_gateway_and_seq_are_identified_by_sensor_parameter_and_time():
    pw = windows()
    assert pw.add(reading(T0 + 1.0001, 7.0), 0, NOW) is Outcome.ADDED
    assert pw.add(reading(T0 + 1.0001, 7.0), 1, NOW) is Outcome.DUPLICATE  # a replay
    assert pw.add(reading(T0 + 1.0004, 7.0), 2, NOW) is Outcome.ADDED  # the same millisecond
    assert pw.add(reading(T0 + 1.000401, 7.0), 5, NOW) is Outcome.ADDED  # ... a microsecond on
    assert pw.add(reading(T0 + 1.002, 7.0), 6, NOW) is Outcome.ADDED
    assert pw.add(reading(T0 + 1.0001, 7.0, sensor="ph-2"), 3, NOW) is Outcome.ADDED
    assert pw.add(reading(T0 + 1.0001, 7.0, parameter="BOD"), 4, NOW) is Outcome.ADDED


def test_the_same_seq_from_another_gateway_is_another_reading():
    pw = windows()
    assert pw.add(sent(T0 + 1, 7.0, 5, gateway="gw-1"), 0, NOW) is Outcome.ADDED
    assert pw.add(sent(T0 + 1, 7.0, 5, gateway="gw-2"), 1, NOW) is Outcome.ADDED
    assert pw.add(sent(T0 + 2, 7.0, 6, gateway="gw-1"), 2, NOW) is Outcome.ADDED
    assert pw.add(sent(T0 + 1, 7.0, 5, gateway="gw-2"), 3, NOW) is Outcome.DUPLICATE


def test_only_open_windows_hold_identities():
    pw = windows()
    for i in range(605):  # ten minutes, one reading a second
        pw.add(sent(T0 + i, 7.0, i), i, NOW)
        pw.take_closed()
    # the minute still within grace and the one just begun
    assert pw.open_windows == 2
    assert pw.identities == 60 + 5
    assert pw.add(sent(T0 + 30, 7.0, 30), 605, NOW) is Outcome.LATE  # its window is gone
    pw.flush_idle(NOW + 1000)
    assert pw.identities == 0


def _resent_stream(seed: int) -> list[Reading]:
    """Readings from two gateways and a foreign producer, some re-sent up to 40 messages later
    (some after their window closed), in the order a partition would hold them."""
    rnd = random.Random(seed)
    out: list[Reading] = []
    for i in range(400):
        ts = T0 + i * 0.5 + rnd.uniform(-4, 4)  # out of order, never late for the 10 s grace
        parameter = rnd.choice(["pH", "BOD"])
        value = round(rnd.uniform(6, 8), 2)
        if i % 5 == 4:
            r = reading(ts, value, parameter=parameter, sensor="foreign-1")
        else:
            r = sent(ts, value, i, gateway=f"gw-{i % 2}", parameter=parameter)
        out.append(r)
    for i in sorted(rnd.sample(range(len(out)), 80), reverse=True):
        at = min(len(out), i + rnd.randint(1, 40))
        original = out[i]
        copy = Reading(**{f: getattr(original, f) for f in Reading.__slots__})
        out.insert(at, copy)
    return out


def _distinct_windows(msgs: list[Reading]) -> dict:
    """Aggregates computed straight from the distinct readings (first copy of each)."""
    seen, out = set(), {}
    for r in msgs:
        ident = (
            (r.gateway_id, r.seq) if r.seq is not None else (r.sensor_id, round(r.timestamp * 1e6))
        )
        if (r.parameter, ident) in seen:
            continue
        seen.add((r.parameter, ident))
        key = (r.parameter, window_start(r.timestamp))
        c, s, lo, hi = out.get(key, (0, 0.0, r.value, r.value))
        out[key] = (c + 1, s + r.value, min(lo, r.value), max(hi, r.value))
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), crash_at=st.integers(1, 479), commit_every=st.integers(1, 50))
def test_replay_with_resent_readings_rebuilds_the_distinct_aggregates(seed, crash_at, commit_every):
    """Re-sent readings and a crash anywhere, replayed from the last commit: every window written
    equals the aggregate of the distinct readings it covers."""
    msgs = _resent_stream(seed)
    written = _crash_and_replay(msgs, crash_at, commit_every)
    expected = _distinct_windows(msgs)
    assert written.keys() == expected.keys()
    for key, (count, lo, hi, _latest, total) in written.items():
        e_count, e_sum, e_lo, e_hi = expected[key]
        assert (count, lo, hi) == (e_count, e_lo, e_hi), key
        assert total == pytest.approx(e_sum, rel=1e-12), key


def test_a_window_round_trips_through_the_aggregated_topic_json():
    w = WindowAggregate.first(reading(T0 + 1, 7.1), T0, "sensors.raw.north/2", 60)
    w.add(6.9, T0 + 30, "ph-2")
    back = WindowAggregate.from_dict(json.loads(json.dumps(w.to_dict())))
    assert back == w
