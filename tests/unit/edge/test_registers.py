"""Register decoding, encoding, read plans and RTU framing: the pure functions under the engine."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.client import ModbusTcpClient

from gateway.common.model import Rejection
from gateway.edge.acquire.modbus.frames import (
    ModbusError,
    crc16,
    crc_ok,
    parse_read_response,
    rtu_frame,
)
from gateway.edge.acquire.modbus.registers import (
    TYPES,
    WORD_ORDERS,
    Block,
    Span,
    decode,
    encode,
    encode_pattern,
    plan_reads,
    raw_pattern,
)

# 123456.0 in every type that holds it, as ABCD registers (most significant word first).
VECTOR_ABCD = {
    "float32": [0x47F1, 0x2000],
    "float64": [0x40FE, 0x2400, 0x0000, 0x0000],
    "int32": [0x0001, 0xE240],
    "uint32": [0x0001, 0xE240],
}
# The word orders as the domain notes give them for float32 123456.0 = 0x47F12000.
FLOAT32_ORDERS = {
    "ABCD": [0x47F1, 0x2000],
    "CDAB": [0x2000, 0x47F1],
    "BADC": [0xF147, 0x0020],
    "DCBA": [0x0020, 0xF147],
}


def _reorder(words: list[int], order: str) -> list[int]:
    """An independent spelling of the four orders, for the other widths."""
    out = list(reversed(words)) if order in ("CDAB", "DCBA") else list(words)
    return [((w << 8) & 0xFF00) | (w >> 8) for w in out] if order in ("BADC", "DCBA") else out


@pytest.mark.parametrize("order", WORD_ORDERS)
def test_float32_vector_decodes_in_every_word_order(order: str) -> None:
    assert decode(FLOAT32_ORDERS[order], "float32", order) == 123456.0
    assert encode(123456.0, "float32", order) == FLOAT32_ORDERS[order]


@pytest.mark.parametrize("order", WORD_ORDERS)
@pytest.mark.parametrize("type_name", sorted(VECTOR_ABCD))
def test_123456_decodes_in_each_type_and_word_order(type_name: str, order: str) -> None:
    regs = _reorder(VECTOR_ABCD[type_name], order)
    assert decode(regs, type_name, order) == 123456
    assert encode(123456, type_name, order) == regs


@pytest.mark.parametrize("order", WORD_ORDERS)
def test_16_bit_types_swap_bytes_only_in_badc_and_dcba(order: str) -> None:
    regs = [0xE240] if order in ("ABCD", "CDAB") else [0x40E2]
    assert decode(regs, "uint16", order) == 0xE240
    assert decode(regs, "int16", order) == 0xE240 - 0x10000


@pytest.mark.parametrize("type_name", ["int32", "uint32", "float32"])
def test_abcd_agrees_with_pymodbus(type_name: str) -> None:
    regs = VECTOR_ABCD[type_name]
    pm_type = getattr(ModbusTcpClient.DATATYPE, type_name.upper())
    assert ModbusTcpClient.convert_from_registers(regs, pm_type) == decode(regs, type_name)


def test_nan_sentinel_pattern_is_seen_in_any_word_order() -> None:
    for order in WORD_ORDERS:
        regs = encode_pattern(0x7FA00000, "float32", order)
        assert raw_pattern(regs, order) == 0x7FA00000
        value = decode(regs, "float32", order)
        assert isinstance(value, float) and math.isnan(value)


def test_values_that_do_not_fit_are_refused_by_encode() -> None:
    with pytest.raises(ValueError):
        encode(40000, "int16")
    with pytest.raises(ValueError):
        encode(-1, "uint32")


@pytest.mark.parametrize(
    ("regs", "type_name", "order", "reason"),
    [
        ([1], "float32", "ABCD", "bad_block"),
        ([1, 2, 3], "int32", "ABCD", "bad_block"),
        ([70000], "uint16", "ABCD", "bad_block"),
        ([1], "int17", "ABCD", "unknown_type"),
        ([1], "int16", "ACBD", "unknown_word_order"),
    ],
)
def test_bad_blocks_are_labelled_rejections(
    regs: list[int], type_name: str, order: str, reason: str
) -> None:
    result = decode(regs, type_name, order)
    assert isinstance(result, Rejection) and result.reason == reason


@given(
    regs=st.lists(st.integers(min_value=-5, max_value=0x1FFFF), max_size=6),
    type_name=st.sampled_from([*TYPES, "int8", ""]),
    order=st.sampled_from([*WORD_ORDERS, "XYZW"]),
)
def test_arbitrary_blocks_decode_or_are_rejected_never_raise(
    regs: list[int], type_name: str, order: str
) -> None:
    result = decode(regs, type_name, order)
    assert isinstance(result, int | float | Rejection)


@given(
    type_name=st.sampled_from(sorted(TYPES)),
    order=st.sampled_from(WORD_ORDERS),
    data=st.data(),
)
def test_encode_then_decode_round_trips(type_name: str, order: str, data: st.DataObject) -> None:
    n = TYPES[type_name][0]
    regs = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=n, max_size=n))
    value = decode(regs, type_name, order)
    assert not isinstance(value, Rejection)
    if isinstance(value, float) and math.isnan(value):
        return  # NaN payload bits are not preserved by float arithmetic
    assert encode(value, type_name, order) == regs


def test_contiguous_spans_become_one_block_per_table() -> None:
    spans = [
        Span("holding", 0, 2),
        Span("holding", 2, 1),
        Span("input", 0, 2),
        Span("holding", 3, 2),
    ]
    assert plan_reads(spans) == [Block("holding", 0, 5), Block("input", 0, 2)]


def test_a_gap_splits_blocks_unless_max_gap_allows_it() -> None:
    spans = [Span("holding", 0, 3), Span("holding", 5, 1)]
    assert plan_reads(spans) == [Block("holding", 0, 3), Block("holding", 5, 1)]
    assert plan_reads(spans, max_gap=2) == [Block("holding", 0, 6)]


def test_blocks_never_exceed_125_registers_nor_split_a_value() -> None:
    spans = [Span("holding", a, 2) for a in range(0, 300, 2)]
    blocks = plan_reads(spans)
    assert all(b.count <= 125 for b in blocks)
    assert sum(b.count for b in blocks) == 300
    assert all(b.start % 2 == 0 for b in blocks)  # a float never straddles two requests
    assert plan_reads(spans, max_count=10)[0] == Block("holding", 0, 10)


def test_shared_and_overlapping_spans_are_read_once() -> None:
    spans = [
        Span("holding", 0, 1),
        Span("holding", 1, 1),
        Span("holding", 1, 1),
        Span("holding", 0, 2),
    ]
    assert plan_reads(spans) == [Block("holding", 0, 2)]


def test_crc_matches_a_known_modbus_frame() -> None:
    frame = rtu_frame(1, bytes([0x03, 0x00, 0x00, 0x00, 0x02]))
    assert frame == bytes([0x01, 0x03, 0x00, 0x00, 0x00, 0x02, 0xC4, 0x0B])
    assert crc16(frame[:-2]) == 0x0BC4 and crc_ok(frame)
    assert not crc_ok(frame[:-1] + b"\x00")


def test_exception_and_short_answers_are_labelled() -> None:
    with pytest.raises(ModbusError) as e:
        parse_read_response(bytes([0x83, 0x02]), "holding", 2)
    assert e.value.kind == "exception:2"
    with pytest.raises(ModbusError) as e:
        parse_read_response(bytes([0x03, 0x04, 0, 1]), "holding", 2)
    assert e.value.kind == "malformed"
    assert parse_read_response(bytes([0x04, 0x04, 0, 1, 0, 2]), "input", 2) == [1, 2]
