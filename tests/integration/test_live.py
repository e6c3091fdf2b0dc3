"""The live feed over real sockets: ``/ws`` with aiohttp's client.

In-process against the HTTP server and the hub (snapshot, plant filter, predictions, token), and
end to end against the processor run as ``python -m gateway processor run`` on the real Kafka and
InfluxDB (an alert within a second, a client that never reads is dropped while another keeps
receiving).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

from gateway.common.alarms import AlarmConfig, AlarmEngine
from gateway.common.http import HttpConfig, HttpServer
from gateway.common.metrics import Metrics
from gateway.common.model import Reading
from gateway.processor.aggregate import WindowAggregate, window_start
from gateway.processor.live import LiveHub
from tests.support.net import free_port
from tests.support.processor_harness import Processor, RawProducer, live_processor
from tests.support.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TOKEN = "live-s3cret"


@pytest.fixture
def hub() -> Iterator[tuple[LiveHub, HttpServer]]:
    metrics = Metrics()
    server = HttpServer(HttpConfig(port=0), metrics)
    live = LiveHub(AlarmConfig(), metrics, token=TOKEN.encode())
    live.attach(server)
    server.start()
    yield live, server
    server.stop()


def _url(server: HttpServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def _next(
    ws: aiohttp.ClientWebSocketResponse,
    kind: str,
    timeout: float = 5.0,
    where: Callable[[dict[str, Any]], bool] = lambda _: True,
) -> Any:
    """The next message of this type that matches ``where`` (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        doc = json.loads(msg.data)
        if doc["type"] == kind and where(doc):
            return doc


def _reading(plant: str, value: float, ts: float, sensor: str = "bod-1") -> Reading:
    return Reading(sensor, "BOD", value, "mg/L", ts, plant_id=plant, gateway_id="gw-1", seq=1)


def test_snapshot_then_alerts_windows_status_and_predictions_for_the_plant_asked(hub):
    live, server = hub
    engine = AlarmEngine(AlarmConfig())
    now = time.time()
    start = window_start(now) - 60
    first = _reading("north", 150.0, now - 2)
    window = WindowAggregate.first(first, start, "sensors.raw.north/0", 60)
    live.on_batch([first], engine.evaluate(first), [window])
    live.publish("north", {"prediction": "irrigation", "confidence": 0.8, "model": "builtin"})

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            url = _url(server, "/ws?plant=north")
            async with session.ws_connect(url, headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
                snap = await _next(ws, "snapshot")
                assert snap["plants"] == ["north"]
                gauge = server.metrics.registry.get_sample_value("iot_active_connections")
                assert gauge == 1
                assert sorted(a["condition"] for a in snap["alarms"]) == ["H", "HH"]
                assert [(a["parameter"], a["windowStart"]) for a in snap["aggregates"]] == [
                    ("BOD", start)
                ]
                assert snap["predictions"][0]["prediction"] == "irrigation"
                (status,) = snap["status"]
                assert status["sensors"][0]["value"] == 150.0
                assert status["gateways"][0]["gatewayId"] == "gw-1"

                # Other plants' news never reaches a client that asked for one plant.
                south = _reading("south", 160.0, now - 1)
                live.on_batch([south], engine.evaluate(south), [])
                back = _reading("north", 10.0, now - 1)
                live.on_batch([back], engine.evaluate(back), [])
                cleared = [await _next(ws, "alert"), await _next(ws, "alert")]
                assert {(a["plantId"], a["state"]) for a in cleared} == {("north", "cleared")}
                await _next(ws, "status", where=lambda s: s["sensors"][0]["value"] == 10.0)

                second = WindowAggregate.first(back, start, "sensors.raw.north/1", 60)
                live.on_batch([], [], [second])
                merged = await _next(ws, "aggregate")
                assert (merged["count"], merged["min"], merged["max"]) == (2, 10.0, 150.0)

                live.publish("north", {"prediction": "discharge", "confidence": 0.6})
                assert (await _next(ws, "prediction"))["prediction"] == "discharge"

    asyncio.run(scenario())
    clients = server.metrics.registry.get_sample_value
    wait_until(lambda: clients("iot_active_connections") == 0, 5, "the server to see the close")


def test_the_feed_and_its_api_need_the_token_but_the_page_does_not(hub):
    _, server = hub

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(_url(server, "/ws"))
            assert refused.value.status == 401
            async with session.ws_connect(_url(server, f"/ws?token={TOKEN}")) as ws:
                assert (await _next(ws, "snapshot"))["plants"] == []
            for path in ("/api/limits", "/api/history?plant=north"):
                async with session.get(_url(server, path)) as r:
                    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
                sep = "&" if "?" in path else "?"
                async with session.get(_url(server, f"{path}{sep}token={TOKEN}")) as r:
                    assert r.status == 200, await r.text()
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with session.get(_url(server, "/api/limits?plant=north"), headers=auth) as r:
                limits = (await r.json())["limits"]
            assert limits["BOD"] == {"high_warning": 30.0, "high_critical": 100.0}
            assert limits["pH"]["low_critical"] == 6.0
            async with session.get(_url(server, "/api/history?plant=x%22y"), headers=auth) as r:
                assert r.status == 400
            async with session.get(_url(server, "/")) as r:
                page = await r.text()
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
                assert "default-src 'self'" in r.headers["Content-Security-Policy"]
            assert 'src="vendor/uplot/uPlot.iife.min.js"' in page
            async with session.get(_url(server, "/vendor/uplot/uPlot.iife.min.js")) as r:
                assert r.status == 200 and "javascript" in r.headers["Content-Type"]
                etag = r.headers["ETag"]
            headers = {"If-None-Match": etag}
            async with session.get(
                _url(server, "/vendor/uplot/uPlot.iife.min.js"), headers=headers
            ) as r:
                assert r.status == 304
            async with session.get(_url(server, "/../pyproject.toml")) as r:
                assert r.status == 404

    asyncio.run(scenario())


# --- end to end against the processor --------------------------------------------------------


@pytest.fixture
def processor(servers, tmp_path) -> Iterator[tuple[Processor, str]]:
    with live_processor(servers, tmp_path, "north") as serving:
        yield serving


async def _warm_up(ws: aiohttp.ClientWebSocketResponse, kafka: RawProducer, plant: str) -> None:
    """Until the processor has the plant's topic: a reading comes back as status."""
    await _next(ws, "snapshot")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        await asyncio.to_thread(kafka.send, [_reading(plant, 10.0, time.time())])
        try:
            await _next(ws, "status", timeout=3.0)
            return
        except TimeoutError:
            continue
    raise AssertionError("the processor never consumed the plant's topic")


def test_an_alert_reaches_a_websocket_client_within_a_second(processor, servers):
    proc, base = processor
    plant = proc.data.plants[0]
    kafka = RawProducer(servers)
    latencies: list[float] = []

    async def scenario() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{base}/ws?plant={plant}") as ws,
        ):
            await _warm_up(ws, kafka, plant)
            for value in (150.0, 10.0, 140.0, 12.0, 130.0):  # raised, cleared, raised, ...
                t0 = time.monotonic()
                await asyncio.to_thread(kafka.send, [_reading(plant, value, time.time())])
                alert = await _next(ws, "alert", timeout=5.0)
                latencies.append(time.monotonic() - t0)
                assert alert["value"] == value and alert["plantId"] == plant
                while True:  # the second condition's event (H with HH), if any
                    try:
                        await _next(ws, "alert", timeout=0.3)
                    except TimeoutError:
                        break

    asyncio.run(scenario())
    print(f"produce-to-WebSocket alert latency: {[round(t * 1000) for t in latencies]} ms")
    assert max(latencies) < 1.0, latencies


def test_a_client_that_never_reads_is_dropped_while_another_keeps_receiving(processor, servers):
    proc, base = processor
    plant = proc.data.plants[0]
    kafka = RawProducer(servers)
    # Each pair raises H and HH, then clears both: 32,000 alert messages of ~400 bytes, more than
    # the 8 MiB a client may fall behind.
    pairs = 8000

    async def scenario() -> tuple[int, str]:
        async with aiohttp.ClientSession() as session:
            reader = await session.ws_connect(f"{base}/ws?plant={plant}")
            stalled = await session.ws_connect(f"{base}/ws?plant={plant}")
            await _warm_up(reader, kafka, plant)
            got = 0
            last_value = None

            async def read() -> None:
                nonlocal got, last_value
                async for msg in reader:
                    doc = json.loads(msg.data)
                    if doc["type"] == "alert":
                        got += 1
                        last_value = doc["value"]

            reading = asyncio.create_task(read())
            t = time.time()
            for chunk in range(0, pairs, 100):
                batch = []
                for i in range(chunk, chunk + 100):
                    batch.append(_reading(plant, 150.0 + i % 7, t + 2 * i * 0.001))
                    batch.append(_reading(plant, 10.0, t + (2 * i + 1) * 0.001))
                await asyncio.to_thread(kafka.send, batch)
                await asyncio.sleep(0.02)
            deadline = time.monotonic() + 60
            while got < 4 * pairs and time.monotonic() < deadline and not reading.done():
                await asyncio.sleep(0.1)
            # The stalled client was cut off; what it had buffered ends with the close.
            messages, close = 0, ""
            while True:
                msg = await stalled.receive(timeout=30)
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    close = f"{msg.type.name} {msg.data} {msg.extra}"
                    break
                messages += 1
            assert last_value == 10.0
            await reader.close()
            await stalled.close()
            return got, close

    got, close = asyncio.run(scenario())
    assert got == 4 * pairs  # every alert reached the client that reads
    assert "1013" in close and "too slow" in close, close
    assert "dropped: too slow" in proc.logs()


def test_with_two_instances_each_feed_tells_of_every_sensor(processor, servers):
    """Instance B owns some of the plant's partitions: a client of instance A still hears of
    their alarms, through the alerts topic every instance follows."""
    proc, base = processor
    plant = proc.data.plants[0]
    kafka = RawProducer(servers)
    sensors = [f"bod-{i}" for i in range(24)]  # keyed by sensor: spread over the partitions

    def b_owns_some() -> bool:
        log = proc.workdir / "processor-1.log"
        return log.exists() and f"assigned sensors.raw.{plant}[" in log.read_text()

    async def scenario() -> list[float]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{base}/ws?plant={plant}") as ws,
        ):
            await _warm_up(ws, kafka, plant)
            proc.start(http_port=free_port())
            await asyncio.to_thread(wait_until, b_owns_some, 60, "instance B to own a partition")
            took = []
            for value, state in ((150.0, "raised"), (10.0, "cleared")):
                t0 = time.monotonic()
                readings = [_reading(plant, value, time.time(), s) for s in sensors]
                await asyncio.to_thread(kafka.send, readings)
                heard: set[str] = set()
                while heard != set(sensors):
                    alert = await _next(ws, "alert", timeout=20)
                    if alert["state"] == state:
                        heard.add(alert["sensorId"])
                took.append(time.monotonic() - t0)
            return took

    took = asyncio.run(scenario())
    print(f"alerts of all sensors from both instances: {[round(t * 1000) for t in took]} ms")
    assert "revoked" in (proc.workdir / "processor-0.log").read_text()  # A gave partitions up
