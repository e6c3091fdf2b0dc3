"""Fixtures of the processor's integration tests: Kafka and InfluxDB with the buckets provisioned,
and an InfluxDB client with its config."""

from __future__ import annotations

import pytest

from tests.support.processor_harness import ensure_buckets, influx_config


@pytest.fixture(scope="session")
def servers(kafka_env, influx_env):
    env = {**kafka_env, **influx_env}
    ensure_buckets(env)
    return env


@pytest.fixture
def influx(servers):
    cfg = influx_config(servers)
    with cfg.client() as client:
        yield client, cfg
