"""The gateway's HTTP server over real sockets, with a real disk buffer behind ingest."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gateway.common.http import HttpConfig, HttpServer, Route
from gateway.common.metrics import Metrics
from gateway.common.model import AlarmEvent, Reading, Record
from gateway.edge.acquire.http import HttpIngest
from gateway.edge.buffer import Buffer, BufferConfig
from gateway.edge.intake import Intake, Process
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token"
GOOD = {
    "sensorId": "ph-1", "plantId": "north", "parameter": "pH", "value": 7.2, "unit": "pH",
    "timestamp": "2026-11-28T06:00:00.000Z", "location": "inlet",
}  # fmt: skip


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[Buffer]:
    buf = Buffer(BufferConfig(path=str(tmp_path / "b.db"), max_rows=50), "gw-http", Metrics())
    buf.start()
    yield buf
    buf.stop()


def make_server(
    buffer: Buffer,
    monkeypatch: pytest.MonkeyPatch,
    process: Process | None = None,
    token: str = "env:GATEWAY_TEST_TOKEN",
    **kw: Any,
) -> HttpServer:
    """The gateway's HTTP server with ingest through the one sink into a real buffer."""
    monkeypatch.setenv("GATEWAY_TEST_TOKEN", TOKEN)
    config = HttpConfig(**{"port": 0, "token": token, "max_body_bytes": 4096, **kw})
    server = HttpServer(config, buffer.metrics)
    sink = Intake(buffer.submit, buffer.metrics, process).sink_for("http")
    HttpIngest(config, sink, buffer.metrics, plant_id="default", receipts=buffer).attach(server)
    server.start()
    return server


@pytest.fixture
def server(buffer: Buffer, monkeypatch: pytest.MonkeyPatch) -> Iterator[HttpServer]:
    srv = make_server(buffer, monkeypatch, commit_timeout_s=1.0)
    yield srv
    srv.stop()


