"""The processor's configuration: its sections of the shared config file.

TOML sections: ``[processor]`` (Kafka and the consumer group), ``[influxdb]``, ``[ml]`` (the
predictions), ``[notifications]`` (alert channels and routes, ``alerting.config``) and, shared
with the gateway, ``[validation]`` and ``[alarms]``. Other sections (the gateway's) are ignored
here. The environment's ``ML_API_URL``, when set, overrides ``ml.api_url``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.common.alarms import AlarmConfig
from gateway.common.config import SECRET, ConfigError, build, check_sections, load_toml
from gateway.common.kafka import KafkaConnection
from gateway.common.validate import ValidationConfig
from gateway.processor.alerting.config import NotificationsConfig
from gateway.processor.predict import MlConfig
from gateway.processor.store import InfluxConfig


@dataclass(kw_only=True)
class ProcessorConfig(KafkaConnection):
    """TOML ``[processor]``: the Kafka connection, the consumer group and the windows."""

    group_id: str = "edge-processor"
    topic_pattern: str = r"^sensors\.raw\..*"
    validated_topic: str = "sensors.validated"
    alerts_topic: str = "sensors.alerts"
    aggregated_topic: str = "sensors.aggregated"
    predictions_topic: str = "sensors.predictions"
    dead_letter_topic: str = "sensors.deadletter"
    batch_size: int = 5000  # at most this many messages per batch
    batch_timeout: float = 0.5  # seconds to wait for a first message (then housekeeping runs)
    batch_linger: float = 0.005  # seconds a batch may fill once a message came (latency cost)
    max_lines_in_flight: int = 20_000  # processed lines waiting for the sinks (the memory bound)
    writes_in_flight: int = 2  # sink writes at once; a slow one then delays only its own batch
    commit_interval: float = 1.0  # seconds between offset commits (replay after a crash)
    grace_seconds: float = 10.0  # how late a reading may be and still count in its window
    idle_flush_seconds: float = 70.0  # wall time without data after which a plant's windows close
    max_future_seconds: float = 300.0  # readings further ahead are stored but not aggregated
    retry_max_seconds: float = 10.0  # back-off cap while a sink is down
    session_timeout_ms: int = 10_000
    metadata_refresh_ms: int = 30_000  # how soon a new plant topic is picked up
    http_host: str = "127.0.0.1"
    http_port: int = 9181  # /metrics, /health, the live feed and the dashboard; 0 disables
    # bearer token for /ws and /api/* (env:NAME, file:/path or cred:NAME); "" = open
    http_token: str = field(default="", metadata=SECRET)
    live_follow: bool = True  # the live feed follows every instance's alerts and windows topics

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.topic_pattern.startswith("^"):
            raise ValueError("topic_pattern must be a regex starting with ^ (librdkafka's rule)")
        try:
            re.compile(self.topic_pattern[1:])
        except re.error as e:
            raise ValueError(f"topic_pattern is not a valid regex: {e}") from None
        if self.batch_size < 1 or self.batch_timeout <= 0 or self.batch_linger < 0:
            raise ValueError(
                "batch_size must be at least 1, batch_timeout positive and batch_linger >= 0"
            )
        if self.max_lines_in_flight < 1 or self.commit_interval < 0:
            raise ValueError("max_lines_in_flight must be at least 1, commit_interval >= 0")
        if not 1 <= self.writes_in_flight <= 16:
            raise ValueError("writes_in_flight must be between 1 and 16")
        if self.grace_seconds < 0 or self.idle_flush_seconds <= 0:
            raise ValueError("grace_seconds must be >= 0 and idle_flush_seconds > 0")
        if not 0 <= self.http_port <= 65535:
            raise ValueError("http_port must be between 0 and 65535")

    def kafka_conf(self) -> dict[str, Any]:
        return self.client_conf(client_id="edge-processor", section="processor") | self.extra


@dataclass
class ProcessorSettings:
    """Everything the processor reads from the config file."""

    processor: ProcessorConfig
    influxdb: InfluxConfig
    validation: ValidationConfig
    alarms: AlarmConfig
    source: str = "config"
    ml: MlConfig = field(default_factory=MlConfig)
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)


def load_processor_config(path: str | Path) -> ProcessorSettings:
    """Read and check the processor's sections; errors name the file, the key, the expectation."""
    return processor_config_from(load_toml(path), path)


def processor_config_from(data: dict[str, Any], path: str | Path) -> ProcessorSettings:
    """The processor's settings from the parsed file ``data`` (read from ``path``)."""
    check_sections(data, path)
    src = str(path)

    def section(cls: Any, name: str) -> Any:
        return build(cls, data.get(name, {}), source=src, prefix=name)

    processor = section(ProcessorConfig, "processor")
    processor.source = src
    return ProcessorSettings(
        processor=processor,
        influxdb=section(InfluxConfig, "influxdb"),
        validation=section(ValidationConfig, "validation"),
        alarms=section(AlarmConfig, "alarms"),
        source=src,
        ml=load_ml_section(data, src),
        notifications=section(NotificationsConfig, "notifications"),
    )


def load_ml_section(data: dict[str, Any], source: str) -> MlConfig:
    """``[ml]`` with the environment's ``ML_API_URL`` (when set) in place of ``api_url``."""
    ml = build(MlConfig, data.get("ml", {}), source=source, prefix="ml")
    url = os.environ.get("ML_API_URL")
    if url is None:
        return ml
    try:
        return dataclasses.replace(ml, api_url=url.strip())
    except ValueError as e:
        raise ConfigError(source, "ML_API_URL (environment)", str(e)) from None


def load_ml_config(path: str | Path) -> MlConfig:
    """Only ``[ml]`` of a config file (``edge-gateway ml serve``)."""
    data = load_toml(path)
    check_sections(data, path)
    return load_ml_section(data, str(path))
