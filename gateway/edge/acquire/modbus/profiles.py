"""Probe profiles: one TOML file per probe model in ``drivers/``, describing its registers.

The Modbus engine polls and decodes a probe from its profile alone and the simulator serves the same
profile, so adding a probe needs no code. ``load_profile`` rejects a profile with a mistake
(unknown type or word order, overlapping registers, missing unit, both scale and decimals register,
an unknown quality in a test vector) with a ConfigError naming the file, the key and what was
expected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gateway.common.config import ConfigError, build, load_toml
from gateway.common.model import PARAMETERS
from gateway.edge.acquire.modbus.registers import MAX_READ, Span, width

Table = Literal["holding", "input"]
TypeName = Literal["int16", "uint16", "int32", "uint32", "float32", "float64"]
WordOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]
QualityName = Literal["good", "uncertain", "bad"]
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _check_address(address: int, type_name: str) -> None:
    if not 0 <= address <= 0x10000 - width(type_name):
        raise ValueError(f"address {address} is outside 0..{0x10000 - width(type_name)}")


@dataclass
class SerialDefaults:
    baudrate: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    unit: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.unit <= 247:
            raise ValueError(f"unit must be a slave address 1..247, got {self.unit}")
        if self.baudrate <= 0:
            raise ValueError(f"baudrate must be positive, got {self.baudrate}")


@dataclass
class ValueSpec:
    """One measured value: where it lives, how it is encoded, what it means."""

    name: str
    parameter: str
    address: int  # zero-based wire address ("40001" in a manual is holding 0)
    type: TypeName
    unit: str
    table: Table = "holding"
    word_order: WordOrder = "ABCD"
    scale: float = 1.0
    offset: float = 0.0
    decimals_register: int | None = None  # value = raw / 10**register, instead of scale/offset
    status_word: int | None = None  # per-value quality code register (same table)
    status_codes: dict[str, QualityName] = field(
        default_factory=lambda: {"0": "good", "1": "uncertain", "2": "bad"}
    )
    sentinels: list[int] = field(default_factory=list)  # raw bit patterns, ABCD order
    sentinel_values: list[float] = field(default_factory=list)  # decoded values before scaling
    nominal: float = 0.0  # a typical reading: the simulator's scenarios start from it
    description: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must be snake_case")
        if not self.unit.strip():
            raise ValueError("unit must not be empty (dimensionless values say so, e.g. 'pH')")
        for known in PARAMETERS:
            if self.parameter != known and self.parameter.lower() == known.lower():
                raise ValueError(f"parameter {self.parameter!r}: the name is {known!r}")
        if self.parameter not in PARAMETERS and not _NAME.match(self.parameter):
            raise ValueError(f"parameter {self.parameter!r}: one of {PARAMETERS} or snake_case")
        _check_address(self.address, self.type)
        scaled = self.scale != 1.0 or self.offset != 0.0
        if self.decimals_register is not None and scaled:
            raise ValueError("give either scale/offset or decimals_register, not both")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        bits = 16 * width(self.type)
        bad = [s for s in self.sentinels if not 0 <= s < 1 << bits]
        if bad:
            raise ValueError(f"sentinels {bad} do not fit {self.type} ({bits} bits)")

    def spans(self) -> list[Span]:
        out = [Span(self.table, self.address, width(self.type))]
        out += [
            Span(self.table, a, 1)
            for a in (self.decimals_register, self.status_word)
            if a is not None
        ]
        return out


@dataclass
class StatusBit:
    bit: int
    name: str
    quality: Literal["uncertain", "bad"] = "bad"
    affects: list[str] = field(default_factory=list)  # value names; empty: the register's


@dataclass
class StatusRegister:
    name: str
    address: int
    bits: list[StatusBit]
    table: Table = "holding"
    type: Literal["uint16", "uint32"] = "uint16"
    word_order: WordOrder = "ABCD"
    affects: list[str] = field(default_factory=list)  # value names; empty: every value

    def __post_init__(self) -> None:
        _check_address(self.address, self.type)
        for b in self.bits:
            if not 0 <= b.bit < 16 * width(self.type):
                raise ValueError(f"bit {b.bit} ({b.name}) does not fit {self.type}")


@dataclass
class CalibrationRegister:
    """A calibration parameter the probe stores (read and written on demand, never polled)."""

    name: str
    address: int
    type: TypeName
    unit: str
    table: Table = "holding"
    word_order: WordOrder = "ABCD"
    scale: float = 1.0
    offset: float = 0.0
    default: float = 0.0  # factory value (served by the simulator)
    description: str = ""

    def __post_init__(self) -> None:
        _check_address(self.address, self.type)


@dataclass
class Vector:
    """A register image and what it must decode to: shared by decoder and simulator tests."""

    name: str
    holding: list[int] = field(default_factory=list)  # registers from holding_start
    input: list[int] = field(default_factory=list)
    holding_start: int = 0
    input_start: int = 0
    expect: dict[str, float] = field(default_factory=dict)  # value name -> number
    unusable: list[str] = field(default_factory=list)  # values that must decode to None
    reasons: dict[str, list[str]] = field(default_factory=dict)  # value name -> quality reasons
    quality: dict[str, QualityName] = field(default_factory=dict)  # value name -> quality level

    def image(self) -> dict[tuple[str, int], int]:
        img = {("holding", self.holding_start + i): r for i, r in enumerate(self.holding)}
        img.update({("input", self.input_start + i): r for i, r in enumerate(self.input)})
        return img


@dataclass
class Profile:
    model: str
    description: str
    values: list[ValueSpec]
    serial: SerialDefaults = field(default_factory=SerialDefaults)
    status: list[StatusRegister] = field(default_factory=list)
    calibration: list[CalibrationRegister] = field(default_factory=list)
    vectors: list[Vector] = field(default_factory=list)
    max_read: int = MAX_READ  # some probes accept fewer registers per request
    source: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.max_read <= MAX_READ:
            raise ValueError(f"max_read must be 1..{MAX_READ}, got {self.max_read}")
        if not self.values:
            raise ValueError("a profile needs at least one value")

    def spans(self) -> list[Span]:
        """Every register a poll reads: values, their decimals and status words, status words."""
        out = [s for v in self.values for s in v.spans()]
        return out + [Span(s.table, s.address, width(s.type)) for s in self.status]

    def value(self, name: str) -> ValueSpec:
        return next(v for v in self.values if v.name == name)


def _layout_errors(p: Profile) -> tuple[str, str] | None:
    """Cross-field checks build() cannot do: (key, expected) of the first problem, if any."""
    names = [v.name for v in p.values]
    read = [
        *((f"values[{i}]", v.name, v.type) for i, v in enumerate(p.values)),
        *((f"status[{i}]", s.name, s.type) for i, s in enumerate(p.status)),
        *((f"calibration[{i}]", c.name, c.type) for i, c in enumerate(p.calibration)),
    ]
    for key, name, type_name in read:
        if width(type_name) > p.max_read:
            return "max_read", (
                f"at least the registers of the widest value, {p.max_read} is too few: "
                f"{key} ({name}) is a {type_name} of {width(type_name)} registers"
            )
    owned: dict[tuple[str, int], str] = {}  # registers of values, status and calibration
    items = [
        *((f"values[{i}]", v.table, v.address, width(v.type)) for i, v in enumerate(p.values)),
        *((f"status[{i}]", s.table, s.address, width(s.type)) for i, s in enumerate(p.status)),
        *(
            (f"calibration[{i}]", c.table, c.address, width(c.type))
            for i, c in enumerate(p.calibration)
        ),
    ]
    for key, table, address, count in items:
        for a in range(address, address + count):
            if (table, a) in owned:
                return (
                    f"{key}.address",
                    f"registers that do not overlap {owned[table, a]} ({table} {a})",
                )
            owned[table, a] = key
    seen: dict[str, str] = {}
    for i, v in enumerate(p.values):
        if v.name in seen or v.parameter in seen.values():
            return f"values[{i}]", f"a unique name and parameter, {v.name}/{v.parameter} repeats"
        seen[v.name] = v.parameter
        for attr in ("decimals_register", "status_word"):
            a = getattr(v, attr)
            if a is not None and (v.table, a) in owned:
                return f"values[{i}].{attr}", f"a register of its own, {a} is {owned[v.table, a]}"
    for i, s in enumerate(p.status):
        for j, b in enumerate(s.bits):
            for key, affects in (
                (f"status[{i}]", s.affects),
                (f"status[{i}].bits[{j}]", b.affects),
            ):
                unknown = sorted(set(affects) - set(names))
                if unknown:
                    return f"{key}.affects", f"value names ({', '.join(names)}), not {unknown}"
    for i, vec in enumerate(p.vectors):
        pinned = set(vec.expect) | set(vec.unusable) | set(vec.reasons) | set(vec.quality)
        unknown = sorted(pinned - set(names))
        if unknown:
            return f"vectors[{i}]", f"value names ({', '.join(names)}), not {unknown}"
    return None


def load_profile(path: str | Path) -> Profile:
    """Load and check one probe profile; ConfigError(file, key, expected) if it has a mistake."""
    profile = build(Profile, load_toml(path), source=path)
    problem = _layout_errors(profile)
    if problem is not None:
        raise ConfigError(path, *problem)
    profile.source = str(path)
    return profile
