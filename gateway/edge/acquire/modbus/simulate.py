"""Probe simulator: serve probe profiles as Modbus RTU slaves on a serial port (a pty) or over TCP.

Each ``SimSlave`` is one probe (a profile and a unit id); one server carries several, as a real
bus does. Values follow a scenario from the profile's nominal values and are encoded with
``registers.py``; faults (no answer, corrupt CRC, exception, NaN, sentinel, status bits) can be
changed at any time: assign ``slave.fault`` in-process, or write a control file (JSON
``{"<unit>": {"fault": ..., "scenario": ..., "values": {"<value name>": number}}}``) that the
server rereads when it changes. ``values`` pins a value (e.g. the electrode mV of a pH probe put
in a buffer) instead of its scenario; ``{}`` lets the scenario take over again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import select
import socket
import socketserver
import struct
import termios
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import serial

from gateway.edge.acquire.modbus.frames import (
    FUNCTION,
    WRITE_MULTIPLE,
    WRITE_SINGLE,
    crc_ok,
    exception_pdu,
    mbap,
    rtu_frame,
    rtu_request_length,
)
from gateway.edge.acquire.modbus.profiles import Profile, SerialDefaults, ValueSpec
from gateway.edge.acquire.modbus.registers import clamp, encode, encode_pattern, width

log = logging.getLogger(__name__)

SCENARIOS = ("constant", "drift", "noise", "step")
FAULTS = ("none", "no_answer", "corrupt_crc", "exception", "nan", "sentinel", "status_fault")
QUIET_NAN = 0x7FC00000
ILLEGAL_FUNCTION, ILLEGAL_ADDRESS, ILLEGAL_VALUE = 1, 2, 3


@dataclass
class SimSlave:
    """One simulated probe. ``fault`` and ``scenario`` may be changed while it is being served."""

    profile: Profile
    unit: int
    scenario: str = "constant"
    fault: str = "none"
    exception_code: int = 4  # slave device failure
    step_after: float = 30.0  # seconds; the step scenario then reads 1.5 x nominal
    seed: int = 0
    written: dict[tuple[str, int], int] = field(default_factory=dict)  # calibration writes
    started: float = field(default_factory=time.monotonic)
    # With corrupt_crc on a serial line: garbage bytes that follow each spoiled answer at line
    # rate, as on a noisy RS-485 line (a master must wait for silence before its next request).
    noise_bytes: int = 0
    fault_answers: int = 0  # answers the fault spoils before it clears by itself; 0: until changed
    pinned: dict[str, float] = field(default_factory=dict)  # value name -> number, no scenario
    # On a line whose settings the simulator can see (``PtyLine``): answer only at these, as a
    # real slave at another baud rate or parity hears garbage and stays silent. None: any.
    line: SerialDefaults | None = None

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS or self.fault not in FAULTS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, fault one of {FAULTS}")
        self._rng = random.Random(self.seed)

    def answered(self) -> None:
        """Count an answer the fault has spoiled (see ``fault_answers``)."""
        if self.fault != "none" and self.fault_answers > 0:
            self.fault_answers -= 1
            if self.fault_answers == 0:
                self.fault = "none"

    def value_at(self, nominal: float, t: float) -> float:
        size = abs(nominal) or 1.0
        if self.scenario == "drift":
            return nominal + 0.01 * size * t / 60  # +1 % per minute
        if self.scenario == "noise":
            return nominal + self._rng.gauss(0, 0.01 * size)
        if self.scenario == "step" and t >= self.step_after:
            return nominal * 1.5 if nominal else 1.0
        return nominal

    def image(self) -> dict[tuple[str, int], int]:
        """Every register the profile defines, as the probe would answer now."""
        t = time.monotonic() - self.started
        img: dict[tuple[str, int], int] = {}
        for c in self.profile.calibration:
            raw = clamp((c.default - c.offset) / c.scale, c.type)
            for i, r in enumerate(encode(raw, c.type, c.word_order)):
                img[c.table, c.address + i] = r
        for v in self.profile.values:
            number = self.pinned.get(v.name)
            if number is None:
                number = self.value_at(v.nominal, t)
            regs, decimals = self._encode_value(v, number)
            for i, r in enumerate(regs):
                img[v.table, v.address + i] = r
            if v.decimals_register is not None:
                img[v.table, v.decimals_register] = decimals
            if v.status_word is not None:
                img[v.table, v.status_word] = 2 if self.fault == "status_fault" else 0
        for s in self.profile.status:
            word = 1 << s.bits[0].bit if self.fault == "status_fault" and s.bits else 0
            for i, r in enumerate(encode_pattern(word, s.type, s.word_order)):
                img[s.table, s.address + i] = r
        img.update(self.written)
        return img

    def _encode_value(self, v: ValueSpec, number: float) -> tuple[list[int], int]:
        """The value's registers and, for auto-ranging values, its decimal places."""
        if self.fault == "sentinel" and v.sentinels:
            return encode_pattern(v.sentinels[0], v.type, v.word_order), 0
        if self.fault == "nan" and v.type.startswith("float"):
            pattern = QUIET_NAN if v.type == "float32" else 0x7FF8 << 48
            return encode_pattern(pattern, v.type, v.word_order), 0
        if v.decimals_register is not None:  # auto-ranging: as many decimals as fit, at most 3
            fits = [d for d in (3, 2, 1) if clamp(number * 10**d, v.type) == round(number * 10**d)]
            decimals = fits[0] if fits else 0
            return encode(clamp(number * 10**decimals, v.type), v.type, v.word_order), decimals
        return encode(clamp((number - v.offset) / v.scale, v.type), v.type, v.word_order), 0

    def handle(self, pdu: bytes) -> bytes | None:
        """The response PDU to a request PDU, or None for no answer."""
        if self.fault == "no_answer" or not pdu:
            return None
        fc = pdu[0]
        if self.fault == "exception":
            return exception_pdu(fc, self.exception_code)
        if fc in FUNCTION.values() and len(pdu) == 5:
            table = "holding" if fc == 3 else "input"
            address, count = struct.unpack(">HH", pdu[1:])
            if not 1 <= count <= 125:
                return exception_pdu(fc, ILLEGAL_VALUE)
            img = self.image()
            mapped = [a for t, a in img if t == table]
            if not mapped or address < min(mapped) or address + count > max(mapped) + 1:
                return exception_pdu(fc, ILLEGAL_ADDRESS)
            regs = [img.get((table, a), 0) for a in range(address, address + count)]
            return bytes([fc, 2 * count]) + struct.pack(f">{count}H", *regs)
        if fc == WRITE_SINGLE and len(pdu) == 5:
            address, value = struct.unpack(">HH", pdu[1:])
            return self._write(fc, address, [value]) or pdu
        if fc == WRITE_MULTIPLE and len(pdu) >= 6 and len(pdu) == 6 + pdu[5]:
            address, count = struct.unpack(">HH", pdu[1:5])
            values = list(struct.unpack(f">{count}H", pdu[6:])) if pdu[5] == 2 * count else []
            return self._write(fc, address, values) or pdu[:5]
        return exception_pdu(fc, ILLEGAL_FUNCTION)

    def _write(self, fc: int, address: int, values: list[int]) -> bytes | None:
        """Only calibration registers are writable; an exception PDU otherwise."""
        writable = {
            c.address + i
            for c in self.profile.calibration
            if c.table == "holding"
            for i in range(width(c.type))
        }
        span = range(address, address + len(values))
        if not values or not set(span) <= writable:
            return exception_pdu(fc, ILLEGAL_ADDRESS)
        self.written.update({("holding", a): v for a, v in zip(span, values, strict=True)})
        return None


