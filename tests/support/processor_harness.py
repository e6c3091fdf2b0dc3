"""Shared by the processor's integration and reliability tests: test data, processor instances as
subprocesses, and the checks that read results back from the real Kafka and InfluxDB.

Each run gets its own plants, raw topics and output topics (a random run id), so runs never see
each other's data on the shared servers. Event timestamps lie in a fixed past range of minutes, so
windows close deterministically (grace, then idle flush once the partitions are read to the end).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from influxdb_client import InfluxDBClient

from gateway.common.model import Quality, Reading, format_ts
from gateway.common.validate import DEFAULT_RANGES
from gateway.processor.aggregate import (
    PartitionWindows,
    WindowAggregate,
    aggregatable,
    window_start,
)
from gateway.processor.provision import provision
from gateway.processor.query import Queries
from gateway.processor.store import InfluxConfig
from tests.support.net import free_port
from tests.support.services import ROOT
from tests.support.wait import wait_until

SENSORS = [
    ("ph-1", "pH", "pH"),
    ("ph-2", "pH", "pH"),
    ("bod-1", "BOD", "mg/L"),
    ("bod-2", "BOD", "mg/L"),
    ("cod-1", "COD", "mg/L"),
    ("tss-1", "TSS", "mg/L"),
    ("tds-1", "TDS", "mg/L"),
    ("temp-1", "temperature", "°C"),
]


def _value(rnd: random.Random, parameter: str, i: int) -> float:
    if parameter == "pH":
        return round(9.3 if i % 997 == 0 else rnd.uniform(6.8, 7.6), 3)  # some critical highs
    if parameter == "BOD":
        return round(140.0 if i % 1499 == 0 else rnd.uniform(8, 24), 3)
    base = {"COD": (100, 200), "TSS": (40, 90), "TDS": (500, 700), "temperature": (15, 25)}
    lo, hi = base[parameter]
    return round(rnd.uniform(lo, hi), 3)


@dataclass
class Dataset:
    """What a test produces: readings per raw topic, plus payloads that are not readings."""

    run: str
    plants: list[str]
    readings: list[Reading]  # well-formed readings, in event-time order
    odd: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # topic, key, payload
    odd_stored: int = 1  # odd payloads that still make a raw point (make_dataset's "ERR" one)

    @property
    def stored_expected(self) -> int:
        """Raw points InfluxDB must hold: every reading, plus the odd ones stored (bad)."""
        return len(self.readings) + self.odd_stored

    def first_ts(self) -> float:
        return self.readings[0].timestamp


def make_dataset(
    total: int = 10_000, plants: int = 3, minutes: int = 10, seed: int = 1, *, twins: bool = False
) -> Dataset:
    """``total`` messages over ``minutes`` of event time; with ``twins``, readings come in pairs
    of one sensor within one millisecond (microsecond times), e.g. a fast probe's burst."""
    run = uuid.uuid4().hex[:8]
    names = [f"p{run}-{chr(ord('a') + k)}" for k in range(plants)]
    rnd = random.Random(seed)
    base = window_start(time.time()) - 40 * 60  # a fixed past range, well inside retention
    span = minutes * 60.0
    readings: list[Reading] = []
    used: set[tuple[str, str, float]] = set()
    n = total - 2  # two odd payloads complete the total
    for i in range(n):
        k = i // 2 if twins else i  # a twin has its partner's plant and sensor
        plant = names[k % plants]
        sensor, parameter, unit = SENSORS[(k // plants) % len(SENSORS)]
        if twins and i % 2:
            # The same millisecond as its partner (whose microseconds are 0..99), a later
            # microsecond.
            ts = (round(readings[-1].timestamp * 10**6) + rnd.randint(1, 899)) / 10**6
        else:
            # Out of order by up to 4 s (within the 10 s grace): replays must cope with readings
            # of a closed window that follow the first reading of the next one.
            ts = base + round(i * span / n + rnd.uniform(-4, 4), 3)
            if twins:
                ts = (round(ts * 1000) * 1000 + rnd.randint(0, 99)) / 10**6
        while (plant, sensor, ts) in used:  # two readings of a sensor never share a timestamp
            ts = round(ts + 0.001, 6)
        used.add((plant, sensor, ts))
        readings.append(
            Reading(
                sensor,
                parameter,
                _value(rnd, parameter, i),
                unit,
                ts,
                plant_id=plant,
                location="inlet",
                # The first two plants come through our gateway (gatewayId, seq); the third from
                # a foreign producer that sends neither.
                gateway_id="" if plant == names[-1] else f"gw-{plant}",
                seq=None if plant == names[-1] else i,
            )
        )
    out_of_range = next(r for r in readings[123:] if r.parameter == "pH")
    out_of_range.value = 15.5  # out of range: stored as bad, kept out of the windows
    odd_ts = format_ts(base + span / 2)
    string_value = {
        "sensorId": "ph-1",
        "plantId": names[0],
        "parameter": "pH",
        "value": "ERR",
        "unit": "pH",
        "timestamp": odd_ts,
        "location": "inlet",
    }
    no_sensor = {"plantId": names[1], "parameter": "pH", "value": 7.0, "timestamp": odd_ts}
    odd = [
        (raw_topic(names[0]), b"ph-1", json.dumps(string_value).encode()),
        (raw_topic(names[1]), b"", json.dumps(no_sensor).encode()),
    ]
    return Dataset(run, names, readings, odd)


def raw_topic(plant: str) -> str:
    return f"sensors.raw.{plant}"


def create_topic(kafka: dict[str, str], topic: str, partitions: int) -> None:
    """Create ``topic`` with that many partitions (before anything auto-creates it)."""
    admin = AdminClient({"bootstrap.servers": kafka["KAFKA_BOOTSTRAP_SERVERS"]})
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result(30)


def produce(
    kafka: dict[str, str],
    data: Dataset,
    *,
    seconds: float = 0.0,
    on_progress: Any = None,
    resend_every: int = 0,
    sent_at: Callable[[Reading], float] | None = None,
) -> None:
    """Produce the dataset to the raw topics, keyed by sensorId as the gateway does; paced over
    ``seconds`` when given. ``on_progress(fraction)`` is called after each chunk. ``sent_at``
    gives a reading's Kafka timestamp (the forwarding gateway's clock); by default the producer
    stamps the time it sends.

    ``resend_every``: every so many readings is sent a second time, 40 or 400 messages later, as
    a gateway does after a crash (at least once): a re-sent reading is then in its open window,
    or its window has closed meanwhile.
    """
    p = Producer(
        {
            "bootstrap.servers": kafka["KAFKA_BOOTSTRAP_SERVERS"],
            "linger.ms": 5,
            "enable.idempotence": True,
        }
    )
    headers = [("content-type", b"application/json"), ("source", b"iot-gateway")]
    msgs = [
        (
            raw_topic(r.plant_id),
            r.sensor_id.encode(),
            r.to_json(),
            round(sent_at(r) * 1000) if sent_at is not None else 0,
        )
        for r in data.readings
    ]
    if resend_every:
        for i in range(len(msgs) - 1, -1, -resend_every):  # from the end: indexes stay valid
            msgs.insert(min(len(msgs), i + (40 if i % 2 else 400)), msgs[i])
    mid = len(msgs) // 2
    msgs[mid:mid] = [(topic, key, value, 0) for topic, key, value in data.odd]
    chunks = 50
    size = math.ceil(len(msgs) / chunks)
    t0 = time.monotonic()
    for c in range(chunks):
        for topic, key, value, ts_ms in msgs[c * size : (c + 1) * size]:
            while True:
                try:
                    p.produce(topic, value, key or None, headers=headers, timestamp=ts_ms)
                    break
                except BufferError:
                    p.poll(0.05)
        p.poll(0)
        if seconds:
            p.flush(10)
            delay = t0 + seconds * (c + 1) / chunks - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if on_progress is not None:
            on_progress((c + 1) / chunks)
    assert p.flush(30) == 0, "test producer could not deliver"


@dataclass
class Processor:
    """A processor configuration for one run, and its instances as subprocesses."""

    data: Dataset
    kafka: dict[str, str]
    influx: dict[str, str]
    workdir: Path
    http_port: int = 0
    extra_config: str = ""  # more TOML, appended to the generated file
    env: dict[str, str] = field(default_factory=dict)  # more environment for the processes
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # instances the test ended on purpose (SIGTERM or SIGKILL); their exit is not a failure
    ended: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # more keys per config section, e.g. {"validation": {"max_age": 20}}
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def group(self) -> str:
        return f"edge-processor-test-{self.data.run}"

    @property
    def topics(self) -> dict[str, str]:
        r = self.data.run
        names = ("validated", "alerts", "aggregated", "deadletter", "predictions")
        return {k: f"t{r}.{k}" for k in names}

    def write_config(self, http_port: int | None = None) -> Path:
        """The run's config; with ``http_port``, a copy serving HTTP there (another instance)."""
        t = self.topics
        path = self.workdir / ("processor.toml" if http_port is None else f"http-{http_port}.toml")
        path.write_text(
            f"""
[processor]
bootstrap_servers = "{self.kafka["KAFKA_BOOTSTRAP_SERVERS"]}"
group_id = "{self.group}"
topic_pattern = '^sensors\\.raw\\.p{self.data.run}-.*'
validated_topic = "{t["validated"]}"
alerts_topic = "{t["alerts"]}"
aggregated_topic = "{t["aggregated"]}"
dead_letter_topic = "{t["deadletter"]}"
predictions_topic = "{t["predictions"]}"
grace_seconds = 10
idle_flush_seconds = 6
session_timeout_ms = 6000
metadata_refresh_ms = 2000
retry_max_seconds = 2
http_port = {self.http_port if http_port is None else http_port}

[influxdb]
url = "{self.influx["INFLUXDB_URL"]}"
org = "{self.influx.get("INFLUXDB_ORG", "plant-ops")}"
token = "env:INFLUXDB_TOKEN"
{self.extra_config}"""
        )
        text = path.read_text()
        for section, values in self.settings.items():
            head = f"[{section}]\n"
            for k, v in values.items():  # a key the template has is replaced, others added
                line = f"{k} = {json.dumps(v)}"
                if re.search(rf"^{re.escape(k)} = .*$", text, flags=re.M) and head in text:
                    text = re.sub(rf"^{re.escape(k)} = .*$", line, text, count=1, flags=re.M)
                else:
                    text = (
                        text.replace(head, head + line + "\n")
                        if head in text
                        else (text + head + line + "\n")
                    )
        path.write_text(text)
        return path

    def start(
        self, http_port: int | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Another instance; ``http_port`` serves its HTTP elsewhere than the run's, ``env`` adds
        to its environment."""
        config = self.workdir / "processor.toml"
        if http_port is not None:
            config = self.write_config(http_port)
        elif not config.exists():
            self.write_config()
        n = len(self.procs)
        log = (self.workdir / f"processor-{n}.log").open("wb")
        env = {
            **os.environ,
            "INFLUXDB_TOKEN": self.influx["INFLUXDB_TOKEN"],
            **self.env,
            **(env or {}),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "processor", "run", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        self.ended.append(proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Ends one instance as systemd would (SIGTERM); it drains and leaves the group."""
        self.ended.append(proc)
        proc.terminate()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def delete_topics(self) -> None:
        """Remove the run's topics, so later processors subscribed to sensors.raw.* never see
        test plants."""
        admin = AdminClient({"bootstrap.servers": self.kafka["KAFKA_BOOTSTRAP_SERVERS"]})
        names = [raw_topic(p) for p in self.data.plants] + list(self.topics.values())
        existing = set(admin.list_topics(timeout=10).topics)
        doomed = [t for t in names if t in existing]
        for future in admin.delete_topics(doomed, operation_timeout=30).values():
            future.result()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.workdir.glob("processor-*.log"))
        )


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``edge-gateway ARGS`` as a user runs it, with ``env`` added to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def cli_config(workdir: Path, influx: dict[str, str]) -> str:
    """A config file with only the [influxdb] section, for the query and setup commands."""
    path = workdir / "config.toml"
    path.write_text(
        f'[influxdb]\nurl = "{influx["INFLUXDB_URL"]}"\norg = "{influx["INFLUXDB_ORG"]}"\n'
        'token = "env:INFLUXDB_TOKEN"\n'
    )
    return str(path)


def partials_of(readings: list[Reading]) -> list[WindowAggregate]:
    """The closed partial windows the processor would write for these readings, each sensor's on
    a partition of its own."""
    sensors = sorted({r.sensor_id for r in readings})
    parts = {s: PartitionWindows(f"t/{k}") for k, s in enumerate(sensors)}
    for offset, r in enumerate(readings):
        parts[r.sensor_id].add(r, offset, time.time())
    out = []
    for pw in parts.values():
        pw.flush_idle(time.time() + 3600)
        out.extend(pw.take_closed())
    return out


# --- reading results back --------------------------------------------------------------------


def influx_config(influx: dict[str, str]) -> InfluxConfig:
    return InfluxConfig(
        url=influx["INFLUXDB_URL"],
        org=influx.get("INFLUXDB_ORG", "plant-ops"),
        token=influx["INFLUXDB_TOKEN"],
        timeout_seconds=60,  # checks read whole runs back from a server the tests keep busy
    )


def ensure_buckets(influx: dict[str, str]) -> None:
    cfg = influx_config(influx)
    with cfg.client() as client:
        provision(client, cfg)


def _range(data: Dataset) -> tuple[datetime, datetime]:
    t = data.first_ts()
    return (datetime.fromtimestamp(t - 3600, UTC), datetime.fromtimestamp(t + 3 * 3600, UTC))


def raw_points(
    client: InfluxDBClient,
    cfg: InfluxConfig,
    data: Dataset,
    fields: tuple[str, ...] = ("value", "quality"),
) -> list[dict[str, Any]]:
    """Every stored raw point of the run's plants: one row per point with these fields."""
    start, stop = _range(data)
    flux = """from(bucket: bucketName)
  |> range(start: rangeStart, stop: rangeStop)
  |> filter(fn: (r) => r._measurement == "water_quality")
  |> filter(fn: (r) => contains(value: r.plant_id, set: plants))
  |> filter(fn: (r) => contains(value: r._field, set: fields))
  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")"""
    params = {
        "bucketName": cfg.bucket,
        "rangeStart": start,
        "rangeStop": stop,
        "plants": data.plants,
        "fields": list(fields),
    }
    tables = client.query_api().query(flux, org=cfg.org, params=params)
    return [rec.values for t in tables for rec in t.records]


def windows_from_raw(points: list[dict[str, Any]]) -> dict[tuple[str, str, int], WindowAggregate]:
    """The 1-minute aggregates computed directly from stored raw readings (bad ones left out)."""
    out: dict[tuple[str, str, int], WindowAggregate] = {}
    for p in sorted(points, key=lambda p: (p["_time"], p["sensor_id"])):
        r = Reading(
            p["sensor_id"],
            p["parameter"],
            p.get("value"),
            "",
            p["_time"].timestamp(),
            plant_id=p["plant_id"],
            quality=Quality(p["quality"]),
        )
        if not aggregatable(r):
            continue
        assert r.value is not None
        key = (r.plant_id, r.parameter, window_start(r.timestamp))
        if key not in out:
            out[key] = WindowAggregate.first(r, key[2], "raw", 60)
        else:
            out[key].add(r.value, r.timestamp, r.sensor_id)
    return out


def stored_windows(
    client: InfluxDBClient, cfg: InfluxConfig, data: Dataset
) -> dict[tuple[str, str, int], WindowAggregate]:
    start, stop = _range(data)
    q = Queries(client, cfg)
    return {
        (w.plant_id, w.parameter, w.start): w
        for plant in data.plants
        for w in q.windows(plant, start, stop)
    }


def expected_aggregatable(data: Dataset) -> int:
    def in_range(r: Reading) -> bool:
        low, high = DEFAULT_RANGES[r.parameter]
        return r.value is not None and low <= r.value <= high

    return sum(1 for r in data.readings if in_range(r))


def wait_until_done(
    client: InfluxDBClient,
    cfg: InfluxConfig,
    data: Dataset,
    proc: Processor,
    timeout: float = 120.0,
) -> None:
    """Until every raw point is stored and every window is closed and written."""
    want_raw, want_agg = data.stored_expected, expected_aggregatable(data)
    deadline = time.monotonic() + timeout
    raw = agg = -1
    while time.monotonic() < deadline:
        try:
            raw = len(raw_points(client, cfg, data))
            agg = sum(w.count for w in stored_windows(client, cfg, data).values())
        except Exception:  # InfluxDB restarting
            raw = agg = -1
        if raw == want_raw and agg == want_agg:
            return
        for p in proc.procs:
            if p not in proc.ended and p.poll() is not None:
                raise AssertionError(f"a processor exited ({p.returncode}):\n{proc.logs()}")
        time.sleep(1.0)
    raise AssertionError(
        f"not done after {timeout} s: raw {raw}/{want_raw}, aggregated {agg}/{want_agg}\n"
        + proc.logs()
    )


def assert_windows_match_raw(client: InfluxDBClient, cfg: InfluxConfig, data: Dataset) -> int:
    """Every stored 1-minute aggregate equals the one computed from the stored raw readings."""
    expected = windows_from_raw(raw_points(client, cfg, data))
    got = stored_windows(client, cfg, data)
    assert got.keys() == expected.keys()
    for key, w in got.items():
        e = expected[key]
        assert (w.count, w.min, w.max, w.latest, w.latest_time) == (
            e.count,
            e.min,
            e.max,
            e.latest,
            e.latest_time,
        ), key
        assert w.avg == pytest_approx(e.avg), key
    return len(got)


def pytest_approx(v: float) -> Any:
    import pytest

    return pytest.approx(v, rel=1e-12, abs=1e-12)


def committed_offsets(kafka: dict[str, str], group: str, topic: str) -> dict[int, tuple[int, int]]:
    """Per partition of ``topic``: the group's committed offset and the partition's end."""
    c = Consumer({"bootstrap.servers": kafka["KAFKA_BOOTSTRAP_SERVERS"], "group.id": group})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in parts]
        return {
            tp.partition: (tp.offset, c.get_watermark_offsets(tp, timeout=10)[1])
            for tp in c.committed(tps, timeout=10)
        }
    finally:
        c.close()


