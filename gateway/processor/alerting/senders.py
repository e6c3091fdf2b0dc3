"""One queue and one worker per channel, on a loop of their own: retries, back-off, rate, timeout.

The queue is the outbox (``statedb``): each channel's worker takes its due rows, sends them one at
a time no faster than ``rate_per_minute``, each bounded by ``timeout_seconds``, and marks them
sent, or due again after an exponential back-off (capped at ``retry_max_seconds``), or given up
after ``max_attempts``. Workers share nothing but the database, so a hanging SMTP server holds up
only the email worker: never another channel, the notifier, or the processor's pipeline.

Test hook (tests only): with ``EDGE_ALERTS_TEST_HOLD_SENDS=1`` in the environment the workers send
nothing, so a test can kill the processor between a decision and its sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time

import aiohttp

from gateway.common.metrics import Metrics
from gateway.common.stage import Health
from gateway.processor.alerting.channels import Channel
from gateway.processor.alerting.statedb import StateDb

log = logging.getLogger(__name__)

HOLD_ENV = "EDGE_ALERTS_TEST_HOLD_SENDS"
POLL_SECONDS = 0.25


class Senders:
    def __init__(self, channels: list[Channel], db: StateDb, metrics: Metrics) -> None:
        self.channels = channels
        self.db = db
        self.metrics = metrics
        self.failing: dict[str, str] = {}  # channel -> its last error, while it fails
        self._hold = os.environ.get(HOLD_ENV) == "1"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: dict[str, asyncio.Event] = {}
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="alert-senders", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """New outbox rows: look now rather than at the next poll (any thread)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                for event in self._wake.values():
                    loop.call_soon_threadsafe(event.set)

    def health(self) -> Health:
        backlog = self.db.backlog()
        detail = {
            "channels": {c.name: self.failing.get(c.name, "ok") for c in self.channels},
            "queued": {ch: n for ch, (n, _) in backlog.items()},
        }
        if self.failing:
            names = ", ".join(sorted(self.failing))
            return False, {**detail, "degraded": True, "error": f"channel failing: {names}"}
        return True, detail

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._wake = {c.name: asyncio.Event() for c in self.channels}
        self._ready.set()
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(self._worker(c, session)) for c in self.channels]
            tasks.append(asyncio.create_task(self._gauges()))
            await self._stop.wait()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pause(self, name: str, seconds: float) -> None:
        wake = self._wake[name]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)
        wake.clear()

    async def _worker(self, ch: Channel, session: aiohttp.ClientSession) -> None:
        cfg = ch.config
        gap = 60.0 / cfg.rate_per_minute
        next_send = 0.0
        while True:
            rows = [] if self._hold else self.db.due(ch.name, time.time())
            if not rows:
                await self._pause(ch.name, POLL_SECONDS)
                continue
            for row in rows:
                await asyncio.sleep(max(0.0, next_send - time.monotonic()))
                next_send = time.monotonic() + gap
                try:
                    async with asyncio.timeout(cfg.timeout_seconds):
                        await ch.send(session, row.doc)
                except Exception as e:
                    error = f"{type(e).__name__}: {e}"[:300] or type(e).__name__
                    self.failing[ch.name] = error
                    self.metrics.notifications_failed.labels(channel=ch.name).inc()
                    attempts = row.attempts + 1
                    if attempts >= cfg.max_attempts:
                        log.error("%s: gave %s up after %d attempts: %s", ch.name, row.id,
                                  attempts, error)  # fmt: skip
                        self.db.give_up(row.id, time.time())
                    else:
                        delay = min(cfg.retry_max_seconds, 2.0 ** min(attempts, 20))
                        log.warning("%s: sending %s failed (%s); again in %.0f s", ch.name,
                                    row.id, error, delay)  # fmt: skip
                        self.db.retry(row.id, time.time() + delay, error)
                    break  # the channel is failing: back to the due rows (back-off applies)
                self.db.sent(row.id, time.time())
                self.failing.pop(ch.name, None)
                self.metrics.notifications_sent.labels(channel=ch.name).inc()

    async def _gauges(self) -> None:
        while True:
            backlog = self.db.backlog()
            now = time.time()
            for c in self.channels:
                self.metrics.notification_queue.labels(channel=c.name).set(
                    backlog.get(c.name, (0, None))[0]
                )
            oldest = [t for _, t in backlog.values() if t is not None]
            self.metrics.notification_oldest_age.set(now - min(oldest) if oldest else 0.0)
            await asyncio.sleep(1.0)
