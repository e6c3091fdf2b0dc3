"""The notifier stage: alarm events and operator actions in, decisions to the outbox, senders out.

Multi-instance design. The alerts topic is keyed by plant, and the notifier reads it in a consumer
group of its own (``{group_id}-alerts``): one instance owns a plant's alerts at a time, so one
instance decides its notifications. Each batch is decided and saved in one SQLite transaction
(seen event ids, alarm state, outbox rows keyed by stable notification ids) before its offsets are
committed: a crash replays the batch, and the replay finds its ids seen and its rows present.
Every event is also written to InfluxDB (measurement ``alerts``; a point rewritten is stored once),
with a client of its own.

Operator actions (ack, shelve, unshelve, out of service) are applied at once by the instance whose
API took them and published to ``actions_topic``, which every instance follows from its start in
a group of its own (action ids de-duplicate), so whichever instance owns the plant honours them.

Known limit: when a plant's partition moves to another instance, that instance starts with the
alarm state it has itself (its own SQLite file); alarms it never saw are learnt again as they are
re-raised.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, Producer

from gateway.common.logs import RateLimitedLog
from gateway.common.metrics import Metrics
from gateway.common.model import AlarmEvent, format_ts
from gateway.common.stage import Health
from gateway.common.supervise import Heartbeat
from gateway.processor.alerting.channels import build_channels
from gateway.processor.alerting.config import NotificationsConfig
from gateway.processor.alerting.routing import Alert, Discipline
from gateway.processor.alerting.senders import Senders
from gateway.processor.alerting.statedb import StateDb
from gateway.processor.store import InfluxConfig, InfluxStore, StoreUnavailable, alarm_line

log = logging.getLogger(__name__)

ACTIONS = ("ack", "shelve", "unshelve", "out_of_service")
# What the live feed is told of an action (the states LiveHub knows).
_LIVE_STATE = {"ack": "acknowledged", "shelve": "shelved", "unshelve": "unshelved"}

AlertChanged = Callable[[list[AlarmEvent]], None]


class ActionError(ValueError):
    """An action the API refuses (unknown alarm, bad arguments): its message says why."""


class AlertNotifier:
    def __init__(
        self,
        config: NotificationsConfig,
        kafka_conf: dict[str, Any],
        *,
        alerts_topic: str,
        group_prefix: str,
        influx: InfluxConfig,
        metrics: Metrics,
        source: str = "config",
        on_change: AlertChanged | None = None,
        metadata_refresh_ms: int = 30_000,
        session_timeout_ms: int = 10_000,
    ) -> None:
        self.config = config
        self.alerts_topic = alerts_topic
        self.store, self.bucket = InfluxStore(influx, metrics, source=source), influx.bucket
        self.on_change = on_change
        self.db = StateDb(config.state_path)
        self.discipline = Discipline(config)
        self.db.load(self.discipline)
        self.senders = Senders(build_channels(config, source), self.db, metrics)
        common = {
            **kafka_conf,
            "enable.auto.commit": False,
            "error_cb": self._on_error,
            "topic.metadata.refresh.interval.ms": metadata_refresh_ms,  # topics made later
            "fetch.wait.max.ms": 50,
        }
        self._alerts_conf = {
            **common,
            "group.id": f"{group_prefix}-alerts",
            "auto.offset.reset": "earliest",
            # a dead instance's plants move to the others this soon (the processor's own setting)
            "session.timeout.ms": session_timeout_ms,
            "heartbeat.interval.ms": max(1000, session_timeout_ms // 5),
        }
        self._actions_conf = {
            **common,
            "group.id": f"{group_prefix}-alert-actions-{uuid.uuid4().hex[:12]}",
            "auto.offset.reset": "earliest",
        }
        self._producer = Producer({**kafka_conf, "linger.ms": 0, "error_cb": self._on_error})
        self._lock = threading.Lock()  # the discipline and the saves
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat = Heartbeat("alert notifier", progress=False)
        self._bad = RateLimitedLog(log, 60.0)
        self.last_error = ""

    # -- stage -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.senders.start()
        self._thread = threading.Thread(target=self._run, name="alert-notifier", daemon=True)
        self._thread.start()
        self._beat.watch(self._thread)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.senders.stop()
        self._producer.flush(5)
        self.db.close()
        self.store.close()

    def heartbeats(self) -> list[Heartbeat]:
        return [self._beat]

    def health(self) -> Health:
        ok, detail = self.senders.health()
        if self.last_error:
            return False, {**detail, "error": self.last_error}
        return ok, detail

    # -- the consumer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._consume()
            except Exception as e:
                self.last_error = f"notifier: {e}"[:300]
                log.exception("alert notifier failed; again in 5 s")
                self._stop.wait(5.0)

    def _consume(self) -> None:
        alerts, actions = Consumer(self._alerts_conf), Consumer(self._actions_conf)
        alerts.subscribe([self.alerts_topic])
        actions.subscribe([self.config.actions_topic])
        try:
            while not self._stop.is_set():
                msgs = alerts.consume(500, 0.2)
                for doc in self._decode(actions.consume(100, 0), "action"):
                    try:
                        self.apply_action(doc, publish=False)
                    except ActionError as e:  # an alarm of a plant another instance owns
                        log.debug("alert action not for this instance: %s", e)
                    except (KeyError, TypeError, ValueError) as e:
                        self._bad.warning("action", "alert actions: skipped %s: %s", doc, e)
                events = self._events(msgs)
                if events:
                    self._store(events)
                self._decide(events)
                if msgs:
                    alerts.commit(asynchronous=False)
                self.last_error = ""
        finally:
            alerts.close()
            actions.close()

    def _decode(self, msgs: list[Any], what: str) -> list[dict[str, Any]]:
        docs = []
        for msg in msgs:
            if msg.error() is not None:
                if msg.error().code() not in (
                    KafkaError._PARTITION_EOF,
                    KafkaError.UNKNOWN_TOPIC_OR_PART,
                ):
                    self._bad.warning("consume", "alert notifier: %s", msg.error())
                continue
            try:
                doc = orjson.loads(msg.value())
                if not isinstance(doc, dict):
                    raise TypeError("not an object")
                docs.append(doc)
            except (orjson.JSONDecodeError, TypeError) as e:
                self._bad.warning("decode", "alert notifier: skipped a bad %s: %s", what, e)
        return docs

    def _events(self, msgs: list[Any]) -> list[AlarmEvent]:
        events = []
        for doc in self._decode(msgs, "alarm event"):
            try:
                events.append(AlarmEvent.from_dict(doc))
            except (KeyError, TypeError, ValueError) as e:
                self._bad.warning("event", "alert notifier: skipped an alarm event: %s", e)
        return events

    def _store(self, events: list[AlarmEvent]) -> None:
        """Every event in InfluxDB (the edge's too), before the offsets are committed."""
        delay = 0.5
        while not self._stop.is_set():
            try:
                for refused in self.store.write(self.bucket, [alarm_line(e) for e in events]):
                    self._bad.warning(
                        "refused", "alert notifier: InfluxDB refused an alert (%s): %s",
                        refused.reason, refused.detail[:200],
                    )  # fmt: skip
                return
            except StoreUnavailable as e:
                self.last_error = f"InfluxDB: {e}"[:300]
                self._bad.warning("influx", "alert notifier: storing alerts failed: %s", e)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
        raise RuntimeError("stopping before the alerts were stored")

    def _decide(self, events: list[AlarmEvent]) -> None:
        now = time.time()
        with self._lock:
            fresh = self.db.unseen(e.event_id for e in events) if events else set()
            notes = []
            for e in events:
                if e.event_id in fresh:
                    fresh.discard(e.event_id)  # a duplicate within the batch counts once
                    notes.extend(self.discipline.apply(e, now))
            notes.extend(self.discipline.tick(now))
            changed = bool(self.discipline.changed or self.discipline.history)
            if not (events or notes or changed):
                return
            added = self.db.save(self.discipline, (e.event_id for e in events), notes, now)
        if added:
            self.senders.wake()

    # -- operator actions (any thread) -----------------------------------------------------------

    def apply_action(self, doc: dict[str, Any], *, publish: bool = True) -> dict[str, Any]:
        """Apply an action (``action``: ack, shelve, unshelve, out_of_service; ``by``; ``id``
        for an alarm or ``sensorId``; ``note``; ``until`` epoch seconds) here, and with
        ``publish`` tell every instance. Returns what it acted on (``known`` false: an alarm this
        instance has not seen, passed on to the others); ActionError if it cannot."""
        action, by = doc.get("action"), str(doc.get("by", "")).strip()
        if action not in ACTIONS:
            raise ActionError(f"action must be one of {', '.join(ACTIONS)}")
        if not by and action != "unshelve":
            raise ActionError("say who acts: by")
        doc = {**doc, "by": by, "actionId": doc.get("actionId") or uuid.uuid4().hex}
        doc.setdefault("at", time.time())
        at = float(doc["at"])
        with self._lock:
            if not self.db.unseen([doc["actionId"]]):
                return {"duplicate": True}
            result = self._act(action, doc, at, here_only=not publish)
            self.db.save(self.discipline, [doc["actionId"]], [], time.time())
        if publish:
            key = str(result.get("plantId") or result.get("sensorId") or result.get("alarmId"))
            self._producer.produce(self.config.actions_topic, orjson.dumps(doc), key.encode())
            self._producer.flush(5)
        if self.on_change is not None and isinstance(result.get("alert"), Alert):
            a = result["alert"]
            state = _LIVE_STATE[action]
            self.on_change([_live_event(a, state, doc["actionId"], at, by)])
        return {k: (v.doc() if isinstance(v, Alert) else v) for k, v in result.items()}

    def _act(
        self, action: str, doc: dict[str, Any], at: float, *, here_only: bool
    ) -> dict[str, Any]:
        """Apply to this instance's state. An alarm this instance does not know may be one of a
        plant another instance owns: unless ``here_only``, it is passed on to them."""
        d = self.discipline
        if action == "out_of_service":
            sensor, until = str(doc.get("sensorId", "")), float(doc["until"])
            if not sensor:
                raise ActionError("name the sensor: sensorId")
            d.set_out_of_service(sensor, until, doc["by"], at)
            return {"sensorId": sensor, "until": until}
        alarm_id = str(doc.get("id", ""))
        if action == "ack":
            a = d.ack(alarm_id, doc["by"], at, str(doc.get("note", "")))
        elif action == "shelve":
            a = d.shelve(alarm_id, float(doc["until"]), doc["by"], at)
        else:
            a = d.shelve(alarm_id, None, doc["by"], at)
        if a is None:
            if here_only:
                raise ActionError(f"no such alarm: {alarm_id}")
            return {"alarmId": alarm_id, "known": False, "passedOn": True}
        return {"alert": a, "plantId": a.plant_id}

    def listing(self, *, active: bool = False, plant: str = "") -> dict[str, Any]:
        """The alert state for the API: alarms (newest first), sensors out of service, history."""
        now = time.time()
        with self._lock:
            alerts = [
                a.doc()
                for a in sorted(self.discipline.alerts.values(), key=lambda a: -a.raised_at)
                if (a.active or not active) and (not plant or a.plant_id == plant)
            ]
            oos = [
                {
                    "sensorId": o.sensor_id,
                    "until": format_ts(o.until),
                    "by": o.by,
                    "at": format_ts(o.at),
                }
                for o in self.discipline.out_of_service.values()
                if o.until > now
            ]
        history = [
            {**h, "at": format_ts(h["at"]), "until": h["until"] and format_ts(h["until"])}
            for h in self.db.history()
        ]
        return {"alerts": alerts, "outOfService": oos, "history": history}

    def _on_error(self, err: KafkaError) -> None:
        self._bad.warning(str(err.code()), "alert notifier: kafka: %s", err)


def _live_event(a: Alert, state: str, action_id: str, at: float, by: str) -> AlarmEvent:
    return AlarmEvent(
        alarm_id=a.alarm_id,
        event_id=action_id,
        sensor_id=a.sensor_id,
        plant_id=a.plant_id,
        parameter=a.parameter,
        condition=a.condition,
        level=a.level,
        state=state,
        value=a.value,
        threshold=a.threshold,
        timestamp=at,
        message=f"{state} by {by}",
    )
