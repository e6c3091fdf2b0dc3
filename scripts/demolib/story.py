"""What the demo's plants are made of and what happens to them, in seconds from the story's start.

Each plant has six probes of five models on one RS-485 bus, a Modbus TCP flow meter, an MQTT
clarifier analyser and an HTTP-pushing dissolved-oxygen meter. Plant A (``north``) gets a pollution
event: an organic load reaches the influent and breaks through to the effluent, so COD and TSS
rise at the effluent probes past their warning and then their critical limits. Plant B (``south``)
loses its link to Kafka for 20 s.
"""

from __future__ import annotations

from dataclasses import dataclass

PLANT_A, PLANT_B = "north", "south"
PLANTS = (PLANT_A, PLANT_B)


@dataclass(frozen=True)
class Probe:
    profile: str  # file under drivers/
    unit: int
    sensor_id: str
    location: str
    scale: float = 1.0  # of the profile's nominal values: an effluent probe reads lower


PROBES = (
    Probe("ph-int16.toml", 1, "ph-aeration-1", "aeration-1"),
    Probe("uv254-optical.toml", 2, "uv-influent-1", "influent"),
    Probe("uv254-optical.toml", 3, "uv-effluent-1", "effluent", scale=0.1),
    Probe("conductivity-tds.toml", 4, "cond-effluent-1", "effluent"),
    Probe("sonde-float32-cdab.toml", 5, "sonde-basin-1", "basin-1"),
    Probe("turbidity-tss-uint16.toml", 6, "turb-effluent-1", "effluent"),
)
FLOW_METER = Probe("flowmeter-tcp.toml", 1, "flow-influent-1", "influent")
MQTT_SENSOR, HTTP_SENSOR = "tss-clarifier-1", "do-aeration-1"

# Limits fit where the probe sits (mg/L: warning, critical, deadband). Effluent: EU 91/271 as
# critical, 80 % of it as warning. Influent: raw sewage normally carries BOD 150-300, COD 300-700,
# TSS 100-350, so its probe warns only at a load the plant was not designed for. Other probes
# (clarifier TSS) keep the shipped defaults (BOD 30/100, COD 250/500, TSS 100/300).
LIMITS = {
    "effluent": {"COD": (100.0, 125.0, 3.0), "BOD": (20.0, 25.0, 1.0), "TSS": (28.0, 35.0, 1.0)},
    "influent": {
        "COD": (900.0, 1200.0, 20.0),
        "BOD": (450.0, 600.0, 10.0),
        "TSS": (450.0, 600.0, 10.0),
    },
}

# The story, in seconds from its start.
POLLUTION_RISE = (20.0, 50.0)  # ramp up between these
POLLUTION_FALL = (160.0, 180.0)  # and back down
POLLUTION_PEAK = {"influent": 2.5, "effluent": 6.0}  # factor on COD, BOD, TSS at the peak
POLLUTED = ("COD", "BOD", "TSS", "turbidity", "uv254_absorbance")
OUTAGE = (45.0, 65.0)  # plant B's link to Kafka is down between these
STORY_END = 130.0  # by then every event of the story has happened (with the drain after it)


def pollution(location: str, t: float) -> float:
    """The factor on the polluted parameters at a plant A probe at ``location``, ``t`` s in."""
    peak = POLLUTION_PEAK.get(location)
    if peak is None:
        return 1.0
    (r0, r1), (f0, f1) = POLLUTION_RISE, POLLUTION_FALL
    if t <= r0 or t >= f1:
        share = 0.0
    elif t < r1:
        share = (t - r0) / (r1 - r0)
    elif t <= f0:
        share = 1.0
    else:
        share = (f1 - t) / (f1 - f0)
    return 1.0 + (peak - 1.0) * share


def alarm_toml() -> str:
    """The ``[alarms]`` sections both services use: effluent limits on the effluent probes."""
    out = ["[alarms]", "on_delay = 3.0", "off_delay = 10.0", ""]
    for probe in PROBES:
        for parameter, (warning, critical, deadband) in LIMITS.get(probe.location, {}).items():
            sensor = probe.sensor_id
            out += [
                f"[alarms.sensors.{sensor}.{parameter}]",
                f"high_warning = {warning}",
                f"high_critical = {critical}",
                f"deadband = {deadband}",
                "",
            ]
    return "\n".join(out)
