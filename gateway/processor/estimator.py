"""The built-in reusability estimator: effluent quality from influent readings, classified against
the reuse and discharge limits. Pure and deterministic: the same inputs and settings give the same
answer, here and behind ``edge-gateway ml serve``.

Effluent (first-order removal, an Arrhenius-type temperature correction, optionally the flow)::

    k        = theta ** (T - 20) * F          T clamped to 5..35 °C
    F        = design_flow / flow_rate        clamped to 0.25..4; 1 when design_flow is 0
    BOD_out  = BOD_in * (1 - E_BOD) ** k
    COD_out  = COD_in * (1 - E_COD) ** k
    TSS_out  = TSS_in * (1 - E_TSS) ** F      settling: no temperature correction
    pH_out   = pH_in,  TDS_out = TDS_in       conventional treatment changes neither

``E`` is the plant's removal fraction at 20 °C and design flow: at 20 °C ``(1 - E) ** 1`` leaves
exactly ``1 - E``. Writing the correction on the exponent (remaining = exp(-k20 θ^(T-20) t)) keeps
the removal below 100 % at any temperature, where ``E * θ^(T-20)`` would not.

Classification: each limit gives a *margin*, positive inside and negative outside: ``(L - x) / L``
for a concentration limit, the distance in pH units divided by 1.5 (half the 6.0-9.0 band) for a
pH bound. A set of limits is met when no margin is negative (a value on the limit is inside). The
prediction is the first reuse class (in configured order) whose limits and the discharge limits are
all met, else "discharge only" when the discharge limits are, else "not compliant".

Confidence: ``d`` is how far the estimate is from changing the answer: the smallest margin of the
limits the answer relies on, and, for each better answer that failed, the margin by which it failed
(its worst violated limit: it fails as long as that one does). ``confidence = 0.5 + 0.5 * min(1,
d / full_confidence_margin)``: 0.5 on a limit (a coin toss), 1.0 once every deciding margin is at
least ``full_confidence_margin`` (default 0.5, i.e. half the limit).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

# The ML contract's inputs and the values used when a reading is missing (DESIGN.md).
INPUT_DEFAULTS: dict[str, float] = {
    "flow_rate": 150.0,
    "influent_BOD": 180.0,
    "influent_COD": 350.0,
    "influent_TSS": 120.0,
    "influent_pH": 7.5,
    "influent_TDS": 600.0,
    "temperature": 25.0,
}
# Which reading parameter feeds which input.
INPUT_OF_PARAMETER: dict[str, str] = {
    "flow_rate": "flow_rate",
    "BOD": "influent_BOD",
    "COD": "influent_COD",
    "TSS": "influent_TSS",
    "pH": "influent_pH",
    "TDS": "influent_TDS",
    "temperature": "temperature",
}
# A prediction waits until the current window has data for all of these.
REQUIRED_PARAMETERS = ("pH", "BOD", "COD", "TSS", "TDS")

TEMPERATURE_RANGE = (5.0, 35.0)  # °C where the correction is applied; outside, clamped
FLOW_FACTOR_RANGE = (0.25, 4.0)
PH_MARGIN_UNIT = 1.5  # pH units that count as a margin of 1.0

DISCHARGE_ONLY = "discharge only"
NOT_COMPLIANT = "not compliant"


@dataclass(frozen=True)
class Removal:
    """TOML ``[ml.removal]``: fractions removed at 20 °C and design flow, and the correction."""

    bod: float = 0.93
    cod: float = 0.85
    tss: float = 0.92
    theta: float = 1.047  # Arrhenius temperature coefficient on BOD/COD removal
    design_flow: float = 0.0  # the plant's design flow in flow_rate's unit; 0 = no correction

    def __post_init__(self) -> None:
        for name in ("bod", "cod", "tss"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be a fraction removed, 0 <= {name} < 1")
        if not 1.0 <= self.theta <= 1.2:
            raise ValueError("theta must be between 1.0 and 1.2")
        if self.design_flow < 0:
            raise ValueError("design_flow must be >= 0 (0 = no flow correction)")


@dataclass(frozen=True)
class RemovalOverride:
    """TOML ``[ml.plants.<plant_id>]``: what differs from ``[ml.removal]`` for one plant."""

    bod: float | None = None
    cod: float | None = None
    tss: float | None = None
    theta: float | None = None
    design_flow: float | None = None


@dataclass(frozen=True)
class Limits:
    """Maximum concentrations (mg/L) and a pH band; a limit left out does not apply."""

    bod: float | None = None
    cod: float | None = None
    tss: float | None = None
    ph_min: float | None = None
    ph_max: float | None = None

    def __post_init__(self) -> None:
        for name in ("bod", "cod", "tss"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be a positive limit")
        if self.ph_min is not None and self.ph_max is not None and self.ph_min >= self.ph_max:
            raise ValueError("ph_min must be below ph_max")


@dataclass(frozen=True)
class DischargeLimits(Limits):
    """TOML ``[ml.discharge]``: EU 91/271 (BOD 25, COD 125, TSS 35 mg/L) and the US 40 CFR
    133.102 pH band (6.0-9.0); a key left out keeps its default here."""

    bod: float | None = 25.0
    cod: float | None = 125.0
    tss: float | None = 35.0
    ph_min: float | None = 6.0
    ph_max: float | None = 9.0


DISCHARGE = DischargeLimits()
# EU 2020/741 class A: BOD and TSS <= 10 (turbidity and E. coli are not estimated).
REUSE_CLASSES = {"A": Limits(bod=10.0, tss=10.0)}


@dataclass(kw_only=True)
class EstimatorConfig:
    """The estimator's settings (part of TOML ``[ml]``)."""

    removal: Removal = field(default_factory=Removal)
    plants: dict[str, RemovalOverride] = field(default_factory=dict)
    discharge: DischargeLimits = DISCHARGE
    reuse_classes: dict[str, Limits] = field(default_factory=lambda: dict(REUSE_CLASSES))
    full_confidence_margin: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.full_confidence_margin <= 10:
            raise ValueError("full_confidence_margin must be above 0 (and at most 10)")
        for plant in self.plants:
            self.removal_for(plant)  # an override must give a valid Removal too

    def removal_for(self, plant_id: str) -> Removal:
        override = self.plants.get(plant_id)
        if override is None:
            return self.removal
        changes = {k: v for k, v in dataclasses.asdict(override).items() if v is not None}
        try:
            return dataclasses.replace(self.removal, **changes)
        except ValueError as e:
            raise ValueError(f"plants.{plant_id}: {e}") from None


