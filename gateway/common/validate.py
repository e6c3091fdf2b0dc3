"""Validation and quality: flag every reading good / uncertain / bad with its reasons.

Checks run in this order: no usable value (None, NaN, Inf), physical range (bad),
the site's normal band (uncertain), spike as rate of change (uncertain), flatline (N equal readings
uncertain, M bad), staleness (uncertain). Transport, decode and status-bit reasons the source set
are kept. Readings are flagged, never dropped. Shared by the gateway and the central processor.

The gateway runs every check (``check``): it sees each sensor's readings in order and reads the
clock they were taken by. The processor runs only the checks that are a function of the message
itself (``check_central``: value, range, band, and the time against the Kafka timestamp the gateway
sent it with) and trusts the gateway's history and staleness flags, so a replay, a rebalance or a
second instance flags the same message the same way.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.common.model import Quality, Reading

INF = math.inf
# The reading's time is ahead of the clock that checked it (the gateway's) by more than max_future.
AHEAD = "stale:future"

# The design's range table; flow_rate has no upper bound.
DEFAULT_RANGES: dict[str, list[float]] = {
    "pH": [0.0, 14.0],
    "BOD": [0.0, 2000.0],
    "COD": [0.0, 5000.0],
    "TSS": [0.0, 10000.0],
    "TDS": [0.0, 50000.0],
    "temperature": [-10.0, 100.0],
    "flow_rate": [0.0, INF],
}
# Units per second; a faster change flags the reading as a spike.
DEFAULT_MAX_RATE: dict[str, float] = {"pH": 1.0, "temperature": 2.0}


def _check_bands(name: str, bands: dict[str, list[float]]) -> None:
    for parameter, band in bands.items():
        if len(band) != 2 or not band[0] <= band[1]:
            raise ValueError(f"{name}.{parameter} must be [low, high] with low <= high")


@dataclass
class SensorValidation:
    """Per-sensor overrides; a parameter or key left out falls back to the global setting."""

    ranges: dict[str, list[float]] = field(default_factory=dict)
    normal_bands: dict[str, list[float]] = field(default_factory=dict)
    max_rate: dict[str, float] = field(default_factory=dict)
    flatline_suspect: int | None = None
    flatline_bad: int | None = None
    max_age: float | None = None

    def __post_init__(self) -> None:
        _check_bands("ranges", self.ranges)
        _check_bands("normal_bands", self.normal_bands)


@dataclass
class ValidationConfig:
    """TOML ``[validation]``. ``ranges`` and ``max_rate`` merge over the defaults per parameter
    (set ``inf`` to lift one); 0 disables flatline_suspect, flatline_bad, max_age and max_future."""

    ranges: dict[str, list[float]] = field(default_factory=dict)
    normal_bands: dict[str, list[float]] = field(default_factory=dict)
    max_rate: dict[str, float] = field(default_factory=dict)
    flatline_suspect: int = 60
    flatline_bad: int = 360
    flatline_tolerance: float = 0.0
    max_age: float = 300.0  # seconds behind now
    max_future: float = 5.0  # seconds ahead of now (clock skew)
    max_states: int = 100_000
    sensors: dict[str, SensorValidation] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ranges = {**DEFAULT_RANGES, **self.ranges}
        self.max_rate = {**DEFAULT_MAX_RATE, **self.max_rate}
        _check_bands("ranges", self.ranges)
        _check_bands("normal_bands", self.normal_bands)
        if (
            self.flatline_bad
            and self.flatline_suspect
            and self.flatline_bad < self.flatline_suspect
        ):
            raise ValueError("flatline_bad must be at least flatline_suspect")
        if self.max_states < 1:
            raise ValueError("max_states must be at least 1")


@dataclass(frozen=True, slots=True)
class _Rules:
    low: float
    high: float
    band_low: float
    band_high: float
    max_rate: float
    flat_n: int
    flat_m: int
    max_age: float


class _Track:
    __slots__ = ("count", "ts", "value")

    def __init__(self, value: float, ts: float) -> None:
        self.value = value
        self.ts = ts
        self.count = 1


class Validator:
    """Flags readings in place. Keeps a bounded state per (plant, sensor, parameter) for the spike
    and flatline checks; not thread-safe (one pipeline owns it)."""

    def __init__(self, config: ValidationConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self._rules: dict[tuple[str, str], _Rules] = {}
        self._tracks: OrderedDict[tuple[str, str, str], _Track] = OrderedDict()

    def _rules_for(self, sensor_id: str, parameter: str) -> _Rules:
        c = self.config
        s = c.sensors.get(sensor_id) or SensorValidation()
        low, high = s.ranges.get(parameter) or c.ranges.get(parameter) or (-INF, INF)
        band_low, band_high = (
            s.normal_bands.get(parameter)
            or c.normal_bands.get(parameter)
            or (
                -INF,
                INF,
            )
        )
        n = c.flatline_suspect if s.flatline_suspect is None else s.flatline_suspect
        m = c.flatline_bad if s.flatline_bad is None else s.flatline_bad
        rules = _Rules(
            low=low,
            high=high,
            band_low=band_low,
            band_high=band_high,
            max_rate=s.max_rate.get(parameter, c.max_rate.get(parameter, INF)),
            flat_n=n or 0,
            flat_m=m or 0,
            max_age=c.max_age if s.max_age is None else s.max_age,
        )
        if len(self._rules) >= self.config.max_states:
            self._rules.clear()
        self._rules[(sensor_id, parameter)] = rules
        return rules

    def check(self, reading: Reading, now: float | None = None) -> Reading:
        """Every check, the gateway's: needs the sensor's readings in order and the clock."""
        rules = self._rules.get((reading.sensor_id, reading.parameter)) or self._rules_for(
            reading.sensor_id, reading.parameter
        )
        if self._check_value(reading, rules):
            self._check_history(reading, rules)
        self._check_age(reading, rules, self.clock() if now is None else now)
        return reading

    def check_central(self, reading: Reading, sent: float | None) -> Reading:
        """The processor's checks: value, range and band, and the reading's time against
        ``sent``, its gateway's clock when it sent it (the Kafka timestamp; None: unknown). No
        state and no wall clock: the same message is always flagged the same way."""
        rules = self._rules.get((reading.sensor_id, reading.parameter)) or self._rules_for(
            reading.sensor_id, reading.parameter
        )
        self._check_value(reading, rules)
        if sent is not None:
            self.check_ahead(reading, sent)
        return reading

    def _check_value(self, r: Reading, rules: _Rules) -> bool:
        """The reading's own value; whether it is one the history checks can use."""
        v = r.value
        if v is None or not math.isfinite(v):
            reason = "no_value" if v is None else ("nan" if math.isnan(v) else "inf")
            if v is not None or not r.quality_reasons:
                r.flag(Quality.BAD, reason)
            r.quality = Quality.BAD
            r.value = None
            return False
        if not rules.low <= v <= rules.high:
            r.flag(Quality.BAD, "out_of_range")
            return False
        if not rules.band_low <= v <= rules.band_high:
            r.flag(Quality.UNCERTAIN, "outside_normal_band")
        return True

    def _check_history(self, r: Reading, rules: _Rules) -> None:
        """Spike and flatline, against this sensor's previous readings."""
        v = r.value
        assert v is not None
        key = (r.plant_id, r.sensor_id, r.parameter)
        track = self._tracks.get(key)
        if track is None:
            self._tracks[key] = _Track(v, r.timestamp)
            if len(self._tracks) > self.config.max_states:
                self._tracks.popitem(last=False)
            return
        self._tracks.move_to_end(key)
        dt = r.timestamp - track.ts
        if dt <= 0:
            return  # duplicate or out of order: nothing to compare against
        if abs(v - track.value) > rules.max_rate * dt:
            r.flag(Quality.UNCERTAIN, "spike")
        if abs(v - track.value) <= self.config.flatline_tolerance:
            track.count += 1
        else:
            track.count = 1
        track.value, track.ts = v, r.timestamp
        if rules.flat_m and track.count >= rules.flat_m:
            r.flag(Quality.BAD, "flatline")
        elif rules.flat_n and track.count >= rules.flat_n:
            r.flag(Quality.UNCERTAIN, "flatline")

    def _check_age(self, r: Reading, rules: _Rules, now: float) -> None:
        if rules.max_age and now - r.timestamp > rules.max_age:
            r.flag(Quality.UNCERTAIN, "stale")
        else:
            self.check_ahead(r, now)

    def check_ahead(self, r: Reading, clock: float) -> Reading:
        """Flag a reading stamped more than ``max_future`` ahead of ``clock`` (``AHEAD``): the
        gateway's clock when it takes the reading, or, centrally, when it sent it to Kafka."""
        if self.config.max_future and r.timestamp - clock > self.config.max_future:
            r.flag(Quality.UNCERTAIN, AHEAD)
        return r
