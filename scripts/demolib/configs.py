"""The config files the demo writes for each plant's gateway and for the central processor."""

from __future__ import annotations

import re
from pathlib import Path

from scripts.demolib.story import FLOW_METER, HTTP_SENSOR, MQTT_SENSOR, PLANTS, PROBES, alarm_toml

ROOT = Path(__file__).resolve().parents[2]
DRIVERS = ROOT / "drivers"
HTTP_TOKEN_VAR, DASHBOARD_TOKEN_VAR = "DEMO_HTTP_TOKEN", "DEMO_DASHBOARD_TOKEN"
SMTP_PASSWORD_VAR, WEBHOOK_SECRET_VAR = "DEMO_SMTP_PASSWORD", "DEMO_WEBHOOK_SECRET"


def gateway_toml(
    plant: str,
    gateway_id: str,
    workdir: Path,
    env: dict[str, str],
    kafka: str,
    ports: dict[str, int],
) -> str:
    slaves = "".join(
        f"""
[[modbus.serial.slaves]]
profile = "{DRIVERS / p.profile}"
unit = {p.unit}
sensor_id = "{p.sensor_id}"
plant_id = "{plant}"
location = "{p.location}"
interval = 2.0
"""
        for p in PROBES
    )
    return f"""[gateway]
id = "{gateway_id}"
plant_id = "{plant}"
location = "{plant}-works"

[[modbus.serial]]
port = "{workdir / "tty-gateway"}"
baudrate = 9600                   # the sonde ships at 19200 8E1; on this bus it is set to 9600 8N1
parity = "N"
stopbits = 1
timeout = 0.3
{slaves}
[[modbus.tcp]]
host = "127.0.0.1"
port = {ports["flow"]}
profile = "{DRIVERS / FLOW_METER.profile}"
sensor_id = "{FLOW_METER.sensor_id}"
plant_id = "{plant}"
location = "{FLOW_METER.location}"
interval = 2.0

[mqtt]
enabled = true
host = "{env["MQTT_HOST"]}"
port = {env["MQTT_TLS_PORT"]}
tls = true
ca_file = "{env["MQTT_CA_FILE"]}"
username = "{env["MQTT_USERNAME"]}"
password = "env:MQTT_PASSWORD"
client_id = "edge-gateway-{gateway_id}"
session_expiry = 600
reconnect_max_delay = 2

[[mqtt.subscriptions]]
topic = "plant/{plant}/+/+"
format = "number"
pattern = "plant/{{plantId}}/{{sensorId}}/{{parameter}}"
unit = "mg/L"
location = "clarifier"

[calibration]
store = "calibrations.sqlite"

[buffer]
path = "buffer.db"

[deadletter]
path = "deadletter.db"

[kafka]
bootstrap_servers = "{kafka}"
linger_ms = 5

[http]
port = {ports["http"]}
token = "env:{HTTP_TOKEN_VAR}"

{alarm_toml()}
"""


def processor_toml(
    env: dict[str, str], http_port: int, ml_port: int, group: str, notify: str = ""
) -> str:
    plants = "|".join(re.escape(p) for p in PLANTS)
    return f"""[processor]
bootstrap_servers = "{env["KAFKA_BOOTSTRAP_SERVERS"]}"
group_id = "{group}"
topic_pattern = '^sensors\\.raw\\.({plants})$'
http_port = {http_port}
http_token = "env:{DASHBOARD_TOKEN_VAR}"
metadata_refresh_ms = 5000

[influxdb]
url = "{env["INFLUXDB_URL"]}"
org = "{env["INFLUXDB_ORG"]}"
token = "env:INFLUXDB_TOKEN"

[ml]
enabled = true
api_url = "http://127.0.0.1:{ml_port}"

{alarm_toml()}
{notify}"""


def sensor_names() -> list[str]:
    return [p.sensor_id for p in PROBES] + [FLOW_METER.sensor_id, MQTT_SENSOR, HTTP_SENSOR]


def notifier_present() -> bool:
    """Whether this processor sends notifications (issue 11's alerting package)."""
    import importlib.util

    return importlib.util.find_spec("gateway.processor.alerting") is not None


def notify_toml(smtp_port: int, webhook_port: int, smtp_ca: Path, state: Path) -> str:
    """The processor's notification channels, pointed at the demo's receivers (their credentials
    in the environment: SMTP_PASSWORD_VAR, WEBHOOK_SECRET_VAR); empty while the processor has no
    notifier (its config check would refuse the section)."""
    if not notifier_present():
        return ""
    return f"""[notifications]
enabled = true
state_path = "{state}"
group_wait = 3.0                  # the demo's alarms are sent within seconds

[notifications.email.ops]
host = "127.0.0.1"
port = {smtp_port}
tls = "starttls"
username = "alerts"
password = "env:{SMTP_PASSWORD_VAR}"
ca_file = "{smtp_ca}"
sender = "edge-processor@plant.example"
to = ["operator@plant.example"]

[notifications.webhook.chat]
url = "http://127.0.0.1:{webhook_port}/hook"
format = "generic"
secret = "env:{WEBHOOK_SECRET_VAR}"

[[notifications.routes]]
levels = ["critical"]
channels = ["ops", "chat"]
resolved = false

[[notifications.routes]]
levels = ["warning"]
channels = ["chat"]
resolved = false
"""
