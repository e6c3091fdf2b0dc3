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

from gateway.common.alarms import AlarmEngine
from gateway.common.config import ConfigError
from gateway.common.http import HttpServer
from gateway.common.metrics import Metrics
from gateway.common.validate import Validator
from gateway.edge.acquire.http import HttpIngest
from gateway.edge.acquire.modbus.engine import ModbusEngine
from gateway.edge.acquire.mqtt.source import MqttSource
from gateway.edge.buffer import Buffer
from gateway.edge.calibrate import CalibrationStore
from gateway.edge.deadletter import DeadLetterStore
from gateway.edge.forward import Forwarder
from gateway.edge.intake import Intake
from gateway.edge.pipeline import EdgePipeline
from gateway.edge.settings import GatewayConfig, load_gateway_config

log = logging.getLogger(__name__)


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
        # The one path every reading takes: pipeline, then buffer.
        self.intake = Intake(self.buffer.submit, self.metrics, self.pipeline.process_batch)
        self.dead_letters = DeadLetterStore(config.deadletter.path, config.deadletter.max_rows)
        self.forwarder = Forwarder(config.kafka, self.buffer, self.metrics)
        self.modbus = ModbusEngine(config.modbus, self.intake.sink_for("modbus"), self.metrics)
        self.mqtt = (
            MqttSource(
                config.mqtt,
                self.intake.sink_for("mqtt"),
                self.metrics,
                self.dead_letters,
                gw.id,
                receipts=self.buffer,
            )
            if config.mqtt.enabled
            else None
        )
        self.http = HttpServer(config.http, self.metrics)
        HttpIngest(
            config.http,
            self.intake.sink_for("http"),
            self.metrics,
            gw.plant_id,
            receipts=self.buffer,
        ).attach(self.http)

    # -- lifetime ------------------------------------------------------------------------------

    def start(self) -> None:
        self.buffer.start()
        self.forwarder.start()
        self.http.add_check("buffer", self.buffer.health)
        self.http.add_check("kafka", self.forwarder.health)
        if self.modbus.workers:
            self.http.add_check("modbus", self.modbus.health)
        if self.mqtt is not None:
            self.http.add_check("mqtt", self.mqtt.health)
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
