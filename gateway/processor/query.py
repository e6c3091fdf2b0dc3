"""Read back what the processor stored: latest value per parameter, history, merged windows.

User input never becomes Flux source. Values travel as query parameters (the client sends them as
an AST of literals, referenced by name in the fixed Flux texts below), and are also checked
strictly first, so a plant name carrying Flux syntax is refused with a clear message instead of
being sent at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from influxdb_client import InfluxDBClient

from gateway.common.model import parse_ts
from gateway.processor.aggregate import WindowAggregate, merge
from gateway.processor.store import MEASUREMENT, InfluxConfig

PLANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PARAMETER_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_DURATION_RE = re.compile(r"(-?)((?:\d+(?:ns|us|ms|s|m|h|d|w))+)")
_DURATION_PART = re.compile(r"(\d+)(ns|us|ms|s|m|h|d|w)")
_UNITS = {
    "ns": timedelta(microseconds=0.001),
    "us": timedelta(microseconds=1),
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}


class QueryInputError(ValueError):
    """A plant, parameter or time the user gave is not acceptable; the message says why."""


def check_plant(plant: str) -> str:
    if not isinstance(plant, str) or not PLANT_RE.fullmatch(plant):
        raise QueryInputError(
            f"invalid plant {plant!r}: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return plant


def check_parameter(parameter: str) -> str:
    if not isinstance(parameter, str) or not PARAMETER_RE.fullmatch(parameter):
        raise QueryInputError(
            f"invalid parameter {parameter!r}: use a name like pH, BOD, flow_rate"
        )
    return parameter


def parse_duration(text: str) -> timedelta:
    """``1h``, ``-30m``, ``1h30m``: Flux duration syntax without months or years."""
    m = _DURATION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise QueryInputError(f"invalid duration {text!r}: use e.g. 30s, 5m, 1h, 7d, 1h30m")
    total = sum((int(n) * _UNITS[u] for n, u in _DURATION_PART.findall(m.group(2))), timedelta())
    return -total if m.group(1) else total


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """``now``, a relative duration (``-1h``) or an RFC 3339 time, as an aware UTC datetime."""
    now = now or datetime.now(UTC)
    text = text.strip() if isinstance(text, str) else text
    if text == "now":
        return now
    if isinstance(text, str) and text[:1] in "-0123456789" and _DURATION_RE.fullmatch(text):
        return now + parse_duration(text)
    try:
        return datetime.fromtimestamp(parse_ts(text), UTC)
    except (ValueError, TypeError, OverflowError):
        raise QueryInputError(
            f"invalid time {text!r}: use now, a relative duration like -1h, or RFC 3339"
        ) from None


# Fixed Flux texts; every varying value is a parameter (an identifier below).
LATEST_FLUX = f"""from(bucket: bucketName)
  |> range(start: rangeStart)
  |> filter(fn: (r) => r._measurement == "{MEASUREMENT}" and r.plant_id == plantId)
  |> filter(fn: (r) => r._field == "value" or r._field == "quality" or r._field == "unit")
  |> last()"""

HISTORY_RAW_FLUX = f"""from(bucket: bucketName)
  |> range(start: rangeStart, stop: rangeStop)
  |> filter(fn: (r) => r._measurement == "{MEASUREMENT}" and r.plant_id == plantId
      and r.parameter == parameterName)
  |> filter(fn: (r) => r._field == "value" or r._field == "quality")
  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")
  |> group()
  |> sort(columns: ["_time"])"""

HISTORY_EVERY_FLUX = f"""data = from(bucket: bucketName)
  |> range(start: rangeStart, stop: rangeStop)
  |> filter(fn: (r) => r._measurement == "{MEASUREMENT}" and r.plant_id == plantId
      and r.parameter == parameterName and r._field == "value")
  |> group(columns: ["plant_id", "parameter"])
