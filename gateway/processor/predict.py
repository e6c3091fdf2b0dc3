"""The reusability prediction stage: the ML trigger, the model that answers, where predictions go.

Trigger (DESIGN.md): per plant at most once per ``interval_seconds`` (60 s), and only when pH, BOD,
COD, TSS and TDS all have data in the plant's current window: the 1-minute event-time window of
its newest reading (a reading of a newer minute starts a new window; one of an older minute is
ignored). Readings count as the windows count them: with a finite value and not bad. The inputs
are the window's averages so far; flow_rate and temperature, when the window has none, take the
design's defaults (150, 25), and the prediction names them in ``defaulted``. Only plants with new
readings are checked, so a plant that stops sending gets no further predictions.

The model: the site's ML API when ``api_url`` (or the environment's ``ML_API_URL``) is set and its
circuit is not open, else the built-in estimator; a failed call is answered by the estimator too.
Each prediction is tagged with its model (``ml-api`` or ``builtin``).

Threads: ``on_batch`` runs on the consumer thread and only appends the batch to an inbox (a bounded
deque: when full, the oldest batch is dropped and counted, never waited for). The worker thread
runs an asyncio loop: it drains the inbox into the trigger state and calls the ML API with
aiohttp, so a slow API delays only predictions, and several plants' calls overlap. Callbacks
(``on_prediction(plant_id, message)``, e.g. the live feed) run on the worker's loop and must only
hand off. InfluxDB (measurement ``predictions``) and Kafka (``predictions_topic``) are written by
a sink thread, each retried until it succeeds or the stage stops: at least once, and a replayed
point overwrites itself in InfluxDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.common.logs import RateLimitedLog
from gateway.common.metrics import Metrics
from gateway.common.model import AlarmEvent, Prediction, Reading
from gateway.common.stage import Health
from gateway.common.supervise import Heartbeat
from gateway.processor.aggregate import WindowAggregate, aggregatable, window_start
from gateway.processor.estimator import (
    INPUT_DEFAULTS,
    INPUT_OF_PARAMETER,
    REQUIRED_PARAMETERS,
    EstimatorConfig,
    estimate,
)
from gateway.processor.mlapi import CircuitBreaker, MlClient
from gateway.processor.publish import Delivery, Publisher, PublishFailed
from gateway.processor.store import InfluxConfig, InfluxStore, StoreUnavailable, prediction_line

log = logging.getLogger(__name__)

PredictionCallback = Callable[[str, dict[str, Any]], object]
ML_API, BUILTIN = "ml-api", "builtin"


@dataclass(kw_only=True)
class MlConfig(EstimatorConfig):
    """TOML ``[ml]``: the trigger, the ML API client, and the built-in estimator's settings."""

    enabled: bool = True
    api_url: str = ""  # the site's ML API; the environment's ML_API_URL overrides it
    timeout_seconds: float = 2.0
    breaker_failures: int = 3  # consecutive failures that open the circuit
    breaker_reset_seconds: float = 30.0  # open this long, then one call probes
    interval_seconds: float = 60.0  # per plant, at most one prediction per interval
    max_concurrent_calls: int = 8
    inbox_batches: int = 256  # batches waiting for the worker; more drops the oldest

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.api_url and not self.api_url.startswith(("http://", "https://")):
            raise ValueError("api_url must start with http:// or https:// (or be empty)")
        if self.timeout_seconds <= 0 or self.breaker_reset_seconds < 0:
            raise ValueError("timeout_seconds must be positive, breaker_reset_seconds >= 0")
        if self.breaker_failures < 1 or self.max_concurrent_calls < 1 or self.inbox_batches < 1:
            raise ValueError("breaker_failures, max_concurrent_calls, inbox_batches must be >= 1")
        if self.interval_seconds < 0:
            raise ValueError("interval_seconds must be >= 0")


# --- trigger (pure, clock injected) ---------------------------------------------------------------


@dataclass
class Due:
    """A plant whose window is ready: what to ask the model."""

    plant_id: str
    window_start: int
    timestamp: float  # the newest input reading's time
    inputs: dict[str, float]
    defaulted: list[str]


@dataclass
class _Window:
    start: int
    sums: dict[str, list[float]] = field(default_factory=dict)  # parameter -> [sum, count]
    newest: float = 0.0


