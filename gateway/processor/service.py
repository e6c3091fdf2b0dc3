"""``edge-gateway processor run``: wires the processor's stages and owns their lifetimes.

The consumer thread validates, alarms, aggregates and hands batches to the sinks (InfluxDB, the
published topics) and tells the listeners (the predictor, the live feed) what each batch produced;
predictions reach the live feed too. The HTTP server answers /metrics and /health and serves the
live feed, its API and the dashboard page. SIGTERM or SIGINT stops it; a stage thread that dies
ends the process non-zero, so systemd restarts it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
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
from gateway.common.notify import Notifier
from gateway.common.stage import Health
from gateway.common.supervise import Heartbeat, Signals, StageDied, Supervisor, reloading_fields
from gateway.common.validate import Validator
from gateway.processor.aggregate import WindowAggregate
from gateway.processor.alerting.api import attach_api
from gateway.processor.alerting.notifier import AlertNotifier
from gateway.processor.consume import RawConsumer
from gateway.processor.events import Listener
from gateway.processor.follow import TopicFollower
from gateway.processor.live import LiveHub
from gateway.processor.predict import PredictionCallback, Predictor
from gateway.processor.query import Queries
from gateway.processor.settings import ProcessorSettings, load_processor_config
from gateway.processor.store import InfluxStore

log = logging.getLogger(__name__)


class ProcessorService:
    """Owns the consumer thread, the predictor, the InfluxDB clients, the HTTP endpoint and the
    live feed.

    ``on_prediction`` callbacks are told each prediction as ``(plant_id, message)`` on the
    predictor's thread, after the live feed; they must only hand off.
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
        self.http: HttpServer | None = None
        self.live: LiveHub | None = None
        self.follower: TopicFollower | None = None
        self._queries: Queries | None = None
        self.notifier: AlertNotifier | None = None
        token = b""
        listeners: list[Listener] = []
        callbacks = list(on_prediction)
        if cfg.http_port:
            # No ingest here: /metrics, /health, the live feed and the dashboard.
            self.http = HttpServer(HttpConfig(host=cfg.http_host, port=cfg.http_port), self.metrics)
            self.http.add_check("kafka", self.check_kafka)
            self.http.add_check("influxdb", self.check_influxdb)
            token = secret(
                cfg.http_token, source=settings.source, key="processor.http_token"
            ).encode()
            influx = settings.influxdb
            self._queries = Queries(influx.client(settings.source), influx)
            self.live = LiveHub(
                settings.alarms, self.metrics, token=token, stored_history=self._windows
            )
            self.live.attach(self.http)
            listeners.append(self.live)
            callbacks.insert(0, self.live.publish)
            if cfg.live_follow:  # every plant in the feed, whichever instance owns its sensors
                self.follower = TopicFollower(
                    self._kafka_conf,
                    alerts_topic=cfg.alerts_topic,
                    aggregated_topic=cfg.aggregated_topic,
                    group_prefix=cfg.group_id,
                    hub=self.live,
                    metadata_refresh_ms=cfg.metadata_refresh_ms,
                )
        if settings.notifications.enabled:
            live = self.live
            self.notifier = AlertNotifier(
                settings.notifications,
                self._kafka_conf,
                alerts_topic=cfg.alerts_topic,
                group_prefix=cfg.group_id,
                influx=settings.influxdb,
                metrics=self.metrics,
                source=settings.source,
                on_change=None if live is None else (lambda events: live.on_followed(events, [])),
                metadata_refresh_ms=cfg.metadata_refresh_ms,
                session_timeout_ms=cfg.session_timeout_ms,
            )
            if self.http is not None:
                self.http.add_check("notifier", self.notifier.health)
                attach_api(self.http, self.notifier, token)
        self.predictor: Predictor | None = None
        if settings.ml.enabled:
            self.predictor = Predictor(
                settings.ml,
                kafka_conf=self._kafka_conf,
                topic=cfg.predictions_topic,
                influx=settings.influxdb,
                metrics=self.metrics,
                source=settings.source,
                callbacks=callbacks,
            )
            listeners.append(self.predictor)
            if self.http is not None:
                self.http.add_check("predictions", self.predictor.health)
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
        self._last_count = (time.monotonic(), 0)

    def heartbeats(self) -> list[Heartbeat]:
        beats = self.consumer.heartbeats()
        for stage in (self.predictor, self.follower, self.notifier):
            if stage is not None:
                beats.extend(stage.heartbeats())
        return beats

    def status(self) -> str:
        """One line for systemd's STATUS=: readings/s, Kafka and InfluxDB, open windows."""
        now, consumed = time.monotonic(), self.consumer.consumed
        rate = (consumed - self._last_count[1]) / max(now - self._last_count[0], 1e-3)
        self._last_count = (now, consumed)
        c = self.consumer
        sinks = "sinks ok" if c.sink_down_since is None else f"sink down ({c.last_error[:60]})"
        return f"{rate:.0f} readings/s, {sinks}, {c.open_windows()} open windows"

    def start(self) -> None:
        if self.http is not None:  # first, so the live feed sees the first batch
            self.http.start()
        if self.follower is not None:
            self.follower.start()
        if self.notifier is not None:
            self.notifier.start()
        if self.predictor is not None:
            self.predictor.start()
        self.consumer.start()

    def stop(self) -> None:
        self.consumer.stop()
        if self.predictor is not None:
            self.predictor.stop()
        if self.follower is not None:
            self.follower.stop()
        if self.notifier is not None:
            self.notifier.stop()
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
