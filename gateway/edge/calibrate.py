"""Probe calibration: the maths, the records, their store, and applying them to readings.

The maths is pure (pH Nernst slope/offset, linear K/B, conductivity cell constant with temperature
compensation and TDS factor). ``CalibrationStore`` persists records with sqlitedict and serves the
active one per sensor and parameter from memory, so ``apply`` costs a dict lookup per reading.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlitedict import SqliteDict

from gateway.common.model import Reading, now_ts

NERNST_25 = 59.16  # mV per pH unit at 25 °C
KELVIN = 273.15
PH_OFFSET_LIMIT = 30.0  # mV in the pH 7 buffer
PH_SLOPE_PASS = (90.0, 105.0)  # % of Nernst
PH_SLOPE_WARN = (85.0, 90.0)
KCL_STANDARDS = (1413.0, 12880.0)  # µS/cm at 25 °C
DEFAULT_ALPHA = 0.02  # per °C

# Buffer pH against temperature (0-50 °C, 5 °C steps), from vendor and NIST tables.
BUFFER_TEMPERATURES = (0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50)
BUFFER_TABLES: dict[float, tuple[float, ...]] = {
    4.01: (4.01, 4.00, 4.00, 4.00, 4.00, 4.01, 4.01, 4.02, 4.03, 4.04, 4.06),
    # the same phthalate buffer (pH 4.005 at 25 °C) as labelled in the 4.00/6.86/9.18 set
    4.00: (4.01, 4.00, 4.00, 4.00, 4.00, 4.01, 4.01, 4.02, 4.03, 4.04, 4.06),
    6.86: (6.98, 6.95, 6.92, 6.90, 6.88, 6.86, 6.85, 6.84, 6.84, 6.83, 6.83),
    7.00: (7.13, 7.09, 7.06, 7.04, 7.02, 7.00, 6.99, 6.98, 6.97, 6.97, 6.97),
    9.18: (9.46, 9.39, 9.33, 9.28, 9.23, 9.18, 9.14, 9.10, 9.07, 9.04, 9.01),
    10.01: (10.32, 10.25, 10.18, 10.12, 10.06, 10.01, 9.97, 9.93, 9.89, 9.86, 9.83),
}

# a record's results: the numbers worth comparing between calibrations
RESULTS = ("slope_mv", "slope_pct", "offset_mv", "k", "b", "cell_constant", "tds_factor", "r2")
PH_METHODS = ("ph_1point", "ph_2point", "ph_3point")
LINEAR_METHODS = ("zero", "zero_span", "regression")
CONDUCTIVITY_METHODS = ("cell_constant",)


@dataclass(frozen=True, slots=True)
class Standard:
    """One calibration point: the standard's nominal value and what the probe read in it.

    pH: nominal buffer pH at 25 °C, raw electrode mV. Linear: lab value, raw probe value.
    Conductivity: KCl conductivity at 25 °C in µS/cm, raw uncompensated conductance in µS.
    """

    nominal: float
    raw: float
    temperature: float | None = None  # °C
    lot: str = ""
    actual: float | None = None  # nominal at the measured temperature (pH buffers)


@dataclass(frozen=True, slots=True)
class CalibrationRecord:
    sensor_id: str
    parameter: str
    method: str  # one of PH_METHODS, LINEAR_METHODS, CONDUCTIVITY_METHODS
    calibrated_at: float  # epoch seconds UTC
    operator: str
    standards: tuple[Standard, ...]
    status: str  # pass, warn or fail
    criteria: str
    slope_mv: float | None = None  # mV/pH at 25 °C
    slope_pct: float | None = None  # % of Nernst
    offset_mv: float | None = None  # electrode mV at pH 7
    k: float | None = None
    b: float | None = None
    cell_constant: float | None = None  # 1/cm
    alpha: float | None = None  # temperature coefficient, per °C
    tds_factor: float | None = None
    r2: float | None = None
    previous: dict[str, float] = field(default_factory=dict)
    due_at: float | None = None
    notes: str = ""
    id: str = ""
    # "gateway": the gateway corrects readings with it; "probe": written to the probe, which
    # corrects its own output (the gateway keeps it as history and for due dates only)
    applied_in: str = "gateway"

    def __post_init__(self) -> None:
        if not self.id:
            text = "\x1f".join(
                (
                    self.sensor_id,
                    self.parameter,
                    self.method,
                    repr(self.calibrated_at),
                    self.operator,
                )
            )
            object.__setattr__(
                self, "id", hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
            )

    @property
    def kind(self) -> str:
        if self.method in PH_METHODS:
            return "ph"
        if self.method in CONDUCTIVITY_METHODS:
            return "conductivity"
        return "linear"

    def results(self) -> dict[str, float]:
        """The numbers worth comparing between calibrations (drift tracking)."""
        return {n: v for n in RESULTS if (v := getattr(self, n)) is not None}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalibrationRecord:
        d = dict(d)
        d["standards"] = tuple(Standard(**s) for s in d["standards"])
        return cls(**d)


# --- pH ---------------------------------------------------------------------------------------


def nernst_slope(temp_c: float) -> float:
    """Ideal electrode slope in mV/pH at ``temp_c``; proportional to absolute temperature."""
    return NERNST_25 * (temp_c + KELVIN) / (25.0 + KELVIN)


def buffer_ph(nominal: float, temp_c: float) -> float:
    """A buffer's pH at ``temp_c`` from its table; buffers not in the tables keep their nominal."""
    table = next((t for n, t in BUFFER_TABLES.items() if abs(n - nominal) < 0.005), None)
    if table is None:
        return nominal
    lo, hi = BUFFER_TEMPERATURES[0], BUFFER_TEMPERATURES[-1]
    if not lo <= temp_c <= hi:
        raise ValueError(f"buffer temperature {temp_c} °C is outside the table ({lo}-{hi} °C)")
    i = min(int((temp_c - lo) // 5), len(BUFFER_TEMPERATURES) - 2)
    frac = (temp_c - BUFFER_TEMPERATURES[i]) / 5.0
    return round(table[i] + (table[i + 1] - table[i]) * frac, 3)


@dataclass(frozen=True, slots=True)
class PhLimits:
    """Pass/warn/fail limits of a pH calibration: DOMAIN.md defaults, set in ``[calibration]``."""

    offset_mv: float = PH_OFFSET_LIMIT  # |offset| in the pH 7 buffer
    slope_pass: tuple[float, float] = PH_SLOPE_PASS  # % of Nernst
    slope_warn_min: float = PH_SLOPE_WARN[0]  # from here up to slope_pass[0]: warn

    @property
    def criteria(self) -> str:
        lo, hi = self.slope_pass
        return (
            f"|offset| <= {self.offset_mv:g} mV; slope {lo:g}-{hi:g} % pass, "
            f"{self.slope_warn_min:g}-{lo:g} % warn, else fail"
        )


def ph_status(slope_pct: float, offset_mv: float, limits: PhLimits | None = None) -> str:
    limits = limits or PhLimits()
    if abs(offset_mv) > limits.offset_mv:
        return "fail"
    if limits.slope_pass[0] <= slope_pct <= limits.slope_pass[1]:
        return "pass"
    if limits.slope_warn_min <= slope_pct < limits.slope_pass[0]:
        return "warn"
    return "fail"


PH_CRITERIA = PhLimits().criteria


def calibrate_ph(
    sensor_id: str,
    standards: Sequence[Standard],
    *,
    operator: str,
    at: float | None = None,
    parameter: str = "pH",
    slope_pct: float = 100.0,
    due_days: float = 30.0,
    notes: str = "",
    limits: PhLimits | None = None,
) -> CalibrationRecord:
    """1, 2 or 3-point pH calibration from electrode mV in buffers.

    Model: E = offset - (slope % / 100) * nernst(T) * (pH - 7). One point fixes the offset with
    ``slope_pct`` assumed (pass the previous calibration's); more points fit both by least squares.
    Buffers without a temperature are taken at 25 °C.
    """
    limits = limits or PhLimits()
    if not 1 <= len(standards) <= 3:
        raise ValueError("a pH calibration takes 1 to 3 buffers")
    points = []
    for s in standards:
        temp = 25.0 if s.temperature is None else s.temperature
        actual = buffer_ph(s.nominal, temp)
        points.append(replace(s, temperature=temp, actual=actual))
    if len({round(p.nominal, 2) for p in points}) != len(points):
        raise ValueError("each buffer may be used only once")
    # x: ideal mV shift from pH 7 at each buffer's temperature; y: measured mV.
    xs = [nernst_slope(p.temperature or 25.0) * ((p.actual or p.nominal) - 7.0) for p in points]
    ys = [p.raw for p in points]
    r2 = None
    if len(points) == 1:
        offset = ys[0] + slope_pct / 100.0 * xs[0]
    else:
        slope, offset, r2 = _fit(xs, ys)
        slope_pct = -slope * 100.0
        if len(points) == 2:
            r2 = None
    now = now_ts() if at is None else at
    return CalibrationRecord(
        sensor_id=sensor_id,
        parameter=parameter,
        method=PH_METHODS[len(points) - 1],
        calibrated_at=now,
        operator=operator,
        standards=tuple(points),
        status=ph_status(slope_pct, offset, limits),
        criteria=limits.criteria + ("; slope assumed" if len(points) == 1 else ""),
        slope_mv=round(NERNST_25 * slope_pct / 100.0, 3),
        slope_pct=round(slope_pct, 2),
        offset_mv=round(offset, 2),
        r2=None if r2 is None else round(r2, 5),
        due_at=now + due_days * 86400.0,
        notes=notes,
    )


def ph_from_mv(mv: float, temp_c: float, record: CalibrationRecord) -> float:
    """Electrode mV at ``temp_c`` to pH through a pH calibration record."""
    slope = (record.slope_pct or 100.0) / 100.0 * nernst_slope(temp_c)
    return 7.0 - (mv - (record.offset_mv or 0.0)) / slope


# --- linear K/B (optical COD/BOD, turbidity to TSS) ---------------------------------------------


def _fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares line y = k·x + b; returns (k, b, r²)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("the points' raw values must differ")
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    syy = sum((y - my) ** 2 for y in ys)
    k = sxy / sxx
    r2 = 1.0 if syy == 0 else sxy * sxy / (sxx * syy)
    return k, my - k * mx, r2


LINEAR_CRITERIA = "K > 0; regression r² >= 0.95 pass, >= 0.90 warn, else fail"


def calibrate_linear(
    sensor_id: str,
    parameter: str,
    points: Sequence[Standard],
    *,
    operator: str,
    at: float | None = None,
    k: float = 1.0,
    due_days: float = 90.0,
    notes: str = "",
) -> CalibrationRecord:
    """value = K·raw + B. One point is a zero (B only, ``k`` kept), two a zero/span, three or more
    a regression against lab samples with r²."""
    if not points:
        raise ValueError("a linear calibration takes at least one point")
    r2 = None
    if len(points) == 1:
        method, b = "zero", points[0].nominal - k * points[0].raw
    else:
        k, b, r2 = _fit([p.raw for p in points], [p.nominal for p in points])
        method = "zero_span" if len(points) == 2 else "regression"
    if k <= 0 or not math.isfinite(k):
        status = "fail"
    elif r2 is None or len(points) < 3 or r2 >= 0.95:
        status = "pass"
    else:
        status = "warn" if r2 >= 0.90 else "fail"
    now = now_ts() if at is None else at
    return CalibrationRecord(
        sensor_id=sensor_id,
        parameter=parameter,
        method=method,
        calibrated_at=now,
        operator=operator,
        standards=tuple(points),
        status=status,
        criteria=LINEAR_CRITERIA,
        k=k,
        b=b,
        r2=None if r2 is None or len(points) < 3 else round(r2, 5),
        due_at=now + due_days * 86400.0,
        notes=notes,
    )


# --- conductivity and TDS -------------------------------------------------------------------------


def compensate_25(kappa_t: float, temp_c: float, alpha: float = DEFAULT_ALPHA) -> float:
    """Conductivity at 25 °C: k25 = kT / (1 + alpha * (T - 25))."""
    divisor = 1.0 + alpha * (temp_c - 25.0)
    if divisor <= 0:
        raise ValueError(f"temperature {temp_c} °C is out of reach of alpha {alpha}")
    return kappa_t / divisor


def tds(kappa_25: float, factor: float) -> float:
    """Total dissolved solids in mg/L from conductivity at 25 °C in µS/cm."""
    return factor * kappa_25


CONDUCTIVITY_CRITERIA = (
    "each standard within 5 % of the fitted cell constant; within 10 % of nominal pass, "
    "20 % warn, else fail"
)


def calibrate_conductivity(
    sensor_id: str,
    standards: Sequence[Standard],
    *,
    operator: str,
    at: float | None = None,
    parameter: str = "conductivity",
    alpha: float = DEFAULT_ALPHA,
    tds_factor: float = 0.64,
    nominal_cell_constant: float | None = None,
    due_days: float = 30.0,
    notes: str = "",
) -> CalibrationRecord:
    """Cell constant K (1/cm) from KCl standards: κT(standard) = K · conductance, fitted through
    the origin when there are several standards."""
    if not standards:
        raise ValueError("a conductivity calibration takes at least one standard")
    if not 0.4 <= tds_factor <= 1.0:
        raise ValueError("the TDS factor must be between 0.4 and 1.0")
    if any(s.raw <= 0 for s in standards):
        raise ValueError("conductance readings must be positive")
    points = [
        replace(s, temperature=25.0 if s.temperature is None else s.temperature) for s in standards
    ]
    kappas = [p.nominal * (1.0 + alpha * ((p.temperature or 25.0) - 25.0)) for p in points]
    raws = [p.raw for p in points]
    cell = sum(k * g for k, g in zip(kappas, raws, strict=True)) / sum(g * g for g in raws)
    status = "pass"
    if any(abs(k / g / cell - 1.0) > 0.05 for k, g in zip(kappas, raws, strict=True)):
        status = "warn"
    if nominal_cell_constant:
        deviation = abs(cell / nominal_cell_constant - 1.0)
        if deviation > 0.20:
            status = "fail"
        elif deviation > 0.10:
            status = "warn"
    now = now_ts() if at is None else at
    return CalibrationRecord(
        sensor_id=sensor_id,
        parameter=parameter,
        method="cell_constant",
        calibrated_at=now,
        operator=operator,
        standards=tuple(points),
        status=status,
        criteria=CONDUCTIVITY_CRITERIA,
        cell_constant=round(cell, 6),
        alpha=alpha,
        tds_factor=tds_factor,
        due_at=now + due_days * 86400.0,
        notes=notes,
    )


# --- applying a record to a reading ---------------------------------------------------------------


def apply(
    reading: Reading, record: CalibrationRecord | None, temp_c: float | None = None
) -> Reading:
    """Calibrate ``reading`` in place and return it.

    The uncalibrated value goes to ``raw_value`` unless the source already put one there. pH
    readings in mV become pH; pH readings the probe computed with an ideal slope are corrected.
    Conductivity is compensated to 25 °C and a TDS reading's raw conductance turned into mg/L.
    ``temp_c`` is the probe's latest temperature (25 °C when unknown, i.e. no compensation).
    """
    value = reading.value
    if record is None or value is None or not math.isfinite(value):
        return reading
    if record.applied_in != "gateway":
        return reading
    t = 25.0 if temp_c is None else temp_c
    kind = record.kind
    try:
        if kind == "linear":
            new = (record.k or 0.0) * value + (record.b or 0.0)
        elif kind == "ph":
            mv = value if reading.unit == "mV" else -(value - 7.0) * nernst_slope(t)
            new = ph_from_mv(mv, t, record)
            reading.unit = "pH"
        else:
            new = compensate_25((record.cell_constant or 1.0) * value, t, record.alpha or 0.0)
            if reading.parameter == "TDS":
                new, reading.unit = tds(new, record.tds_factor or 0.0), "mg/L"
            else:
                reading.unit = "µS/cm"
    except (ValueError, ZeroDivisionError, OverflowError):
        return reading  # left uncalibrated; calibration_id stays None so it shows
    if reading.raw_value is None:
        reading.raw_value = value
    reading.value = new
    reading.calibration_id = record.id
    return reading


# --- store ----------------------------------------------------------------------------------------


def _key(sensor_id: str, parameter: str) -> str:
    return f"{sensor_id}\x1f{parameter}"


class CalibrationStore:
    """Calibration records per sensor and parameter: the active one and the history.

    Readers get the active record from an in-memory dict; ``reload_if_changed`` (called by the
    pipeline per batch, rate-limited) picks up records another process (the CLI) saved.
    """

    def __init__(
        self, path: str | Path, *, reload_interval: float = 2.0, history_limit: int = 100
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.reload_interval = reload_interval
        self.history_limit = history_limit
        self._active: dict[tuple[str, str], CalibrationRecord] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        with self._open() as db:
            db.commit()
        self.reload()

    def _open(self) -> SqliteDict:
        return SqliteDict(
            str(self.path), tablename="calibrations", encode=json.dumps, decode=json.loads
        )

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def reload(self) -> None:
        stamp = self._file_stamp()
        active: dict[tuple[str, str], CalibrationRecord] = {}
        with self._open() as db:
            for entry in db.values():
                if entry.get("active"):
                    rec = next((r for r in entry["history"] if r["id"] == entry["active"]), None)
                    if rec is not None:
                        active[(rec["sensor_id"], rec["parameter"])] = CalibrationRecord.from_dict(
                            rec
                        )
        self._active = active  # one assignment: readers on other threads see old or new
        self._stamp = stamp

    def reload_if_changed(self) -> bool:
        now = time.monotonic()
        if now - self._checked < self.reload_interval:
            return False
        self._checked = now
        if self._file_stamp() == self._stamp:
            return False
        self.reload()
        return True

    def active(self, sensor_id: str, parameter: str) -> CalibrationRecord | None:
        return self._active.get((sensor_id, parameter))

    def all_active(self) -> list[CalibrationRecord]:
        return list(self._active.values())

    def everything(self) -> list[CalibrationRecord]:
        """Every record of every sensor, newest first."""
        with self._open() as db:
            entries = list(db.values())
        out = [CalibrationRecord.from_dict(r) for e in entries for r in e["history"]]
        return sorted(out, key=lambda r: r.calibrated_at, reverse=True)

    def save(self, record: CalibrationRecord) -> CalibrationRecord:
        """Add ``record`` to the history, with the previous active results for drift tracking.

        A failed calibration is kept in the history but does not replace the active one.
        """
        key = _key(record.sensor_id, record.parameter)
        with self._open() as db:
            entry = db.get(key) or {"active": None, "history": []}
            prev = next((r for r in entry["history"] if r["id"] == entry["active"]), None)
            if prev is not None and not record.previous:
                record = replace(record, previous=CalibrationRecord.from_dict(prev).results())
            history = [r for r in entry["history"] if r["id"] != record.id]
            entry["history"] = [record.to_dict(), *history][: self.history_limit]
            if record.status != "fail":
                entry["active"] = record.id
            db[key] = entry
            db.commit()
        self.reload()
        return record

    def history(self, sensor_id: str, parameter: str | None = None) -> list[CalibrationRecord]:
        """Records for a sensor (one parameter or all), newest first."""
        with self._open() as db:
            entries = [db.get(_key(sensor_id, parameter))] if parameter else list(db.values())
        out = [
            CalibrationRecord.from_dict(r)
            for e in entries
            if e
            for r in e["history"]
            if r["sensor_id"] == sensor_id
        ]
        return sorted(out, key=lambda r: r.calibrated_at, reverse=True)
