"""``edge-gateway init``'s pure parts: matching a slave to a shipped profile, the scan loop over a
simulated bus (no serial port), port detection on a fake /dev, and the rendered config, which must
load with the gateway's own loader, with placeholders that load once uncommented."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

import gateway.cli.init as init_cli
from gateway.cli import app
from gateway.cli.init import InitSettings, PortScan, profile_ref, render
from gateway.edge.acquire.modbus.frames import ModbusError, parse_read_response, read_request
from gateway.edge.acquire.modbus.profiles import Profile, SerialDefaults, load_profile
from gateway.edge.acquire.modbus.scan import (
    Found,
    Progress,
    detect_ports,
    identify,
    load_profiles,
    match_profile,
    parse_units,
    plausible_range,
    scan,
)
from gateway.edge.acquire.modbus.simulate import SimBus, SimSlave
from gateway.edge.settings import GatewayConfig, load_gateway_config
from tests.support.services import ROOT

DRIVERS = ROOT / "drivers"
PROFILES, PROFILE_ERRORS = load_profiles(DRIVERS)


def _reader(slave: SimSlave) -> Callable[[str, int, int], list[int]]:
    def read(table: str, start: int, count: int) -> list[int]:
        answer = slave.handle(read_request(table, start, count))
        if answer is None:
            raise ModbusError("timeout")
        return parse_read_response(answer, table, count)

    return read


def _fits(slave: SimSlave) -> list[str]:
    return [m.profile.model for m in identify(PROFILES, _reader(slave)) if m.fits]


# --- matching ------------------------------------------------------------------------------------


def test_every_shipped_profile_loads_for_matching() -> None:
    assert PROFILE_ERRORS == [] and len(PROFILES) >= 5


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: Path(p.source).stem)
@pytest.mark.parametrize("scenario", ["constant", "noise", "drift"])
def test_a_simulated_probe_is_matched_by_its_own_profile_only(
    profile: Profile, scenario: str
) -> None:
    assert _fits(SimSlave(profile, 1, scenario=scenario)) == [profile.model]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: Path(p.source).stem)
def test_a_probe_reporting_its_own_faults_is_still_recognised(profile: Profile) -> None:
    assert _fits(SimSlave(profile, 1, fault="status_fault")) == [profile.model]


def test_a_slave_answering_every_read_with_an_exception_fits_no_profile() -> None:
    slave = SimSlave(PROFILES[0], 1, fault="exception")
    matches = identify(PROFILES, _reader(slave))
    assert not any(m.fits for m in matches)
    assert all("exception:4" in m.reason for m in matches)


def test_misfits_say_why() -> None:
    ph = load_profile(DRIVERS / "ph-int16.toml")
    cond = SimSlave(load_profile(DRIVERS / "conductivity-tds.toml"), 1)
    m = match_profile(ph, _reader(cond))
    assert not m.fits and m.reason == "temperature = 1413 °C is outside -10..100"
    sonde = load_profile(DRIVERS / "sonde-float32-cdab.toml")
    m = match_profile(sonde, _reader(cond))
    assert not m.fits and "status code 9043" in m.reason
    flow = load_profile(DRIVERS / "flowmeter-tcp.toml")
    m = match_profile(flow, _reader(SimSlave(ph, 1)))
    assert not m.fits and m.reason == "reading holding 0+7: exception:2"
    m = match_profile(ph, _reader(SimSlave(ph, 1)))
    assert m.fits and m.reason == "temperature 25 °C, ph 7 pH, electrode_mv 0 mV"


def test_all_sentinels_is_ambiguous_rather_than_a_guess() -> None:
    cond = load_profile(DRIVERS / "conductivity-tds.toml")
    fits = _fits(SimSlave(cond, 1, fault="sentinel"))
    assert cond.model in fits and len(fits) > 1


def test_identify_reads_each_block_once() -> None:
    slave = SimSlave(load_profile(DRIVERS / "ph-int16.toml"), 1)
    asked: list[tuple[str, int, int]] = []
    read = _reader(slave)

    def counting(table: str, start: int, count: int) -> list[int]:
        asked.append((table, start, count))
        return read(table, start, count)

    identify(PROFILES, counting)
    assert len(asked) == len(set(asked))


def test_plausible_range_uses_the_physical_table_else_the_profiles_own_examples() -> None:
    ph = load_profile(DRIVERS / "ph-int16.toml")
    assert plausible_range(ph, ph.value("ph")) == (0.0, 14.0)
    # electrode_mv: nominal 0, vectors 0 and 176.5 mV
    assert plausible_range(ph, ph.value("electrode_mv")) == (-17650.0, 17650.0)


# --- the scan loop -------------------------------------------------------------------------------


class FakeLink:
    """A transport over simulated slaves; ``garbled`` units answer with a bad CRC."""

    def __init__(self, bus: SimBus, line: SerialDefaults, log: list[tuple[int, int]],
                 garbled: set[int]) -> None:  # fmt: skip
        self.bus, self.line, self.log, self.garbled = bus, line, log, garbled
        self.closed = False

    def exchange(self, unit: int, pdu: bytes, timeout: float) -> bytes:
        self.log.append((self.line.baudrate, unit))
        if unit in self.garbled:
            raise ModbusError("crc")
        slave = self.bus.slave(unit)
        answer = None if slave is None else slave.handle(pdu)
        if answer is None:
            raise ModbusError("timeout")
        return answer

    def close(self) -> None:
        self.closed = True


def test_scan_finds_and_identifies_the_slaves_that_answer() -> None:
    ph = load_profile(DRIVERS / "ph-int16.toml")
    uv = load_profile(DRIVERS / "uv254-optical.toml")
    bus = SimBus([SimSlave(ph, 3), SimSlave(uv, 7)])
    log: list[tuple[int, int]] = []
    links: list[FakeLink] = []
    events: list[Progress] = []

    def factory(port: str, line: SerialDefaults) -> FakeLink:
        links.append(FakeLink(bus, line, log, {9}))
        return links[-1]

    found = scan("/dev/fake", [9600, 19200], range(1, 11), 0.1, profiles=PROFILES,
                 progress=events.append, transport=factory)  # fmt: skip
    assert [(f.unit, f.baud, f.parity, f.profile) for f in found] == [
        (3, 9600, "N", ph.source),
        (7, 9600, "N", uv.source),
    ]
    assert found[0].exception is None
    assert found[1].exception == "exception:2"  # no holding register 0: still someone there
    assert "cod 312.5 mg/L" in found[1].details[uv.source]
    assert all(link.closed for link in links) and len(links) == 2
    # found units are not asked again at the next baud rate; a garbled answer is asked twice
    assert [u for b, u in log if b == 19200] == [1, 2, 4, 5, 6, 8, 9, 9, 10]
    assert [(e.unit, e.done, e.total) for e in events if e.baud == 19200][-1] == (10, 8, 8)
    notes = [e for e in events if e.note]
    assert {e.unit for e in notes} == {9} and "baud rate or parity" in notes[0].note


def test_a_port_that_cannot_be_opened_raises() -> None:
    with pytest.raises(ModbusError) as e:
        scan("/nonexistent/ttyUSB9", [9600], [1], 0.05, profiles=PROFILES)
    assert e.value.kind == "port"


def test_scan_refuses_an_unknown_parity() -> None:
    with pytest.raises(ValueError, match="parity"):
        scan("/dev/null", [9600], [1], 0.05, ["X"], profiles=PROFILES)


def test_units_parse_as_ranges_and_lists() -> None:
    assert parse_units("1-3,7, 2") == [1, 2, 3, 7]
    assert parse_units("1-247") == list(range(1, 248))
    for bad in ("0-3", "5-2", "1-300", "x", ""):
        with pytest.raises(ValueError):
            parse_units(bad)


# --- ports ---------------------------------------------------------------------------------------


def test_ports_prefer_by_id_names_and_real_uarts(tmp_path: Path) -> None:
    by_id = tmp_path / "serial" / "by-id"
    by_id.mkdir(parents=True)
    for name in ("ttyUSB0", "ttyUSB1", "ttyS0", "ttyS1", "ttyS10", "ttyS2", "ttyAMA0", "null"):
        (tmp_path / name).touch()
    (by_id / "usb-FTDI_RS485-if00-port0").symlink_to("../../ttyUSB0")
    ports = detect_ports(tmp_path, hardware={str(tmp_path / "ttyS1"): "16550A"})
    names = [(Path(p.path).name, Path(p.device).name, p.likely) for p in ports]
    assert names == [
        ("usb-FTDI_RS485-if00-port0", "ttyUSB0", True),
        ("ttyUSB1", "ttyUSB1", True),
        ("ttyAMA0", "ttyAMA0", True),
        ("ttyS0", "ttyS0", False),
        ("ttyS1", "ttyS1", True),
        ("ttyS2", "ttyS2", False),
        ("ttyS10", "ttyS10", False),
    ]
    assert ports[4].description == "16550A"
    assert init_cli.stable_name(str(tmp_path / "ttyUSB0"), ports) == str(
        by_id / "usb-FTDI_RS485-if00-port0"
    )


# --- rendering -----------------------------------------------------------------------------------


def _settings(tmp_path: Path, **kw: object) -> InitSettings:
    base: dict[str, object] = {
        "output": tmp_path / "config.toml",
        "gateway_id": "gw-1",
        "plant_id": "north",
        "profiles": [str(p) for p in sorted(DRIVERS.glob("*.toml"))],
        "written_at": "2025-01-01",
    }
    base.update(kw)
    return InitSettings(**base)  # type: ignore[arg-type]


def _load(tmp_path: Path, text: str, name: str = "config.toml") -> GatewayConfig:
    path = tmp_path / name
    path.write_text(text)
    return load_gateway_config(path)


def _ref(name: str) -> str:
    return str(DRIVERS / name)


def test_the_unscanned_config_loads_and_keeps_every_example_commented(tmp_path: Path) -> None:
    text = render(_settings(tmp_path, kafka="broker:9092"))
    cfg = _load(tmp_path, text)
    assert cfg.gateway.id == "gw-1" and cfg.gateway.plant_id == "north"
    assert cfg.modbus.serial == [] and not cfg.mqtt.enabled
    assert cfg.kafka.bootstrap_servers == "broker:9092"
    assert cfg.buffer.path == "var/buffer.db"
    assert cfg.calibration.store == "var/calibrations.sqlite"
    assert "# [[modbus.serial.slaves]]" in text and "init --scan" in text
    # secrets appear only as commented references, never as values
    assert '# sasl_password = "cred:kafka-password"' in text
    assert '# password = "cred:mqtt-password"' in text
    assert '# token = "cred:http-token"' in text
    data = tomllib.loads(text)
    assert "sasl_password" not in data["kafka"] and "token" not in data["http"]
    # every section is explained
    for section in ("gateway", "mqtt", "calibration", "validation", "alarms", "buffer", "kafka"):
        assert f"[{section}]" in text
    assert all(len(line) <= 100 for line in text.splitlines() if "/" not in line)


def test_service_mode_keeps_state_under_var_lib(tmp_path: Path) -> None:
    cfg = _load(tmp_path, render(_settings(tmp_path, service=True)))
    assert cfg.buffer.path == "/var/lib/edge-gateway/buffer.db"
    assert cfg.deadletter.path == "/var/lib/edge-gateway/deadletter.db"
    assert cfg.calibration.store == "/var/lib/edge-gateway/calibrations.sqlite"


def test_profile_paths_are_relative_inside_the_configs_folder_else_absolute(
    tmp_path: Path,
) -> None:
    assert profile_ref(_ref("ph-int16.toml"), ROOT / "config.toml") == "drivers/ph-int16.toml"
    assert profile_ref(_ref("ph-int16.toml"), tmp_path / "c.toml") == _ref("ph-int16.toml")


def _found(unit: int, *profiles: str, baud: int = 9600, exception: str | None = None) -> Found:
    refs = tuple(_ref(p) for p in profiles)
    return Found("/dev/ttyUSB0", baud, "N", unit, exception, refs, {r: "x 1 u" for r in refs})


def _scanned(tmp_path: Path) -> InitSettings:
    found = [
        _found(3, "ph-int16.toml"),
        _found(17, "conductivity-tds.toml"),
        _found(20, "uv254-optical.toml", exception="exception:2"),
        _found(5, "conductivity-tds.toml", "ph-int16.toml"),  # ambiguous
        _found(6, exception="exception:4"),  # nothing fits
        _found(9, "sonde-float32-cdab.toml", baud=19200),  # another line setting
    ]
    scans = [PortScan("/dev/ttyUSB0", ["9600 8N1", "19200 8N1"], "1-20", 12.5, found)]
    return _settings(tmp_path, scans=scans)


def test_found_probes_become_slaves_and_the_rest_placeholders(tmp_path: Path) -> None:
    text = render(_scanned(tmp_path))
    cfg = _load(tmp_path, text)
    (port,) = cfg.modbus.serial
    assert port.port == "/dev/ttyUSB0" and (port.baudrate, port.parity) == (9600, "N")
    assert [(s.unit, Path(s.profile).name, s.sensor_id) for s in port.slaves] == [
        (3, "ph-int16.toml", "ph-int16-3"),
        (17, "conductivity-tds.toml", "conductivity-tds-17"),
        (20, "uv254-optical.toml", "uv254-optical-20"),
    ]
    assert all(s.plant_id == "north" for s in port.slaves)
    text = _prose(text)
    assert "unit 5 answered at 9600 8N1; several profiles fit" in text
    assert f"{_ref('ph-int16.toml')}: x 1 u" in text
    assert "unit 6 answered at 9600 8N1 (exception:4); no shipped profile fits" in text
    assert "unit 9 answered at 19200 8N1, not at 9600 8N1 like the others" in text
    assert "in 12.5 s: 6 answered, 3 configured below." in text


def _prose(text: str) -> str:
    """The comments' words in one line, as wrapped lines read."""
    return " ".join(" ".join(line.lstrip("# ").split()) for line in text.splitlines())