def request(
    server: HttpServer, method: str, path: str, body: Any = None, token: str | None = TOKEN
) -> tuple[int, Any, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    doc = json.loads(raw) if ctype.startswith("application/json") else raw.decode()
    return resp.status, doc, dict(resp.getheaders())


def test_one_reading_or_an_array_is_accepted_only_once_committed(server, buffer):
    status, doc, _ = request(server, "POST", "/api/readings", GOOD)
    assert (status, doc) == (202, {"accepted": 1})
    assert len(buffer.fetch(100)) == 1  # already committed when 202 came back

    batch = [{**GOOD, "value": v} for v in (6.9, 7.0, 7.1)]
    status, doc, _ = request(server, "POST", "/api/readings", batch)
    assert (status, doc) == (202, {"accepted": 3})
    rows = buffer.fetch(100)
    values = [json.loads(r.payload)["value"] for r in rows]
    assert values == [7.2, 6.9, 7.0, 7.1]
    assert {json.loads(r.payload)["gatewayId"] for r in rows} == {"gw-http"}


def test_readings_go_through_the_pipeline_before_the_buffer(buffer, monkeypatch):
    def pipeline(readings: Sequence[Reading]) -> list[Record]:
        out: list[Record] = []
        for r in readings:
            alarm = AlarmEvent(
                alarm_id="a", event_id="e", sensor_id=r.sensor_id, plant_id=r.plant_id,
                parameter=r.parameter, condition="H", level="warning", state="raised",
                value=r.value, threshold=7.0, timestamp=r.timestamp, message="high",
            )  # fmt: skip
            out += [r, alarm]
        return out

    srv = make_server(buffer, monkeypatch, process=pipeline)
    try:
        status, _, _ = request(srv, "POST", "/api/readings", GOOD)
    finally:
        srv.stop()
    assert status == 202
    assert [r.kind for r in buffer.fetch(10)] == ["reading", "alarm"]


def test_invalid_items_are_refused_with_reasons_per_index_and_nothing_stored(server, buffer):
    body = [GOOD, {**GOOD, "value": "high"}, {"sensorId": "x"}, [1, 2]]
    status, doc, _ = request(server, "POST", "/api/readings", body)
    assert status == 400
    assert [(e["index"], e["reason"]) for e in doc["invalid"]] == [
        (1, "wrong_type"),
        (2, "missing_field"),
        (3, "not_an_object"),
    ]
    assert buffer.fetch(10) == []
    rejected = buffer.metrics.registry.get_sample_value(
        "iot_rejected_payloads_total", {"source": "http", "reason": "wrong_type"}
    )
    assert rejected == 1

    status, doc, _ = request(server, "POST", "/api/readings", b"{not json")
    assert status == 400 and doc["error"] == "body is not JSON"
    status, doc, _ = request(server, "POST", "/api/readings", [])
    assert status == 400


def test_fields_too_long_or_with_control_characters_are_refused_by_index_and_field(
    buffer, monkeypatch
):
    # The reported case: a 1 MB location fits the default 1 MiB body limit; it was answered 202
    # and Kafka then refused the row for ever. A newline in a tag would lose the point in InfluxDB.
    srv = make_server(buffer, monkeypatch, max_body_bytes=1_048_576)
    body = [
        GOOD,
        {**GOOD, "location": "x" * 1_000_000},
        {**GOOD, "sensorId": "ph\n1"},
        {**GOOD, "location": "inlet\nchannel 2"},
    ]
    try:
        status, doc, _ = request(srv, "POST", "/api/readings", body)
        one_status, one_doc, _ = request(srv, "POST", "/api/readings", body[2])
    finally:
        srv.stop()
    assert status == 400, doc
    assert [(e["index"], e["field"], e["reason"]) for e in doc["invalid"]] == [
        (1, "location", "field_too_long"),
        (2, "sensorId", "bad_characters"),
        (3, "location", "bad_characters"),
    ]
    assert "at most 256" in doc["invalid"][0]["detail"]
    assert one_status == 400 and one_doc["invalid"][0]["field"] == "sensorId"
    assert buffer.fetch(10) == []


def test_a_body_above_the_limit_is_refused_unread(server, buffer):
    big = [{**GOOD, "location": "x" * 100} for _ in range(40)]  # > 4096 bytes
    status, doc, headers = request(server, "POST", "/api/readings", big)
    assert status == 413 and "4096" in doc["error"]
    assert headers.get("Connection") == "close"
    assert buffer.fetch(10) == []


@pytest.mark.parametrize("token", [None, "wrong-token", ""])
def test_ingest_needs_the_bearer_token(server, buffer, token):
    status, _, headers = request(server, "POST", "/api/readings", GOOD, token=token)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert buffer.fetch(10) == []


def test_ingest_is_off_without_a_configured_token(buffer, monkeypatch):
    srv = make_server(buffer, monkeypatch, token="")
    try:
        status, doc, _ = request(srv, "POST", "/api/readings", GOOD, token="")
    finally:
        srv.stop()
    assert status == 403 and "token" in doc["error"]


def test_a_full_buffer_answers_503_instead_of_hanging(server, buffer):
    buffer.submit_wait([Reading("ph-1", "pH", 7.0, "pH", 1.79e9) for _ in range(50)], 10)
    status, doc, headers = request(server, "POST", "/api/readings", GOOD)
    assert status == 503 and headers["Retry-After"] and "retry" in doc["error"]


def test_a_retry_after_a_503_is_stored_once_when_the_reading_carries_the_devices_seq(
    server, buffer
):
    """A 503 means "not committed yet", not "not stored": the reading stays queued and may be
    committed later. The device retries; its own id and seq make the retry recognisable."""
    filler = [Reading("fill", "pH", 7.0, "pH", 1.79e9 + i) for i in range(50)]
    buffer.submit_wait(filler, 10)  # the buffer is full (max_rows 50): commits wait for room
    item = {**GOOD, "gatewayId": "dev-7", "seq": 41}
    other = {**GOOD, "gatewayId": "dev-7", "seq": 42, "value": 7.3}
    no_seq = {**GOOD, "value": 6.5}  # nothing to recognise a retry by: stored each time

    assert request(server, "POST", "/api/readings", [item, no_seq])[0] == 503
    assert request(server, "POST", "/api/readings", [item, no_seq])[0] == 503  # retried too soon
    buffer.delete([r.id for r in all_rows(buffer) if r.key == "fill"], wait=True)
    status, doc, _ = request(server, "POST", "/api/readings", [item, other])  # the next retry
    assert status == 202 and doc["accepted"] == 2

    rows = [json.loads(r.payload) for r in all_rows(buffer)]
    assert sorted(r["value"] for r in rows) == [6.5, 6.5, 7.2, 7.3]


def test_requests_answered_together_store_a_repeated_seq_once_and_each_other_reading(
    server, buffer
):
    """Requests that arrive together go to the buffer in one call: a device's retry among them
    is still recognised by its seq, and every other reading is stored."""
    item = {**GOOD, "gatewayId": "dev-9", "seq": 7}
    bodies = [item] * 8 + [{**GOOD, "value": 6.0 + i / 10} for i in range(8)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda b: request(server, "POST", "/api/readings", b), bodies))
    assert [a[0] for a in answers] == [202] * 16
    assert sum(a[1].get("duplicates", 0) for a in answers[:8]) == 7
    values = sorted(json.loads(r.payload)["value"] for r in all_rows(buffer))
    assert values == sorted([7.2] + [6.0 + i / 10 for i in range(8)])


