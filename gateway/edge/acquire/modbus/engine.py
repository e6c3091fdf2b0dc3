"""Modbus RTU and TCP acquisition: poll probes as their profiles describe, hand readings to a sink.

One worker thread per serial port (RS-485 is half-duplex: one lock per port, slaves polled in turn)
and one per Modbus TCP connection. Each poll reads a device's coalesced register blocks, one request
per block. A transport failure (timeout, crc, exception:<code>, malformed, connection, port) is
counted in ``iot_modbus_errors_total{port,unit,kind}`` and becomes readings with value None,
quality bad and the kind as reason; the device then backs off exponentially, so a dead slave costs
one timeout per attempt and never stalls the others. Decode problems flag readings that are kept.

Frames are built and checked here (``frames.py``, over pyserial and sockets), not by pymodbus's
client: its RTU framer (3.16) drops a frame with a bad CRC as garbage and the request
ends as "no response received" after its internal retries, so CRC errors could not be counted
apart from timeouts, nor each attempt bounded by its own timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from gateway.common.config import ConfigError, build, check_reading_field
from gateway.common.logs import RateLimitedLog
from gateway.common.metrics import Metrics
from gateway.common.model import Quality, Reading, Record, now_ts
from gateway.common.stage import Health, Sink, SinkClosed
from gateway.common.supervise import Heartbeat
from gateway.edge.acquire.modbus.frames import (
    ModbusError,
    parse_read_response,
    parse_write_response,
    read_request,
    write_request,
)
from gateway.edge.acquire.modbus.profiles import Profile, SerialDefaults, load_profile
from gateway.edge.acquire.modbus.registers import (
    Block,
    Decoded,
    block_image,
    decode_profile,
    plan_reads,
)
from gateway.edge.acquire.modbus.transport import RtuTransport, TcpTransport

log = logging.getLogger(__name__)

T = TypeVar("T")


# --- configuration -------------------------------------------------------------------------------


@dataclass(kw_only=True)
class DeviceConfig:
    """What every polled device has: its profile and how its readings are named."""

    profile: str  # path to a drivers/*.toml profile, relative to the config file's folder
    sensor_id: str  # sensorId of every value, unless sensor_ids names the value
    unit: int | None = None  # slave address; default: the profile's
    sensor_ids: dict[str, str] = field(default_factory=dict)  # value name -> sensorId
    interval: float = 10.0  # seconds between polls
    location: str = ""
    plant_id: str = "default"
    also_units: ClassVar[tuple[int, ...]] = ()  # valid besides the slave addresses 1..247

    def __post_init__(self) -> None:
        if not self.sensor_id:
            raise ValueError("sensor_id must not be empty")
        check_reading_field("sensor_id", "sensorId", self.sensor_id)
        for name, sensor_id in self.sensor_ids.items():
            check_reading_field(f"sensor_ids.{name}", "sensorId", sensor_id)
        check_reading_field("plant_id", "plantId", self.plant_id)
        check_reading_field("location", "location", self.location)
        if self.interval <= 0:
            raise ValueError(f"interval must be positive, got {self.interval}")
        if self.unit == 0:
            raise ValueError("unit must be a slave address 1..247, not 0: unit 0 is broadcast")
        if self.unit is not None and not (1 <= self.unit <= 247 or self.unit in self.also_units):
            also = "".join(f" or {u}" for u in self.also_units)
            raise ValueError(f"unit must be a slave address 1..247{also}, got {self.unit}")


@dataclass(kw_only=True)
class SlaveConfig(DeviceConfig):
    """``[[modbus.serial.slaves]]``"""


@dataclass(kw_only=True)
class SerialPortConfig:
    """``[[modbus.serial]]``: one RS-485 port; line settings default to its slaves' profiles."""

    port: str
    slaves: list[SlaveConfig] = field(default_factory=list)
    baudrate: int | None = None
    parity: Literal["N", "E", "O"] | None = None
    stopbits: Literal[1, 2] | None = None
    bytesize: Literal[7, 8] | None = None
    timeout: float = 0.5  # per request, seconds
    retries: int = 1  # extra attempts after a garbled answer (crc, malformed), never a timeout
    inter_frame_gap: float | None = None  # silence before each request; default 3.5 characters
    max_gap: int = 0  # unused registers a coalesced read may span
    backoff_max: float = 60.0  # longest pause between attempts at a dead slave

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.retries < 0 or self.max_gap < 0 or self.backoff_max <= 0:
            raise ValueError("timeout and backoff_max must be positive, retries and max_gap >= 0")


