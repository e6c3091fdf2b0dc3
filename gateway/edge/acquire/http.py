"""HTTP ingest: ``POST /api/readings`` on the gateway's HTTP server, a source like the others.

Devices push one reading or an array; the body is parsed, and valid readings go to the one sink.
The answer is 202 only once they are committed to the buffer, so a device that got 202 may forget
them; 400 names every invalid reading and its field (none is stored then), 503 says retry later.

A 503 does not mean "not stored": the readings stay queued and may be committed after the answer.
A reading that carries the device's own ``seq`` is committed with a receipt keyed by plant,
``gatewayId`` (the device's id, if it sends one), sensor, parameter and seq, so a retry within
``RETRY_WINDOW_S`` is recognised and not stored again (also while the first copy still waits in
the queue: the answer then waits for it). A reading without ``seq`` is stored each time it comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from functools import partial
from typing import Any

from gateway.common.config import secret
from gateway.common.http import Answer, HttpConfig, HttpServer, Route
from gateway.common.logs import RateLimitedLog
from gateway.common.metrics import Metrics
from gateway.common.model import Reading, Receipt, Record, Rejection, reading_from_dict
from gateway.common.stage import Recall, Receipts, Sink, SinkClosed

log = logging.getLogger(__name__)

SOURCE = "http"
PATH = "/api/readings"
RETRY_WINDOW_S = 3600.0  # how long a device's (id, seq) is remembered to recognise its retries


class HttpIngest:
    def __init__(
        self,
        config: HttpConfig,
        sink: Sink,
        metrics: Metrics,
        plant_id: str,
        token: str | None = None,
        *,
        receipts: Receipts | None = None,
    ) -> None:
        """``token``: the bearer token already resolved; by default from ``config.token``."""
        self.config = config
        self._receipts = receipts  # None: every reading is stored each time it comes
        self._sink = sink
        self._metrics = metrics
        self.plant_id = plant_id
        if token is None:
            token = secret(config.token, source="[http]", key="http.token")
        self._token = token.encode()
        self._reject_log = RateLimitedLog(log, 10.0)  # a misbehaving device must not flood it
        self._waker: _Waker | None = None

    def attach(self, server: HttpServer) -> None:
        disabled = "" if self._token else "HTTP ingest is disabled: set [http] token to enable it"
        route = Route(
            self.ingest,
            self.config.max_body_bytes,
            self._token,
            disabled,
            handle_async=partial(self.ingest_async, server),
        )
        server.add_route(PATH, route)

    def ingest(self, body: bytes) -> Answer:
        """An authorized, size-checked body: parse, then commit through the sink (blocks until
        the commit or the timeout)."""
        begun = self._begin(body)
        if not isinstance(begun, _Pending):
            return begun
        timeout = max(0.0, begun.deadline - time.monotonic())
        _, waiting = futures.wait(begun.waits, timeout)
        return self._answer(begun, len(waiting))

    async def ingest_async(self, server: HttpServer, body: bytes) -> Answer:
        """``ingest`` for the server's loop: parsing and handing to the sink run in its pool,
        the wait for the commit on the loop, so a request waiting for its commit holds no thread
        (the pool's size no longer bounds the requests in progress)."""
        begun = await server.run_blocking(self._begin, body)
        if not isinstance(begun, _Pending):
            return begun
        loop = asyncio.get_running_loop()
        waker = self._waker
        if waker is None or waker.loop is not loop:  # a server started anew has a new loop
            waker = self._waker = _Waker(loop)
        timeout = max(0.0, begun.deadline - time.monotonic())
        try:
            await asyncio.wait_for(waker.wait(begun.waits), timeout)
        except TimeoutError:
            return self._answer(begun, sum(not f.done() for f in begun.waits))
        return self._answer(begun, 0)

    def _begin(self, body: bytes) -> Answer | _Pending:
        """Parse and hand the new readings to the sink: an answer already (400, 503), or what
        to wait for before answering."""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            self._rejected("not_json")
            return 400, {"error": "body is not JSON", "detail": str(e)[:200]}
        items = doc if isinstance(doc, list) else [doc]
        if not items:
            return 400, {"error": "empty array: nothing to ingest"}
        readings, errors = _parse(items, self.plant_id)
        if errors:
            for error in errors:
                self._rejected(error["reason"])
            return 400, {"error": "invalid readings; none were stored", "invalid": errors}
        records, earlier = self._new(items, readings)
        timeout = self.config.commit_timeout_s
        pending = _Pending(list(earlier), time.monotonic() + timeout, len(readings), len(earlier))
        if records:
            done: Future[None] = Future()
            try:
                self._sink(records, partial(_resolve, done), timeout=timeout)
            except (TimeoutError, SinkClosed) as e:
                for f in pending.waits:
                    f.cancel()
                return _unavailable(e)
            pending.waits.append(done)
        return pending

    def _answer(self, begun: _Pending, waiting: int) -> Answer:
        if waiting:
            return _unavailable(TimeoutError("readings not committed in time"))
        answer: dict[str, Any] = {"accepted": begun.accepted}
        if begun.duplicates:
            answer["duplicates"] = begun.duplicates
            self._metrics.redeliveries.labels(SOURCE).inc(begun.duplicates)
        return 202, answer

    def _new(
        self, items: Sequence[Any], readings: list[Reading]
    ) -> tuple[list[Record], list[Future[None]]]:
        """The records to submit (new readings, with their receipts), and for each reading that
        is a retry of one committed or queued already, an event set once that one is durable."""
        if self._receipts is None:
            return [*readings], []
        records: list[Record] = []
        earlier: list[Future[None]] = []
        taken: dict[str, bytes] = {}  # receipts of this request: the same reading twice in it
        for item, r in zip(items, readings, strict=True):
            receipt = _receipt(item, r)
            if receipt is None:
                records.append(r)
                continue
            done: Future[None] = Future()
            if taken.get(receipt.key) == receipt.fingerprint:
                done.set_result(None)
                earlier.append(done)
                continue
            if self._receipts.recall(receipt, partial(_resolve, done)) is Recall.SAME:
                earlier.append(done)
                continue
            taken[receipt.key] = receipt.fingerprint
            records += [r, receipt]
        return records, earlier

    def _rejected(self, reason: str) -> None:
        self._metrics.rejected_payloads.labels(SOURCE, reason).inc()
        self._reject_log.warning(reason, "HTTP ingest rejected a reading: %s", reason)


@dataclass
class _Pending:
    """Readings handed to the sink (or recognised as retries): answered 202 once every one of
    ``waits`` is done, 503 if one is not by ``deadline`` (monotonic)."""

    waits: list[Future[None]]
    deadline: float
    accepted: int
    duplicates: int


class _Waker:
    """Wakes the coroutines waiting for commits with one loop wake-up per burst of them: the
    buffer thread settles a whole group commit at once, and a ``call_soon_threadsafe`` (a write
    to the loop's self-pipe) per request cost more than the rest of the wait."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._due: list[asyncio.Future[None]] = []

    def wait(self, waits: list[Future[None]]) -> asyncio.Future[None]:
        """On the loop: a future done once every one of ``waits`` is."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        left = [len(waits)]

        def one_done(_: Future[None]) -> None:  # any thread
            with self._lock:
                left[0] -= 1
                if left[0]:
                    return
                self._due.append(waiter)
                if len(self._due) > 1:
                    return  # a wake-up is on its way already
            with contextlib.suppress(RuntimeError):  # the server stopped: nobody waits now
                self.loop.call_soon_threadsafe(self._wake)

        if not waits:
            waiter.set_result(None)
        for f in waits:
            f.add_done_callback(one_done)
        return waiter

    def _wake(self) -> None:
        with self._lock:
            due, self._due = self._due, []
        for waiter in due:
            if not waiter.done():  # not given up on (timed out)
                waiter.set_result(None)


def _resolve(done: Future[None]) -> None:
    """An on_durable callback (any thread, maybe twice); the waiter may have given up."""
    with contextlib.suppress(InvalidStateError):
        done.set_result(None)


def _unavailable(e: BaseException) -> Answer:
    return 503, {"error": f"buffer cannot take readings now ({e}); retry later"}


def _receipt(item: dict[str, Any], r: Reading) -> Receipt | None:
    """The receipt of a reading that carries its device's seq (None without one); read before
    the buffer gives the reading our own gatewayId and seq."""
    if r.seq is None:
        return None
    key = "\x1f".join((r.plant_id, r.gateway_id, r.sensor_id, r.parameter, str(r.seq)))
    content = json.dumps(item, sort_keys=True, separators=(",", ":")).encode()
    return Receipt(SOURCE, key, hashlib.blake2b(content, digest_size=16).digest(), RETRY_WINDOW_S)


def _parse(items: Sequence[Any], plant_id: str) -> tuple[list[Reading], list[dict[str, Any]]]:
    readings: list[Reading] = []
    errors: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        result = reading_from_dict(item, plant_id=plant_id)
        if isinstance(result, Rejection):
            error = {"index": i, "reason": result.reason, "detail": result.detail}
            if result.field:
                error["field"] = result.field
            errors.append(error)
        else:
            readings.append(result)
    return readings, errors
