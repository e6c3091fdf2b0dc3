"""Shared by the daemon's integration and reliability tests: the gateway as a real subprocess
(``python -m gateway run``), simulated probes on a pty, a config written to tmp_path, a Kafka
collector and a QoS 1 MQTT publisher that knows which publishes the broker acknowledged.

Every run uses its own gateway id, plant and MQTT topics (a random run id), so runs never see each
other's data on the shared servers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from gateway.common.model import format_ts
from tests.support.services import ROOT
from tests.support.wait import wait_settled, wait_until

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
# The three probes of the end-to-end and crash tests, all on one pty: the UV254 probe's BOD reads
# 150 mg/L, above the default critical limit (100), so it raises an alarm.
PROBES = [
    ("drivers/ph-int16.toml", 1, "ph-1", "pH"),
    ("drivers/uv254-optical.toml", 2, "uv-1", "BOD"),
    ("drivers/conductivity-tds.toml", 3, "cond-1", "TDS"),
]


def run_id() -> str:
    return uuid.uuid4().hex[:10]


# --- config --------------------------------------------------------------------------------------


def _key(k: str) -> str:
    """A bare key where TOML allows one; quoted otherwise (``"message.max.bytes"``)."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML for {v!r}")


def _is_tables(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def toml_dumps(doc: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for a gateway config: tables, arrays of tables, scalars, lists, inline tables
    (a dict inside a list or a dict value whose name ends in ``_inline``)."""
    lines: list[str] = []
    nested: list[tuple[str, Any]] = []
    for k, v in doc.items():
        if isinstance(v, dict) or _is_tables(v):
            nested.append((k, v))
        else:
            lines.append(f"{_key(k)} = {_toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in nested:
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out += f"\n[{name}]\n" + toml_dumps(v, name)
        else:
            for item in v:
                out += f"\n[[{name}]]\n" + toml_dumps(item, name)
    return out


@dataclass
class GatewaySetup:
    """What a test's gateway is: its identity, its files and what it talks to."""

    tmp: Path
    kafka: str  # bootstrap servers
    run: str = field(default_factory=run_id)
    pty: str | None = None  # the gateway's end of the pty pair, None for no Modbus
    probes: list[tuple[str, int, str, str]] = field(default_factory=lambda: list(PROBES))
    interval: float = 0.5  # seconds between polls of each probe
    mqtt: dict[str, str] | None = None  # mqtt_env, None for no MQTT
    buffer: dict[str, Any] = field(default_factory=dict)  # extra [buffer] keys
    extra: dict[str, Any] = field(default_factory=dict)  # more sections / keys

    @property
    def gateway_id(self) -> str:
        return f"gw-{self.run}"

    @property
    def plant(self) -> str:
        return f"p{self.run}"

    @property
    def raw_topic(self) -> str:
        return f"sensors.raw.{self.plant}"

    @property
    def buffer_path(self) -> Path:
        return self.tmp / "buffer.db"

    @property
    def mqtt_client_id(self) -> str:
        return f"edge-gateway-{self.gateway_id}"

    def number_topic(self, sensor: str, parameter: str) -> str:
        return f"t/{self.run}/num/{self.plant}/{sensor}/{parameter}"

    def json_topic(self, sensor: str) -> str:
        return f"t/{self.run}/json/{sensor}"

    def config(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "gateway": {"id": self.gateway_id, "plant_id": self.plant, "location": "test"},
            "buffer": {"path": str(self.buffer_path), **self.buffer},
            "deadletter": {"path": str(self.tmp / "deadletter.db")},
            "calibration": {"store": str(self.tmp / "calibrations.sqlite")},
            "kafka": {"bootstrap_servers": self.kafka, "linger_ms": 5},
            "http": {"host": "127.0.0.1", "port": 0},
        }
        if self.pty is not None:
            slaves = [
                {
                    "profile": str(ROOT / profile),
                    "unit": unit,
                    "sensor_id": sensor,
                    "plant_id": self.plant,
                    "location": "test",
                    "interval": self.interval,
                }
                for profile, unit, sensor, _ in self.probes
            ]
            doc["modbus"] = {"serial": [{"port": self.pty, "timeout": 0.5, "slaves": slaves}]}
        if self.mqtt is not None:
            env = self.mqtt
            doc["mqtt"] = {
                "enabled": True,
                "host": env["MQTT_HOST"],
                "port": int(env["MQTT_PORT"]),
                "username": env["MQTT_USERNAME"],
                "password": "env:MQTT_PASSWORD",
                "client_id": self.mqtt_client_id,
                "session_expiry": 600,
                "reconnect_max_delay": 2,
                "subscriptions": [
                    {
                        "topic": f"t/{self.run}/num/+/+/+",
                        "format": "number",
                        "pattern": f"t/{self.run}/num/{{plantId}}/{{sensorId}}/{{parameter}}",
                        "unit": "mg/L",
                    },
                    {"topic": f"t/{self.run}/json/#", "format": "json", "plant_id": self.plant},
                ],
            }
        for section, keys in self.extra.items():
            doc.setdefault(section, {}).update(keys)
        return doc

    def write(self, name: str = "gateway.toml") -> Path:
        path = self.tmp / name
        path.write_text(toml_dumps(self.config()))
        return path


# --- processes -----------------------------------------------------------------------------------


class Simulator:
    """``edge-gateway simulate`` serving probes on one end of a pty pair, as a subprocess."""

    def __init__(self, pty: str, probes: Iterable[tuple[str, int, str, str]], *args: str) -> None:
        slaves = [a for profile, unit, _, _ in probes for a in ("--slave", f"{profile}:{unit}")]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "simulate", "--port", pty, *slaves, *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        if "serving units" not in line:
            self.stop()
            raise AssertionError(f"simulator did not start: {line!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_HTTP_LINE = re.compile(r"HTTP server on [\d.]+:(\d+)")


class Gateway:
    """One ``python -m gateway run --config FILE`` process; each start logs to its own file."""

    def __init__(self, config: Path, logs: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.logs = logs
        self.env = {**ENV, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.port = 0
        logs.mkdir(parents=True, exist_ok=True)

    @property
    def log_path(self) -> Path:
        return self.logs / f"run-{self.starts}.log"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        self.port = 0
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--config", str(self.config)],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))

    def _http_port(self) -> int:
        if not self.port:
            ports = _HTTP_LINE.findall(self.log())  # the last: a reload serves on a new port 0
            self.port = int(ports[-1]) if ports else 0
        return self.port

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Until the HTTP server answers; fails at once if the process exits."""

        def serving() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.log()}")
            return bool(self._http_port()) and self.get("/health") is not None

        wait_until(serving, timeout, "the gateway's HTTP server")

    def get(self, path: str) -> tuple[int, bytes] | None:
        """(status, body) of a GET, or None if nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (OSError, urllib.error.URLError):
            return None

    def health(self) -> tuple[int, dict[str, Any]]:
        answer = self.get("/health")
        assert answer is not None, "no answer from /health"
        return answer[0], json.loads(answer[1])

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Samples by name: [(labels, value)]."""
        answer = self.get("/metrics")
        assert answer is not None and answer[0] == 200, answer
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(answer[1].decode()):
            for s in family.samples:
                out.setdefault(s.name, []).append((s.labels, s.value))
        return out

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(
            v
            for ls, v in self.metrics().get(name, [])
            if all(ls.get(k) == x for k, x in labels.items())
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM; the exit code (raises if it does not exit within ``timeout``)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def buffer_state(path: Path) -> tuple[int, list[int]]:
    """(the seq last committed, ids of the rows still buffered) of a gateway's buffer file, read
    without writing to it (the gateway must not be running, or must be between commits)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        seq = con.execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()[0]
        ids = [r[0] for r in con.execute("SELECT id FROM records ORDER BY id")]
        return seq, ids
    finally:
        con.close()


# --- Kafka ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    topic: str
    key: str
    headers: dict[str, str]
    value: dict[str, Any]
    raw: bytes


def _bytes(b: str | bytes | None) -> bytes:
    return b.encode() if isinstance(b, str) else (b or b"")


class KafkaCollector:
    """Reads topics into ``messages`` in a background thread, from where they end at start (a
    topic that does not exist yet is created, with the broker's default of 3 partitions)."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.bootstrap = bootstrap
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"test-daemon-{run_id()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        self._consumer.assign(self._start_positions(topics))
        self._thread = threading.Thread(target=self._run, name="kafka-collector", daemon=True)
        self._thread.start()

    def _start_positions(self, topics: list[str]) -> list[TopicPartition]:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        known = admin.list_topics(timeout=30).topics
        missing = [t for t in topics if t not in known]
        positions = [TopicPartition(t, p, OFFSET_BEGINNING) for t in missing for p in range(3)]
        if missing:
            for future in admin.create_topics([NewTopic(t, 3, 1) for t in missing]).values():
                try:
                    future.result(30)
                except KafkaException as e:
                    if "already exists" not in str(e).lower():
                        raise

        def end(tp: TopicPartition) -> list[int]:
            try:
                return [self._consumer.get_watermark_offsets(tp, 10)[1]]
            except KafkaException:  # e.g. the partition's leader is being elected
                return []

        for topic in (t for t in topics if t not in missing):
            for p in sorted(known[topic].partitions):
                tp = TopicPartition(topic, p)
                (high,) = wait_until(partial(end, tp), 60, f"the end of {topic}/{p}")
                positions.append(TopicPartition(topic, p, high))
        return positions

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self._consumer.consume(1000, timeout=0.2):
                if msg.error() is not None:
                    continue
                raw = _bytes(msg.value())
                headers: Any = msg.headers() or []
                got = Received(
                    topic=str(msg.topic()),
                    key=_bytes(msg.key()).decode(),
                    headers={k: _bytes(v).decode() for k, v in headers},
                    value=json.loads(raw),
                    raw=raw,
                )
                with self._lock:
                    self.messages.append(got)

    def snapshot(self, topic: str | None = None, gateway_id: str | None = None) -> list[Received]:
        with self._lock:
            msgs = list(self.messages)
        return [
            m
            for m in msgs
            if (topic is None or m.topic == topic)
            and (gateway_id is None or m.value.get("gatewayId") == gateway_id)
        ]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._consumer.close()

    def __enter__(self) -> KafkaCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- MQTT ----------------------------------------------------------------------------------------


def _published(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether the broker acknowledged the publish; one paho refused to queue (not connected at
    the time: the device knows it failed) never was."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False


class Publisher:
    """A QoS 1 MQTT v5 publisher that records which publishes the broker accepted (PUBACK with a
    success reason code)."""

    def __init__(self, env: dict[str, str]) -> None:
        self._sent: list[tuple[Any, mqtt.MQTTMessageInfo]] = []
        self._refused: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{run_id()}", protocol=mqtt.MQTTv5
        )
        c.username_pw_set(env["MQTT_USERNAME"], env["MQTT_PASSWORD"])
        c.max_inflight_messages_set(1000)
        c.on_publish = self._on_publish
        connected = threading.Event()
        c.on_connect = lambda *_: connected.set()
        c.connect(env["MQTT_HOST"], int(env["MQTT_PORT"]))
        c.loop_start()
        if not connected.wait(30):
            raise AssertionError("the test publisher could not connect to Mosquitto")
        self.client = c

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            with self._lock:
                self._refused.add(mid)

    def publish(self, topic: str, payload: bytes, ident: Any) -> None:
        info = self.client.publish(topic, payload, qos=1)
        with self._lock:
            self._sent.append((ident, info))

    def sent(self) -> list[Any]:
        with self._lock:
            return [ident for ident, _ in self._sent]

    def acknowledged(self) -> list[Any]:
        """Identities of the publishes the broker acknowledged as accepted."""
        with self._lock:
            return [
                ident
                for ident, info in self._sent
                if _published(info) and info.mid not in self._refused
            ]

    def wait_all_acknowledged(self, timeout: float = 60.0) -> None:
        wait_until(lambda: len(self.acknowledged()) == len(self.sent()), timeout, "broker PUBACKs")

    def run_steadily(self, rate: float, message: Callable[[int], tuple[str, bytes, Any]]) -> None:
        """Publish ``message(n)`` for n = 0, 1, ... at ``rate`` per second until ``stop()``."""

        def loop() -> None:
            n, start = 0, time.monotonic()
            while not self._stop.is_set():
                self.publish(*message(n))
                n += 1
                self._stop.wait(max(0.0, start + n / rate - time.monotonic()))

        self._thread = threading.Thread(target=loop, name="mqtt-publisher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def close(self) -> None:
        self.stop()
        self.client.disconnect()
        self.client.loop_stop()


def numbered_message(setup: GatewaySetup, n: int, sensors: int) -> tuple[str, bytes, int]:
    """The n-th publish of a test's MQTT device: a flow reading of sensor ``mq-<n % sensors>``
    whose value is ``n`` (its identity), as (topic, payload, n)."""
    sensor = f"mq-{n % sensors}"
    reading = {
        "sensorId": sensor,
        "parameter": "flow_rate",
        "value": n,
        "unit": "m3/h",
        "timestamp": format_ts(time.time()),
    }
    return setup.json_topic(sensor), json.dumps(reading).encode(), n


# --- what the gateway committed ------------------------------------------------------------------


def init_buffer(path: Path, gateway_id: str) -> int:
    """Create a gateway's buffer file before its first start; returns its starting seq, so a test
    knows the first seq the gateway will commit (the next one)."""
    from gateway.common.metrics import Metrics
    from gateway.edge.buffer import Buffer, BufferConfig

    with Buffer(BufferConfig(path=str(path)), gateway_id, Metrics()):
        pass
    return buffer_state(path)[0]


def kafka_seqs(collector: KafkaCollector, gateway_id: str) -> set[int]:
    return {m.value["seq"] for m in collector.snapshot(gateway_id=gateway_id)}


def wait_all_in_kafka(collector: KafkaCollector, gateway_id: str, seqs: set[int]) -> None:
    """Until every one of ``seqs`` has arrived (or nothing more arrives: the caller's assertions
    then name what is missing)."""
    wait_settled(
        lambda: len(kafka_seqs(collector, gateway_id)),
        lambda: seqs <= kafka_seqs(collector, gateway_id),
        300,
        "every committed seq in Kafka",
    )


def _forwarded(buffer_path: Path, ids: set[int]) -> bool:
    return not ids & set(buffer_state(buffer_path)[1])


def stop_and_settle(gw: Gateway, buffer_path: Path, tries: int = 3) -> int:
    """SIGTERM (exit code 0 required); if rows were left buffered, start again until they are
    forwarded and stop again. Returns the seq last committed."""
    for _ in range(tries):
        rc = gw.terminate()
        assert rc == 0, f"gateway exited {rc} on SIGTERM:\n{gw.log()[-3000:]}"
        last, left = buffer_state(buffer_path)
        if not left:
            return last
        gw.start()
        gw.wait_serving()
        wait_until(partial(_forwarded, buffer_path, set(left)), 120, "the rows left forwarded")
    raise AssertionError(f"rows still buffered after {tries} clean stops")