def wait_committed_to_end(
    kafka: dict[str, str], group: str, topic: str, proc: Processor, timeout: float = 90.0
) -> None:
    """Until the group has committed every partition of ``topic`` up to its end (everything read,
    stored and its windows closed)."""
    deadline = time.monotonic() + timeout
    offsets: dict[int, tuple[int, int]] = {}
    while time.monotonic() < deadline:
        offsets = committed_offsets(kafka, group, topic)
        if offsets and all(committed == end for committed, end in offsets.values()):
            return
        time.sleep(1.0)
    raise AssertionError(f"{group} not committed to the end of {topic}: {offsets}\n{proc.logs()}")


def read_topic(
    kafka: dict[str, str], topic: str, expect_at_least: int, timeout: float = 30.0
) -> list[Any]:
    """All messages of a topic (from the beginning), once at least ``expect_at_least`` came."""
    c = Consumer(
        {
            "bootstrap.servers": kafka["KAFKA_BOOTSTRAP_SERVERS"],
            "group.id": f"check-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    c.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for m in c.consume(5000, 1.0):
                if m.error() is None:
                    out.append(m)
            if len(out) >= expect_at_least:
                # drain what is left
                more = c.consume(5000, 2.0)
                out.extend(m for m in more if m.error() is None)
                if not more:
                    break
    finally:
        c.close()
    return out


# --- the live feed ---------------------------------------------------------------------------


def live_dataset(*names: str) -> Dataset:
    """A run with these plants and no readings yet: live tests send theirs as they go."""
    run = uuid.uuid4().hex[:8]
    return Dataset(run, [f"p{run}-{n}" for n in names], [])


class RawProducer:
    """Sends readings to their plants' raw topics at once, as a gateway's forwarder does."""

    def __init__(self, kafka: dict[str, str]) -> None:
        self._p = Producer({"bootstrap.servers": kafka["KAFKA_BOOTSTRAP_SERVERS"], "linger.ms": 0})

    def send(self, readings: list[Reading]) -> None:
        headers = [("content-type", b"application/json"), ("source", b"iot-gateway")]
        for r in readings:
            topic, key = raw_topic(r.plant_id), r.sensor_id.encode()
            while True:
                try:
                    self._p.produce(topic, r.to_json(), key, headers=headers)
                    break
                except BufferError:
                    self._p.poll(0.05)
        assert self._p.flush(30) == 0, "test producer could not deliver"


@contextlib.contextmanager
def live_processor(
    servers: dict[str, str], workdir: Path, *plants: str
) -> Iterator[tuple[Processor, str]]:
    """A processor serving HTTP (the live feed, the page) for a run with these plants, and its
    base URL; stopped and its topics deleted afterwards."""
    proc = Processor(live_dataset(*plants), servers, servers, workdir, http_port=free_port())
    proc.start()
    try:
        yield proc, wait_serving(proc)
    finally:
        proc.stop_all()
        proc.delete_topics()


def wait_serving(proc: Processor, timeout: float = 60.0) -> str:
    """Until the processor's HTTP server answers /health; its base URL."""
    base = f"http://127.0.0.1:{proc.http_port}"

    def answers() -> bool:
        for p in proc.procs:
            if p.poll() is not None:
                raise AssertionError(f"processor exited ({p.returncode}):\n{proc.logs()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5):
                return True
        except urllib.error.HTTPError:
            return True  # 503 while Kafka or InfluxDB are checked: it serves
        except OSError:
            return False

    wait_until(answers, timeout, "the processor's HTTP server")
    return base
