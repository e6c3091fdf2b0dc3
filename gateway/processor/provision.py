"""``setup-influx``: the buckets and downsampling tasks, created or corrected, idempotently.

Buckets: ``sensors`` (raw, 7 days), ``sensors_1m`` (30 days), ``sensors_1h`` (365 days),
``sensors_1d`` (forever). Two Flux tasks fill the hourly bucket from the minute partials and the
daily one from the hourly, each re-computing a few recent periods every run (6 hours, 3 days): the
newest minutes may still be written after the hour ends (grace, idle flush, a short catch-up), and
rewriting a period stores it once (same point identity).

Minutes written later than that (a gateway back after a long outage, a processor catching up a
long backlog) are the processor's: it notes each hour that got a window after the hourly task
stopped looking at it and, before committing the batch, re-runs the same merge for exactly that
plant and hour (``ROLLUP_FLUX``, ``rollups``), then for the day it falls in once that day has
ended. Cheap (one plant-hour of partials, one plant-day of hours) and only for late data.

Merging is exact because every level keeps count, sum, min, max and latest with its time: avg is
sum / count, never an average of averages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from influxdb_client import (
    Bucket,
    BucketRetentionRules,
    BucketsApi,
    InfluxDBClient,
    TaskCreateRequest,
)
from influxdb_client.domain.task_update_request import TaskUpdateRequest
from influxdb_client.rest import ApiException

from gateway.processor.store import MEASUREMENT, InfluxConfig

log = logging.getLogger(__name__)

DAY = 86_400
HOUR = 3600
TASK_PREFIX = "edge-gateway downsample"
HOURLY_LOOKBACK_HOURS = 6  # what the hourly task re-computes every run
DAILY_LOOKBACK_DAYS = 3  # ... and the daily one


@dataclass(frozen=True)
class BucketSpec:
    name: str
    retention_seconds: int  # 0 = forever


@dataclass(frozen=True)
class TaskSpec:
    name: str
    flux: str


@dataclass(frozen=True)
class Level:
    """A bucket of windows: its resolution and how far back it keeps them (0: forever)."""

    bucket: str
    seconds: int
    retention_seconds: int


def levels(cfg: InfluxConfig) -> list[Level]:
    """The window buckets, finest first: 1-minute partials, hours, days."""
    return [
        Level(cfg.bucket_1m, 60, 30 * DAY),
        Level(cfg.bucket_1h, 3600, 365 * DAY),
        Level(cfg.bucket_1d, DAY, 0),
    ]


def buckets(cfg: InfluxConfig) -> list[BucketSpec]:
    return [
        BucketSpec(cfg.bucket, 7 * DAY),
        *(BucketSpec(level.bucket, level.retention_seconds) for level in levels(cfg)),
    ]


def flux_string(value: str) -> str:
    """A Flux string literal; ``${`` would start interpolation, so ``$`` is escaped too."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return '"' + escaped.replace("\n", "\\n") + '"'


def merge_flux(source: str, start: str, stop: str, every: str, where: str = "") -> str:
    """Flux merging windows (minute partials, or hours) of bucket ``source`` into ``every`` windows.

    Arguments are Flux expressions (a string literal, or a parameter's name). ``where`` narrows the
    rows further (a Flux predicate on ``r``). Yields one table per plant, parameter and window with
    count, sum, min, max, avg, latest and latest_time, ``_time`` being the window start.
    """
    narrow = f"\n  |> filter(fn: (r) => {where})" if where else ""
    return f"""from(bucket: {source})
  |> range(start: {start}, stop: {stop})
  |> filter(fn: (r) => r._measurement == "{MEASUREMENT}"){narrow}
  |> filter(fn: (r) => r._field == "count" or r._field == "sum" or r._field == "min"
      or r._field == "max" or r._field == "latest" or r._field == "latest_time")
  |> pivot(rowKey: ["_time"], columnKey: ["_field"], valueColumn: "_value")
  |> group(columns: ["plant_id", "parameter"])
  |> window(every: {every})
  |> reduce(
      identity: {{count: 0, sum: 0.0, min: 0.0, max: 0.0, latest: 0.0, latest_time: 0}},
      fn: (r, accumulator) => ({{
          count: accumulator.count + r.count,
          sum: accumulator.sum + r.sum,
          min: if accumulator.count == 0 or r.min < accumulator.min then r.min
              else accumulator.min,
          max: if accumulator.count == 0 or r.max > accumulator.max then r.max
              else accumulator.max,
          latest: if accumulator.count == 0 or r.latest_time >= accumulator.latest_time
              then r.latest else accumulator.latest,
          latest_time: if accumulator.count == 0 or r.latest_time >= accumulator.latest_time
              then r.latest_time else accumulator.latest_time,
      }}),
  )
  |> map(fn: (r) => ({{r with _time: r._start, _measurement: "{MEASUREMENT}",
      avg: r.sum / float(v: r.count)}}))"""


def _to(bucket: str, org: str) -> str:
    """Flux writing merged windows to ``bucket`` (Flux expressions, as for ``merge_flux``)."""
    return f"""  |> to(
      bucket: {bucket},
      org: {org},
      tagColumns: ["plant_id", "parameter"],
      fieldFn: (r) => ({{count: r.count, sum: r.sum, min: r.min, max: r.max, avg: r.avg,
          latest: r.latest, latest_time: r.latest_time}}),
  )
"""


def downsample_task(
    name: str, source: str, target: str, org: str, every: str, offset: str, lookback: str
) -> TaskSpec:
    flux = f"""import "date"

option task = {{name: {flux_string(name)}, every: {every}, offset: {offset}}}

stop = date.truncate(t: now(), unit: {every})
start = date.sub(from: stop, d: {lookback})

{merge_flux(flux_string(source), "start", "stop", every)}
{_to(flux_string(target), flux_string(org))}"""
    return TaskSpec(name, flux)


# One plant's windows of one period, merged from sourceBucket into targetBucket: what the tasks do,
# for a period they no longer look at.
ROLLUP_FLUX = (
    merge_flux(
        "sourceBucket", "rangeStart", "rangeStop", "windowEvery", where="r.plant_id == plantId"
    )
    + "\n"
    + _to("targetBucket", "orgName")
)


def beyond_hourly_task(hour: int, now: float) -> bool:
    """Whether the hourly task will not look at the hour starting at ``hour`` again. Its next run
    (within the hour) re-computes the HOURLY_LOOKBACK_HOURS before the hour it runs in; one hour
    of margin for a run that is late or slow."""
    return hour < now - now % HOUR - (HOURLY_LOOKBACK_HOURS - 2) * HOUR


def rollups(cfg: InfluxConfig, late: set[tuple[str, int]], now: float) -> list[dict[str, Any]]:
    """Parameters of ROLLUP_FLUX re-computing these (plant, hour start) hours, then the days they
    fall in that have ended (the daily bucket holds whole days; the daily task takes a day
    within DAILY_LOOKBACK_DAYS of its end anyway, this makes it right at once)."""
    today = now - now % DAY
    days = sorted({(plant, hour - hour % DAY) for plant, hour in late if hour - hour % DAY < today})
    return [
        {
            "sourceBucket": source,
            "targetBucket": target,
            "orgName": cfg.org,
            "plantId": plant,
            "rangeStart": datetime.fromtimestamp(start, UTC),
            "rangeStop": datetime.fromtimestamp(start + seconds, UTC),
            "windowEvery": timedelta(seconds=seconds),
        }
        for source, target, seconds, periods in (
            (cfg.bucket_1m, cfg.bucket_1h, HOUR, sorted(late)),
            (cfg.bucket_1h, cfg.bucket_1d, DAY, days),
        )
        for plant, start in periods
    ]


def tasks(cfg: InfluxConfig) -> list[TaskSpec]:
    return [
        downsample_task(
            f"{TASK_PREFIX} {cfg.bucket_1m} to {cfg.bucket_1h}",
            cfg.bucket_1m,
            cfg.bucket_1h,
            cfg.org,
            "1h",
            "2m",
            f"{HOURLY_LOOKBACK_HOURS}h",
        ),
        downsample_task(
            f"{TASK_PREFIX} {cfg.bucket_1h} to {cfg.bucket_1d}",
            cfg.bucket_1h,
            cfg.bucket_1d,
            cfg.org,
            "1d",
            "15m",
            f"{DAILY_LOOKBACK_DAYS}d",
        ),
    ]


def _find_buckets(api: BucketsApi, org_id: str, name: str) -> list[Bucket]:
    try:
        return list(api.find_buckets(org_id=org_id, name=name).buckets or [])
    except ApiException as e:
        if e.status == 404:
            return []
        raise


def _retention(bucket: object) -> int:
    rules = getattr(bucket, "retention_rules", None) or []
    return int(rules[0].every_seconds or 0) if rules else 0


def provision(client: InfluxDBClient, cfg: InfluxConfig) -> list[str]:
    """Create or correct the buckets and tasks; returns what was done, one line each."""
    done: list[str] = []
    orgs = client.organizations_api().find_organizations(org=cfg.org)
    if not orgs:
        raise RuntimeError(f"organization {cfg.org!r} not found")
    org_id = orgs[0].id
    api = client.buckets_api()
    for spec in buckets(cfg):
        rules = (
            [BucketRetentionRules(type="expire", every_seconds=spec.retention_seconds)]
            if spec.retention_seconds
            else []
        )
        existing = _find_buckets(api, org_id, spec.name)
        if not existing:
            api.create_bucket(bucket_name=spec.name, org_id=org_id, retention_rules=rules)
            done.append(f"created bucket {spec.name} ({_human(spec.retention_seconds)})")
            continue
        bucket = existing[0]
        if _retention(bucket) != spec.retention_seconds:
            bucket.retention_rules = rules
            api.update_bucket(bucket)
            done.append(f"set retention of {spec.name} to {_human(spec.retention_seconds)}")
        else:
            done.append(f"bucket {spec.name} ok ({_human(spec.retention_seconds)})")

    tasks_api = client.tasks_api()
    for task_spec in tasks(cfg):
        found = [
            t
            for t in tasks_api.find_tasks(org_id=org_id, name=task_spec.name)
            if t.name == task_spec.name
        ]
        if not found:
            tasks_api.create_task(
                task_create_request=TaskCreateRequest(
                    flux=task_spec.flux, org_id=org_id, status="active", description=task_spec.name
                )
            )
            done.append(f"created task {task_spec.name!r}")
            continue
        for extra in found[1:]:  # a duplicate from an interrupted earlier run
            tasks_api.delete_task(extra.id)
            done.append(f"deleted duplicate task {task_spec.name!r}")
        task = found[0]
        if task.flux.strip() != task_spec.flux.strip() or task.status != "active":
            tasks_api.update_task_request(
                task.id, TaskUpdateRequest(flux=task_spec.flux, status="active")
            )
            done.append(f"updated task {task_spec.name!r}")
        else:
            done.append(f"task {task_spec.name!r} ok")
    return done


def _human(seconds: int) -> str:
    return "forever" if seconds == 0 else f"{seconds // DAY} days"