def _uncomment(text: str, unit: int) -> str:
    """Uncomment the placeholder slave entry of ``unit``, as a person would."""
    lines = text.splitlines()
    start = next(
        i
        for i, line in enumerate(lines)
        if line == "# [[modbus.serial.slaves]]" and lines[i + 2].startswith(f"# unit = {unit} ")
    )
    end = start
    while lines[end].startswith("# "):
        lines[end] = lines[end][2:]
        end += 1
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("unit", [5, 9])
def test_a_placeholder_loads_once_uncommented(tmp_path: Path, unit: int) -> None:
    text = _uncomment(render(_scanned(tmp_path)), unit)
    cfg = _load(tmp_path, text)
    assert unit in [s.unit for s in cfg.modbus.serial[0].slaves]


def test_a_port_where_nothing_answered_gets_a_commented_example(tmp_path: Path) -> None:
    scans = [
        PortScan("/dev/ttyUSB0", ["9600 8N1"], "1-247", 37.0),
        PortScan("/dev/ttyUSB1", ["9600 8N1"], "1-247", 0.0, error="port: busy"),
    ]
    text = render(_settings(tmp_path, scans=scans))
    assert _load(tmp_path, text).modbus.serial == []
    text = _prose(text)
    assert "/dev/ttyUSB0 at 9600 8N1, units 1-247, in 37.0 s: no probe answered." in text
    assert "the port could not be used (port: busy)" in text


