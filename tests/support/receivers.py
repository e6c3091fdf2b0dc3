"""Real receivers for notifications, on 127.0.0.1: an SMTP server (aiosmtpd, STARTTLS and AUTH),
an SMTP server that accepts connections and never answers until released, an SMS gateway stub
speaking Twilio's form API, and a webhook receiver that checks the HMAC signature.

Each records what it received; each is started with ``start()`` and stopped with ``stop()``. Run
``python -m tests.support.receivers [--smtp-port N --sms-port N --webhook-port N --certs DIR]`` to
start them all (ports, credentials and the CA file are printed) until interrupted, e.g. for the
demo.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any, Self

from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.support.net import free_port

SMTP_USER, SMTP_PASSWORD = "alerts", "smtp-s3cret"
SMS_SID, SMS_TOKEN = "AC0123456789", "sms-s3cret"
WEBHOOK_SECRET = "hook-s3cret"


def make_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl): (cert, key)."""
    cert, key = folder / "smtp-cert.pem", folder / "smtp-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.original_content or envelope.content))
        return "250 OK"


def _authenticate(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        SMTP_USER.encode(),
        SMTP_PASSWORD.encode(),
    )
    return AuthResult(success=ok)


class SmtpReceiver:
    """aiosmtpd requiring STARTTLS (or, ``implicit``, TLS from the first byte), then AUTH
    (``SMTP_USER``/``SMTP_PASSWORD``)."""

    def __init__(self, cert: Path, key: Path, port: int = 0, *, implicit: bool = False) -> None:
        self.cert, self.port = cert, port or free_port()
        self.mailbox = _Mailbox()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert), str(key))
        # aiosmtpd counts only STARTTLS as TLS for AUTH: over implicit TLS the whole session is
        tls: dict[str, Any] = (
            {"ssl_context": context, "auth_require_tls": False}
            if implicit
            else {"tls_context": context, "require_starttls": True, "auth_require_tls": True}
        )
        self._controller = Controller(
            self.mailbox, hostname="127.0.0.1", port=self.port, authenticator=_authenticate,
            auth_required=True, **tls,
        )  # fmt: skip

    @property
    def messages(self) -> list[Message]:
        return self.mailbox.messages

    def start(self) -> SmtpReceiver:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()


