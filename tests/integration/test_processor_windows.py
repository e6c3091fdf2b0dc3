"""The processor's 1-minute windows against the real Kafka and InfluxDB, where clocks go wrong
and data comes late.

A probe whose clock runs ahead must not close the other sensors' windows; windows written hours
late still reach the hourly and daily buckets.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from datetime import UTC, datetime

import pytest

from gateway.common.model import Reading
from gateway.processor.aggregate import merge, window_start
from gateway.processor.query import Queries
from tests.support.processor_harness import (
    Dataset,
    Processor,
    assert_windows_match_raw,
    create_topic,
    produce,
    raw_points,
    raw_topic,
    wait_until_done,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

FAST = 240.0  # seconds the fast probe's clock is ahead
DAY = 86_400


def test_a_probe_240_s_fast_leaves_the_plants_other_windows_complete(servers, influx, tmp_path):
    """Three probes of one plant on one partition for three minutes; the temperature probe's clock
    is 240 s fast (within max_future, so its readings are stored and aggregated). Every window
    still holds every reading, and the fast probe's readings are flagged."""
    client, cfg = influx
    run = uuid.uuid4().hex[:8]
    plant = f"p{run}-a"
    base = window_start(time.time()) - 40 * 60
    readings = []
    for i in range(180):
        t = base + i + 0.25
        for k, (sensor, parameter, unit, value, dt) in enumerate(
            [
                ("ph-1", "pH", "pH", 7.0 + (i % 7) / 10, 0.0),
                ("bod-1", "BOD", "mg/L", 10.0 + i % 5, 0.1),
                ("temp-fast", "temperature", "°C", 20.0 + i % 3, FAST),
            ]
        ):
            readings.append(
                Reading(
                    sensor,
                    parameter,
                    value,
                    unit,
                    t + dt,
                    plant_id=plant,
                    location="inlet",
                    gateway_id=f"gw-{plant}",
                    seq=3 * i + k,
                )
            )
    data = Dataset(run, [plant], readings, odd_stored=0)
    create_topic(servers, raw_topic(plant), 1)  # the fast probe shares the others' partition

    def gateway_clock(r: Reading) -> float:
        """The gateway forwards each reading as it takes it: its clock is the on-time one."""
        return r.timestamp - (FAST if r.sensor_id == "temp-fast" else 0.0) + 0.05

    proc = Processor(data, servers, servers, tmp_path)
    try:
        produce(servers, data, sent_at=gateway_clock)
        proc.start()
        wait_until_done(client, cfg, data, proc, timeout=90)
        assert_windows_match_raw(client, cfg, data)
        points = raw_points(client, cfg, data, fields=("quality", "reasons"))
        flagged = {
            p["sensor_id"] for p in points if "stale:future" in str(p.get("reasons", "")).split(",")
        }
        assert flagged == {"temp-fast"}
        assert {p["quality"] for p in points if p["sensor_id"] == "temp-fast"} == {"uncertain"}
    finally:
        proc.stop_all()
        proc.delete_topics()


def _rolled_up(client, cfg, plant: str, start: int, seconds: int, bucket: str) -> dict:
    q = Queries(client, cfg)
    found = q.windows(plant, _at(start), _at(start + seconds), bucket=bucket)
    return {w.parameter: w for w in found if w.start == start}


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def test_a_batch_8_hours_late_reaches_the_hourly_and_daily_buckets(servers, influx, tmp_path):
    """A gateway back after 8 hours offline: its readings' minute windows are written long after
    the hourly task stopped looking at their hour (it looks back 6 h). The hour, and its day, are
    downsampled anyway, and agree with the minute windows."""
    client, cfg = influx
    now = time.time()
    # 8 hours late at least, in a day that has ended (the daily bucket holds whole days only)
    hour = min(window_start(now - 8 * 3600, 3600), window_start(now, DAY) - 3600)
    day = window_start(hour, DAY)
    run = uuid.uuid4().hex[:8]
    plant = f"p{run}-a"
    readings = [
        Reading(
            sensor,
            parameter,
            value + (i % 11) / 10,
            unit,
            hour + 300 + i * 2 + k * 0.3,
            plant_id=plant,
            location="inlet",
            gateway_id=f"gw-{plant}",
            seq=3 * i + k,
        )
        for i in range(120)  # four minutes, three probes on three partitions
        for k, (sensor, parameter, unit, value) in enumerate(
            [
                ("ph-1", "pH", "pH", 7.0),
                ("bod-1", "BOD", "mg/L", 12.0),
                ("cod-1", "COD", "mg/L", 150.0),
            ]
        )
    ]
    data = Dataset(run, [plant], readings, odd_stored=0)
    proc = Processor(data, servers, servers, tmp_path)
    try:
        produce(servers, data)
        proc.start()
        wait_until_done(client, cfg, data, proc)
        minutes = Queries(client, cfg).windows(plant, _at(hour), _at(hour + 3600))
        expected = {}
        for parameter in {w.parameter for w in minutes}:
            parts = [w for w in minutes if w.parameter == parameter]
            expected[parameter] = merge(
                [dataclasses.replace(w, start=hour, source=str(i)) for i, w in enumerate(parts)]
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            hourly = _rolled_up(client, cfg, plant, hour, 3600, cfg.bucket_1h)
            daily = _rolled_up(client, cfg, plant, day, DAY, cfg.bucket_1d)
            if hourly.keys() == daily.keys() == expected.keys():
                break
            time.sleep(1.0)
        assert hourly.keys() == expected.keys(), (hourly, proc.logs())
        assert daily.keys() == expected.keys(), daily
        for parameter, e in expected.items():
            for got in (hourly[parameter], daily[parameter]):
                assert (got.count, got.min, got.max, got.latest, got.latest_time) == (
                    e.count,
                    e.min,
                    e.max,
                    e.latest,
                    e.latest_time,
                ), parameter
                assert got.sum == pytest.approx(e.sum, rel=1e-12)
    finally:
        proc.stop_all()
        proc.delete_topics()
        for bucket in (cfg.bucket_1h, cfg.bucket_1d):  # a test plant does not stay forever
            client.delete_api().delete(
                _at(day), _at(day + DAY), f'plant_id="{plant}"', bucket=bucket, org=cfg.org
            )
