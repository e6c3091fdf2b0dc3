"""Request/response over a serial line (Modbus RTU) or a TCP connection (Modbus TCP).

``exchange(unit, pdu, timeout)`` sends one request and returns the response PDU, or raises
ModbusError with the failure's kind. Neither class is thread-safe: the bus worker serialises them
under its port lock. Connections open lazily and reopen after a failure.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import termios
import time

import serial
from prometheus_client import Gauge

from gateway.edge.acquire.modbus.frames import (
    ModbusError,
    crc_ok,
    mbap,
    rtu_frame,
    rtu_response_length,
)
from gateway.edge.acquire.modbus.profiles import SerialDefaults

DRAIN_MAX_S = 2.0  # longest wait for a noisy line to fall silent after a bad frame


def bits_per_character(line: SerialDefaults) -> int:
    return 1 + line.bytesize + (line.parity != "N") + line.stopbits


def default_gap(line: SerialDefaults) -> float:
    """The RTU inter-frame silence: 3.5 characters, fixed at 1.75 ms above 19200 baud."""
    return 0.00175 if line.baudrate > 19200 else 3.5 * bits_per_character(line) / line.baudrate


def _set_parity(ser: serial.Serial, parity: str) -> None:
    """Parity set here in one termios call, with input parity checking on (INPCK; pyserial leaves
    it off, so a byte with a parity error would pass unseen; now it reads as 0 and its frame
    fails its CRC). pyserial opens the port without parity: its own parity change fails with
    EINVAL on a reopened Linux pty, whose driver clears PARENB."""
    attrs = termios.tcgetattr(ser.fileno())
    attrs[0] |= termios.INPCK
    attrs[2] |= termios.PARENB
    attrs[2] = attrs[2] | termios.PARODD if parity == "O" else attrs[2] & ~termios.PARODD
    termios.tcsetattr(ser.fileno(), termios.TCSANOW, attrs)


class RtuTransport:
    def __init__(
        self, port: str, line: SerialDefaults, *, gap: float | None, connections: Gauge
    ) -> None:
        self.port = port
        self.line = line
        self.gap = default_gap(line) if gap is None else gap
        self._connections = connections
        self._serial: serial.Serial | None = None
        self._quiet_since = 0.0

    def _open(self) -> serial.Serial:
        try:
            ser = serial.Serial(
                self.port,
                self.line.baudrate,
                bytesize=self.line.bytesize,
                parity="N",  # set below, with input parity checking
                stopbits=self.line.stopbits,
                timeout=0,
                write_timeout=2,
                exclusive=True,  # one owner per port: a second opener (a CLI) is refused
            )
        except (serial.SerialException, OSError, ValueError) as e:
            hint = " (in use: a running gateway owns it?)" if "lock" in str(e).lower() else ""
            raise ModbusError("port", f"{e}{hint}") from None
        if self.line.parity != "N":
            try:
                _set_parity(ser, self.line.parity)
            except (termios.error, OSError) as e:
                ser.close()
                raise ModbusError("port", f"cannot set parity {self.line.parity}: {e}") from None
        self._serial = ser
        self._connections.inc()
        return ser

    def close(self) -> None:
        if self._serial is not None:
            self._serial.close()
            self._serial = None
            self._connections.dec()

    def _read(self, ser: serial.Serial, n: int, deadline: float) -> bytes:
        buf = b""
        fd = ser.fileno()
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                break
            buf += os.read(fd, n - len(buf))
        return buf

    def _drain(self, ser: serial.Serial) -> None:
        """Swallow what follows a bad frame (its rest, a late answer, line noise): read until the
        line has been silent for four inter-frame gaps (at least 5 ms), so the next request's
        answer is not mixed with it. A line that never falls silent is given up on after
        DRAIN_MAX_S: the next request then fails on its own and the device backs off."""
        quiet = max(4 * self.gap, 0.005)
        give_up = time.monotonic() + DRAIN_MAX_S
        while self._read(ser, 256, min(time.monotonic() + quiet, give_up)):
            if time.monotonic() >= give_up:
                return

    def exchange(self, unit: int, pdu: bytes, timeout: float) -> bytes:
        ser = self._serial or self._open()
        wait = self._quiet_since + self.gap - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        try:
            ser.reset_input_buffer()  # a late answer to an earlier request must not be taken
            ser.write(rtu_frame(unit, pdu))
            ser.flush()
            return self._response(ser, unit, time.monotonic() + timeout)
        except (serial.SerialException, OSError) as e:
            self.close()
            raise ModbusError("port", str(e)) from None
        finally:
            self._quiet_since = time.monotonic()

    def _response(self, ser: serial.Serial, unit: int, deadline: float) -> bytes:
        head = self._read(ser, 3, deadline)
        if not head:
            raise ModbusError("timeout")
        length = rtu_response_length(head) if len(head) == 3 else None
        if length is None or head[0] != unit:
            self._drain(ser)
            raise ModbusError("malformed", f"unexpected frame start {head.hex()}")
        frame = head + self._read(ser, length - 3, deadline)
        if len(frame) < length:
            self._drain(ser)  # its rest may still come, after the request that follows
            raise ModbusError("malformed", f"frame cut short at {len(frame)} of {length} bytes")
        if not crc_ok(frame):
            self._drain(ser)  # noise spoils more than one frame's worth
            raise ModbusError("crc")
        return frame[1:-2]


class TcpTransport:
    def __init__(self, host: str, port: int, *, connections: Gauge) -> None:
        self.host, self.port = host, port
        self._connections = connections
        self._sock: socket.socket | None = None
        self._transaction = 0

    def _connect(self, timeout: float) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as e:
            raise ModbusError("connection", str(e)) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._connections.inc()
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._connections.dec()

    def _recv(self, sock: socket.socket, n: int, deadline: float) -> bytes:
        buf = b""
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed by the device")
            buf += chunk
        return buf

    def exchange(self, unit: int, pdu: bytes, timeout: float) -> bytes:
        sock = self._sock or self._connect(timeout)
        self._transaction = (self._transaction + 1) & 0xFFFF
        deadline = time.monotonic() + timeout
        try:
            sock.sendall(mbap(self._transaction, unit, pdu))
            while True:  # skip late answers to earlier requests
                tid, proto, length, answer_unit = struct.unpack(
                    ">HHHB", self._recv(sock, 7, deadline)
                )
                if proto != 0 or not 2 <= length <= 254:
                    raise ModbusError("malformed", f"bad MBAP header (protocol {proto}, {length})")
                body = self._recv(sock, length - 1, deadline)
                if tid == self._transaction:
                    if answer_unit != unit:
                        raise ModbusError("malformed", f"answer from unit {answer_unit}")
                    return body
        except ModbusError:
            self.close()
            raise
        except TimeoutError:
            self.close()  # a half-read frame would misalign the stream: start afresh
            raise ModbusError("timeout") from None
        except OSError as e:
            self.close()
            raise ModbusError("connection", str(e)) from None
