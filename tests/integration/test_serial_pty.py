import pytest
import serial

pytestmark = pytest.mark.integration


def test_bytes_cross_a_socat_pty_pair(pty_pair):
    with (
        serial.Serial(pty_pair.a, 9600, timeout=2) as a,
        serial.Serial(pty_pair.b, 9600, timeout=2) as b,
    ):
        frame = bytes([0x01, 0x03, 0x00, 0x00, 0x00, 0x02, 0xC4, 0x0B])
        a.write(frame)
        a.flush()
        assert b.read(len(frame)) == frame
        b.write(b"\x01\x03\x04\x00\x01\x00\x02\x2a\x32")
        assert a.read(9) == b"\x01\x03\x04\x00\x01\x00\x02\x2a\x32"
