"""Alerts reach people, end to end: the processor run as ``python -m gateway processor run`` on the
real Kafka and InfluxDB, notifying a real SMTP server (aiosmtpd, STARTTLS and AUTH), an SMS gateway
stub speaking Twilio's form API and a webhook receiver checking the HMAC; operator actions through
the ``edge-gateway alerts`` CLI.

Alarm events are published to the run's alerts topic as gateways publish theirs (the processor's
own alarms take the same topic); readings go through the raw topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient

from gateway.common.alarms import make_id
from gateway.common.model import AlarmEvent, Reading
from tests.support import receivers as rx
from tests.support.net import free_port
from tests.support.processor_harness import (
    Processor,
    RawProducer,
    cli,
    create_topic,
    influx_config,
    live_dataset,
    wait_serving,
)
from tests.support.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TOKEN = "alerts-s3cret"
GROUP_WAIT, REPEAT = 0.5, 10.0


@dataclass
class Receivers:
    smtp: Any  # SmtpReceiver, or HangingSmtp until released
    sms: rx.SmsGateway = field(default_factory=lambda: rx.SmsGateway().start())
    hook: rx.WebhookReceiver = field(default_factory=lambda: rx.WebhookReceiver().start())

    def emails(self) -> list[str]:
        box = self.smtp if isinstance(self.smtp, rx.SmtpReceiver) else self.smtp.receiver
        return [] if box is None else [str(m["Subject"]) for m in box.messages]

    def counts(self, plant: str) -> tuple[int, int, int]:
        """Emails, SMS and webhooks that name ``plant``."""
        return (
            sum(plant in s for s in self.emails()),
            sum(plant in r.body for r in self.sms.requests),
            sum(h.body.get("plantId") == plant for h in self.hook.received),
        )

    def kinds(self, plant: str) -> list[str]:
        return [h.body["kind"] for h in self.hook.received if h.body.get("plantId") == plant]

    def stop(self) -> None:
        self.smtp.stop()
        self.sms.stop()
        self.hook.stop()


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return rx.make_cert(tmp_path_factory.mktemp("certs"))


def _notifications(
    r: Receivers, smtp_port: int, ca: Path, state: Path, actions: str, timeout: float, repeat: float
) -> str:
    fast = f"timeout_seconds = {timeout}\nretry_max_seconds = 1.0\nrate_per_minute = 600.0\n"
    return f"""
[notifications]
enabled = true
state_path = "{state}"
actions_topic = "{actions}"
group_wait = {GROUP_WAIT}
repeat_interval = {repeat}
flood_count = 10
flood_window = 600

[notifications.email.ops]
host = "127.0.0.1"
port = {smtp_port}
tls = "starttls"
username = "{rx.SMTP_USER}"
password = "env:TEST_SMTP_PASSWORD"
ca_file = "{ca}"
sender = "gateway@plant.test"
to = ["oncall@plant.test"]
{fast}
[notifications.sms.oncall]
base_url = "{r.sms.url}"
account_sid = "{rx.SMS_SID}"
auth_token = "env:TEST_SMS_TOKEN"
from_number = "+15550100"
to = ["+15550111"]
{fast}
[notifications.webhook.hook]
url = "{r.hook.url}"
secret = "env:TEST_HOOK_SECRET"
{fast}
[[notifications.routes]]
levels = ["critical"]
channels = ["ops", "oncall", "hook"]

