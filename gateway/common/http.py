"""The HTTP server both services run, on aiohttp: ``GET /metrics``, ``GET /health``, and what the
stages add: POST routes (the gateway's ``POST /api/readings``), GET routes and a WebSocket route
(the processor's live feed and its API), and static files from package data (the dashboard page).
Bound to 127.0.0.1 by default.

One asyncio loop on one thread serves every connection. Handlers that block (ingest waits for a
disk commit) run in a bounded thread pool, so the loop never waits on them; /health (its checks
ask Kafka) and /metrics have two threads of their own, so busy handlers never starve monitoring.
At most ``max_requests`` requests are in progress at once; more answer 503 (WebSocket connections
do not count: their route bounds its clients itself).

The server owns the generic rules: a route with a token answers 401 without a matching bearer
token before the body is read, a body needs a Content-Length (411) within the route's limit (413),
and a handler that raises answers 500 without stopping the server. GET and WebSocket routes also
take the token as ``?token=`` (a browser cannot set headers on a WebSocket).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import mimetypes
import threading
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from aiohttp import web

from gateway.common.config import SECRET
from gateway.common.model import format_ts, now_ts
from gateway.common.stage import HealthCheck

if TYPE_CHECKING:  # the HTTP ingest workers (who relay /metrics) import no prometheus_client
    from gateway.common.metrics import Metrics

log = logging.getLogger(__name__)

Answer = tuple[int, dict[str, Any]]
GetHandler = Callable[[Mapping[str, str]], Awaitable[Answer]]
WebSocketHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")

_STOP_SECONDS = 5.0  # how long stop() lets requests in progress finish
# The page and its assets: nothing but this server may be asked for anything.
_PAGE_POLICY = "default-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'"


@dataclass
class HttpConfig:
    """TOML ``[http]``."""

    host: str = "127.0.0.1"
    port: int = 8080
    # bearer token for POST /api/readings (env:NAME, file:/path or cred:NAME); "" = no ingest
    token: str = field(default="", metadata=SECRET)
    max_body_bytes: int = 1_048_576
    commit_timeout_s: float = 10.0  # longer than this without a commit answers 503
    workers: int = 16  # threads for handlers that block (each ingest request waits for a commit)
    max_requests: int = 256  # requests in progress at once; more are answered 503
    ingest_workers: int = 0  # processes that also serve the port and take POST /api/readings

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be at least 1")
        if self.workers < 1 or self.max_requests < 1:
            raise ValueError("workers and max_requests must be at least 1")
        if not 0 <= self.ingest_workers <= 64:
            raise ValueError("ingest_workers must be between 0 and 64")


def bearer_ok(given: str, token: bytes) -> bool:
    return hmac.compare_digest(given.encode(), token)


def bearer_of(headers: Mapping[str, str]) -> str:
    authorization = headers.get("Authorization", "")
    return authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""


@dataclass
class Route:
    """A POST endpoint a stage adds. ``token`` (already resolved) guards it; ``disabled`` is the
    403 answer while the stage is switched off. ``handle`` may block: it runs in the pool.
    ``handle_async``, if given, is awaited on the loop instead (it hands its blocking parts to
    ``run_blocking`` itself, so waiting, e.g. for a commit, takes no pool thread)."""

    handle: Callable[[bytes], Answer]
    max_body_bytes: int
    token: bytes = b""
    disabled: str = ""
    handle_async: Callable[[bytes], Awaitable[Answer]] | None = None

    def refuse(self, headers: Mapping[str, str]) -> Answer | None:
        """Why a request with these headers may not reach the handler, if it may not."""
        if self.disabled:
            return 403, {"error": self.disabled}
        if self.token and not bearer_ok(bearer_of(headers), self.token):
            return 401, {"error": "missing or wrong bearer token"}
        return None


@dataclass
class _Guarded:
    """A GET or WebSocket route: its handler and the token that guards it (b"" = open)."""

    handle: Any
    token: bytes = b""

    def allows(self, request: web.Request) -> bool:
        if not self.token:
            return True
        given = bearer_of(request.headers) or request.query.get("token", "")
        return bearer_ok(given, self.token)


@dataclass(frozen=True)
class _File:
    body: bytes
    content_type: str
    etag: str


def _content_type(name: str) -> str:
    if name.endswith(".js"):
        return "text/javascript; charset=utf-8"
    guessed = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed


class HttpServer:
    def __init__(self, config: HttpConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.checks: dict[str, HealthCheck] = {}
        self.routes: dict[str, Route] = {}
        self.gets: dict[str, _Guarded] = {}
        self.websockets: dict[str, _Guarded] = {}
        self.files: dict[str, _File] = {}
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._monitor_pool: ThreadPoolExecutor | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        # Set before start(): share the port with other processes (SO_REUSEPORT), also serve on
        # a unix socket (the gateway, for its ingest workers), and pass every request but a POST
        # to a route of this server on to such a socket (an ingest worker).
        self.reuse_port = False
        self.unix_path = ""
        self.relay_to = ""
        self._relay_session: aiohttp.ClientSession | None = None

    # -- what stages add -----------------------------------------------------------------------

    def add_check(self, name: str, check: HealthCheck) -> None:
        self.checks[name] = check

    def add_route(self, path: str, route: Route) -> None:
        self.routes[path] = route

    def add_get(self, path: str, handle: GetHandler, token: bytes = b"") -> None:
        """A JSON GET endpoint; ``handle(query)`` runs on the loop, so it must not block: it
        awaits ``run_blocking`` for anything that does."""
        self.gets[path] = _Guarded(handle, token)

    def add_websocket(self, path: str, handle: WebSocketHandler, token: bytes = b"") -> None:
        """A WebSocket endpoint; ``handle(request)`` runs on the loop for the connection's life."""
        self.websockets[path] = _Guarded(handle, token)

    def add_static(self, prefix: str, folder: Traversable) -> None:
        """Serve the files below ``folder`` (package data) under ``prefix``; ``prefix`` itself
        answers with ``index.html``. Files are read once, now: only they can ever be served."""

        def walk(node: Traversable, path: str) -> None:
            for child in node.iterdir():
                if child.is_dir():
                    walk(child, f"{path}{child.name}/")
                elif not child.name.startswith("."):
                    body = child.read_bytes()
                    etag = '"' + hashlib.blake2b(body, digest_size=8).hexdigest() + '"'
                    self.files[path + child.name] = _File(body, _content_type(child.name), etag)

        base = prefix if prefix.endswith("/") else prefix + "/"
        walk(folder, base)
        if base + "index.html" in self.files:
            self.files[base] = self.files[base + "index.html"]

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Awaited on the loop when the server stops, before connections are closed (a
        WebSocket route says goodbye to its clients)."""
        self._on_stop.append(callback)

    @property
    def in_flight(self) -> int:
        """Requests in progress (WebSockets not counted)."""
        return self._in_flight

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The server's loop while it runs, for ``call_soon_threadsafe`` from other threads."""
        return self._loop

    def run_blocking(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` in the server's thread pool: a future of its result, to await."""
        assert self._loop is not None
        return self._loop.run_in_executor(self._pool, fn, *args)

    async def _monitor(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._monitor_pool, fn, *args)

    # -- lifetime ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (useful with port = 0)."""
        assert self._runner is not None, "the server is not running"
        return self._port

    def start(self) -> None:
        """Bind and serve on a thread of its own; raises here if the port cannot be bound."""
        loop = asyncio.new_event_loop()
        self._pool = ThreadPoolExecutor(self.config.workers, thread_name_prefix="http-worker")
        self._monitor_pool = ThreadPoolExecutor(2, thread_name_prefix="http-monitor")
        try:
            loop.run_until_complete(self._open())
        except BaseException:
            loop.close()
            self._pool.shutdown()
            self._monitor_pool.shutdown()
            raise
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="http", daemon=True)
        self._thread.start()
        log.info("HTTP server on %s:%d", self.config.host, self.port)

    async def _open(self) -> None:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        app.on_shutdown.append(self._shutting_down)
        app.on_response_prepare.append(_server_header)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_STOP_SECONDS)
        await runner.setup()
        site = web.TCPSite(
            runner,
            self.config.host,
            self.config.port,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
        )
        try:
            await site.start()
            if self.unix_path:
                await web.UnixSite(runner, self.unix_path).start()
        except BaseException:
            await runner.cleanup()
            raise
        if self.relay_to:
            self._relay_session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.relay_to), auto_decompress=False
            )
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def _shutting_down(self, _app: web.Application) -> None:
        if self._relay_session is not None:
            await self._relay_session.close()
        for callback in self._on_stop:
            try:
                await callback()
            except Exception:
                log.exception("HTTP stop callback failed")

    def stop(self) -> None:
        loop, thread, runner = self._loop, self._thread, self._runner
        if loop is None or thread is None or runner is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(_close(runner), loop).result(_STOP_SECONDS * 3)
        except Exception:
            log.exception("HTTP server did not stop cleanly")
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        for pool in (self._pool, self._monitor_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._loop = self._thread = self._runner = self._pool = self._monitor_pool = None

    # -- requests ------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if self._relay_session is not None and not (
            request.method == "POST" and path in self.routes
        ):
            return await self._relay(request, self._relay_session)
        ws = self.websockets.get(path)
        if ws is not None and request.method == "GET":
            if not ws.allows(request):
                return _json(401, {"error": "missing or wrong bearer token"})
            handle: WebSocketHandler = ws.handle
            return await handle(request)
        if self._in_flight >= self.config.max_requests:
            return _json(503, {"error": "too many requests in progress; retry later"}, close=True)
        self._in_flight += 1
        try:
            if request.method in ("GET", "HEAD"):
                return await self._get(request, path)
            if request.method == "POST":
                return await self._post(request, path)
            return _json(405, {"error": f"method {request.method} not allowed"}, close=True)
        finally:
            self._in_flight -= 1

    async def _get(self, request: web.Request, path: str) -> web.StreamResponse:
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            text = await self._monitor(generate_latest, self.metrics.registry)
            return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})
        if path == "/health":
            return _json(*await self._monitor(self.health))
        route = self.gets.get(path)
        if route is not None:
            if not route.allows(request):
                return _json(401, {"error": "missing or wrong bearer token"})
            try:
                return _json(*await route.handle(request.query))
            except Exception:
                log.exception("GET %s failed", path)
                return _json(500, {"error": "internal error; see the log"})
        file = self.files.get(path)
        if file is not None:
            return _file(request, file)
        return _json(404, {"error": f"no such resource: {path}"})

    async def _post(self, request: web.Request, path: str) -> web.StreamResponse:
        route = self.routes.get(path)
        if route is None:
            return _json(404, {"error": f"no such resource: {path}"}, close=True)
        refusal = route.refuse(request.headers)
        if refusal is not None:
            return _json(*refusal, close=True)
        length = request.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return _json(411, {"error": "Content-Length is required"}, close=True)
        if int(length) > route.max_body_bytes:
            error = {"error": f"body larger than {route.max_body_bytes} bytes"}
            return _json(413, error, close=True)
        body = await request.read()
        try:
            if route.handle_async is not None:
                status, doc = await route.handle_async(body)
            else:
                status, doc = await self.run_blocking(route.handle, body)
        except Exception:
            log.exception("POST %s failed", path)
            status, doc = 500, {"error": "internal error; see the gateway log"}
        return _json(status, doc)

    async def _relay(
        self, request: web.Request, session: aiohttp.ClientSession
    ) -> web.StreamResponse:
        """Pass a request on to the server behind ``relay_to`` and its answer back."""
        if request.headers.get("Upgrade"):
            return _json(501, {"error": "WebSocket connections are not served here"}, close=True)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        body = await request.read()
        try:
            async with session.request(
                request.method,
                f"http://gateway{request.rel_url}",
                headers=headers,
                data=body or None,
                allow_redirects=False,
            ) as answer:
                payload = await answer.read()
                back = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP}
                return web.Response(status=answer.status, body=payload, headers=back)
        except aiohttp.ClientError as e:
            return _json(502, {"error": f"the gateway did not answer ({e}); retry later"})

    def health(self) -> Answer:
        """200 only when every check is healthy. A check that is not ok but says ``degraded``
        (working, with something an operator must look at) shows as "degraded", and so does the
        whole answer unless another check is unhealthy."""
        checks: dict[str, Any] = {}
        statuses = set()
        for name, check in list(self.checks.items()):
            try:
                good, detail = check()
            except Exception as e:
                log.exception("health check %s failed", name)
                good, detail = False, {"error": f"check failed: {e}"}
            detail = dict(detail)
            degraded = bool(detail.pop("degraded", False))
            status = "healthy" if good else "degraded" if degraded else "unhealthy"
            statuses.add(status)
            checks[name] = {"status": status, **detail}
        overall = next((s for s in ("unhealthy", "degraded") if s in statuses), "healthy")
        body = {"status": overall, "timestamp": format_ts(now_ts()), "checks": checks}
        return (200 if overall == "healthy" else 503), body


async def _close(runner: web.AppRunner) -> None:
    """Stop serving, then end what the routes left running (a WebSocket's writer task)."""
    await runner.cleanup()
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# Headers of one hop, not passed on by a relay (aiohttp sets its own).
_HOP_BY_HOP = frozenset(
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "server",
        "date",
    ]
)


def _json(status: int, doc: dict[str, Any], close: bool = False) -> web.Response:
    headers = {"Content-Type": "application/json"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="edge-gateway"'
    if status == 503:
        headers["Retry-After"] = "5"
    response = web.Response(status=status, body=json.dumps(doc).encode(), headers=headers)
    if close:
        response.force_close()
    return response


def _file(request: web.Request, file: _File) -> web.Response:
    headers = {
        "Content-Type": file.content_type,
        "ETag": file.etag,
        "Cache-Control": "no-cache",  # revalidate: an upgrade shows at the next load
        "Content-Security-Policy": _PAGE_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if request.headers.get("If-None-Match") == file.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=file.body, headers=headers)


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "edge-gateway"
