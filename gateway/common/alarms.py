"""Local alarms after ISA-18.2 / IEC 62682: limits, deadband, delays, re-alarm, shelving.

One state machine per (plant, sensor, parameter, condition), condition being HH/H (critical/warning
high), L/LL (warning/critical low) or probe_fault. Time is the readings' event time, so a replay
of the same readings gives the same events with the same ids. A bad-quality reading raises one
probe_fault diagnostic and freezes the process alarms until a usable reading comes. Shared by the
gateway and the central processor; no I/O.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gateway.common.model import AlarmEvent, Quality, Reading, now_ts


@dataclass
class Limits:
    """Alarm limits of one parameter, in its unit. A limit left out is not alarmed."""

    high_warning: float | None = None
    high_critical: float | None = None
    low_warning: float | None = None
    low_critical: float | None = None
    deadband: float = 0.0
    on_delay: float | None = None  # seconds; None takes the section's
    off_delay: float | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.deadband < 0:
            raise ValueError("deadband must not be negative")
        order = [self.low_critical, self.low_warning, self.high_warning, self.high_critical]
        given = [x for x in order if x is not None]
        if given != sorted(given):
            raise ValueError(
                "limits must be ordered low_critical <= low_warning < high_warning <= high_critical"
            )


def default_thresholds() -> dict[str, Limits]:
    return {
        "BOD": Limits(high_warning=30.0, high_critical=100.0, deadband=1.0),
        "COD": Limits(high_warning=250.0, high_critical=500.0, deadband=5.0),
        "TSS": Limits(high_warning=100.0, high_critical=300.0, deadband=5.0),
        "pH": Limits(
            high_warning=8.5, high_critical=9.0, low_warning=6.5, low_critical=6.0, deadband=0.1
        ),
    }


@dataclass
class AlarmConfig:
    """TOML ``[alarms]``. ``thresholds`` merge over the defaults per parameter; a plant's or a
    sensor's table for a parameter replaces the global one for that parameter."""

    thresholds: dict[str, Limits] = field(default_factory=dict)
    plants: dict[str, dict[str, Limits]] = field(default_factory=dict)
    sensors: dict[str, dict[str, Limits]] = field(default_factory=dict)
    on_delay: float = 0.0
    off_delay: float = 0.0
    realarm_interval: float = 0.0  # 0: never re-raise a standing alarm
    fault_on_delay: float = 0.0
    fault_off_delay: float = 0.0
    chatter_count: int = 3  # this many raises within chatter_window mark an alarm chattering
    chatter_window: float = 60.0
    max_alarms: int = 100_000

    def __post_init__(self) -> None:
        self.thresholds = {**default_thresholds(), **self.thresholds}
        for name in ("on_delay", "off_delay", "realarm_interval", "fault_on_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_alarms < 1 or self.chatter_count < 2:
            raise ValueError("max_alarms must be at least 1 and chatter_count at least 2")

    def limits_for(self, plant_id: str, sensor_id: str, parameter: str) -> Limits | None:
        for table in (self.sensors.get(sensor_id), self.plants.get(plant_id), self.thresholds):
            if table and parameter in table:
                limits = table[parameter]
                return limits if limits.enabled else None
        return None


# --- pure helpers -------------------------------------------------------------------------------


def make_id(*parts: str) -> str:
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).hexdigest()


def is_flood(
    timestamps: Iterable[float], now: float, limit: int = 10, window: float = 600.0
) -> bool:
    """ISA-18.2 flood: more than ``limit`` alarms in the ``window`` seconds up to ``now``."""
    return sum(1 for t in timestamps if now - window < t <= now) > limit


def is_chattering(raise_times: Sequence[float], count: int = 3, window: float = 60.0) -> bool:
    """``count`` or more raises of one alarm within ``window`` seconds."""
    times = sorted(raise_times)
    return any(times[i + count - 1] - times[i] <= window for i in range(len(times) - count + 1))


# --- engine -------------------------------------------------------------------------------------

