"""How the CLI reaches a probe during a live calibration: through the running daemon's local API
(it owns the serial port), or, with no daemon running, by polling the port itself with the same
Modbus engine and profile. Both answer the same questions (``Link``)."""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from gateway.common.metrics import Metrics
from gateway.common.model import Reading, Record
from gateway.edge.acquire.modbus.engine import ModbusEngine
from gateway.edge.acquire.modbus.registers import width
from gateway.edge.calibrate import CalibrationRecord, CalibrationStore
from gateway.edge.calibration_api import (
    PREFIX,
    api_file,
    reading_view,
    register_number,
    register_value,
)
from gateway.edge.settings import GatewayConfig

Live = dict[str, dict[str, Any]]  # parameter -> reading view (value, raw, unit, quality, ...)


class LinkError(RuntimeError):
    pass


def raw_values(live: Live) -> dict[str, float]:
    """Parameter -> raw (uncalibrated) number, for the readings that have one and are not bad."""
    return {
        p: float(v["raw"])
        for p, v in live.items()
        if isinstance(v.get("raw"), int | float) and v.get("quality") != "bad"
    }


class Link(Protocol):
    where: str

    def live(self, sensor: str) -> Live: ...
    def start(self, sensor: str) -> None: ...
    def finish(self, record: CalibrationRecord) -> dict[str, Any]: ...
    def abort(self, sensor: str) -> None: ...
    def probe(self, sensor: str, write: dict[str, float]) -> dict[str, float | None]: ...
    def close(self) -> None: ...


class DaemonLink:
    """The running gateway's calibration API (see gateway/edge/calibration_api.py)."""

    def __init__(self, url: str, token: str, timeout: float = 10.0) -> None:
        self.url, self._token, self.timeout = url.rstrip("/"), token, timeout
        self.where = f"the running gateway at {self.url}"

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}{PREFIX}/{path}",
            data=data,
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                doc: dict[str, Any] = json.loads(r.read())
                return doc
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise LinkError(f"the gateway answered {e.code}: {detail}") from None
        except (OSError, ValueError) as e:
            raise LinkError(f"the gateway at {self.url} does not answer: {e}") from None

    def live(self, sensor: str) -> Live:
        doc = self._call(f"live?sensor={urllib.parse.quote(sensor)}")
        readings: Live = doc.get("readings", {})
        return readings

    def start(self, sensor: str) -> None:
        self._call("start", {"sensor": sensor})

    def finish(self, record: CalibrationRecord) -> dict[str, Any]:
        return self._call("finish", {"sensor": record.sensor_id, "record": record.to_dict()})

    def abort(self, sensor: str) -> None:
        self._call("abort", {"sensor": sensor})

    def probe(self, sensor: str, write: dict[str, float]) -> dict[str, float | None]:
        regs: dict[str, float | None] = self._call("probe", {"sensor": sensor, "write": write})[
            "registers"
        ]
        return regs

    def close(self) -> None:
        pass


class LocalLink:
    """No daemon: poll the configured Modbus devices here; records go straight to the store."""

    def __init__(self, config: GatewayConfig) -> None:
        self.where = "the serial port directly (no gateway running)"
        self.store = CalibrationStore(config.calibration.store)
        self._latest: dict[tuple[str, str], Reading] = {}
        self._lock = threading.Lock()
        self.engine = ModbusEngine(config.modbus, self._sink, Metrics())
        self.engine.start()

    def _sink(
        self, records: list[Record], on_durable: Any = None, *, timeout: float | None = None
    ) -> None:
        with self._lock:
            for r in records:
                if isinstance(r, Reading):
                    self._latest[(r.sensor_id, r.parameter)] = r

    def live(self, sensor: str) -> Live:
        with self._lock:
            return {p: reading_view(r) for (s, p), r in self._latest.items() if s == sensor}

    def start(self, sensor: str) -> None:
        pass  # nothing else reads the probe

    def finish(self, record: CalibrationRecord) -> dict[str, Any]:
        saved = self.store.save(record)
        return {"id": saved.id, "status": saved.status, "activated": saved.status != "fail"}

    def abort(self, sensor: str) -> None:
        pass

    def probe(self, sensor: str, write: dict[str, float]) -> dict[str, float | None]:
        for label, worker in self.engine.workers.items():
            for dev in worker.bus.devices:
                if sensor not in {dev.sensor_id(v.name) for v in dev.profile.values}:
                    continue
                regs = {c.name: c for c in dev.profile.calibration}
                for name, value in write.items():
                    reg = regs[name]
                    values = register_value(reg, value)
                    self.engine.write_registers(label, dev.unit, reg.address, values)
                read = self.engine.read_registers
                return {
                    n: register_number(r, read(label, dev.unit, r.table, r.address, width(r.type)))
                    for n, r in regs.items()
                }
        raise LinkError(f"no Modbus device with sensor {sensor!r} in the config")

    def close(self) -> None:
        self.engine.stop()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def daemon_api(config: GatewayConfig) -> tuple[str, str] | None:
    """(url, token) of the running daemon's API, if its file names a live process."""
    path = api_file(config.calibration.store)
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LinkError(f"{path}: cannot read the gateway's API file ({e})") from None
    if not _alive(int(doc.get("pid", 0))):
        return None
    return str(doc["url"]), str(doc["token"])


def connect(config: GatewayConfig) -> Link:
    """The running daemon's API if there is one, else the port directly."""
    api = daemon_api(config)
    return DaemonLink(*api) if api else LocalLink(config)
