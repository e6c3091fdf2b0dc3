"""The Grafana provisioning in grafana/: every Flux query of the dashboard runs against the real
InfluxDB and returns the rows its panel shows.

Grafana itself is not run here (it is in neither Debian's archive nor PyPI), so the test does what
Grafana does with a query: the frontend replaces template variables (``${plant}``) with their raw
values, then the backend replaces the Flux macros ``v.timeRangeStart``/``v.timeRangeStop`` with
RFC 3339 times and ``v.windowPeriod`` with a Go duration (pkg/tsdb/influxdb/flux/macros.go). The
queries are found by walking the dashboard JSON, so a new panel is tested without touching this
file; a repeated panel runs once per value of its variable. The fixture data is written with the
processor's own line protocol into two fresh buckets, deleted afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from influxdb_client import BucketRetentionRules, InfluxDBClient

from gateway.common.alarms import make_id
from gateway.common.metrics import Metrics
from gateway.common.model import AlarmEvent, Prediction, Quality, Reading
from gateway.processor.aggregate import WindowAggregate, merge
from gateway.processor.store import InfluxConfig, InfluxStore, prediction_line
from tests.support.services import ROOT

INPUTS = {
    "pH": 7.1,
    "BOD": 180.0,
    "COD": 400.0,
    "TSS": 200.0,
    "TDS": 900.0,
    "flow_rate": 150.0,
    "temperature": 25.0,
}

GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "plant.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "influxdb.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dashboards.yaml"

PARAMETERS = ("COD", "TSS", "pH")
UNITS = {"COD": "mg/L", "TSS": "mg/L", "pH": "pH"}


# --- what Grafana does to a query ---------------------------------------------------------------


def go_duration(d: timedelta) -> str:
    """Go's time.Duration.String() for whole milliseconds: 500ms, 5s, 2m0s, 1h0m0s."""
    ms = round(d.total_seconds() * 1000)
    if ms < 1000:
        return f"{ms}ms"
    s, frac = divmod(ms, 1000)
    secs = f"{s % 60}.{frac:03d}".rstrip("0").rstrip(".") + "s"
    if s < 60:
        return secs
    if s < 3600:
        return f"{s // 60}m{secs}"
    return f"{s // 3600}h{s % 3600 // 60}m{secs}"


def rfc3339nano(t: datetime) -> str:
    """Go's time.RFC3339Nano in UTC: trailing zeros of the fraction dropped."""
    t = t.astimezone(UTC)
    frac = f"{t.microsecond:06d}".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


_TEMPLATE_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)|\[\[(\w+)\]\]")
_FLUX_MACRO = re.compile(r"(v)\.([a-zA-Z]+)")  # Grafana's own pattern, unanchored as it is


