"""Notification discipline as pure logic: what to send, when, to whom. No I/O, no clock.

:class:`Discipline` holds every alarm's lifecycle (:class:`Alert`) and the sensors out of service.
The notifier tells it each alarm event (``apply``) and operator action, and asks it on a timer
(``tick``) what is due; both return :class:`Notification` decisions, which the notifier records
in the outbox before anything is sent. Rules (Alertmanager and ISA-18.2):

- **grouping**: a new alarm waits ``group_wait`` seconds; the due alarms of one
  (plant, sensor, parameter, level) go out as one notification; one that clears within the wait
  is never sent, and events of an alarm already active add nothing;
- **repeat**: while an alarm stays active, unacknowledged and unsuppressed, a reminder goes out
  every ``repeat_interval``;
- **inhibition**: an active critical suppresses the warning of the same plant, sensor, parameter;
- **suppression**: a shelved alarm (until its time) and a sensor out of service (its process
  alarms, not probe faults) are not notified; reminders resume when the suppression ends;
- **flood**: more than ``flood_count`` new alarms in ``flood_window`` on one plant: the due
  alarms of that plant become one summary (at most one per window);
- **resolved**: an alarm that was notified and clears sends "resolved" where its route says so.

Notification ids are derived from event ids and stored times, so a replay decides the same ids
and the outbox keeps one of each.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from gateway.common.alarms import FAULT, is_flood
from gateway.common.model import AlarmEvent, format_ts
from gateway.processor.alerting.config import NotificationsConfig

Kind = Literal["alert", "reminder", "resolved", "flood"]
RAISED = ("raised", "re-raised")


@dataclass
class Alert:
    """One alarm's lifecycle (persisted in the alert state table)."""

    alarm_id: str
    plant_id: str
    sensor_id: str
    parameter: str
    condition: str
    level: str
    event_id: str  # the newest event's
    value: float | None
    threshold: float | None
    message: str
    raised_at: float  # event time of the newest raise
    seen_at: float  # when this episode reached us (group wait counts from here)
    active: bool = True
    notified_at: float | None = None  # last decision (sent or suppressed); None = pending
    notified: bool = False  # a notification went out for this episode (resolved is due)
    cleared_at: float | None = None
    acked_by: str = ""
    acked_at: float | None = None
    ack_note: str = ""
    shelved_until: float | None = None
    shelved_by: str = ""
    shelved_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def doc(self) -> dict[str, Any]:
        """The JSON the API, the channels and the webhook show (camelCase, RFC 3339 times)."""

        def ts(v: float | None) -> str | None:
            return None if v is None else format_ts(v)

        return {
            "alarmId": self.alarm_id,
            "eventId": self.event_id,
            "plantId": self.plant_id,
            "sensorId": self.sensor_id,
            "parameter": self.parameter,
            "condition": self.condition,
            "level": self.level,
            "state": "active" if self.active else "cleared",
            "value": self.value,
            "threshold": self.threshold,
            "message": self.message,
            "raisedAt": ts(self.raised_at),
            "clearedAt": ts(self.cleared_at),
            "acknowledged": self.acked_at is not None,
            "ackedBy": self.acked_by or None,
            "ackedAt": ts(self.acked_at),
            "ackNote": self.ack_note or None,
            "shelvedUntil": ts(self.shelved_until),
            "shelvedBy": self.shelved_by or None,
            "shelvedAt": ts(self.shelved_at),
        }


@dataclass
class OutOfService:
    sensor_id: str
    until: float
    by: str
    at: float


@dataclass(frozen=True)
class Notification:
    """A decision to notify: ``id`` is stable (the outbox's key), one message per channel."""

    id: str
    kind: Kind
    plant_id: str
    level: str
    channels: tuple[str, ...]
    subject: str
    text: str
    alerts: tuple[dict[str, Any], ...]

    def doc(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "plantId": self.plant_id,
            "level": self.level,
            "subject": self.subject,
            "text": self.text,
            "alerts": list(self.alerts),
        }


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def _line(a: Alert) -> str:
    return (
        f"{a.plant_id}/{a.sensor_id} {a.parameter} {a.condition} {a.level}: "
        f"{_fmt(a.value)} (limit {_fmt(a.threshold)}) {a.message}".rstrip()
    )


