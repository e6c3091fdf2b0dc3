"""``edge-gateway config check`` reports every problem of a file at once."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from gateway.cli import app
from gateway.cli.configcheck import key_path, problems
from tests.support.services import ROOT

FIVE_MISTAKES = """
[gateway]
id = "gw-1"
plant_id = "north"
colour = "blue"                       # 1. unknown key

[[modbus.serial]]
port = "/dev/ttyUSB0"
baudrate = "fast"                     # 2. not an integer

[[modbus.serial.slaves]]
profile = "{ph}"
sensor_id = "ph-1"
unit = 248                            # 3. reserved unit id

[buffer]
max_rows = -5                         # 4. negative bound

[calibration]
ph_slope_pass = [105.0, 90.0]         # 5. limits the wrong way round
"""


def test_five_mistakes_are_reported_together(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(FIVE_MISTAKES.format(ph=ROOT / "drivers" / "ph-int16.toml"))
    found = problems(config)
    keys = [p.key for p in found]
    assert len(found) == 5, found
    assert "gateway.colour" in keys
    assert "modbus.serial[0].baudrate" in keys
    assert any(k.startswith("modbus.serial[0].slaves[0]") for k in keys)
    assert any(k.startswith("buffer") for k in keys)
    assert "calibration.ph_slope_pass" in keys
    assert all(p.file == str(config) for p in found)
    assert next(p for p in found if p.key == "modbus.serial[0].baudrate").value == "fast"

    result = CliRunner().invoke(app, ["config", "check", "--config", str(config), "--json"])
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert not doc["ok"] and len(doc["problems"]) == 5
    plain = CliRunner().invoke(app, ["config", "check", "--config", str(config)])
    assert plain.exit_code == 2
    assert plain.output.count("config error:") == 5


def test_the_shipped_config_passes() -> None:
    result = CliRunner().invoke(app, ["config", "check", "--config", str(ROOT / "config.toml")])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


def test_a_file_that_is_not_toml_is_one_problem(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("[gateway\nid = 1\n")
    found = problems(config)
    assert len(found) == 1 and "TOML" in found[0].expected


def test_key_paths() -> None:
    assert key_path("modbus.serial[0].slaves[12].unit") == [
        "modbus", "serial", 0, "slaves", 12, "unit",
    ]  # fmt: skip
    assert key_path("gateway.id") == ["gateway", "id"]