def interpolate(
    flux: str,
    variables: dict[str, str],
    start: datetime,
    stop: datetime,
    interval: timedelta,
    datasource: dict[str, Any],
) -> str:
    def template(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in variables:
            raise AssertionError(f"query uses ${name}, which the dashboard does not define")
        return variables[name]

    flux = _TEMPLATE_VAR.sub(template, flux)
    js = datasource["jsonData"]
    macros = {
        "timeRangeStart": rfc3339nano(start),
        "timeRangeStop": rfc3339nano(stop),
        "windowPeriod": go_duration(interval),
        "defaultBucket": f'"{js["defaultBucket"]}"',
        "organization": f'"{js["organization"]}"',
    }
    return _FLUX_MACRO.sub(lambda m: macros.get(m.group(2), m.group(0)), flux)


@pytest.mark.parametrize(
    ("d", "text"),
    [
        (timedelta(milliseconds=200), "200ms"),
        (timedelta(seconds=5), "5s"),
        (timedelta(seconds=1.5), "1.5s"),
        (timedelta(minutes=2), "2m0s"),
        (timedelta(seconds=61), "1m1s"),
        (timedelta(hours=1, minutes=30), "1h30m0s"),
    ],
)
def test_window_period_is_formatted_as_go_formats_a_duration(d, text):
    assert go_duration(d) == text


def test_times_are_formatted_as_go_formats_rfc3339nano():
    assert rfc3339nano(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05Z"
    assert rfc3339nano(datetime(2026, 1, 2, 3, 4, 5, 120000, UTC)) == "2026-01-02T03:04:05.12Z"


# --- the files ----------------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def load_datasource() -> dict[str, Any]:
    (ds,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return ds


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))  # panels inside a collapsed row


def variable_query(var: dict[str, Any]) -> str:
    q = var["query"]
    return q["query"] if isinstance(q, dict) else q


def constants(dashboard: dict[str, Any]) -> dict[str, str]:
    return {
        v["name"]: v["query"] for v in dashboard["templating"]["list"] if v["type"] == "constant"
    }


# --- schema basics (no server needed) -----------------------------------------------------------


def test_datasource_is_influxdb_flux_with_the_token_from_the_environment():
    ds = load_datasource()
    cfg = InfluxConfig()
    assert ds["type"] == "influxdb" and ds["access"] == "proxy"
    assert ds["uid"] and ds["url"].startswith(("http://", "https://"))
    assert ds["jsonData"]["version"] == "Flux"
    assert ds["jsonData"]["organization"] == cfg.org
    assert ds["jsonData"]["defaultBucket"] == cfg.bucket
    # Grafana interpolates $NAME / ${NAME} from its environment when it reads the file.
    assert ds["secureJsonData"] == {"token": "$INFLUXDB_TOKEN"}
    assert "token" not in ds["jsonData"] and "password" not in ds


def test_dashboard_provider_loads_the_dashboards_folder():
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
    assert provider["folder"]


def test_dashboard_json_has_grafanas_basics_and_uses_the_provisioned_datasource():
    d = load_dashboard()
    ds_uid = load_datasource()["uid"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"])
    assert d["title"]
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["time"] == {"from": "now-1h", "to": "now"}

    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert len(variables) == len(d["templating"]["list"]), "variable names must be unique"
    assert variables["plant"]["type"] == "query" and not variables["plant"].get("multi")
    cfg = InfluxConfig()
    assert constants(d) == {"bucket": cfg.bucket, "bucket_1m": cfg.bucket_1m}
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == {"type": "influxdb", "uid": ds_uid}, v["name"]
            assert variable_query(v).strip(), v["name"]

    panels = list(all_panels(d["panels"]))
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["type"] in {"row", "table", "timeseries", "stat", "gauge", "bargauge", "text"}
        assert p["title"], p["id"]
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("x", "y", "w", "h")), p["title"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "influxdb", "uid": ds_uid}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "influxdb", "uid": ds_uid}, p["title"]
            assert t["query"].strip(), (p["title"], t["refId"])
        if "repeat" in p:
            repeat = variables[p["repeat"]]
            assert repeat.get("multi") or repeat.get("includeAll"), p["title"]


# --- the queries against the real InfluxDB ------------------------------------------------------


@dataclass
class Fixture:
    client: InfluxDBClient
    cfg: InfluxConfig
    plant: str
    now: datetime  # Grafana's "now": the end of the default range
    base: int  # the minute (epoch seconds) the data is laid out before
    partials: list[WindowAggregate] = field(default_factory=list)
    events: list[AlarmEvent] = field(default_factory=list)
    predictions: list[tuple[str, str, float, float]] = field(default_factory=list)

    def run(self, flux: str) -> list[dict[str, Any]]:
        tables = self.client.query_api().query(flux, org=self.cfg.org)
        return [dict(rec.values) for table in tables for rec in table.records]

    def variables(self, dashboard: dict[str, Any], **extra: str) -> dict[str, str]:
        # The dashboard's bucket constants pointed at the test's buckets, as a site would edit them.
        names = {"sensors": self.cfg.bucket, "sensors_1m": self.cfg.bucket_1m}
        return {
            **{k: names[v] for k, v in constants(dashboard).items()},
            "plant": self.plant,
            **extra,
        }

    def grafana_query(
        self,
        flux: str,
        variables: dict[str, str],
        interval: timedelta = timedelta(seconds=5),  # what Grafana picks for 1h on a wide panel
    ) -> list[dict[str, Any]]:
        start = self.now - timedelta(hours=1)
        return self.run(interpolate(flux, variables, start, self.now, interval, load_datasource()))


