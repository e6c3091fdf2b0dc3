"""The notification channels and their senders against real receivers on 127.0.0.1: aiosmtpd with
STARTTLS and AUTH, a Twilio-compatible SMS gateway stub, a webhook receiver checking the HMAC.
In-process (no Kafka): decisions are written to the outbox as the notifier writes them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest

from gateway.common.metrics import Metrics
from gateway.processor.alerting.channels import build_channels
from gateway.processor.alerting.config import (
    EmailConfig,
    NotificationsConfig,
    SmsConfig,
    WebhookConfig,
)
from gateway.processor.alerting.routing import Discipline, Notification
from gateway.processor.alerting.senders import Senders
from gateway.processor.alerting.statedb import StateDb
from tests.support import receivers as rx
from tests.support.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return rx.make_cert(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def http_receivers() -> Iterator[tuple[rx.SmsGateway, rx.WebhookReceiver]]:
    sms, hook = rx.SmsGateway().start(), rx.WebhookReceiver().start()
    try:
        yield sms, hook
    finally:
        sms.stop()
        hook.stop()


def _config(
    smtp_port: int,
    cert: Path,
    sms: rx.SmsGateway,
    hook: rx.WebhookReceiver,
    timeout: float = 5,
    tls: Literal["starttls", "implicit"] = "starttls",
) -> NotificationsConfig:
    fast = {"timeout_seconds": timeout, "retry_max_seconds": 1.0, "rate_per_minute": 600.0}
    return NotificationsConfig(
        enabled=True,
        email={
            "ops": EmailConfig(
                host="127.0.0.1", port=smtp_port, tls=tls, username=rx.SMTP_USER,
                password="env:TEST_SMTP_PASSWORD", ca_file=str(cert), sender="gw@plant.test",
                to=["oncall@plant.test"], **fast,
            )
        },
        sms={
            "oncall": SmsConfig(
                base_url=sms.url, account_sid=rx.SMS_SID, auth_token="env:TEST_SMS_TOKEN",
                from_number="+15550100", to=["+15550111"], **fast,
            )
        },
        webhook={"hook": WebhookConfig(url=hook.url, secret="env:TEST_HOOK_SECRET", **fast)},
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_SMTP_PASSWORD", rx.SMTP_PASSWORD)
    monkeypatch.setenv("TEST_SMS_TOKEN", rx.SMS_TOKEN)
    monkeypatch.setenv("TEST_HOOK_SECRET", rx.WEBHOOK_SECRET)


def _decide(db: StateDb, config: NotificationsConfig) -> None:
    note = Notification(
        "alert:e1", "alert", "north", "critical", tuple(config.channel_names()),
        "[CRITICAL] north/s1 BOD HH 150", "[CRITICAL] north/s1 BOD HH 150\nBOD high",
        ({"alarmId": "a1", "plantId": "north"},),
    )  # fmt: skip
    assert db.save(Discipline(config), ["e1"], [note], time.time()) == 3
    assert db.save(Discipline(config), ["e1"], [note], time.time()) == 0  # replayed: kept once


# over implicit TLS aiosmtpd's AUTH is on a TLS session, though it warns it cannot tell
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_one_notification_reaches_each_channel_once(tmp_path, cert, http_receivers, tls):
    sms, hook = http_receivers
    smtp = rx.SmtpReceiver(*cert, implicit=tls == "implicit").start()
    config = _config(smtp.port, cert[0], sms, hook, tls=tls)
    db = StateDb(tmp_path / "alerts.db")
    senders = Senders(build_channels(config, "test"), db, Metrics())
    senders.start()
    try:
        _decide(db, config)
        senders.wake()
        wait_until(lambda: smtp.messages and sms.requests and hook.received, 20, "deliveries")
        time.sleep(1.0)  # nothing more comes
        assert (len(smtp.messages), len(sms.requests), len(hook.received)) == (1, 1, 1)
        mail = smtp.messages[0]
        assert mail["Subject"] == "[CRITICAL] north/s1 BOD HH 150"
        types = [p.get_content_type() for p in mail.walk()]
        assert "text/plain" in types and "text/html" in types
        assert sms.requests[0].to == "+15550111" and "BOD" in sms.requests[0].body
        assert hook.refused == 0 and hook.received[0].notification_id == "alert:e1"
    finally:
        senders.stop()
        db.close()
        smtp.stop()


def test_a_hanging_smtp_server_delays_only_the_email(tmp_path, cert, http_receivers):
    sms, hook = http_receivers
    hanging = rx.HangingSmtp(*cert)
    config = _config(hanging.port, cert[0], sms, hook, timeout=2.0)
    db = StateDb(tmp_path / "alerts.db")
    senders = Senders(build_channels(config, "test"), db, Metrics())
    senders.start()
    try:
        start = time.monotonic()
        _decide(db, config)
        senders.wake()
        wait_until(lambda: sms.requests and hook.received, 1.0, "SMS and webhook within 1 s")
        wait_until(lambda: hanging.accepted, 5, "the email connecting")
        assert time.monotonic() - start < 1.5
        wait_until(lambda: not senders.health()[0], 10, "the email channel reported failing")
        smtp = hanging.release()
        wait_until(lambda: smtp.messages, 30, "the email once the server answers")
        wait_until(lambda: senders.health()[0], 5, "the email channel healthy again")
        assert len(smtp.messages) == 1 and len(sms.requests) == 1 and len(hook.received) == 1
    finally:
        senders.stop()
        db.close()
        hanging.stop()