[[notifications.routes]]
levels = ["warning"]
channels = ["hook"]
resolved = false
"""


def _processor(
    servers: dict[str, str],
    workdir: Path,
    r: Receivers,
    smtp_port: int,
    ca: Path,
    timeout: float,
    repeat: float = REPEAT,
) -> Processor:
    proc = Processor(live_dataset(), servers, servers, workdir, http_port=free_port())
    actions = f"t{proc.data.run}.alert-actions"
    state = workdir / "alerts.db"
    proc.extra_config = _notifications(r, smtp_port, ca, state, actions, timeout, repeat)
    proc.settings = {"processor": {"http_token": "env:EDGE_PROCESSOR_TOKEN"}}
    proc.env = {
        "EDGE_PROCESSOR_TOKEN": TOKEN,
        "TEST_SMTP_PASSWORD": rx.SMTP_PASSWORD,
        "TEST_SMS_TOKEN": rx.SMS_TOKEN,
        "TEST_HOOK_SECRET": rx.WEBHOOK_SECRET,
    }
    create_topic(servers, proc.topics["alerts"], 2)
    return proc


def _end(proc: Processor) -> None:
    """Stop the run's instances, delete its topics (the actions topic too)."""
    proc.stop_all()
    proc.delete_topics()
    admin = AdminClient({"bootstrap.servers": proc.kafka["KAFKA_BOOTSTRAP_SERVERS"]})
    for future in admin.delete_topics([f"t{proc.data.run}.alert-actions"]).values():
        with contextlib.suppress(KafkaException):
            future.result(30)


class Alarms:
    """Publishes alarm events to the run's alerts topic, keyed by plant as the producers do."""

    def __init__(self, servers: dict[str, str], topic: str) -> None:
        self.topic = topic
        self._p = Producer({"bootstrap.servers": servers["KAFKA_BOOTSTRAP_SERVERS"]})

    def event(
        self, plant: str, sensor: str, state: str = "raised", level: str = "critical", n: int = 0
    ) -> AlarmEvent:
        cond = "HH" if level == "critical" else "H"
        alarm_id = make_id(plant, sensor, "BOD", cond)
        return AlarmEvent(
            alarm_id, make_id(alarm_id, state, str(n)), sensor, plant, "BOD", cond, level,
            state, 150.0, 100.0 if level == "critical" else 30.0, time.time(), "BOD high",
        )  # fmt: skip

    def send(self, *events: AlarmEvent) -> None:
        for e in events:
            self._p.produce(self.topic, e.to_json(), e.plant_id.encode())
        assert self._p.flush(30) == 0


def _alerts_cli(base: str, *args: str) -> Any:
    env = {"EDGE_PROCESSOR_TOKEN": TOKEN, "EDGE_PROCESSOR_URL": base}
    done = cli("alerts", *args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout) if done.stdout.strip().startswith("{") else done.stdout


@pytest.fixture
def receivers(cert) -> Iterator[Receivers]:
    r = Receivers(rx.SmtpReceiver(*cert).start())
    try:
        yield r
    finally:
        r.stop()