@dataclass(frozen=True)
class Effluent:
    bod: float
    cod: float
    tss: float
    ph: float
    tds: float

    def to_dict(self) -> dict[str, float]:
        return {
            "BOD": round(self.bod, 3),
            "COD": round(self.cod, 3),
            "TSS": round(self.tss, 3),
            "pH": self.ph,
            "TDS": self.tds,
        }


@dataclass(frozen=True)
class Estimate:
    prediction: str
    confidence: float
    effluent: Effluent


def _clamp(v: float, bounds: tuple[float, float]) -> float:
    return min(max(v, bounds[0]), bounds[1])


def with_defaults(inputs: Mapping[str, float]) -> dict[str, float]:
    """All seven inputs, the design's defaults for those missing."""
    return {name: float(inputs.get(name, default)) for name, default in INPUT_DEFAULTS.items()}


def effluent(inputs: Mapping[str, float], removal: Removal) -> Effluent:
    """The effluent the plant is expected to discharge for these influent values."""
    x = with_defaults(inputs)
    flow_factor = 1.0
    if removal.design_flow > 0 and x["flow_rate"] > 0:
        flow_factor = _clamp(removal.design_flow / x["flow_rate"], FLOW_FACTOR_RANGE)
    temperature = _clamp(x["temperature"], TEMPERATURE_RANGE)
    k = removal.theta ** (temperature - 20.0) * flow_factor
    return Effluent(
        bod=x["influent_BOD"] * (1.0 - removal.bod) ** k,
        cod=x["influent_COD"] * (1.0 - removal.cod) ** k,
        tss=x["influent_TSS"] * (1.0 - removal.tss) ** flow_factor,
        ph=x["influent_pH"],
        tds=x["influent_TDS"],
    )


def margins(e: Effluent, limits: Limits) -> list[float]:
    """One margin per limit that applies: positive inside, zero on the limit, negative outside."""
    out = [
        (limit - value) / limit
        for value, limit in ((e.bod, limits.bod), (e.cod, limits.cod), (e.tss, limits.tss))
        if limit is not None
    ]
    if limits.ph_min is not None:
        out.append((e.ph - limits.ph_min) / PH_MARGIN_UNIT)
    if limits.ph_max is not None:
        out.append((limits.ph_max - e.ph) / PH_MARGIN_UNIT)
    return out


def classify(
    e: Effluent,
    discharge: Limits = DISCHARGE,
    reuse_classes: Mapping[str, Limits] = REUSE_CLASSES,
    full_confidence_margin: float = 0.5,
) -> tuple[str, float]:
    """The prediction (``class <name>``, "discharge only" or "not compliant") and its confidence."""
    base = margins(e, discharge)
    failed_by: list[float] = []  # how far each better answer missed
    answer, kept = NOT_COMPLIANT, None
    for name, limits in reuse_classes.items():
        ms = base + margins(e, limits)
        if min(ms, default=math.inf) >= 0:
            answer, kept = f"class {name}", ms
            break
        failed_by.append(max(-m for m in ms if m < 0))
    else:
        if min(base, default=math.inf) >= 0:
            answer, kept = DISCHARGE_ONLY, base
    if kept is None:  # not compliant: it stays so while its worst violation does
        decisive = max(-m for m in base if m < 0)
    else:
        decisive = min([*kept, *failed_by], default=math.inf)
    confidence = 0.5 + 0.5 * min(1.0, decisive / full_confidence_margin)
    return answer, round(confidence, 3)


def estimate(inputs: Mapping[str, float], config: EstimatorConfig, plant_id: str = "") -> Estimate:
    """Effluent, prediction and confidence for one plant's influent inputs."""
    e = effluent(inputs, config.removal_for(plant_id))
    prediction, confidence = classify(
        e, config.discharge, config.reuse_classes, config.full_confidence_margin
    )
    return Estimate(prediction, confidence, e)
