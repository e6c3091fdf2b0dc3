"""InfluxDB storage: readings, alarm events and 1-minute windows, exactly once.

Exactly once comes from point identity, not from bookkeeping: a point is measurement + tags +
timestamp, so writing a replayed reading again overwrites it with itself. Writes use the client's
synchronous write service with our own batches (``batch_lines``, gzip): a batch either succeeded or
raised, so the consumer commits offsets only for what InfluxDB acknowledged. Lines InfluxDB refuses
for good (malformed, a field type conflict, outside the bucket's retention) are singled out by
splitting the batch, and returned with the reason: the writer dead-letters them, none is dropped
silently. The client's batching
mode is avoided because its flush on close can drop points silently. We gzip ourselves at level 1:
the client's level 9 costs five times the CPU for a body 20 % smaller, on a machine whose cores the
processor shares with Kafka and InfluxDB.

Schema (the design's): measurement ``water_quality``, tags sensor_id, parameter, plant_id,
location, fields value (float, left out when there is none), quality, unit, reasons (comma
separated, empty when there are none: always written, so a rewrite replaces them); measurement
``alerts`` in the same bucket; windows in bucket ``sensors_1m`` as measurement ``water_quality``
tagged plant_id, parameter and ``source`` (the Kafka partition whose readings the partial covers);
measurement ``predictions`` in the raw bucket, tagged plant_id and model, fields prediction,
confidence and the inputs it was made from.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from influxdb_client import InfluxDBClient, WritePrecision
from influxdb_client.rest import ApiException
from influxdb_client.service.write_service import WriteService

from gateway.common.config import SECRET, secret
from gateway.common.metrics import Metrics
from gateway.common.model import AlarmEvent, Prediction, Reading
from gateway.processor.aggregate import WindowAggregate

log = logging.getLogger(__name__)

MEASUREMENT = "water_quality"
ALERTS_MEASUREMENT = "alerts"
PREDICTIONS_MEASUREMENT = "predictions"


@dataclass
class InfluxConfig:
    """TOML ``[influxdb]``; ``token`` may be ``env:NAME`` or ``file:/path``."""

    url: str = "http://127.0.0.1:8086"
    org: str = "plant-ops"
    token: str = field(default="env:INFLUXDB_TOKEN", metadata=SECRET)
    bucket: str = "sensors"
    bucket_1m: str = "sensors_1m"
    bucket_1h: str = "sensors_1h"
    bucket_1d: str = "sensors_1d"
    batch_lines: int = 5000
    timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        if not 1 <= self.batch_lines <= 100_000:
            raise ValueError("batch_lines must be between 1 and 100000")
        if self.timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")

    def client(self, source: str = "config", *, gzip: bool = True) -> InfluxDBClient:
        token = secret(self.token, source=source, key="influxdb.token")
        return InfluxDBClient(
            url=self.url,
            token=token,
            org=self.org,
            timeout=int(self.timeout_seconds * 1000),
            enable_gzip=gzip,
            retries=False,
        )


class StoreUnavailable(Exception):
    """InfluxDB did not take the batch (down, timeout, 5xx): retry later, do not commit."""


@dataclass(frozen=True, slots=True)
class Refused:
    """A line InfluxDB will never take, and why."""

    bucket: str
    line: str
    reason: str  # malformed, field_type_conflict, beyond_retention, refused
    detail: str  # InfluxDB's message


# --- line protocol (pure) -------------------------------------------------------------------------

# Line protocol has no escape for a line break: one would end the point. In tags it becomes an
# (escaped) space, in string fields a space.
_TAG_ESCAPES = str.maketrans(
    {",": r"\,", "=": r"\=", " ": r"\ ", "\\": "\\\\", "\n": r"\ ", "\r": r"\ "}
)
_STR_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": " ", "\r": " "})


def _tag(value: str) -> str:
    return value.translate(_TAG_ESCAPES)


def _str_field(value: str) -> str:
    return '"' + value.translate(_STR_ESCAPES) + '"'


def _tags(pairs: Sequence[tuple[str, str]]) -> str:
    # Sorted by key (InfluxDB's canonical order); empty values cannot be written, so are left out.
    return "".join(f",{k}={_tag(v)}" for k, v in sorted(pairs) if v)


def _float(v: float) -> str:
    return repr(float(v))


def us(ts: float) -> int:
    """Epoch microseconds, the precision of every point and of ``latest_time``: a float of epoch
    seconds holds the microsecond exactly enough for this to be the one format_ts writes."""
    return round(ts * 1_000_000)


_HEADS: dict[tuple[str, str, str, str, str, str], str] = {}
_MAX_HEADS = 65_536


def _head(
    location: str, parameter: str, plant_id: str, sensor_id: str, quality: str, unit: str
) -> str:
    tags = (
        ("location", location),
        ("parameter", parameter),
        ("plant_id", plant_id),
        ("sensor_id", sensor_id),
    )
    return f"{MEASUREMENT}{_tags(tags)} quality={_str_field(quality)},unit={_str_field(unit)}"


def reading_line(r: Reading) -> str:
    """One raw reading; timestamp in microseconds (the wire format's precision)."""
    # Series key plus the quality and unit fields repeat for every reading of a sensor: cached.
    key = (r.location, r.parameter, r.plant_id, r.sensor_id, r.quality.value, r.unit)
    line = _HEADS.get(key)
    if line is None:
        if len(_HEADS) >= _MAX_HEADS:
            _HEADS.clear()
        line = _HEADS[key] = _head(*key)
    v = r.value
    if v is not None and math.isfinite(v):
        line = f"{line},value={float(v)!r}"
    # Always written, empty when there are none: InfluxDB keeps the fields a rewrite leaves out,
    # so a replay that clears a flag must say so.
    reasons = _str_field(",".join(r.quality_reasons)) if r.quality_reasons else '""'
    return f"{line},reasons={reasons} {us(r.timestamp)}"


def alarm_line(e: AlarmEvent) -> str:
    tags = _tags(
        (
            ("condition", e.condition),
            ("level", e.level),
            ("parameter", e.parameter),
            ("plant_id", e.plant_id),
            ("sensor_id", e.sensor_id),
            ("state", e.state),
        )
    )
    fields = [
        f"alarm_id={_str_field(e.alarm_id)}",
        f"event_id={_str_field(e.event_id)}",
        f"message={_str_field(e.message)}",
    ]
    if e.value is not None and math.isfinite(e.value):
        fields.append(f"value={_float(e.value)}")
    if e.threshold is not None:
        fields.append(f"threshold={_float(e.threshold)}")
    return f"{ALERTS_MEASUREMENT}{tags} {','.join(fields)} {us(e.timestamp)}"


def window_line(w: WindowAggregate) -> str:
    """One partial window, timestamped at the window start; ``latest_time`` in microseconds."""
    tags = _tags((("parameter", w.parameter), ("plant_id", w.plant_id), ("source", w.source)))
    fields = (
        f"count={w.count}i,sum={_float(w.sum)},min={_float(w.min)},max={_float(w.max)},"
        f"avg={_float(w.avg)},latest={_float(w.latest)},latest_time={us(w.latest_time)}i,"
        f"latest_sensor={_str_field(w.latest_sensor)},unit={_str_field(w.unit)}"
    )
    return f"{MEASUREMENT}{tags} {fields} {w.start * 1_000_000}"


def prediction_line(p: Prediction) -> str:
    """One prediction, timestamped at its newest input reading (microseconds): the inputs as
    ``<name>=<value>`` fields, ``effluent_<parameter>`` where the model gave its estimate, and
    ``defaulted`` naming the inputs that took the design's default."""
    tags = _tags((("model", p.model), ("plant_id", p.plant_id)))
    fields = [
        f"prediction={_str_field(p.prediction)}",
        f"confidence={_float(p.confidence)}",
        f"window_start={p.window_start}i",
        *(f"{_tag(k)}={_float(v)}" for k, v in sorted(p.inputs.items())),
        *(f"effluent_{_tag(k)}={_float(v)}" for k, v in sorted((p.effluent or {}).items())),
    ]
    if p.defaulted:
        fields.append(f"defaulted={_str_field(','.join(p.defaulted))}")
    return f"{PREDICTIONS_MEASUREMENT}{tags} {','.join(fields)} {us(p.timestamp)}"


# --- writer -------------------------------------------------------------------------------------


class InfluxStore:
    """Synchronous, batched, gzip'd writes; raises StoreUnavailable when a retry may help.

    Thread-safe enough for the sink writer's threads (``writes_in_flight``; each request is its own
    call on the client's connection pool) plus ``ping`` from the health endpoint.
    """

    def __init__(self, config: InfluxConfig, metrics: Metrics, *, source: str = "config") -> None:
        self.config = config
        self.metrics = metrics
        self._client = config.client(source, gzip=False)
        self._service = WriteService(self._client.api_client)
        self.rejected_lines = 0

    def write_readings(self, readings: Sequence[Reading]) -> list[Refused]:
        return self.write(self.config.bucket, [reading_line(r) for r in readings])

    def write_alarms(self, events: Sequence[AlarmEvent]) -> list[Refused]:
        return self.write(self.config.bucket, [alarm_line(e) for e in events])

    def write_windows(self, windows: Sequence[WindowAggregate]) -> list[Refused]:
        return self.write(self.config.bucket_1m, [window_line(w) for w in windows])

    def write(self, bucket: str, lines: Sequence[str]) -> list[Refused]:
        """Write in requests of about ``batch_lines`` lines (5,300 lines go in one request, not
        5,000 and a 300 line straggler that costs a round trip of its own). Returns the lines
        InfluxDB refused for good (all others are stored); raises StoreUnavailable if a retry
        may help."""
        refused: list[Refused] = []
        chunks = max(1, round(len(lines) / self.config.batch_lines))
        size = -(-len(lines) // chunks)
        for i in range(0, len(lines), size):
            self._write_batch(bucket, lines[i : i + size], refused)
        return refused

    def _write_batch(self, bucket: str, lines: Sequence[str], refused: list[Refused]) -> None:
        try:
            self._service.post_write(
                org=self.config.org,
                bucket=bucket,
                body=gzip.compress("\n".join(lines).encode(), compresslevel=1),
                precision=WritePrecision.US,
                content_encoding="gzip",
                content_type="text/plain; charset=utf-8",
            )
        except ApiException as e:
            status = e.status or 0
            if status in (400, 422):
                # 400: a malformed line fails the whole batch. 422: well-formed, but some points
                # refused for good (field type conflict, outside the bucket's retention) while the
                # rest were written. Retrying cannot help: split until the refused lines are
                # singled out (writing a stored point again stores it once).
                self.metrics.influx_write_failures.inc()
                detail = _message(e)
                if len(lines) == 1 or (status == 422 and _dropped(detail) == len(lines)):
                    self._refuse(bucket, lines, status, detail, refused)
                    return
                half = len(lines) // 2
                self._write_batch(bucket, lines[:half], refused)
                self._write_batch(bucket, lines[half:], refused)
                return
            self.metrics.influx_write_failures.inc()
            raise StoreUnavailable(f"InfluxDB answered {status}: {_body(e)}") from None
        except Exception as e:  # connection refused, timeout, DNS: all transient here
            self.metrics.influx_write_failures.inc()
            raise StoreUnavailable(f"InfluxDB write failed: {e.__class__.__name__}: {e}") from None

    def _refuse(
        self, bucket: str, lines: Sequence[str], status: int, detail: str, out: list[Refused]
    ) -> None:
        if status == 400:
            reason = "malformed"
        elif "field type conflict" in detail:
            reason = "field_type_conflict"
        elif "retention" in detail:
            reason = "beyond_retention"
        else:
            reason = "refused"
        out.extend(Refused(bucket, line, reason, detail) for line in lines)
        self.rejected_lines += len(lines)
        self.metrics.influx_refused_lines.labels(bucket=bucket, reason=reason).inc(len(lines))
        log.warning(
            "InfluxDB refused %d line(s) for %s (%s), dead-lettered: %s: %.300s",
            len(lines),
            bucket,
            reason,
            detail,
            lines[0],
        )

    def query(self, flux: str, params: dict[str, Any]) -> None:
        """Run a Flux script for its effect (e.g. ``to()``); StoreUnavailable if it failed."""
        try:
            self._client.query_api().query(flux, org=self.config.org, params=params)
        except Exception as e:
            self.metrics.influx_write_failures.inc()
            raise StoreUnavailable(f"InfluxDB query failed: {e.__class__.__name__}: {e}") from None

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except Exception:
            return False

    def close(self) -> None:
        self._client.close()


def _body(e: ApiException) -> str:
    body = e.body.decode(errors="replace") if isinstance(e.body, bytes) else str(e.body or "")
    return body[:300] or str(e.reason)


def _message(e: ApiException) -> str:
    """InfluxDB's error message (its JSON body's ``message``), or the body as it is."""
    body = e.body.decode(errors="replace") if isinstance(e.body, bytes) else str(e.body or "")
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or body or e.reason)[:1000]


def _dropped(message: str) -> int | None:
    """How many points a partial write dropped (``... dropped=3``), if InfluxDB says."""
    m = re.search(r"dropped=(\d+)", message)
    return int(m.group(1)) if m else None
