"""``edge-gateway diag mqtt|kafka|influx`` against the real Mosquitto, Kafka and InfluxDB: each
failure named, with its fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from typer.testing import CliRunner

from gateway.cli import app
from gateway.cli.diag_brokers import FIXES, classify
from tests.support.gateway_harness import run_id, toml_dumps

pytestmark = pytest.mark.integration


def check(tmp_path: Path, what: str, doc: dict[str, Any], env: dict[str, str], *args: str) -> Any:
    config = tmp_path / f"{what}-{run_id()}.toml"
    base = {
        "gateway": {"id": "gw-diag", "plant_id": "diag"},
        "calibration": {"store": str(tmp_path / "cal.sqlite")},
    }
    config.write_text(toml_dumps({**base, **doc}))
    result = CliRunner().invoke(
        app, ["diag", what, "--config", str(config), "--timeout", "5", "--json", *args], env=env
    )
    checks = json.loads(result.stdout) if result.stdout.startswith("[") else None
    return result.exit_code, checks, result.output


def kinds(checks: list[dict[str, Any]]) -> list[str]:
    return [c["kind"] for c in checks]


def test_mqtt(mqtt_env: dict[str, str], tmp_path: Path) -> None:
    good = {
        "host": mqtt_env["MQTT_HOST"],
        "port": int(mqtt_env["MQTT_PORT"]),
        "username": mqtt_env["MQTT_USERNAME"],
        "password": "env:MQTT_PASSWORD",
        "subscriptions": [{"topic": f"t/{run_id()}/#", "format": "json"}],
    }
    env = {"MQTT_PASSWORD": mqtt_env["MQTT_PASSWORD"]}
    code, checks, out = check(tmp_path, "mqtt", {"mqtt": good}, env)
    assert code == 0, out
    assert kinds(checks) == ["ok", "ok"]
    code, checks, _ = check(tmp_path, "mqtt", {"mqtt": good}, {"MQTT_PASSWORD": "wrong"})
    assert code == 1 and kinds(checks) == ["auth"] and checks[0]["fix"] == FIXES["auth"]
    code, checks, _ = check(tmp_path, "mqtt", {"mqtt": {**good, "port": 1}}, env)
    assert kinds(checks) == ["refused"]
    code, checks, _ = check(tmp_path, "mqtt", {"mqtt": {**good, "host": "no-such.invalid"}}, env)
    assert kinds(checks) == ["dns"]
    tls = {**good, "tls": True, "port": int(mqtt_env["MQTT_TLS_PORT"])}
    code, checks, _ = check(tmp_path, "mqtt", {"mqtt": tls}, env)  # the system CAs: untrusted
    assert kinds(checks) == ["tls"]
    code, checks, out = check(
        tmp_path, "mqtt", {"mqtt": {**tls, "ca_file": mqtt_env["MQTT_CA_FILE"]}}, env
    )
    assert code == 0, out


def test_kafka(kafka_env: dict[str, str], tmp_path: Path) -> None:
    bootstrap = kafka_env["KAFKA_BOOTSTRAP_SERVERS"]
    topic = f"t.diag.{run_id()}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    plain = {"kafka": {"bootstrap_servers": bootstrap}}
    code, checks, out = check(tmp_path, "kafka", plain, {}, "--topic", topic)
    assert code == 0 and kinds(checks) == ["ok", "ok"], out
    code, checks, _ = check(tmp_path, "kafka", plain, {}, "--topic", topic + ".none")
    assert code == 1 and kinds(checks) == ["ok", "missing"]
    code, checks, _ = check(tmp_path, "kafka", {"kafka": {"bootstrap_servers": "127.0.0.1:1"}}, {})
    assert kinds(checks) in (["refused"], ["timeout"])
    sasl = {
        "bootstrap_servers": kafka_env["KAFKA_SASL_BOOTSTRAP_SERVERS"],
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": kafka_env["KAFKA_SASL_MECHANISM"],
        "sasl_username": kafka_env["KAFKA_SASL_USERNAME"],
        "sasl_password": "env:TEST_KP",
        "ssl_ca_location": kafka_env["KAFKA_CA_FILE"],
    }
    code, checks, _ = check(tmp_path, "kafka", {"kafka": sasl}, {"TEST_KP": "wrong"})
    assert code == 1 and kinds(checks) == ["auth"], checks
    right = {"TEST_KP": kafka_env["KAFKA_SASL_PASSWORD"]}
    untrusted = {**sasl, "ssl_ca_location": "/etc/ssl/certs/ca-certificates.crt"}
    code, checks, _ = check(tmp_path, "kafka", {"kafka": untrusted}, right)
    assert code == 1 and kinds(checks) == ["tls"], checks


def test_influx(servers: dict[str, str], tmp_path: Path) -> None:
    influx = {
        "url": servers["INFLUXDB_URL"],
        "org": servers.get("INFLUXDB_ORG", "plant-ops"),
        "token": "env:INFLUXDB_TOKEN",
        "bucket": "sensors",
    }
    env = {"INFLUXDB_TOKEN": servers["INFLUXDB_TOKEN"]}
    code, checks, out = check(tmp_path, "influx", {"influxdb": influx}, env)
    assert code == 0 and kinds(checks) == ["ok", "ok"], out
    code, checks, _ = check(tmp_path, "influx", {"influxdb": {**influx, "bucket": "nope"}}, env)
    assert code == 1 and kinds(checks) == ["ok", "missing"]
    code, checks, _ = check(tmp_path, "influx", {"influxdb": influx}, {"INFLUXDB_TOKEN": "bad"})
    assert kinds(checks)[-1] == "auth", checks
    code, checks, _ = check(
        tmp_path, "influx", {"influxdb": {**influx, "url": "http://127.0.0.1:1"}}, env
    )
    assert kinds(checks) == ["refused"]


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("Broker: Topic authorization failed", "acl"),
        ("SASL authentication error: Authentication failed", "auth"),
        ("Failed to resolve 'kafka.invalid:9092'", "dns"),
        ("SSL handshake failed: certificate verify failed", "tls"),
        ("Connection refused", "refused"),
        ("Not authorized", "acl"),
    ],
)
def test_classify(message: str, kind: str) -> None:
    assert classify(message) == kind
