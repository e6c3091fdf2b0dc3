"""A line InfluxDB refuses is dead-lettered with the reason and counted, never dropped silently.
Real Kafka and InfluxDB; the refusal is a field type conflict in a bucket of the test's own.
"""

from __future__ import annotations

import dataclasses
import time
import urllib.request
import uuid

import pytest
from influxdb_client import BucketRetentionRules, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS

from gateway.common.model import Reading
from gateway.processor.aggregate import window_start
from gateway.processor.store import us
from tests.support.net import free_port
from tests.support.processor_harness import (
    Dataset,
    Processor,
    produce,
    raw_points,
    read_topic,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_readings_influxdb_refuses_go_to_the_dead_letter_topic_counted(servers, influx, tmp_path):
    client, cfg = influx
    run = uuid.uuid4().hex[:8]
    plant, bucket = f"p{run}-a", f"refused-{run}"
    created = client.buckets_api().create_bucket(
        bucket_name=bucket,
        org=cfg.org,
        retention_rules=[BucketRetentionRules(type="expire", every_seconds=86_400)],
    )
    hour = window_start(time.time(), 3600) - 3600  # one shard (1 h for a 1-day bucket)
    # Someone wrote `value` as a string there first: every float `value` in that shard is refused.
    client.write_api(write_options=SYNCHRONOUS).write(
        bucket,
        cfg.org,
        f'water_quality,plant_id={plant},sensor_id=other value="oops" {(hour + 60) * 1000}',
        write_precision=WritePrecision.MS,
    )
    # An hour earlier (another shard) the same plant's readings are fine: stored, not refused.
    fine, readings = [
        [
            Reading(
                "ph-1",
                "pH",
                7.0 + i / 100,
                "pH",
                start + 300 + i,
                plant_id=plant,
                location="inlet",
                gateway_id=f"gw-{plant}",
                seq=seq + i,
            )
            for i in range(20)
        ]
        for start, seq in ((hour - 3600, 0), (hour, 100))
    ]
    data = Dataset(run, [plant], fine + readings, odd_stored=0)
    port = free_port()
    proc = Processor(
        data, servers, servers, tmp_path, http_port=port, settings={"influxdb": {"bucket": bucket}}
    )
    try:
        produce(servers, data)
        proc.start()
        dead = read_topic(servers, proc.topics["deadletter"], len(readings), timeout=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        stored = raw_points(client, dataclasses.replace(cfg, bucket=bucket), data)
    finally:
        proc.stop_all()
        proc.delete_topics()
        client.buckets_api().delete_bucket(created)

    assert len(dead) == len(readings), proc.logs()
    for msg in dead:
        headers = dict(msg.headers())
        assert headers["reason"] == b"influx_refused"
        assert b"field type conflict" in headers["detail"]
        assert headers["bucket"] == bucket.encode()
        assert msg.value().startswith(
            f"water_quality,location=inlet,parameter=pH,plant_id={plant}".encode()
        )
    refused = sorted(int(m.value().rsplit(b" ", 1)[1]) for m in dead)
    assert refused == [us(r.timestamp) for r in readings]  # the line as written, microseconds
    assert sorted(p["value"] for p in stored) == [r.value for r in fine]
    counted = [
        ln
        for ln in metrics.splitlines()
        if ln.startswith("iot_influxdb_refused_lines_total{") and f'bucket="{bucket}"' in ln
    ]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) == len(readings), counted
