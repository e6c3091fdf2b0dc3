"""HTTP ingest: ``POST /api/readings`` on the gateway's HTTP server, a source like the others.

Devices push one reading or an array; the body is parsed, and valid readings go to the one sink.
The answer is 202 only once they are committed to the buffer, so a device that got 202 may forget
them; 400 names every invalid reading and its field (none is stored then), 503 says retry later.

A 503 does not mean "not stored": the readings stay queued and may be committed after the answer.
A reading that carries the device's own ``seq`` is committed with a receipt keyed by plant,
``gatewayId`` (the device's id, if it sends one), sensor, parameter and seq, so a retry within
``RETRY_WINDOW_S`` is recognised and not stored again (also while the first copy still waits in
the queue: the answer then waits for it). A reading without ``seq`` is stored each time it comes.

On the server's loop, the requests that arrive in one pass of it go to the sink in one call (one
pipeline pass, one buffer submission) and are answered together once that commit is durable:
per-request costs (a thread hop, a future, a wake-up of the loop) would otherwise dominate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from gateway.common.config import secret
from gateway.common.http import Answer, HttpConfig, HttpServer, Route
from gateway.common.logs import RateLimitedLog
from gateway.common.model import Reading, Receipt, Record, Rejection, reading_from_dict
from gateway.common.stage import Recall, Receipts, Sink, SinkClosed

if TYPE_CHECKING:  # the HTTP ingest workers import no prometheus_client
    from gateway.common.metrics import Metrics

log = logging.getLogger(__name__)

SOURCE = "http"
PATH = "/api/readings"
RETRY_WINDOW_S = 3600.0  # how long a device's (id, seq) is remembered to recognise its retries


INLINE_BODY_BYTES = 65_536  # bodies up to this are parsed on the loop: the hop costs more


@dataclass(slots=True)
class Entry:
    """One request's valid readings (with the receipt of each that carries its device's seq),
    and once handed to the sink: the earlier deliveries it waits for and how many it repeats."""

    readings: list[Reading]
    receipts: list[Receipt | None]
    earlier: list[Future[None]] = field(default_factory=list)
    duplicates: int = 0
    accepted: int = 0


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
        on_rejected: Callable[[str], None] | None = None,
    ) -> None:
        """``token``: the bearer token already resolved; by default from ``config.token``.
        ``on_rejected(reason)`` counts a refused reading instead of ``metrics`` (in a worker
        process, whose metrics nobody scrapes)."""
        self.config = config
        self._on_rejected = on_rejected
        self._receipts = receipts  # None: every reading is stored each time it comes
        self._sink = sink
        self._metrics = metrics
        self.plant_id = plant_id
        if token is None:
            token = secret(config.token, source="[http]", key="http.token")
        self._token = token.encode()
        self._reject_log = RateLimitedLog(log, 10.0)  # a misbehaving device must not flood it
        self._batcher: _Batcher | None = None
        self._handing = threading.Lock()

    def attach(self, server: HttpServer, submit: Submit | None = None) -> None:
        """Serve ingest on ``server``; ``submit`` hands a loop pass's requests on (by default
        ``commit`` in the server's pool; an ingest worker sends them to the gateway)."""
        disabled = "" if self._token else "HTTP ingest is disabled: set [http] token to enable it"
        if submit is None:

            def submit(entries: list[Entry], answered: Answered) -> None:
                server.run_blocking(self.commit, entries, answered)

        route = Route(
            self.ingest,
            self.config.max_body_bytes,
            self._token,
            disabled,
            handle_async=partial(self.ingest_async, server, submit),
        )
        server.add_route(PATH, route)

    def ingest(self, body: bytes) -> Answer:
        """An authorized, size-checked body: parse, then commit through the sink (blocks until
        the commit or the timeout)."""
        entry = self.parse(body)
        if not isinstance(entry, Entry):
            return entry
        deadline = time.monotonic() + self.config.commit_timeout_s
        done = self.hand([entry])
        if not isinstance(done, Future):
            return done
        _, waiting = futures.wait([*entry.earlier, done], max(0.0, deadline - time.monotonic()))
        return self.answer(entry) if not waiting else _unavailable(_LATE)

    async def ingest_async(self, server: HttpServer, submit: Submit, body: bytes) -> Answer:
        """``ingest`` for the server's loop: a small body is parsed on the loop, and the
        requests of one loop pass go to the sink together (one call in the server's pool, one
        commit, one wake-up of the loop for all of them), so a request waiting for its commit
        holds no thread and costs no thread hop of its own."""
        if len(body) > INLINE_BODY_BYTES:
            entry = await server.run_blocking(self.parse, body)
        else:
            entry = self.parse(body)
        if not isinstance(entry, Entry):
            return entry
        loop = asyncio.get_running_loop()
        batcher = self._batcher
        if batcher is None or batcher.loop is not loop:  # a server started anew has a new loop
            batcher = self._batcher = _Batcher(loop, self.config.commit_timeout_s, submit)
        return await batcher.add(entry)

    def parse(self, body: bytes) -> Entry | Answer:
        """The body's readings, or the 400 that refuses them all."""
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
        receipts = [_receipt(item, r) for item, r in zip(items, readings, strict=True)]
        return Entry(readings, receipts)

    def hand(self, entries: Sequence[Entry]) -> Future[None] | Answer:
        """Hand the new readings of ``entries`` to the sink in one call (blocks while it is
        full): a future done once they are committed, or the 503 that answers every entry.
        Each entry's ``earlier`` lists the retries it must also wait for."""
        # One at a time from recall to submit: two calls that both recall a seq before either
        # submits it would both find it new and store it twice.
        timeout = self.config.commit_timeout_s
        if not self._handing.acquire(timeout=timeout):
            return _unavailable(TimeoutError("the buffer takes readings too slowly"))
        try:
            records: list[Record] = []
            taken: dict[str, bytes] = {}  # receipts in this call: the same reading twice in it
            for entry in entries:
                self._new(entry, records, taken)
            done: Future[None] = Future()
            try:
                self._sink(records, partial(_resolve, done), timeout=timeout)
            except (TimeoutError, SinkClosed) as e:
                for entry in entries:
                    for f in entry.earlier:
                        f.cancel()
                return _unavailable(e)
            return done
        finally:
            self._handing.release()

    def commit(self, entries: list[Entry], answered: Answered) -> None:
        """Hand ``entries`` to the sink (blocks while it is full) and call ``answered`` (from
        any thread) with one answer per entry: once all are durable, or at once with the 503
        or 500 that answers them all."""
        try:
            done = self.hand(entries)
        except Exception:
            log.exception("POST %s failed", PATH)
            answered([(500, {"error": "internal error; see the gateway log"})] * len(entries))
            return
        if not isinstance(done, Future):
            answered([done] * len(entries))
            return
        waits = [done, *(f for entry in entries for f in entry.earlier)]
        left = [len(waits)]
        lock = threading.Lock()

        def one_done(_: Future[None]) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            answered([self.answer(entry) for entry in entries])

        for f in waits:
            f.add_done_callback(one_done)

    def answer(self, entry: Entry) -> Answer:
        """The 202 of an entry whose readings are all durable."""
        answer: dict[str, Any] = {"accepted": entry.accepted}
        if entry.duplicates:
            answer["duplicates"] = entry.duplicates
            self._metrics.redeliveries.labels(SOURCE).inc(entry.duplicates)
        return 202, answer

    def _new(self, entry: Entry, records: list[Record], taken: dict[str, bytes]) -> None:
        """Add the entry's new readings (with their receipts) to ``records``; for each reading
        that is a retry of one committed or queued already, a future in ``entry.earlier`` done
        once that one is durable."""
        entry.accepted = len(entry.readings)
        if self._receipts is None:
            records += entry.readings
            return
        for r, receipt in zip(entry.readings, entry.receipts, strict=True):
            if receipt is None:
                records.append(r)
                continue
            if taken.get(receipt.key) == receipt.fingerprint:
                entry.duplicates += 1  # committed with this call's one
                continue
            done: Future[None] = Future()
            if self._receipts.recall(receipt, partial(_resolve, done)) is Recall.SAME:
                entry.duplicates += 1
                entry.earlier.append(done)
                continue
            taken[receipt.key] = receipt.fingerprint
            records += [r, receipt]
        entry.readings, entry.receipts = [], []  # handed over: the buffer owns them now

    def _rejected(self, reason: str) -> None:
        if self._on_rejected is not None:
            self._on_rejected(reason)
        else:
            self._metrics.rejected_payloads.labels(SOURCE, reason).inc()
        self._reject_log.warning(reason, "HTTP ingest rejected a reading: %s", reason)


