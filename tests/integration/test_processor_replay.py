"""Replaying a partition stores the same points: the processor's quality decisions are a function
of the partition's data, never of an instance's history or wall clock, and a rewritten point
carries the same set of fields. Real Kafka and InfluxDB.
"""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition

from gateway.common.model import Quality, Reading, format_ts, parse_ts
from tests.support.processor_harness import (
    Dataset,
    Processor,
    create_topic,
    produce,
    raw_points,
    raw_topic,
    wait_committed_to_end,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MAX_AGE = 30.0  # [validation] max_age for this run: the replay comes later than that
RESET_TO = 50  # the second run starts here, as a new owner after a rebalance would


def _points(client, cfg, data: Dataset) -> dict[tuple[str, int], dict[str, object]]:
    fields = ("value", "quality", "unit", "reasons")
    return {
        (p["sensor_id"], round(p["_time"].timestamp() * 1000)): {f: p.get(f) for f in fields}
        for p in raw_points(client, cfg, data, fields=fields)
    }


def _reset(kafka: dict[str, str], group: str, topic: str, offset: int) -> None:
    c = Consumer({"bootstrap.servers": kafka["KAFKA_BOOTSTRAP_SERVERS"], "group.id": group})
    try:
        c.commit(offsets=[TopicPartition(topic, 0, offset)], asynchronous=False)
    finally:
        c.close()


def test_replaying_a_partition_from_another_offset_later_stores_the_same_fields(
    servers, influx, tmp_path
):
    """A probe stuck at pH 7.0 (100 readings: the 60th on would be a flatline if counted from the
    first) next to a live one, one of whose readings the gateway flagged. Processed once right
    away, then again from offset 50 once every reading is older than max_age: field by field,
    the stored points are the same."""
    client, cfg = influx
    run = uuid.uuid4().hex[:8]
    plant = f"p{run}-a"
    t0 = time.time() - 10
    readings = []
    for i in range(100):
        stuck = Reading("flat-1", "pH", 7.0, "pH", t0 + i * 0.1, plant_id=plant, seq=2 * i)
        live = Reading("ph-2", "pH", 7.0 + i % 9 / 10, "pH", t0 + i * 0.1 + 0.05, plant_id=plant)
        live.seq = 2 * i + 1
        if i == 70:
            live.flag(Quality.UNCERTAIN, "status:drift")  # the gateway's own decision: kept
        for r in (stuck, live):
            r.gateway_id, r.location = f"gw-{plant}", "inlet"
            readings.append(r)
    data = Dataset(run, [plant], readings, odd_stored=0)
    topic = raw_topic(plant)
    create_topic(servers, topic, 1)
    proc = Processor(
        data, servers, servers, tmp_path, settings={"validation": {"max_age": MAX_AGE}}
    )
    try:
        produce(servers, data)
        proc.start()
        wait_committed_to_end(servers, proc.group, topic, proc)
        proc.stop_all()
        first = _points(client, cfg, data)
        assert len(first) == len(readings)

        time.sleep(max(0.0, t0 + 10 + MAX_AGE + 5 - time.time()))  # every reading is old now
        _reset(servers, proc.group, topic, RESET_TO)
        proc.start()
        wait_committed_to_end(servers, proc.group, topic, proc)
        proc.stop_all()
        second = _points(client, cfg, data)
    finally:
        proc.stop_all()
        proc.delete_topics()

    # the wire carries milliseconds: the point's time is the reading's, as sent
    replayed = {
        (r.sensor_id, round(parse_ts(format_ts(r.timestamp)) * 1000)) for r in readings[RESET_TO:]
    }
    differ = {k: (first[k], second[k]) for k in sorted(replayed) if first[k] != second[k]}
    assert differ == {}
    drift = [p for (sensor, _), p in second.items() if sensor == "ph-2" and p["reasons"]]
    assert [(p["quality"], p["reasons"]) for p in drift] == [("uncertain", "status:drift")]
