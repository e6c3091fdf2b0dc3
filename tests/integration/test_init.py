"""``edge-gateway init`` as a user runs it: the real CLI as a subprocess writes a config that the
real ``edge-gateway config check`` accepts; with ``--scan`` over a socat pty pair it finds the
probes the simulator serves (real Modbus RTU frames) and configures them with their profiles."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway_harness import ENV, Simulator
from tests.support.services import ROOT

pytestmark = pytest.mark.integration


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m gateway ARGS``; subprocess.run kills it if it outlives ``timeout``."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check(config: Path) -> subprocess.CompletedProcess[str]:
    result = cli("config", "check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"{config}: OK" in result.stdout
    return result


def test_init_writes_a_config_that_passes_check_and_never_overwrites_unasked(
    tmp_path: Path,
) -> None:
    out = tmp_path / "config.toml"
    first = cli("init", "--output", str(out), "--plant-id", "t1", "--gateway-id", "gw-t1",
                "--kafka", "127.0.0.1:19092")  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert "gateway gw-t1, plant t1, 0 Modbus connection(s)" in check(out).stdout
    assert "127.0.0.1:19092" in out.read_text()
    written = out.read_text()

    again = cli("init", "--output", str(out), "--plant-id", "other")
    assert again.returncode == 1
    assert "exists; pass --force" in again.stderr
    assert out.read_text() == written

    forced = cli("init", "--output", str(out), "--plant-id", "other", "--service", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "plant other" in check(out).stdout
    assert 'path = "/var/lib/edge-gateway/buffer.db"' in out.read_text()


def _slaves(config: Path) -> list[dict[str, Any]]:
    data = tomllib.loads(config.read_text())
    return [s for port in data.get("modbus", {}).get("serial", []) for s in port["slaves"]]


def test_init_scan_finds_the_simulated_probes_on_a_pty(pty_pair: Any, tmp_path: Path) -> None:
    probes = [
        ("drivers/ph-int16.toml", 3, "", ""),
        ("drivers/conductivity-tds.toml", 17, "", ""),
    ]
    out = tmp_path / "config.toml"
    with Simulator(pty_pair.b, probes):
        start = time.monotonic()
        result = cli("init", "--output", str(out), "--plant-id", "t2", "--scan",
                     "--port", pty_pair.a, "--baud", "9600", "--units", "1-20",
                     "--timeout", "0.15")  # fmt: skip
        seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    print(f"init --scan of units 1-20 at 9600: {seconds:.1f} s\n{result.stderr}")
    assert "9600 8N1 unit 3: answered -> ph-int16" in result.stderr
    assert "9600 8N1 unit 17: answered -> conductivity-tds" in result.stderr
    assert "2 of 2 probes identified" in result.stdout

    data = tomllib.loads(out.read_text())
    (port,) = data["modbus"]["serial"]
    assert port["port"] == pty_pair.a and port["baudrate"] == 9600 and port["parity"] == "N"
    assert [(s["unit"], s["profile"]) for s in port["slaves"]] == [
        (3, str(ROOT / "drivers" / "ph-int16.toml")),
        (17, str(ROOT / "drivers" / "conductivity-tds.toml")),
    ]
    assert all(s["plant_id"] == "t2" for s in port["slaves"])
    assert "gateway" in check(out).stdout and "1 Modbus connection(s)" in check(out).stdout
    # 18 silent units at 0.15 s each, two answers and their identification: bounded, not minutes
    assert seconds < 30
