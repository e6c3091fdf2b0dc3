"""Read back what the processor stored: latest value per parameter, history, merged windows.

History per window (``every``) of 1 minute or a multiple reads the stored windows, merged exactly
(counts and sums add up, min/max combine) the way the processor built them: bad readings are not
in them, and they reach back as far as the buckets keep them, the 1-minute partials (30 days),
then hours (a year), then days. Other widths, or ``include_bad``, aggregate the raw readings
(7 days), bad ones only when asked.

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
from gateway.processor.provision import levels, merge_flux
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

# Raw readings per window; bad ones only with includeBad, as the windows leave them out.
HISTORY_EVERY_FLUX = f"""data = from(bucket: bucketName)
  |> range(start: rangeStart, stop: rangeStop)
  |> filter(fn: (r) => r._measurement == "{MEASUREMENT}" and r.plant_id == plantId
      and r.parameter == parameterName)
  |> filter(fn: (r) => r._field == "value" or r._field == "quality")
  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")
  |> filter(fn: (r) => exists r.value and (includeBad or r.quality != "bad"))
  |> map(fn: (r) => ({{_start: r._start, _stop: r._stop, _time: r._time, _value: r.value,
      plant_id: r.plant_id, parameter: r.parameter}}))
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

# Stored windows (partials, hours or days) merged into windowEvery windows.
HISTORY_WINDOWS_FLUX = merge_flux(
    "bucketName",
    "rangeStart",
    "rangeStop",
    "windowEvery",
    where="r.plant_id == plantId and r.parameter == parameterName",
)

WINDOWS_FLUX = f"""from(bucket: bucketName)
  |> range(start: rangeStart, stop: rangeStop)
  |> filter(fn: (r) => r._measurement == "{MEASUREMENT}" and r.plant_id == plantId)
  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")
  |> group()"""


_MARGIN_SECONDS = 86_400  # how long before a bucket's retention ends we stop reading it


def _floor(t: datetime, seconds: int) -> datetime:
    """``t`` down to a multiple of ``seconds`` since the epoch (how windows are laid out)."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return t - (t - epoch) % timedelta(seconds=seconds)


def _ceil(t: datetime, seconds: int) -> datetime:
    down = _floor(t, seconds)
    return down if down == t else down + timedelta(seconds=seconds)


def _row_time(row: dict[str, Any]) -> datetime:
    return row["_time"]


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
        include_bad: bool = False,
    ) -> list[HistoryRow]:
        """Raw readings of one parameter, or with ``every`` mean/min/max/count per window: from
        the stored windows (``every`` a multiple of 1 minute), or from the raw readings (other
        widths, or ``include_bad``). The range is widened to whole windows."""
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
        if window < timedelta(seconds=1) or window % timedelta(seconds=1):
            raise QueryInputError("every must be a whole number of seconds, at least 1s")
        params["windowEvery"] = window
        seconds = int(window.total_seconds())
        # whole windows, on the same grid as the stored ones (UTC, from the epoch)
        params["rangeStart"] = _floor(params["rangeStart"], seconds)
        params["rangeStop"] = _ceil(params["rangeStop"], seconds)
        if include_bad or seconds % 60:
            params["includeBad"] = include_bad
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
        return self._history_windows(params, seconds, now)

    def _history_windows(
        self, params: dict[str, Any], seconds: int, now: datetime
    ) -> list[HistoryRow]:
        """Merged stored windows: each part of the range from the finest bucket that still keeps
        it (a day's margin before its retention ends), in windows of ``seconds``."""
        start, upper = params["rangeStart"], params["rangeStop"]
        rows: list[HistoryRow] = []
        for level in levels(self.config):
            lower = start
            if level.retention_seconds:
                kept = now - timedelta(seconds=level.retention_seconds - _MARGIN_SECONDS)
                lower = max(start, _ceil(kept, seconds))
            if lower < upper:
                if seconds % level.seconds:
                    raise QueryInputError(
                        f"before {lower.isoformat()} windows are kept per {level.seconds} s only: "
                        f"use an every that is a multiple of it"
                    )
                part = {**params, "bucketName": level.bucket, "rangeStart": lower}
                part["rangeStop"] = upper
                rows[:0] = [
                    HistoryRow(
                        r["_time"],
                        float(r["sum"]) / int(r["count"]),
                        min=float(r["min"]),
                        max=float(r["max"]),
                        count=int(r["count"]),
                    )
                    for r in sorted(self._run(HISTORY_WINDOWS_FLUX, part), key=_row_time)
                    if r.get("count")
                ]
                upper = lower
            if upper <= start:
                break
        return rows

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
