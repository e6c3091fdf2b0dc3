"""A simulated plant, end to end: probes on an RS-485 bus and Modbus TCP, an MQTT device, the
edge gateway, Kafka, the processor and InfluxDB. Run through ``scripts/demo``.

Everything it starts lives under var/demo/<run>/ and is stopped when it ends (Ctrl-C included).
With --duration it ends by itself and prints a summary read back from Kafka and InfluxDB; it exits
non-zero when a reading the gateway committed is missing from storage, or no alarm was raised.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from confluent_kafka import Consumer, TopicPartition
from influxdb_client import InfluxDBClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.support, shared with the tests and the bench

from tests.support.net import free_port  # noqa: E402
from tests.support.services import read_env  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402

EXE = [sys.executable, "-m", "gateway"]
PROBES = [  # (profile, unit, sensor id, location) on the simulated RS-485 bus
    ("ph-int16.toml", 1, "ph-aeration-1", "aeration-1"),
    ("uv254-optical.toml", 2, "uv-influent-1", "influent"),
    ("conductivity-tds.toml", 3, "cond-effluent-1", "effluent"),
    ("sonde-float32-cdab.toml", 4, "sonde-basin-1", "basin-1"),
]


class Plant:
    """Starts and stops every process of the demo; keeps their logs in the run directory."""

    def __init__(self, run_dir: Path, env: dict[str, str], plant: str, gateway_id: str) -> None:
        self.dir = run_dir
        self.env = env
        self.plant = plant
        self.gateway_id = gateway_id
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.http_port = free_port()
        self.processor_port = free_port()
        self.flow_port = free_port()

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.dir / f"{name}.log").open("ab")
        child_env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        p = subprocess.Popen(
            list(args),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=self.dir,
            start_new_session=True,  # Ctrl-C reaches the demo only; it stops the rest in order
        )
        self.procs[name] = p
        return p

    def stop(self, name: str, timeout: float = 30.0) -> int | None:
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return None if p is None else p.returncode
        p.send_signal(signal.SIGTERM)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait()

    def stop_all(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name, 10)

    def write_configs(self) -> tuple[Path, Path]:
        drivers = ROOT / "drivers"
        e = self.env
        slaves = "".join(
            f"""
[[modbus.serial.slaves]]
profile = "{drivers / profile}"
unit = {unit}
sensor_id = "{sensor}"
plant_id = "{self.plant}"
location = "{loc}"
interval = 2.0
"""
            for profile, unit, sensor, loc in PROBES
        )
        gateway = f"""[gateway]
id = "{self.gateway_id}"
plant_id = "{self.plant}"

[[modbus.serial]]
port = "{self.dir / "tty-gateway"}"
baudrate = 9600                   # the sonde ships at 19200 8E1; on this bus it is set to 9600 8N1
parity = "N"
stopbits = 1
timeout = 0.3
{slaves}
[[modbus.tcp]]
host = "127.0.0.1"
port = {self.flow_port}
profile = "{drivers / "flowmeter-tcp.toml"}"
sensor_id = "flow-influent-1"
plant_id = "{self.plant}"
location = "influent"
interval = 2.0

[mqtt]
enabled = true
host = "{e["MQTT_HOST"]}"
port = {e["MQTT_TLS_PORT"]}
tls = true
ca_file = "{e["MQTT_CA_FILE"]}"
username = "{e["MQTT_USERNAME"]}"
password = "env:MQTT_PASSWORD"

[[mqtt.subscriptions]]
topic = "plant/{self.plant}/+/+"
format = "number"
pattern = "plant/{{plantId}}/{{sensorId}}/{{parameter}}"
unit = "mg/L"
location = "clarifier"

[calibration]
store = "calibrations.sqlite"

[buffer]
path = "buffer.db"

[deadletter]
path = "deadletter.db"

[kafka]
bootstrap_servers = "{e["KAFKA_BOOTSTRAP_SERVERS"]}"

[http]
port = {self.http_port}
"""
        processor = f"""[processor]
