"""``edge-gateway processor run``: wires the processor's stages and owns their lifetimes.

The consumer thread validates, alarms, aggregates and hands batches to the sinks (InfluxDB, the
published topics) and tells the listeners (the live feed) what each batch produced; the HTTP
server answers /metrics and /health and serves the live feed, its API and the dashboard page.
SIGTERM or SIGINT stops it; a consumer that dies ends the process non-zero, so systemd restarts
it.
"""

from __future__ import annotations

import logging
import signal
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry

from gateway.common.alarms import AlarmEngine
from gateway.common.config import secret
from gateway.common.http import HttpConfig, HttpServer
from gateway.common.metrics import Metrics
from gateway.common.model import now_ts
from gateway.common.stage import Health
from gateway.common.validate import Validator
from gateway.processor.aggregate import WindowAggregate
from gateway.processor.consume import RawConsumer
from gateway.processor.events import Listener
from gateway.processor.follow import TopicFollower
from gateway.processor.live import LiveHub
from gateway.processor.query import Queries
from gateway.processor.settings import ProcessorSettings, load_processor_config
from gateway.processor.store import InfluxStore

log = logging.getLogger(__name__)


class ProcessorService:
    """Owns the consumer thread, the InfluxDB clients, the HTTP endpoint and the live feed."""

    def __init__(self, settings: ProcessorSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(CollectorRegistry())
        cfg = settings.processor
        self._kafka_conf = cfg.kafka_conf()
        self.store = InfluxStore(settings.influxdb, self.metrics, source=settings.source)
        self.http: HttpServer | None = None
        self.live: LiveHub | None = None
        self.follower: TopicFollower | None = None
        self._queries: Queries | None = None
        listeners: list[Listener] = []
        if cfg.http_port:
            # No ingest here: /metrics, /health, the live feed and the dashboard.
            self.http = HttpServer(HttpConfig(host=cfg.http_host, port=cfg.http_port), self.metrics)
            self.http.add_check("kafka", self.check_kafka)
            self.http.add_check("influxdb", self.check_influxdb)
            token = secret(cfg.http_token, source=settings.source, key="processor.http_token")
            influx = settings.influxdb
            self._queries = Queries(influx.client(settings.source), influx)
            self.live = LiveHub(
                settings.alarms, self.metrics, token=token.encode(), stored_history=self._windows
            )
            self.live.attach(self.http)
            listeners.append(self.live)
            if cfg.live_follow:  # every plant in the feed, whichever instance owns its sensors
                self.follower = TopicFollower(
                    self._kafka_conf,
                    alerts_topic=cfg.alerts_topic,
                    aggregated_topic=cfg.aggregated_topic,
                    group_prefix=cfg.group_id,
                    hub=self.live,
                    metadata_refresh_ms=cfg.metadata_refresh_ms,
                )
        self.consumer = RawConsumer(
            cfg,
            self._kafka_conf,
            Validator(settings.validation),
            AlarmEngine(settings.alarms),
            self.store,
            self.metrics,
            listeners=listeners,
        )
        self._admin = AdminClient(self._kafka_conf)

    def start(self) -> None:
        if self.http is not None:  # first, so the live feed sees the first batch
            self.http.start()
        if self.follower is not None:
            self.follower.start()
        self.consumer.start()

    def stop(self) -> None:
        self.consumer.stop()
        if self.follower is not None:
            self.follower.stop()
        if self.http is not None:
            self.http.stop()
        if self._queries is not None:
            self._queries.client.close()
        self.store.close()

    def _windows(self, plant: str, start: float, stop: float) -> list[WindowAggregate]:
        """The dashboard's history: stored 1-minute windows, every instance's partials merged."""
        assert self._queries is not None
        return self._queries.windows(
            plant, datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(stop, UTC)
        )

    # -- health --------------------------------------------------------------------------------

    def check_kafka(self) -> Health:
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

    def check_influxdb(self) -> Health:
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


class ConsumerStopped(RuntimeError):
    """The consumer thread ended on its own; the process must end non-zero."""


def run_until_signalled(config_path: str | Path) -> None:
    """Run until SIGTERM or SIGINT; raises ConsumerStopped if the consumer thread dies."""
    settings = load_processor_config(config_path)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service = ProcessorService(settings)
    service.start()
    try:
        while not stop.wait(1.0):
            if service.consumer.crashed is not None:
                raise ConsumerStopped(f"processor stopped: {service.consumer.crashed}")
    finally:
        service.stop()
