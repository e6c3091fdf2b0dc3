"""``edge-gateway run``: wires the stages into the gateway daemon and owns their lifetimes.

Sources (Modbus, MQTT, HTTP ingest) hand readings to one sink: the edge pipeline (calibrate,
validate, alarms), then the disk buffer. The forwarder drains the buffer to Kafka. On SIGTERM the
sources stop first, so nothing new arrives; the forwarder waits briefly for confirmations of what
it sent; the buffer commits what it still holds and closes.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.acquire.modbus import ModbusEngine
from gateway.acquire.mqtt import MqttSource
from gateway.alarms import AlarmEngine
from gateway.buffer import Buffer
from gateway.calibrate import CalibrationStore
from gateway.config import ConfigError
from gateway.deadletter import DeadLetterStore
from gateway.forward import Forwarder
from gateway.metrics import Metrics
from gateway.model import Reading, Record
from gateway.pipeline import EdgePipeline
from gateway.serve import HttpServer
from gateway.settings import GatewayConfig, load_gateway_config
from gateway.validate import Validator

log = logging.getLogger(__name__)

OnDurable = Callable[[], object] | None


class GatewayDaemon:
    def __init__(self, config: GatewayConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        gw = config.gateway
        # An empty buffer must read 0, not be missing from /metrics until a row waits in it.
        self.metrics.buffer_size.labels(gw.plant_id).set(0)
        for p in (config.buffer.path, config.deadletter.path, config.calibration.store):
            Path(p).parent.mkdir(parents=True, exist_ok=True)
        self.buffer = Buffer(config.buffer, gw.id, self.metrics)
        self.calibrations = CalibrationStore(config.calibration.store)
        self.pipeline = EdgePipeline(
            self.calibrations,
            Validator(config.validation),
            AlarmEngine(config.alarms, gateway_id=gw.id),
            self.metrics,
        )
        self.dead_letters = DeadLetterStore(config.deadletter.path, config.deadletter.max_rows)
        self.forwarder = Forwarder(config.kafka, self.buffer, self.metrics)
        self.modbus = ModbusEngine(config.modbus, self._modbus_sink, self.metrics)
        self.mqtt = (
            MqttSource(config.mqtt, self.sink, self.metrics, self.dead_letters, gw.id)
            if config.mqtt.enabled
            else None
        )
        self.http = HttpServer(
            config.http,
            self.metrics,
            buffer=self.buffer,
            process=self.pipeline.process_batch,
            plant_id=gw.plant_id,
        )

    # -- the one path every reading takes ------------------------------------------------------

    def sink(self, readings: list[Record], on_durable: OnDurable = None) -> None:
        """Pipeline, then buffer; ``on_durable`` runs once the batch is committed to disk."""
        plain = [r for r in readings if isinstance(r, Reading)]
        records = self.pipeline.process_batch(plain)
        records.extend(r for r in readings if not isinstance(r, Reading))
        self.buffer.submit(records, on_durable)

    def _modbus_sink(self, readings: list[Record], on_durable: OnDurable = None) -> None:
        for r in readings:
            if isinstance(r, Reading):
                self.metrics.messages_received.labels("modbus", r.plant_id).inc()
        self.sink(readings, on_durable)

    # -- lifetime ------------------------------------------------------------------------------

    def start(self) -> None:
        self.buffer.start()
        self.forwarder.start()
        self.http.add_check("buffer", self.buffer.healthy)
        self.http.add_check("kafka", self.forwarder.healthy)
        if self.modbus.workers:
            self.http.add_check("modbus", self._modbus_health)
        if self.mqtt is not None:
            mqtt = self.mqtt
            self.http.add_check("mqtt", lambda: (mqtt.healthy(), {"error": mqtt.last_error}))
        self.http.start()
        self.modbus.start()
        if self.mqtt is not None:
            self.mqtt.start()
        log.info(
            "edge-gateway %s running: %d Modbus bus(es), MQTT %s, HTTP on %s:%d",
            self.config.gateway.id,
            len(self.modbus.workers),
            "on" if self.mqtt else "off",
            self.config.http.host,
            self.http.port,
        )

    def stop(self) -> None:
        log.info("stopping: sources first, then the forwarder, then the buffer")
        if self.mqtt is not None:
            self.mqtt.stop()
        self.modbus.stop()
        self.http.stop()
        self.forwarder.stop()
        self.buffer.stop()
        self.dead_letters.close()

    def _modbus_health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while every probe answers; the detail names the silent ones and why."""
        devices = self.modbus.health()
        return all(d["status"] == "healthy" for d in devices.values()), {"devices": devices}


def run_until_signalled(config_path: str | Path) -> None:
    """Run until SIGTERM or SIGINT. SIGHUP reloads: the file is read and checked again, and only
    if it is good are the stages stopped (in order, nothing lost) and started anew with it; a bad
    file is logged and the running gateway carries on. Fixed Kafka credentials need no restart.
    """
    wake, stop, reload = threading.Event(), threading.Event(), threading.Event()

    def on_signal(flag: threading.Event) -> Callable[..., None]:
        def handler(*_: object) -> None:
            flag.set()
            wake.set()

        return handler

    signal.signal(signal.SIGTERM, on_signal(stop))
    signal.signal(signal.SIGINT, on_signal(stop))
    signal.signal(signal.SIGHUP, on_signal(reload))
    daemon = GatewayDaemon(load_gateway_config(config_path))
    daemon.start()
    try:
        while not stop.is_set():
            wake.wait()
            wake.clear()
            if reload.is_set() and not stop.is_set():
                reload.clear()
                try:
                    config = load_gateway_config(config_path)
                except ConfigError as e:
                    log.error("reload refused, the running configuration stays: %s", e)
                    continue
                log.info("reloading %s", config_path)
                daemon.stop()
                daemon = GatewayDaemon(config)
                daemon.start()
    finally:
        daemon.stop()
