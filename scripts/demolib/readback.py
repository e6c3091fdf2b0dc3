"""The demo's summary, read back from where things landed: Kafka (what each gateway produced),
InfluxDB (what the processor stored, the alerts, the predictions) and the receivers' inboxes."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from influxdb_client import InfluxDBClient


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "demo-peek"})
    md = c.list_topics(topic, timeout=10).topics.get(topic)
    out = {}
    if md is not None and md.error is None:
        for p in md.partitions:
            out[p] = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
    c.close()
    return out


def kafka_seqs(bootstrap: str, topic: str, gateway_id: str, start: dict[int, int]) -> list[int]:
    """Every seq of ``gateway_id``'s readings on ``topic`` after ``start`` (with repeats)."""
    c = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"demo-count-{gateway_id}",
         "enable.auto.commit": False}
    )  # fmt: skip
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    c.assign([TopicPartition(topic, p, start.get(p, 0)) for p in parts])
    seqs: list[int] = []
    left = {p for p in parts if ends[p] > start.get(p, 0)}
    deadline = time.monotonic() + 60
    while left and time.monotonic() < deadline:
        for m in c.consume(5000, 1.0):
            if m.error():
                continue
            d = json.loads(m.value())
            if d.get("gatewayId") == gateway_id:
                seqs.append(d["seq"])
            if m.offset() + 1 >= ends[m.partition()]:
                left.discard(m.partition())
    c.close()
    return seqs


class Influx:
    def __init__(self, env: dict[str, str], since: float) -> None:
        self.env = env
        self.since = datetime.fromtimestamp(since, UTC)

    def _query(self, flux: str, **params: Any) -> list[Any]:
        e = self.env
        with InfluxDBClient(e["INFLUXDB_URL"], e["INFLUXDB_TOKEN"], org=e["INFLUXDB_ORG"]) as c:
            tables = c.query_api().query(
                flux, params={"bucket": e["INFLUXDB_BUCKET"], "since": self.since, **params}
            )
        return [r for t in tables for r in t.records]

    def stored(self, plant: str) -> int:
        flux = """from(bucket: bucket) |> range(start: since)
  |> filter(fn: (r) => r._measurement == "water_quality" and r.plant_id == plant)
  |> filter(fn: (r) => r._field == "quality") |> group() |> count()"""
        return sum(int(r.get_value()) for r in self._query(flux, plant=plant))

    def alerts(self, plant: str) -> Counter[str]:
        """Alarm events raised (or re-raised) by level."""
        flux = """from(bucket: bucket) |> range(start: since)
  |> filter(fn: (r) => r._measurement == "alerts" and r.plant_id == plant)
  |> filter(fn: (r) => r._field == "event_id" and r.state != "cleared")
  |> group(columns: ["level"]) |> count()"""
        return Counter({r["level"]: int(r.get_value()) for r in self._query(flux, plant=plant)})

    def predictions(self, plant: str) -> list[str]:
        flux = """from(bucket: bucket) |> range(start: since)
  |> filter(fn: (r) => r._measurement == "predictions" and r.plant_id == plant)
  |> filter(fn: (r) => r._field == "prediction") |> group() |> sort(columns: ["_time"])"""
        return [str(r.get_value()) for r in self._query(flux, plant=plant)]


def collapse(seq: list[str]) -> list[str]:
    out: list[str] = []
    for x in seq:
        if not out or out[-1] != x:
            out.append(x)
    return out
