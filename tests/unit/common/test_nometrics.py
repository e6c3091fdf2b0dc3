"""The ingest workers' metrics: a no-op, and no prometheus_client in a worker's imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.common.nometrics import no_metrics

UNUSED = ("prometheus_client", "sqlite3", "influxdb_client", "typer", "confluent_kafka")


def test_every_metric_takes_every_call_and_does_nothing() -> None:
    m = no_metrics()
    m.rejected_payloads.labels("mqtt", "json").inc()
    m.active_connections.inc()
    m.active_connections.dec()
    m.buffer_size.labels("p").set(3)
    m.processing_latency.labels(stage="parse").observe(0.1)


@pytest.mark.parametrize(
    ("module", "unused"),
    [
        ("gateway.edge.acquire.mqtt.workers", (*UNUSED, "aiohttp")),
        ("gateway.edge.acquire.http_workers", UNUSED),
    ],
)
def test_a_worker_imports_nothing_it_does_not_use(module: str, unused: tuple[str, ...]) -> None:
    """A worker is ``python -m <module>``: what the module imports, every worker carries (RSS)."""
    code = f"import sys, {module}\nprint(' '.join(m for m in {unused!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