class SimBus:
    """The slaves on one port or TCP server, by unit id, with the optional control file."""

    def __init__(self, slaves: list[SimSlave], control: str | Path | None = None) -> None:
        self.slaves = {s.unit: s for s in slaves}
        if len(self.slaves) != len(slaves):
            raise ValueError("two simulated slaves share a unit id")
        self.control = Path(control) if control else None
        self._control_mtime: tuple[int, int, int] | None = None

    def slave(self, unit: int) -> SimSlave | None:
        self._reload()
        return self.slaves.get(unit)

    def _reload(self) -> None:
        if self.control is None:
            return
        try:
            if not self.control.exists():
                return
            st = self.control.stat()
            mtime = (st.st_mtime_ns, st.st_size, st.st_ino)  # a rename-over changes the inode
            if mtime == self._control_mtime:
                return
            self._control_mtime = mtime
            for unit, change in json.loads(self.control.read_text()).items():
                s = self.slaves[int(unit)]
                fault, scenario = change.get("fault", s.fault), change.get("scenario", s.scenario)
                if fault not in FAULTS or scenario not in SCENARIOS:
                    raise ValueError(
                        f"unit {unit}: unknown fault {fault!r} or scenario {scenario!r}"
                    )
                values = change.get("values", s.pinned)
                if not isinstance(values, dict):
                    raise ValueError(f"unit {unit}: values must be an object, not {values!r}")
                s.fault, s.scenario = fault, scenario
                s.pinned = {str(k): float(v) for k, v in values.items()}
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            log.warning("control file %s ignored: %s", self.control, e)