bootstrap_servers = "{e["KAFKA_BOOTSTRAP_SERVERS"]}"
group_id = "edge-processor-demo"
topic_pattern = '^sensors\\.raw\\.{re.escape(self.plant)}$'
http_port = {self.processor_port}

[influxdb]
url = "{e["INFLUXDB_URL"]}"
org = "{e["INFLUXDB_ORG"]}"
token = "env:INFLUXDB_TOKEN"
"""
        (self.dir / "gateway.toml").write_text(gateway)
        (self.dir / "processor.toml").write_text(processor)
        return self.dir / "gateway.toml", self.dir / "processor.toml"

    def start(self) -> None:
        gw_cfg, proc_cfg = self.write_configs()
        self.spawn(
            "socat", "socat",
            f"pty,raw,echo=0,link={self.dir / 'tty-gateway'}",
            f"pty,raw,echo=0,link={self.dir / 'tty-probes'}",
        )  # fmt: skip
        wait_until(lambda: (self.dir / "tty-probes").exists(), 10, "socat pty pair")
        slaves = [
            a for p, unit, _, _ in PROBES for a in ("--slave", f"{ROOT / 'drivers' / p}:{unit}")
        ]
        self.spawn(
            "probes", *EXE, "simulate", "--port", str(self.dir / "tty-probes"),
            "--scenario", "noise", *slaves,
        )  # fmt: skip
        self.spawn(
            "flowmeter", *EXE, "simulate", "--profile", str(ROOT / "drivers/flowmeter-tcp.toml"),
            "--tcp", f"127.0.0.1:{self.flow_port}", "--scenario", "drift",
        )  # fmt: skip
        setup = subprocess.run(
            [*EXE, "processor", "setup-influx", "--config", str(proc_cfg)],
            env={**os.environ, **self.env}, capture_output=True, text=True, cwd=self.dir,
        )  # fmt: skip
        if setup.returncode != 0:
            raise SystemExit(f"setup-influx failed:\n{setup.stdout}{setup.stderr}")
        self.spawn("processor", *EXE, "processor", "run", "--config", str(proc_cfg))
        self.spawn("gateway", *EXE, "run", "--config", str(gw_cfg))
        wait_until(lambda: self.gateway_health() is not None, 30, "the gateway's /health")

    def gateway_health(self) -> dict | None:
        return http_json(self.http_port, "/health")

    def metrics(self) -> dict[str, float]:
        text = http_text(self.http_port, "/metrics") or ""
        out: Counter[str] = Counter()
        for line in text.splitlines():
            m = re.match(r"^(iot_[a-z_]+?)(?:_total)?(\{.*\})? ([0-9.e+-]+)$", line)
            if m and not m.group(1).endswith("_created"):
                out[m.group(1)] += float(m.group(3))
        return dict(out)


def http_text(port: int, path: str) -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return None
    return data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")


def http_json(port: int, path: str) -> dict | None:
    body = http_text(port, path)
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


class MqttDevice(threading.Thread):
    """A clarifier TSS analyser that publishes plain numbers over TLS; its scripted values cross
    the TSS critical limit (300 mg/L) after 20 s and come back after 60 s."""

    def __init__(self, env: dict[str, str], plant: str) -> None:
        super().__init__(name="mqtt-device", daemon=True)
        self.topic = f"plant/{plant}/tss-clarifier-1/TSS"
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"demo-device-{plant}"
        )
        self.client.username_pw_set(env["MQTT_USERNAME"], env["MQTT_PASSWORD"])
        self.client.tls_set(ca_certs=env["MQTT_CA_FILE"])
        self.client.connect(env["MQTT_HOST"], int(env["MQTT_TLS_PORT"]))
        self.stopped = threading.Event()
        self.acked = 0

    def run(self) -> None:
        self.client.loop_start()
        t0 = time.monotonic()
        while not self.stopped.wait(1.0):
            t = time.monotonic() - t0
            value = 420.0 if 20 <= t < 60 else 80.0 + 5 * ((int(t) % 7) - 3)
            info = self.client.publish(self.topic, f"{value:.1f}", qos=1)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(5)
                self.acked += info.is_published()
        self.client.loop_stop()
        self.client.disconnect()


class AlertWatcher(threading.Thread):
    """Collects the alarm events of our gateway from sensors.alerts as they arrive."""

    def __init__(self, env: dict[str, str], gateway_id: str) -> None:
        super().__init__(name="alerts", daemon=True)
        self.gateway_id = gateway_id
        self.consumer = Consumer({
            "bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"],
            "group.id": f"demo-alerts-{gateway_id}",
            "auto.offset.reset": "latest",
            "enable.auto.commit": False,
        })  # fmt: skip
        self.consumer.subscribe(["sensors.alerts"])
        self.events: dict[str, dict] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            for m in self.consumer.consume(500, 0.5):
                if m.error():
                    continue
                with contextlib.suppress(ValueError):
                    e = json.loads(m.value())
                    if e.get("gatewayId") == self.gateway_id:
                        self.events[e["eventId"]] = e
        self.consumer.close()


def kafka_readings(
    env: dict[str, str], topic: str, gateway_id: str, start: dict[int, int]
) -> set[int]:
    """The distinct seqs of our gateway's readings on ``topic`` after the given offsets."""
    c = Consumer({
        "bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"],
        "group.id": f"demo-count-{gateway_id}",
        "enable.auto.commit": False,
    })  # fmt: skip
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    c.assign([TopicPartition(topic, p, start.get(p, 0)) for p in parts])
    seqs: set[int] = set()
    left = {p for p in parts if ends[p] > start.get(p, 0)}
    deadline = time.monotonic() + 60
    while left and time.monotonic() < deadline:
        for m in c.consume(5000, 1.0):
            if m.error():
                continue
            d = json.loads(m.value())
            if d.get("gatewayId") == gateway_id:
                seqs.add(d["seq"])
            if m.offset() + 1 >= ends[m.partition()]:
                left.discard(m.partition())
    c.close()
    return seqs


