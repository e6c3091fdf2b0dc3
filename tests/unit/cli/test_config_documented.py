"""config.toml documents every key of every section, set or commented out with its default; and
documents nothing that is not a key. Adding a field to a section's dataclass fails this test
until config.toml says what it is."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from gateway.edge.acquire.modbus.engine import SerialPortConfig, SlaveConfig, TcpDeviceConfig
from gateway.edge.acquire.mqtt.source import MqttConfig, Subscription
from gateway.edge.settings import _PLAIN
from gateway.processor.predict import MlConfig
from gateway.processor.settings import ProcessorConfig
from gateway.processor.store import InfluxConfig
from tests.support.services import ROOT

SECTIONS: dict[str, Any] = {
    **_PLAIN,
    "modbus.serial": SerialPortConfig,
    "modbus.serial.slaves": SlaveConfig,
    "modbus.tcp": TcpDeviceConfig,
    "mqtt": MqttConfig,
    "mqtt.subscriptions": Subscription,
    "processor": ProcessorConfig,
    "influxdb": InfluxConfig,
    "ml": MlConfig,
}
HEADER = re.compile(r"^\s*#?\s*\[\[?([A-Za-z0-9_.<>-]+)\]\]?")
KEY = re.compile(r"^\s*#?\s*([a-z_][a-z0-9_]*)\s*=")


def documented() -> dict[str, set[str]]:
    """Section -> keys set or commented out in it, and sub-tables named under it."""
    keys: dict[str, set[str]] = {}
    section = ""
    for line in (ROOT / "config.toml").read_text().splitlines():
        if m := HEADER.match(line):
            section = m.group(1)
            parts = section.split(".")
            for i in range(1, len(parts)):  # [a.b.c] documents b of a, c of a.b
                keys.setdefault(".".join(parts[:i]), set()).add(parts[i])
            keys.setdefault(section, set())
        elif (m := KEY.match(line)) and section:
            keys[section].add(m.group(1))
    return keys


def fields(cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init and f.name != "source"}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_key_is_documented(section: str) -> None:
    missing = fields(SECTIONS[section]) - documented().get(section, set())
    assert not missing, f"config.toml [{section}] does not document {sorted(missing)}"


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_nothing_documented_is_not_a_key(section: str) -> None:
    allowed = fields(SECTIONS[section]) | {"allow_plaintext_secrets"}
    stale = documented().get(section, set()) - allowed
    assert not stale, f"config.toml [{section}] documents unknown keys {sorted(stale)}"
