"""The real servers' variables, as ``scripts/services up`` writes them to var/services.env.

A server whose variables are missing is started through ``scripts/services up``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES_ENV = ROOT / "var" / "services.env"
REQUIRED = {
    "mosquitto": ("MQTT_HOST", "MQTT_PORT", "MQTT_USERNAME", "MQTT_PASSWORD"),
    "kafka": ("KAFKA_BOOTSTRAP_SERVERS", "KAFKA_SASL_BOOTSTRAP_SERVERS"),
    "influxdb": ("INFLUXDB_URL", "INFLUXDB_TOKEN"),
}


def read_env(path: Path = SERVICES_ENV) -> dict[str, str]:
    env: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                k, v = line.split("=", 1)
                env[k.strip()] = v.strip()
    return env


def ensure_services(*names: str) -> dict[str, str]:
    """The variables of these servers, starting those whose variables are missing."""
    env = read_env()
    missing = [n for n in names if not all(k in env for k in REQUIRED[n])]
    if missing:
        subprocess.run([str(ROOT / "scripts" / "services"), "up", *missing], check=True)
        env = read_env()
    return env
