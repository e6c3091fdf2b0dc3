"""InfluxDB stopped for 30 s while readings flow: the processor pauses, reports it on /health, and
afterwards every reading is stored exactly once and every 1-minute aggregate is complete.

Stops and restarts the shared test InfluxDB (scripts/services down/up influxdb).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.support.net import free_port
from tests.support.processor_harness import (
    ROOT,
    Processor,
    assert_windows_match_raw,
    ensure_buckets,
    influx_config,
    make_dataset,
    produce,
    raw_points,
    wait_until_done,
)

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.timeout(300)]

OUTAGE_SECONDS = 30


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _services(action: str) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "services"), action, "influxdb"],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=120,
    )


def test_influxdb_down_30s_mid_run_every_reading_stored_exactly_once(
    kafka_env, influx_env, tmp_path
):
    services = {**kafka_env, **influx_env}
    ensure_buckets(services)
    data = make_dataset(seed=3)
    port = free_port()
    proc = Processor(data, services, services, tmp_path, http_port=port)
    proc.start()
    seen_during_outage: list[tuple[int, dict]] = []
    outage = threading.Event()

    def run_outage() -> None:
        _services("down")
        try:
            deadline = time.monotonic() + OUTAGE_SECONDS
            time.sleep(OUTAGE_SECONDS / 2)
            status, body = _get(f"http://127.0.0.1:{port}/health")
            seen_during_outage.append((status, json.loads(body)))
            time.sleep(max(0.0, deadline - time.monotonic()))
        finally:
            _services("up")

    outage_thread = threading.Thread(target=run_outage)

    def start_outage(fraction: float) -> None:
        if fraction >= 0.3 and not outage.is_set():
            outage.set()
            outage_thread.start()

    try:
        time.sleep(3)
        produce(services, data, seconds=20, on_progress=start_outage)
        outage_thread.join()
        cfg = influx_config(services)
        with cfg.client() as client:
            wait_until_done(client, cfg, data, proc, timeout=150)
            assert len(raw_points(client, cfg, data)) == data.stored_expected
            assert_windows_match_raw(client, cfg, data)
        status, body = _get(f"http://127.0.0.1:{port}/health")
        assert status == 200, body
        _, metrics = _get(f"http://127.0.0.1:{port}/metrics")
    finally:
        proc.stop_all()
        proc.delete_topics()

    ((status, health),) = seen_during_outage
    assert status == 503
    assert health["checks"]["influxdb"]["status"] == "unhealthy"
    assert health["checks"]["kafka"]["status"] == "healthy"
    failures = [
        ln for ln in metrics.splitlines() if ln.startswith("iot_influxdb_write_failures_total ")
    ]
    assert failures and float(failures[0].split()[1]) > 0
