"""Chaos run: the whole pipeline (simulated probes on a pty and an MQTT device, the gateway, Kafka,
two processor instances in one group, InfluxDB) while a seeded random schedule SIGKILLs and
restarts each of the gateway, a processor instance, Kafka, Mosquitto and InfluxDB, and cuts the
serial line (the socat pair) for a while. 2 minutes in the default suite; ``--soak --minutes N``
runs longer (20 by default with --soak).

Then, after a drain:
- every seq the gateway committed is in Kafka, contiguous (a gap is a lost reading), and every
  reading is stored in InfluxDB exactly once (one point per reading, none extra);
- every MQTT publish the broker acknowledged is stored, once; a SIGKILLed Mosquitto loses what it
  held only in memory (it saves its store on a clean shutdown), so publishes it acknowledged in the
  2 s before its kill, until the gateway's subscription is back, are counted apart as the broker's;
- every stored 1-minute aggregate equals the one computed from the stored raw readings;
- no alert notification is delivered twice (when the processor has a notifier).

It kills and restarts the servers this clone's scripts/services started, as the outage tests do;
where others' tests share them, run it in a private network namespace (README "Chaos run").
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from influxdb_client import InfluxDBClient

from gateway.common.model import Reading
from tests.support.chaos import (
    SERVERS,
    CatchUp,
    kill_server,
    schedule,
    start_server,
)
from tests.support.gateway_harness import (
    Gateway,
    GatewaySetup,
    KafkaCollector,
    Publisher,
    Simulator,
    init_buffer,
    numbered_message,
    stop_and_settle,
    wait_all_in_kafka,
)
from tests.support.net import free_port
from tests.support.processor_harness import (
    Dataset,
    Processor,
    assert_windows_match_raw,
    influx_config,
    raw_points,
)
from tests.support.receivers import WEBHOOK_SECRET, WebhookReceiver
from tests.support.wait import wait_settled, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.timeout(3 * 3600)]

RATE = 20.0  # MQTT publishes per second
MQTT_SENSORS = 2


class SerialLine:
    """The socat pair and the simulated probes on its far end; ``cut()`` kills socat (the line is
    gone for the gateway and the probes alike), ``restore()`` brings both back at the same paths."""

    def __init__(self, tmp: Path, probes: list[tuple[str, int, str, str]]) -> None:
        self.a, self.b, self.probes = tmp / "ttyA", tmp / "ttyB", probes
        self.socat: subprocess.Popen[bytes] | None = None
        self.sim: Simulator | None = None

    def restore(self) -> None:
        socat = shutil.which("socat")
        assert socat is not None, "socat is not installed"
        for p in (self.a, self.b):
            p.unlink(missing_ok=True)
        self.socat = subprocess.Popen(
            [socat, f"pty,raw,echo=0,link={self.a}", f"pty,raw,echo=0,link={self.b}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: self.a.exists() and self.b.exists(), 10, "the socat pty pair")
        self.sim = Simulator(str(self.b), self.probes)

    def cut(self) -> None:
        if self.socat is not None:
            self.socat.kill()
            self.socat.wait(10)
        if self.sim is not None:
            self.sim.stop()

    def close(self) -> None:
        self.cut()


def message(setup: GatewaySetup, n: int) -> tuple[str, bytes, int]:
    return numbered_message(setup, n, MQTT_SENSORS)


def notifications(url: str, state: Path) -> str:
    """Alert notifications by webhook (every level), each instance with its own alert state."""
    return f"""
[notifications]
enabled = true
state_path = "{state}"
group_wait = 2.0

[notifications.webhook.hook]
url = "{url}"
secret = "env:CHAOS_HOOK_SECRET"
timeout_seconds = 5.0
retry_max_seconds = 2.0
rate_per_minute = 600.0