def test_alert_lifecycle_with_reminders_inhibition_actions_and_flood(
    servers, tmp_path, cert, receivers
):
    r = receivers
    proc = _processor(servers, tmp_path, r, r.smtp.port, cert[0], timeout=10.0)
    proc.start()
    try:
        base = wait_serving(proc)
        run = proc.data.run
        main, acked, shelved, oos, flood = (f"p{run}-{n}" for n in ("a", "b", "c", "d", "f"))
        alarms = Alarms(servers, proc.topics["alerts"])
        first = alarms.event(main, "s1")
        alarms.send(first, alarms.event(acked, "s1"), alarms.event(shelved, "s1"))
        # one critical: exactly one email, one SMS, one correctly signed webhook
        for plant in (main, acked, shelved):
            wait_until(lambda p=plant: r.counts(p) == (1, 1, 1), 60, f"{plant}'s notifications")
        sent_at = time.monotonic()
        assert r.hook.refused == 0 and r.sms.refused == 0
        # operator actions from the CLI, before the reminders are due
        ack_id, shelve_id = alarms.event(acked, "s1").alarm_id, alarms.event(shelved, "s1").alarm_id
        acked_live = _live_after(base, acked, "ack", ack_id, "--by", "ana", "--note", "on it")
        assert (acked_live["alarmId"], acked_live["state"]) == (ack_id, "acknowledged")
        _alerts_cli(base, "shelve", shelve_id, "--for", "1h", "--by", "bo")
        assert time.monotonic() - sent_at < REPEAT - 1, "the actions came too late to test"
        _alerts_cli(base, "out-of-service", "s9", "--for", "4h", "--by", "cal")
        # 100 repeats of the same condition (and a replay of the first event), the matching
        # warning, an alarm of the sensor out of service, a flood of 50 on another plant
        repeats = [alarms.event(main, "s1", "re-raised", n=i) for i in range(100)]
        alarms.send(*repeats, first, alarms.event(main, "s1", level="warning"))
        alarms.send(alarms.event(oos, "s9"))
        alarms.send(*(alarms.event(flood, f"f{i}") for i in range(50)))
        wait_until(lambda: r.counts(flood) == (1, 1, 1), 30, "the flood summary")
        assert r.kinds(flood) == ["flood"]
        # after the repeat interval: one reminder of the main alarm, none of the acked or shelved
        wait_until(lambda: r.counts(main) == (2, 2, 2), REPEAT + 30, "one reminder")
        time.sleep(2.0)  # the others' reminders would be due by now
        assert r.counts(main) == (2, 2, 2)
        assert r.kinds(main) == ["alert", "reminder"]  # the warning is inhibited
        assert r.counts(acked) == r.counts(shelved) == (1, 1, 1)
        assert r.counts(oos) == (0, 0, 0)
        # cleared: one resolved message on each channel of the critical route
        warning_cleared = alarms.event(main, "s1", "cleared", level="warning")
        alarms.send(warning_cleared, alarms.event(main, "s1", "cleared"))
        wait_until(lambda: r.counts(main) == (3, 3, 3), 30, "the resolved message")
        assert r.kinds(main) == ["alert", "reminder", "resolved"]
        assert r.counts(flood) == (1, 1, 1)
        # each action in the list with who and when
        listing = _alerts_cli(base, "list", "--json")
        by_id = {a["alarmId"]: a for a in listing["alerts"]}
        assert by_id[ack_id]["ackedBy"] == "ana" and by_id[ack_id]["ackedAt"]
        assert by_id[shelve_id]["shelvedBy"] == "bo" and by_id[shelve_id]["shelvedUntil"]
        assert by_id[first.alarm_id]["state"] == "cleared"
        assert [o["sensorId"] for o in listing["outOfService"]] == ["s9"]
        history = {(h["action"], h["by"]) for h in listing["history"]}
        assert history == {("acknowledged", "ana"), ("shelved", "bo"), ("out_of_service", "cal")}
        assert all(h["at"] for h in listing["history"])
        active = _alerts_cli(base, "list", "--active", "--plant", acked, "--json")
        assert [a["alarmId"] for a in active["alerts"]] == [ack_id]
        text = _alerts_cli(base, "list")
        assert "acked by ana" in text
        with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
        for channel in ("ops", "oncall", "hook"):
            assert f'iot_notifications_sent_total{{channel="{channel}"}}' in metrics
            assert f'iot_notification_queue_depth{{channel="{channel}"}}' in metrics
        assert "iot_notification_oldest_unsent_seconds" in metrics
    finally:
        _end(proc)


def _live_after(base: str, plant: str, *action: str) -> dict[str, Any]:
    """Runs ``edge-gateway alerts ACTION...`` while a live feed client of the plant listens; the
    alert message the action brought to the feed."""

    async def scenario() -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{base}/ws?plant={plant}&token={TOKEN}") as ws,
        ):
            assert (await ws.receive_json(timeout=10))["type"] == "snapshot"
            await asyncio.to_thread(_alerts_cli, base, *action)
            while True:
                msg = await ws.receive_json(timeout=10)
                if msg["type"] == "alert" and msg["state"] not in ("raised", "re-raised"):
                    return dict(msg)

    return asyncio.run(scenario())


