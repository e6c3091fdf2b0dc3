"""``edge-gateway run`` as a real process: simulated probes on a pty and MQTT in, Kafka out, with
/health and /metrics, a clean SIGTERM, config errors, overflow with Kafka unreachable, and a
corrupt buffer file at start."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from gateway.common.model import format_ts
from tests.support.gateway_harness import (
    PROBES,
    ROOT,
    Gateway,
    GatewaySetup,
    KafkaCollector,
    Publisher,
    Simulator,
    buffer_state,
    init_buffer,
    kafka_seqs,
    stop_and_settle,
)
from tests.support.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

UNREACHABLE_KAFKA = "127.0.0.1:1"
DESIGN_METRICS = (
    "iot_messages_received_total",
    "iot_messages_processed_total",
    "iot_alerts_triggered_total",
    "iot_processing_latency_seconds_bucket",
    "iot_active_connections",
    "iot_buffer_size",
)


def gateway_for(setup: GatewaySetup, mqtt_env: dict[str, str] | None = None) -> Gateway:
    env = {"MQTT_PASSWORD": mqtt_env["MQTT_PASSWORD"]} if mqtt_env else {}
    return Gateway(setup.write(), setup.tmp / "logs", env=env)


def check_of(gw: Gateway, name: str) -> dict[str, Any]:
    return gw.health()[1]["checks"][name]


def test_gateway_polls_probes_reads_mqtt_and_forwards_everything_to_kafka(
    kafka_env: dict[str, str], mqtt_env: dict[str, str], pty_pair: Any, tmp_path: Path
) -> None:
    setup = GatewaySetup(
        tmp_path, kafka_env["KAFKA_BOOTSTRAP_SERVERS"], pty=pty_pair.a, mqtt=mqtt_env
    )
    seq0 = init_buffer(setup.buffer_path, setup.gateway_id)
    gw = gateway_for(setup, mqtt_env)
    with (
        Simulator(pty_pair.b, setup.probes),
        KafkaCollector(setup.kafka, [setup.raw_topic, "sensors.alerts"]) as kafka,
    ):
        publisher = None
        try:
            gw.start()
            gw.wait_serving()
            _, health = wait_until(
                lambda: (h := gw.health())[0] == 200 and h, 60, "/health to answer 200"
            )
            assert health["status"] == "healthy"
            assert set(health["checks"]) == {"buffer", "kafka", "modbus", "mqtt", "calibration"}
            assert all(c["status"] == "healthy" for c in health["checks"].values())

            publisher = Publisher(mqtt_env)
            now = format_ts(time.time())
            publisher.publish(setup.number_topic("bod-m", "BOD"), b"150", "bod-m")
            publisher.publish(setup.number_topic("cod-m", "COD"), b"123.5", "cod-m")
            one = {
                "sensorId": "j-1",
                "parameter": "TSS",
                "value": 55.5,
                "unit": "mg/L",
                "timestamp": now,
            }
            publisher.publish(setup.json_topic("j-1"), json.dumps(one).encode(), "j-1")
            two = [
                {
                    "sensorId": "j-2",
                    "parameter": "pH",
                    "value": 7.1,
                    "unit": "pH",
                    "timestamp": now,
                },
                {
                    "sensorId": "j-3",
                    "parameter": "TDS",
                    "value": 640.0,
                    "unit": "mg/L",
                    "timestamp": now,
                },
            ]
            publisher.publish(setup.json_topic("batch"), json.dumps(two).encode(), "batch")
            publisher.wait_all_acknowledged()

            expected = {  # sensorId -> (parameter, value) that must arrive
                "ph-1": ("pH", 7.0),
                "uv-1": ("BOD", 150.0),
                "cond-1": ("TDS", 904.3),
                "bod-m": ("BOD", 150.0),
                "cod-m": ("COD", 123.5),
                "j-1": ("TSS", 55.5),
                "j-2": ("pH", 7.1),
                "j-3": ("TDS", 640.0),
            }

            def arrived() -> bool:
                got = {
                    (m.key, m.value["parameter"], m.value["value"])
                    for m in kafka.snapshot(setup.raw_topic)
                }
                alarms = {
                    (m.key, m.value["parameter"], m.value["level"])
                    for m in kafka.snapshot("sensors.alerts", setup.gateway_id)
                }
                return {(s, p, v) for s, (p, v) in expected.items()} <= got and {
                    ("uv-1", "BOD", "critical"),
                    ("bod-m", "BOD", "critical"),
                } <= alarms

            wait_until(arrived, 90, "probe and MQTT readings and the BOD alarms in Kafka")

            readings = kafka.snapshot(setup.raw_topic)
            for m in readings:
                v = m.value
                assert m.key == v["sensorId"]
                assert m.headers == {"content-type": "application/json", "source": "iot-gateway"}
                assert v["gatewayId"] == setup.gateway_id and v["plantId"] == setup.plant
            by_key = {m.key: m.value for m in readings}
            assert by_key["bod-m"]["unit"] == "mg/L" and by_key["j-1"]["timestamp"] == now
            alerts = kafka.snapshot("sensors.alerts", setup.gateway_id)
            critical = [a for a in alerts if a.value["level"] == "critical"]
            assert {a.key for a in critical} >= {"uv-1", "bod-m"}
            for a in alerts:
                assert a.key == a.value["sensorId"] and a.headers["source"] == "iot-gateway"
                assert a.value["plantId"] == setup.plant and a.value["state"] == "raised"
            # seq: unique per gateway, and increasing per sensor (one key, one partition).
            records = readings + alerts
            seqs_by_key: dict[tuple[str, str], list[int]] = defaultdict(list)
            for m in records:
                seqs_by_key[m.topic, m.key].append(m.value["seq"])
            assert len({m.value["seq"] for m in records}) == len(records), "a seq repeats"
            for key, seqs in seqs_by_key.items():
                assert seqs == sorted(seqs), f"{key}: seq not increasing {seqs}"
            assert min(m.value["seq"] for m in records) > seq0

            metrics = gw.metrics()
            for name in DESIGN_METRICS:
                assert name in metrics, f"/metrics lacks {name}"
            assert gw.metric("iot_messages_received_total", source="modbus", plant_id=setup.plant)
            assert gw.metric("iot_messages_received_total", source="mqtt", plant_id=setup.plant)
            assert gw.metric("iot_alerts_triggered_total", level="critical", parameter="BOD") >= 2
            assert gw.metric("iot_active_connections") >= 2  # the serial port and the broker
            assert gw.metric("iot_kafka_delivered_total", topic=setup.raw_topic) > 0
            buckets = {ls["le"] for ls, _ in metrics["iot_processing_latency_seconds_bucket"]}
            assert {"0.001", "0.005", "0.01", "0.05", "0.1", "0.5", "1.0", "+Inf"} <= buckets
            for name in (
                "iot_buffer_bytes",
                "iot_buffer_oldest_age_seconds",
                "iot_delivery_latency_seconds_count",
                "iot_modbus_requests_total",
            ):
                assert name in metrics, f"/metrics lacks {name}"

            # SIGTERM while the probes are still polled: exit 0, and everything committed up to
            # the stop reaches Kafka (forwarded before the exit, or after the next start).
            last = stop_and_settle(gw, setup.buffer_path)
            everything = set(range(seq0 + 1, last + 1))
            wait_until(
                lambda: everything <= kafka_seqs(kafka, setup.gateway_id),
                120,
                "every committed seq in Kafka",
            )
            assert kafka_seqs(kafka, setup.gateway_id) == everything
            assert "Traceback" not in gw.all_logs()
        finally:
            if publisher is not None:
                publisher.close()
            gw.close()


@pytest.mark.parametrize(
    ("section", "bad_key"),
    [("buffer", "max_rowz"), ("kafka", "bootstrap_server")],
)
def test_an_unknown_config_key_stops_the_gateway_naming_file_and_key(
    tmp_path: Path, section: str, bad_key: str
) -> None:
    setup = GatewaySetup(tmp_path, UNREACHABLE_KAFKA, extra={section: {bad_key: 1}})
    config = setup.write()
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert str(config) in done.stderr and f"{section}.{bad_key}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not setup.buffer_path.exists()  # nothing was started


def test_the_running_gateway_holds_the_daemon_not_the_cli(tmp_path: Path) -> None:
    """``edge-gateway run`` execs the daemon's own entry point (same pid): the long-running process
    carries neither the CLI's modules nor typer's pydantic (about 10 MB of RSS)."""
    gw = Gateway(GatewaySetup(tmp_path, UNREACHABLE_KAFKA).write(), tmp_path / "logs")
    gw.start()
    try:
        gw.wait_serving()
        assert gw.proc is not None
        proc = Path(f"/proc/{gw.proc.pid}")
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        assert b"gateway.common.serve" in cmdline, cmdline
        maps = (proc / "maps").read_text()
        assert "pydantic_core" not in maps and "librdkafka" in maps
    finally:
        assert gw.terminate() == 0, gw.log()


OVERFLOW_BOUND = 40  # rows: a small buffer fills within seconds at 0.2 s polls


def unreachable_kafka_setup(pty_pair: Any, tmp_path: Path, overflow: str) -> GatewaySetup:
    """A gateway polling fast into a small buffer that cannot drain: Kafka is unreachable."""
    return GatewaySetup(
        tmp_path,
        UNREACHABLE_KAFKA,
        pty=pty_pair.a,
        interval=0.2,
        buffer={"max_rows": OVERFLOW_BOUND, "overflow": overflow},
    )


@pytest.mark.reliability
def test_with_kafka_unreachable_drop_oldest_keeps_the_newest_readings_and_counts_drops(
    pty_pair: Any, tmp_path: Path
) -> None:
    setup = unreachable_kafka_setup(pty_pair, tmp_path, "drop_oldest")
    gw = gateway_for(setup)
    with Simulator(pty_pair.b, setup.probes):
        try:
            gw.start()
            gw.wait_serving()
            wait_until(
                lambda: gw.metric("iot_buffer_dropped_total", reason="overflow") > 0,
                90,
                "rows dropped by the overflow policy",
            )
            first = gw.metric("iot_buffer_dropped_total", reason="overflow")
            # still running, still polling and committing: more rows are dropped later
            wait_until(
                lambda: gw.metric("iot_buffer_dropped_total", reason="overflow") > first,
                90,
                "more drops",
            )
            wait_until(
                lambda: check_of(gw, "kafka")["status"] == "unhealthy",
                90,
                "/health to report Kafka unreachable",
            )
            status, health = gw.health()
            assert status == 503
            buffer = health["checks"]["buffer"]
            assert buffer["status"] == "unhealthy" and "drop" in buffer["error"], buffer
            assert check_of(gw, "modbus")["status"] == "healthy"
            assert gw.proc is not None and gw.proc.poll() is None

            assert gw.terminate() == 0
        finally:
            gw.close()
    # What is left is within the bound and is the newest: every seq from the oldest reading left
    # to the last one committed is still there, and the overflow alarm is kept with them.
    last, ids = buffer_state(setup.buffer_path)
    con = sqlite3.connect(f"file:{setup.buffer_path}?mode=ro", uri=True)
    try:
        readings = [r[0] for r in con.execute("SELECT id FROM records WHERE kind = 'reading'")]
        alarms = [
            json.loads(r[0])
            for r in con.execute("SELECT payload FROM records WHERE kind = 'alarm'")
        ]
    finally:
        con.close()
    assert 0 < len(readings) <= OVERFLOW_BOUND
    assert set(range(min(readings), last + 1)) <= set(ids)
    assert any(a["parameter"] == "buffer" and a["state"] == "raised" for a in alarms), alarms


@pytest.mark.reliability
def test_with_kafka_unreachable_block_holds_the_sources_back_and_keeps_running(
    pty_pair: Any, tmp_path: Path
) -> None:
    setup = unreachable_kafka_setup(pty_pair, tmp_path, "block")
    gw = gateway_for(setup)
    with Simulator(pty_pair.b, setup.probes):
        try:
            gw.start()
            gw.wait_serving()

            def held_back() -> bool:
                check = check_of(gw, "buffer")
                return check["status"] == "unhealthy" and "held back" in check.get("error", "")

            wait_until(held_back, 90, "/health to say the sources are held back")
            wait_until(
                lambda: check_of(gw, "kafka")["status"] == "unhealthy",
                90,
                "/health to report Kafka unreachable",
            )
            status, health = gw.health()
            assert status == 503
            assert health["checks"]["buffer"]["rows"] <= OVERFLOW_BOUND
            assert gw.metric("iot_buffer_dropped_total") == 0
            # it keeps running (and keeps saying so) while Kafka stays away
            time.sleep(3)
            assert gw.proc is not None and gw.proc.poll() is None
            assert held_back() and check_of(gw, "buffer")["rows"] <= OVERFLOW_BOUND
            assert gw.terminate() == 0
        finally:
            gw.close()
    assert "Traceback" not in gw.all_logs()


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(64 * 1024))


def _damaged(path: Path) -> None:
    """A real buffer file with readings in it, then some of its pages overwritten."""
    from gateway.common.metrics import Metrics
    from gateway.common.model import Reading
    from gateway.edge.buffer import Buffer, BufferConfig

    with Buffer(BufferConfig(path=str(path)), "gw-old", Metrics()) as b:
        b.submit_wait(
            [Reading(f"s{i}", "pH", 7.0, "pH", time.time(), "old") for i in range(2000)], 30
        )
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    data[2 * 4096 : 6 * 4096] = os.urandom(4 * 4096)
    path.write_bytes(data)


@pytest.mark.reliability
@pytest.mark.parametrize("spoil", [_garbage, _damaged], ids=["garbage", "damaged-pages"])
def test_a_corrupt_buffer_file_is_moved_aside_and_the_gateway_runs(
    kafka_env: dict[str, str], pty_pair: Any, tmp_path: Path, spoil: Any
) -> None:
    setup = GatewaySetup(tmp_path, kafka_env["KAFKA_BOOTSTRAP_SERVERS"], pty=pty_pair.a)
    spoil(setup.buffer_path)
    spoilt = setup.buffer_path.read_bytes()
    gw = gateway_for(setup)
    with (
        Simulator(pty_pair.b, setup.probes),
        KafkaCollector(setup.kafka, [setup.raw_topic]) as kafka,
    ):
        try:
            gw.start()
            gw.wait_serving()
            aside = list(tmp_path.glob("buffer.db.corrupt-*"))
            assert [p for p in aside if p.read_bytes() == spoilt], aside
            assert "ERROR gateway.edge.buffer" in gw.log() and "corrupt" in gw.log()
            wait_until(
                lambda: (
                    {m.key for m in kafka.snapshot(setup.raw_topic)} >= {"ph-1", "uv-1", "cond-1"}
                ),
                90,
                "new readings in Kafka",
            )
            wait_until(lambda: gw.health()[0] == 200, 60, "/health 200")
            assert gw.terminate() == 0
        finally:
            gw.close()


def test_wrong_kafka_password_keeps_readings_buffered_until_fixed_and_reloaded(
    kafka_env: dict[str, str], pty_pair: Any, tmp_path: Path
) -> None:
    """Through the SASL_SSL listener: a wrong password leaves /health saying Kafka is unhealthy
    and every reading in the buffer; after the password is fixed, SIGHUP delivers them all."""
    setup = GatewaySetup(
        tmp_path, kafka_env["KAFKA_SASL_BOOTSTRAP_SERVERS"], pty=pty_pair.a, probes=PROBES[:1]
    )
    sasl = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": kafka_env["KAFKA_SASL_MECHANISM"],
        "sasl_username": kafka_env["KAFKA_SASL_USERNAME"],
        "sasl_password": "env:TEST_KAFKA_PASSWORD",
        "ssl_ca_location": kafka_env["KAFKA_CA_FILE"],
    }
    setup.extra = {"kafka": sasl}
    seq0 = init_buffer(setup.buffer_path, setup.gateway_id)
    config = setup.write()
    secrets = tmp_path / "kafka-password"
    secrets.write_text("not-the-password")
    setup.extra = {"kafka": {**sasl, "sasl_password": f"file:{secrets}"}}
    config = setup.write()
    gw = Gateway(config, tmp_path / "logs")
    with (
        Simulator(pty_pair.b, setup.probes),
        KafkaCollector(kafka_env["KAFKA_BOOTSTRAP_SERVERS"], [setup.raw_topic]) as kafka,
    ):
        try:
            gw.start()
            gw.wait_serving()
            wait_until(
                lambda: gw.health()[0] == 503 and check_of(gw, "kafka")["status"] == "unhealthy",
                90,
                "/health to report Kafka unhealthy",
            )
            kafka_check = check_of(gw, "kafka")
            assert "auth" in json.dumps(kafka_check).lower(), kafka_check
            wait_until(lambda: check_of(gw, "buffer")["rows"] >= 5, 60, "readings to pile up")
            assert not kafka_seqs(kafka, setup.gateway_id)
            auth_lines = [ln for ln in gw.log().splitlines() if "auth" in ln.lower()]
            assert 1 <= len(auth_lines) <= 3, auth_lines  # one clear error, not a flood

            secrets.write_text(kafka_env["KAFKA_SASL_PASSWORD"])
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: gw.log().count("HTTP server on") == 2, 60, "the reload")
            gw.port = 0  # the reloaded server listens on a new port (port = 0 in the config)
            gw.wait_serving()
            wait_until(lambda: gw.health()[0] == 200, 90, "/health healthy after the reload")
            last = stop_and_settle(gw, setup.buffer_path)
            wait_until(
                lambda: kafka_seqs(kafka, setup.gateway_id) >= set(range(seq0 + 1, last + 1)),
                60,
                "every buffered reading delivered after the fix",
            )
        finally:
            gw.close()


def _prefill(setup: GatewaySetup, poison: bytes) -> int:
    """Put 10 readings, one reading whose ``location`` is ``poison``, and 10 more readings into
    the gateway's buffer before it starts; returns the poison row's id (its seq)."""
    from gateway.common.metrics import Metrics
    from gateway.common.model import Reading
    from gateway.edge.buffer import Buffer, BufferConfig

    def reading(i: int, location: str = "inlet") -> Reading:
        return Reading(f"q-{i % 3}", "COD", float(i), "mg/L", time.time(), setup.plant, location)

    with Buffer(BufferConfig(path=str(setup.buffer_path)), setup.gateway_id, Metrics()) as b:
        b.submit_wait([reading(i) for i in range(10)], 30)
        b.submit_wait([reading(10, poison.decode())], 30)
        b.submit_wait([reading(i) for i in range(11, 21)], 30)
        (row,) = [r for r in b.fetch(100) if len(r.payload) > len(poison)]
        return row.id


@pytest.mark.parametrize(
    ("kafka_extra", "poison_size"),
    [
        # refused by the producer itself: produce() raises MSG_SIZE_TOO_LARGE
        ({"extra": {"message.max.bytes": 100_000}}, 200_000),
        # refused by the broker (its message.max.bytes is about 1 MB): a delivery report says so
        ({"compression": "none", "extra": {"message.max.bytes": 4_000_000}}, 1_500_000),
    ],
    ids=["producer-limit", "broker-limit"],
)
def test_a_row_kafka_refuses_for_good_is_dead_lettered_and_every_other_row_flows(
    kafka_env: dict[str, str], tmp_path: Path, kafka_extra: dict[str, Any], poison_size: int
) -> None:
    setup = GatewaySetup(
        tmp_path, kafka_env["KAFKA_BOOTSTRAP_SERVERS"], extra={"kafka": kafka_extra}
    )
    poison = os.urandom(poison_size // 2).hex().encode()  # incompressible
    poison_id = _prefill(setup, poison)
    gw = gateway_for(setup)
    with KafkaCollector(setup.kafka, [setup.raw_topic]) as kafka:
        try:
            gw.start()
            gw.wait_serving()
            wait_until(
                lambda: len(kafka.snapshot(setup.raw_topic)) >= 20, 90, "the other 20 readings"
            )
            wait_until(lambda: check_of(gw, "buffer")["rows"] == 0, 60, "the buffer to drain")
            status, health = gw.health()
            kafka_check = health["checks"]["kafka"]
            assert status == 503 and health["status"] == "degraded", health
            assert kafka_check["status"] == "degraded", kafka_check
            assert "MSG_SIZE_TOO_LARGE" in kafka_check["error"], kafka_check
            assert gw.metric("iot_kafka_dead_lettered_total", reason="MSG_SIZE_TOO_LARGE") == 1
            assert gw.terminate() == 0
        finally:
            gw.close()
        values = sorted(m.value["value"] for m in kafka.snapshot(setup.raw_topic))
    assert values == [float(i) for i in range(21) if i != 10]
    con = sqlite3.connect(tmp_path / "deadletter.db")
    try:
        (row,) = con.execute("SELECT source, reason, detail, size, payload FROM dead_letters")
    finally:
        con.close()
    source, reason, detail, size, payload = row
    assert (source, reason) == ("kafka", "MSG_SIZE_TOO_LARGE")
    assert str(poison_id) in detail
    assert size == len(payload) and poison in payload  # kept whole
    assert buffer_state(setup.buffer_path)[1] == []


STOP_BOUND_S = 30.0  # what the test allows; the gateway aims at about 10 s (see README)


@pytest.mark.reliability
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_a_full_buffer_with_kafka_down_neither_hangs_shutdown_nor_reload(
    mqtt_env: dict[str, str], tmp_path: Path, sig: signal.Signals
) -> None:
    """overflow = "block", a tiny buffer and queue, Kafka unreachable, MQTT messages streaming in:
    paho's thread ends up blocked in the buffer. SIGTERM must still end the gateway, and SIGHUP
    still reload it, within a bound, keeping every committed row."""
    setup = GatewaySetup(
        tmp_path,
        UNREACHABLE_KAFKA,
        mqtt=mqtt_env,
        buffer={"max_rows": OVERFLOW_BOUND, "overflow": "block", "queue_max": 50},
    )
    seq0 = init_buffer(setup.buffer_path, setup.gateway_id)
    gw = gateway_for(setup, mqtt_env)
    publisher = None
    try:
        publisher = start_streaming(gw, setup, mqtt_env, 200.0)
        wait_until(
            lambda: check_of(gw, "buffer")["queued"] >= 50, 90, "the buffer's queue to fill up"
        )
        assert gw.proc is not None
        if sig == signal.SIGHUP:
            started = time.monotonic()
            gw.proc.send_signal(signal.SIGHUP)
            wait_until(
                lambda: gw.log().count("HTTP server on") == 2, STOP_BOUND_S, "the reload to end"
            )
            print(f"reload with a full buffer took {time.monotonic() - started:.1f} s")
            gw.port = 0
            gw.wait_serving()
            wait_until(  # still full, still running
                lambda: check_of(gw, "buffer")["status"] == "unhealthy", 30, "the buffer held"
            )
        started = time.monotonic()
        rc = gw.terminate(timeout=STOP_BOUND_S)
        print(f"SIGTERM with a full buffer took {time.monotonic() - started:.1f} s")
        assert rc == 0, gw.log()[-3000:]
    finally:
        if publisher is not None:
            publisher.close()
        gw.close()
    last, ids = buffer_state(setup.buffer_path)
    assert ids == list(range(seq0 + 1, last + 1))  # every committed row kept, none dropped
    assert len(ids) >= OVERFLOW_BOUND
    assert "Traceback" not in gw.all_logs()


def start_streaming(
    gw: Gateway, setup: GatewaySetup, mqtt_env: dict[str, str], rate: float
) -> Publisher:
    """Start the gateway, wait for its MQTT subscription, then publish readings at ``rate``/s."""
    gw.start()
    gw.wait_serving()
    wait_until(lambda: check_of(gw, "mqtt")["status"] == "healthy", 60, "the subscription")
    publisher = Publisher(mqtt_env)
    publisher.run_steadily(rate, lambda n: _stream_message(setup, n))
    return publisher


def _stream_message(setup: GatewaySetup, n: int) -> tuple[str, bytes, int]:
    reading = {"sensorId": f"s-{n % 4}", "parameter": "TSS", "value": n, "unit": "mg/L"}
    reading["timestamp"] = format_ts(time.time())
    return setup.json_topic(f"s-{n % 4}"), json.dumps(reading).encode(), n


def test_reload_rereads_credential_files_and_a_failing_reload_leaves_the_gateway_running(
    kafka_env: dict[str, str], mqtt_env: dict[str, str], tmp_path: Path
) -> None:
    """Kafka over SASL_SSL with its password in a file (file:), MQTT with its password in the
    environment (env:, which a reload cannot change: it stays as it is). A reload while the file
    is unreadable is refused and the gateway keeps serving and forwarding; a changed file is
    read at the next reload (a wrong password, then the right one again)."""
    password = tmp_path / "kafka-password"
    password.write_text(kafka_env["KAFKA_SASL_PASSWORD"])
    sasl = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": kafka_env["KAFKA_SASL_MECHANISM"],
        "sasl_username": kafka_env["KAFKA_SASL_USERNAME"],
        "sasl_password": f"file:{password}",
        "ssl_ca_location": kafka_env["KAFKA_CA_FILE"],
    }
    setup = GatewaySetup(
        tmp_path, kafka_env["KAFKA_SASL_BOOTSTRAP_SERVERS"], mqtt=mqtt_env, extra={"kafka": sasl}
    )
    gw = gateway_for(setup, mqtt_env)
    publisher = None
    with KafkaCollector(kafka_env["KAFKA_BOOTSTRAP_SERVERS"], [setup.raw_topic]) as kafka:

        def arrived() -> int:
            return len(kafka.snapshot(setup.raw_topic))

        def more_arrive() -> None:
            seen = arrived()
            wait_until(lambda: arrived() > seen + 5, 60, "readings still reaching Kafka")

        def reload(what: str) -> None:
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: what in gw.log(), 60, f"the log to say {what!r}")

        try:
            publisher = start_streaming(gw, setup, mqtt_env, 20.0)
            more_arrive()

            password.unlink()  # e.g. a credential not deployed yet
            reload("reload refused")
            assert "cannot read credential file" in gw.log()
            assert gw.proc.poll() is None, gw.log()[-3000:]
            assert gw.health()[0] == 200  # the old gateway still runs, serves and forwards
            more_arrive()
            assert gw.log().count("HTTP server on") == 1

            password.write_text("not-the-password")
            reload("reloading")
            wait_until(lambda: gw.log().count("HTTP server on") == 2, 60, "the reload")
            gw.port = 0
            gw.wait_serving()
            wait_until(
                lambda: "refused" in check_of(gw, "kafka").get("error", ""),
                90,
                "the wrong password from the file to be used",
            )
            assert check_of(gw, "mqtt")["status"] == "healthy"  # env: password, unchanged

            password.write_text(kafka_env["KAFKA_SASL_PASSWORD"])
            gw.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: gw.log().count("HTTP server on") == 3, 60, "the second reload")
            gw.port = 0
            gw.wait_serving()
            wait_until(lambda: gw.health()[0] == 200, 90, "healthy with the right password")
            more_arrive()
            assert gw.terminate() == 0
        finally:
            if publisher is not None:
                publisher.close()
            gw.close()
    assert "Traceback" not in gw.all_logs()


def test_a_reload_that_fails_to_start_brings_the_previous_configuration_back(
    tmp_path: Path,
) -> None:
    """The new file is good, but its HTTP port is taken: the new gateway cannot start once the
    old one has stopped. The previous configuration runs again instead of the process ending."""
    setup = GatewaySetup(tmp_path, UNREACHABLE_KAFKA)
    gw = gateway_for(setup)
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        gw.start()
        gw.wait_serving()
        setup.extra = {"http": {"port": taken.getsockname()[1]}}
        setup.write()
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "starting the previous one again" in gw.log(), 60, "the fallback")
        wait_until(lambda: gw.log().count("HTTP server on") == 2, 60, "the previous config")
        gw.port = 0
        gw.wait_serving()
        assert gw.proc.poll() is None
        assert "buffer" in gw.health()[1]["checks"]
        assert gw.terminate() == 0
    finally:
        taken.close()
        gw.close()
    assert "Traceback" not in gw.all_logs()