_Key = tuple[str, str, str]  # plant, sensor, parameter
# condition, limit, is_high, level, deadband, on_delay, off_delay
_Rule = tuple[str, float, bool, str, float, float, float]
FAULT = "probe_fault"


class _Alarm:
    __slots__ = (
        "acked",
        "active",
        "alarm_id",
        "announced",
        "clear_since",
        "condition",
        "last_raised",
        "level",
        "pending_since",
        "raises",
        "shelved_until",
    )

    def __init__(self, alarm_id: str, condition: str, level: str, chatter_count: int) -> None:
        self.alarm_id = alarm_id
        self.condition = condition
        self.level = level
        self.active = False
        self.acked = True  # nothing to acknowledge yet
        self.announced = False  # whether downstream was told it is active
        self.pending_since: float | None = None
        self.clear_since: float | None = None
        self.last_raised = 0.0
        self.shelved_until: float | None = None
        self.raises: deque[float] = deque(maxlen=chatter_count)

    def state(self) -> str:
        if self.shelved_until is not None:
            return "shelved"
        if self.active:
            return "active_acknowledged" if self.acked else "active_unacknowledged"
        return "normal" if self.acked else "returned_unacknowledged"


class AlarmEngine:
    """Evaluates readings into alarm events. Operator actions (acknowledge, shelve, out of
    service) may come from other threads; a lock keeps them consistent with ``evaluate``."""

    def __init__(self, config: AlarmConfig, gateway_id: str = "") -> None:
        self.config = config
        self.gateway_id = gateway_id
        self._lock = threading.Lock()
        self._rules: dict[_Key, list[_Rule]] = {}
        self._alarms: dict[_Key, dict[str, _Alarm]] = {}
        self._index: dict[str, tuple[_Key, str]] = {}  # alarm_id -> where it lives
        self._out_of_service: set[str] = set()

    def alarm_id(self, plant_id: str, sensor_id: str, parameter: str, condition: str) -> str:
        return make_id(self.gateway_id, plant_id, sensor_id, parameter, condition)

    def _rules_for(self, key: _Key) -> list[_Rule]:
        c = self.config
        limits = c.limits_for(*key)
        rules: list[_Rule] = []
        if limits is not None:
            on = c.on_delay if limits.on_delay is None else limits.on_delay
            off = c.off_delay if limits.off_delay is None else limits.off_delay
            for cond, limit, high, level in (
                ("HH", limits.high_critical, True, "critical"),
                ("H", limits.high_warning, True, "warning"),
                ("L", limits.low_warning, False, "warning"),
                ("LL", limits.low_critical, False, "critical"),
            ):
                if limit is not None:
                    rules.append((cond, limit, high, level, limits.deadband, on, off))
        if len(self._rules) >= c.max_alarms:
            self._rules.clear()
        self._rules[key] = rules
        return rules

    def _alarm(self, key: _Key, condition: str, level: str) -> _Alarm:
        alarms = self._alarms.get(key)
        if alarms is None:
            if len(self._alarms) >= self.config.max_alarms:
                self._alarms.pop(next(iter(self._alarms)))
            alarms = self._alarms[key] = {}
        a = alarms.get(condition)
        if a is None:
            a = alarms[condition] = _Alarm(
                self.alarm_id(*key, condition), condition, level, self.config.chatter_count
            )
            if len(self._index) >= self.config.max_alarms:
                self._index.pop(next(iter(self._index)))
            self._index[a.alarm_id] = (key, condition)
        return a

    def _forget_if_normal(self, key: _Key, a: _Alarm) -> None:
        if a.active or not a.acked or a.pending_since is not None or a.shelved_until is not None:
            return
        alarms = self._alarms.get(key)
        if alarms is not None:
            alarms.pop(a.condition, None)
            if not alarms:
                del self._alarms[key]

    def evaluate(self, reading: Reading) -> list[AlarmEvent]:
        if reading.sensor_id in self._out_of_service:
            return []
        key = (reading.plant_id, reading.sensor_id, reading.parameter)
        v = reading.value
        with self._lock:
            alarms = self._alarms.get(key)
            events: list[AlarmEvent] = []
            if reading.quality is Quality.BAD or v is None or not math.isfinite(v):
                fault = self._alarm(key, FAULT, "warning")
                c = self.config
                self._step(
                    fault, reading, None, True, False, c.fault_on_delay, c.fault_off_delay, events
                )
                for frozen in self._alarms.get(key, {}).values():
                    if frozen is not fault:  # process alarms lost continuity
                        frozen.pending_since = frozen.clear_since = None
                return events
            if alarms:
                fault_alarm = alarms.get(FAULT)
                if fault_alarm is not None:
                    c = self.config
                    self._step(
                        fault_alarm, reading, None, False, True, 0.0, c.fault_off_delay, events
                    )
                    self._forget_if_normal(key, fault_alarm)
            rules = self._rules.get(key)
            if rules is None:
                rules = self._rules_for(key)
            for cond, limit, high, level, deadband, on, off in rules:
                in_alarm = v > limit if high else v < limit
                a = alarms.get(cond) if alarms else None
                if a is None:
                    if not in_alarm:
                        continue
                    a = self._alarm(key, cond, level)
                    alarms = self._alarms[key]
                clear_ok = v <= limit - deadband if high else v >= limit + deadband
                self._step(a, reading, limit, in_alarm, clear_ok, on, off, events)
                self._forget_if_normal(key, a)
            return events

    def _step(
        self,
        a: _Alarm,
        r: Reading,
        limit: float | None,
        in_alarm: bool,
        clear_ok: bool,
        on_delay: float,
        off_delay: float,
        events: list[AlarmEvent],
    ) -> None:
        ts = r.timestamp
        if a.shelved_until is not None and ts >= a.shelved_until:
            a.shelved_until = None
            if a.active:
                a.last_raised = ts
                self._emit(a, r, limit, "raised", events)
        if not a.active:
            if not in_alarm:
                a.pending_since = None
                return
            if a.pending_since is None or ts < a.pending_since:
                a.pending_since = ts
            if ts - a.pending_since >= on_delay:
                a.active, a.acked, a.pending_since, a.clear_since = True, False, None, None
                a.last_raised = ts
                a.raises.append(ts)
                self._emit(a, r, limit, "raised", events)
        elif clear_ok:
            if a.clear_since is None or ts < a.clear_since:
                a.clear_since = ts
            if ts - a.clear_since >= off_delay:
                a.active, a.clear_since = False, None
                if a.announced:
                    self._emit(a, r, limit, "cleared", events)
        else:
            a.clear_since = None
            interval = self.config.realarm_interval
            if in_alarm and interval > 0 and ts - a.last_raised >= interval:
                a.last_raised, a.acked = ts, False
                self._emit(a, r, limit, "re-raised", events)

    def _emit(
        self, a: _Alarm, r: Reading, limit: float | None, state: str, events: list[AlarmEvent]
    ) -> None:
        if a.shelved_until is not None:
            return
        a.announced = state != "cleared"
        events.append(
            self._event(a, r.plant_id, r.sensor_id, r.parameter, state, r.timestamp, r, limit)
        )

    def _event(
        self,
        a: _Alarm,
        plant_id: str,
        sensor_id: str,
        parameter: str,
        state: str,
        ts: float,
        r: Reading | None = None,
        limit: float | None = None,
    ) -> AlarmEvent:
        value = r.value if r is not None else None
        return AlarmEvent(
            alarm_id=a.alarm_id,
            event_id=make_id(a.alarm_id, state, repr(ts)),
            sensor_id=sensor_id,
            plant_id=plant_id,
            parameter=parameter,
            condition=a.condition,
            level=a.level,
            state=state,
            value=value,
            threshold=limit,
            timestamp=ts,
            message=self._message(a, parameter, state, r, limit),
            location=r.location if r is not None else "",
            gateway_id=self.gateway_id,
        )

    def _message(
        self, a: _Alarm, parameter: str, state: str, r: Reading | None, limit: float | None
    ) -> str:
        if a.condition == FAULT:
            why = ", ".join(r.quality_reasons) if r is not None and r.quality_reasons else "bad"
            text = (
                f"{parameter} probe fault ({why})"
                if state != "cleared"
                else f"{parameter} probe ok"
            )
        elif r is not None and r.value is not None and limit is not None:
            side = "above" if a.condition.startswith("H") else "below"
            if state == "cleared":
                text = f"{parameter} back to {r.value:g} {r.unit} ({a.condition} limit {limit:g})"
            else:
                text = f"{parameter} {r.value:g} {r.unit} {side} {a.level} limit {limit:g}"
                text += f" ({a.condition})"
        else:
            text = f"{parameter} {a.condition} {state}"
        if state in ("raised", "re-raised") and self._chattering(a):
            text += " (chattering)"
        return text

    # --- operator actions ---------------------------------------------------------------------

    def _find(self, alarm_id: str) -> tuple[_Key, _Alarm]:
        if alarm_id not in self._index:
            raise KeyError(f"unknown alarm {alarm_id}")
        key, condition = self._index[alarm_id]
        level = "warning" if condition in ("H", "L", FAULT) else "critical"
        return key, self._alarm(key, condition, level)

    def acknowledge(self, alarm_id: str, at: float | None = None) -> AlarmEvent | None:
        """Acknowledge; returns an ``acknowledged`` event, or None if nothing was waiting."""
        with self._lock:
            key, a = self._find(alarm_id)
            if a.acked:
                self._forget_if_normal(key, a)
                return None
            a.acked = True
            self._forget_if_normal(key, a)
            return self._event(a, *key, "acknowledged", now_ts() if at is None else at)

    def shelve(self, alarm_id: str, until: float, at: float | None = None) -> AlarmEvent | None:
        """Suppress the alarm's events until event time ``until``; if it is still active then, it
        is raised again. Returns a ``shelved`` event when downstream had it as active."""
        with self._lock:
            key, a = self._find(alarm_id)
            a.shelved_until = until
            if not a.announced:
                return None
            a.announced = False
            return self._event(a, *key, "shelved", now_ts() if at is None else at)

    def unshelve(self, alarm_id: str, at: float | None = None) -> AlarmEvent | None:
        with self._lock:
            key, a = self._find(alarm_id)
            a.shelved_until = None
            if not a.active:
                self._forget_if_normal(key, a)
                return None
            a.announced = True
            return self._event(a, *key, "raised", now_ts() if at is None else at)

    def out_of_service(self, sensor_id: str, at: float | None = None) -> list[AlarmEvent]:
        """Take a sensor's alarms out of service (e.g. during calibration): its state is dropped,
        its readings raise nothing, and alarms downstream had as active get an event."""
        ts = now_ts() if at is None else at
        with self._lock:
            self._out_of_service.add(sensor_id)
            events = []
            for key in [k for k in self._alarms if k[1] == sensor_id]:
                for a in self._alarms.pop(key).values():
                    if a.announced:
                        events.append(self._event(a, *key, "out_of_service", ts))
            return events

    def return_to_service(self, sensor_id: str) -> None:
        with self._lock:
            self._out_of_service.discard(sensor_id)

    def state(self, alarm_id: str) -> str:
        """ISA-18.2 state: normal, active_unacknowledged, active_acknowledged,
        returned_unacknowledged, shelved or out_of_service."""
        with self._lock:
            where = self._index.get(alarm_id)
            if where is None:
                return "normal"
            key, condition = where
            if key[1] in self._out_of_service:
                return "out_of_service"
            a = self._alarms.get(key, {}).get(condition)
            return "normal" if a is None else a.state()

    def _chattering(self, a: _Alarm) -> bool:
        c = self.config
        return is_chattering(list(a.raises), c.chatter_count, c.chatter_window)

    def is_chattering(self, alarm_id: str) -> bool:
        with self._lock:
            where = self._index.get(alarm_id)
            a = self._alarms.get(where[0], {}).get(where[1]) if where else None
            return a is not None and self._chattering(a)