def _unsent(db: Path) -> int:
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT id, attempts FROM outbox WHERE sent_at IS NULL").fetchall()
    con.close()
    return len(rows)


def _stored(servers: dict[str, str], plant: str) -> int:
    cfg = influx_config(servers)
    flux = (
        f'from(bucket: "{cfg.bucket}") |> range(start: -1h) |> filter(fn: (r) => '
        f'r._measurement == "water_quality" and r.plant_id == "{plant}" and r._field == "value")'
        " |> count()"
    )
    with cfg.client() as client:
        tables = client.query_api().query(flux, org=cfg.org)
    return sum(int(rec.get_value()) for t in tables for rec in t.records)


def test_killed_before_sending_then_a_hanging_smtp_server(servers, tmp_path, cert):
    hanging = rx.HangingSmtp(*cert)
    r = Receivers(hanging)
    # no reminders in this test: every message counted is the first of its alarm
    proc = _processor(servers, tmp_path, r, hanging.port, cert[0], timeout=2.0, repeat=3600)
    try:
        # decided, recorded, never sent: the processor dies between deciding and sending
        held = proc.start(env={"EDGE_ALERTS_TEST_HOLD_SENDS": "1"})
        wait_serving(proc)
        run = proc.data.run
        killed, later, readings = f"p{run}-k", f"p{run}-h", f"p{run}-r"
        alarms = Alarms(servers, proc.topics["alerts"])
        alarms.send(alarms.event(killed, "s1"))
        wait_until(lambda: _unsent(tmp_path / "alerts.db") == 3, 60, "the decision recorded")
        proc.kill(held)
        assert r.counts(killed) == (0, 0, 0)
        # restarted with an SMTP server that accepts and never answers
        proc.start()
        base = _serving(proc)
        wait_until(lambda: r.counts(killed)[1:] == (1, 1), 60, "SMS and webhook after restart")
        # the dead instance's partitions come back after the group's session timeout: an alarm
        # of another plant shows this instance decides them all before the timed one is sent
        warm = f"p{run}-w"
        alarms.send(alarms.event(warm, "s1"))
        wait_until(lambda: r.counts(warm)[2] == 1, 60, "the partitions back after the kill")
        published = time.monotonic()
        alarms.send(alarms.event(later, "s1"))
        wait_until(lambda: r.counts(later)[1:] == (1, 1), 20, "SMS and webhook of a new alarm")
        took = time.monotonic() - published
        assert took < GROUP_WAIT + 1.0, f"SMS and webhook took {took:.2f} s"
        assert hanging.accepted >= 1 and r.emails() == []
        # the pipeline keeps storing readings meanwhile
        producer, now = RawProducer(servers), time.time()
        producer.send(
            [
                Reading(
                    f"bod-{i % 5}",
                    "BOD",
                    10.0,
                    "mg/L",
                    now - 30 + i * 0.1,
                    plant_id=readings,
                    gateway_id="gw-1",
                    seq=i,
                )
                for i in range(200)
            ]
        )
        wait_until(lambda: _stored(servers, readings) == 200, 60, "readings stored")
        health = _get_health(base)
        assert health["checks"]["notifier"]["status"] == "degraded", health
        # the server answers: each email delivered, once; nothing sent twice
        hanging.release()
        wait_until(lambda: r.counts(killed) == (1, 1, 1), 60, "the email of the killed run")
        wait_until(lambda: r.counts(later) == (1, 1, 1), 60, "the email of the new alarm")
        time.sleep(2.0)
        assert r.counts(killed) == (1, 1, 1) and r.counts(later) == (1, 1, 1)
        wait_until(lambda: _unsent(tmp_path / "alerts.db") == 0, 30, "every outbox row sent")
        # and a clean restart sends nothing again
        proc.stop(proc.procs[-1])
        proc.procs[-1].wait(30)
        proc.start()
        _serving(proc)
        time.sleep(3.0)
        assert r.counts(killed) == (1, 1, 1) and r.counts(later) == (1, 1, 1)
    finally:
        _end(proc)
        r.stop()


