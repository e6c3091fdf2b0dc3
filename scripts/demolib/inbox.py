"""The demo's stand-ins for the plant's mail and chat: ``tests/support/receivers.py`` run as a
process (a STARTTLS SMTP server with AUTH, an SMS gateway stub and an HMAC-checking webhook
receiver); what they received is read from the counts they print to their log."""

from __future__ import annotations

import re
from pathlib import Path

RECEIVED = re.compile(r"received: (\d+) emails, (\d+) SMS, (\d+) webhooks")


def command(python: str, ports: dict[str, int], certs: Path) -> list[str]:
    return [
        python, "-m", "tests.support.receivers", "--smtp-port", str(ports["smtp"]),
        "--sms-port", str(ports["sms"]), "--webhook-port", str(ports["webhook"]),
        "--certs", str(certs),
    ]  # fmt: skip


def secrets() -> tuple[str, str]:
    """(the SMTP password, the webhook secret) the receivers accept."""
    from tests.support.receivers import SMTP_PASSWORD, WEBHOOK_SECRET

    return SMTP_PASSWORD, WEBHOOK_SECRET


def smtp_ca(certs: Path) -> Path:
    return certs / "smtp-cert.pem"


def ready(log: Path) -> bool:
    return log.exists() and "webhook " in log.read_text(errors="replace")


def counts(log: Path) -> tuple[int, int]:
    """(emails, webhook calls) received so far."""
    found = RECEIVED.findall(log.read_text(errors="replace")) if log.exists() else []
    return (int(found[-1][0]), int(found[-1][2])) if found else (0, 0)
