"""HTTP ingest: ``POST /api/readings`` on the gateway's HTTP server, a source like the others.

Devices push one reading or an array; the body is parsed, and valid readings go to the one sink.
The answer is 202 only once they are committed to the buffer, so a device that got 202 may forget
them; 400 names every invalid reading (none is stored then), 503 says retry later.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from gateway.common.config import secret
from gateway.common.http import Answer, HttpConfig, HttpServer, Route
from gateway.common.logs import RateLimitedLog
from gateway.common.metrics import Metrics
from gateway.common.model import Reading, Record, Rejection, reading_from_dict
from gateway.common.stage import Sink, SinkClosed, submit_and_wait

log = logging.getLogger(__name__)

SOURCE = "http"
PATH = "/api/readings"


class HttpIngest:
    def __init__(self, config: HttpConfig, sink: Sink, metrics: Metrics, plant_id: str) -> None:
        self.config = config
        self._sink = sink
        self._metrics = metrics
        self.plant_id = plant_id
        self._token = secret(config.token, source="[http]", key="http.token").encode()
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
        records: list[Record] = [*readings]
        try:
            submit_and_wait(self._sink, records, self.config.commit_timeout_s)
        except (TimeoutError, SinkClosed) as e:
            return 503, {"error": f"buffer cannot take readings now ({e}); retry later"}
        return 202, {"accepted": len(readings)}

    def _rejected(self, reason: str) -> None:
        self._metrics.rejected_payloads.labels(SOURCE, reason).inc()
        self._reject_log.warning(reason, "HTTP ingest rejected a reading: %s", reason)


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