class RtuSimulator:
    """Serves a SimBus as Modbus RTU slaves on a serial port (one end of a socat pty pair).

    With ``line_timing`` each answer is written when it would have ended on the wire: the request's
    bytes, the 3.5-character silence that tells a slave the request has ended (1.75 ms above 19200
    baud), then its own bytes, at ``baudrate`` (10 or 11 bits per character), counted from the
    request's arrival so the simulator's own work does not add to it.
    """

    def __init__(
        self,
        port: str,
        bus: SimBus,
        *,
        baudrate: int = 9600,
        line_timing: bool = False,
        pty: PtyLine | None = None,
    ) -> None:
        self.port, self.bus, self.baudrate, self.line_timing = port, bus, baudrate, line_timing
        self.pty = pty
        line = next(iter(bus.slaves.values())).profile.serial if bus.slaves else None
        self.bits = (
            1 + 8 + (line is not None and line.parity != "N") + (line.stopbits if line else 1)
        )
        self._stop = threading.Event()
        self._serial = None if pty is not None else serial.Serial(port, baudrate, timeout=0)
        self._fd = pty.master if pty is not None else self._serial.fileno()  # type: ignore[union-attr]
        self._thread = threading.Thread(target=self._run, name=f"simulator {port}", daemon=True)

    def start(self) -> RtuSimulator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self._serial is not None:
            self._serial.close()
        if self.pty is not None:
            self.pty.close()

    def __enter__(self) -> RtuSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        buf = b""
        fd = self._fd
        while not self._stop.is_set():
            if not select.select([fd], [], [], 0.02)[0]:
                buf = b""  # silence ends a frame: drop any partial one
                continue
            try:
                buf += os.read(fd, 512)
            except OSError:  # the other end of the pty went away
                time.sleep(0.05)
                continue
            received = time.monotonic()
            while (n := rtu_request_length(buf)) is not None and len(buf) >= n:
                frame, buf = buf[:n], buf[n:]
                if crc_ok(frame):
                    self._answer(frame, received)
                else:
                    buf = frame[1:] + buf  # resynchronise byte by byte
            if rtu_request_length(buf) is None and len(buf) >= 2 and buf[1] not in (3, 4, 6, 16):
                buf = b""  # unknown function: wait for the next frame

    def _answer(self, request: bytes, received: float) -> None:
        slave = self.bus.slave(request[0])
        if slave is None:
            return  # another unit's frame, or broadcast: a real slave stays silent
        if slave.line is not None and self.pty is not None and self.pty.line() != _key(slave.line):
            return  # the master talks at another baud rate or parity: garbage to this slave
        pdu = slave.handle(request[1:-2])
        if pdu is None:
            return
        frame = rtu_frame(slave.unit, pdu)
        noise = 0
        if slave.fault == "corrupt_crc":
            frame = frame[:-1] + bytes([frame[-1] ^ 0xFF])
            noise = slave.noise_bytes
        slave.answered()
        char = self.bits / self.baudrate
        if self.line_timing:
            gap = 0.00175 if self.baudrate > 19200 else 3.5 * char
            due = received + (len(request) + len(frame)) * char + gap
            time.sleep(max(0.0, due - time.monotonic()))
        self._write(frame)
        self._noise(noise, char)

    def _noise(self, n: int, char: float) -> None:
        """``n`` garbage bytes (0xFF/0x00: never a unit address in use) at line rate."""
        start, sent = time.monotonic(), 0
        while sent < n:
            chunk = bytes(0xFF * (i % 2) for i in range(min(8, n - sent)))
            self._write(chunk)
            sent += len(chunk)
            time.sleep(max(0.0, start + sent * char - time.monotonic()))

    def _write(self, data: bytes) -> None:
        while data:
            data = data[os.write(self._fd, data) :]


