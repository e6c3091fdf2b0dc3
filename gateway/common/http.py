"""The HTTP server both services run: ``GET /metrics``, ``GET /health``, and the routes stages
add (the gateway's ``POST /api/readings``). Bound to 127.0.0.1 by default.

The server owns the generic rules: a route with a token answers 401 without a matching bearer
token before the body is read, a body needs a Content-Length (411) within the route's limit (413),
and a handler that raises answers 500 without stopping the server.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.common.config import SECRET
from gateway.common.metrics import Metrics
from gateway.common.model import format_ts, now_ts
from gateway.common.stage import HealthCheck

log = logging.getLogger(__name__)

Answer = tuple[int, dict[str, Any]]


@dataclass
class HttpConfig:
    """TOML ``[http]``."""

    host: str = "127.0.0.1"
    port: int = 8080
    # bearer token for POST /api/readings (env:NAME, file:/path or cred:NAME); "" = no ingest
    token: str = field(default="", metadata=SECRET)
    max_body_bytes: int = 1_048_576
    commit_timeout_s: float = 10.0  # longer than this without a commit answers 503

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be at least 1")


@dataclass
class Route:
    """A POST endpoint a stage adds. ``token`` (already resolved) guards it; ``disabled`` is the
    403 answer while the stage is switched off."""

    handle: Callable[[bytes], Answer]
    max_body_bytes: int
    token: bytes = b""
    disabled: str = ""

    def refuse(self, headers: Message) -> Answer | None:
        """Why a request with these headers may not reach the handler, if it may not."""
        if self.disabled:
            return 403, {"error": self.disabled}
        if not self.token:
            return None
        authorization = headers.get("Authorization", "")
        given = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), self.token):
            return 401, {"error": "missing or wrong bearer token"}
        return None


class HttpServer:
    def __init__(self, config: HttpConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.checks: dict[str, HealthCheck] = {}
        self.routes: dict[str, Route] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add_check(self, name: str, check: HealthCheck) -> None:
        self.checks[name] = check

    def add_route(self, path: str, route: Route) -> None:
        self.routes[path] = route

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

    def health(self) -> Answer:
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
        route = self.gateway.routes.get(self.path)
        if route is None:
            self._json(404, {"error": f"no such resource: {self.path}"}, close=True)
            return
        refusal = route.refuse(self.headers)
        if refusal is not None:
            self._json(*refusal, close=True)
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._json(411, {"error": "Content-Length is required"}, close=True)
            return
        if int(length) > route.max_body_bytes:
            self._json(413, {"error": f"body larger than {route.max_body_bytes} bytes"}, close=True)
            return
        body = self.rfile.read(int(length))
        try:
            status, doc = route.handle(body)
        except Exception:
            log.exception("POST %s failed", self.path)
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
