"""The daemon's local calibration API: the CLI calibrates a probe whose serial port the daemon owns.

Routes on the daemon's HTTP server (bound to 127.0.0.1 by default), every one guarded by a bearer
token made at each start and written with the server's URL to ``gateway-api.json`` beside the
calibration store, mode 0600: whoever may read that file (the gateway's user, root) may
calibrate. Nothing else in the daemon changes hands:

- ``GET  /api/calibration/live?sensor=S``: the sensor's latest readings as they left the pipeline
  (value, raw value before calibration, quality, reasons), and whether it is out of service;
- ``POST /api/calibration/start`` ``{"sensor": S}``: out of service (readings flagged, no process
  alarms) until finish, abort or ``[calibration] session_timeout``;
- ``POST /api/calibration/finish`` ``{"sensor": S, "record": {...}}``: the record is stored (a
  failed one in the history only) and, if it passed, used from the next reading on; back in
  service;
- ``POST /api/calibration/abort`` ``{"sensor": S}``: back in service, nothing stored;
- ``POST /api/calibration/probe`` ``{"sensor": S, "write": {"name": value}}``: write a profile's
  calibration registers through the bus lock and read them back (``write`` empty: read only).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.common.http import Answer, HttpServer, Route
from gateway.edge.acquire.modbus.engine import ModbusEngine
from gateway.edge.acquire.modbus.profiles import CalibrationRegister
from gateway.edge.acquire.modbus.registers import decode, encode, width
from gateway.edge.calibrate import (
    CONDUCTIVITY_METHODS,
    LINEAR_METHODS,
    PH_METHODS,
    RESULTS,
    CalibrationRecord,
    CalibrationStore,
)
from gateway.edge.pipeline import EdgePipeline

log = logging.getLogger(__name__)

PREFIX = "/api/calibration"
API_FILE = "gateway-api.json"
MAX_BODY = 64 * 1024


def api_file(store: str | Path) -> Path:
    """Where a daemon with this calibration store says how to reach it."""
    return Path(store).parent / API_FILE


def reading_view(r: Any) -> dict[str, Any]:
    return {
        "value": r.value,
        "raw": r.raw_value if r.calibration_id else r.value,
        "unit": r.unit,
        "quality": r.quality.value,
        "reasons": list(r.quality_reasons),
        "timestamp": r.timestamp,
        "calibrationId": r.calibration_id,
    }


def register_value(reg: CalibrationRegister, value: float) -> list[int]:
    return encode((value - reg.offset) / reg.scale, reg.type, reg.word_order)


def register_number(reg: CalibrationRegister, regs: list[int]) -> float | None:
    raw = decode(regs, reg.type, reg.word_order)
    return raw * reg.scale + reg.offset if isinstance(raw, int | float) else None


NUMBERS = ("calibrated_at", *RESULTS, "alpha", "due_at")


def _number(x: Any, optional: bool = True) -> bool:
    if x is None:
        return optional
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def record_problem(rec: CalibrationRecord) -> str:
    """What makes a record from a client unfit to correct readings with ("" if nothing): the
    pipeline applies it to every reading, so it must hold numbers where numbers go."""
    if rec.method not in (*PH_METHODS, *LINEAR_METHODS, *CONDUCTIVITY_METHODS):
        return f"unknown method {rec.method!r}"
    if rec.status not in ("pass", "warn", "fail") or rec.applied_in not in ("gateway", "probe"):
        return "status must be pass, warn or fail; applied_in gateway or probe"
    bad = [n for n in NUMBERS if not _number(getattr(rec, n), n != "calibrated_at")]
    if bad:
        return f"not finite numbers: {bad}"
    for s in rec.standards:
        if not (_number(s.nominal, False) and _number(s.raw, False) and _number(s.temperature)):
            return "each standard needs a numeric nominal and raw"
    if not isinstance(rec.previous, dict) or not all(_number(v) for v in rec.previous.values()):
        return "previous: an object of numbers"
    return ""


@dataclass
class CalibrationApi:
    pipeline: EdgePipeline
    store: CalibrationStore
    modbus: ModbusEngine
    session_timeout: float
    token: str = ""

    def __post_init__(self) -> None:
        if not self.token:
            self.token = secrets.token_urlsafe(24)

    def attach(self, server: HttpServer) -> None:
        key = self.token.encode()
        server.add_get(f"{PREFIX}/live", self.live, key)
        for name, handle in (
            ("start", self.start),
            ("finish", self.finish),
            ("abort", self.abort),
            ("probe", self.probe),
        ):
            server.add_route(f"{PREFIX}/{name}", Route(handle, MAX_BODY, key))

    def publish(self, store_path: str | Path, host: str, port: int) -> Path:
        """Write the API file (0600, atomically) once the server listens."""
        path = api_file(store_path)
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)  # O_CREAT keeps an old file's mode: start afresh
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"url": f"http://{host}:{port}", "token": self.token, "pid": os.getpid()}, f)
        os.replace(tmp, path)
        return path

    # -- handlers ------------------------------------------------------------------------------

    async def live(self, query: Mapping[str, str]) -> Answer:
        sensor = query.get("sensor", "")
        if not sensor:
            return 400, {"error": "give ?sensor=SENSOR_ID"}
        latest = await asyncio.get_running_loop().run_in_executor(
            None, self.pipeline.latest_of, sensor
        )  # the pipeline's lock may be held for a batch: not on the event loop
        readings = {p: reading_view(r) for p, r in latest.items()}
        return 200, {
            "sensor": sensor,
            "outOfService": sensor in self.pipeline.out_of_service(),
            "readings": readings,
        }

    def start(self, body: bytes) -> Answer:
        doc, sensor = _sensor(body)
        if doc is None:
            return 400, {"error": sensor}
        self.pipeline.take_out_of_service(sensor, self.session_timeout)
        log.info("calibration of %s started: out of service", sensor)
        return 200, {"sensor": sensor, "outOfService": True, "timeout": self.session_timeout}

    def abort(self, body: bytes) -> Answer:
        doc, sensor = _sensor(body)
        if doc is None:
            return 400, {"error": sensor}
        self.pipeline.return_to_service(sensor)
        log.info("calibration of %s abandoned: back in service", sensor)
        return 200, {"sensor": sensor, "outOfService": False}

    def finish(self, body: bytes) -> Answer:
        doc, sensor = _sensor(body)
        if doc is None:
            return 400, {"error": sensor}
        try:
            record = CalibrationRecord.from_dict(doc["record"])
        except (KeyError, TypeError, ValueError) as e:
            return 400, {"error": f"record: not a calibration record ({e})"[:300]}
        if record.sensor_id != sensor:
            return 400, {"error": f"record is for {record.sensor_id!r}, not {sensor!r}"}
        problem = record_problem(record)
        if problem:
            return 400, {"error": f"record: {problem}"}
        saved = self.store.save(record)  # reloads: the next reading uses it
        self.pipeline.return_to_service(sensor)
        activated = saved.status != "fail"
        log.info(
            "calibration %s of %s %s: %s, %s",
            saved.id,
            sensor,
            saved.parameter,
            saved.status,
            "active now" if activated else "kept in the history, not activated",
        )
        return 200, {"id": saved.id, "status": saved.status, "activated": activated}

    def probe(self, body: bytes) -> Answer:
        doc, sensor = _sensor(body)
        if doc is None:
            return 400, {"error": sensor}
        found = self._device(sensor)
        if found is None:
            return 404, {"error": f"no Modbus device with sensor {sensor!r}"}
        bus, dev = found
        regs = {c.name: c for c in dev.profile.calibration}
        writes = doc.get("write") or {}
        if not isinstance(writes, dict) or not set(writes) <= set(regs):
            return 400, {"error": f"write: an object of {sorted(regs)}"}
        try:
            for name, value in writes.items():
                reg = regs[name]
                self.modbus.write_registers(bus, dev.unit, reg.address, register_value(reg, value))
            back = {
                name: register_number(
                    reg,
                    self.modbus.read_registers(
                        bus, dev.unit, reg.table, reg.address, width(reg.type)
                    ),
                )
                for name, reg in regs.items()
            }
        except (ValueError, TypeError) as e:
            return 400, {"error": str(e)[:300]}
        except Exception as e:  # ModbusError and kin: the probe's answer, not a daemon fault
            return 502, {"error": f"{type(e).__name__}: {e}"[:300]}
        return 200, {"sensor": sensor, "registers": back}

    def _device(self, sensor: str) -> tuple[str, Any] | None:
        for label, worker in self.modbus.workers.items():
            for dev in worker.bus.devices:
                names = {dev.sensor_id(v.name) for v in dev.profile.values}
                if sensor in names:
                    return label, dev
        return None


def _sensor(body: bytes) -> tuple[dict[str, Any] | None, str]:
    """(the JSON object, its sensor) or (None, what is wrong)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, "body is not JSON"
    if not isinstance(doc, dict) or not isinstance(doc.get("sensor"), str) or not doc["sensor"]:
        return None, 'expected {"sensor": "SENSOR_ID", ...}'
    return doc, doc["sensor"]
