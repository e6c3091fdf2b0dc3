"""The processor's 1-minute windows against the real Kafka and InfluxDB, where clocks go wrong.

A probe whose clock runs ahead must not close the other sensors' windows.
"""

from __future__ import annotations

import time
import uuid

import pytest

from gateway.common.model import Reading
from gateway.processor.aggregate import window_start
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
