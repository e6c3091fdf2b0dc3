"""Raw Kafka messages to Readings and Readings back to JSON, on the processor's hot path.

Both directions mean the same as ``common/model.py`` (``reading_from_dict``, ``Reading.to_dict``);
they are only faster for the shape our gateway sends: orjson, and RFC 3339 timestamps in the
canonical forms ``format_ts`` writes (``YYYY-MM-DDTHH:MM:SS.fffZ``, or ``.ffffffZ`` when the time
has microseconds) parsed from a per-minute cache and passed through to the validated copy instead
of being formatted again. Anything else (other timestamp forms, wrong
types, NaN literals, UTF-16, huge integers) takes the model's own path, so every result, rejection
reasons included, is the one the model gives. tests/unit/test_codec.py holds the two in step.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime

import orjson

from gateway.common.model import (
    EARLIEST_TS,
    LATEST_TS,
    Quality,
    Reading,
    Rejection,
    check_identity,
    format_ts,
    reading_from_dict,
)

_MINUTE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:", re.ASCII)
_MINUTES: dict[str, int] = {}  # "YYYY-MM-DDTHH:MM:" -> epoch seconds
_MAX_MINUTES = 10_000
_QUALITY = {q.value: q for q in Quality}


def canonical_ts(text: str) -> float | None:
    """Epoch seconds of a canonical timestamp, exactly as ``parse_ts`` gives them; None if the
    text is in any other form."""
    n = len(text)
    if (n != 24 and n != 27) or text[-1] != "Z" or text[19] != ".":
        return None
    if n == 27 and text[23:26] == "000":
        return None  # format_ts writes this time with three digits
    minute = text[:17]
    base = _MINUTES.get(minute)
    if base is None:
        if _MINUTE.fullmatch(minute) is None:
            return None
        try:
            base = round(datetime.fromisoformat(minute + "00+00:00").timestamp())
        except ValueError:
            return None
        if len(_MINUTES) >= _MAX_MINUTES:
            _MINUTES.clear()
        _MINUTES[minute] = base
    digits = text[17:19] + text[20:-1]  # seconds and fraction: 5 or 8 digits
    if not (digits.isascii() and digits.isdigit()) or digits[:2] >= "60":
        return None
    # An int over an int is correctly rounded, like datetime.timestamp()'s microseconds / 10**6
    # (milliseconds over 10**3 are the same rational number, so the same float).
    scale = 1000 if n == 24 else 1_000_000
    return (base * scale + int(digits)) / scale


def decode(payload: bytes | None, plant_id: str) -> Reading | Rejection:
    """A raw message as a Reading, or the reason it cannot be one. Never raises.

    A value that is not a number (e.g. ``"7.1"`` or ``"ERR"``) still makes a reading: stored with
    quality bad, so the operator sees the probe sending garbage. Anything without the identity of a
    reading (sensor, parameter, timestamp) is a rejection, for the dead-letter topic.
    """
    return decode_keeping_ts(payload, plant_id)[0]


def decode_keeping_ts(payload: bytes | None, plant_id: str) -> tuple[Reading | Rejection, str]:
    """``decode``, plus the timestamp text when it is canonical (else ""), for ``reading_json``."""
    if payload is None:
        return Rejection("empty", "message has no value"), ""
    try:
        d = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return _decode_slow(payload, plant_id), ""
    if type(d) is dict:
        fast = _fast(d, plant_id)
        if fast is not None:
            return fast
    return _decode_slow(payload, plant_id), ""


def _fast(d: dict[str, object], plant_id: str) -> tuple[Reading, str] | None:
    """The reading when every field has the plain form reading_from_dict accepts as is."""
    value = d.get("value", ...)
    t = type(value)
    if t is int:
        value = float(value)  # type: ignore[arg-type]
    elif t is not float and value is not None:
        return None
    ts_text = d.get("timestamp")
    if type(ts_text) is not str:
        return None
    ts = canonical_ts(ts_text)
    if ts is None or not EARLIEST_TS <= ts <= LATEST_TS:
        return None
    sensor, parameter, plant = d.get("sensorId"), d.get("parameter"), d.get("plantId", plant_id)
    unit, quality = d.get("unit", ""), d.get("quality", "good")
    reasons, seq = d.get("qualityReasons", []), d.get("seq")
    if not (
        type(sensor) is str
        and sensor
        and type(parameter) is str
        and parameter
        and type(plant) is str
        and plant
        and type(unit) is str
        and type(quality) is str
        and quality in _QUALITY
        and type(reasons) is list
        and (seq is None or type(seq) is int)
    ):
        return None
    if reasons and not all(type(x) is str for x in reasons):
        return None
    location, gateway = d.get("location"), d.get("gatewayId")
    location = location if type(location) is str else ""
    gateway = gateway if type(gateway) is str else ""
    if check_identity(sensor, parameter, plant, unit, location, gateway) is not None:
        return None
    return Reading(
        sensor,
        parameter,
        value,  # type: ignore[arg-type]
        unit,
        ts,
        plant,
        location,
        _QUALITY[quality],
        reasons,
        gateway,
        seq,
    ), ts_text


def _decode_slow(payload: bytes, plant_id: str) -> Reading | Rejection:
    try:
        d = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return Rejection("not_json", str(e)[:200])
    if not isinstance(d, dict):
        return Rejection("not_an_object", f"expected a JSON object, got {type(d).__name__}")
    value = d.get("value")
    not_numeric = value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float)
    )
    if not_numeric:
        d = {**d, "value": None}
    r = reading_from_dict(d, plant_id=plant_id)
    if isinstance(r, Reading) and not_numeric:
        r.flag(Quality.BAD, f"not_numeric:{type(value).__name__}")
    return r


def reading_json(r: Reading, ts_text: str = "") -> bytes:
    """``Reading.to_json()``'s content (the design's wire JSON), with ``ts_text`` as the timestamp
    when given (it must be the canonical text of ``r.timestamp``)."""
    v = r.value
    d: dict[str, object] = {
        "sensorId": r.sensor_id,
        "plantId": r.plant_id,
        "parameter": r.parameter,
        "value": v if v is None or math.isfinite(v) else None,
        "unit": r.unit,
        "quality": r.quality,
        "timestamp": ts_text or format_ts(r.timestamp),
        "location": r.location,
        "gatewayId": r.gateway_id,
        "seq": r.seq,
        "qualityReasons": r.quality_reasons,
    }
    if r.raw_value is not None and math.isfinite(r.raw_value):
        d["rawValue"] = r.raw_value
    if r.calibration_id is not None:
        d["calibrationId"] = r.calibration_id
    return orjson.dumps(d)