@dataclass(kw_only=True)
class TcpDeviceConfig(DeviceConfig):
    """``[[modbus.tcp]]``: devices at the same host:port share one connection and worker."""

    # The Modbus TCP specification's unit for a device addressed directly, behind no gateway.
    also_units: ClassVar[tuple[int, ...]] = (255,)

    host: str
    port: int = 502
    timeout: float = 1.0
    retries: int = 1
    max_gap: int = 0
    backoff_max: float = 60.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.timeout <= 0 or self.retries < 0 or self.max_gap < 0 or self.backoff_max <= 0:
            raise ValueError("timeout and backoff_max must be positive, retries and max_gap >= 0")


@dataclass
class ModbusConfig:
    """The ``[modbus]`` section."""

    serial: list[SerialPortConfig] = field(default_factory=list)
    tcp: list[TcpDeviceConfig] = field(default_factory=list)
    source: str = field(default="modbus", init=False)  # config file, for error messages
    base_dir: str = field(default="", init=False)  # profile paths are relative to it


def load_modbus_config(
    table: dict[str, Any], *, source: str | Path, base_dir: str | Path | None = None
) -> ModbusConfig:
    """Build and check the ``[modbus]`` section, loading every profile it names."""
    cfg = build(ModbusConfig, table, source=source, prefix="modbus")
    cfg.source = str(source)
    cfg.base_dir = str(base_dir if base_dir is not None else Path(source).parent)
    resolve_buses(cfg)
    return cfg


# --- devices -------------------------------------------------------------------------------------


@dataclass
class Device:
    """A configured device with its profile loaded and its poll state."""

    key: str
    profile: Profile
    unit: int
    config: DeviceConfig
    plan: list[Block]
    timeout: float
    retries: int
    backoff_max: float
    next_due: float = 0.0
    failures: int = 0
    last_ok: float | None = None
    last_error: str = ""

    def sensor_id(self, value_name: str) -> str:
        return self.config.sensor_ids.get(value_name, self.config.sensor_id)


def _profile_path(cfg: ModbusConfig, profile: str) -> Path:
    path = Path(profile)
    return path if path.is_absolute() or not cfg.base_dir else Path(cfg.base_dir) / path


def _device(cfg: ModbusConfig, key: str, d: DeviceConfig, *, timeout: float, retries: int,
            max_gap: int, backoff_max: float) -> Device:  # fmt: skip
    path = _profile_path(cfg, d.profile)
    if not path.is_file():
        raise ConfigError(cfg.source, f"{key}.profile", f"a probe profile file, {path} not found")
    profile = load_profile(path)
    names = sorted(v.name for v in profile.values)
    unknown = sorted(set(d.sensor_ids) - set(names))
    if unknown:
        raise ConfigError(cfg.source, f"{key}.sensor_ids", f"value names {names}, not {unknown}")
    plan = plan_reads(profile.spans(), max_count=profile.max_read, max_gap=max_gap)
    unit = d.unit if d.unit is not None else profile.serial.unit
    return Device(key, profile, unit, d, plan, timeout, retries, backoff_max)


@dataclass
class Bus:
    """A serial port or a TCP connection and the devices polled over it."""

    label: str  # port path or host:port: the ``port`` label of the metrics
    devices: list[Device]
    line: SerialDefaults | None = None  # serial line settings; None for TCP
    inter_frame_gap: float | None = None


def _line(cfg: ModbusConfig, i: int, devices: list[Device]) -> SerialDefaults:
    """Line settings of port ``i``: as configured, else as its slaves' profiles agree."""
    port, line = cfg.serial[i], SerialDefaults()
    for name in ("baudrate", "parity", "stopbits", "bytesize"):
        value = getattr(port, name)
        if value is None:
            found = {getattr(d.profile.serial, name) for d in devices}
            if len(found) > 1:
                key = f"modbus.serial[{i}].{name}"
                raise ConfigError(cfg.source, key, f"a value: the slaves' profiles differ {found}")
            value = found.pop() if found else getattr(line, name)
        setattr(line, name, value)
    return line


