"""``edge-gateway diag`` against simulated probes on a pseudo-terminal.

The simulator makes its own pty (``simulate --pty``), so it sees the baud rate and parity the
scanner sets on its end and each probe answers only at its own line settings, as on a real bus.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway_harness import ENV
from tests.support.services import ROOT

pytestmark = pytest.mark.integration

SONDE = "drivers/sonde-float32-cdab.toml"  # its profile's line: 19200 8E1
PH = "drivers/ph-int16.toml"  # 9600 8N1


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        env={**ENV, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A pH probe at unit 3 (9600 8N1) and a sonde at unit 17 that answers only at 19200 8E1
    (both their profiles' lines); the control file pins the sonde's conductivity to 123456.0."""
    link, control = tmp_path / "ttyBUS", tmp_path / "control.json"
    control.write_text(json.dumps({"17": {"values": {"conductivity": 123456.0}}}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "simulate", "--pty", str(link),
         "--slave", f"{PH}:3", "--slave", f"{SONDE}:17:19200-8E1", "--control", str(control)],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "serving units" in line, line
        yield str(link), control
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_scan_finds_exactly_the_two_slaves_with_their_line_settings(bus: Any) -> None:
    port, _ = bus
    got = cli("diag", "scan", "--port", port, "--baud", "9600,19200", "--parity", "N,E",
              "--ids", "1-20", "--timeout", "0.1", "--json")  # fmt: skip
    assert got.returncode == 0, got.stderr
    found = {f["unit"]: f for f in json.loads(got.stdout)["found"]}
    assert sorted(found) == [3, 17], found
    assert (found[3]["baud"], found[3]["parity"], found[3]["stopbits"]) == (9600, "N", 1)
    assert (found[17]["baud"], found[17]["parity"], found[17]["stopbits"]) == (19200, "E", 1)
    assert found[3]["profile"].endswith("ph-int16.toml")
    assert found[17]["profile"].endswith("sonde-float32-cdab.toml")
    # The table form, with the time per id, for a person.
    table = cli("diag", "scan", "--port", port, "--baud", "19200", "--parity", "E",
                "--ids", "16-18", "--timeout", "0.1")  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "19200 8E1" in table.stdout and "s/id" in table.stdout
    nothing = cli("diag", "scan", "--port", port, "--baud", "9600", "--ids", "5-6",
                  "--timeout", "0.1")  # fmt: skip
    assert nothing.returncode == 1


def test_read_shows_the_float_test_vector_under_its_word_order(bus: Any) -> None:
    port, _ = bus
    line = ("--baud", "19200", "--parity", "E")
    got = cli("diag", "read", "--port", port, "--unit", "17", "--address", "6", "--count", "2",
              *line, "--profile", SONDE, "--json")  # fmt: skip
    assert got.returncode == 0, got.stderr
    doc = json.loads(got.stdout)
    assert [r["hex"] for r in doc["registers"]] == ["0x2000", "0x47F1"]
    floats = {d["wordOrder"]: d["value"] for d in doc["decodings"] if d["type"] == "float32"}
    assert floats["CDAB"] == 123456.0
    assert all(v != 123456.0 for o, v in floats.items() if o != "CDAB")
    assert doc["profile"][0]["name"] == "conductivity" and doc["profile"][0]["value"] == 123456.0
    table = cli("diag", "read", "--port", port, "--unit", "17", "--address", "6", *line)
    assert table.returncode == 0 and "123456" in table.stdout and "0x47F1" in table.stdout
    # At the wrong parity the sonde stays silent, as a real one would.
    silent = cli("diag", "read", "--port", port, "--unit", "17", "--address", "6",
                 "--baud", "19200", "--timeout", "0.2")  # fmt: skip
    assert silent.returncode == 1 and "timeout" in silent.stderr


def test_poll_reads_once_as_the_gateway_does(bus: Any, tmp_path: Path) -> None:
    port, control = bus
    got = cli("diag", "poll", "--profile", SONDE, "--port", port, "--unit", "17", "--json")
    assert got.returncode == 0, got.stderr
    values = {v["name"]: v for v in json.loads(got.stdout)["values"]}
    assert values["conductivity"]["value"] == 123456.0
    assert values["conductivity"]["quality"] == "good"
    # A faulty probe: the poll says which values and why, and exits 1.
    control.write_text(json.dumps({"17": {"fault": "nan", "values": {}}}))
    bad = cli("diag", "poll", "--profile", SONDE, "--port", port, "--unit", "17")
    assert bad.returncode == 1, bad.stdout
    assert "bad" in bad.stdout and "nan" in bad.stdout
    # By the sensor of a gateway config, at the line settings the config gives.
    config = tmp_path / "gw.toml"
    config.write_text(
        f'[gateway]\nid = "gw"\n[calibration]\nstore = "{tmp_path / "cal.sqlite"}"\n'
        f'[[modbus.serial]]\nport = "{port}"\n'
        f'[[modbus.serial.slaves]]\nprofile = "{ROOT / PH}"\nunit = 3\nsensor_id = "ph-9"\n'
    )
    by_sensor = cli("diag", "poll", "--config", str(config), "--sensor", "ph-9", "--json")
    assert by_sensor.returncode == 0, by_sensor.stderr + by_sensor.stdout
    doc = json.loads(by_sensor.stdout)
    assert doc["unit"] == 3 and {v["parameter"] for v in doc["values"]} >= {"pH", "temperature"}
