"""The [modbus] config section: profiles resolved, defaults taken from them.

Mistakes in the section are config cases: tests/cases/config/modbus-*.toml (see
tests/unit/common/test_config.py).
"""

from __future__ import annotations

from typing import Any

from gateway.edge.acquire.modbus.engine import load_modbus_config, resolve_buses
from tests.support.services import ROOT

DRIVERS = ROOT / "drivers"
SOURCE = DRIVERS / "gateway.toml"  # profile paths are relative to the config file's folder


def _port(*slaves: dict[str, Any], **settings: Any) -> dict[str, Any]:
    return {"serial": [{"port": "/dev/ttyUSB0", "slaves": list(slaves), **settings}]}


PH = {"profile": "ph-int16.toml", "sensor_id": "PH-1"}
EC = {"profile": "conductivity-tds.toml", "sensor_id": "EC-1", "unit": 2}


def test_units_and_line_settings_default_to_the_profiles() -> None:
    cfg = load_modbus_config(_port(PH, EC), source=SOURCE)
    (bus,) = resolve_buses(cfg)
    assert [d.unit for d in bus.devices] == [1, 2]
    assert bus.line is not None and (bus.line.baudrate, bus.line.parity) == (9600, "N")


def test_tcp_devices_at_one_address_share_one_bus() -> None:
    flow = {"host": "10.0.0.5", "profile": "flowmeter-tcp.toml", "sensor_id": "F1"}
    cfg = load_modbus_config({"tcp": [flow, {**flow, "unit": 2, "sensor_id": "F2"}]}, source=SOURCE)
    (bus,) = resolve_buses(cfg)
    assert bus.label == "10.0.0.5:502" and len(bus.devices) == 2


def test_explicit_line_settings_allow_mixed_profiles() -> None:
    sonde = {"profile": "sonde-float32-cdab.toml", "sensor_id": "S", "unit": 3}
    cfg = load_modbus_config(_port(PH, sonde, baudrate=19200, parity="E"), source=SOURCE)
    (bus,) = resolve_buses(cfg)
    assert bus.line is not None and (bus.line.baudrate, bus.line.parity) == (19200, "E")
