"""Modbus frames, both sides (master and the simulator's slave): pure functions, no I/O.

RTU: unit, PDU, CRC-16 (little-endian). TCP: MBAP header (transaction, protocol 0, length, unit)
then the PDU. Only what the gateway uses: read holding/input registers (3/4), write single and
multiple registers (6/16), exception responses.
"""

from __future__ import annotations

import struct

FUNCTION = {"holding": 3, "input": 4}
WRITE_SINGLE, WRITE_MULTIPLE = 6, 16


class ModbusError(Exception):
    """A failed request, with a short machine label: timeout, crc, exception:<code>, malformed,
    connection, port."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ b) & 0xFF]
    return crc


def rtu_frame(unit: int, pdu: bytes) -> bytes:
    adu = bytes([unit]) + pdu
    return adu + crc16(adu).to_bytes(2, "little")


def crc_ok(frame: bytes) -> bool:
    return len(frame) >= 4 and crc16(frame[:-2]) == int.from_bytes(frame[-2:], "little")


def rtu_response_length(head: bytes) -> int | None:
    """Length of a whole response frame from its first 3 bytes, None if not a known function."""
    fc = head[1]
    if fc & 0x80:
        return 5
    if fc in (3, 4):
        return 5 + head[2]
    if fc in (WRITE_SINGLE, WRITE_MULTIPLE):
        return 8
    return None


def rtu_request_length(buf: bytes) -> int | None:
    """Length of a request frame at the start of ``buf`` (slave side), None if not yet knowable."""
    if len(buf) < 2:
        return None
    if buf[1] in (3, 4, WRITE_SINGLE):
        return 8
    if buf[1] == WRITE_MULTIPLE and len(buf) >= 7:
        return 9 + buf[6]
    return None


def mbap(transaction: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", transaction & 0xFFFF, 0, len(pdu) + 1, unit) + pdu


def read_request(table: str, address: int, count: int) -> bytes:
    return struct.pack(">BHH", FUNCTION[table], address, count)


def write_request(address: int, values: list[int]) -> bytes:
    return struct.pack(
        f">BHHB{len(values)}H", WRITE_MULTIPLE, address, len(values), 2 * len(values), *values
    )


def exception_pdu(function: int, code: int) -> bytes:
    return bytes([function | 0x80, code])


def _check_exception(pdu: bytes, function: int) -> None:
    if len(pdu) >= 2 and pdu[0] == function | 0x80:
        raise ModbusError(f"exception:{pdu[1]}")
    if not pdu or pdu[0] != function:
        raise ModbusError("malformed", f"expected function {function}, got {pdu[:1].hex()}")


def parse_read_response(pdu: bytes, table: str, count: int) -> list[int]:
    _check_exception(pdu, FUNCTION[table])
    if len(pdu) != 2 + 2 * count or pdu[1] != 2 * count:
        raise ModbusError("malformed", f"expected {count} registers, got {len(pdu)} bytes")
    return list(struct.unpack(f">{count}H", pdu[2:]))


def parse_write_response(pdu: bytes, address: int, count: int) -> None:
    _check_exception(pdu, WRITE_MULTIPLE)
    if pdu[1:] != struct.pack(">HH", address, count):
        raise ModbusError("malformed", "write echo does not match the request")
