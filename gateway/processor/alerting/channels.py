"""The channels: email over SMTP, SMS through a Twilio-compatible gateway, signed webhooks.

Each channel's ``send`` delivers one notification (``Notification.doc()``) or raises; the sender
(``senders``) owns retries, rate limits and the timeout. Credentials are resolved once, when the
channel is built, from ``env:``/``file:``/``cred:`` references; they are never logged.

- **email**: ``smtplib`` in a worker thread (STARTTLS, implicit TLS or plain; AUTH when a username
  is set), a plain-text part and a short HTML part. smtplib's own socket timeout bounds every
  step, so a server that accepts and never answers costs one worker thread for one timeout.
- **SMS**: ``POST {base_url}/2010-04-01/Accounts/{sid}/Messages.json`` with basic auth (SID,
  token) and the form fields ``From``, ``To``, ``Body``, once per recipient: Twilio's API, which
  compatible gateways speak too.
- **webhook**: ``POST`` of JSON, ``generic`` (the notification document) or ``slack``
  (``{"text": ...}``), with ``X-Timestamp`` (epoch seconds) and
  ``X-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>." + body>`` when a secret is set, and
  ``X-Notification-Id`` so a receiver can drop a retried delivery it already has.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import html
import json
import smtplib
import ssl
import time
from email.message import EmailMessage
from typing import Any, Protocol

import aiohttp

from gateway.common.config import secret
from gateway.processor.alerting.config import (
    ChannelConfig,
    EmailConfig,
    NotificationsConfig,
    SmsConfig,
    WebhookConfig,
)


class Channel(Protocol):
    name: str

    @property
    def config(self) -> ChannelConfig: ...

    async def send(self, session: aiohttp.ClientSession, doc: dict[str, Any]) -> None: ...


def sign(key: bytes, timestamp: str, body: bytes) -> str:
    """The webhook's ``X-Signature`` value."""
    return "sha256=" + hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class ChannelFailed(Exception):
    """The far end refused or failed (status and a short excerpt of its answer)."""


async def _check(response: aiohttp.ClientResponse) -> None:
    if response.status >= 300:
        text = (await response.text())[:200]
        raise ChannelFailed(f"HTTP {response.status}: {text}")


class Email:
    def __init__(self, name: str, config: EmailConfig, source: str) -> None:
        self.name, self.config = name, config
        key = f"notifications.email.{name}.password"
        self._password = secret(config.password, source=source, key=key) if config.password else ""

    def message(self, doc: dict[str, Any]) -> EmailMessage:
        msg = EmailMessage()
        msg["Subject"] = doc["subject"]
        msg["From"] = self.config.sender
        msg["To"] = ", ".join(self.config.to)
        msg["X-Notification-Id"] = doc["id"]
        msg.set_content(doc["text"] + "\n")
        rows = "".join(f"<li>{html.escape(line)}</li>" for line in doc["text"].splitlines()[1:])
        msg.add_alternative(
            f"<html><body><h3>{html.escape(doc['subject'])}</h3><ul>{rows}</ul></body></html>",
            subtype="html",
        )
        return msg

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.config.ca_file or None)

    def _send_blocking(self, msg: EmailMessage) -> None:
        c, timeout = self.config, self.config.timeout_seconds
        smtp: smtplib.SMTP
        if c.tls == "implicit":
            smtp = smtplib.SMTP_SSL(c.host, c.port, timeout=timeout, context=self._context())
        else:
            smtp = smtplib.SMTP(c.host, c.port, timeout=timeout)
        with smtp:
            if c.tls == "starttls":
                smtp.starttls(context=self._context())
            if c.username:
                smtp.login(c.username, self._password)
            smtp.send_message(msg)

    async def send(self, session: aiohttp.ClientSession, doc: dict[str, Any]) -> None:
        await asyncio.to_thread(self._send_blocking, self.message(doc))


class Sms:
    def __init__(self, name: str, config: SmsConfig, source: str) -> None:
        self.name, self.config = name, config
        token = secret(config.auth_token, source=source, key=f"notifications.sms.{name}.auth_token")
        basic = base64.b64encode(f"{config.account_sid}:{token}".encode()).decode()
        self._headers = {"Authorization": f"Basic {basic}"}
        base = config.base_url.rstrip("/")
        self.url = f"{base}/2010-04-01/Accounts/{config.account_sid}/Messages.json"

    async def send(self, session: aiohttp.ClientSession, doc: dict[str, Any]) -> None:
        body = doc["subject"][:300]
        for to in self.config.to:
            form = {"From": self.config.from_number, "To": to, "Body": body}
            async with session.post(self.url, data=form, headers=self._headers) as response:
                await _check(response)


class Webhook:
    def __init__(self, name: str, config: WebhookConfig, source: str) -> None:
        self.name, self.config = name, config
        key = f"notifications.webhook.{name}.secret"
        self._key = secret(config.secret, source=source, key=key).encode() if config.secret else b""

    def body(self, doc: dict[str, Any]) -> bytes:
        payload = {"text": doc["text"]} if self.config.format == "slack" else doc
        return json.dumps(payload, separators=(",", ":")).encode()

    async def send(self, session: aiohttp.ClientSession, doc: dict[str, Any]) -> None:
        body, ts = self.body(doc), str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Timestamp": ts,
            "X-Notification-Id": doc["id"],
        }
        if self._key:
            headers["X-Signature"] = sign(self._key, ts, body)
        async with session.post(self.config.url, data=body, headers=headers) as response:
            await _check(response)


def build_channels(config: NotificationsConfig, source: str) -> list[Channel]:
    """Every configured channel, its credentials resolved (ConfigError if one cannot be)."""
    channels: list[Channel] = []
    channels += [Email(n, c, source) for n, c in config.email.items()]
    channels += [Sms(n, c, source) for n, c in config.sms.items()]
    channels += [Webhook(n, c, source) for n, c in config.webhook.items()]
    return channels
