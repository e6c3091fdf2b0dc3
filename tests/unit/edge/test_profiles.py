"""Probe profiles: every shipped profile loads and decodes its own test vectors; the simulator
encodes what the decoder reads back; a profile with a mistake is refused with file and key."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.common.config import ConfigError
from gateway.common.model import PARAMETERS, Quality
from gateway.edge.acquire.modbus.profiles import Profile, QualityName, Vector, load_profile
from gateway.edge.acquire.modbus.registers import decode_profile, plan_reads
from gateway.edge.acquire.modbus.simulate import SimSlave
from tests.support.services import ROOT

DRIVERS = ROOT / "drivers"
PROFILES = sorted(DRIVERS.glob("*.toml"))


def _load(name: str) -> Profile:
    return load_profile(DRIVERS / name)


def test_at_least_the_five_kinds_of_probe_ship() -> None:
    types = {(v.type, v.word_order) for p in map(load_profile, PROFILES) for v in p.values}
    assert {
        ("int16", "ABCD"),
        ("float32", "CDAB"),
        ("float32", "ABCD"),
        ("uint32", "CDAB"),
    } <= types
    assert any(v.decimals_register is not None for v in _load("conductivity-tds.toml").values)
    assert any(0x7FA00000 in v.sentinels for v in _load("sonde-float32-cdab.toml").values)
    assert len(PROFILES) >= 5


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_shipped_profile_loads_and_names_process_parameters_as_the_gateway_does(path: Path) -> None:
    profile = load_profile(path)
    assert profile.vectors, "every profile carries test vectors"
    assert any(v.parameter in PARAMETERS for v in profile.values)
    assert all(v.unit for v in profile.values)


def _check_vector(profile: Profile, vec: Vector) -> None:
    """Assert that ``vec``'s register image decodes to its expected numbers, reasons and quality."""
    decoded = {d.spec.name: d for d in decode_profile(profile, vec.image())}
    for name, number in vec.expect.items():
        got = decoded[name].number
        assert got is not None and math.isclose(got, number, rel_tol=1e-6), (vec.name, name)
    for name in vec.unusable:
        assert decoded[name].number is None and decoded[name].quality is Quality.BAD
    for name, reasons in vec.reasons.items():
        assert set(decoded[name].reasons) == set(reasons), (vec.name, name)
        assert (decoded[name].quality is Quality.GOOD) == (not reasons)
    for name, quality in vec.quality.items():
        assert decoded[name].quality is Quality(quality), (vec.name, name, decoded[name].quality)


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_shipped_vectors_decode_to_their_expected_values(path: Path) -> None:
    profile = load_profile(path)
    for vec in profile.vectors:
        _check_vector(profile, vec)


def test_a_vector_expecting_the_wrong_quality_fails_the_check() -> None:
    profile = _load("sonde-float32-cdab.toml")
    vec = next(v for v in profile.vectors if v.name == "pH offline, conductivity uncertain")
    # conductivity's quality word reads 1 (uncertain); its reasons alone cannot tell that from bad
    _check_vector(profile, replace(vec, quality={"conductivity": "uncertain", "ph": "bad"}))
    wrongs: list[dict[str, QualityName]] = [
        {"conductivity": "bad"},
        {"ph": "uncertain"},
        {"tds": "bad"},
    ]
    for wrong in wrongs:
        with pytest.raises(AssertionError, match=next(iter(wrong))):
            _check_vector(profile, replace(vec, quality=wrong))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_simulator_serves_what_the_decoder_reads(path: Path) -> None:
    profile = load_profile(path)
    decoded = decode_profile(profile, SimSlave(profile, profile.serial.unit).image())
    for d in decoded:
        assert d.quality is Quality.GOOD
        assert d.number is not None and math.isclose(
            d.number, d.spec.nominal, rel_tol=1e-6, abs_tol=0.01
        )


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("nan", "nan"), ("sentinel", "sentinel"), ("status_fault", "status_word:2")],
)
def test_simulated_decode_faults_are_flagged_on_the_sonde(fault: str, reason: str) -> None:
    profile = _load("sonde-float32-cdab.toml")
    for d in decode_profile(profile, SimSlave(profile, 1, fault=fault).image()):
        assert reason in d.reasons and d.quality is Quality.BAD


