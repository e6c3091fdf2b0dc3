"""``edge-gateway run``: wires the stages into the gateway daemon and owns their lifetimes.

Sources (Modbus, MQTT, HTTP ingest) hand readings to one sink: the edge pipeline (calibrate,
validate, alarms), then the disk buffer. The forwarder drains the buffer to Kafka. On SIGTERM the
sources stop first, so nothing new arrives; the forwarder waits briefly for confirmations of what
it sent; the buffer commits what it still holds and closes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.common.alarms import AlarmEngine
from gateway.common.config import ConfigError, secret
from gateway.common.http import HttpServer
from gateway.common.metrics import Metrics
from gateway.common.notify import Notifier
from gateway.common.supervise import Heartbeat, Signals, Supervisor, reloading_fields
from gateway.common.validate import Validator
from gateway.edge.acquire.http import HttpIngest
from gateway.edge.acquire.http_workers import HttpWorkers
from gateway.edge.acquire.modbus.engine import ModbusEngine
from gateway.edge.acquire.mqtt.source import MqttSource
from gateway.edge.acquire.mqtt.workers import MqttWorkers
from gateway.edge.buffer import Buffer
from gateway.edge.calibrate import CalibrationStore
from gateway.edge.calibration_api import CalibrationApi, api_file
from gateway.edge.deadletter import DeadLetterStore
from gateway.edge.forward import Forwarder
from gateway.edge.intake import Intake
from gateway.edge.pipeline import EdgePipeline
from gateway.edge.settings import GatewayConfig, load_gateway_config

log = logging.getLogger(__name__)

STOP_BUDGET_S = 10.0  # a stop (SIGTERM, or the old half of a reload) ends in about this
STOP_GRACE_S = 10.0  # beyond the budget, a stage stuck in the kernel: the process exits


@dataclass(frozen=True, repr=False)  # repr=False: never a password in a log line
class Secrets:
    """Every secret a config names, resolved (env:, file:, cred:). A daemon is built from them,
    so a reload reads the credential files before the running gateway stops, and a failed one
    can start the previous configuration again without reading anything."""

    kafka: dict[str, Any]  # the producer's librdkafka settings, password included
    http_token: str

    @classmethod
    def resolve(cls, config: GatewayConfig) -> Secrets:
        """ConfigError naming the key if one cannot be read. The MQTT password is resolved when
        the file is loaded (MqttConfig.from_toml)."""
        token = secret(config.http.token, source=config.source, key="http.token")
        return cls(config.kafka.producer_config(), token)


class GatewayDaemon:
    def __init__(
        self, config: GatewayConfig, metrics: Metrics | None = None, secrets: Secrets | None = None
    ) -> None:
        self.config = config
        self.secrets = Secrets.resolve(config) if secrets is None else secrets
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
        self.forwarder = Forwarder(
            config.kafka, self.buffer, self.metrics, self.dead_letters, self.secrets.kafka
        )
        self.modbus = ModbusEngine(config.modbus, self.intake.sink_for("modbus"), self.metrics)
        mqtt_kind: type[MqttSource] | type[MqttWorkers] = (
            MqttWorkers if config.mqtt.workers else MqttSource
        )
        self.mqtt = (
            mqtt_kind(
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
        self._last_count = (time.monotonic(), 0)
        ingest = HttpIngest(
            config.http,
            self.intake.sink_for("http"),
            self.metrics,
            gw.plant_id,
            self.secrets.http_token,
            receipts=self.buffer,
        )
        ingest.attach(self.http)
        self.http_workers: HttpWorkers | None = None
        self._relay_dir = ""
        if config.http.ingest_workers and self.secrets.http_token:
            self.http_workers = HttpWorkers(
                config.http, ingest, self.metrics, self.secrets.http_token
            )
        self.calibration_api = CalibrationApi(
            self.pipeline, self.calibrations, self.modbus, config.calibration.session_timeout
        )
        self.calibration_api.attach(self.http)

    def again(self) -> GatewayDaemon:
        """A new daemon for the same configuration and the same resolved secrets (to start the
        previous configuration again after a reload that failed to start)."""
        return GatewayDaemon(self.config, secrets=self.secrets)

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
        self.http.add_check("calibration", self.calibration_health)
        if self.http_workers is not None:
            # The workers share the port and pass every request but ingest on to this server,
            # over a unix socket in a directory only this user may enter.
            self._relay_dir = tempfile.mkdtemp(prefix="edge-gateway-http-")
            self.http.reuse_port = True
            self.http.unix_path = os.path.join(self._relay_dir, "http.sock")
        try:
            self.http.start()
        except BaseException:
            self._remove_relay()
            raise
        if self.http_workers is not None:
            self.http_workers.start(self.http.port, self.http.unix_path)
            self.http.add_check("http_workers", self.http_workers.health)
        self.calibration_api.publish(
            self.config.calibration.store, self.config.http.host, self.http.port
        )
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

    def stop(self, budget: float = STOP_BUDGET_S) -> None:
        """Stop every stage, in flow order, within about ``budget`` seconds; past ``budget`` +
        STOP_GRACE_S (a stage stuck in the kernel) the process exits. Either way every committed
        reading is on disk: commits are fsynced."""
        log.info("stopping: sources first, then the forwarder, then the buffer")
        started = time.monotonic()
        stage = ["sources"]

        def stuck() -> None:
            log.error(
                "stopping takes longer than %.0f s (stuck in %s): exiting now; every committed "
                "reading is on disk",
                budget + STOP_GRACE_S,
                stage[0],
            )
            logging.shutdown()
            os._exit(1)

        guard = threading.Timer(budget + STOP_GRACE_S, stuck)
        guard.daemon = True
        guard.start()

        def left(most: float) -> float:
            return max(0.5, min(most, budget - (time.monotonic() - started)))

        try:
            # No source may stay blocked in a full buffer: what it queued is committed now,
            # beyond the bound (it is only in memory), and blocked calls give up unacknowledged.
            self.buffer.close_intake()
            if self.mqtt is not None:
                self.mqtt.stop(drain_timeout=left(3.0), ack_timeout=left(2.0))
            stage[0] = "modbus"
            self.modbus.stop()
            stage[0] = "http"
            api_file(self.config.calibration.store).unlink(missing_ok=True)
            if self.http_workers is not None:
                self.http_workers.stop(timeout=left(8.0))
            self.http.stop()
            self._remove_relay()
            stage[0] = "the forwarder"
            self.forwarder.stop(timeout=left(5.0))
            stage[0] = "the buffer"
            self.buffer.stop(timeout=left(5.0))
            stage[0] = "the dead-letter store"
            self.dead_letters.close(timeout=left(2.0))
        finally:
            guard.cancel()
        log.info("stopped in %.1f s", time.monotonic() - started)

    def _remove_relay(self) -> None:
        if self._relay_dir:
            shutil.rmtree(self._relay_dir, ignore_errors=True)
            self._relay_dir = ""

    def calibration_health(self) -> tuple[bool, dict[str, Any]]:
        """Always healthy (an overdue calibration is news, not an outage); names the overdue ones
        and the sensors out of service."""
        now = time.time()
        overdue = [
            f"{r.sensor_id} {r.parameter} (due {time.strftime('%Y-%m-%d', time.gmtime(r.due_at))})"
            for r in self.calibrations.all_active()
            if r.due_at is not None and r.due_at < now
        ]
        return True, {"overdue": overdue, "outOfService": self.pipeline.out_of_service()}

    # -- supervision ---------------------------------------------------------------------------

    def heartbeats(self) -> list[Heartbeat]:
        stages: list[Any] = [self.buffer, self.forwarder, self.modbus]
        if self.mqtt is not None:
            stages.append(self.mqtt)
        if self.http_workers is not None:
            stages.append(self.http_workers)
        return [hb for stage in stages for hb in stage.heartbeats()]

    def status(self) -> str:
        """One line for systemd's STATUS=: readings/s, buffer depth, Kafka link, silent probes."""
        now, received = time.monotonic(), self.intake.received
        rate = (received - self._last_count[1]) / max(now - self._last_count[0], 1e-3)
        self._last_count = (now, received)
        kafka_ok, kafka = self.forwarder.health()
        link = "Kafka ok" if kafka_ok else f"Kafka down ({kafka.get('error', '')[:60]})"
        devices = self.modbus.devices()
        silent = sum(d["status"] != "healthy" for d in devices.values())
        return (
            f"{rate:.0f} readings/s, buffer {self.buffer.stats()['rows']} rows, {link}, "
            f"probes silent {silent}/{len(devices)}"
        )