@dataclass
class Discipline:
    config: NotificationsConfig
    alerts: dict[str, Alert] = field(default_factory=dict)
    out_of_service: dict[str, OutOfService] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)  # alarm ids to persist
    history: list[dict[str, Any]] = field(default_factory=list)  # actions to persist
    _raises: dict[str, deque[float]] = field(default_factory=dict)  # plant -> recent raises
    _flood_sent: dict[str, float] = field(default_factory=dict)  # plant -> last summary

    # -- events ----------------------------------------------------------------------------------

    def apply(self, e: AlarmEvent, now: float) -> list[Notification]:
        """An alarm event from the alerts topic; a ``resolved`` notification if one is due."""
        a = self.alerts.get(e.alarm_id)
        if e.state in RAISED:
            if a is not None and a.active:
                a.event_id, a.value, a.message = e.event_id, e.value, e.message
                self.changed.add(a.alarm_id)
                return []
            shelf = (a.shelved_until, a.shelved_by, a.shelved_at) if a else (None, "", None)
            self.alerts[e.alarm_id] = Alert(
                e.alarm_id, e.plant_id, e.sensor_id, e.parameter, e.condition, e.level,
                e.event_id, e.value, e.threshold, e.message, e.timestamp, now,
                shelved_until=shelf[0], shelved_by=shelf[1], shelved_at=shelf[2],
            )  # fmt: skip
            self.changed.add(e.alarm_id)
            times = self._raises.setdefault(e.plant_id, deque())
            times.append(now)
            while times and times[0] <= now - self.config.flood_window:
                times.popleft()
            return []
        if e.state == "cleared" and a is not None and a.active:
            a.active, a.cleared_at, a.event_id = False, e.timestamp, e.event_id
            a.value = e.value
            self.changed.add(a.alarm_id)
            if a.notified and not self._suppressed(a, now):
                channels = self._channels(a, resolved=True)
                if channels:
                    return [self._note("resolved", f"resolved:{e.event_id}", [a], channels)]
        return []

    # -- time ------------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Notification]:
        """What is due at ``now``: grouped new alarms (or a flood summary), reminders."""
        out: list[Notification] = []
        wait, repeat = self.config.group_wait, self.config.repeat_interval
        due = [
            a
            for a in self.alerts.values()
            if a.active and a.notified_at is None and now >= a.seen_at + wait
        ]
        by_plant: dict[str, list[Alert]] = {}
        for a in due:
            by_plant.setdefault(a.plant_id, []).append(a)
        for plant, alerts in sorted(by_plant.items()):
            if is_flood(
                self._raises.get(plant, ()),
                now,
                self.config.flood_count,
                self.config.flood_window,
            ):
                out.extend(self._flood(plant, alerts, now))
                continue
            groups: dict[tuple[str, str, str], list[Alert]] = {}
            for a in alerts:
                groups.setdefault((a.sensor_id, a.parameter, a.level), []).append(a)
            for group in groups.values():
                send = [a for a in group if not self._suppressed(a, now)]
                for a in group:
                    self._decided(a, now, sent=a in send)
                channels = self._channels(send[0]) if send else ()
                if channels:
                    first = min(a.event_id for a in send)
                    out.append(self._note("alert", f"alert:{first}", send, channels))
        for a in self.alerts.values():
            if (
                a.active
                and a.notified_at is not None
                and a.acked_at is None
                and now >= a.notified_at + repeat
                and not self._suppressed(a, now)
            ):
                # never sent (it was inhibited or suppressed until now): the alert itself
                kind: Kind = "reminder" if a.notified else "alert"
                channels = self._channels(a)
                nid = f"{kind}:{a.alarm_id}:{a.notified_at:.3f}"
                self._decided(a, now, sent=True)
                if channels:
                    out.append(self._note(kind, nid, [a], channels))
        return out

    def _flood(self, plant: str, alerts: list[Alert], now: float) -> list[Notification]:
        for a in alerts:
            self._decided(a, now, sent=False)
        last = self._flood_sent.get(plant)
        if last is not None and now - last < self.config.flood_window:
            return []
        self._flood_sent[plant] = now
        level = "critical" if any(a.level == "critical" for a in alerts) else "warning"
        routes = [r for r in self.config.routes if r.matches(plant, "", level)]
        channels = tuple(dict.fromkeys(c for r in routes for c in r.channels))
        if not channels:
            return []
        count = len(self._raises.get(plant, ()))
        subject = f"[FLOOD] {plant}: {count} alarms in {self.config.flood_window:g} s"
        lines = [_line(a) for a in sorted(alerts, key=lambda a: a.raised_at)[:20]]
        text = subject + "\n" + "\n".join(lines)
        nid = f"flood:{plant}:{min(a.event_id for a in alerts)}"
        return [
            Notification(
                nid, "flood", plant, level, channels, subject, text, tuple(a.doc() for a in alerts)
            )
        ]

    # -- operator actions --------------------------------------------------------------------------

    def ack(self, alarm_id: str, by: str, at: float, note: str = "") -> Alert | None:
        a = self.alerts.get(alarm_id)
        if a is not None:
            a.acked_by, a.acked_at, a.ack_note = by, at, note
            self._record(a, "acknowledged", by, at, note=note)
        return a

    def shelve(self, alarm_id: str, until: float | None, by: str, at: float) -> Alert | None:
        """Shelve until ``until`` (epoch seconds); ``None`` unshelves."""
        a = self.alerts.get(alarm_id)
        if a is not None:
            a.shelved_until, a.shelved_by, a.shelved_at = until, by, at
            what = "unshelved" if until is None else "shelved"
            self._record(a, what, by, at, until=until)
        return a

    def set_out_of_service(self, sensor_id: str, until: float, by: str, at: float) -> None:
        self.out_of_service[sensor_id] = OutOfService(sensor_id, until, by, at)
        entry = {"action": "out_of_service", "alarmId": "", "sensorId": sensor_id}
        self.history.append({**entry, "by": by, "at": at, "until": until, "note": ""})

    def _record(self, a: Alert, action: str, by: str, at: float, **more: Any) -> None:
        self.changed.add(a.alarm_id)
        entry = {"action": action, "alarmId": a.alarm_id, "sensorId": a.sensor_id}
        self.history.append({**entry, "by": by, "at": at, "until": None, "note": "", **more})

    # -- rules -----------------------------------------------------------------------------------

    def _suppressed(self, a: Alert, now: float) -> bool:
        if a.shelved_until is not None and now < a.shelved_until:
            return True
        oos = self.out_of_service.get(a.sensor_id)
        if oos is not None and now < oos.until and a.condition != FAULT:
            return True
        return a.level == "warning" and any(
            b.active
            and b.level == "critical"
            and (b.plant_id, b.sensor_id, b.parameter) == (a.plant_id, a.sensor_id, a.parameter)
            for b in self.alerts.values()
        )

    def _channels(self, a: Alert, resolved: bool = False) -> tuple[str, ...]:
        routes = [
            r
            for r in self.config.routes
            if r.matches(a.plant_id, a.parameter, a.level) and (r.resolved or not resolved)
        ]
        return tuple(dict.fromkeys(c for r in routes for c in r.channels))

    def _decided(self, a: Alert, now: float, *, sent: bool) -> None:
        a.notified_at = now
        a.notified = a.notified or sent
        self.changed.add(a.alarm_id)

    def _note(
        self, kind: Kind, nid: str, alerts: list[Alert], channels: tuple[str, ...]
    ) -> Notification:
        a = alerts[0]
        head = {"alert": "", "reminder": "REMINDER ", "resolved": "RESOLVED ", "flood": ""}[kind]
        subject = (
            f"[{head}{a.level.upper()}] {a.plant_id}/{a.sensor_id} {a.parameter} "
            f"{a.condition} {_fmt(a.value)}"
        )
        text = "\n".join([subject, *(_line(x) for x in alerts), f"alarm id: {a.alarm_id}"])
        docs = tuple(x.doc() for x in alerts)
        return Notification(nid, kind, a.plant_id, a.level, channels, subject, text, docs)