def end_offsets(env: dict[str, str], topic: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"], "group.id": "demo-peek"})
    md = c.list_topics(topic, timeout=10).topics.get(topic)
    out = {}
    if md is not None and md.error is None:
        out = {
            p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in md.partitions
        }
    c.close()
    return out


def stored_count(env: dict[str, str], plant: str, since: float) -> int:
    flux = """from(bucket: bucket)
  |> range(start: since)
  |> filter(fn: (r) => r._measurement == "water_quality" and r.plant_id == plant)
  |> filter(fn: (r) => r._field == "quality")
  |> group()
  |> count()"""
    with InfluxDBClient(env["INFLUXDB_URL"], env["INFLUXDB_TOKEN"], org=env["INFLUXDB_ORG"]) as c:
        tables = c.query_api().query(
            flux, params={"bucket": env["INFLUXDB_BUCKET"], "plant": plant,
                          "since": datetime.fromtimestamp(since, UTC)},
        )  # fmt: skip
    return sum(int(r.get_value()) for t in tables for r in t.records)


def latest_table(env: dict[str, str], plant: str) -> list[str]:
    from gateway.processor.query import Queries
    from gateway.processor.store import InfluxConfig

    cfg = InfluxConfig(
        url=env["INFLUXDB_URL"], org=env["INFLUXDB_ORG"], token=env["INFLUXDB_TOKEN"]
    )
    with InfluxDBClient(cfg.url, env["INFLUXDB_TOKEN"], org=cfg.org) as c:
        rows = Queries(c, cfg).latest(plant, since="-10m")
    return [
        f"  {r.parameter:<13} {('-' if r.value is None else f'{r.value:.2f}'):>10} {r.unit:<6}"
        f" {r.quality:<9} {r.sensor_id}"
        for r in rows
    ]


def show(plant: Plant, env: dict[str, str], alerts: AlertWatcher, last: dict[str, float]) -> None:
    m = plant.metrics()
    now = time.monotonic()
    received = m.get("iot_messages_received", 0.0)
    rate = (received - last.get("received", 0.0)) / max(now - last.get("t", now - 1), 1e-3)
    last.update(received=received, t=now)
    health = plant.gateway_health() or {}
    buffered = health.get("checks", {}).get("buffer", {}).get("rows", "?")
    print(f"\n[{time.strftime('%H:%M:%S')}] gateway {health.get('status', 'down')}: "
          f"{received:.0f} readings received ({rate:.1f}/s), {buffered} waiting in the buffer, "
          f"{len(alerts.events)} alarm events")  # fmt: skip
    try:
        print("\n".join(latest_table(env, plant.plant)) or "  (nothing stored yet)")
    except Exception as e:  # the demo keeps going while InfluxDB is busy
        print(f"  (InfluxDB query failed: {e})")
    for e in list(alerts.events.values())[-3:]:
        print(f"  ALARM {e['level']:<8} {e['state']:<9} {e['message']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=0, help="seconds; 0 runs until Ctrl-C")
    ap.add_argument("--plant", default="demo")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between status lines")
    args = ap.parse_args()
    env = read_env()
    run_id = time.strftime("%Y%m%d-%H%M%S")
    run_dir = ROOT / "var" / "demo" / run_id
    run_dir.mkdir(parents=True)
    gateway_id = f"demo-gw-{run_id}"
    raw_topic = f"sensors.raw.{args.plant}"
    start_offsets = end_offsets(env, raw_topic)
    started = time.time()
    plant = Plant(run_dir, env, args.plant, gateway_id)
    alerts = AlertWatcher(env, gateway_id)
    alerts.start()
    interrupted = False

    def on_sigint(*_: object) -> None:
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigint)
    print(f"demo plant '{args.plant}', gateway {gateway_id}; logs in {run_dir}")
    print(f"live dashboard: http://127.0.0.1:{plant.processor_port}/ (the processor's page)")
    device = None
    try:
        plant.start()
        device = MqttDevice(env, args.plant)
        device.start()
        last: dict[str, float] = {}
        deadline = time.monotonic() + args.duration if args.duration else float("inf")
        while not interrupted and time.monotonic() < deadline:
            time.sleep(min(args.every, max(0.1, deadline - time.monotonic())))
            if not interrupted:
                show(plant, env, alerts, last)
        print("\nstopping the devices, then the gateway (it forwards what it holds), the processor")
        if device is not None:
            device.stopped.set()
            device.join(10)
        plant.stop("probes")
        plant.stop("flowmeter")
        gateway_rc = plant.stop("gateway")
        left = (
            sqlite3.connect(run_dir / "buffer.db")
            .execute("SELECT count(*) FROM records")
            .fetchone()[0]
        )
        seqs = kafka_readings(env, raw_topic, gateway_id, start_offsets)
        produced = len(seqs)
        stored = 0
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the processor catches up
            stored = stored_count(env, args.plant, started - 5)
            if stored >= produced:
                break
            time.sleep(2)
        alerts.stopped.set()
        alerts.join(10)
        plant.stop("processor")
    finally:
        if device is not None:
            device.stopped.set()
        plant.stop_all()
    raised = sum(1 for e in alerts.events.values() if e.get("state") == "raised")
    print("\n== summary")
    print(f"gateway exit code          {gateway_rc}")
    print(
        f"readings produced          {produced} (in Kafka {raw_topic}, {left} left in the buffer)"
    )
    print(f"readings stored            {stored} (InfluxDB water_quality, plant {args.plant})")
    print(f"MQTT publishes acknowledged {device.acked if device else 0}")
    print(f"alarm events               {len(alerts.events)} ({raised} raised)")
    ok = produced > 0 and left == 0 and stored == produced and raised >= 1
    print(
        "result                     "
        + ("OK: every reading produced was stored" if ok else "FAILED")
    )
    return 0 if ok or (interrupted and not args.duration) else 1


if __name__ == "__main__":
    sys.exit(main())
