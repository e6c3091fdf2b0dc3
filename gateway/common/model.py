"""The records that flow through both services: readings and alarm events.

The JSON shape on the wire is the Reading contract every consumer of the Kafka topics relies on
(camelCase keys, RFC 3339 UTC timestamps); these dataclasses are the in-process form. Keep the two
in step here and nowhere else.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from operator import attrgetter
from typing import Any

import orjson

EARLIEST_TS, LATEST_TS = 0.0, 4102444800.0  # 1970-01-01 .. 2100-01-01: what the wire format carries
PARAMETERS = ("pH", "BOD", "COD", "TSS", "TDS", "temperature", "flow_rate")


class Quality(StrEnum):
    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"

    def worst(self, other: Quality) -> Quality:
        order = (Quality.GOOD, Quality.UNCERTAIN, Quality.BAD)
        return self if order.index(self) >= order.index(other) else other


def now_ts() -> float:
    """Now, to the microsecond: the same number as ``datetime.now(UTC).timestamp()``."""
    return time.time_ns() // 1000 / 1_000_000


_second = [-1, ""]  # the last whole second format_ts wrote, and its text up to the fraction


def format_ts(ts: float) -> str:
    """RFC 3339 UTC to the microsecond: three fractional digits when they carry the whole time
    (2026-11-28T06:34:14.123Z), six when the source's time has microseconds (…14.123456Z).

    Two readings of one sensor within one millisecond stay two readings downstream.
    """
    # Rounded to the microsecond as datetime.fromtimestamp does (half to even, carried into the
    # second); the text of the second is cached, readings come many to a second.
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    if us >= 1_000_000:
        whole, us = whole + 1, us - 1_000_000
    elif us < 0:
        whole, us = whole - 1, us + 1_000_000
    second = int(whole)
    cached = _second
    if cached[0] != second:
        text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        cached = _second[:] = [second, text]
    fraction = f"{us // 1000:03d}" if us % 1000 == 0 else f"{us:06d}"
    return f"{cached[1]}.{fraction}Z"


def parse_ts(text: str) -> float:
    """Parse an RFC 3339 timestamp; a missing offset is an error, not an assumption. Digits
    beyond the microsecond are cut off."""
    if not isinstance(text, str):
        raise ValueError(f"timestamp must be an RFC 3339 string, got {type(text).__name__}")
    dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no UTC offset")
    return dt.timestamp()


@dataclass(slots=True)
class Reading:
    """One measured value of one parameter from one sensor.

    ``value`` is None when the probe gave nothing usable (timeout, CRC error, NaN); such a reading
    is kept with quality bad and its reasons, so operators see a failing probe.
    """

    sensor_id: str
    parameter: str
    value: float | None
    unit: str
    timestamp: float
    plant_id: str = "default"
    location: str = ""
    quality: Quality = Quality.GOOD
    quality_reasons: list[str] = field(default_factory=list)
    gateway_id: str = ""
    seq: int | None = None
    raw_value: float | None = None
    calibration_id: str | None = None

    def flag(self, quality: Quality, reason: str) -> None:
        """Lower the quality (never raise it) and record why."""
        self.quality = self.quality.worst(quality)
        if reason not in self.quality_reasons:
            self.quality_reasons.append(reason)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "sensorId": self.sensor_id,
            "plantId": self.plant_id,
            "parameter": self.parameter,
            "value": self.value if self.value is None or math.isfinite(self.value) else None,
            "unit": self.unit,
            "quality": self.quality.value,
            "timestamp": format_ts(self.timestamp),
            "location": self.location,
            "gatewayId": self.gateway_id,
            "seq": self.seq,
            "qualityReasons": list(self.quality_reasons),
        }
        if self.raw_value is not None and math.isfinite(self.raw_value):
            d["rawValue"] = self.raw_value
        if self.calibration_id is not None:
            d["calibrationId"] = self.calibration_id
        return d

    def to_json(self) -> bytes:
        """``to_dict``'s JSON, built without its checks and copies (the buffer writer encodes
        every reading): orjson writes a non-finite value as null, and the quality as its value."""
        raw, calibration = self.raw_value, self.calibration_id
        d = {
            "sensorId": self.sensor_id,
            "plantId": self.plant_id,
            "parameter": self.parameter,
            "value": self.value,
            "unit": self.unit,
            "quality": self.quality,
            "timestamp": format_ts(self.timestamp),
            "location": self.location,
            "gatewayId": self.gateway_id,
            "seq": self.seq,
            "qualityReasons": self.quality_reasons,
        }
        if raw is not None and math.isfinite(raw):
            d["rawValue"] = raw
        if calibration is not None:
            d["calibrationId"] = calibration
        try:
            return orjson.dumps(d)
        except TypeError:  # what orjson refuses (an integer beyond 64 bits): to_dict's way
            return _dumps(self.to_dict())

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its constructor's arguments (MQTT workers send readings over a pipe): the
        # dataclass's own pickling of slots calls fields() for every object it loads.
        return Reading, _reading_args(self)


def _dumps(d: dict[str, Any]) -> bytes:
    """Compact JSON; orjson (a fifth of the stdlib's time on a reading), the stdlib for what
    orjson refuses (an integer beyond 64 bits)."""
    try:
        return orjson.dumps(d)
    except TypeError:
        return json.dumps(d, separators=(",", ":")).encode()


@dataclass(slots=True)
class AlarmEvent:
    """A change of an alarm's state (raised, cleared, re-raised, probe fault).

    ``alarm_id`` names the alarm (plant, sensor, parameter, condition) and stays the same for its
    whole life; ``event_id`` is stable per event so replays de-duplicate downstream.
    """

    alarm_id: str
    event_id: str
    sensor_id: str
    plant_id: str
    parameter: str
    condition: str  # HH, H, L, LL or probe_fault
    level: str  # warning or critical
    state: str  # raised, cleared, re-raised
    value: float | None
    threshold: float | None
    timestamp: float
    message: str
    location: str = ""
    gateway_id: str = ""
    seq: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "alarmId": self.alarm_id,
            "eventId": self.event_id,
            "sensorId": self.sensor_id,
            "plantId": self.plant_id,
            "parameter": self.parameter,
            "condition": self.condition,
            "level": self.level,
            "state": self.state,
            "value": self.value,
            "threshold": self.threshold,
            "timestamp": format_ts(self.timestamp),
            "message": self.message,
            "location": self.location,
            "gatewayId": self.gateway_id,
            "seq": self.seq,
        }

    def to_json(self) -> bytes:
        return _dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlarmEvent:
        """The event ``to_dict`` gave (as read back from the alerts topic); KeyError, ValueError
        or TypeError if it is not one."""
        value, threshold, seq = d.get("value"), d.get("threshold"), d.get("seq")
        return cls(
            alarm_id=str(d["alarmId"]),
            event_id=str(d["eventId"]),
            sensor_id=str(d["sensorId"]),
            plant_id=str(d["plantId"]),
            parameter=str(d["parameter"]),
            condition=str(d["condition"]),
            level=str(d["level"]),
            state=str(d["state"]),
            value=None if value is None else float(value),
            threshold=None if threshold is None else float(threshold),
            timestamp=parse_ts(d["timestamp"]),
            message=str(d.get("message", "")),
            location=str(d.get("location", "")),
            gateway_id=str(d.get("gatewayId", "")),
            seq=None if seq is None else int(seq),
        )


@dataclass(slots=True)
class Prediction:
    """A reusability prediction for one plant, made from its current window's readings.

    ``model`` names what made it: ``ml-api`` (the configured ML API) or ``builtin`` (the built-in
    estimator). ``timestamp`` is the newest input reading's time, so a prediction lines up with the
    readings it came from; ``inputs`` are the ML contract's seven values as sent, ``defaulted`` the
    ones that had no reading and took the design's default.
    """

    plant_id: str
    timestamp: float
    window_start: int
    model: str
    prediction: str
    confidence: float
    inputs: dict[str, float]
    defaulted: list[str] = field(default_factory=list)
    effluent: dict[str, float] | None = None  # the estimated effluent, when the model says

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": "prediction",
            "plantId": self.plant_id,
            "timestamp": format_ts(self.timestamp),
            "windowStart": self.window_start,
            "model": self.model,
            "prediction": self.prediction,
            "confidence": self.confidence,
            "inputs": dict(self.inputs),
            "defaulted": list(self.defaulted),
        }
        if self.effluent is not None:
            d["effluent"] = dict(self.effluent)
        return d


@dataclass(frozen=True, slots=True)
class Receipt:
    """The identity of a delivery, handed to the sink with the records it became and committed
    with them (it is never forwarded), so that the same delivery coming again is recognised.

    ``source`` and ``key`` name the delivery as its sender names it again (an MQTT session and
    packet id, a device's id and seq); ``fingerprint`` tells whether a delivery under the same key
    is the same one; ``keep_s`` is how long the sender may deliver it again.
    """

    source: str
    key: str
    fingerprint: bytes
    keep_s: float

    def __reduce__(self) -> tuple[Any, ...]:
        return Receipt, (self.source, self.key, self.fingerprint, self.keep_s)  # as Reading's


_reading_args = attrgetter(*(f.name for f in fields(Reading)))


Record = Reading | AlarmEvent | Receipt


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a payload could not become a reading; kept with the payload in a dead-letter store.

    ``field`` names the Reading field at fault (its wire name, e.g. ``location``) when one is.
    """

    reason: str
    detail: str = ""
    field: str = ""

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


# --- the fields of a reading, as they may enter -------------------------------------------------
#
# Every source passes these checks (HTTP and MQTT payloads through reading_from_dict, MQTT topic
# levels through check_reading, Modbus and subscription settings when the config is loaded), so a
# reading that got in can always be forwarded to Kafka and stored in InfluxDB: no field is longer
# than a limit, and none holds a character a tag or a topic name cannot carry (a newline in a tag
# is written as a bare space, and InfluxDB then refuses the point).


@dataclass(frozen=True, slots=True)
class FieldRule:
    limit: int  # characters
    allowed: str  # the characters allowed, said for the person who sent them
    ok: Callable[[str], bool]  # the whole value is made of allowed characters
    char_ok: Callable[[str], bool]  # one character is allowed (to name the first that is not)


_TOPIC_CHAR = re.compile(r"[A-Za-z0-9._-]")
_TOPIC_TEXT = re.compile(r"[A-Za-z0-9._-]*")


def _id_ok(v: str) -> bool:
    return v.isprintable() and " " not in v and "\\" not in v


def _tag_ok(v: str) -> bool:
    return v.isprintable() and "\\" not in v


_ID = FieldRule(
    128,
    "printable characters other than whitespace and backslash",
    _id_ok,
    _id_ok,
)
FIELDS: dict[str, FieldRule] = {
    "sensorId": _ID,
    "parameter": _ID,
    "gatewayId": _ID,
    # It names the Kafka topic sensors.raw.<plantId>: only what a topic name may hold.
    "plantId": FieldRule(
        128,
        "letters A-Z and a-z, digits, '.', '_' and '-'",
        lambda v: _TOPIC_TEXT.fullmatch(v) is not None,
        lambda c: _TOPIC_CHAR.fullmatch(c) is not None,
    ),
    "location": FieldRule(
        256, "printable characters (spaces too) other than backslash", _tag_ok, _tag_ok
    ),
    "unit": FieldRule(32, "printable characters (spaces too)", str.isprintable, str.isprintable),
}


def check_field(name: str, value: str) -> Rejection | None:
    """Why ``value`` cannot be the Reading field ``name`` (its wire name), or None if it can.

    Emptiness is not checked here: a missing sensor id is the caller's ``missing_field``.
    """
    rule = FIELDS[name]
    if len(value) > rule.limit:
        return Rejection(
            "field_too_long", f"{name}: {len(value)} characters, at most {rule.limit}", name
        )
    if rule.ok(value):
        return None
    i, c = next((i, c) for i, c in enumerate(value) if not rule.char_ok(c))
    return Rejection(
        "bad_characters",
        f"{name}: character {c!r} (U+{ord(c):04X}) at {i} is not allowed; allowed: {rule.allowed}",
        name,
    )


_GOOD_IDENTITIES: set[tuple[str, ...]] = set()  # passed check_identity: a plant's are few
_GOOD_IDENTITIES_MAX = 10_000


def check_identity(
    sensor_id: str, parameter: str, plant_id: str, unit: str, location: str, gateway_id: str
) -> Rejection | None:
    """The first field of a reading that fails ``check_field``, in wire order; None if none."""
    key = (sensor_id, parameter, plant_id, unit, location, gateway_id)
    if key in _GOOD_IDENTITIES:  # the same sensor again: the checks would say the same
        return None
    for name, value in (
        ("sensorId", sensor_id),
        ("plantId", plant_id),
        ("parameter", parameter),
        ("unit", unit),
        ("location", location),
        ("gatewayId", gateway_id),
    ):
        problem = check_field(name, value)
        if problem is not None:
            return problem
    if len(_GOOD_IDENTITIES) >= _GOOD_IDENTITIES_MAX:
        _GOOD_IDENTITIES.clear()
    _GOOD_IDENTITIES.add(key)
    return None


def check_reading(r: Reading) -> Rejection | None:
    """``check_identity`` for a reading a source built itself (e.g. from MQTT topic levels)."""
    return check_identity(r.sensor_id, r.parameter, r.plant_id, r.unit, r.location, r.gateway_id)


def _text(d: dict[str, Any], key: str, default: str | None = None) -> str:
    v = d.get(key, default)
    if v is None:
        raise _Bad("missing_field", key, key)
    if not isinstance(v, str) or not v:
        raise _Bad("wrong_type", f"{key} must be a non-empty string", key)
    return v


class _Bad(Exception):
    def __init__(self, reason: str, detail: str, field: str = "") -> None:
        self.rejection = Rejection(reason, detail, field)


def reading_from_dict(d: Any, *, plant_id: str = "default") -> Reading | Rejection:
    """Turn a decoded Reading JSON object into a Reading, or say why not. Never raises.

    A non-numeric ``value`` is a rejection here; callers that must keep such readings (the
    processor stores them as bad quality) handle the ``wrong_type`` rejection themselves.
    """
    if not isinstance(d, dict):
        return Rejection("not_an_object", f"expected a JSON object, got {type(d).__name__}")
    try:
        value = d.get("value", ...)
        if value is ...:
            raise _Bad("missing_field", "value")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _Bad("wrong_type", f"value must be a number or null, got {type(value).__name__}")
        ts_text = d.get("timestamp")
        try:
            ts = now_ts() if ts_text is None else parse_ts(ts_text)
        except (ValueError, OverflowError, OSError) as e:
            raise _Bad("bad_timestamp", str(e)[:200]) from None
        if not EARLIEST_TS <= ts <= LATEST_TS:
            raise _Bad("bad_timestamp", f"{ts_text!r} is outside 1970-2100")
        unit = d.get("unit", "")
        if not isinstance(unit, str):
            raise _Bad("wrong_type", "unit must be a string", "unit")
        quality_text = d.get("quality", "good")
        try:
            quality = Quality(quality_text)
        except ValueError:
            raise _Bad(
                "wrong_type", f"quality must be good, uncertain or bad, got {quality_text!r}"
            ) from None
        reasons = d.get("qualityReasons", [])
        if not isinstance(reasons, list) or (
            reasons and not all(isinstance(r, str) for r in reasons)
        ):
            raise _Bad("wrong_type", "qualityReasons must be a list of strings")
        seq = d.get("seq")
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
            raise _Bad("wrong_type", "seq must be an integer")
        fval = None if value is None else float(value)
        sensor_id, parameter = _text(d, "sensorId"), _text(d, "parameter")
        plant = _text(d, "plantId", plant_id)
        location = d["location"] if isinstance(d.get("location"), str) else ""
        gateway_id = d["gatewayId"] if isinstance(d.get("gatewayId"), str) else ""
        problem = check_identity(sensor_id, parameter, plant, unit, location, gateway_id)
        if problem is not None:
            return problem
        return Reading(
            sensor_id=sensor_id,
            parameter=parameter,
            value=fval,
            unit=unit,
            timestamp=ts,
            plant_id=plant,
            location=location,
            quality=quality,
            quality_reasons=list(reasons),
            gateway_id=gateway_id,
            seq=seq,
        )
    except _Bad as e:
        return e.rejection
    except (ValueError, OverflowError, TypeError) as e:
        return Rejection("invalid", str(e)[:200])


def reading_from_json(payload: bytes, *, plant_id: str = "default") -> Reading | Rejection:
    try:
        d = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return Rejection("not_json", str(e)[:200])
    return reading_from_dict(d, plant_id=plant_id)