def resolve_buses(cfg: ModbusConfig) -> list[Bus]:
    """Load every profile and group devices by bus; ConfigError on any mistake."""
    buses: dict[str, Bus] = {}
    for i, p in enumerate(cfg.serial):
        devices = [
            _device(cfg, f"modbus.serial[{i}].slaves[{j}]", s, timeout=p.timeout,
                    retries=p.retries, max_gap=p.max_gap, backoff_max=p.backoff_max)
            for j, s in enumerate(p.slaves)
        ]  # fmt: skip
        if p.port in buses:
            raise ConfigError(cfg.source, f"modbus.serial[{i}].port", "a port not listed twice")
        buses[p.port] = Bus(p.port, devices, _line(cfg, i, devices), p.inter_frame_gap)
    for i, t in enumerate(cfg.tcp):
        dev = _device(cfg, f"modbus.tcp[{i}]", t, timeout=t.timeout, retries=t.retries,
                      max_gap=t.max_gap, backoff_max=t.backoff_max)  # fmt: skip
        buses.setdefault(f"{t.host}:{t.port}", Bus(f"{t.host}:{t.port}", [])).devices.append(dev)
    for bus in buses.values():
        units: set[int] = set()
        for dev in bus.devices:
            if dev.unit in units:
                raise ConfigError(
                    cfg.source, f"{dev.key}.unit", f"a unit not used twice on {bus.label}"
                )
            units.add(dev.unit)
    return list(buses.values())


# --- polling -------------------------------------------------------------------------------------


class Transport(Protocol):
    def exchange(self, unit: int, pdu: bytes, timeout: float) -> bytes: ...
    def close(self) -> None: ...


class BusWorker:
    """Owns a bus (serial port or TCP connection): one thread, one lock, devices polled in turn."""

    def __init__(self, bus: Bus, transport: Transport, sink: Sink, metrics: Metrics) -> None:
        self.bus = bus
        self.lock = threading.Lock()  # one request at a time on the wire, whoever asks
        self._transport = transport
        self._sink = sink
        self._metrics = metrics
        self._log = RateLimitedLog(log, 60.0)  # a dead probe fails every poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"modbus {bus.label}", daemon=True)
        self.heartbeat = Heartbeat(f"modbus {bus.label} poll loop")

    def start(self) -> None:
        now = time.monotonic()
        for dev in self.bus.devices:
            dev.next_due = now
        self._thread.start()
        self.heartbeat.watch(self._thread)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self.lock:
            self._transport.close()

    def _run(self) -> None:
        while not self._stop.is_set() and self.bus.devices:
            self.heartbeat.beat()
            dev = min(self.bus.devices, key=lambda d: d.next_due)
            wait = dev.next_due - time.monotonic()
            if wait > 0:
                self._stop.wait(min(wait, 1.0))  # beat at least every second while idle
                continue
            try:
                self._poll(dev)
            except Exception:  # a bug must not silence the bus; the device backs off
                log.exception("polling %s unit %s failed", self.bus.label, dev.unit)
                dev.next_due = time.monotonic() + dev.backoff_max

    def request(
        self,
        unit: int,
        pdu: bytes,
        timeout: float,
        parse: Callable[[bytes], T],
        *,
        retries: int = 0,
    ) -> T:
        """One request under the port lock, counted, its answer parsed.

        Only a garbled answer (crc, malformed) is retried: a slave silent for a whole timeout is
        not asked again at once, as on a shared half-duplex bus that would stall the others twice.
        """
        attempt = 0
        while True:
            self._metrics.modbus_requests.labels(self.bus.label).inc()
            try:
                with self.lock:
                    answer = self._transport.exchange(unit, pdu, timeout)
                return parse(answer)
            except ModbusError as e:
                self._metrics.modbus_errors.labels(self.bus.label, str(unit), e.kind).inc()
                attempt += 1
                if attempt > retries or e.kind not in ("crc", "malformed"):
                    raise

    def _poll(self, dev: Device) -> None:
        image: dict[tuple[str, int], int] = {}
        retries = dev.retries if dev.failures == 0 else 0
        try:
            for b in dev.plan:
                pdu = read_request(b.table, b.start, b.count)
                parse = partial(parse_read_response, table=b.table, count=b.count)
                regs = self.request(dev.unit, pdu, dev.timeout, parse, retries=retries)
                image.update(block_image(b, regs))
        except ModbusError as e:
            self._failed(dev, e)
            return
        ts = now_ts()
        dev.failures, dev.last_ok, dev.last_error = 0, ts, ""
        dev.next_due = max(dev.next_due + dev.config.interval, time.monotonic())
        decoded = decode_profile(dev.profile, image)
        for d in decoded:
            for reason in d.reasons:
                if not reason.startswith("status"):  # status bits are the probe's news, not errors
                    self._metrics.modbus_errors.labels(self.bus.label, str(dev.unit), reason).inc()
        self._emit([self._reading(dev, d, ts) for d in decoded])

    def _failed(self, dev: Device, error: ModbusError) -> None:
        dev.failures += 1
        dev.last_error = str(error)
        longest = max(dev.backoff_max, dev.config.interval)
        backoff = min(dev.config.interval * 2 ** min(dev.failures, 30), longest)
        dev.next_due = time.monotonic() + backoff
        self._log.warning(
            f"{self.bus.label}/{dev.unit}/{error.kind}",
            "%s unit %s (%s): %s; %d failures in a row, next try in %.1f s",
            self.bus.label, dev.unit, dev.profile.model, error, dev.failures, backoff,
        )  # fmt: skip
        ts = now_ts()
        self._emit(
            [self._reading(dev, Decoded(v, None), ts, error.kind) for v in dev.profile.values]
        )

    def _reading(self, dev: Device, d: Decoded, ts: float, failure: str = "") -> Reading:
        r = Reading(
            sensor_id=dev.sensor_id(d.spec.name),
            parameter=d.spec.parameter,
            value=d.number,
            unit=d.spec.unit,
            timestamp=ts,
            plant_id=dev.config.plant_id,
            location=dev.config.location,
            quality=d.quality,
            quality_reasons=list(d.reasons),
        )
        if failure:
            r.flag(Quality.BAD, failure)
        return r

    def _emit(self, readings: list[Record]) -> None:
        try:
            self._sink(readings, None)
        except SinkClosed:  # stopping: this poll is not taken
            log.debug(
                "%s: the sink is closed, %d readings not taken", self.bus.label, len(readings)
            )
        except Exception:
            log.exception("the sink refused %d readings from %s", len(readings), self.bus.label)