def _partials(plant: str, base: int) -> list[WindowAggregate]:
    """Two partial windows (two source partitions) per parameter and minute, 8 to 3 minutes ago."""
    rnd = random.Random(42)
    centre = {"COD": 300.0, "TSS": 150.0, "pH": 7.0}
    spread = {"COD": 40.0, "TSS": 30.0, "pH": 0.4}
    out = []
    for parameter in PARAMETERS:
        for minute in range(8, 2, -1):
            start = base - minute * 60
            for partition in (0, 1):
                values = [
                    round(centre[parameter] + rnd.uniform(-1, 1) * spread[parameter], 3)
                    for _ in range(rnd.randint(1, 4))
                ]
                out.append(
                    WindowAggregate(
                        plant,
                        parameter,
                        start,
                        len(values),
                        sum(values),
                        min(values),
                        max(values),
                        values[-1],
                        start + 50.0 + partition,
                        f"{parameter.lower()}-{partition}",
                        UNITS[parameter],
                        f"sensors.raw.{plant}/{partition}",
                    )
                )
    return out


def _readings(plant: str, base: int) -> list[Reading]:
    def r(sensor, parameter, value, minutes_ago, location, quality=Quality.GOOD, reasons=()):
        return Reading(
            sensor,
            parameter,
            value,
            UNITS[parameter],
            base - minutes_ago * 60 + 0.25,
            plant_id=plant,
            location=location,
            quality=quality,
            quality_reasons=list(reasons),
        )

    return [
        r("ph-1", "pH", 7.0, 5, "influent"),
        r("ph-2", "pH", 6.9, 3, "effluent"),
        r("ph-1", "pH", 7.2, 2, "influent"),  # the newest pH
        r("cod-1", "COD", 300.0, 4, "influent"),
        r("cod-1", "COD", 612.5, 1, "influent", Quality.UNCERTAIN, ["band"]),
        r("tss-1", "TSS", 120.0, 6, "clarifier"),
        r("tss-1", "TSS", None, 1, "clarifier", Quality.BAD, ["timeout"]),  # no value
    ]


def _events(plant: str, base: int) -> list[AlarmEvent]:
    def e(sensor, parameter, condition, level, state, value, threshold, minutes_ago):
        alarm_id = make_id("gw-1", plant, sensor, parameter, condition)
        ts = base - minutes_ago * 60 + 0.5
        return AlarmEvent(
            alarm_id,
            make_id(alarm_id, state, str(ts)),
            sensor,
            plant,
            parameter,
            condition,
            level,
            state,
            value,
            threshold,
            ts,
            f"{parameter} {condition} {state}",
        )

    return [
        e("ph-1", "pH", "L", "warning", "raised", 6.4, 6.5, 7),
        e("ph-1", "pH", "L", "warning", "cleared", 7.0, 6.5, 5),  # pH L no longer active
        e("cod-1", "COD", "H", "warning", "raised", 300.0, 250.0, 4),
        e("cod-1", "COD", "HH", "critical", "raised", 612.5, 500.0, 1),
        e("tss-1", "TSS", "probe_fault", "warning", "raised", None, None, 1),
    ]


