"""Modbus register encodings, decoded explicitly: pure functions, no I/O.

A value of N registers is turned into its big-endian bytes ("ABCD") by undoing the wire's word
order, then unpacked. Word orders, for 123456.0 = 0x47F12000:
ABCD [0x47F1, 0x2000], CDAB [0x2000, 0x47F1] (words reversed), BADC [0xF147, 0x0020] (bytes swapped
in each word), DCBA [0x0020, 0xF147] (both). The same rules apply to 1- and 4-register types.
pymodbus's own word-order flag reverses whole multi-value reads, so it is not used.

``decode_profile`` interprets a profile against a register image: sentinels, NaN/Inf, scale or
decimal-places register, per-value status word and status fault bits, each flagged on the value.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.common.model import Quality, Rejection

if TYPE_CHECKING:
    from gateway.edge.acquire.modbus.profiles import Profile, ValueSpec

# type name -> (registers, struct format of the big-endian bytes)
TYPES: dict[str, tuple[int, str]] = {
    "int16": (1, ">h"),
    "uint16": (1, ">H"),
    "int32": (2, ">i"),
    "uint32": (2, ">I"),
    "float32": (2, ">f"),
    "float64": (4, ">d"),
}
WORD_ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
MAX_READ = 125  # registers per read request (Modbus spec limit for function codes 3 and 4)

RegisterImage = Mapping[tuple[str, int], int]  # (table, address) -> register value


def width(type_name: str) -> int:
    return TYPES[type_name][0]


def _reorder(words: Sequence[int], word_order: str) -> list[int]:
    """ABCD <-> wire order; the transformation is its own inverse."""
    out = list(words)
    if word_order in ("CDAB", "DCBA"):
        out.reverse()
    if word_order in ("BADC", "DCBA"):
        out = [((w & 0xFF) << 8) | (w >> 8) for w in out]
    return out


def _check_block(regs: Sequence[int], type_name: str, word_order: str) -> Rejection | None:
    if type_name not in TYPES:
        return Rejection("unknown_type", repr(type_name))
    if word_order not in WORD_ORDERS:
        return Rejection("unknown_word_order", repr(word_order))
    if len(regs) != width(type_name):
        return Rejection("bad_block", f"{type_name} needs {width(type_name)} registers")
    if not all(isinstance(r, int) and 0 <= r <= 0xFFFF for r in regs):
        return Rejection("bad_block", "registers must be integers 0..65535")
    return None


def raw_pattern(regs: Sequence[int], word_order: str) -> int:
    """The value's bits as one unsigned integer in ABCD order (what sentinels are written as)."""
    return int.from_bytes(b"".join(w.to_bytes(2, "big") for w in _reorder(regs, word_order)))


def decode(
    regs: Sequence[int], type_name: str, word_order: str = "ABCD"
) -> int | float | Rejection:
    """Decode one value from its registers, or say why not. Never raises."""
    bad = _check_block(regs, type_name, word_order)
    if bad is not None:
        return bad
    data = raw_pattern(regs, word_order).to_bytes(2 * len(regs))
    number: int | float = struct.unpack(TYPES[type_name][1], data)[0]
    return number


def encode(number: float, type_name: str, word_order: str = "ABCD") -> list[int]:
    """Registers for ``number`` (integers are rounded); ValueError if it does not fit the type."""
    fmt = TYPES[type_name][1]
    value: int | float = number if type_name.startswith("float") else round(number)
    try:
        data = struct.pack(fmt, value)
    except (struct.error, OverflowError) as e:
        raise ValueError(f"{number!r} does not fit {type_name}: {e}") from None
    words = [int.from_bytes(data[i : i + 2]) for i in range(0, len(data), 2)]
    return _reorder(words, word_order)


def encode_pattern(pattern: int, type_name: str, word_order: str = "ABCD") -> list[int]:
    """Registers carrying a raw bit pattern (a sentinel or a NaN) in the given word order."""
    n = width(type_name)
    words = [(pattern >> (16 * (n - 1 - i))) & 0xFFFF for i in range(n)]
    return _reorder(words, word_order)


