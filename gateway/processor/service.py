"""``edge-gateway processor run``: wires the processor's stages and owns their lifetimes.

The consumer thread validates, alarms, aggregates and hands batches to the sinks (InfluxDB, the
published topics); the HTTP server answers /metrics and /health. SIGTERM or SIGINT stops it; a
stage thread that dies ends the process non-zero, so systemd restarts it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry

from gateway.common.alarms import AlarmEngine
from gateway.common.http import HttpConfig, HttpServer
from gateway.common.metrics import Metrics
from gateway.common.model import now_ts
from gateway.common.notify import Notifier
from gateway.common.stage import Health
from gateway.common.supervise import Heartbeat, Signals, StageDied, Supervisor, reloading_fields
from gateway.common.validate import Validator
from gateway.processor.consume import RawConsumer
from gateway.processor.settings import ProcessorSettings, load_processor_config
from gateway.processor.store import InfluxStore

log = logging.getLogger(__name__)


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
        self._last_count = (time.monotonic(), 0)
        self.http: HttpServer | None = None
        if cfg.http_port:
            # No buffer given: the processor serves /metrics and /health only, no ingest.
            self.http = HttpServer(HttpConfig(host=cfg.http_host, port=cfg.http_port), self.metrics)
            self.http.add_check("kafka", self.check_kafka)
            self.http.add_check("influxdb", self.check_influxdb)

    def heartbeats(self) -> list[Heartbeat]:
        return self.consumer.heartbeats()

    def status(self) -> str:
        """One line for systemd's STATUS=: readings/s, Kafka and InfluxDB, open windows."""
        now, consumed = time.monotonic(), self.consumer.consumed
        rate = (consumed - self._last_count[1]) / max(now - self._last_count[0], 1e-3)
        self._last_count = (now, consumed)
        c = self.consumer
        sinks = "sinks ok" if c.sink_down_since is None else f"sink down ({c.last_error[:60]})"
        return f"{rate:.0f} readings/s, {sinks}, {c.open_windows()} open windows"

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


def run_until_signalled(config_path: str | Path, notifier: Notifier | None = None) -> None:
    """Run until SIGTERM or SIGINT, speaking systemd's notify protocol; StageDied if the consumer
    or writer thread dies (systemd restarts the processor), no watchdog ping while one is wedged.
    SIGHUP is answered (the processor has nothing to reload without a restart) and logged."""
    notify = notifier if notifier is not None else Notifier()
    signals = Signals()
    service = ProcessorService(load_processor_config(config_path))
    service.start()
    supervisor = Supervisor(service.heartbeats, service.status, notify)
    notify.send("READY=1", f"STATUS={service.status()}")
    try:
        while not signals.stop.is_set():
            signals.wait(supervisor.interval)
            if signals.take_reload():
                notify.send(*reloading_fields())
                log.warning("SIGHUP: the processor reads its config only at start; restart it")
                notify.send("READY=1")
            elif not signals.stop.is_set():
                if service.consumer.crashed is not None:
                    raise StageDied(f"processor stopped: {service.consumer.crashed}")
                supervisor.tick()
    finally:
        notify.send("STOPPING=1")
        service.stop()