@pytest.fixture(scope="module")
def fx(influx_env) -> Iterator[Fixture]:
    run = uuid.uuid4().hex[:10]
    base_cfg = InfluxConfig(
        url=influx_env["INFLUXDB_URL"],
        org=influx_env.get("INFLUXDB_ORG", "plant-ops"),
        token=influx_env["INFLUXDB_TOKEN"],
        timeout_seconds=60,
    )
    cfg = dataclasses.replace(
        base_cfg, bucket=f"grafana-test-{run}", bucket_1m=f"grafana-test-{run}-1m"
    )
    with cfg.client() as client:
        buckets = client.buckets_api()
        created = [
            buckets.create_bucket(
                bucket_name=name,
                org=cfg.org,
                retention_rules=[BucketRetentionRules(type="expire", every_seconds=86_400)],
            )
            for name in (cfg.bucket, cfg.bucket_1m)
        ]
        try:
            now = datetime.now(UTC)
            base = int(now.timestamp()) // 60 * 60
            f = Fixture(client, cfg, f"grafana-{run}", now, base)
            f.partials = _partials(f.plant, base)
            f.events = _events(f.plant, base)
            # Written by the prediction stage's own line format (store.prediction_line).
            f.predictions = [
                ("builtin", "discharge only", 0.70, base - 180.0),
                ("ml-api", "class A", 0.92, base - 120.0),
                ("builtin", "class A", 0.75, base - 60.0),  # newest of its model
            ]
            store = InfluxStore(cfg, Metrics())
            try:
                store.write_readings(_readings(f.plant, base))
                store.write_alarms(f.events)
                store.write_windows(f.partials)
                store.write(
                    cfg.bucket,
                    [
                        prediction_line(
                            Prediction(f.plant, ts, int(ts) // 60 * 60, model, pred, conf, INPUTS)
                        )
                        for model, pred, conf, ts in f.predictions
                    ],
                )
                assert store.rejected_lines == 0
            finally:
                store.close()
            yield f
        finally:
            for b in created:
                buckets.delete_bucket(b)


def _panel(dashboard: dict[str, Any], title_start: str) -> dict[str, Any]:
    (panel,) = [p for p in all_panels(dashboard["panels"]) if p["title"].startswith(title_start)]
    return panel


def _target(panel: dict[str, Any], ref: str) -> str:
    (t,) = [t for t in panel["targets"] if t["refId"] == ref]
    return t["query"]


def _variable(dashboard: dict[str, Any], name: str) -> dict[str, Any]:
    (v,) = [v for v in dashboard["templating"]["list"] if v["name"] == name]
    return v


@pytest.mark.integration
def test_template_variables_list_the_plants_and_their_parameters(fx):
    d = load_dashboard()
    plants = fx.grafana_query(variable_query(_variable(d, "plant")), fx.variables(d))
    assert [r["_value"] for r in plants] == [fx.plant]
    params = fx.grafana_query(variable_query(_variable(d, "parameter")), fx.variables(d))
    assert sorted(r["_value"] for r in params) == sorted(PARAMETERS)


@pytest.mark.integration
def test_every_panel_query_returns_rows(fx):
    """Walks the JSON: each target of each panel (each repeat of a repeated one) is run."""
    d = load_dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    checked = 0
    for panel in all_panels(d["panels"]):
        if panel["type"] == "row":
            continue
        repeats: list[dict[str, str]] = [{}]
        if "repeat" in panel:
            name = panel["repeat"]
            values = fx.grafana_query(variable_query(variables[name]), fx.variables(d))
            repeats = [{name: r["_value"]} for r in values]
            assert repeats, panel["title"]
        for target in panel["targets"]:
            counts = [
                len(fx.grafana_query(target["query"], fx.variables(d, **extra)))
                for extra in repeats
            ]
            assert any(counts), f"{panel['title']} / {target['refId']} returned no rows"
            checked += 1
    assert checked >= 6


@pytest.mark.integration
def test_latest_value_per_parameter_with_quality(fx):
    d = load_dashboard()
    rows = fx.grafana_query(_target(_panel(d, "Latest value"), "A"), fx.variables(d))
    got = {
        r["parameter"]: (r.get("value"), r["unit"], r["quality"], r["sensor_id"], r["location"])
        for r in rows
    }
    assert got == {
        "COD": (612.5, "mg/L", "uncertain", "cod-1", "influent"),
        "TSS": (None, "mg/L", "bad", "tss-1", "clarifier"),
        "pH": (7.2, "pH", "good", "ph-1", "influent"),
    }
    assert [r["parameter"] for r in rows] == ["COD", "TSS", "pH"]
    assert all(r["_time"] <= fx.now for r in rows)


def _expected_windows(
    fx: Fixture, parameter: str, seconds: int
) -> dict[datetime, tuple[float, float, float]]:
    groups: dict[int, list[WindowAggregate]] = {}
    for p in fx.partials:
        if p.parameter == parameter:
            start = p.start // seconds * seconds
            groups.setdefault(start, []).append(dataclasses.replace(p, start=start))
    out = {}
    for start, parts in groups.items():
        w = merge(parts)
        out[datetime.fromtimestamp(start, UTC)] = (w.min, w.avg, w.max)
    return out


@pytest.mark.integration
@pytest.mark.parametrize(
    ("interval", "seconds"),
    [(timedelta(seconds=5), 60), (timedelta(minutes=1), 60), (timedelta(seconds=61), 120)],
)
def test_band_merges_the_partial_windows_of_every_source(fx, interval, seconds):
    """min/avg/max per window equal the processor's own merge of the partials; a wider
    windowPeriod (a longer range) rounds up to whole minutes."""
    d = load_dashboard()
    panel = _panel(d, "${parameter}")
    for parameter in PARAMETERS:
        rows = fx.grafana_query(_target(panel, "A"), fx.variables(d, parameter=parameter), interval)
        assert all(set(r) >= {"_time", "min", "avg", "max"} for r in rows)
        got = {r["_time"]: (r["min"], r["avg"], r["max"]) for r in rows}
        expected = _expected_windows(fx, parameter, seconds)
        assert got.keys() == expected.keys(), parameter
        for t, values in expected.items():
            assert got[t] == pytest.approx(values), (parameter, t)


@pytest.mark.integration
def test_alarm_limits_are_drawn_across_the_range(fx):
    d = load_dashboard()
    query = _target(_panel(d, "${parameter}"), "B")
    start = fx.now - timedelta(hours=1)

    def limits(parameter):
        rows = fx.grafana_query(query, fx.variables(d, parameter=parameter))
        return [{k: v for k, v in r.items() if k.endswith("limit") or k == "_time"} for r in rows]

    assert limits("COD") == [
        {"_time": start, "H limit": 250.0, "HH limit": 500.0},
        {"_time": fx.now, "H limit": 250.0, "HH limit": 500.0},
    ]
    assert limits("pH") == [{"_time": start, "L limit": 6.5}, {"_time": fx.now, "L limit": 6.5}]
    assert limits("TSS") == []  # a probe fault has no limit


@pytest.mark.integration
def test_active_alarms_are_those_not_cleared(fx):
    d = load_dashboard()
    rows = fx.grafana_query(_target(_panel(d, "Active alarms"), "A"), fx.variables(d))
    got = [(r["parameter"], r["condition"], r["level"], r["state"]) for r in rows]
    assert sorted(got) == [
        ("COD", "H", "warning", "raised"),
        ("COD", "HH", "critical", "raised"),
        ("TSS", "probe_fault", "warning", "raised"),
    ]
    assert rows[0]["_time"] >= rows[-1]["_time"]  # newest first
    cod_hh = next(r for r in rows if r["condition"] == "HH")
    assert (cod_hh["value"], cod_hh["threshold"], cod_hh["sensor_id"]) == (612.5, 500.0, "cod-1")
    assert cod_hh["message"] == "COD HH raised"
    fault = next(r for r in rows if r["condition"] == "probe_fault")
    assert (fault["value"], fault["threshold"]) == (None, None)


@pytest.mark.integration
def test_alarm_events_newest_first(fx):
    d = load_dashboard()
    rows = fx.grafana_query(_target(_panel(d, "Alarm events"), "A"), fx.variables(d))
    expected = sorted(fx.events, key=lambda e: e.timestamp, reverse=True)
    assert [(r["parameter"], r["condition"], r["state"]) for r in rows] == [
        (e.parameter, e.condition, e.state) for e in expected
    ]
    assert set(rows[0]) >= {"_time", "level", "sensor_id", "value", "threshold", "message"}


@pytest.mark.integration
def test_last_prediction_per_model(fx):
    d = load_dashboard()
    rows = fx.grafana_query(_target(_panel(d, "Last prediction"), "A"), fx.variables(d))
    got = [(r["model"], r["prediction"], r["confidence"], r["_time"].timestamp()) for r in rows]
    assert got == [
        ("builtin", "class A", 0.75, fx.base - 60.0),
        ("ml-api", "class A", 0.92, fx.base - 120.0),
    ]
