"""The live feed and the dashboard: ``GET /ws?plant=P``, ``GET /api/limits``, ``GET /api/history``
and the page at ``/`` (``static/``), all on the processor's HTTP server.

:class:`LiveHub` is a consumer :class:`~gateway.processor.events.Listener`. ``on_batch`` runs on
the consumer thread and only hands off: it queues the batch's readings, alarm events and closed
windows for the server's loop (one wake-up per burst, ``call_soon_threadsafe``). Everything else
happens on the loop thread: the hub keeps the latest state in memory (newest reading per
plant/sensor/parameter, the last hour of 1-minute windows per plant and parameter with their
partials merged, active alarms, the last prediction per plant, per gateway the time of its newest
reading) and fans JSON messages out to the clients:

- ``{"type": "snapshot", ...}`` first, on connect: that latest state (of the plant asked for);
- ``{"type": "aggregate", ...}`` for each closed 1-minute window (partials of the window merged
  so far: with two of the plant's partitions here, it comes twice, the second with both);
- ``{"type": "alert", ...}`` for each alarm event (raised, re-raised, cleared, acknowledged,
  shelved, out_of_service), the ``AlarmEvent`` contract;
- ``{"type": "status", ...}`` at most once a second per plant: the sensors whose newest reading
  changed (value, unit, quality and reasons) and the plant's gateways;
- ``{"type": "prediction", ...}`` whatever :meth:`LiveHub.publish` is given.

Each client has a queue of what it has yet to be sent, bounded in bytes (``MAX_BEHIND``; the
messages themselves are shared by every client, encoded once). A client that falls that far behind
is dropped (closed with code 1013 and the reason), so a slow client never stalls the processor or
the other clients. The bound is far above what one consumer batch can produce, so a client that
keeps up is never dropped by a burst.

With a token configured, ``/ws`` and ``/api/*`` need it, as ``Authorization: Bearer`` or as
``?token=`` (a browser cannot set headers on a WebSocket); the page and its assets hold no data
and are open, and the page reads the token from its address's fragment, ``/#token=...``, which
the browser never sends to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import orjson
from aiohttp import WSCloseCode, web

from gateway.common.alarms import AlarmConfig
from gateway.common.http import Answer, HttpServer
from gateway.common.logs import RateLimitedLog
from gateway.common.metrics import Metrics
from gateway.common.model import PARAMETERS, AlarmEvent, Reading, format_ts
from gateway.processor.aggregate import WindowAggregate, merge
from gateway.processor.query import QueryInputError, check_plant

log = logging.getLogger(__name__)

HISTORY_SECONDS = 3600  # the chart's span: windows older than this are forgotten
STATUS_EVERY = 1.0  # seconds between a plant's status messages
MAX_BEHIND = 8 * 1024 * 1024  # bytes of messages a client may be behind before it is dropped
MAX_CLIENTS = 500
SEND_BUFFER = 64 * 1024  # kernel send buffer per client, so a stalled one is noticed soon
MAX_INBOX = 10_000  # hand-offs waiting for the loop; beyond, the loop is stuck: drop
MAX_SENSORS = 100_000  # remembered (plant, sensor, parameter) series
MAX_SERIES = 20_000  # remembered (plant, parameter) window series
MAX_SEEN = 100_000  # alarm event ids remembered to recognise one heard twice
ACTIVE = ("raised", "re-raised")
GONE = ("cleared", "shelved", "out_of_service")

# Windows of the last hour from storage (all instances' partials merged): plant, start, stop.
StoredHistory = Callable[[str, float, float], list[WindowAggregate]]


def _text(message: Mapping[str, Any]) -> str:
    return orjson.dumps(message).decode()


def _reading(r: Reading) -> dict[str, Any]:
    return {
        "sensorId": r.sensor_id,
        "parameter": r.parameter,
        "value": r.value,
        "unit": r.unit,
        "quality": r.quality.value,
        "qualityReasons": list(r.quality_reasons),
        "timestamp": format_ts(r.timestamp),
        "location": r.location,
        "gatewayId": r.gateway_id,
    }


@dataclass
class _Gateway:
    gateway_id: str
    last_reading: float  # event time of its newest reading
    last_arrival: float  # wall time that reading reached us

    def to_dict(self) -> dict[str, Any]:
        return {
            "gatewayId": self.gateway_id,
            "lastReading": format_ts(self.last_reading),
            "lastArrival": format_ts(self.last_arrival),
            "delaySeconds": round(max(0.0, self.last_arrival - self.last_reading), 1),
        }


@dataclass(eq=False)
class _Client:
    ws: web.WebSocketResponse
    plant: str  # "" = every plant
    queue: asyncio.Queue[list[str]]  # what one turn of the loop had for it
    behind: int = 0  # bytes queued, not yet sent
    peer: str = ""
    writer: asyncio.Task[None] | None = None
    dropped: str = ""

    def wants(self, plant: str) -> bool:
        return not self.plant or self.plant == plant


@dataclass
class _Plant:
    """What the hub remembers of one plant (loop thread only)."""

    sensors: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    windows: dict[str, dict[int, dict[str, WindowAggregate]]] = field(default_factory=dict)
    gateways: dict[str, _Gateway] = field(default_factory=dict)
    prediction: dict[str, Any] | None = None
    changed: set[tuple[str, str]] = field(default_factory=set)  # sensors since the last status

    def window(self, parameter: str, start: int) -> WindowAggregate:
        return merge(self.windows[parameter][start].values())

    def latest_windows(self) -> list[WindowAggregate]:
        return [self.window(p, max(starts)) for p, starts in self.windows.items() if starts]


class LiveHub:
    """The live feed's state and clients; a consumer listener. See the module docstring."""

    def __init__(
        self,
        alarms: AlarmConfig,
        metrics: Metrics,
        *,
        token: bytes = b"",
        stored_history: StoredHistory | None = None,
        max_behind: int = MAX_BEHIND,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.alarm_config = alarms
        self.metrics = metrics
        self.token = token
        self.max_behind = max_behind
        self.max_clients = max_clients
        self._stored_history = stored_history
        self._server: HttpServer | None = None
        # handed from other threads to the loop
        self._inbox: deque[tuple[Any, ...]] = deque()
        self._wake_pending = False
        self._overflow = 0
        # loop thread only
        self._plants: dict[str, _Plant] = {}
        self._alarms: dict[str, dict[str, Any]] = {}  # alarm id -> its newest event, if active
        self._seen: OrderedDict[str, None] = OrderedDict()  # recent event ids, oldest first
        self._clients: set[_Client] = set()
        self._outbox: dict[_Client, list[str]] = {}  # this turn's messages, sent by _flush
        self._status_task: asyncio.Task[None] | None = None
        self._history_log = RateLimitedLog(log, 60.0)

    def attach(self, server: HttpServer) -> None:
        self._server = server
        server.add_websocket("/ws", self._connect, self.token)
        server.add_get("/api/limits", self._limits, self.token)
        server.add_get("/api/history", self._history, self.token)
        server.add_static("/", resources.files("gateway.processor") / "static")
        server.on_stop(self.close_all)

    # -- any thread: hand off, never block -----------------------------------------------------

    def on_batch(
        self, readings: list[Reading], alerts: list[AlarmEvent], windows: list[WindowAggregate]
    ) -> None:
        # The lists are this batch's own (the consumer builds them per batch): handed over as
        # they are, so the consumer thread pays one append and at most one wake-up.
        if readings or alerts or windows:
            self._hand_off(("batch", readings, alerts, windows))

    def on_followed(self, alerts: list[AlarmEvent], windows: list[WindowAggregate]) -> None:
        """Alarm events and windows every instance published (``follow``): what this instance's
        own consumer already told is recognised and not sent again."""
        self._hand_off(("batch", [], alerts, windows))

    def publish(self, plant_id: str, message: Mapping[str, Any]) -> None:
        """Push ``message`` to the plant's subscribers, from any thread, without blocking.
        ``type`` defaults to ``prediction``; the newest prediction of each plant is kept for the
        snapshot. Predictions carry ``prediction`` (the class), ``confidence``, ``model`` and
        ``timestamp``."""
        message = {"type": "prediction", **message, "plantId": plant_id}
        self._hand_off(("publish", plant_id, message))

    def _hand_off(self, item: tuple[Any, ...]) -> None:
        loop = self._server.loop if self._server is not None else None
        if loop is None:
            return  # not serving: nobody to tell
        if len(self._inbox) >= MAX_INBOX:
            self._overflow += 1
            return
        self._inbox.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._drain)

    # -- loop thread: state and fan-out --------------------------------------------------------

    def _drain(self) -> None:
        self._wake_pending = False  # before popping: a hand-off from now on wakes us again
        if self._overflow:
            log.warning("live feed: the loop fell behind, %d updates dropped", self._overflow)
            self._overflow = 0
        while self._inbox:
            item = self._inbox.popleft()
            try:
                if item[0] == "batch":
                    self._apply_batch(item[1], item[2], item[3], time.time())
                else:
                    self._apply_publish(item[1], item[2])
            except Exception:
                log.exception("live feed: update failed")
        if self._status_task is None:
            self._status_task = asyncio.get_running_loop().create_task(self._status_loop())

    def _plant(self, plant_id: str) -> _Plant:
        plant = self._plants.get(plant_id)
        if plant is None:
            plant = self._plants[plant_id] = _Plant()
        return plant

    def _apply_batch(
        self,
        readings: list[Reading],
        alerts: list[AlarmEvent],
        windows: list[WindowAggregate],
        now: float,
    ) -> None:
        sensors = sum(len(p.sensors) for p in self._plants.values())
        # Each sensor's last reading in the batch (partition order: the newest, but for the
        # rare reading that arrives out of order, which the check below leaves aside).
        newest = {(r.plant_id, r.sensor_id, r.parameter): r for r in readings}
        for r in newest.values():
            plant = self._plant(r.plant_id)
            key = (r.sensor_id, r.parameter)
            prev = plant.sensors.get(key)
            if prev is not None and prev["_ts"] > r.timestamp:
                continue  # a replayed or late reading is not the newest
            if prev is None:
                if sensors >= MAX_SENSORS:
                    continue
                sensors += 1
            plant.sensors[key] = {**_reading(r), "_ts": r.timestamp}
            plant.changed.add(key)
            gw = plant.gateways.get(r.gateway_id)
            if gw is None:
                plant.gateways[r.gateway_id] = _Gateway(r.gateway_id, r.timestamp, now)
            elif r.timestamp >= gw.last_reading:
                gw.last_reading, gw.last_arrival = r.timestamp, now
        for e in alerts:
            if e.event_id in self._seen:
                continue  # a replay, or heard from both our consumer and the topic
            self._seen[e.event_id] = None
            if len(self._seen) > MAX_SEEN:
                self._seen.popitem(last=False)
            self._remember_alarm(e)
            self._broadcast(e.plant_id, {"type": "alert", **e.to_dict()})
        for w in windows:
            merged = self._remember_window(w)
            if merged is not None:
                self._broadcast(w.plant_id, {"type": "aggregate", **merged.to_dict()})

    def _remember_alarm(self, e: AlarmEvent) -> None:
        if e.state in ACTIVE:
            self._alarms[e.alarm_id] = {**e.to_dict(), "acknowledged": False}
        elif e.state == "acknowledged" and e.alarm_id in self._alarms:
            self._alarms[e.alarm_id]["acknowledged"] = True
        elif e.state in GONE:
            self._alarms.pop(e.alarm_id, None)

    def _remember_window(self, w: WindowAggregate) -> WindowAggregate | None:
        plant = self._plant(w.plant_id)
        series = plant.windows.get(w.parameter)
        if series is None:
            if sum(len(p.windows) for p in self._plants.values()) >= MAX_SERIES:
                return None
            series = plant.windows[w.parameter] = {}
        partials = series.setdefault(w.start, {})
        old = partials.get(w.source)
        if old is not None and (old.count, old.sum, old.latest_time) == (
            w.count,
            w.sum,
            w.latest_time,
        ):
            return None  # known already: a replay, or heard from both our consumer and the topic
        partials[w.source] = w  # a replayed partial replaces itself
        newest = max(series)
        for start in [s for s in series if s <= newest - HISTORY_SECONDS]:
            del series[start]
        return plant.window(w.parameter, w.start) if w.start in series else None

    def _apply_publish(self, plant_id: str, message: dict[str, Any]) -> None:
        if message.get("type") == "prediction":
            self._plant(plant_id).prediction = message
        self._broadcast(plant_id, message)

    def _broadcast(self, plant_id: str, message: Mapping[str, Any]) -> None:
        text: str | None = None
        for client in self._clients:
            if client.wants(plant_id):
                text = text or _text(message)
                if not self._outbox:
                    asyncio.get_running_loop().call_soon(self._flush)
                self._outbox.setdefault(client, []).append(text)

    def _flush(self) -> None:
        """Queue this turn's messages for each client, one entry per client."""
        outbox, self._outbox = self._outbox, {}
        for client, texts in outbox.items():
            if client.dropped:
                continue
            client.behind += sum(len(t) for t in texts)
            if client.behind > self.max_behind:
                self._drop(client, f"too slow: more than {self.max_behind} bytes behind")
            else:
                client.queue.put_nowait(texts)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY)
            for plant_id, plant in self._plants.items():
                if plant.changed:
                    changed, plant.changed = plant.changed, set()
                    if self._clients:
                        self._broadcast(plant_id, self._status(plant_id, plant, changed))

    def _status(
        self, plant_id: str, plant: _Plant, keys: set[tuple[str, str]] | None = None
    ) -> dict[str, Any]:
        sensors = plant.sensors if keys is None else {k: plant.sensors[k] for k in keys}
        return {
            "type": "status",
            "plantId": plant_id,
            "sensors": [_public(s) for _, s in sorted(sensors.items())],
            "gateways": [g.to_dict() for _, g in sorted(plant.gateways.items())],
        }

    def snapshot(self, plant_filter: str = "") -> dict[str, Any]:
        plants = {
            pid: p for pid, p in self._plants.items() if not plant_filter or pid == plant_filter
        }
        return {
            "type": "snapshot",
            "plant": plant_filter or None,
            "serverTime": format_ts(time.time()),
            "plants": sorted(plants),
            "status": [self._status(pid, p) for pid, p in sorted(plants.items())],
            "aggregates": [w.to_dict() for p in plants.values() for w in p.latest_windows()],
            "alarms": [a for a in self._alarms.values() if a["plantId"] in plants],
            "predictions": [p.prediction for p in plants.values() if p.prediction],
        }

    # -- clients -------------------------------------------------------------------------------

    async def _connect(self, request: web.Request) -> web.StreamResponse:
        plant = request.query.get("plant", "")
        try:
            if plant:
                check_plant(plant)
        except QueryInputError as e:
            return web.json_response({"error": str(e)}, status=400)
        if len(self._clients) >= self.max_clients:
            return web.json_response(
                {"error": "too many live clients; retry later"},
                status=503,
                headers={"Retry-After": "5"},
            )
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=64 * 1024, timeout=2.0)
        await ws.prepare(request)
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        client = _Client(ws, plant, asyncio.Queue(), peer=str(request.remote))
        client.queue.put_nowait([_text(self.snapshot(plant))])
        client.writer = asyncio.get_running_loop().create_task(self._write(client))
        self._clients.add(client)
        self.metrics.active_connections.inc()
        try:
            async for _ in ws:
                pass  # the feed is one way: what a client says is ignored
        finally:
            self._forget(client)
        return ws

    async def _write(self, client: _Client) -> None:
        try:
            while True:
                for text in await client.queue.get():
                    await client.ws.send_str(text)
                    client.behind -= len(text)
        except (ConnectionError, RuntimeError):  # the client went away
            self._forget(client)

    def _forget(self, client: _Client) -> None:
        if client in self._clients:
            self._clients.discard(client)
            self.metrics.active_connections.dec()
        if client.writer is not None and client.writer is not asyncio.current_task():
            client.writer.cancel()

    def _drop(self, client: _Client, reason: str, code: int = WSCloseCode.TRY_AGAIN_LATER) -> None:
        if client.dropped:
            return
        client.dropped = reason
        self._forget(client)
        log.info("live feed: client %s dropped: %s", client.peer, reason)
        asyncio.get_running_loop().create_task(self._close(client, code, reason))

    async def _close(self, client: _Client, code: int, reason: str) -> None:
        # A client that does not read does not answer the close either: the close times out
        # (the WebSocket's own timeout) and the connection is cut.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.ws.close(code=code, message=reason.encode()), 5.0)

    async def close_all(self) -> None:
        if self._status_task is not None:
            self._status_task.cancel()
        clients = list(self._clients)
        for client in clients:
            client.dropped = "server stopping"
            self._forget(client)
        await asyncio.gather(
            *(self._close(c, WSCloseCode.GOING_AWAY, "server stopping") for c in clients)
        )

    # -- the page's data -----------------------------------------------------------------------

    async def _limits(self, query: Mapping[str, str]) -> Answer:
        """Alarm limits per parameter for a plant (its own table, else the global one)."""
        plant = query.get("plant", "")
        try:
            if plant:
                check_plant(plant)
        except QueryInputError as e:
            return 400, {"error": str(e)}
        c = self.alarm_config
        names = {*PARAMETERS, *c.thresholds, *c.plants.get(plant, {})}
        limits = {}
        for name in sorted(names):
            found = c.limits_for(plant, "", name)
            if found is not None:
                limits[name] = {
                    k: v
                    for k, v in asdict(found).items()
                    if k in ("high_critical", "high_warning", "low_warning", "low_critical")
                    and v is not None
                }
        return 200, {"plant": plant or None, "limits": limits}

    async def _history(self, query: Mapping[str, str]) -> Answer:
        """The plant's 1-minute windows of the last hour: from storage (every instance's
        partials) when it answers, completed by this instance's memory."""
        try:
            plant_id = check_plant(query.get("plant", ""))
        except QueryInputError as e:
            return 400, {"error": str(e)}
        now = time.time()
        best: dict[tuple[str, int], WindowAggregate] = {}
        sources = []
        if self._stored_history is not None and self._server is not None:
            try:
                stored = await self._server.run_blocking(
                    self._stored_history, plant_id, now - HISTORY_SECONDS, now + 60
                )
                best = {(w.parameter, w.start): w for w in stored}
                sources.append("influxdb")
            except Exception as e:
                self._history_log.warning("history", "history from InfluxDB failed: %s", e)
        plant = self._plants.get(plant_id)
        if plant is not None:
            sources.append("memory")
            for parameter, series in plant.windows.items():
                for start in series:
                    w = plant.window(parameter, start)
                    old = best.get((parameter, start))
                    if old is None or w.count > old.count:
                        best[(parameter, start)] = w
        windows = [w.to_dict() for _, w in sorted(best.items())]
        return 200, {"plant": plant_id, "sources": sources, "windows": windows}


def _public(sensor: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sensor.items() if not k.startswith("_")}
