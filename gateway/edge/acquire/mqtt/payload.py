"""MQTT payloads to readings, pure: what a subscription expects, and the parsers for its JSON,
plain-number and ISA-95 formats. Nothing here touches the network; the paho client is in
``source.py``. Every parser returns readings or a labelled Rejection and never raises.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from gateway.common.config import KeyProblem, check_reading_field
from gateway.common.model import (
    EARLIEST_TS,
    LATEST_TS,
    Quality,
    Reading,
    Rejection,
    check_reading,
    now_ts,
    parse_ts,
    reading_from_dict,
)

# Pattern placeholder -> Reading field it fills.
PLACEHOLDERS = {
    "plantId": "plant_id",
    "sensorId": "sensor_id",
    "parameter": "parameter",
    "location": "location",
}
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_MS_EPOCH = 1e11  # a numeric ts above this is in milliseconds (1e11 s is the year 5138)
QOS2_REFUSED = (
    "0 or 1; qos = 2 is not supported: paho answers PUBREC before the reading is committed, so "
    "a crash between the two would lose the message. Use qos = 1: a message is acknowledged "
    "only once committed and a redelivery is recognised, so each is stored once (README, "
    "Delivery)"
)


@dataclass
class Subscription:
    """One ``[[mqtt.subscriptions]]`` entry."""

    topic: str  # MQTT topic filter, may use + and #
    qos: int = 1
    format: Literal["json", "number", "isa95"] = "json"
    # e.g. "plant/{plantId}/{sensorId}/{parameter}": one placeholder or literal per topic level.
    pattern: str = ""
    # Defaults for what neither the topic nor the payload says.
    plant_id: str = "default"
    sensor_id: str = ""
    parameter: str = ""
    unit: str = ""
    location: str = ""
    levels: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.qos == 2:
            raise KeyProblem("qos", QOS2_REFUSED)
        if self.qos not in (0, 1):
            raise KeyProblem("qos", f"0 or 1, got {self.qos}")
        _check_filter(self.topic)
        for key, name in (
            ("plant_id", "plantId"),
            ("sensor_id", "sensorId"),
            ("parameter", "parameter"),
            ("unit", "unit"),
            ("location", "location"),
        ):
            check_reading_field(key, name, getattr(self, key))
        self.levels = _parse_pattern(self.pattern) if self.pattern else ()
        named = {name for name, _ in self.levels if name}
        if self.format != "json":
            if "sensorId" not in named and not self.sensor_id:
                raise ValueError(
                    f"format {self.format!r} needs {{sensorId}} in pattern or sensor_id"
                )
            if "parameter" not in named and not self.parameter:
                raise ValueError(
                    f"format {self.format!r} needs {{parameter}} in pattern or parameter"
                )


def _check_filter(topic: str) -> None:
    levels = topic.split("/")
    if not topic or any(
        ("#" in lv and (lv != "#" or i != len(levels) - 1)) or ("+" in lv and lv != "+")
        for i, lv in enumerate(levels)
    ):
        raise ValueError(f"topic {topic!r} is not a valid MQTT topic filter")


def _parse_pattern(pattern: str) -> tuple[tuple[str, str], ...]:
    """Pattern levels as (placeholder name, "") or ("", literal)."""
    out: list[tuple[str, str]] = []
    for level in pattern.split("/"):
        if level.startswith("{") and level.endswith("}"):
            name = level[1:-1]
            if name not in PLACEHOLDERS:
                known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                raise ValueError(
                    f"pattern {pattern!r}: unknown placeholder {level}; known: {known}"
                )
            if any(name == n for n, _ in out):
                raise ValueError(f"pattern {pattern!r}: {level} appears twice")
            out.append((name, ""))
        elif any(c in level for c in "{}+#"):
            raise ValueError(f"pattern {pattern!r}: a placeholder must be a whole level")
        else:
            out.append(("", level))
    return tuple(out)


def parse_message(
    topic: str,
    payload: bytes,
    subscription: Subscription,
    *,
    max_payload_bytes: int = 65536,
    received_at: float | None = None,
) -> list[Reading] | Rejection:
    """Turn one MQTT message into readings, or say why not (a labelled Rejection)."""
    try:
        return _parse(topic, payload, subscription, max_payload_bytes, received_at)
    except Exception as e:  # the contract is "never raises": a bug here must not stop the source
        return Rejection("parser_error", f"{type(e).__name__}: {e}"[:200])


def _parse(
    topic: str, payload: bytes, sub: Subscription, max_bytes: int, received_at: float | None
) -> list[Reading] | Rejection:
    if len(payload) > max_bytes:
        return Rejection("too_large", f"{len(payload)} bytes, limit {max_bytes}")
    fields = _topic_fields(topic, sub)
    if isinstance(fields, Rejection):
        return fields
    ts = now_ts() if received_at is None else received_at
    if sub.format == "json":
        return _parse_json(payload, sub, fields)
    if sub.format == "number":
        value = _parse_number(payload)
        if isinstance(value, Rejection):
            return value
        result = [_finish(_reading(sub, fields, value, sub.unit, ts, Quality.GOOD))]
    else:
        isa95 = _parse_isa95(payload, sub, fields, ts)
        if isinstance(isa95, Rejection):
            return isa95
        result = isa95
    # Topic levels and the ISA-95 unit become fields here, not in reading_from_dict.
    problem = check_reading(result[0])
    return result if problem is None else problem


def _topic_fields(topic: str, sub: Subscription) -> dict[str, str] | Rejection:
    if not sub.levels:
        return {}
    levels = topic.split("/")
    mismatch = Rejection("topic_mismatch", f"{topic[:200]!r} does not match {sub.pattern!r}")
    if len(levels) != len(sub.levels):
        return mismatch
    out: dict[str, str] = {}
    for (name, literal), level in zip(sub.levels, levels, strict=True):
        if name:
            if not level:
                return mismatch
            out[PLACEHOLDERS[name]] = level
        elif level != literal:
            return mismatch
    return out


def _reading(
    sub: Subscription,
    fields: dict[str, str],
    value: float | None,
    unit: str,
    ts: float,
    quality: Quality,
) -> Reading:
    return Reading(
        sensor_id=fields.get("sensor_id", sub.sensor_id),
        parameter=fields.get("parameter", sub.parameter),
        value=value,
        unit=unit,
        timestamp=ts,
        plant_id=fields.get("plant_id", sub.plant_id),
        location=fields.get("location", sub.location),
        quality=quality,
    )


def _finish(r: Reading) -> Reading:
    """Flag what the publisher sent as unusable: the reading is kept, bad, with a reason."""
    if r.value is None:
        r.flag(Quality.BAD, "no_value")
    elif not math.isfinite(r.value):
        r.flag(Quality.BAD, "nan" if math.isnan(r.value) else "inf")
        r.value = None
    return r


def _parse_number(payload: bytes) -> float | Rejection:
    try:
        text = payload.decode("ascii").strip()
    except UnicodeDecodeError:
        return Rejection("not_a_number", "payload is not ASCII")
    if _NUMBER.fullmatch(text):
        return float(text)  # may overflow to inf, which _finish flags
    if text.lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return float(text)
    return Rejection("not_a_number", repr(text[:50]))


def _load_json(payload: bytes) -> Any:
    """orjson for speed (a third of json.loads's time on a reading); what orjson refuses goes
    to json.loads, which decides as before (it also takes NaN, lone surrogates, huge ints)."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return Rejection("not_json", str(e)[:200])


def _parse_json(
    payload: bytes, sub: Subscription, fields: dict[str, str]
) -> list[Reading] | Rejection:
    data = _load_json(payload)
    if isinstance(data, Rejection):
        return data
    items = data if isinstance(data, list) else [data]
    if not items:
        return Rejection("empty", "an empty array")
    defaults: dict[str, Any] = {
        k: v
        for k, v in {
            "sensorId": fields.get("sensor_id", sub.sensor_id),
            "parameter": fields.get("parameter", sub.parameter),
            "unit": sub.unit,
            "location": fields.get("location", sub.location),
        }.items()
        if v
    }
    plant_id = fields.get("plant_id", sub.plant_id)
    readings: list[Reading] = []
    for i, item in enumerate(items):
        merged = {**defaults, **item} if isinstance(item, dict) else item
        r = reading_from_dict(merged, plant_id=plant_id)
        if isinstance(r, Rejection):
            detail = f"item {i}: {r.detail}" if len(items) > 1 else r.detail
            return Rejection(r.reason, detail, r.field)
        readings.append(_finish(r))
    return readings


def _parse_isa95(
    payload: bytes, sub: Subscription, fields: dict[str, str], received_at: float
) -> list[Reading] | Rejection:
    d = _load_json(payload)
    if isinstance(d, Rejection):
        return d
    if not isinstance(d, dict):
        return Rejection("not_an_object", f"expected a JSON object, got {type(d).__name__}")
    if "value" not in d:
        return Rejection("missing_field", "value")
    value = d["value"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        return Rejection(
            "wrong_type", f"value must be a number or null, got {type(value).__name__}"
        )
    ts = _isa95_ts(d.get("ts"), received_at)
    if isinstance(ts, Rejection):
        return ts
    unit = d.get("unit", sub.unit)
    if not isinstance(unit, str):
        return Rejection("wrong_type", "unit must be a string", "unit")
    try:
        quality = Quality(d.get("quality", "good"))
    except (ValueError, TypeError):
        return Rejection("wrong_type", "quality must be good, uncertain or bad")
    seq = d.get("seq")  # the publisher's own counter; checked, not kept
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
        return Rejection("wrong_type", "seq must be an integer")
    fval = None if value is None else float(value)
    return [_finish(_reading(sub, fields, fval, unit, ts, quality))]


def _isa95_ts(ts: Any, received_at: float) -> float | Rejection:
    """RFC 3339 text or epoch seconds (or milliseconds, when too large for seconds)."""
    if ts is None:
        return received_at
    if isinstance(ts, str):
        try:
            t = parse_ts(ts)
        except (ValueError, OverflowError, OSError) as e:
            return Rejection("bad_timestamp", str(e)[:200])
    elif isinstance(ts, int | float) and not isinstance(ts, bool):
        t = float(ts) / 1000 if ts > _MS_EPOCH else float(ts)
    else:
        return Rejection(
            "bad_timestamp", f"ts must be RFC 3339 text or epoch, got {type(ts).__name__}"
        )
    if not EARLIEST_TS <= t <= LATEST_TS:
        return Rejection("bad_timestamp", "ts is outside 1970-2100")
    return t
