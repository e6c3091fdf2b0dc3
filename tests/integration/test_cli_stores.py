"""``edge-gateway buffer`` and ``deadletter`` on real store files, replay to the real Kafka."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.common.metrics import Metrics
from gateway.common.model import Reading
from gateway.edge.buffer import Buffer, BufferConfig
from gateway.edge.deadletter import DeadLetterStore
from tests.support.gateway_harness import KafkaCollector, run_id, toml_dumps
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration


def setup_files(tmp_path: Path, kafka: str) -> Path:
    config = tmp_path / "gw.toml"
    doc = {
        "gateway": {"id": "gw-stores", "plant_id": "north"},
        "buffer": {"path": str(tmp_path / "buffer.db")},
        "deadletter": {"path": str(tmp_path / "deadletter.db")},
        "calibration": {"store": str(tmp_path / "cal.sqlite")},
        "kafka": {"bootstrap_servers": kafka},
    }
    config.write_text(toml_dumps(doc))
    now = time.time()
    with Buffer(BufferConfig(path=str(tmp_path / "buffer.db")), "gw-stores", Metrics()) as b:
        b.submit_wait(
            [Reading(f"cod-{i}", "COD", float(i), "mg/L", now, "north", "inlet") for i in range(5)],
            30,
        )
        b.submit_wait([Reading("tss-1", "TSS", 40.0, "mg/L", now, "south", "outlet")], 30)
    return config


def run(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(app, list(args), input=input)


def test_buffer_stats_peek_export_replay_and_purge(kafka_env: dict[str, str], tmp_path: Path):
    config = setup_files(tmp_path, kafka_env["KAFKA_BOOTSTRAP_SERVERS"])
    c = ("--config", str(config))
    stats = run("buffer", "stats", *c, "--json")
    assert stats.exit_code == 0, stats.output
    plants = {p["plant"]: p for p in json.loads(stats.stdout)["plants"]}
    assert plants["north"]["rows"] == 5 and plants["south"]["rows"] == 1
    assert plants["north"]["bytes"] > 0 and plants["north"]["oldestAgeS"] >= 0

    peek = run("buffer", "peek", *c, "--limit", "2", "--json")
    rows = json.loads(peek.stdout)
    assert [r["record"]["sensorId"] for r in rows] == ["cod-0", "cod-1"]
    assert run("buffer", "peek", *c).exit_code == 0

    export = run("buffer", "export", *c, "--plant", "north")
    lines = [json.loads(x) for x in export.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 5 and all(x["gatewayId"] == "gw-stores" for x in lines)

    topic = f"t.replay.{run_id()}"
    with KafkaCollector(kafka_env["KAFKA_BOOTSTRAP_SERVERS"], [topic]) as kafka:
        replay = run("buffer", "replay", *c, "--plant", "north", "--topic", topic)
        assert replay.exit_code == 0, replay.output
        got = wait_until(
            lambda: len(kafka.snapshot(topic)) >= 5 and kafka.snapshot(topic),
            60,
            "the replayed rows",
        )
        assert sorted(m.value["seq"] for m in got) == sorted(x["seq"] for x in lines)
        assert got[0].headers["source"] == "iot-gateway" and got[0].key.startswith("cod-")

    refused = run("buffer", "purge", *c, "--plant", "south", input="n\n")
    assert refused.exit_code == 1
    # A running gateway owns the rows: purge waits for it to stop.
    with Buffer(BufferConfig(path=str(tmp_path / "buffer.db")), "gw-stores", Metrics()):
        busy = run("buffer", "purge", *c, "--plant", "south", "--yes")
        assert busy.exit_code == 1 and "in use by a running gateway" in busy.output
    purged = run("buffer", "purge", *c, "--plant", "south", "--yes")
    assert purged.exit_code == 0, purged.output
    assert "purged 1 row(s) of plant south" in purged.output
    after = json.loads(run("buffer", "stats", *c, "--json").stdout)["plants"]
    assert [p["plant"] for p in after] == ["north"]


def test_dead_letters_list_show_export_retry_and_purge(tmp_path: Path) -> None:
    config = setup_files(tmp_path, "127.0.0.1:1")
    c = ("--config", str(config))
    store = DeadLetterStore(tmp_path / "deadletter.db")
    try:
        store.add("mqtt", "t/x", "not_json", b"{broken", "line 1")
        fixable = {
            "sensorId": "cod-9",
            "parameter": "COD",
            "value": "12",
            "unit": "mg/L",
            "timestamp": "2026-12-07T04:00:00Z",
            "plantId": "north",
        }
        store.add("mqtt", "t/y", "wrong_type", json.dumps(fixable).encode(), "value: a string")
    finally:
        store.close()
    listed = json.loads(run("deadletter", "list", *c, "--json").stdout)
    assert [d["reason"] for d in listed] == ["wrong_type", "not_json"]
    assert run("deadletter", "list", *c).exit_code == 0
    ident = listed[0]["id"]
    shown = json.loads(run("deadletter", "show", *c, str(ident), "--json").stdout)
    assert json.loads(shown["payload"])["sensorId"] == "cod-9"
    exported = run("deadletter", "export", *c, "--source", "mqtt")
    assert len([x for x in exported.stdout.splitlines() if x.startswith("{")]) == 2

    # As stored, the value is a string: refused, and the dead letter stays.
    bad = run("deadletter", "retry", *c, str(ident))
    assert bad.exit_code == 3 and "wrong_type" in bad.output
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({**fixable, "value": 12.0}))
    ok = run("deadletter", "retry", *c, str(ident), "--payload-file", str(fixed))
    assert ok.exit_code == 0, ok.output
    peek = json.loads(run("buffer", "peek", *c, "--newest", "--limit", "1", "--json").stdout)
    assert peek[0]["record"]["sensorId"] == "cod-9" and peek[0]["record"]["value"] == 12.0
    assert [d["reason"] for d in json.loads(run("deadletter", "list", *c, "--json").stdout)] == [
        "not_json"
    ]
    purge = run("deadletter", "purge", *c, "--all", "--yes")
    assert purge.exit_code == 0 and "purged 1 dead letter(s)" in purge.output
    assert json.loads(run("deadletter", "list", *c, "--json").stdout) == []
