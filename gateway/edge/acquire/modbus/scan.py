"""Find the probes on a serial port: which unit ids answer, at which line settings, and which
shipped profile (``drivers/*.toml``) fits each one. Used by ``edge-gateway init --scan``.

For every line setting (baud rate, parity) each unit id is asked for holding register 0. Any
well-formed answer, data or a Modbus exception (e.g. "illegal address"), means a slave is there:
a missing unit costs one timeout, so keep the timeout short (0.1-0.2 s is plenty below 38400 baud
on a short bus). A garbled answer (CRC, framing) is asked once more and otherwise reported as a
note, not a probe: it usually means a wrong baud rate or parity.

A slave that answered is matched against each profile (``match_profile``): the profile's poll reads
(its register blocks, as the engine would read them) must all succeed and decode to plausible
values. Plausible: every value is a number or the profile's own "not available" sentinel (a NaN
that is not the sentinel is a misfit), no decimals register or per-value status code is out of
the profile's vocabulary, and each number lies in its parameter's physical range (the validator's
table) or, for parameters that table does not know, within 100 times the largest of the value's
nominal and its test vectors' expected values; a float that decodes to a denormal (|x| < 1e-20,
not 0) is a misread integer. Exactly one fitting profile identifies the probe; none or several
leave the choice to a person.

Only the port is I/O (through the engine's own ``RtuTransport`` and frames); ``match_profile`` and
``identify`` take a read function, so they run against a simulated slave in tests.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

from prometheus_client import CollectorRegistry, Gauge

from gateway.common.config import ConfigError
from gateway.common.validate import DEFAULT_RANGES
from gateway.edge.acquire.modbus.engine import Transport
from gateway.edge.acquire.modbus.frames import ModbusError, parse_read_response, read_request
from gateway.edge.acquire.modbus.profiles import Profile, SerialDefaults, ValueSpec, load_profile
from gateway.edge.acquire.modbus.registers import Decoded, decode_profile, plan_reads
from gateway.edge.acquire.modbus.transport import RtuTransport

DRIVERS = Path(__file__).resolve().parents[4] / "drivers"  # the profiles shipped with the code
DEFAULT_BAUDS = (9600, 19200)
DEFAULT_TIMEOUT = 0.15
ENVELOPE = 100.0  # how far beyond its known examples a value without a physical range may lie
DENORMAL = 1e-20

ReadFn = Callable[[str, int, int], list[int]]  # (table, start, count) -> registers


# --- serial ports on this machine ----------------------------------------------------------------


@dataclass(frozen=True)
class SerialPortInfo:
    """A serial port: ``path`` is the name to configure (its /dev/serial/by-id link if it has one,
    stable across reboots and re-plugging), ``device`` the kernel device it is now."""

    path: str
    device: str
    description: str = ""
    likely: bool = True  # False: an on-board UART nothing says is wired (ttyS* on most PCs)


_PATTERNS = ("ttyUSB*", "ttyACM*", "ttyAMA*", "ttyS*")


def _natural(name: str) -> tuple[str, int]:
    m = re.match(r"^(.*?)(\d+)$", name)
    return (m.group(1), int(m.group(2))) if m else (name, -1)


def _hardware() -> dict[str, str]:
    """Device -> description of the ports pyserial finds behind real hardware."""
    try:
        from serial.tools import list_ports
    except ImportError:  # pragma: no cover - pyserial is a dependency
        return {}
    out = {}
    for p in list_ports.comports():
        if p.hwid and p.hwid != "n/a":
            out[p.device] = "" if p.description in ("n/a", p.name) else p.description
    return out


def detect_ports(
    dev: str | Path = "/dev", hardware: Mapping[str, str] | None = None
) -> list[SerialPortInfo]:
    """The serial ports under ``dev``: /dev/serial/by-id links first, then ttyUSB*, ttyACM*,
    ttyAMA* and ttyS* devices no link points at. ``hardware`` (device -> description, default:
    pyserial's list) tells which ttyS* ports are real; USB, ACM and AMA ports always are."""
    root = Path(dev)
    known = _hardware() if hardware is None else dict(hardware)
    ports: list[SerialPortInfo] = []
    linked: set[str] = set()
    for link in sorted(glob.glob(str(root / "serial" / "by-id" / "*"))):
        device = os.path.realpath(link)
        linked.add(device)
        ports.append(SerialPortInfo(link, device, known.get(device, ""), True))
    for pattern in _PATTERNS:
        found = sorted(glob.glob(str(root / pattern)), key=lambda p: _natural(Path(p).name))
        for device in found:
            if os.path.realpath(device) in linked:
                continue
            likely = not pattern.startswith("ttyS") or device in known
            ports.append(SerialPortInfo(device, device, known.get(device, ""), likely))
    return ports


# --- matching a slave to a profile ---------------------------------------------------------------


@dataclass
class Match:
    """How one profile reads one slave: ``fits`` and, either way, why (``reason``)."""

    profile: Profile
    fits: bool
    reason: str  # the misfit, or a summary of the decoded values when it fits


def load_profiles(directory: str | Path = DRIVERS) -> tuple[list[Profile], list[ConfigError]]:
    """Every profile in ``directory``, and the errors of those that do not load."""
    profiles, errors = [], []
    for path in sorted(Path(directory).glob("*.toml")):
        try:
            profiles.append(load_profile(path))
        except ConfigError as e:
            errors.append(e)
    return profiles, errors


def plausible_range(profile: Profile, spec: ValueSpec) -> tuple[float, float]:
    """The physical range of the value's parameter, else an envelope around its known examples."""
    if spec.parameter in DEFAULT_RANGES:
        low, high = DEFAULT_RANGES[spec.parameter]
        return low, high
    examples = [spec.nominal] + [
        vec.expect[spec.name] for vec in profile.vectors if spec.name in vec.expect
    ]
    size = max([abs(x) for x in examples] + [1.0])
    return -ENVELOPE * size, ENVELOPE * size


def _misfit(profile: Profile, d: Decoded) -> str | None:
    spec = d.spec
    for reason in d.reasons:
        kind, _, detail = reason.partition(":")
        if kind == "status_word" and detail not in spec.status_codes:
            return f"{spec.name}: status code {detail} is not one of the profile's"
        if kind not in ("sentinel", "status", "status_word"):
            return f"{spec.name}: {reason}"
    if d.number is None:
        return None  # the probe's own "not available"
    low, high = plausible_range(profile, spec)
    if not low <= d.number <= high:
        return f"{spec.name} = {d.number:g} {spec.unit} is outside {low:g}..{high:g}"
    if d.number != 0 and abs(d.number) < DENORMAL:
        return f"{spec.name} = {d.number:g} is a misread integer, not a measurement"
    return None


def _summary(decoded: Sequence[Decoded]) -> str:
    parts = []
    for d in decoded:
        value = "n/a" if d.number is None else f"{d.number:g} {d.spec.unit}"
        parts.append(f"{d.spec.name} {value}")
    return ", ".join(parts)


class PollFailed(ModbusError):
    """A read of one block of a poll failed: ``where`` names the block."""

    def __init__(self, kind: str, where: str) -> None:
        super().__init__(kind, f"reading {where}")
        self.where = where


def poll_once(profile: Profile, read: ReadFn) -> list[Decoded]:
    """One poll of a slave as the engine does it (its register blocks), decoded; PollFailed."""
    image: dict[tuple[str, int], int] = {}
    for block in plan_reads(profile.spans(), max_count=profile.max_read):
        try:
            regs = read(block.table, block.start, block.count)
        except ModbusError as e:
            raise PollFailed(e.kind, f"{block.table} {block.start}+{block.count}") from None
        image.update({(block.table, block.start + i): r for i, r in enumerate(regs)})
    return decode_profile(profile, image)


def match_profile(profile: Profile, read: ReadFn) -> Match:
    """Read the slave as ``profile`` polls it and say whether what comes back makes sense."""
    try:
        decoded = poll_once(profile, read)
    except PollFailed as e:
        return Match(profile, False, f"reading {e.where}: {e.kind}")
    for d in decoded:
        problem = _misfit(profile, d)
        if problem is not None:
            return Match(profile, False, problem)
    return Match(profile, True, _summary(decoded))


def identify(profiles: Iterable[Profile], read: ReadFn) -> list[Match]:
    """Every profile matched against one slave; reads of the same block are asked once."""
    cache: dict[tuple[str, int, int], list[int] | ModbusError] = {}

    def cached(table: str, start: int, count: int) -> list[int]:
        key = (table, start, count)
        if key not in cache:
            try:
                cache[key] = read(table, start, count)
            except ModbusError as e:
                cache[key] = e
        answer = cache[key]
        if isinstance(answer, ModbusError):
            raise answer
        return answer

    return [match_profile(p, cached) for p in profiles]


# --- scanning a port -----------------------------------------------------------------------------


@dataclass
class Found:
    """A slave that answered: where, how, and which profiles fit it (exactly one: identified)."""

    port: str
    baud: int
    parity: str
    unit: int
    exception: str | None = None  # "exception:<code>" if it answered the probe with one
    candidates: tuple[str, ...] = ()  # paths of the fitting profiles
    details: dict[str, str] = field(default_factory=dict)  # profile path -> decoded values
    stopbits: int = 1

    @property
    def profile(self) -> str | None:
        """The profile that fits, if exactly one does."""
        return self.candidates[0] if len(self.candidates) == 1 else None

    @property
    def line(self) -> str:
        return f"{self.baud} 8{self.parity}{self.stopbits}"


@dataclass
class Progress:
    """One step of a scan, for a progress display: ``unit`` was just asked (``done`` of
    ``total`` for this line setting); ``found`` if it answered, ``note`` for anything odd."""

    port: str
    baud: int
    parity: str
    unit: int
    done: int
    total: int
    found: Found | None = None
    note: str = ""


TransportFactory = Callable[[str, SerialDefaults], Transport]


def rtu_transport(port: str, line: SerialDefaults) -> Transport:
    """The engine's RTU transport, its connection gauge kept out of the gateway's metrics."""
    gauge = Gauge("scan_connections", "open scan ports", registry=CollectorRegistry())
    return RtuTransport(port, line, gap=None, connections=gauge)


def parse_units(text: str) -> list[int]:
    """``"1-247"``, ``"3,17"`` or ``"1-20,100"``: unit ids 1..247, in order, each once."""
    units: list[int] = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if sep else low
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not a unit id or a range like 1-247") from None
        if not 1 <= low <= high <= 247:
            raise ValueError(f"{part.strip()!r}: unit ids are 1..247, low to high")
        units.extend(u for u in range(low, high + 1) if u not in units)
    return units


def scan(
    port: str,
    bauds: Sequence[int] = DEFAULT_BAUDS,
    units: Iterable[int] = range(1, 248),
    timeout: float = DEFAULT_TIMEOUT,
    parities: Sequence[str] = ("N",),
    *,
    profiles: Sequence[Profile] | None = None,
    stopbits: int = 1,
    progress: Callable[[Progress], None] | None = None,
    transport: TransportFactory = rtu_transport,
) -> list[Found]:
    """Ask every unit id at every line setting; identify each slave that answers.

    A unit found at one line setting is not asked again at the next ones. Raises ModbusError
    ("port") if the port cannot be opened. Takes up to len(bauds) x len(parities) x len(units) x
    ``timeout`` on an empty bus.
    """
    if not set(parities) <= {"N", "E", "O"} or stopbits not in (1, 2):
        raise ValueError(f"parity is N, E or O and stopbits 1 or 2, not {parities}/{stopbits}")
    if profiles is None:
        profiles = load_profiles()[0]
    wanted = list(units)
    found: list[Found] = []
    for baud in bauds:
        for parity in parities:
            line = SerialDefaults(
                baudrate=baud,
                parity=cast(Literal["N", "E", "O"], parity),
                stopbits=cast(Literal[1, 2], stopbits),
            )
            link = transport(port, line)
            try:
                todo = [u for u in wanted if u not in {f.unit for f in found}]
                for i, unit in enumerate(todo, 1):
                    hit, note = _probe(link, port, line, unit, timeout, profiles)
                    if hit is not None:
                        found.append(hit)
                    if progress is not None:
                        progress(Progress(port, baud, parity, unit, i, len(todo), hit, note))
            finally:
                link.close()
    return found


def reader(link: Transport, unit: int, timeout: float) -> ReadFn:
    """Reads from ``unit`` over ``link``; a garbled answer is asked once more."""

    def read(table: str, start: int, count: int) -> list[int]:
        pdu = read_request(table, start, count)
        for attempt in (1, 2):  # a garbled answer is asked once more, a silent slave is not
            try:
                return parse_read_response(link.exchange(unit, pdu, timeout), table, count)
            except ModbusError as e:
                if attempt == 2 or e.kind not in ("crc", "malformed"):
                    raise
        raise AssertionError("unreachable")

    return read


def _probe(
    link: Transport,
    port: str,
    line: SerialDefaults,
    unit: int,
    timeout: float,
    profiles: Sequence[Profile],
) -> tuple[Found | None, str]:
    read = reader(link, unit, timeout)
    exception = None
    try:
        read("holding", 0, 1)
    except ModbusError as e:
        if e.kind == "port":
            raise
        if e.kind == "timeout":
            return None, ""
        if not e.kind.startswith("exception:"):
            return None, f"garbled answer ({e}): a wrong baud rate or parity?"
        exception = e.kind
    matches = identify(profiles, read)
    fits = [m for m in matches if m.fits]
    hit = Found(
        port,
        line.baudrate,
        line.parity,
        unit,
        exception,
        tuple(m.profile.source for m in fits),
        {m.profile.source: m.reason for m in fits},
        line.stopbits,
    )
    return hit, ""
