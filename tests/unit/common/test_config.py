from dataclasses import dataclass, field
from typing import Literal

import pytest

from gateway.common.config import ConfigError, build, load_toml, secret


@dataclass
class Serial:
    port: str
    baudrate: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    timeout: float = 0.5


@dataclass
class Section:
    name: str
    serial: list[Serial] = field(default_factory=list)
    limits: dict[str, float] = field(default_factory=dict)
    enabled: bool = True

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"name must be an identifier, got {self.name!r}")


def test_builds_nested_typed_sections():
    s = build(
        Section,
        {"name": "a", "serial": [{"port": "/dev/ttyUSB0", "timeout": 1}], "limits": {"BOD": 30}},
        source="plant.toml",
    )
    assert s.serial[0].timeout == 1.0 and s.serial[0].baudrate == 9600
    assert s.limits == {"BOD": 30.0}


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        (
            {"name": "a", "serial": [{"port": "p", "baudrate": "9600"}]},
            "gw.serial[0].baudrate",
            "expected an integer, got '9600'",
        ),
        (
            {"name": "a", "serial": [{"port": "p", "parity": "X"}]},
            "gw.serial[0].parity",
            "expected one of 'N', 'E', 'O'",
        ),
        ({"name": "a", "enabeld": True}, "gw.enabeld", "did you mean 'enabled'"),
        ({"name": "a", "serial": [{}]}, "gw.serial[0].port", "required key is missing"),
        ({"name": "a", "limits": {"BOD": "high"}}, "gw.limits.BOD", "expected a number"),
        ({"name": "not ok"}, "gw", "name must be an identifier"),
        ({"name": "a", "enabled": 1}, "gw.enabled", "expected true or false"),
    ],
)
def test_errors_name_the_file_the_key_and_what_was_expected(data, key, expected):
    with pytest.raises(ConfigError) as e:
        build(Section, data, source="/etc/edge-gateway/config.toml", prefix="gw")
    assert e.value.source == "/etc/edge-gateway/config.toml"
    assert e.value.key == key
    assert expected in str(e.value)


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
