"""The devices that are not on a Modbus bus: an MQTT clarifier TSS analyser (QoS 1 over TLS) and a
dissolved-oxygen meter that pushes readings to the gateway's ``POST /api/readings``. Each counts
what its gateway acknowledged (an MQTT PUBACK, an HTTP 202)."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime

import paho.mqtt.client as mqtt

from scripts.demolib.story import HTTP_SENSOR, MQTT_SENSOR


class MqttDevice(threading.Thread):
    def __init__(self, env: dict[str, str], plant: str) -> None:
        super().__init__(name=f"mqtt-{plant}", daemon=True)
        self.topic = f"plant/{plant}/{MQTT_SENSOR}/TSS"
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"demo-clarifier-{plant}"
        )
        self.client.username_pw_set(env["MQTT_USERNAME"], env["MQTT_PASSWORD"])
        self.client.tls_set(ca_certs=env["MQTT_CA_FILE"])
        self.client.connect(env["MQTT_HOST"], int(env["MQTT_TLS_PORT"]))
        self.stopped = threading.Event()
        self.sent = self.acked = 0

    def run(self) -> None:
        self.client.loop_start()
        t0 = time.monotonic()
        while not self.stopped.wait(1.0):
            value = 60.0 + 8 * math.sin((time.monotonic() - t0) / 20)
            info = self.client.publish(self.topic, f"{value:.1f}", qos=1)
            self.sent += 1
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(5)
                self.acked += info.is_published()
        self.client.loop_stop()
        self.client.disconnect()


class HttpDevice(threading.Thread):
    def __init__(self, plant: str, port_of: object, token: str) -> None:
        super().__init__(name=f"http-{plant}", daemon=True)
        self.plant, self.port_of, self.token = plant, port_of, token
        self.stopped = threading.Event()
        self.sent = self.acked = 0

    def run(self) -> None:
        seq = 0
        while not self.stopped.wait(2.0):
            seq += 1
            reading = {
                "sensorId": HTTP_SENSOR,
                "plantId": self.plant,
                "parameter": "dissolved_oxygen",
                "value": round(2.0 + 0.3 * math.sin(seq / 10), 3),
                "unit": "mg/L",
                "location": "aeration-1",
                "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "seq": seq,
            }
            self.sent += 1
            for _ in range(5):  # a retry of the same seq is recognised by the gateway
                if self._post(reading):
                    self.acked += 1
                    break
                if self.stopped.wait(1.0):
                    break

    def _post(self, reading: dict[str, object]) -> bool:
        port = self.port_of() if callable(self.port_of) else self.port_of
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/readings",
            data=json.dumps(reading).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status == 202
        except (OSError, urllib.error.URLError):
            return False