union(tables: [
    data |> aggregateWindow(every: windowEvery, fn: mean, createEmpty: false, timeSrc: "_start")
        |> set(key: "agg", value: "mean"),
    data |> aggregateWindow(every: windowEvery, fn: min, createEmpty: false, timeSrc: "_start")
        |> set(key: "agg", value: "min"),
    data |> aggregateWindow(every: windowEvery, fn: max, createEmpty: false, timeSrc: "_start")
        |> set(key: "agg", value: "max"),
    data |> aggregateWindow(every: windowEvery, fn: count, createEmpty: false, timeSrc: "_start")
        |> toFloat() |> set(key: "agg", value: "count"),
])
  |> group(columns: ["plant_id", "parameter"])
  |> pivot(rowKey: ["_time"], columnKey: ["agg"], valueColumn: "_value")
  |> sort(columns: ["_time"])"""

WINDOWS_FLUX = f"""from(bucket: bucketName)
  |> range(start: rangeStart, stop: rangeStop)
  |> filter(fn: (r) => r._measurement == "{MEASUREMENT}" and r.plant_id == plantId)
  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")
  |> group()"""


@dataclass(frozen=True, slots=True)
class Latest:
    parameter: str
    sensor_id: str
    location: str
    time: datetime
    value: float | None
    unit: str
    quality: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "parameter": self.parameter,
            "sensorId": self.sensor_id,
            "location": self.location,
            "timestamp": self.time.isoformat().replace("+00:00", "Z"),
            "value": self.value,
            "unit": self.unit,
            "quality": self.quality,
        }


@dataclass(frozen=True, slots=True)
class HistoryRow:
    time: datetime
    value: float | None
    quality: str = ""  # raw rows
    sensor_id: str = ""
    min: float | None = None  # aggregated rows
    max: float | None = None
    count: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "timestamp": self.time.isoformat().replace("+00:00", "Z"),
            "value": self.value,
        }
        if self.count is None:
            d.update(quality=self.quality, sensorId=self.sensor_id)
        else:
            d.update(min=self.min, max=self.max, count=self.count)
        return d


class Queries:
    def __init__(self, client: InfluxDBClient, config: InfluxConfig) -> None:
        self.client = client
        self.config = config
        self._api = client.query_api()

    def _run(self, flux: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        tables = self._api.query(flux, org=self.config.org, params=params)
        return [rec.values for table in tables for rec in table.records]

    def latest(self, plant: str, *, since: str = "-7d") -> list[Latest]:
        """The newest reading of each parameter of ``plant`` (from whichever sensor sent last)."""
        params = {
            "bucketName": self.config.bucket,
            "plantId": check_plant(plant),
            "rangeStart": parse_time(since),
        }
        series: dict[tuple[str, str, str], dict[str, Any]] = {}
        for row in self._run(LATEST_FLUX, params):
            key = (row.get("parameter", ""), row.get("sensor_id", ""), row.get("location", ""))
            series.setdefault(key, {})[row["_field"]] = (row["_time"], row["_value"])
        best: dict[str, Latest] = {}
        for (parameter, sensor, location), fields in series.items():
            if "quality" not in fields:
                continue
            t, quality = fields["quality"]
            vt, value = fields.get("value", (None, None))
            unit = fields.get("unit", (None, ""))[1]
            item = Latest(
                parameter, sensor, location, t, value if vt == t else None, unit, str(quality)
            )
            prev = best.get(parameter)
            if prev is None or (t, sensor) > (prev.time, prev.sensor_id):
                best[parameter] = item
        return sorted(best.values(), key=lambda x: x.parameter)

    def history(
        self,
        plant: str,
        parameter: str,
        *,
        start: str = "-1h",
        stop: str = "now",
        every: str | None = None,
    ) -> list[HistoryRow]:
        """Raw readings of one parameter, or with ``every`` their mean/min/max/count per window."""
        now = datetime.now(UTC)
        params: dict[str, Any] = {
            "bucketName": self.config.bucket,
            "plantId": check_plant(plant),
            "parameterName": check_parameter(parameter),
            "rangeStart": parse_time(start, now=now),
            "rangeStop": parse_time(stop, now=now),
        }
        if params["rangeStart"] >= params["rangeStop"]:
            raise QueryInputError("start must be before stop")
        if every is None:
            return [
                HistoryRow(
                    r["_time"], r.get("value"), str(r.get("quality", "")), r.get("sensor_id", "")
                )
                for r in self._run(HISTORY_RAW_FLUX, params)
            ]
        window = parse_duration(every)
        if window <= timedelta(0):
            raise QueryInputError("every must be a positive duration")
        params["windowEvery"] = window
        return [
            HistoryRow(
                r["_time"],
                r.get("mean"),
                min=r.get("min"),
                max=r.get("max"),
                count=int(r["count"]) if r.get("count") is not None else None,
            )
            for r in self._run(HISTORY_EVERY_FLUX, params)
        ]

    def windows(
        self, plant: str, start: datetime, stop: datetime, *, bucket: str | None = None
    ) -> list[WindowAggregate]:
        """Full 1-minute windows of ``plant``: the stored partials, merged per window."""
        params = {
            "bucketName": bucket or self.config.bucket_1m,
            "plantId": check_plant(plant),
            "rangeStart": start,
            "rangeStop": stop,
        }
        parts: dict[tuple[str, int], list[WindowAggregate]] = {}
        for r in self._run(WINDOWS_FLUX, params):
            start_s = int(r["_time"].timestamp())
            w = WindowAggregate(
                r["plant_id"],
                r["parameter"],
                start_s,
                int(r["count"]),
                float(r["sum"]),
                float(r["min"]),
                float(r["max"]),
                float(r["latest"]),
                _latest_time(int(r["latest_time"])),
                str(r.get("latest_sensor", "")),
                str(r.get("unit", "")),
                str(r.get("source", "")),
            )
            parts.setdefault((w.parameter, start_s), []).append(w)
        return [merge(p) for _, p in sorted(parts.items())]


def _latest_time(stored: int) -> float:
    """Epoch seconds of a window's ``latest_time``: microseconds, or milliseconds in windows
    written before the processor kept microseconds (a value below 10**14 µs would be in 1973)."""
    return stored / 1_000_000 if stored >= 10**14 else stored / 1000
