"""Live pH calibration through a running gateway: a simulated electrode of known slope and offset
on a pty, the gateway as a subprocess owning the port, the CLI asking it for live values.

Kafka is deliberately unreachable: calibration does not need it, and readings simply stay in the
buffer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.edge.deadletter import DeadLetterStore
from tests.support.electrode import Electrode, Terminal
from tests.support.gateway_harness import ENV, Gateway, GatewaySetup, Simulator
from tests.support.services import ROOT
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

UNREACHABLE_KAFKA = "127.0.0.1:1"
PH_PROBE = [("drivers/ph-int16.toml", 1, "ph-1", "pH")]


def live(gw: Gateway, token: str, sensor: str = "ph-1") -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{gw.port}/api/calibration/live?sensor={sensor}",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        doc: dict[str, Any] = json.loads(r.read())
    return doc


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ph_alarms(gw: Gateway) -> float:
    return gw.metric("iot_alerts_triggered_total", parameter="pH")


def calibrate_interactively(term: Terminal, electrode: Electrode) -> None:
    """Answer the three prompts as an operator: put the electrode in the buffer asked for, wait
    for STABLE, press Enter."""
    for _ in range(3):
        buffer = float(term.expect(r"place it in buffer (\d+\.\d+)").group(1))
        electrode.put_in(buffer)
        time.sleep(0.5)  # the probe's next poll carries the new buffer
        while True:
            term.expect(r"STABLE")
            term.send("\n")
            m = term.expect(r"accepted|not stable yet")
            if m.group(0) == "accepted":
                break
    term.expect("put it back in the process")
    electrode.put_in(7.0)
    time.sleep(1.0)  # back in the process before it returns to service
    term.send("\n")


def test_live_ph_calibration_through_the_running_gateway(pty_pair: Any, tmp_path: Path) -> None:
    control = tmp_path / "control.json"
    electrode = Electrode(control, slope=56.2, offset=12.0)
    electrode.put_in(7.0)
    setup = GatewaySetup(
        tmp_path, UNREACHABLE_KAFKA, pty=pty_pair.a, probes=PH_PROBE, interval=0.25
    )
    setup.extra = {"http": {"token": "env:TEST_INGEST_TOKEN"}}  # for deadletter retry below
    config = setup.write()
    api = tmp_path / "gateway-api.json"
    env = {**ENV, "TEST_INGEST_TOKEN": "s3cret-ingest"}
    gw = Gateway(config, tmp_path / "logs", env)
    with Simulator(pty_pair.b, setup.probes, "--control", str(control)):
        try:
            gw.start()
            gw.wait_serving()
            assert gw.proc is not None
            pid = gw.proc.pid
            token = json.loads(wait_until(api.read_text, 30, "the API file"))["token"]
            assert api.stat().st_mode & 0o077 == 0, "the API file is readable by others"
            wait_until(lambda: "pH" in live(gw, token)["readings"], 30, "a pH reading")
            assert ph_alarms(gw) == 0
            # The gateway owns the port: a diagnostic read is refused, not mixed into its polls.
            busy = cli(["diag", "read", "--port", pty_pair.a, "--unit", "1", "--address", "0"], env)
            assert busy.returncode == 3 and "a running gateway owns it" in busy.stderr, busy.stderr

            # 1. A good electrode, interactively on a terminal: 3 points, recovered, activated.
            args = ["calibrate", "ph", "--config", str(config), "--sensor", "ph-1"]
            args += ["--operator", "ann", "--stable-seconds", "1.5", "--json"]
            term = Terminal(args, ENV)
            try:
                term.expect("out of service")
                assert live(gw, token)["outOfService"]
                _status, health = gw.health()
                assert health["checks"]["calibration"]["outOfService"] == ["ph-1"]
                calibrate_interactively(term, electrode)
                assert term.wait(60) == 0, term.text
            finally:
                term.close()
            doc = json.loads(term.text[term.text.rindex('{"record"') :].split("\n")[0])
            rec = doc["record"]
            assert doc["activated"] and rec["status"] == "pass", rec
            assert abs(rec["slope_mv"] / 56.2 - 1) < 0.005, rec
            assert abs(rec["offset_mv"] / 12.0 - 1) < 0.005, rec
            assert [s["nominal"] for s in rec["standards"]] == [7.0, 4.01, 10.01]
            # In buffers 4.01 and 10.01 the probe read well outside pH 6-9: no alarm, though.
            assert ph_alarms(gw) == 0
            assert not live(gw, token)["outOfService"]

            # 2. Right after: readings come out corrected, by the same daemon process.
            electrode.put_in(8.8)

            def corrected() -> Any:
                r = live(gw, token)["readings"]["pH"]
                return (
                    r if r["calibrationId"] == rec["id"] and abs(r["value"] - 8.8) < 0.03 else None
                )

            reading = wait_until(corrected, 30, "a corrected pH reading")
            assert abs(reading["raw"] - 8.51) < 0.02  # what the probe itself says
            assert "out_of_service:calibration" not in reading["reasons"]
            # ... and now that it is in service, pH 8.8 raises the (warning) alarm.
            wait_until(lambda: ph_alarms(gw) > 0, 30, "a pH alarm once back in service")
            assert gw.proc.poll() is None and gw.proc.pid == pid and gw.starts == 1

            # 3. A worn electrode (80 % of Nernst), scripted: recorded as failed, not activated.
            electrode.slope = 0.80 * 59.16
            electrode.put_in(7.0)
            scripted = subprocess.Popen(
                [sys.executable, "-m", "gateway", *args, "--operator", "bo", "--no-prompt"],
                cwd=ROOT,
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                assert scripted.stdout is not None
                out = ""
                for line in scripted.stdout:
                    out += line
                    if "place it in buffer" in line:
                        electrode.put_in(float(line.split("buffer ")[1].split()[0]))
                assert scripted.wait(60) == 1, out
            finally:
                if scripted.poll() is None:
                    scripted.kill()
                    scripted.wait()
            worn = json.loads(out[out.index('{"record"') :].split("\n")[0])
            assert worn["record"]["status"] == "fail" and not worn["activated"]
            assert abs(worn["record"]["slope_pct"] - 80.0) < 0.5
            electrode.put_in(8.8)
            time.sleep(1.0)
            reading = wait_until(
                lambda: live(gw, token)["readings"]["pH"], 10, "a pH reading after the failure"
            )
            assert reading["calibrationId"] == rec["id"], "the failed calibration was activated"

            # The history keeps both, newest first; show names the active one.
            shown = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "calibrate",
                    "history",
                    "--config",
                    str(config),
                    "--sensor",
                    "ph-1",
                    "--json",
                ],
                cwd=ROOT,
                env=ENV,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert shown.returncode == 0, shown.stderr
            history = json.loads(shown.stdout)
            assert [h["status"] for h in history] == ["fail", "pass"]
            assert gw.proc.pid == pid and gw.starts == 1

            # diag health: the daemon's /health (Kafka is unreachable here: exit 1).
            health_cli = cli(["diag", "health", "--config", str(config), "--json"], env)
            assert health_cli.returncode == 1, health_cli.stderr
            checks = json.loads(health_cli.stdout)["checks"]
            assert checks["calibration"]["status"] == "healthy"
            assert checks["kafka"]["status"] != "healthy"

            # deadletter retry goes through the running gateway's ingest (it owns the buffer).
            store = DeadLetterStore(tmp_path / "deadletter.db")
            fixed = {
                "sensorId": "cod-7",
                "parameter": "COD",
                "value": 55.0,
                "unit": "mg/L",
                "timestamp": "2026-12-07T04:00:00Z",
                "plantId": setup.plant,
            }
            try:
                store.add("mqtt", "t/x", "late", json.dumps(fixed).encode(), "test")
                (letter,) = store.list()
            finally:
                store.close()
            retried = cli(["deadletter", "retry", "--config", str(config), str(letter.id)], env)
            assert retried.returncode == 0, retried.stderr
            assert "through the running gateway" in retried.stdout
            got = live(gw, token, "cod-7")["readings"]["COD"]
            assert got["value"] == 55.0
        finally:
            gw.close()


def scripted(args: list[str], on_prompt: Any) -> tuple[int, str]:
    """Run a calibration with --no-prompt; ``on_prompt(line)`` acts on each prompt it prints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", *args, "--no-prompt"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = ""
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out += line
            on_prompt(line)
        return proc.wait(60), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_without_a_gateway_the_cli_opens_the_port_and_writes_to_the_probe(
    pty_pair: Any, tmp_path: Path
) -> None:
    control = tmp_path / "control.json"
    electrode = Electrode(control, unit=1, slope=56.2, offset=12.0)
    electrode.put_in(7.0)
    probes = [*PH_PROBE, ("drivers/conductivity-tds.toml", 3, "cond-1", "conductivity")]
    setup = GatewaySetup(tmp_path, UNREACHABLE_KAFKA, pty=pty_pair.a, probes=probes, interval=0.25)
    config = setup.write()
    with Simulator(pty_pair.b, probes, "--control", str(control)):

        def buffers(line: str) -> None:
            if "place it in buffer" in line:
                electrode.put_in(float(line.split("buffer ")[1].split()[0]))

        args = [
            "calibrate",
            "ph",
            "--config",
            str(config),
            "--sensor",
            "ph-1",
            "--operator",
            "cy",
            "--points",
            "2",
            "--stable-seconds",
            "1",
            "--write-to-probe",
            "--json",
        ]
        code, out = scripted(args, buffers)
        assert code == 0, out
        assert "the serial port directly" in out
        rec = json.loads(out[out.index('{"record"') :].split("\n")[0])["record"]
        assert rec["applied_in"] == "probe" and rec["status"] == "pass"
        assert "probe register slope: wrote" in out and "MISMATCH" not in out
        # The probe keeps what was written: zero point and slope in its registers 3 and 4.
        regs = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "diag",
                "read",
                "--port",
                pty_pair.a,
                "--unit",
                "1",
                "--address",
                "3",
                "--count",
                "2",
                "--json",
            ],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert regs.returncode == 0, regs.stderr
        values = [r["value"] for r in json.loads(regs.stdout)["registers"]]
        assert abs(values[0] * 0.1 - 12.0) <= 0.2 and abs(values[1] * 0.01 - 56.2) <= 0.1

        # Conductivity: the cell reads 1300 µS in KCl 1413 µS/cm at 25 °C.
        control.write_text(
            json.dumps({"3": {"values": {"conductivity": 1300.0, "temperature": 25.0}}})
        )
        args = [
            "calibrate",
            "conductivity",
            "--config",
            str(config),
            "--sensor",
            "cond-1",
            "--operator",
            "cy",
            "--standard",
            "1413",
            "--stable-seconds",
            "1",
            "--json",
        ]
        code, out = scripted(args, lambda _line: None)
        assert code == 0, out
        cond = json.loads(out[out.index('{"record"') :].split("\n")[0])["record"]
        assert abs(cond["cell_constant"] - 1413 / 1300) < 1e-3, cond
