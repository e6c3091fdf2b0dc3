"""Fixtures shared by every test: the real servers and pseudo-terminal pairs.

Integration tests talk to real Kafka, Mosquitto and InfluxDB on 127.0.0.1, started by
``scripts/services up`` (which ``scripts/test`` runs first). When a test needs a server whose
variables are missing from ``var/services.env``, the fixture starts it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.support.services import ensure_services

# Timing-based health checks fail spuriously on a loaded 2-core machine; correctness checks stay.
settings.register_profile(
    "gateway", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=200
)
settings.load_profile("gateway")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="also run the long soak and chaos tests")
    parser.addoption(
        "--minutes",
        type=float,
        default=None,
        help="how long the chaos run kills components (default 2; 20 with --soak)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="long soak/chaos run: pass --soak to run it")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def services() -> dict[str, str]:
    """Variables of every real server, started if needed."""
    return ensure_services("mosquitto", "kafka", "influxdb")


@pytest.fixture(scope="session")
def mqtt_env() -> dict[str, str]:
    return ensure_services("mosquitto")


@pytest.fixture(scope="session")
def kafka_env() -> dict[str, str]:
    return ensure_services("kafka")


@pytest.fixture(scope="session")
def influx_env() -> dict[str, str]:
    return ensure_services("influxdb")


@pytest.fixture(scope="session")
def servers(kafka_env: dict[str, str], influx_env: dict[str, str]) -> dict[str, str]:
    """Kafka and InfluxDB for the processor, with its buckets in place."""
    from tests.support.processor_harness import ensure_buckets

    env = {**kafka_env, **influx_env}
    ensure_buckets(env)
    return env


@dataclass(frozen=True)
class PtyPair:
    """Two pseudo-terminals joined by socat: bytes written to one arrive at the other."""

    a: str
    b: str


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[PtyPair]:
    socat = shutil.which("socat")
    if socat is None:
        pytest.fail("socat is not installed: run ./scripts/test, which installs it")
    a, b = tmp_path / "ttyA", tmp_path / "ttyB"
    proc = subprocess.Popen(
        [socat, f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not (a.exists() and b.exists()):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("socat did not create the pty pair")
        time.sleep(0.01)
    try:
        yield PtyPair(os.fspath(a), os.fspath(b))
    finally:
        proc.terminate()
        proc.wait(timeout=5)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs mounted at tmp_path/disk for the test, unmounted after it (even on failure)."""
    from tests.support.disk import small_filesystem

    with small_filesystem(tmp_path / "disk", "4m") as where:
        yield where