class HangingSmtp:
    """Accepts connections and never says a word; ``release()`` closes them and serves a real
    :class:`SmtpReceiver` on the same port from then on."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._held: list[socket.socket] = []
        self.accepted = 0
        self.receiver: SmtpReceiver | None = None
        threading.Thread(target=self._accept, name="hanging-smtp", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)

    def _close(self) -> None:
        with contextlib.suppress(OSError):  # shutdown wakes the accepting thread, freeing the port
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in self._held:
            conn.close()

    def release(self) -> SmtpReceiver:
        self._close()
        self.receiver = SmtpReceiver(self.cert, self.key, port=self.port).start()
        return self.receiver

    def stop(self) -> None:
        self._close()
        if self.receiver is not None:
            self.receiver.stop()


class _HttpThread:
    """An aiohttp application served on 127.0.0.1 by a thread of its own."""

    def __init__(self, app: web.Application, port: int = 0) -> None:
        self.app, self.port = app, port or free_port()
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()
        site = asyncio.run_coroutine_threadsafe(self._open(), self._loop)
        site.result(10)

    async def _open(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _Served:
    """start/stop of a receiver served by ``self._http``."""

    _http: _HttpThread

    def start(self) -> Self:
        self._http.start()
        return self

    def stop(self) -> None:
        self._http.stop()


@dataclass
class SmsRequest:
    sender: str
    to: str
    body: str
    at: float


@dataclass
class SmsGateway(_Served):
    """``POST /2010-04-01/Accounts/{sid}/Messages.json``, basic auth (SID, token), form fields
    From, To, Body; answers 201 as Twilio does. ``requests`` are the accepted ones."""

    sid: str = SMS_SID
    token: str = SMS_TOKEN
    port: int = 0  # 0: a free one
    requests: list[SmsRequest] = field(default_factory=list)
    refused: int = 0

    def __post_init__(self) -> None:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self._messages)
        self._http = _HttpThread(app, self.port)

    @property
    def url(self) -> str:
        return self._http.url

    async def _messages(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{self.sid}:{self.token}".encode()).decode()
        form = await request.post()
        if request.match_info["sid"] != self.sid or request.headers.get("Authorization") != (
            expected
        ):
            self.refused += 1
            return web.json_response({"code": 20003, "message": "Authenticate"}, status=401)
        if not all(k in form for k in ("From", "To", "Body")):
            self.refused += 1
            return web.json_response({"code": 21604, "message": "missing field"}, status=400)
        self.requests.append(
            SmsRequest(str(form["From"]), str(form["To"]), str(form["Body"]), time.time())
        )
        sid = f"SM{len(self.requests):032d}"
        return web.json_response({"sid": sid, "status": "queued"}, status=201)


@dataclass
class Webhook:
    body: dict[str, Any]
    notification_id: str
    at: float


@dataclass
class WebhookReceiver(_Served):
    """``POST /hook``: accepted (200) when ``X-Signature`` is ``sha256=`` + HMAC-SHA256 of
    ``X-Timestamp + "." + body`` under ``secret``, the timestamp within 5 minutes; else 401."""

    secret: str = WEBHOOK_SECRET
    port: int = 0  # 0: a free one
    received: list[Webhook] = field(default_factory=list)
    refused: int = 0

    def __post_init__(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._http = _HttpThread(app, self.port)

    @property
    def url(self) -> str:
        return self._http.url + "/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        ts = request.headers.get("X-Timestamp", "")
        mac = hmac.new(self.secret.encode(), ts.encode() + b"." + body, hashlib.sha256)
        signed = hmac.compare_digest(
            request.headers.get("X-Signature", ""), "sha256=" + mac.hexdigest()
        )
        fresh = ts.isdigit() and abs(time.time() - int(ts)) < 300
        if not (signed and fresh):
            self.refused += 1
            return web.json_response({"error": "bad signature"}, status=401)
        nid = request.headers.get("X-Notification-Id", "")
        self.received.append(Webhook(json.loads(body), nid, time.time()))
        return web.json_response({"ok": True})


def main() -> None:
    parser = argparse.ArgumentParser(description="Notification receivers on 127.0.0.1.")
    parser.add_argument("--smtp-port", type=int, default=0, help="0: a free port")
    parser.add_argument("--sms-port", type=int, default=0)
    parser.add_argument("--webhook-port", type=int, default=0)
    parser.add_argument(
        "--certs", type=Path, help="folder for the SMTP certificate (default: temp)"
    )
    args = parser.parse_args()
    folder = args.certs or Path(tempfile.mkdtemp(prefix="receivers-"))
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = make_cert(folder)
    smtp = SmtpReceiver(cert, key, port=args.smtp_port).start()
    sms = SmsGateway(port=args.sms_port).start()
    hook = WebhookReceiver(port=args.webhook_port).start()
    print(f"smtp     127.0.0.1:{smtp.port} STARTTLS, user {SMTP_USER} password {SMTP_PASSWORD}")
    print(f"         CA file {cert}")
    print(f"sms      {sms.url} account {SMS_SID} token {SMS_TOKEN}")
    print(f"webhook  {hook.url} secret {WEBHOOK_SECRET}", flush=True)
    seen = (0, 0, 0)
    try:
        while True:
            time.sleep(1)
            now = (len(smtp.messages), len(sms.requests), len(hook.received))
            if now != seen:
                print(f"received: {now[0]} emails, {now[1]} SMS, {now[2]} webhooks", flush=True)
                seen = now
    except KeyboardInterrupt:
        pass
    finally:
        smtp.stop()
        sms.stop()
        hook.stop()


if __name__ == "__main__":
    main()