def clamp(number: float, type_name: str) -> float:
    """Limit ``number`` to what an integer type can hold (floats are returned as they are)."""
    if type_name.startswith("float") or math.isnan(number):
        return number
    bits = 16 * width(type_name)
    lo, hi = (
        (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if type_name[0] == "i" else (0, 2**bits - 1)
    )
    return min(max(number, lo), hi)


# --- read plan -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Span:
    table: str
    address: int
    count: int


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: ``count`` registers of ``table`` from ``start``."""

    table: str
    start: int
    count: int


def plan_reads(
    spans: Iterable[Span], *, max_count: int = MAX_READ, max_gap: int = 0
) -> list[Block]:
    """Coalesce register spans per table into as few contiguous blocks as the limits allow.

    Spans closer than ``max_gap`` unused registers share a block (the gap is read and ignored);
    no block exceeds ``max_count`` registers. Spans may overlap (a shared decimals register).
    """
    spans = list(spans)
    blocks: list[Block] = []
    for table in sorted({s.table for s in spans}):
        start = end = -1
        for s in sorted((s for s in spans if s.table == table), key=lambda s: s.address):
            s_end = s.address + s.count
            if start >= 0 and s.address <= end + max_gap and max(end, s_end) - start <= max_count:
                end = max(end, s_end)
                continue
            if start >= 0:
                blocks.append(Block(table, start, end - start))
            start, end = s.address, s_end
        if start >= 0:
            blocks.append(Block(table, start, end - start))
    return blocks


def block_image(block: Block, regs: Sequence[int]) -> dict[tuple[str, int], int]:
    return {(block.table, block.start + i): r for i, r in enumerate(regs)}


# --- profile decoding ----------------------------------------------------------------------------


@dataclass(slots=True)
class Decoded:
    """One value of a profile after decoding: the number (None if unusable) and its quality."""

    spec: ValueSpec
    number: float | None
    quality: Quality = Quality.GOOD
    reasons: list[str] = field(default_factory=list)

    def flag(self, quality: Quality, reason: str) -> None:
        self.quality = self.quality.worst(quality)
        if reason not in self.reasons:
            self.reasons.append(reason)


def _regs(image: RegisterImage, table: str, address: int, count: int) -> list[int] | None:
    out = [image.get((table, a)) for a in range(address, address + count)]
    return None if any(r is None for r in out) else [r for r in out if r is not None]


def _number(spec: ValueSpec, image: RegisterImage, d: Decoded) -> float | None:
    regs = _regs(image, spec.table, spec.address, width(spec.type))
    if regs is None:
        d.flag(Quality.BAD, "missing_registers")
        return None
    if raw_pattern(regs, spec.word_order) in spec.sentinels:
        d.flag(Quality.BAD, "sentinel")
        return None
    raw = decode(regs, spec.type, spec.word_order)
    if isinstance(raw, Rejection):
        d.flag(Quality.BAD, raw.reason)
        return None
    if isinstance(raw, float) and not math.isfinite(raw):
        d.flag(Quality.BAD, "nan" if math.isnan(raw) else "inf")
        return None
    if raw in spec.sentinel_values:
        d.flag(Quality.BAD, "sentinel")
        return None
    if spec.decimals_register is None:
        number = float(raw) * spec.scale + spec.offset
    else:
        decimals = image.get((spec.table, spec.decimals_register))
        if decimals is None or decimals > 9:
            d.flag(Quality.BAD, f"bad_decimals:{decimals}")
            return None
        number = float(raw) / 10**decimals
    # Report the digits the encoding carries: float32 98.4 is not 98.4000015258789.
    return float(f"{number:.{7 if spec.type == 'float32' else 15}g}")


def decode_value(spec: ValueSpec, image: RegisterImage) -> Decoded:
    d = Decoded(spec, None)
    d.number = _number(spec, image, d)
    if spec.status_word is not None:
        code = image.get((spec.table, spec.status_word))
        quality = spec.status_codes.get(str(code), "bad")
        if quality != "good":
            d.flag(Quality(quality), f"status_word:{code}")
    return d


def decode_profile(profile: Profile, image: RegisterImage) -> list[Decoded]:
    """Decode every value of ``profile`` from ``image``, with status bits applied. Never raises."""
    decoded = {v.name: decode_value(v, image) for v in profile.values}
    for status in profile.status:
        regs = _regs(image, status.table, status.address, width(status.type))
        if regs is None:
            for name in status.affects or decoded:
                decoded[name].flag(Quality.UNCERTAIN, "status_unavailable")
            continue
        word = raw_pattern(regs, status.word_order)
        for bit in status.bits:
            if word >> bit.bit & 1:
                for name in bit.affects or status.affects or decoded:
                    decoded[name].flag(Quality(bit.quality), f"status:{bit.name}")
    return list(decoded.values())


# --- every reading of a register dump (diagnostics) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Decoding:
    """One way to read registers at ``offset``: type, word order (2-register types), number."""

    offset: int
    type: str
    word_order: str
    value: float | int | None  # None: NaN/Inf or not decodable

    def scaled(self, scale: float) -> float | None:
        return None if self.value is None else self.value * scale


def every_decoding(regs: Sequence[int]) -> list[Decoding]:
    """int16/uint16 of each register and int32/uint32/float32 of each pair in the four word
    orders, so an encoding can be found by eye."""
    out: list[Decoding] = []
    for i in range(len(regs)):
        for t in ("int16", "uint16"):
            out.append(Decoding(i, t, "", _finite(decode(regs[i : i + 1], t))))
        if i + 1 < len(regs):
            for t in ("int32", "uint32", "float32"):
                for order in WORD_ORDERS:
                    number = _finite(decode(regs[i : i + 2], t, order))
                    out.append(Decoding(i, t, order, number))
    return out


def _finite(x: int | float | Rejection) -> int | float | None:
    if isinstance(x, Rejection) or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(f"{x:.7g}") if isinstance(x, float) else x  # float32: 7 significant digits
