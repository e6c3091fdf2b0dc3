"""``query history --every`` against the real InfluxDB: the stored windows, merged, bad readings
left out as in the windows, and as far back as the buckets keep them (1m, then 1h, then 1d).
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import pytest

from gateway.common.metrics import Metrics
from gateway.common.model import Quality, Reading
from gateway.processor.aggregate import WindowAggregate, window_start
from gateway.processor.query import Queries
from gateway.processor.store import InfluxStore, window_line
from tests.support.processor_harness import cli, cli_config, partials_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DAY = 86_400


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@pytest.fixture
def plant(influx):
    """A plant of its own; its points are deleted from every bucket afterwards."""
    client, cfg = influx
    name = f"q{uuid.uuid4().hex[:8]}"
    yield name
    for bucket in (cfg.bucket, cfg.bucket_1m, cfg.bucket_1h, cfg.bucket_1d):
        client.delete_api().delete(
            _at(0), _at(time.time() + DAY), f'plant_id="{name}"', bucket=bucket, org=cfg.org
        )


def test_history_every_reads_the_merged_windows_without_bad_readings(
    influx, plant, tmp_path, servers
):
    client, cfg = influx
    store = InfluxStore(cfg, Metrics())
    base = window_start(time.time()) - 5 * 60
    readings = []
    for i in range(18):  # three minutes, two sensors (two partitions)
        for sensor, value in (("ph-1", 7.0 + i / 10), ("ph-2", 6.5 + i / 20)):
            r = Reading(sensor, "pH", value, "pH", base + i * 10 + 1.5, plant_id=plant)
            if (sensor, i) == ("ph-1", 3):
                r.value = 15.5
                r.flag(Quality.BAD, "out_of_range")  # stored raw, never in a window
            elif i % 4 == 0:
                r.flag(Quality.UNCERTAIN, "spike")  # uncertain ones are in the windows
            readings.append(r)
    store.write_readings(readings)
    store.write_windows(partials_of(readings))
    q = Queries(client, cfg)
    merged = {w.start: w for w in q.windows(plant, _at(base - 60), _at(base + 240))}
    assert len(merged) == 3 and sum(w.count for w in merged.values()) == 35

    rows = q.history(plant, "pH", start="-10m", every="1m")
    assert [(int(r.time.timestamp()), r.count, r.min, r.max) for r in rows] == [
        (s, w.count, w.min, w.max) for s, w in sorted(merged.items())
    ]
    assert [r.value for r in rows] == [
        pytest.approx(w.avg, rel=1e-12) for _, w in sorted(merged.items())
    ]

    pairs: dict[int, int] = {}
    for start, w in merged.items():
        pairs[window_start(start, 120)] = pairs.get(window_start(start, 120), 0) + w.count
    two = q.history(plant, "pH", start="-10m", every="2m")
    assert [(int(r.time.timestamp()), r.count) for r in two] == sorted(pairs.items())

    with_bad = q.history(plant, "pH", start="-10m", every="1m", include_bad=True)
    assert [r.count for r in with_bad] == [12, 12, 12]  # raw readings, the bad one too
    assert max(r.max for r in with_bad) == 15.5

    env = {"INFLUXDB_TOKEN": servers["INFLUXDB_TOKEN"]}
    config = cli_config(tmp_path, servers)
    args = ["query", "history", "--plant", plant, "--parameter", "pH", "--start", "-10m"]
    shown = cli(*args, "--every", "1m", "--json", "--config", config, env=env)
    assert shown.returncode == 0, shown.stderr
    assert [r["count"] for r in json.loads(shown.stdout)] == [r.count for r in rows]
    shown = cli(*args, "--every", "1m", "--include-bad", "--json", "--config", config, env=env)
    assert shown.returncode == 0, shown.stderr
    assert [r["count"] for r in json.loads(shown.stdout)] == [12, 12, 12]


def test_history_every_reaches_past_the_raw_buckets_retention(influx, plant):
    """Raw readings are kept 7 days, minute windows 30, hours a year: history goes as far."""
    client, cfg = influx
    store = InfluxStore(cfg, Metrics())
    old = window_start(time.time() - 10 * DAY, 3600) + 300  # only sensors_1m still has these
    minutes = [
        WindowAggregate(
            plant,
            "pH",
            old + 60 * m,
            10,
            70.0 + m,
            6.5,
            7.5 + m / 10,
            7.0,
            old + 60 * m + 59,
            "ph-1",
            "pH",
            f"t/{k}",
        )
        for m in range(3)
        for k in range(2)
    ]
    store.write_windows(minutes)
    older = window_start(time.time() - 40 * DAY, DAY) + 3 * 3600  # only sensors_1h has these
    hours = [
        WindowAggregate(
            plant,
            "pH",
            older + 3600 * h,
            600,
            4200.0 + h,
            6.0 - h / 10,
            8.0,
            7.0,
            older + 3600 * h + 3599,
            "ph-1",
            "pH",
            "",
            3600,
        )
        for h in range(2)
    ]
    store.write(cfg.bucket_1h, [window_line(w) for w in hours])
    q = Queries(client, cfg)

    (hour,) = q.history(plant, "pH", start="-11d", stop="-9d", every="1h")
    assert (int(hour.time.timestamp()), hour.count, hour.min, hour.max) == (
        window_start(old, 3600),
        60,
        6.5,
        7.7,
    )
    assert hour.value == pytest.approx(2 * (70.0 + 71.0 + 72.0) / 60, rel=1e-12)

    (day,) = q.history(plant, "pH", start="-41d", stop="-39d", every="1d")
    assert (int(day.time.timestamp()), day.count, day.min, day.max) == (
        window_start(older, DAY),
        1200,
        5.9,
        8.0,
    )
    assert day.value == pytest.approx((4200.0 + 4201.0) / 1200, rel=1e-12)