def _serving(proc: Processor, port: int = 0) -> str:
    """Until the newest instance answers /health (the harness's wait would count the instances
    this test ended on purpose as failures)."""
    base = f"http://127.0.0.1:{port or proc.http_port}"

    def answers() -> bool:
        if proc.procs[-1].poll() is not None:
            raise AssertionError(f"processor exited:\n{proc.logs()}")
        try:
            _get_health(base)
            return True
        except OSError:
            return False

    wait_until(answers, 60, "the restarted processor's HTTP server")
    return base


def _get_health(base: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(base + "/health", timeout=10) as response:
            return dict(json.load(response))
    except urllib.error.HTTPError as e:
        return dict(json.load(e))


def _owners(servers: dict[str, str], group: str) -> list[int]:
    """Partitions each member of the consumer group has (empty while it rebalances)."""
    admin = AdminClient({"bootstrap.servers": servers["KAFKA_BOOTSTRAP_SERVERS"]})
    (future,) = admin.describe_consumer_groups([group]).values()
    members = future.result(30).members
    return [len(m.assignment.topic_partitions) for m in members]


def _act(base: str, **doc: Any) -> dict[str, Any]:
    request = urllib.request.Request(
        base + "/api/alerts/action",
        data=json.dumps(doc).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=15) as response:
        return dict(json.load(response))


def _listing(base: str) -> dict[str, Any]:
    request = urllib.request.Request(
        base + "/api/alerts", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=15) as response:
        return dict(json.load(response))


def test_two_instances_notify_each_alarm_once_and_share_actions(servers, tmp_path, cert, receivers):
    r = receivers
    proc = _processor(servers, tmp_path, r, r.smtp.port, cert[0], timeout=10.0)
    try:
        proc.start()
        base_a = wait_serving(proc)
        # a second instance: its own HTTP port and its own alert state
        port_b = free_port()
        own = str(tmp_path / "alerts.db")
        proc.extra_config = proc.extra_config.replace(own, str(tmp_path / "alerts-b.db"))
        proc.start(http_port=port_b)
        base_b = _serving(proc, port_b)
        group = f"{proc.group}-alerts"
        wait_until(lambda: sorted(_owners(servers, group)) == [1, 1], 90, "both own a partition")
        run = proc.data.run
        plants = [f"p{run}-m{i}" for i in range(6)]
        alarms = Alarms(servers, proc.topics["alerts"])
        events = [alarms.event(p, "s1") for p in plants]
        alarms.send(*events)
        alarms.send(*events)  # a replay changes nothing
        for p in plants:
            wait_until(lambda p=p: r.counts(p) == (1, 1, 1), 60, f"{p}'s notifications")
        sent_at = time.monotonic()
        # each alarm is in the state of the instance that owns its plant, and only there
        known_a = {a["alarmId"] for a in _listing(base_a)["alerts"]}
        known_b = {a["alarmId"] for a in _listing(base_b)["alerts"]}
        assert known_a | known_b == {e.alarm_id for e in events} and not known_a & known_b
        # acknowledged through one instance, whichever owns the plant: no reminders anywhere
        for e in events:
            answer = _act(base_a, action="ack", id=e.alarm_id, by="ana")
            assert answer.get("known", True) == (e.alarm_id in known_a)
        assert time.monotonic() - sent_at < REPEAT - 1, "the acks came too late to test"
        wait_until(
            lambda: all(a["ackedBy"] == "ana" for a in _listing(base_b)["alerts"]),
            30,
            "instance B honouring the acks it was passed",
        )
        time.sleep(max(0.0, sent_at + REPEAT + 2.0 - time.monotonic()))
        assert all(r.counts(p) == (1, 1, 1) for p in plants)
    finally:
        _end(proc)