class ModbusEngine:
    """Polls every configured Modbus device; ``start()``/``stop()`` or use as a context manager.

    ``sink(records, on_durable)`` receives each poll's readings (one call per device poll). It may
    block (back-pressure): the bus waits. ``read_registers``/``write_registers`` go through the
    bus's lock, between polls, e.g. for calibration.
    """

    def __init__(self, config: ModbusConfig, sink: Sink, metrics: Metrics) -> None:
        self.workers: dict[str, BusWorker] = {}
        gauge = metrics.active_connections
        for bus in resolve_buses(config):
            transport: Transport
            if bus.line is not None:
                transport = RtuTransport(
                    bus.label, bus.line, gap=bus.inter_frame_gap, connections=gauge
                )
            else:
                host, _, port = bus.label.rpartition(":")
                transport = TcpTransport(host, int(port), connections=gauge)
            self.workers[bus.label] = BusWorker(bus, transport, sink, metrics)

    def start(self) -> None:
        for w in self.workers.values():
            w.start()

    def stop(self) -> None:
        for w in self.workers.values():
            w._stop.set()
        for w in self.workers.values():
            w.stop()

    def __enter__(self) -> ModbusEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def read_registers(self, bus: str, unit: int, table: str, address: int, count: int,
                       timeout: float = 1.0) -> list[int]:  # fmt: skip
        parse = partial(parse_read_response, table=table, count=count)
        return self.workers[bus].request(unit, read_request(table, address, count), timeout, parse)

    def write_registers(self, bus: str, unit: int, address: int, values: list[int],
                        timeout: float = 1.0) -> None:  # fmt: skip
        parse = partial(parse_write_response, address=address, count=len(values))
        self.workers[bus].request(unit, write_request(address, values), timeout, parse)

    def heartbeats(self) -> list[Heartbeat]:
        return [w.heartbeat for w in self.workers.values()]

    def health(self) -> Health:
        """Healthy while every probe answers; the detail names the silent ones and why."""
        devices = self.devices()
        return all(d["status"] == "healthy" for d in devices.values()), {"devices": devices}

    def devices(self) -> dict[str, dict[str, Any]]:
        """Per device: healthy once its last poll succeeded, with the last error otherwise."""
        out: dict[str, dict[str, Any]] = {}
        for w in self.workers.values():
            for d in w.bus.devices:
                out[f"modbus {w.bus.label} unit {d.unit}"] = {
                    "status": "healthy" if d.failures == 0 and d.last_ok else "unhealthy",
                    "model": d.profile.model,
                    "failures": d.failures,
                    "lastError": d.last_error,
                }
        return out
