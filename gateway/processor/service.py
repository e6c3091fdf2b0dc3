"""``edge-gateway processor run``: wires the processor's stages and owns their lifetimes.

The consumer thread validates, alarms, aggregates and hands batches to the sinks (InfluxDB, the
published topics) and tells the listeners (the predictor) what each batch produced; the HTTP
server answers /metrics and /health. SIGTERM or SIGINT stops it; a consumer that dies ends the
process non-zero, so systemd restarts it.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry

from gateway.common.alarms import AlarmEngine
from gateway.common.http import HttpConfig, HttpServer
from gateway.common.metrics import Metrics
from gateway.common.model import now_ts
from gateway.common.stage import Health
from gateway.common.validate import Validator
from gateway.processor.consume import RawConsumer
from gateway.processor.events import Listener
from gateway.processor.predict import PredictionCallback, Predictor
from gateway.processor.settings import ProcessorSettings, load_processor_config
from gateway.processor.store import InfluxStore

log = logging.getLogger(__name__)


class ProcessorService:
    """Owns the consumer thread, the predictor, the InfluxDB client and the HTTP endpoint.

    ``on_prediction`` callbacks (e.g. the live feed's publish) are told each prediction as
    ``(plant_id, message)`` on the predictor's thread; they must only hand off.
    """

    def __init__(
        self,
        settings: ProcessorSettings,
        metrics: Metrics | None = None,
        on_prediction: Sequence[PredictionCallback] = (),
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(CollectorRegistry())
        cfg = settings.processor
        self._kafka_conf = cfg.kafka_conf()
        self.store = InfluxStore(settings.influxdb, self.metrics, source=settings.source)
        listeners: list[Listener] = []
        self.predictor: Predictor | None = None
        if settings.ml.enabled:
            self.predictor = Predictor(
                settings.ml,
                kafka_conf=self._kafka_conf,
                topic=cfg.predictions_topic,
                influx=settings.influxdb,
                metrics=self.metrics,
                source=settings.source,
                callbacks=on_prediction,
            )
            listeners.append(self.predictor)
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
        self.http: HttpServer | None = None
        if cfg.http_port:
            # No buffer given: the processor serves /metrics and /health only, no ingest.
            self.http = HttpServer(HttpConfig(host=cfg.http_host, port=cfg.http_port), self.metrics)
            self.http.add_check("kafka", self.check_kafka)
            self.http.add_check("influxdb", self.check_influxdb)
            if self.predictor is not None:
                self.http.add_check("predictions", self.predictor.health)

    def start(self) -> None:
        if self.predictor is not None:
            self.predictor.start()
        self.consumer.start()
        if self.http is not None:
            self.http.start()

    def stop(self) -> None:
        self.consumer.stop()
        if self.predictor is not None:
            self.predictor.stop()
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