def test_ph_status_fault_flags_the_values_the_bit_affects() -> None:
    profile = _load("ph-int16.toml")
    decoded = {
        d.spec.name: d
        for d in decode_profile(profile, SimSlave(profile, 1, fault="status_fault").image())
    }
    assert decoded["ph"].reasons == ["status:electrode_fault"] and decoded["ph"].number == 7.0
    assert decoded["temperature"].quality is Quality.GOOD


def test_ph_probe_needs_two_reads_because_calibration_sits_between_values_and_status() -> None:
    profile = _load("ph-int16.toml")
    assert len(plan_reads(profile.spans())) == 2
    assert len(plan_reads(profile.spans(), max_gap=2)) == 1


@settings(max_examples=50)
@given(data=st.data())
def test_arbitrary_register_images_decode_or_are_flagged_never_raise(data: st.DataObject) -> None:
    for path in PROFILES:
        profile = load_profile(path)
        image = {
            (b.table, a): data.draw(st.integers(0, 0xFFFF))
            for b in plan_reads(profile.spans())
            for a in range(b.start, b.start + b.count)
            if data.draw(st.integers(0, 20)) > 0  # sometimes a register is missing
        }
        for d in decode_profile(profile, image):
            if d.number is None:
                assert d.quality is Quality.BAD and d.reasons
            else:
                assert math.isfinite(d.number)


GOOD = """
model = "test"
description = "test probe"
[[values]]
name = "ph"
parameter = "pH"
address = 0
type = "int16"
scale = 0.01
unit = "pH"
"""
OVERLAPPING = """
[[values]]
name = "t"
parameter = "temperature"
address = 0
type = "int16"
unit = "°C"
"""


@pytest.mark.parametrize(
    ("extra", "edit", "key", "expected"),
    [
        ("", ('type = "int16"', 'type = "int17"'), "values[0].type", "'int16'"),
        ("", ('unit = "pH"', ""), "values[0].unit", "required key is missing"),
        ("", ('unit = "pH"', 'unit = ""'), "values[0]", "unit must not be empty"),
        ("", ("scale = 0.01", 'word_order = "ACBD"'), "values[0].word_order", "'CDAB'"),
        ("", ("scale = 0.01", "scale = 0.01\ndecimals_register = 4"), "values[0]", "not both"),
        ("", ('parameter = "pH"', 'parameter = "ph"'), "values[0]", "'pH'"),
        ("", ("address = 0", "adress = 0"), "values[0].adress", "did you mean 'address'"),
        (
            OVERLAPPING,
            ("", ""),
            "values[1].address",
            "overlap values[0]",
        ),
        (
            '[[status]]\nname = "s"\naddress = 5\nbits = [{bit = 0, name = "x", affects = ["t"]}]',
            ("", ""),
            "status[0].bits[0].affects",
            "not ['t']",
        ),
        (
            '[[status]]\nname = "s"\naddress = 5\nbits = [{bit = 16, name = "x"}]\n',
            ("", ""),
            "status[0]",
            "does not fit uint16",
        ),
        (
            '[[vectors]]\nname = "v"\nholding = [700]\nquality = { ph = "fine" }\n',
            ("", ""),
            "vectors[0].quality.ph",
            "one of 'good', 'uncertain', 'bad', got 'fine'",
        ),
        (
            # A probe that reads at most one register per request can never read a float32.
            '[[values]]\nname = "t"\nparameter = "temperature"\naddress = 4\n'
            'type = "float32"\nunit = "°C"\n',
            ("model =", "max_read = 1\nmodel ="),
            "max_read",
            "values[1] (t) is a float32 of 2 registers",
        ),
        (
            '[[status]]\nname = "s"\naddress = 5\ntype = "uint32"\n'
            'bits = [{bit = 0, name = "x"}]\n',
            ("model =", "max_read = 1\nmodel ="),
            "max_read",
            "status[0] (s) is a uint32 of 2 registers",
        ),
        (
            '[[vectors]]\nname = "v"\nholding = [700]\nquality = { pH = "good" }\n',
            ("", ""),
            "vectors[0]",
            "not ['pH']",
        ),
    ],
)
def test_a_broken_profile_is_refused_naming_file_key_and_expectation(
    tmp_path: Path, extra: str, edit: tuple[str, str], key: str, expected: str
) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(GOOD.replace(*edit) + extra)
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    assert e.value.source == str(path)
    assert e.value.key == key
    assert expected in e.value.expected


def test_the_good_base_profile_loads(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    assert load_profile(path).values[0].parameter == "pH"