def run_until_signalled(config_path: str | Path, notifier: Notifier | None = None) -> None:
    """Run until SIGTERM or SIGINT, speaking systemd's notify protocol. SIGHUP reloads (see
    ``reload``). A stage thread that dies ends the daemon with StageDied (systemd restarts it); a
    wedged one stops the watchdog pings.
    """
    notify = notifier if notifier is not None else Notifier()
    signals = Signals()
    daemon = GatewayDaemon(load_gateway_config(config_path))
    daemon.start()
    supervisor = Supervisor(lambda: daemon.heartbeats(), lambda: daemon.status(), notify)
    notify.send("READY=1", f"STATUS={daemon.status()}")
    try:
        while not signals.stop.is_set():
            signals.wait(supervisor.interval)
            if signals.take_reload():
                notify.send(*reloading_fields())
                daemon, outcome = reload(daemon, config_path)
                notify.send("READY=1", f"STATUS={outcome or daemon.status()}")
            elif not signals.stop.is_set():
                supervisor.tick()
    finally:
        notify.send("STOPPING=1")
        daemon.stop()


def reload(daemon: GatewayDaemon, config_path: str | Path) -> tuple[GatewayDaemon, str]:
    """Read the file again and build the new daemon, every secret resolved (credential files are
    read now; ``env:`` values are the process's and cannot change), while the old one runs: any
    problem so far refuses the reload and the old one carries on untouched. Only then is the old
    one stopped (in order, nothing lost) and the new one started; if that start fails, the
    previous configuration is started again with its secrets as they were. Returns the daemon
    that runs now, and a status line if the reload did not take."""
    try:
        new = GatewayDaemon(load_gateway_config(config_path))
    except ConfigError as e:
        log.error("reload refused, the running configuration stays: %s", e)
        return daemon, f"reload refused: {str(e)[:200]}"
    log.info("reloading %s", config_path)
    daemon.stop()
    try:
        new.start()
        return new, ""
    except Exception as e:
        log.error(
            "reload failed while starting the new configuration (%s): starting the previous one "
            "again",
            e,
        )
        new.stop()
    previous = daemon.again()
    previous.start()  # if this fails too, the gateway ends and systemd restarts it
    return previous, "reload failed: running the previous configuration"