def _key(line: SerialDefaults) -> tuple[int, str, int]:
    return line.baudrate, line.parity, line.stopbits


class PtyLine:
    """A pseudo-terminal of the simulator's own, linked at ``link`` for the master to open. Unlike
    a socat pair, the line settings the master sets on its end are visible here (a pty's master
    reads its slave's termios), so slaves can answer only at their own baud rate and parity.
    Parity shows through INPCK, which the gateway's transport sets (the kernel clears a pty's
    PARENB): a master that leaves INPCK off looks like 8N1 here."""

    def __init__(self, link: str | Path) -> None:
        self.master, self._slave = os.openpty()  # our slave fd: no hang-up between openers
        self.link = Path(link)
        self.link.unlink(missing_ok=True)
        self.link.symlink_to(os.ttyname(self._slave))

    def line(self) -> tuple[int, str, int]:
        iflag, _, cflag, _, _, ospeed, _ = termios.tcgetattr(self.master)
        speeds = {getattr(termios, f"B{b}"): b for b in (1200, 2400, 4800, 9600, 19200, 38400,
                                                         57600, 115200)}  # fmt: skip
        # Linux clears PARENB on a pty; the gateway's transport sets INPCK with parity on
        parity = "N" if not iflag & termios.INPCK else "O" if cflag & termios.PARODD else "E"
        return speeds.get(ospeed, 0), parity, 2 if cflag & termios.CSTOPB else 1

    def close(self) -> None:
        self.link.unlink(missing_ok=True)
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class TcpSimulator:
    """Serves a SimBus as Modbus TCP on ``host:port`` (port 0 picks a free one: see ``address``).

    ``corrupt_crc`` has no CRC to spoil on TCP: it answers with a wrong byte count instead.
    """

    def __init__(self, host: str, port: int, bus: SimBus) -> None:
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._serve(self.request)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.bus = bus
        self._clients: set[socket.socket] = set()
        self._server = socketserver.ThreadingTCPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="simulator tcp", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> TcpSimulator:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection, as a device that powers off would."""
        self._server.shutdown()
        self._server.server_close()
        for sock in list(self._clients):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> TcpSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, sock: socket.socket) -> None:
        self._clients.add(sock)
        try:
            self._serve_frames(sock)
        except OSError:
            pass  # the client went away
        finally:
            self._clients.discard(sock)

    def _serve_frames(self, sock: socket.socket) -> None:
        f = sock.makefile("rb")
        while header := f.read(7):
            if len(header) < 7:
                return
            tid, proto, length, unit = struct.unpack(">HHHB", header)
            pdu = f.read(length - 1)
            slave = self.bus.slave(unit)
            answer = slave.handle(pdu) if slave is not None and proto == 0 else None
            if answer is None:
                continue
            if slave is not None and slave.fault == "corrupt_crc" and len(answer) > 2:
                answer = answer[:1] + bytes([answer[1] ^ 0x02]) + answer[2:]
            if slave is not None:
                slave.answered()
            sock.sendall(mbap(tid, unit, answer))
