"""The gateway's in-process stages between a source and the buffer: calibrate, validate, alarms.

Sources on several threads (one per serial port, MQTT, HTTP) share one pipeline; a lock keeps the
stages' state consistent. Stage timings go to ``iot_processing_latency_seconds{stage}`` once per
batch, so their cost does not grow with the reading rate.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from gateway.common.alarms import AlarmEngine
from gateway.common.metrics import Metrics
from gateway.common.model import AlarmEvent, Quality, Reading, Record
from gateway.common.validate import Validator
from gateway.edge import calibrate
from gateway.edge.calibrate import CalibrationStore

MAX_TEMPERATURES = 10_000
MAX_LATEST = 10_000
OUT_OF_SERVICE = "out_of_service:calibration"
OVERDUE = "calibration_overdue"
STAGES = ("calibrate", "validate", "alarms")


class EdgePipeline:
    def __init__(
        self,
        calibrations: CalibrationStore | None,
        validator: Validator,
        alarms: AlarmEngine,
        metrics: Metrics | None = None,
    ) -> None:
        self.calibrations = calibrations
        self.validator = validator
        self.alarms = alarms
        self.metrics = metrics
        self._lock = threading.Lock()
        # Latest temperature per probe, for pH slope and conductivity compensation.
        self._temperatures: dict[tuple[str, str], float] = {}
        # Label lookups cost more than the stages for a one-reading batch (an MQTT message).
        self._stage_timers = (
            {st: metrics.processing_latency.labels(stage=st) for st in STAGES} if metrics else {}
        )
        self._processed: dict[tuple[str, str], Any] = {}
        # The latest reading per (sensor, parameter) as it left the stages (live calibration).
        self.latest: dict[tuple[str, str], Reading] = {}
        # Sensors out of service (being calibrated) until a monotonic time: no process alarms.
        self._out_of_service: dict[str, float] = {}

    def take_out_of_service(self, sensor_id: str, seconds: float) -> None:
        with self._lock:
            self._out_of_service[sensor_id] = time.monotonic() + seconds

    def return_to_service(self, sensor_id: str) -> None:
        with self._lock:
            self._out_of_service.pop(sensor_id, None)

    def latest_of(self, sensor_id: str) -> dict[str, Reading]:
        """The sensor's latest reading per parameter (a copy, taken under the lock)."""
        with self._lock:
            return {p: r for (s, p), r in self.latest.items() if s == sensor_id}

    def out_of_service(self) -> list[str]:
        now = time.monotonic()
        return sorted(s for s, until in self._out_of_service.items() if until > now)

    def process(self, reading: Reading) -> list[Record]:
        return self.process_batch([reading])

    def process_batch(self, readings: Sequence[Reading]) -> list[Record]:
        """Calibrate, validate and check alarms; returns each reading followed by its events."""
        with self._lock:
            t0 = time.perf_counter()
            if self.calibrations is not None:
                self._calibrate(readings, self.calibrations)
            t1 = time.perf_counter()
            now = time.time()
            check = self.validator.check
            for r in readings:
                check(r, now)
            t2 = time.perf_counter()
            out: list[Record] = []
            evaluate = self.alarms.evaluate
            resting = self._resting()
            latest = self.latest
            if len(latest) >= MAX_LATEST:
                latest.clear()
            for r in readings:
                out.append(r)
                latest[(r.sensor_id, r.parameter)] = r
                if resting and r.sensor_id in resting:
                    r.flag(Quality.UNCERTAIN, OUT_OF_SERVICE)  # flagged, kept, no alarms
                    continue
                out.extend(evaluate(r))
            t3 = time.perf_counter()
        if self.metrics is not None:
            self._observe(readings, out, (t1 - t0, t2 - t1, t3 - t2))
        return out

    def _resting(self) -> set[str]:
        if not self._out_of_service:
            return set()
        now = time.monotonic()
        for s in [s for s, until in self._out_of_service.items() if until <= now]:
            del self._out_of_service[s]  # a session the CLI left open ends by itself
        return set(self._out_of_service)

    def _calibrate(self, readings: Sequence[Reading], store: CalibrationStore) -> None:
        store.reload_if_changed()
        temps = self._temperatures
        now = time.time()
        for r in readings:
            record = store.active(r.sensor_id, r.parameter)
            if record is not None:
                calibrate.apply(r, record, temps.get((r.plant_id, r.sensor_id)))
                if record.due_at is not None and record.due_at < now:
                    r.quality_reasons.append(OVERDUE)  # a reason; the quality stays
            v = r.value
            if (
                r.parameter == "temperature"
                and v is not None
                and -10.0 <= v <= 100.0
                and r.quality is not Quality.BAD
            ):
                if len(temps) >= MAX_TEMPERATURES:
                    temps.clear()
                temps[(r.plant_id, r.sensor_id)] = v

    def _processed_counter(self, status: str, plant: str) -> Any:
        counter = self._processed.get((status, plant))
        if counter is None:
            assert self.metrics is not None
            counter = self.metrics.messages_processed.labels(status=status, plant_id=plant)
            self._processed[(status, plant)] = counter
        return counter

    def _observe(
        self, readings: Sequence[Reading], out: list[Record], times: tuple[float, ...]
    ) -> None:
        m = self.metrics
        assert m is not None
        for stage, seconds in zip(STAGES, times, strict=True):
            self._stage_timers[stage].observe(seconds)
        if len(readings) == 1:
            self._processed_counter(readings[0].quality.value, readings[0].plant_id).inc()
        else:
            for (status, plant), n in Counter(
                (r.quality.value, r.plant_id) for r in readings
            ).items():
                self._processed_counter(status, plant).inc(n)
        for rec in out:
            if isinstance(rec, AlarmEvent) and rec.state in ("raised", "re-raised"):
                m.alerts_triggered.labels(level=rec.level, parameter=rec.parameter).inc()
