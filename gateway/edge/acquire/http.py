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

import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from gateway.common.config import secret
from gateway.common.http import Answer, HttpConfig, HttpServer, Route
from gateway.common.logs import RateLimitedLog
from gateway.common.metrics import Metrics
from gateway.common.model import Reading, Receipt, Record, Rejection, reading_from_dict
from gateway.common.stage import Recall, Receipts, Sink, SinkClosed, submit_and_wait

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

    def attach(self, server: HttpServer) -> None:
        disabled = "" if self._token else "HTTP ingest is disabled: set [http] token to enable it"
        route = Route(self.ingest, self.config.max_body_bytes, self._token, disabled)
        server.add_route(PATH, route)

    def ingest(self, body: bytes) -> Answer:
        """An authorized, size-checked body: parse, then commit through the sink."""
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
        deadline = time.monotonic() + self.config.commit_timeout_s
        try:
            if records:
                submit_and_wait(self._sink, records, self.config.commit_timeout_s)
            for done in earlier:
                if not done.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError("an earlier copy of a reading is not committed yet")
        except (TimeoutError, SinkClosed) as e:
            return 503, {"error": f"buffer cannot take readings now ({e}); retry later"}
        answer: dict[str, Any] = {"accepted": len(readings)}
        if earlier:
            answer["duplicates"] = len(earlier)
            self._metrics.redeliveries.labels(SOURCE).inc(len(earlier))
        return 202, answer

    def _new(
        self, items: Sequence[Any], readings: list[Reading]
    ) -> tuple[list[Record], list[threading.Event]]:
        """The records to submit (new readings, with their receipts), and for each reading that
        is a retry of one committed or queued already, an event set once that one is durable."""
        if self._receipts is None:
            return [*readings], []
        records: list[Record] = []
        earlier: list[threading.Event] = []
        taken: dict[str, bytes] = {}  # receipts of this request: the same reading twice in it
        for item, r in zip(items, readings, strict=True):
            receipt = _receipt(item, r)
            if receipt is None:
                records.append(r)
                continue
            done = threading.Event()
            if taken.get(receipt.key) == receipt.fingerprint:
                done.set()
                earlier.append(done)
                continue
            if self._receipts.recall(receipt, done.set) is Recall.SAME:
                earlier.append(done)
                continue
            taken[receipt.key] = receipt.fingerprint
            records += [r, receipt]
        return records, earlier

    def _rejected(self, reason: str) -> None:
        self._metrics.rejected_payloads.labels(SOURCE, reason).inc()
        self._reject_log.warning(reason, "HTTP ingest rejected a reading: %s", reason)


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
