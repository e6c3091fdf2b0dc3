"""Downsampling: the late hours the processor takes over from the hourly task, what it runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.processor.provision import ROLLUP_FLUX, beyond_hourly_task, rollups, tasks
from gateway.processor.store import InfluxConfig

NOW = datetime(2026, 11, 28, 10, 30, tzinfo=UTC).timestamp()
HOUR, DAY = 3600, 86_400
TODAY = int(NOW - NOW % DAY)


def test_hours_the_hourly_task_looks_at_again_are_left_to_it():
    # the next run (11:02) re-computes 05:00 to 11:00; one hour of margin
    assert beyond_hourly_task(TODAY + 5 * HOUR, NOW)
    assert not beyond_hourly_task(TODAY + 6 * HOUR, NOW)
    assert not beyond_hourly_task(TODAY + 10 * HOUR, NOW)
    assert "6h" in tasks(InfluxConfig())[0].flux  # the lookback the rule counts on


def test_late_hours_are_rolled_up_then_their_days_once_ended():
    cfg = InfluxConfig()
    late = {("north", TODAY - HOUR), ("north", TODAY + 2 * HOUR), ("south", TODAY - 30 * HOUR)}
    runs = [
        (p["sourceBucket"], p["targetBucket"], p["plantId"], p["rangeStart"], p["rangeStop"])
        for p in rollups(cfg, late, NOW)
    ]

    def at(ts: int) -> datetime:
        return datetime.fromtimestamp(ts, UTC)

    assert runs == [
        ("sensors_1m", "sensors_1h", "north", at(TODAY - HOUR), at(TODAY)),
        ("sensors_1m", "sensors_1h", "north", at(TODAY + 2 * HOUR), at(TODAY + 3 * HOUR)),
        ("sensors_1m", "sensors_1h", "south", at(TODAY - 30 * HOUR), at(TODAY - 29 * HOUR)),
        # today has not ended: the daily task takes it after midnight
        ("sensors_1h", "sensors_1d", "north", at(TODAY - DAY), at(TODAY)),
        ("sensors_1h", "sensors_1d", "south", at(TODAY - 2 * DAY), at(TODAY - DAY)),
    ]
    assert {p["windowEvery"] for p in rollups(cfg, late, NOW)} == {
        timedelta(hours=1),
        timedelta(days=1),
    }


def test_the_rollup_flux_takes_every_value_as_a_parameter():
    assert "sensors" not in ROLLUP_FLUX and "plant-ops" not in ROLLUP_FLUX
    for name in ("sourceBucket", "targetBucket", "orgName", "plantId", "windowEvery"):
        assert name in ROLLUP_FLUX
