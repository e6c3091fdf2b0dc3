"""``[http] ingest_workers = 2``: worker processes share the gateway's HTTP port; a reading
POSTed through one is answered 202 only once it is in the gateway's buffer, other requests are
answered by the gateway's own server, and a worker killed mid-way is started again."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.common.http import HttpConfig, HttpServer
from gateway.common.metrics import Metrics
from gateway.edge.acquire.http import HttpIngest
from gateway.edge.acquire.http_workers import HttpWorkers
from gateway.edge.buffer import Buffer, BufferConfig
from gateway.edge.intake import Intake
from tests.integration.test_serve import TOKEN
from tests.integration.test_serve import request as serve_request
from tests.support.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GOOD = {"sensorId": "ph-1", "plantId": "north", "parameter": "pH", "value": 7.2, "unit": "pH"}


class Gateway:
    """The gateway's HTTP side as the daemon wires it: server, ingest into a real buffer, and
    two ingest workers on the same port relaying the rest over a unix socket."""

    def __init__(self, tmp: Path) -> None:
        self.buffer = Buffer(BufferConfig(path=str(tmp / "b.db")), "gw-w", Metrics())
        self.buffer.start()
        config = HttpConfig(port=0, token="", ingest_workers=2, commit_timeout_s=5.0)
        self.server = HttpServer(config, self.buffer.metrics)
        sink = Intake(self.buffer.submit, self.buffer.metrics).sink_for("http")
        ingest = HttpIngest(
            config, sink, self.buffer.metrics, "default", TOKEN, receipts=self.buffer
        )
        ingest.attach(self.server)
        self.through_workers = 0  # commits handed in by a worker's batch
        commit = ingest.commit

        def counting(*args: Any) -> None:
            if threading.current_thread().name.startswith("http-worker"):
                self.through_workers += 1
            commit(*args)

        ingest.commit = counting  # type: ignore[method-assign]
        self.server.reuse_port = True
        self.server.unix_path = str(tmp / "http.sock")
        self.server.add_check("buffer", self.buffer.health)
        self.server.start()
        self.workers = HttpWorkers(config, ingest, self.buffer.metrics, TOKEN)
        self.workers.start(self.server.port, self.server.unix_path)

    def stop(self) -> None:
        try:
            self.workers.stop()
        finally:
            self.server.stop()
            self.buffer.stop()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(tmp_path)
    try:
        wait_until(lambda: gw.workers.health()[0], 30, "both workers serving")
        yield gw
    finally:
        gw.stop()


def request(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any, Any]:
    """On a new connection each time: the kernel spreads them over the gateway and workers."""
    return serve_request(SimpleNamespace(port=port), method, path, body)  # type: ignore[arg-type]


def values(buffer: Buffer) -> list[float]:
    return sorted(json.loads(r.payload)["value"] for r in buffer.fetch(10_000))


def test_a_reading_through_a_worker_is_answered_202_once_it_is_in_the_buffer(gateway):
    port = gateway.server.port
    for i in range(40):
        status, doc, _ = request(port, "POST", "/api/readings", {**GOOD, "value": float(i)})
        assert (status, doc) == (202, {"accepted": 1})
        assert float(i) in values(gateway.buffer)  # committed before the 202
    assert gateway.through_workers > 0  # 40 connections did not all land on the gateway

    item = {**GOOD, "gatewayId": "dev-1", "seq": 5, "value": 99.0}
    answers = [request(port, "POST", "/api/readings", item) for _ in range(6)]
    assert [a[0] for a in answers] == [202] * 6
    assert sum(a[1].get("duplicates", 0) for a in answers) == 5  # recalled in the gateway
    assert values(gateway.buffer).count(99.0) == 1

    statuses = {request(port, "POST", "/api/readings", {"sensorId": "x"})[0] for _ in range(12)}
    assert statuses == {400}
    # A worker answers 400 at once and tells the gateway of the rejection on its next batch:
    # the gateway's /metrics counts all twelve within moments, not necessarily at the answer.
    counted = 'iot_rejected_payloads_total{reason="missing_field",source="http"} 12.0'
    wait_until(lambda: counted in request(port, "GET", "/metrics")[1], 10, "12 rejections counted")


def test_other_requests_are_answered_by_the_gateways_own_server(gateway):
    port = gateway.server.port
    for _ in range(12):
        status, doc, headers = request(port, "GET", "/health")
        assert status == 200 and set(doc["checks"]) == {"buffer"}
        assert headers["Content-Type"] == "application/json"
        status, doc, _ = request(port, "GET", "/nowhere")
        assert status == 404 and "/nowhere" in doc["error"]


def test_a_worker_killed_mid_way_is_started_again_and_ingest_goes_on(gateway):
    port = gateway.server.port
    pids = gateway.workers.pids()
    stop = threading.Event()
    answers: list[int] = []

    def post() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                answers.append(request(port, "POST", "/api/readings", {**GOOD, "value": i})[0])
            except (OSError, http.client.HTTPException):
                answers.append(0)  # its connection died with the worker: a device retries

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(answers) > 50, 30, "requests under way")
        os.kill(pids[0], signal.SIGKILL)
        wait_until(
            lambda: gateway.workers.pids()[0] != pids[0] and gateway.workers.health()[0],
            30,
            "the killed worker started again",
        )
        before = len(answers)
        wait_until(lambda: len(answers) > before + 50, 30, "requests after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(answers) <= {202, 0} and answers.count(202) > 100
    status, _, _ = request(port, "POST", "/api/readings", {**GOOD, "value": -1.0})
    assert status == 202 and -1.0 in values(gateway.buffer)
