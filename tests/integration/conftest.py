"""Fixtures of the processor's integration tests: Kafka and InfluxDB, buckets and tasks in place."""

from __future__ import annotations

import pytest

from tests.support.processor_harness import ensure_buckets, influx_config


@pytest.fixture(scope="module")
def servers(kafka_env, influx_env):
    env = {**kafka_env, **influx_env}
    ensure_buckets(env)
    return env


@pytest.fixture
def influx(servers):
    """A client of the real InfluxDB and the processor's InfluxDB config for it."""
    cfg = influx_config(servers)
    with cfg.client() as client:
        yield client, cfg
