"""Stand-ins for a plant's mail server and chat: a real SMTP server (aiosmtpd) and an HTTP webhook
receiver, in one process, each keeping what it received as JSON lines in a directory.

    python -m tests.support.receivers --dir DIR --smtp-port P --webhook-port Q

``DIR/mail.jsonl`` gets one line per message (from, to, subject, the headers, the body);
``DIR/webhook.jsonl`` one per POST (path, headers, the body as JSON when it parses, else text).
Any POST path is accepted and answered 200. ``DIR/receivers.ready`` appears once both listen.
``received(DIR)`` reads both files back (the demo's view and summary, the chaos run's checks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import threading
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

MAIL, WEBHOOK, READY = "mail.jsonl", "webhook.jsonl", "receivers.ready"


class _Log:
    """Appends JSON lines to one file; each line is flushed before the sender gets its answer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def add(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, default=str) + "\n"
        with self._lock, self.path.open("a") as f:
            f.write(line)
            f.flush()


class _SmtpHandler:
    def __init__(self, log: _Log) -> None:
        self.log = log

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content or envelope.content
        msg = message_from_bytes(
            raw if isinstance(raw, bytes) else raw.encode(), policy=policy.default
        )
        body = msg.get_body(("plain", "html")) if msg.is_multipart() else msg
        self.log.add(
            {
                "from": envelope.mail_from,
                "to": list(envelope.rcpt_tos),
                "subject": str(msg.get("Subject", "")),
                "headers": {k: str(v) for k, v in msg.items()},
                "body": body.get_content() if body is not None else "",
            }
        )
        return "250 OK"


def _webhook_app(log: _Log) -> Any:
    from aiohttp import web

    async def receive(request: web.Request) -> web.Response:
        text = await request.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        log.add({"path": request.path, "headers": dict(request.headers), "body": body})
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/{tail:.*}", receive)
    return app


async def _serve(directory: Path, smtp_port: int, webhook_port: int, host: str) -> None:
    from aiohttp import web
    from aiosmtpd.controller import Controller

    smtp = Controller(_SmtpHandler(_Log(directory / MAIL)), hostname=host, port=smtp_port)
    smtp.start()
    runner = web.AppRunner(_webhook_app(_Log(directory / WEBHOOK)), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, webhook_port).start()
    (directory / READY).write_text(
        f"smtp {host}:{smtp_port}\nwebhook http://{host}:{webhook_port}/\n"
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        smtp.stop()


def _read(path: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(FileNotFoundError), path.open() as f:
        for line in f:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def received(directory: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(mails, webhook calls) received so far."""
    return _read(directory / MAIL), _read(directory / WEBHOOK)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--smtp-port", type=int, required=True)
    ap.add_argument("--webhook-port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(_serve(args.dir, args.smtp_port, args.webhook_port, args.host))


if __name__ == "__main__":
    main()
