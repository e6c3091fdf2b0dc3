"""Pure helpers of a live calibration: when a point is stable, which raw value a point takes,
and matching lab samples to stored readings for a K/B regression. No I/O here."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from gateway.edge.calibrate import CalibrationRecord, Standard, nernst_slope

Sample = tuple[float, float]  # (monotonic or epoch seconds, value)


def drift_per_minute(samples: Sequence[Sample]) -> float:
    """Least-squares slope of the samples, per minute; 0 with fewer than two distinct times."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    stt = sum((t - mt) ** 2 for t, _ in samples)
    if stt == 0:
        return 0.0
    return 60.0 * sum((t - mt) * (v - mv) for t, v in samples) / stt


@dataclass(frozen=True, slots=True)
class Stability:
    """Where a point stands: ``stable`` once the drift over the last ``seconds`` stays under the
    limit and the samples cover that long."""

    stable: bool
    drift: float  # per minute, over the window
    covered: float  # seconds of samples in the window

    def indicator(self, limit: float) -> str:
        mark = "STABLE" if self.stable else "settling"
        return f"{mark} drift {self.drift:+.2f}/min (limit {limit:g}), {self.covered:.0f} s"


def stability(samples: Sequence[Sample], limit: float, seconds: float) -> Stability:
    """Stability of the latest ``seconds`` of ``samples`` (time-ordered)."""
    if not samples:
        return Stability(False, 0.0, 0.0)
    end = samples[-1][0]
    window = [s for s in samples if s[0] >= end - seconds]
    covered = end - window[0][0]
    drift = drift_per_minute(window)
    return Stability(covered >= seconds * 0.95 and abs(drift) <= limit, drift, covered)


def ph_raw_mv(live: dict[str, float]) -> float:
    """The electrode mV a pH point takes from a probe's live values: its own mV value if it has
    one, else its pH turned back into mV with the ideal slope the probe used."""
    if "electrode_mv" in live:
        return live["electrode_mv"]
    if "pH" not in live:
        raise ValueError("the probe reports neither electrode_mv nor pH")
    temp = live.get("temperature", 25.0)
    return -(live["pH"] - 7.0) * nernst_slope(temp)


# --- lab samples against stored readings ---------------------------------------------------------


def parse_time(text: str) -> float:
    """RFC 3339 / ISO 8601 (``Z`` allowed) or epoch seconds, to epoch seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError(f"{text!r}: give a time zone (e.g. Z) or epoch seconds")
    return dt.timestamp()


def read_lab_csv(text: str) -> list[Sample]:
    """Rows ``time,lab_value`` (a header row is skipped); ValueError naming the bad line."""
    out: list[Sample] = []
    for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) < 2:
            raise ValueError(f"line {n}: expected time,lab_value")
        try:
            out.append((parse_time(row[0]), float(row[1])))
        except ValueError as e:
            if n == 1 and not out:
                continue  # a header
            raise ValueError(f"line {n}: {e}") from None
    return out


def match_lab(
    lab: Sequence[Sample], readings: Sequence[Sample], window: float = 300.0
) -> tuple[list[Standard], list[Sample]]:
    """Each lab sample with the raw reading nearest in time within ``window`` seconds, as a
    calibration point (nominal = lab value, raw = the reading); and the lab samples left over."""
    points: list[Standard] = []
    unmatched: list[Sample] = []
    for ts, value in lab:
        near = min(readings, key=lambda r: abs(r[0] - ts), default=None)
        if near is None or abs(near[0] - ts) > window:
            unmatched.append((ts, value))
        else:
            points.append(Standard(nominal=value, raw=near[1], temperature=None, lot=f"@{ts:.0f}"))
    return points, unmatched


def residuals(record: CalibrationRecord) -> list[float]:
    """Lab value minus K·raw + B for each point of a linear calibration."""
    k, b = record.k or 0.0, record.b or 0.0
    return [s.nominal - (k * s.raw + b) for s in record.standards]


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def probe_writes(register_names: Sequence[str], record: CalibrationRecord) -> dict[str, float]:
    """What to write into a profile's calibration registers for ``record``, by register name:
    zero_point/offset and slope (pH), k/b or <parameter>_k/<parameter>_b (optical), cell_constant,
    tds_factor and temperature_coefficient (conductivity)."""
    values: dict[str, float | None] = {**record.results(), "alpha": record.alpha}
    p = record.parameter.lower()
    aliases = {
        "zero_point": "offset_mv",
        "offset": "offset_mv",
        "slope": "slope_mv",
        "k": "k",
        "b": "b",
        f"{p}_k": "k",
        f"{p}_b": "b",
        "cell_constant": "cell_constant",
        "tds_factor": "tds_factor",
        "temperature_coefficient": "alpha",
    }
    out: dict[str, float] = {}
    for name in register_names:
        value = values.get(aliases.get(name, ""))
        if value is not None and finite(value):
            out[name] = value
    return out