def test_profiles_are_looked_for_next_to_the_config_first(tmp_path: Path) -> None:
    assert init_cli.profile_folder(tmp_path / "config.toml") == DRIVERS
    (tmp_path / "drivers").mkdir()
    (tmp_path / "drivers" / "ph-int16.toml").write_text((DRIVERS / "ph-int16.toml").read_text())
    assert init_cli.profile_folder(tmp_path / "config.toml") == tmp_path / "drivers"
    text = render(_settings(tmp_path, profiles=[str(tmp_path / "drivers" / "ph-int16.toml")]))
    assert '# profile = "drivers/ph-int16.toml"' in text


def test_strings_are_quoted_as_toml(tmp_path: Path) -> None:
    line = init_cli._kv("location", 'a "b" \\ c\n', "note")
    assert tomllib.loads(line) == {"location": 'a "b" \\ c\n'}


# --- the command ---------------------------------------------------------------------------------


def test_init_refuses_to_write_a_config_that_does_not_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(init_cli, "render", lambda s: "[gateway]\nid = 1\n")
    out = tmp_path / "new" / "config.toml"
    result = CliRunner().invoke(app, ["init", "--output", str(out)])
    assert result.exit_code == 2
    assert f"{out}: gateway.id: expected a string" in result.output
    assert not out.parent.exists()


def test_init_checks_its_options(tmp_path: Path) -> None:
    out = str(tmp_path / "c.toml")
    for args in (["--plant-id", "a b"], ["--units", "0-9"], ["--baud", "x"], ["--timeout", "0"]):
        result = CliRunner().invoke(app, ["init", "--output", out, *args])
        assert result.exit_code == 2, args
    assert not (tmp_path / "c.toml").exists()
