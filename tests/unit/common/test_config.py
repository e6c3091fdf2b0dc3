"""Config files: a good one loads with typed values, a broken one names the file, the key and what
was expected.

The file-level cases are data, one per file in ``tests/cases/config/``: the config under test, then
an ``[expect]`` table (always last), either

    [expect]
    service = "processor"      # optional: which loader reads the file; default "gateway"
    key = "modbus.serial[0].baudrate"
    error_contains = ["expected an integer"]    # each must be in the error's expectation

or, for a good file, ``[expect.values]`` mapping a path into the loaded config
(``"modbus.serial[0].timeout" = 1.0``) to its value and type. The ``[expect]`` table is cut off
before loading, and the rest is loaded from its own file by the real loader.
"""

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.common.config import ConfigError, build, load_toml, secret
from gateway.edge.settings import load_gateway_config
from gateway.processor.settings import load_processor_config
from tests.support.services import ROOT

CASES = sorted((ROOT / "tests" / "cases" / "config").glob("*.toml"))
LOADERS = {"gateway": load_gateway_config, "processor": load_processor_config}
EXPECT_KEYS = {"service", "key", "error_contains", "values"}
_EXPECT_HEADER = re.compile(r"^\[expect[.\]]", re.MULTILINE)


def _split_case(case: Path) -> tuple[str, dict[str, Any]]:
    """The case's config text (all before ``[expect]``) and its expectation table."""
    text = case.read_text()
    start = _EXPECT_HEADER.search(text)
    assert start, f"{case.name}: no [expect] table"
    config_text = text[: start.start()]
    whole = tomllib.loads(text)
    expect = whole.pop("expect")
    assert tomllib.loads(config_text) == whole, f"{case.name}: [expect] must be the last table"
    assert set(expect) <= EXPECT_KEYS, f"{case.name}: unknown [expect] keys"
    assert ("values" in expect) != ("key" in expect), f"{case.name}: expect values or a key"
    return config_text, expect


def _value_at(config: Any, path: str) -> Any:
    for part in re.findall(r"\[\d+\]|[^.\[\]]+", path):
        if part.startswith("["):
            config = config[int(part[1:-1])]
        elif isinstance(config, dict):
            config = config[part]
        else:
            config = getattr(config, part)
    return config


def check_config_case(case: Path, workdir: Path) -> None:
    config_text, expect = _split_case(case)
    path = workdir / case.name
    path.write_text(config_text)
    drivers = workdir / "drivers"  # profile paths are relative to the config file's folder
    if not drivers.exists():
        drivers.symlink_to(ROOT / "drivers")
    load = LOADERS[expect.get("service", "gateway")]
    if "values" in expect:
        config = load(path)
        for where, want in expect["values"].items():
            got = _value_at(config, where)
            assert (got, type(got)) == (want, type(want)), where
        return
    with pytest.raises(ConfigError) as e:
        load(path)
    assert e.value.source == str(path)
    assert e.value.key == expect["key"]
    assert str(e.value).startswith(f"{path}: {expect['key']}: ")
    assert expect["error_contains"], f"{case.name}: say what the error must contain"
    for text in expect["error_contains"]:
        assert text in e.value.expected, (text, e.value.expected)


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_config_cases(case: Path, tmp_path: Path) -> None:
    check_config_case(case, tmp_path)


@pytest.mark.parametrize(
    ("name", "wrong"),
    [
        ("modbus-baudrate-not-an-integer", ('key = "modbus.serial[0].baudrate"', 'key = "x"')),
        ("modbus-baudrate-not-an-integer", ("got '9600'", "got 9600")),
        ("mqtt-port-zero", ("[mqtt]\nport = 0", "[mqtt]\nport = 1")),
        ("ok-integers-become-numbers", ('BOD" = 30.0', 'BOD" = 30')),
        ("ok-integers-become-numbers", ('"mqtt.port" = 1883', '"mqtt.port" = 1884')),
    ],
)
def test_a_case_with_a_wrong_expectation_fails(name: str, wrong: tuple[str, str], tmp_path: Path):
    text = (ROOT / "tests" / "cases" / "config" / f"{name}.toml").read_text()
    assert wrong[0] in text
    case = tmp_path / "cases" / f"{name}.toml"
    case.parent.mkdir()
    case.write_text(text.replace(*wrong))
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        check_config_case(case, tmp_path)


@dataclass
class Serial:
    port: str
    baudrate: int = 9600
    timeout: float = 0.5


@dataclass
class Section:
    name: str
    serial: list[Serial] = field(default_factory=list)
    limits: dict[str, float] = field(default_factory=dict)


def test_builds_nested_typed_sections():
    s = build(
        Section,
        {"name": "a", "serial": [{"port": "/dev/ttyUSB0", "timeout": 1}], "limits": {"BOD": 30}},
        source="plant.toml",
    )
    assert s.serial[0].timeout == 1.0 and s.serial[0].baudrate == 9600
    assert s.limits == {"BOD": 30.0}


def test_broken_toml_names_the_file(tmp_path):
    p = tmp_path / "config.toml"
    p.write_text("[buffer\npath = 1\n")
    with pytest.raises(ConfigError, match=r"config\.toml: not valid TOML"):
        load_toml(p)


def test_secrets_come_from_the_environment_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KAFKA_PW", "s3cret")
    assert secret("env:KAFKA_PW", source="c.toml", key="kafka.password") == "s3cret"
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    assert secret(f"file:{f}", source="c.toml", key="kafka.password") == "from-file"
    with pytest.raises(ConfigError, match=r"kafka\.password: environment variable NOPE is not set"):
        secret("env:NOPE", source="c.toml", key="kafka.password")


def test_a_secret_may_be_a_systemd_credential(monkeypatch, tmp_path):
    (tmp_path / "kafka-password").write_text("from-systemd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert secret("cred:kafka-password", source="c.toml", key="kafka.password") == "from-systemd"
    with pytest.raises(ConfigError, match=r"kafka\.password: .*credential nope"):
        secret("cred:nope", source="c.toml", key="kafka.password")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        secret("cred:kafka-password", source="c.toml", key="kafka.password")
