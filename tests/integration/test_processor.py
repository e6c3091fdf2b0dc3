"""The central processor against the real Kafka and InfluxDB, run as `python -m gateway processor`.

What a user would notice: every reading stored once, bad input kept or dead-lettered with a reason
while the run goes on, alarms and validated copies on their topics, 1-minute aggregates equal to
the raw data with one instance, two instances, and after one of them is SIGKILLed; InfluxDB
provisioning that can be run again; plant names that cannot inject Flux.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from gateway.common.metrics import Metrics
from gateway.common.model import Reading
from gateway.processor.aggregate import window_start
from gateway.processor.provision import TASK_PREFIX
from gateway.processor.query import Queries, QueryInputError
from gateway.processor.store import InfluxStore
from tests.support.processor_harness import (
    Processor,
    assert_windows_match_raw,
    cli,
    cli_config,
    make_dataset,
    partials_of,
    produce,
    raw_points,
    read_topic,
    wait_until_done,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _json(msg):
    return json.loads(msg.value())


def test_10000_readings_over_3_plants_are_stored_alarmed_published_and_aggregated(
    servers, influx, tmp_path
):
    client, cfg = influx
    data = make_dataset()
    proc = Processor(data, servers, servers, tmp_path)
    # The third plant's topic appears only while the processor runs: the regex subscription
    # must pick it up without a restart.
    late_plant = data.plants[2]
    # Some readings are sent twice (a gateway re-sends after a crash): stored once, and
    # counted once in their window.
    produce(
        servers,
        dataclasses.replace(data, readings=[r for r in data.readings if r.plant_id != late_plant]),
        resend_every=23,
    )
    proc.start()
    try:
        time.sleep(3)
        produce(
            servers,
            dataclasses.replace(
                data, readings=[r for r in data.readings if r.plant_id == late_plant], odd=[]
            ),
            resend_every=23,
        )
        wait_until_done(client, cfg, data, proc)

        points = raw_points(client, cfg, data)
        assert len(points) == data.stored_expected  # every reading, each stored once
        bad = sorted(
            (p.get("value") or 0.0, p.get("sensor_id")) for p in points if p["quality"] == "bad"
        )
        assert bad == [(0.0, "ph-1"), (15.5, "ph-2")]  # "ERR" kept with no value, pH 15.5 kept

        n_windows = assert_windows_match_raw(client, cfg, data)
        keys = {(r.plant_id, r.parameter, window_start(r.timestamp)) for r in data.readings}
        assert n_windows == len(keys)
        proc.stop_all()

        t = proc.topics
        validated = [_json(m) for m in read_topic(servers, t["validated"], data.stored_expected)]
        assert len({(v["sensorId"], v["plantId"], v["timestamp"]) for v in validated}) == (
            data.stored_expected
        )
        (garbled,) = [v for v in validated if "not_numeric:str" in v["qualityReasons"]]
        assert garbled["quality"] == "bad" and garbled["value"] is None

        alerts = [_json(m) for m in read_topic(servers, t["alerts"], 1)]
        raised = {(a["parameter"], a["level"]) for a in alerts if a["state"] == "raised"}
        assert {("BOD", "critical"), ("pH", "critical")} <= raised

        (dead,) = read_topic(servers, t["deadletter"], 1)
        headers = dict(dead.headers())
        assert (headers["reason"], headers["detail"]) == (b"missing_field", b"sensorId")

        aggregated = [_json(m) for m in read_topic(servers, t["aggregated"], 1)]
        assert {(a["plantId"], a["parameter"], a["windowStart"]) for a in aggregated} == keys
    finally:
        proc.stop_all()
        proc.delete_topics()


def test_two_instances_with_one_sigkilled_mid_run_give_the_same_aggregates(
    servers, influx, tmp_path
):
    """Also with readings re-sent by the gateway: the aggregates are those of the distinct raw
    readings, through a SIGKILL and the replay after it."""
    client, cfg = influx
    data = make_dataset(seed=2)
    proc = Processor(data, servers, servers, tmp_path)
    proc.write_config()
    first, _second = proc.start(), proc.start()
    time.sleep(4)  # both joined the group
    killed = threading.Event()

    def kill_midway(fraction: float) -> None:
        if fraction >= 0.4 and not killed.is_set():
            killed.set()
            proc.kill(first)

    try:
        produce(servers, data, seconds=15, on_progress=kill_midway, resend_every=29)
        assert killed.is_set()
        proc.start()  # the killed instance comes back
        wait_until_done(client, cfg, data, proc)
        assert len(raw_points(client, cfg, data)) == data.stored_expected
        assert_windows_match_raw(client, cfg, data)
    finally:
        proc.stop_all()
        proc.delete_topics()
    assert first.returncode == -9


def test_readings_within_one_millisecond_stay_distinct_and_a_replay_still_stores_once(
    servers, influx, tmp_path
):
    """2,000 messages whose readings come in pairs of one sensor within one millisecond, some
    sent twice: every reading is one point (microseconds kept on the wire and in InfluxDB), a
    re-sent one is still stored and counted once, with and without gatewayId/seq."""
    client, cfg = influx
    data = make_dataset(total=2000, minutes=2, seed=3, twins=True)
    twins = {(r.plant_id, r.sensor_id, math.floor(r.timestamp * 1000)) for r in data.readings}
    assert len(twins) == len(data.readings) // 2  # the data has what the test is about
    proc = Processor(data, servers, servers, tmp_path)
    try:
        produce(servers, data, resend_every=7)
        proc.start()
        wait_until_done(client, cfg, data, proc)
        points = raw_points(client, cfg, data)
        assert len(points) == data.stored_expected
        stored = {(p["plant_id"], p["sensor_id"], p["_time"].timestamp()) for p in points}
        assert {(r.plant_id, r.sensor_id, r.timestamp) for r in data.readings} <= stored
        assert_windows_match_raw(client, cfg, data)
    finally:
        proc.stop_all()
        proc.delete_topics()


def test_setup_influx_twice_leaves_four_buckets_and_two_tasks(servers, influx, tmp_path):
    client, _ = influx
    config = cli_config(tmp_path, servers)
    env = {"INFLUXDB_TOKEN": servers["INFLUXDB_TOKEN"]}
    for _ in range(2):
        result = cli("processor", "setup-influx", "--config", config, env=env)
        assert result.returncode == 0, result.stderr
    assert "created" not in result.stdout  # the second run found everything in place

    days = 86_400
    want = {"sensors": 7 * days, "sensors_1m": 30 * days, "sensors_1h": 365 * days, "sensors_1d": 0}
    buckets = [
        b
        for b in client.buckets_api().find_buckets(limit=100).buckets
        if not b.name.startswith("_")
    ]
    ours = [b for b in buckets if b.name in want]
    assert sorted(b.name for b in ours) == sorted(want)  # each exactly once
    for b in ours:
        every = b.retention_rules[0].every_seconds if b.retention_rules else 0
        assert every == want[b.name], b.name

    tasks = [t for t in client.tasks_api().find_tasks() if t.name.startswith(TASK_PREFIX)]
    assert sorted((t.name, t.every) for t in tasks) == [
        (f"{TASK_PREFIX} sensors_1h to sensors_1d", "1d"),
        (f"{TASK_PREFIX} sensors_1m to sensors_1h", "1h"),
    ]
    assert all(t.status == "active" for t in tasks)


EVIL = 'x") |> drop(columns: ["_value"]) |> yield(name: "pwned") //'


def test_a_plant_name_carrying_flux_is_rejected_by_the_cli(servers, tmp_path):
    config = cli_config(tmp_path, servers)
    env = {"INFLUXDB_TOKEN": servers["INFLUXDB_TOKEN"]}
    for args in (
        ["query", "latest", "--plant", EVIL],
        ["query", "history", "--plant", EVIL, "--parameter", "pH"],
        ["query", "history", "--plant", "north", "--parameter", 'pH" or true //'],
        ["query", "history", "--plant", "north", "--parameter", "pH", "--start", "-1h) |> x("],
    ):
        result = cli(*args, "--config", config, env=env)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "invalid" in result.stderr


def test_plant_names_reach_influxdb_as_data_never_as_flux(servers, influx, tmp_path):
    """Through the product's query path (Queries and the CLI): a plant name carrying Flux is
    refused before anything is sent, even with such a plant's readings stored; a name that passes
    the check yet would be code if spliced into the Flux text is matched as data."""
    client, cfg = influx
    now = time.time()
    run = uuid.uuid4().hex[:8]
    store = InfluxStore(cfg, Metrics())
    store.write_readings([Reading("s-1", "pH", 7.0, "pH", now - 60, plant_id=EVIL)])
    q = Queries(client, cfg)
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    for ask in (
        lambda: q.latest(EVIL),
        lambda: q.history(EVIL, "pH", start="-1h"),
        lambda: q.history(EVIL, "pH", start="-1h", every="1m"),
        lambda: q.windows(EVIL, hour_ago, datetime.now(UTC)),
    ):
        with pytest.raises(QueryInputError, match="invalid plant"):
            ask()

    # Spliced into `r.plant_id == <plant>`, this name would match every plant's readings.
    code = "r.plant_id"
    mine, other = f"literal-{run}", f"other-{run}"
    store.write_readings(
        [
            Reading(mine, "pH", 6.25, "pH", now - 30, plant_id=code),
            Reading("b-1", "BOD", 99.0, "mg/L", now - 20, plant_id=other),
        ]
    )
    latest = q.latest(code, since="-1h")
    assert [(i.parameter, i.sensor_id, i.value) for i in latest] == [("pH", mine, 6.25)]
    config = cli_config(tmp_path, servers)
    env = {"INFLUXDB_TOKEN": servers["INFLUXDB_TOKEN"]}
    args = ["--plant", code, "--start", "-1m", "--json", "--config", config]
    shown = cli("query", "history", "--parameter", "pH", *args, env=env)
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert rows and all(r["sensorId"].startswith("literal-") for r in rows)
    shown = cli("query", "history", "--parameter", "BOD", *args, env=env)
    assert shown.returncode == 0 and json.loads(shown.stdout) == []


def test_query_cli_shows_latest_and_history(servers, influx, tmp_path):
    client, cfg = influx
    plant = f"cli-{int(time.time())}"
    now = time.time()
    readings = [
        Reading("ph-1", "pH", 7.0 + i / 10, "pH", now - 300 + i * 30, plant_id=plant)
        for i in range(10)
    ]
    store = InfluxStore(cfg, Metrics())
    store.write_readings(readings)
    store.write_windows(partials_of(readings))  # what the processor writes besides
    config = cli_config(tmp_path, servers)
    env = {"INFLUXDB_TOKEN": servers["INFLUXDB_TOKEN"]}
    latest = cli("query", "latest", "--plant", plant, "--json", "--config", config, env=env)
    assert latest.returncode == 0, latest.stderr
    (item,) = json.loads(latest.stdout)
    assert (item["parameter"], item["value"], item["quality"]) == ("pH", 7.9, "good")
    hist = cli(
        "query",
        "history",
        "--plant",
        plant,
        "--parameter",
        "pH",
        "--start",
        "-10m",
        "--every",
        "1h",
        "--json",
        "--config",
        config,
        env=env,
    )
    assert hist.returncode == 0, hist.stderr
    assert sum(r["count"] for r in json.loads(hist.stdout)) == 10
    table = cli("query", "latest", "--plant", plant, "--config", config, env=env)
    assert "pH" in table.stdout and "7.9" in table.stdout
    assert Queries(client, cfg).history(plant, "pH", start="-10m")[-1].value == 7.9
