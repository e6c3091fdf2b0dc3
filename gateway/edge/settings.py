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
    """TOML ``[calibration]``."""

    store: str = "var/calibrations.sqlite"


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
    data = load_toml(path)
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