class Trigger:
    """Per plant: the current window's readings, and when it last triggered."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._windows: dict[str, _Window] = {}
        self._last: dict[str, float] = {}

    def feed(self, readings: Iterable[Reading]) -> list[Due]:
        """Take a batch; the plants it made due (each at most once per interval)."""
        touched: set[str] = set()
        for r in readings:
            if r.parameter not in INPUT_OF_PARAMETER or not aggregatable(r):
                continue
            assert r.value is not None
            start = window_start(r.timestamp)
            w = self._windows.get(r.plant_id)
            if w is None or start > w.start:
                w = self._windows[r.plant_id] = _Window(start)
            elif start < w.start:
                continue  # an older minute: not the current window
            s = w.sums.get(r.parameter)
            if s is None:
                w.sums[r.parameter] = [r.value, 1.0]
            else:
                s[0] += r.value
                s[1] += 1
            w.newest = max(w.newest, r.timestamp)
            touched.add(r.plant_id)
        now = self.clock()
        due = []
        for plant in sorted(touched):
            w = self._windows[plant]
            if not all(p in w.sums for p in REQUIRED_PARAMETERS):
                continue
            last = self._last.get(plant)
            if last is not None and now - last < self.interval:
                continue
            self._last[plant] = now
            inputs = dict(INPUT_DEFAULTS)
            for parameter, (total, n) in w.sums.items():
                inputs[INPUT_OF_PARAMETER[parameter]] = total / n
            # only the optional inputs (flow_rate, temperature) can be missing here
            defaulted = [name for p, name in INPUT_OF_PARAMETER.items() if p not in w.sums]
            due.append(Due(plant, w.start, w.newest, inputs, defaulted))
        return due


# --- the stage ------------------------------------------------------------------------------------


class Predictor:
    """A processor ``Listener`` that makes and delivers predictions on its own threads."""

    def __init__(
        self,
        config: MlConfig,
        *,
        kafka_conf: dict[str, Any],
        topic: str,
        influx: InfluxConfig,
        metrics: Metrics,
        source: str = "config",
        callbacks: Sequence[PredictionCallback] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.topic = topic
        self.metrics = metrics
        self.callbacks = list(callbacks)
        self.trigger = Trigger(config.interval_seconds, clock)
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_reset_seconds, clock)
        self._kafka_conf = kafka_conf
        self._influx = influx
        self._source = source
        self._inbox: deque[list[Reading]] = deque(maxlen=config.inbox_batches)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._closing = threading.Event()  # no new predictions; finish what is under way
        self._abandon = threading.Event()  # stop retrying the sinks
        self._started = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat = Heartbeat("predictor", progress=False)
        self._sink = ThreadPoolExecutor(1, thread_name_prefix="predict-sink")
        self._sink_pending = 0
        self._sink_lock = threading.Lock()
        self._sink_down = False  # a sink is failing right now: stopping does not wait for it
        self._store: InfluxStore | None = None
        self._publisher: Publisher | None = None
        self._warn = RateLimitedLog(log, 60.0)
        self.crashed: BaseException | None = None
        self.made = 0
        self.inbox_dropped = 0  # batches (consumer thread)
        self.sink_dropped = 0  # predictions not written because the sinks were far behind
        self.last: Prediction | None = None
        self.last_error = ""

    def add_callback(self, callback: PredictionCallback) -> None:
        """Also tell ``callback(plant_id, message)`` of every prediction (call before start)."""
        self.callbacks.append(callback)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._store = InfluxStore(self._influx, self.metrics, source=self._source)
        self._publisher = Publisher(self._kafka_conf, self.metrics, self._abandon)
        self._thread = threading.Thread(target=self._run, name="predict", daemon=True)
        self._thread.start()
        self._beat.watch(self._thread)
        self._started.wait(10)

    def heartbeats(self) -> list[Heartbeat]:
        return [self._beat]

    def stop(self, timeout: float = 15.0) -> None:
        """Finish the calls under way and what the sinks hold, giving up after ``timeout``, or at
        once while a sink is down: predictions not written by then are lost (derived data: the
        next run makes new ones from new readings)."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._sink_down:
            self._abandon.set()
        self._nudge()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._abandon.set()
                self._thread.join(10.0)
        if self._publisher is not None:
            self._publisher.close()
        if self._store is not None:
            self._store.close()

    # -- consumer thread -----------------------------------------------------------------------

    def on_batch(
        self, readings: list[Reading], alerts: list[AlarmEvent], windows: list[WindowAggregate]
    ) -> None:
        if not readings or self._closing.is_set():
            return
        if len(self._inbox) == self._inbox.maxlen:
            self.inbox_dropped += 1
            self._warn.warning("inbox", "prediction inbox full: oldest batch dropped")
        self._inbox.append(readings)
        self._nudge()

    def _nudge(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has just closed
                loop.call_soon_threadsafe(wake.set)

    # -- worker thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
            self._sink.shutdown(wait=True)
        except BaseException as e:
            self.crashed = e
            log.exception("prediction worker stopped on an error")
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._wake = wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        client = MlClient(cfg.api_url, cfg.timeout_seconds) if cfg.api_url else None
        calls = asyncio.Semaphore(cfg.max_concurrent_calls)
        tasks: set[asyncio.Task[None]] = set()
        wake.set()  # batches may have come before the loop ran
        self._started.set()
        try:
            while not self._closing.is_set():
                await wake.wait()
                wake.clear()
                while self._inbox and not self._closing.is_set():
                    for due in self.trigger.feed(self._inbox.popleft()):
                        task = asyncio.create_task(self._predict(due, client, calls))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
        finally:
            self._loop = None
            if tasks:
                await asyncio.wait(tasks, timeout=cfg.timeout_seconds + 5)
            if client is not None:
                await client.close()

    async def _predict(self, due: Due, client: MlClient | None, calls: asyncio.Semaphore) -> None:
        async with calls:
            p = await self._ask(due, client)
        self.made += 1
        self.last = p
        self.metrics.predictions.labels(plant_id=p.plant_id, model=p.model).inc()
        message = p.to_dict()
        for callback in self.callbacks:
            try:
                callback(p.plant_id, message)
            except Exception:  # a subscriber's bug must not stop predictions
                log.exception("prediction callback %r failed", callback)
        with self._sink_lock:
            if self._sink_pending >= 1000:
                self.sink_dropped += 1
                self._warn.warning("sink", "prediction sinks 1000 behind: one dropped")
                return
            self._sink_pending += 1
        self._sink.submit(self._deliver, p)

    async def _ask(self, due: Due, client: MlClient | None) -> Prediction:
        """The ML API's answer if it is configured and its circuit lets the call out, else (and
        when the call fails) the built-in estimator's."""
        if client is not None and self.breaker.allow():
            t0 = time.perf_counter()
            try:
                prediction, confidence = await client.predict(due.inputs, due.plant_id)
            except Exception as e:
                self.breaker.failure()
                reason = "timeout" if isinstance(e, TimeoutError) else e.__class__.__name__
                self.metrics.ml_api_failures.labels(reason=reason).inc()
                self.last_error = f"{reason}: {e}"[:300]
                self._warn.warning(
                    "api", "ML API call failed (%s), built-in estimator answers", self.last_error
                )
            else:
                self.breaker.success()
                self.metrics.processing_latency.labels(stage="ml_api").observe(
                    time.perf_counter() - t0
                )
                return self._prediction(due, ML_API, prediction, confidence)
            finally:
                self.metrics.ml_breaker_open.set(self.breaker.state != "closed")
        result = estimate(due.inputs, self.config, due.plant_id)
        p = self._prediction(due, BUILTIN, result.prediction, result.confidence)
        p.effluent = result.effluent.to_dict()
        return p

    @staticmethod
    def _prediction(due: Due, model: str, prediction: str, confidence: float) -> Prediction:
        return Prediction(
            due.plant_id,
            due.timestamp,
            due.window_start,
            model,
            prediction,
            confidence,
            due.inputs,
            due.defaulted,
        )

    # -- sink thread ---------------------------------------------------------------------------

    def _deliver(self, p: Prediction) -> None:
        try:
            assert self._store is not None and self._publisher is not None
            store, publisher = self._store, self._publisher
            line = prediction_line(p)

            def write() -> None:
                for refused in store.write(store.config.bucket, [line]):  # for good: say why
                    log.warning("InfluxDB refused a prediction for %s: %s", p.plant_id, refused)

            self._retry(write, "InfluxDB")
            delivery = Delivery()
            publisher.send(delivery, self.topic, orjson.dumps(p.to_dict()), p.plant_id.encode())
            self._retry(lambda: publisher.confirm(delivery, self._abandon), "Kafka")
        except (StoreUnavailable, PublishFailed) as e:  # raised only once abandoned
            log.warning("stopping: a prediction for %s was not delivered: %s", p.plant_id, e)
        except Exception:
            log.exception("prediction for %s not delivered", p.plant_id)
        finally:
            with self._sink_lock:
                self._sink_pending -= 1

    def _retry(self, attempt: Callable[[], object], sink: str) -> None:
        """Until ``attempt`` succeeds, backing off; gives up only when abandoned."""
        n = 0
        while True:
            try:
                attempt()
                self._sink_down = False
                return
            except (StoreUnavailable, PublishFailed) as e:
                self._sink_down = True
                if self._closing.is_set():
                    self._abandon.set()
                self.last_error = f"{sink}: {e}"[:300]
                self._warn.warning(sink, "prediction not written to %s yet: %s", sink, e)
                n += 1
                if self._abandon.wait(min(10.0, 0.2 * 2**n)):
                    raise

    # -- health --------------------------------------------------------------------------------

    def health(self) -> Health:
        alive = self._thread is not None and self._thread.is_alive()
        detail: dict[str, Any] = {
            "api": self.config.api_url or "none (built-in estimator)",
            "breaker": self.breaker.state.value,
            "predictions": self.made,
            "dropped_batches": self.inbox_dropped,
            "dropped_predictions": self.sink_dropped,
        }
        if self.last is not None:
            detail["last_model"] = self.last.model
        if self.last_error:
            detail["last_error"] = self.last_error
        if self.crashed is not None:
            detail["error"] = f"worker stopped: {self.crashed!r}"
        return alive and self.crashed is None, detail
