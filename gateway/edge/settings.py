"""The gateway's whole configuration file: one typed section per stage of the data flow.

Each stage owns its section's dataclass; this module only composes them and names the file in
every error. Sections that belong to the processor (``[processor]``, ``[influxdb]``) may share the
file and are left to it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.common.alarms import AlarmConfig
from gateway.common.config import (
    PROCESSOR_SECTIONS,
    KeyProblem,
    build,
    check_reading_field,
    check_sections,
    load_toml,
)
from gateway.common.http import HttpConfig
from gateway.common.validate import ValidationConfig
from gateway.edge.acquire.modbus.engine import ModbusConfig, load_modbus_config
from gateway.edge.acquire.mqtt.source import MqttConfig
from gateway.edge.buffer import BufferConfig
from gateway.edge.calibrate import PhLimits
from gateway.edge.forward import ForwardConfig


@dataclass
class GatewaySection:
    """TOML ``[gateway]``: who this gateway is."""

    id: str = ""  # stable id carried by every reading; default: the host name
    plant_id: str = "default"
    location: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = socket.gethostname()
        check_reading_field("id", "gatewayId", self.id)
        check_reading_field("plant_id", "plantId", self.plant_id)
        check_reading_field("location", "location", self.location)


@dataclass
class CalibrationSection:
    """TOML ``[calibration]``: the store, due intervals and the pH pass/warn/fail limits."""

    store: str = "var/calibrations.sqlite"
    # days until a calibration is due, per parameter; others take default_due_days
    due_days: dict[str, float] = field(default_factory=dict)
    default_due_days: float = 30.0
    ph_offset_limit_mv: float = 30.0
    ph_slope_pass: list[float] = field(default_factory=lambda: [90.0, 105.0])
    ph_slope_warn_min: float = 85.0
    stable_drift: float = 1.0  # a point is stable once its raw value drifts less (per minute)
    stable_seconds: float = 10.0  # ... for this long
    session_timeout: float = 1800.0  # a calibration the CLI left open ends by itself

    def __post_init__(self) -> None:
        if len(self.ph_slope_pass) != 2 or not 0 < self.ph_slope_pass[0] < self.ph_slope_pass[1]:
            raise KeyProblem("ph_slope_pass", "[low, high] % of Nernst, low < high")
        if not 0 < self.ph_slope_warn_min <= self.ph_slope_pass[0]:
            raise KeyProblem("ph_slope_warn_min", "a % of Nernst above 0 and <= ph_slope_pass[0]")
        for key in ("default_due_days", "ph_offset_limit_mv", "stable_drift", "session_timeout"):
            if getattr(self, key) <= 0:
                raise KeyProblem(key, f"a number above 0, got {getattr(self, key)!r}")
        if self.stable_seconds < 0:
            raise KeyProblem("stable_seconds", f"0 or more, got {self.stable_seconds!r}")
        bad = {k: v for k, v in self.due_days.items() if v <= 0}
        if bad:
            raise KeyProblem("due_days", f"days above 0 per parameter, got {bad}")

    def due_for(self, parameter: str) -> float:
        return self.due_days.get(parameter, self.default_due_days)

    def ph_limits(self) -> PhLimits:
        lo, hi = self.ph_slope_pass
        return PhLimits(self.ph_offset_limit_mv, (lo, hi), self.ph_slope_warn_min)


@dataclass
class DeadLetterSection:
    """TOML ``[deadletter]``: payloads that could not become readings, kept for inspection."""

    path: str = "var/deadletter.db"
    max_rows: int = 100_000


@dataclass
class GatewayConfig:
    source: str
    gateway: GatewaySection = field(default_factory=GatewaySection)
    modbus: ModbusConfig = field(default_factory=ModbusConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    alarms: AlarmConfig = field(default_factory=AlarmConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    kafka: ForwardConfig = field(default_factory=ForwardConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    deadletter: DeadLetterSection = field(default_factory=DeadLetterSection)


_PLAIN = {
    "gateway": GatewaySection,
    "calibration": CalibrationSection,
    "validation": ValidationConfig,
    "alarms": AlarmConfig,
    "buffer": BufferConfig,
    "kafka": ForwardConfig,
    "http": HttpConfig,
    "deadletter": DeadLetterSection,
}


def load_gateway_config(path: str | Path) -> GatewayConfig:
    """Read and check the whole file; the first problem raises ConfigError naming file and key."""
    return gateway_config_from(load_toml(path), path)


def gateway_config_from(data: dict[str, Any], path: str | Path) -> GatewayConfig:
    """The config of the parsed file ``data`` (read from ``path``), or ConfigError."""
    check_sections(data, path)
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name in PROCESSOR_SECTIONS:
            continue
        if name == "modbus":
            sections[name] = load_modbus_config(table, source=path)
        elif name == "mqtt":
            sections[name] = MqttConfig.from_toml(table, source=path)
        else:
            sections[name] = build(_PLAIN[name], table, source=path, prefix=name)
    config = GatewayConfig(source=str(path), **sections)
    config.kafka.source = str(path)
    return config
