"""The test InfluxDB is a real 2.7 server: points written with the client come back through Flux."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS

pytestmark = pytest.mark.integration


@pytest.fixture
def influx(influx_env):
    client = InfluxDBClient(
        url=influx_env["INFLUXDB_URL"],
        token=influx_env["INFLUXDB_TOKEN"],
        org=influx_env.get("INFLUXDB_ORG", "plant-ops"),
        timeout=30_000,
    )
    try:
        yield client, influx_env.get("INFLUXDB_BUCKET", "sensors")
    finally:
        client.close()


def test_server_is_2x_and_healthy(influx):
    client, _ = influx
    assert client.ping()
    assert client.version().lstrip("v").startswith("2.")


def test_write_then_flux_query_round_trip(influx):
    client, bucket = influx
    run = uuid.uuid4().hex[:12]
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    readings = {"pH": [7.01, 7.05, 6.98], "COD": [120.5, 118.0, 121.25]}
    points = [
        Point("water_quality_test")
        .tag("run", run)
        .tag("plantId", "default")
        .tag("parameter", parameter)
        .field("value", value)
        .field("seq", i)
        .time(t0 + timedelta(seconds=i), WritePrecision.S)
        for parameter, values in readings.items()
        for i, value in enumerate(values)
    ]
    client.write_api(write_options=SYNCHRONOUS).write(bucket=bucket, record=points)

    flux = f"""
from(bucket: "{bucket}")
  |> range(start: -1h)
  |> filter(fn: (r) => r._measurement == "water_quality_test" and r.run == "{run}")
  |> filter(fn: (r) => r._field == "value")
  |> sort(columns: ["_time"])
"""
    got: dict[str, list[tuple[datetime, float]]] = {}
    for table in client.query_api().query(flux):
        for rec in table.records:
            got.setdefault(rec.values["parameter"], []).append((rec.get_time(), rec.get_value()))

    assert {p: [v for _, v in rows] for p, rows in got.items()} == readings
    assert [t for t, _ in got["pH"]] == [t0 + timedelta(seconds=i) for i in range(3)]

    mean = f"""
from(bucket: "{bucket}")
  |> range(start: -1h)
  |> filter(fn: (r) => r._measurement == "water_quality_test" and r.run == "{run}")
  |> filter(fn: (r) => r._field == "value" and r.parameter == "COD")
  |> mean()
"""
    tables = client.query_api().query(mean)
    assert len(tables) == 1
    assert tables[0].records[0].get_value() == pytest.approx(sum(readings["COD"]) / 3)
