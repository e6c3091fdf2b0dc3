"""The edge-processor service: config, wiring, start/stop and health.

TOML sections read from the shared config file: ``[processor]`` (Kafka and the consumer group),
``[influxdb]`` and, shared with the gateway, ``[validation]`` and ``[alarms]``. Other sections (the
gateway's) are ignored here.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry

from gateway.alarms import AlarmConfig, AlarmEngine
from gateway.config import build, check_sections, load_toml
from gateway.kafka_client import KafkaConnection
from gateway.metrics import Metrics
from gateway.model import now_ts
from gateway.process.consume import RawConsumer
from gateway.process.store import InfluxConfig, InfluxStore
from gateway.serve import HttpConfig, HttpServer
from gateway.validate import ValidationConfig, Validator

log = logging.getLogger(__name__)

Check = tuple[bool, dict[str, Any]]


@dataclass(kw_only=True)
class ProcessorConfig(KafkaConnection):
    """TOML ``[processor]``: the Kafka connection, the consumer group and the windows."""

    group_id: str = "edge-processor"
    topic_pattern: str = r"^sensors\.raw\..*"
    validated_topic: str = "sensors.validated"
    alerts_topic: str = "sensors.alerts"
    aggregated_topic: str = "sensors.aggregated"
    dead_letter_topic: str = "sensors.deadletter"
    batch_size: int = 5000  # at most this many messages per batch
    batch_timeout: float = 0.5  # seconds to wait for a first message (then housekeeping runs)
    batch_linger: float = 0.005  # seconds a batch may fill once a message came (latency cost)
    max_lines_in_flight: int = 20_000  # processed lines waiting for the sinks (the memory bound)
    commit_interval: float = 1.0  # seconds between offset commits (replay after a crash)
    grace_seconds: float = 10.0  # how late a reading may be and still count in its window
    idle_flush_seconds: float = 70.0  # wall time without data after which a plant's windows close
    max_future_seconds: float = 300.0  # readings further ahead are stored but not aggregated
    retry_max_seconds: float = 10.0  # back-off cap while a sink is down
    session_timeout_ms: int = 10_000
    metadata_refresh_ms: int = 30_000  # how soon a new plant topic is picked up
    http_host: str = "127.0.0.1"
    http_port: int = 9181  # /metrics and /health; 0 disables

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


def load(path: str | Path) -> ProcessorSettings:
    data = load_toml(path)
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
    )


class ProcessorService:
    """Owns the consumer thread, the InfluxDB client and the HTTP endpoint."""

    def __init__(self, settings: ProcessorSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(CollectorRegistry())
        cfg = settings.processor
        self._kafka_conf = cfg.kafka_conf()
        self.store = InfluxStore(settings.influxdb, self.metrics, source=settings.source)
        self.consumer = RawConsumer(
            cfg,
            self._kafka_conf,
            Validator(settings.validation),
            AlarmEngine(settings.alarms),
            self.store,
            self.metrics,
        )
        self._admin = AdminClient(self._kafka_conf)
        self.http: HttpServer | None = None
        if cfg.http_port:
            # No buffer given: the processor serves /metrics and /health only, no ingest.
            self.http = HttpServer(HttpConfig(host=cfg.http_host, port=cfg.http_port), self.metrics)
            self.http.add_check("kafka", self.check_kafka)
            self.http.add_check("influxdb", self.check_influxdb)

    def start(self) -> None:
        self.consumer.start()
        if self.http is not None:
            self.http.start()

    def stop(self) -> None:
        self.consumer.stop()
        if self.http is not None:
            self.http.stop()
        self.store.close()

    # -- health --------------------------------------------------------------------------------

    def check_kafka(self) -> Check:
        c = self.consumer
        detail: dict[str, Any] = {"consuming": c.running, "paused": c.paused}
        if c.crashed is not None:
            return False, {**detail, "error": f"consumer stopped: {c.crashed}"}
        try:
            md = self._admin.list_topics(timeout=3)
            detail["brokers"] = len(md.brokers)
        except Exception as e:
            return False, {**detail, "error": str(e)[:200]}
        if c.sink_down_since is not None and "InfluxDB" not in c.last_error:
            down_for = round(now_ts() - c.sink_down_since, 1)
            detail.update(error=c.last_error[:200], down_for=down_for)
            return False, detail
        return True, detail

    def check_influxdb(self) -> Check:
        c = self.consumer
        ok = self.store.ping()
        detail: dict[str, Any] = {"url": self.settings.influxdb.url}
        if not ok:
            detail["error"] = "ping failed"
        if c.sink_down_since is not None and "InfluxDB" in c.last_error:
            ok = False
            down_for = round(now_ts() - c.sink_down_since, 1)
            detail.update(error=c.last_error[:200], down_for=down_for)
        return ok, detail