def all_rows(buffer: Buffer) -> list[Any]:
    return buffer.fetch(1000)


def test_health_is_200_only_when_every_check_is_healthy(server):
    state = {"kafka": True}
    server.add_check("buffer", lambda: (True, {"rows": 0}))
    server.add_check("kafka", lambda: (state["kafka"], {} if state["kafka"] else {"error": "down"}))
    status, doc, _ = request(server, "GET", "/health", token=None)
    assert status == 200 and doc["status"] == "healthy"
    assert doc["checks"]["buffer"] == {"status": "healthy", "rows": 0}
    assert doc["timestamp"].endswith("Z")

    state["kafka"] = False
    status, doc, _ = request(server, "GET", "/health", token=None)
    assert status == 503 and doc["status"] == "unhealthy"
    assert doc["checks"]["kafka"] == {"status": "unhealthy", "error": "down"}

    def broken() -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("boom")

    state["kafka"] = True
    server.add_check("serial", broken)
    status, doc, _ = request(server, "GET", "/health", token=None)
    assert status == 503 and "boom" in doc["checks"]["serial"]["error"]


def test_metrics_are_exposed_for_prometheus(server, buffer):
    request(server, "POST", "/api/readings", GOOD)
    status, text, headers = request(server, "GET", "/metrics", token=None)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'iot_messages_received_total{plant_id="north",source="http"} 1.0' in text
    assert "iot_buffer_bytes" in text


# --- the server's generic rules, with routes of the test's own ----------------------------------


@pytest.fixture
def bare() -> Iterator[HttpServer]:
    srv = HttpServer(HttpConfig(port=0, workers=2, max_requests=3), Metrics())
    srv.start()
    yield srv
    srv.stop()


def test_a_body_without_content_length_is_refused_with_411(bare):
    bare.add_route("/echo", Route(lambda body: (200, {"n": len(body)}), max_body_bytes=100))
    conn = http.client.HTTPConnection("127.0.0.1", bare.port, timeout=10)
    conn.request("POST", "/echo", body=iter([b"{}", b"[]"]), encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 411 and resp.getheader("Connection") == "close"
    conn.close()
    assert request(bare, "POST", "/echo", b"abc")[:2] == (200, {"n": 3})


def test_a_handler_that_raises_answers_500_and_the_server_carries_on(bare):
    def boom(body: bytes) -> Any:
        raise RuntimeError("handler bug")

    bare.add_route("/boom", Route(boom, max_body_bytes=100))
    status, doc, _ = request(bare, "POST", "/boom", b"{}")
    assert status == 500 and "internal error" in doc["error"]
    assert request(bare, "GET", "/health", token=None)[0] == 200


def test_blocking_handlers_never_hold_up_monitoring_and_excess_requests_get_503(bare):
    """Two workers, three requests in progress at most: two handlers block the workers, a third
    waits for one; /health still answers (its own threads), a fourth request is refused."""
    release = threading.Event()
    bare.add_route("/slow", Route(lambda _: (200, {"ok": release.wait(30)}), max_body_bytes=10))
    slow = [ThreadPoolExecutor(3).submit(request, bare, "POST", "/slow", b"x") for _ in range(2)]
    wait_until(lambda: bare.in_flight == 2, 10, "two slow requests in progress")
    t0 = time.monotonic()
    assert request(bare, "GET", "/health", token=None)[0] == 200
    assert time.monotonic() - t0 < 5
    slow.append(ThreadPoolExecutor(1).submit(request, bare, "POST", "/slow", b"x"))
    wait_until(lambda: bare.in_flight == 3, 10, "three requests in progress")
    status, _, headers = request(bare, "GET", "/metrics", token=None)
    assert status == 503 and headers["Retry-After"] == "5"
    release.set()
    assert [f.result(10)[:2] for f in slow] == [(200, {"ok": True})] * 3
    assert request(bare, "GET", "/metrics", token=None)[0] == 200


def test_a_port_in_use_fails_at_start(bare):
    taken = HttpServer(HttpConfig(port=bare.port), Metrics())
    with pytest.raises(OSError):
        taken.start()
