"""The Modbus engine against simulated probes over real pseudo-terminals (socat) and TCP sockets.

Three probes share one RS-485 "port" (a pty pair), a flow meter answers over Modbus TCP. Faults are
switched on the simulated slaves while the engine runs.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import ModbusSerialClient

from gateway.common.metrics import Metrics
from gateway.common.model import Quality, Reading
from gateway.edge.acquire.modbus.engine import ModbusEngine, load_modbus_config
from gateway.edge.acquire.modbus.profiles import load_profile
from gateway.edge.acquire.modbus.registers import decode
from gateway.edge.acquire.modbus.simulate import RtuSimulator, SimBus, SimSlave, TcpSimulator
from tests.support.net import free_port
from tests.support.services import ROOT
from tests.support.sinks import RecordingSink

pytestmark = pytest.mark.integration

DRIVERS = ROOT / "drivers"
SERIAL_PROBES = {1: "ph-int16.toml", 2: "sonde-float32-cdab.toml", 3: "conductivity-tds.toml"}
SENSOR = {1: "PH-1", 2: "SONDE-2", 3: "EC-3"}
TIMEOUT = 0.25


def _count(sensor: str, n: int, good: bool | None = None) -> Callable[[list[list[Reading]]], bool]:
    def check(batches: list[list[Reading]]) -> bool:
        mine = [b for b in batches if b and b[0].sensor_id == sensor]
        if good is not None:
            mine = [b for b in mine if all((r.value is not None) == good for r in b)]
        return len(mine) >= n

    return check


def _metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class Rig:
    def __init__(
        self,
        engine: ModbusEngine,
        sink: RecordingSink,
        metrics: Metrics,
        serial_bus: SimBus,
        tcp_bus: SimBus,
        port: str,
        tcp: TcpSimulator,
    ) -> None:
        self.engine, self.sink, self.metrics = engine, sink, metrics
        self.serial_bus, self.tcp_bus, self.port, self.tcp = serial_bus, tcp_bus, port, tcp


def _config(
    port: str, tcp_port: int, *, interval: float = 0.05, retries: int = 1
) -> dict[str, Any]:
    slaves = [
        {
            "profile": name,
            "unit": u,
            "sensor_id": SENSOR[u],
            "interval": interval,
            "location": "inlet",
        }
        for u, name in SERIAL_PROBES.items()
    ]
    return {
        "serial": [
            {"port": port, "baudrate": 9600, "parity": "N", "stopbits": 1, "timeout": TIMEOUT,
             "retries": retries, "backoff_max": 0.5, "slaves": slaves}
        ],
        "tcp": [
            {"host": "127.0.0.1", "port": tcp_port, "profile": "flowmeter-tcp.toml",
             "sensor_id": "FLOW-1", "interval": interval, "timeout": TIMEOUT, "backoff_max": 0.5,
             "plant_id": "plant-a"}
        ],
    }  # fmt: skip


@pytest.fixture
def rig(pty_pair: Any) -> Iterator[Rig]:
    serial_bus = SimBus([SimSlave(load_profile(DRIVERS / n), u) for u, n in SERIAL_PROBES.items()])
    tcp_bus = SimBus([SimSlave(load_profile(DRIVERS / "flowmeter-tcp.toml"), 1)])
    sink, metrics = RecordingSink(), Metrics()
    with RtuSimulator(pty_pair.b, serial_bus), TcpSimulator("127.0.0.1", 0, tcp_bus) as tcp:
        table = _config(pty_pair.a, tcp.address[1])
        cfg = load_modbus_config(table, source=DRIVERS / "config.toml")
        engine = ModbusEngine(cfg, sink, metrics)
        with engine:
            yield Rig(engine, sink, metrics, serial_bus, tcp_bus, pty_pair.a, tcp)


def test_three_probes_on_one_port_and_one_over_tcp_give_the_profiles_readings(rig: Rig) -> None:
    for sensor in [*SENSOR.values(), "FLOW-1"]:
        rig.sink.wait_for(_count(sensor, 2))
    for unit, name in SERIAL_PROBES.items():
        profile = load_profile(DRIVERS / name)
        batch = rig.sink.of(SENSOR[unit])[-1]
        assert [(r.parameter, r.unit) for r in batch] == [
            (v.parameter, v.unit) for v in profile.values
        ]
        for r, v in zip(batch, profile.values, strict=True):
            assert r.quality is Quality.GOOD and r.location == "inlet"
            assert r.value == pytest.approx(v.nominal, rel=1e-6, abs=0.01)
    flow = {r.parameter: r for r in rig.sink.of("FLOW-1")[-1]}
    assert flow["flow_rate"].value == 152.5 and flow["flow_rate"].unit == "m3/h"
    assert flow["flow_total"].value == pytest.approx(123456.7)
    assert flow["flow_rate"].plant_id == "plant-a"
    assert all(h["status"] == "healthy" for h in rig.engine.devices().values())


def test_a_dead_slave_delays_the_others_by_at_most_one_timeout_per_attempt(rig: Rig) -> None:
    rig.sink.wait_for(_count("SONDE-2", 1))
    rig.serial_bus.slaves[2].fault = "no_answer"
    start = len(rig.sink.batches)
    rig.sink.wait_for(_count("PH-1", len(rig.sink.of("PH-1")) + 40))
    rig.serial_bus.slaves[2].fault = "none"
    rig.sink.wait_for(
        lambda bs: any(b[0].sensor_id == "SONDE-2" and b[0].value for b in bs[start:])
    )

    order = [(b[0].sensor_id, b[0].value is None) for b in rig.sink.batches[start:]]
    dead = [i for i, (s, failed) in enumerate(order) if s == "SONDE-2" and failed]
    live = [i for i, (s, _) in enumerate(order) if s == "PH-1"]
    assert dead, "the silent slave's polls failed"
    # Each failed attempt is one request that timed out, never retried on the spot...
    assert _metric(
        rig.metrics, "iot_modbus_errors_total", port=rig.port, unit="2", kind="timeout"
    ) == len(dead)
    # ...and between two consecutive readings of a live probe lies at most one such attempt.
    for a, b in itertools.pairwise(live):
        assert sum(a < i < b for i in dead) <= 1
    # Back-off: the dead slave is tried far less often than the live ones are polled.
    assert len(dead) < len(live) / 3
    failed_reasons = {tuple(r.quality_reasons) for i in dead for r in rig.sink.batches[start + i]}
    assert failed_reasons == {("timeout",)}


def test_crc_and_exception_answers_are_counted_by_kind_and_flag_readings(rig: Rig) -> None:
    rig.sink.wait_for(_count("EC-3", 1))
    rig.serial_bus.slaves[2].fault = "corrupt_crc"
    rig.serial_bus.slaves[3].exception_code = 2
    rig.serial_bus.slaves[3].fault = "exception"
    rig.sink.wait_for(_count("SONDE-2", 2, good=False))
    rig.sink.wait_for(_count("EC-3", 2, good=False))
    rig.serial_bus.slaves[2].fault = rig.serial_bus.slaves[3].fault = "none"

    crc = _metric(rig.metrics, "iot_modbus_errors_total", port=rig.port, unit="2", kind="crc")
    exc = _metric(
        rig.metrics, "iot_modbus_errors_total", port=rig.port, unit="3", kind="exception:2"
    )
    assert crc >= 2 and exc >= 2
    sonde_bad = next(b for b in rig.sink.of("SONDE-2") if b[0].value is None)
    ec_bad = next(b for b in rig.sink.of("EC-3") if b[0].value is None)
    assert all(r.quality is Quality.BAD and r.quality_reasons == ["crc"] for r in sonde_bad)
    assert all(r.quality_reasons == ["exception:2"] for r in ec_bad)
    assert _metric(rig.metrics, "iot_modbus_errors_total", port=rig.port, unit="1", kind="crc") == 0
    # The probes come back once their answers are sound again.
    rig.sink.wait_for(lambda bs: bs[-1][0].sensor_id == "EC-3" and bs[-1][0].value is not None)


def test_requests_per_poll_equal_the_profiles_register_blocks(rig: Rig) -> None:
    rig.sink.wait_for(_count("PH-1", 5))
    rig.sink.wait_for(_count("FLOW-1", 5))
    rig.engine.stop()  # finishes the poll in progress: every counted request belongs to a batch
    polls = {u: len(rig.sink.of(SENSOR[u])) for u in SERIAL_PROBES}
    blocks = {
        u: len(d.plan) for u, d in ((d.unit, d) for d in rig.engine.workers[rig.port].bus.devices)
    }
    assert blocks == {1: 2, 2: 1, 3: 1}  # pH: values, then status past the calibration registers
    expected = sum(polls[u] * blocks[u] for u in SERIAL_PROBES)
    assert _metric(rig.metrics, "iot_modbus_requests_total", port=rig.port) == expected
    tcp_label = f"127.0.0.1:{rig.tcp.address[1]}"
    assert _metric(rig.metrics, "iot_modbus_requests_total", port=tcp_label) == len(
        rig.sink.of("FLOW-1")
    )


@pytest.mark.parametrize(
    ("unit", "fault", "reason"),
    [(2, "nan", "nan"), (2, "sentinel", "sentinel"), (1, "status_fault", "status:electrode_fault")],
)
def test_decode_faults_are_flagged_and_the_readings_kept(
    rig: Rig, unit: int, fault: str, reason: str
) -> None:
    rig.serial_bus.slaves[unit].fault = fault
    sensor = SENSOR[unit]
    rig.sink.wait_for(
        lambda bs: any(reason in r.quality_reasons for b in bs for r in b if r.sensor_id == sensor)
    )
    batch = next(b for b in rig.sink.of(sensor) if any(reason in r.quality_reasons for r in b))
    flagged = [r for r in batch if reason in r.quality_reasons]
    assert flagged and all(r.quality is Quality.BAD for r in flagged)
    if fault == "status_fault":
        assert flagged[0].value == 7.0  # the device's own fault flag does not erase the value


def test_tcp_device_reconnects_after_its_server_restarts(rig: Rig) -> None:
    rig.sink.wait_for(_count("FLOW-1", 2))
    host, port = rig.tcp.address
    rig.tcp.stop()
    rig.sink.wait_for(_count("FLOW-1", 1, good=False))
    failed = next(b for b in rig.sink.of("FLOW-1") if b[0].value is None)
    assert failed[0].quality_reasons[0] in ("connection", "timeout")
    good_before = len([b for b in rig.sink.of("FLOW-1") if b[0].value is not None])
    with TcpSimulator(host, port, rig.tcp_bus):
        rig.sink.wait_for(_count("FLOW-1", good_before + 2, good=True))


def test_calibration_registers_are_written_through_the_port_lock(rig: Rig) -> None:
    rig.sink.wait_for(_count("PH-1", 1))
    rig.engine.write_registers(rig.port, 1, 4, [5800])  # slope 58.00 mV/pH
    assert rig.engine.read_registers(rig.port, 1, "holding", 3, 2) == [0, 5800]
    rig.sink.wait_for(_count("PH-1", len(rig.sink.of("PH-1")) + 2))


def _start_cli(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "simulate", *args],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "serving units" in line, line
    return proc


def test_cli_simulator_serves_several_slaves_on_one_port_to_pymodbus(
    pty_pair: Any, tmp_path: Path
) -> None:
    control = tmp_path / "faults.json"
    proc = _start_cli(
        "--slave", "drivers/ph-int16.toml:5", "--slave", "drivers/uv254-optical.toml:6",
        "--port", pty_pair.b, "--baud", "19200", "--line-timing", "--control", str(control),
    )  # fmt: skip
    client = ModbusSerialClient(pty_pair.a, baudrate=19200, timeout=1, retries=0)
    try:
        assert client.connect()
        ph = client.read_holding_registers(0, count=3, device_id=5)
        assert not ph.isError() and decode(ph.registers[1:2], "int16") == 700
        uv = client.read_input_registers(0, count=2, device_id=6)
        assert not uv.isError() and decode(uv.registers, "float32") == 312.5
        control.write_text(json.dumps({"5": {"fault": "exception"}}))
        failing = client.read_holding_registers(0, count=3, device_id=5)
        assert failing.isError() and failing.exception_code == 4
        assert not client.read_input_registers(0, count=2, device_id=6).isError()
    finally:
        client.close()
        proc.terminate()
        proc.wait(5)


def test_cli_tcp_simulator_is_polled_by_the_engine(tmp_path: Path) -> None:
    port = free_port()
    proc = _start_cli(
        "--profile", "drivers/flowmeter-tcp.toml", "--unit", "7", "--tcp", f"127.0.0.1:{port}"
    )
    sink = RecordingSink()
    device = {"host": "127.0.0.1", "port": port, "unit": 7, "sensor_id": "FT-7", "interval": 0.05,
              "profile": "drivers/flowmeter-tcp.toml", "timeout": TIMEOUT}  # fmt: skip
    table = {"tcp": [device]}
    try:
        with ModbusEngine(load_modbus_config(table, source=ROOT / "config.toml"), sink, Metrics()):
            sink.wait_for(_count("FT-7", 2, good=True))
    finally:
        proc.terminate()
        proc.wait(5)
    assert {r.parameter for r in sink.of("FT-7")[0]} == {"flow_rate", "flow_total", "flow_velocity"}


def test_a_missing_serial_port_gives_flagged_readings_not_a_crash(tmp_path: Path) -> None:
    port = str(tmp_path / "ttyUSB9")
    slave = {"profile": "ph-int16.toml", "sensor_id": "PH-9", "interval": 0.05}
    table = {"serial": [{"port": port, "timeout": TIMEOUT, "backoff_max": 0.1, "slaves": [slave]}]}
    sink, metrics = RecordingSink(), Metrics()
    with ModbusEngine(
        load_modbus_config(table, source=DRIVERS / "x.toml"), sink, metrics
    ) as engine:
        sink.wait_for(_count("PH-9", 2))
        assert engine.devices()[f"modbus {port} unit 1"]["status"] == "unhealthy"
    assert all(r.value is None and r.quality_reasons == ["port"] for b in sink.batches for r in b)
    assert _metric(metrics, "iot_modbus_errors_total", port=port, unit="1", kind="port") >= 2


def test_after_a_crc_error_the_line_is_drained_until_silent_before_the_retry(
    pty_pair: Any,
) -> None:
    """A garbled answer followed by a burst of line noise (about 0.4 s at 9600 baud): the retry
    must wait for the silence after it, or it reads the noise as its answer and fails too."""
    slave = SimSlave(
        load_profile(DRIVERS / "ph-int16.toml"), 1, fault="corrupt_crc", noise_bytes=400,
        fault_answers=1,
    )  # fmt: skip
    probe = {"profile": "ph-int16.toml", "sensor_id": "PH-1", "interval": 0.2}
    port = {"port": pty_pair.a, "timeout": 0.5, "retries": 1, "inter_frame_gap": 0.05,
            "backoff_max": 0.5, "slaves": [probe]}  # fmt: skip
    cfg = load_modbus_config({"serial": [port]}, source=DRIVERS / "config.toml")
    sink, metrics = RecordingSink(), Metrics()
    with RtuSimulator(pty_pair.b, SimBus([slave])), ModbusEngine(cfg, sink, metrics):
        sink.wait_for(_count("PH-1", 1))
    first = sink.of("PH-1")[0]
    assert [r.quality_reasons for r in first if r.value is None] == []
    errors = {
        kind: _metric(metrics, "iot_modbus_errors_total", port=pty_pair.a, unit="1", kind=kind)
        for kind in ("crc", "malformed", "timeout")
    }
    assert errors == {"crc": 1.0, "malformed": 0.0, "timeout": 0.0}