_LATE = TimeoutError("readings not committed in time")


Answered = Callable[[list[Answer]], object]  # one answer per entry, in order
Submit = Callable[[list[Entry], Answered], None]


@dataclass(eq=False, slots=True)
class _Waiting:
    """A request on the loop, answered once its entry is (or 503 at its group's deadline)."""

    entry: Entry
    answer: asyncio.Future[Answer]
    group: _Group | None = None  # set when the group is handed on


@dataclass(eq=False, slots=True)
class _Group:
    """The requests of one loop pass: handed on together, answered 503 at ``timer``."""

    waiting: list[_Waiting]
    left: int = 0
    timer: asyncio.TimerHandle | None = None


class _Batcher:
    """Gathers the requests of a loop pass and hands them on with one ``submit``; the answers
    come back with one ``call_soon_threadsafe`` (a write to the loop's self-pipe) per burst of
    groups, not one per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, submit: Submit) -> None:
        self.loop = loop
        self._timeout = timeout
        self._submit = submit
        self._group: list[_Waiting] = []
        self._lock = threading.Lock()
        self._due: list[tuple[_Group, list[Answer]]] = []

    def add(self, entry: Entry) -> asyncio.Future[Answer]:
        answer: asyncio.Future[Answer] = self.loop.create_future()
        if not self._group:
            self.loop.call_soon(self._flush)
        self._group.append(_Waiting(entry, answer))
        return answer

    def _flush(self) -> None:
        waiting, self._group = self._group, []
        group = _Group(waiting, len(waiting))
        for w in waiting:
            w.group = group
        group.timer = self.loop.call_later(self._timeout, self._expire, group)
        try:
            self._submit([w.entry for w in waiting], partial(self._answered, group))
        except Exception as e:  # the pool or the pipe is gone: the server is stopping
            self._answer_all(group, [_unavailable(e)] * len(waiting))

    def _answered(self, group: _Group, answers: list[Answer]) -> None:
        """From any thread: one wake-up of the loop per burst."""
        with self._lock:
            self._due.append((group, answers))
            if len(self._due) > 1:
                return  # a wake-up is on its way already
        with contextlib.suppress(RuntimeError):  # the server stopped: nobody waits now
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            due, self._due = self._due, []
        for group, answers in due:
            self._answer_all(group, answers)

    def _expire(self, group: _Group) -> None:
        group.timer = None
        self._answer_all(group, [_unavailable(_LATE)] * len(group.waiting))

    def _answer_all(self, group: _Group, answers: list[Answer]) -> None:
        for w, answer in zip(group.waiting, answers, strict=True):
            if w.answer.done():  # answered 503 already (late)
                continue
            w.answer.set_result(answer)
            group.left -= 1
        if not group.left and group.timer is not None:
            group.timer.cancel()
            group.timer = None


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