[[notifications.routes]]
levels = ["critical", "warning"]
channels = ["hook"]
resolved = false
"""


def us(ts: str | datetime) -> int:
    """Microseconds since the epoch of an RFC 3339 string or a datetime."""
    dt = ts if isinstance(ts, datetime) else datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return round(dt.timestamp() * 1_000_000)


def newest_mqtt(influx: dict[str, str], plant: str) -> int:
    flux = """from(bucket: bucket) |> range(start: -1h)
  |> filter(fn: (r) => r._measurement == "water_quality" and r.plant_id == plant)
  |> filter(fn: (r) => r._field == "value" and r.parameter == "flow_rate")
  |> filter(fn: (r) => r.sensor_id =~ /^mq-/) |> group() |> max()"""
    with InfluxDBClient(influx["INFLUXDB_URL"], influx["INFLUXDB_TOKEN"], org="plant-ops") as c:
        tables = c.query_api().query(
            flux, params={"bucket": influx.get("INFLUXDB_BUCKET", "sensors"), "plant": plant}
        )
    return max((int(r.get_value()) for t in tables for r in t.records), default=-1)


@pytest.fixture
def minutes(request: pytest.FixtureRequest) -> float:
    given = request.config.getoption("--minutes")
    soak = request.config.getoption("--soak")
    return float(given) if given is not None else 20.0 if soak else 2.0


def test_chaos_loses_and_duplicates_nothing(
    services: dict[str, str], servers: dict[str, str], tmp_path: Path, minutes: float
) -> None:
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 30)))
    events = schedule(seed, minutes * 60)
    print(f"chaos seed {seed}: {len(events)} kills over {minutes:g} min")
    run = f"{os.urandom(4).hex()}"
    drivers = Path(__file__).resolve().parents[2] / "drivers"
    probes = [
        (str(drivers / "ph-int16.toml"), 1, "ph-1", "pH"),
        (str(drivers / "conductivity-tds.toml"), 3, "cond-1", "TDS"),
        (str(drivers / "uv254-optical.toml"), 2, "uv-1", "BOD"),  # BOD 150: a critical alarm
    ]
    line = SerialLine(tmp_path, probes)
    setup = GatewaySetup(
        tmp_path,
        services["KAFKA_BOOTSTRAP_SERVERS"],
        run=f"{run}-a",
        pty=str(line.a),
        probes=probes,
        mqtt=services,
        interval=0.5,
    )
    data = Dataset(run, [setup.plant], [Reading("x", "pH", 7.0, "pH", time.time())])
    seq0 = init_buffer(setup.buffer_path, setup.gateway_id)
    gw = Gateway(setup.write(), tmp_path / "logs", env={"MQTT_PASSWORD": services["MQTT_PASSWORD"]})
    # A plant silent longer than the idle flush has its window closed; a Kafka restart must not.
    proc = Processor(
        data, servers, servers, tmp_path, settings={"processor": {"idle_flush_seconds": 30}}
    )
    hook = WebhookReceiver().start()
    slots = {k: free_port() for k in ("a", "b")}  # an instance's place: its HTTP port, its state

    def start_instance(slot: str) -> subprocess.Popen[bytes]:
        proc.extra_config = notifications(hook.url, tmp_path / f"alerts-{slot}.db")
        return proc.start(http_port=slots[slot], env={"CHAOS_HOOK_SECRET": WEBHOOK_SECRET})

    publisher: Publisher | None = None
    kills: Counter[str] = Counter()
    broker_windows: list[tuple[float, float]] = []  # (start, end) in publisher numbers' time
    catch = CatchUp(lambda: newest_mqtt(servers, setup.plant), lambda: -1)
    t_start = time.monotonic()
    line.restore()
    try:
        with KafkaCollector(setup.kafka, [setup.raw_topic, "sensors.alerts"]) as kafka:
            instances = [("a", start_instance("a")), ("b", start_instance("b"))]
            gw.start()
            gw.wait_serving()
            wait_until(lambda: gw.health()[1]["checks"]["mqtt"]["status"] == "healthy", 60, "MQTT")
            publisher = Publisher(services)
            pub = publisher
            t0 = time.monotonic()
            pub.run_steadily(RATE, lambda n: message(setup, n))
            catch.current = lambda: int((time.monotonic() - t0) * RATE)
            wait_until(lambda: newest_mqtt(servers, setup.plant) >= 0, 120, "a reading stored")
            catch.start()
            t_chaos = time.monotonic()
            for ev in events:
                time.sleep(max(0.0, t_chaos + ev.at - time.monotonic()))
                dead = [p.returncode for _, p in instances if p.poll() is not None]
                assert not dead, f"a processor instance exited {dead}:\n{proc.logs()[-3000:]}"
                kills[ev.component] += 1
                if ev.component == "gateway":
                    gw.kill()
                    time.sleep(ev.down_for)
                    gw.start()
                elif ev.component == "processor":
                    slot, victim = instances.pop(random.Random(seed + len(kills)).randrange(2))
                    proc.kill(victim)
                    time.sleep(ev.down_for)
                    instances.append((slot, start_instance(slot)))
                elif ev.component == "serial":
                    line.cut()
                    time.sleep(ev.down_for)
                    line.restore()
                else:
                    assert ev.component in SERVERS
                    killed = time.monotonic()
                    kill_server(ev.component)
                    time.sleep(ev.down_for)
                    start_server(ev.component)
                    if ev.component == "mosquitto":
                        gw.wait_serving()
                        wait_until(
                            lambda: gw.health()[1]["checks"]["mqtt"]["status"] == "healthy",
                            120,
                            "the gateway's MQTT subscription after the broker's restart",
                        )
                        broker_windows.append((killed - 2 - t0, time.monotonic() + 1 - t0))
                catch.restarted(ev.component)
            chaos_s = time.monotonic() - t_chaos
            # Drain: the device stops, every publish is answered, the gateway empties its buffer.
            pub.stop()
            wait_settled(lambda: len(pub.acknowledged()), lambda: False, 120, "PUBACKs", quiet=5)
            acked, sent = set(pub.acknowledged()), set(pub.sent())
            gw.wait_serving()
            last = stop_and_settle(gw, setup.buffer_path)
            everything = set(range(seq0 + 1, last + 1))
            wait_all_in_kafka(kafka, setup.gateway_id, everything)
            records = kafka.snapshot(gateway_id=setup.gateway_id)
        readings = {m.value["seq"]: m.value for m in records if m.topic == setup.raw_topic}
        keys = {(r["sensorId"], r["parameter"], us(r["timestamp"])) for r in readings.values()}
        cfg = influx_config(servers)
        with cfg.client() as client:

            def stored() -> list[dict[str, Any]]:
                return raw_points(client, cfg, data)

            wait_settled(lambda: len(stored()), lambda: len(stored()) >= len(keys), 300, "storage")
            time.sleep(40)  # the last windows close (idle flush) and late writes land
            points = stored()
            try:
                n_windows, windows_error = assert_windows_match_raw(client, cfg, data), None
            except AssertionError as e:  # reported after the exactly-once checks
                n_windows, windows_error = 0, e
        catch.stop()
    finally:
        if publisher is not None:
            publisher.close()
        gw.close()
        proc.stop_all()
        hook.stop()
        line.close()
        for s in SERVERS:  # a failed restart must not leave the next test without servers
            start_server(s)

    # 1. Every committed seq reached Kafka: contiguous, nothing else.
    by_seq: dict[int, set[bytes]] = defaultdict(set)
    for m in records:
        by_seq[m.value["seq"]].add(m.raw)
    assert set(by_seq) == everything, f"lost seqs: {sorted(everything - set(by_seq))[:20]}"
    assert not [s for s, p in by_seq.items() if len(p) > 1], "a seq was reused"
    # 2. Every reading stored exactly once: one point per reading, none extra.
    stored_keys = Counter((p["sensor_id"], p["parameter"], us(p["_time"])) for p in points)
    lost = keys - set(stored_keys)
    extra = set(stored_keys) - keys
    duplicated = [k for k, n in stored_keys.items() if n > 1]
    assert len(keys) == len(readings), "two readings of one sensor share a timestamp"
    assert not lost, f"{len(lost)} readings not stored, e.g. {sorted(lost)[:5]}"
    assert not extra and not duplicated, f"extra {sorted(extra)[:5]} duplicated {duplicated[:5]}"
    # 3. Every acknowledged MQTT publish stored once (bar the broker's own losses at its kills).
    mqtt_seqs: dict[int, set[int]] = defaultdict(set)
    for r in readings.values():
        if r["sensorId"].startswith("mq-"):
            mqtt_seqs[int(r["value"])].add(r["seq"])

    def brokers(n: int) -> bool:
        return any(a <= n / RATE <= b for a, b in broker_windows)

    missing = acked - set(mqtt_seqs)
    ours = sorted(n for n in missing if not brokers(n))
    assert not ours, f"{len(ours)} acknowledged publishes lost, e.g. {ours[:10]}"
    assert set(mqtt_seqs) <= sent
    twice = {n: s for n, s in mqtt_seqs.items() if len(s) > 1}
    assert not twice, f"MQTT messages stored twice: {list(twice.items())[:5]}"
    # 4. Every alert notified exactly once: no notification twice, no alarm's first alert twice.
    ids = Counter(h.notification_id for h in hook.received)
    alerts = Counter(
        a.get("eventId") or a.get("alarmId")
        for h in hook.received
        if h.body.get("kind") == "alert"
        for a in h.body.get("alerts", [])
    )
    assert hook.received, "no alert was notified"
    assert not [i for i, n in ids.items() if n > 1], f"notified twice: {ids.most_common(3)}"
    assert not [a for a, n in alerts.items() if n > 1], f"alerted twice: {alerts.most_common(3)}"
    # 5. Every 1-minute aggregate equals the one computed from the raw points.
    if windows_error is not None:
        raise windows_error
    longest = catch.longest()
    print(
        f"chaos: {chaos_s:.0f} s, kills {dict(kills)} ({sum(kills.values())} in all); "
        f"{len(everything)} records committed ({len(keys)} readings, the rest alarm events), "
        f"{len(points)} readings stored, lost 0, duplicated 0; "
        f"{len(acked)} MQTT publishes acknowledged, {len(missing)} lost by the SIGKILLed broker; "
        f"{n_windows} windows match the raw data; {len(hook.received)} webhook notifications, "
        f"none twice; longest restart-to-caught-up "
        f"{longest[1]:.1f} s ({longest[0]}), not caught up: {len(catch.waiting)}; "
        f"total {time.monotonic() - t_start:.0f} s"
    )
