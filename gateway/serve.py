"""The gateway's HTTP server: ``GET /metrics``, ``GET /health`` and ``POST /api/readings``.

Bound to 127.0.0.1 by default. Ingest answers 202 only once the readings are committed to the
buffer, so a device that got 202 may forget them.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.buffer import Buffer, BufferClosed
from gateway.config import secret
from gateway.logs import RateLimitedLog
from gateway.metrics import Metrics
from gateway.model import Reading, Record, Rejection, format_ts, now_ts, reading_from_dict

log = logging.getLogger(__name__)

HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]
Process = Callable[[list[Reading]], list[Record]]


@dataclass
class HttpConfig:
    """TOML ``[http]``."""

    host: str = "127.0.0.1"
    port: int = 8080
    token: str = ""  # bearer token for POST /api/readings (env:NAME or file:/path); "" = no ingest
    max_body_bytes: int = 1_048_576
    commit_timeout_s: float = 10.0  # longer than this without a commit answers 503

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be at least 1")


class HttpServer:
    def __init__(
        self,
        config: HttpConfig,
        metrics: Metrics,
        *,
        buffer: Buffer | None = None,
        process: Process | None = None,
        plant_id: str = "default",
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.buffer = buffer
        self.process: Process = process if process is not None else lambda rs: list(rs)
        self.plant_id = plant_id
        self.checks: dict[str, HealthCheck] = {}
        self._token = secret(config.token, source="[http]", key="http.token").encode()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._reject_log = RateLimitedLog(log, 10.0)  # a misbehaving device must not flood it

    def add_check(self, name: str, check: HealthCheck) -> None:
        self.checks[name] = check

    @property
    def port(self) -> int:
        """The bound port (useful with port = 0)."""
        assert self._httpd is not None
        return self._httpd.server_address[1]

    def start(self) -> None:
        server = self

        class Handler(_Handler):
            gateway = server

        self._httpd = ThreadingHTTPServer((self.config.host, self.config.port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http", daemon=True)
        self._thread.start()
        log.info("HTTP server on %s:%d", self.config.host, self.port)

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def health(self) -> tuple[int, dict[str, Any]]:
        checks: dict[str, Any] = {}
        ok = True
        for name, check in self.checks.items():
            try:
                good, detail = check()
            except Exception as e:
                log.exception("health check %s failed", name)
                good, detail = False, {"error": f"check failed: {e}"}
            ok = ok and good
            checks[name] = {"status": "healthy" if good else "unhealthy", **detail}
        body = {
            "status": "healthy" if ok else "unhealthy",
            "timestamp": format_ts(now_ts()),
            "checks": checks,
        }
        return (200 if ok else 503), body

    def refuse(self, authorization: str) -> tuple[int, dict[str, Any]] | None:
        """Why a POST /api/readings with this Authorization header may not ingest, if it may not."""
        if not self._token or self.buffer is None:
            return 403, {"error": "HTTP ingest is disabled: set [http] token to enable it"}
        given = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), self._token):
            return 401, {"error": "missing or wrong bearer token"}
        return None

    def ingest(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """POST /api/readings once authorized and size-checked: parse, process, commit."""
        assert self.buffer is not None
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
        records = self.process(readings)
        try:
            self.buffer.submit_wait(records, self.config.commit_timeout_s)
        except (TimeoutError, BufferClosed) as e:
            return 503, {"error": f"buffer cannot take readings now ({e}); retry later"}
        for r in readings:
            self.metrics.messages_received.labels("http", r.plant_id).inc()
        return 202, {"accepted": len(readings)}

    def _rejected(self, reason: str) -> None:
        self.metrics.rejected_payloads.labels("http", reason).inc()
        self._reject_log.warning(reason, "HTTP ingest rejected a reading: %s", reason)


def _parse(items: Sequence[Any], plant_id: str) -> tuple[list[Reading], list[dict[str, Any]]]:
    readings: list[Reading] = []
    errors: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        result = reading_from_dict(item, plant_id=plant_id)
        if isinstance(result, Rejection):
            errors.append({"index": i, "reason": result.reason, "detail": result.detail})
        else:
            readings.append(result)
    return readings, errors


class _Handler(BaseHTTPRequestHandler):
    gateway: HttpServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # a stalled client must not hold a thread forever
    server_version = "edge-gateway"

    def do_GET(self) -> None:
        if self.path == "/metrics":
            self._send(200, generate_latest(self.gateway.metrics.registry), CONTENT_TYPE_LATEST)
        elif self.path == "/health":
            self._json(*self.gateway.health())
        else:
            self._json(404, {"error": f"no such resource: {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/api/readings":
            self._json(404, {"error": f"no such resource: {self.path}"}, close=True)
            return
        refusal = self.gateway.refuse(self.headers.get("Authorization", ""))
        if refusal is not None:
            self._json(*refusal, close=True)
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._json(411, {"error": "Content-Length is required"}, close=True)
            return
        limit = self.gateway.config.max_body_bytes
        if int(length) > limit:
            self._json(413, {"error": f"body larger than {limit} bytes"}, close=True)
            return
        body = self.rfile.read(int(length))
        try:
            status, doc = self.gateway.ingest(body)
        except Exception:
            log.exception("HTTP ingest failed")
            status, doc = 500, {"error": "internal error; see the gateway log"}
        self._json(status, doc)

    def _json(self, status: int, doc: dict[str, Any], close: bool = False) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json", close)

    def _send(self, status: int, body: bytes, content_type: str, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="edge-gateway"')
        if status == 503:
            self.send_header("Retry-After", "5")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)
