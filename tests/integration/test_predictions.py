"""Reusability predictions against the real Kafka, InfluxDB and ``edge-gateway ml serve``.

The predictor runs in this process (fed batches as the consumer feeds it) for the trigger and the
circuit breaker, and inside a ``processor run`` subprocess end to end: raw readings on Kafka in,
a prediction in InfluxDB ``predictions`` and on the predictions topic out. Every prediction is
checked where a user would look: the callback (the live feed's hook), InfluxDB, Kafka.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from gateway.common.metrics import Metrics
from gateway.common.model import Reading
from gateway.processor.aggregate import window_start
from gateway.processor.estimator import EstimatorConfig, estimate
from gateway.processor.mlapi import BreakerState
from gateway.processor.predict import BUILTIN, ML_API, MlConfig, Predictor
from tests.support.ml_harness import MlServer, stored_predictions
from tests.support.net import free_port
from tests.support.processor_harness import (
    Dataset,
    Processor,
    influx_config,
    produce,
    read_topic,
)
from tests.support.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FIVE = {"pH": 7.2, "BOD": 150.0, "COD": 300.0, "TSS": 200.0, "TDS": 650.0}


@pytest.fixture
def ml_server(tmp_path) -> Iterator[MlServer]:
    server = MlServer(tmp_path)
    try:
        yield server.start()
    finally:
        server.stop()


class Run:
    """A Predictor in this process with its own plants and topic, and what it told its callback."""

    def __init__(self, servers: dict[str, str], influx_url: str = "", **ml: Any) -> None:
        self.servers = servers
        self.id = uuid.uuid4().hex[:8]
        self.topic = f"t{self.id}.predictions"
        self.base = window_start(time.time()) - 600  # a past minute: one window for the test
        self.got: list[tuple[float, dict[str, Any]]] = []  # (monotonic time, message)
        self.metrics = Metrics()
        self.predictor = Predictor(
            MlConfig(**ml),
            kafka_conf={"bootstrap.servers": servers["KAFKA_BOOTSTRAP_SERVERS"]},
            topic=self.topic,
            influx=influx_config(
                {**servers, "INFLUXDB_URL": influx_url or servers["INFLUXDB_URL"]}
            ),
            metrics=self.metrics,
            callbacks=[lambda plant, message: self.got.append((time.monotonic(), message))],
        )
        self.predictor.start()

    def plant(self, name: str) -> str:
        return f"ml{self.id}-{name}"

    def send(self, plant: str, values: dict[str, float], offset: float = 5.0) -> None:
        """One consumer batch: a reading per parameter, ``offset`` seconds into the minute."""
        ts = self.base + offset
        batch = [Reading(f"{p}-1", p, v, "", ts, plant_id=plant) for p, v in values.items()]
        self.predictor.on_batch(batch, [], [])

    def predict(self, name: str) -> dict[str, Any]:
        """A new plant's five readings: its first prediction is due at once."""
        n = len(self.got)
        self.send(self.plant(name), {**FIVE, "temperature": 18.0})
        wait_until(lambda: len(self.got) > n, 20, f"a prediction for {name}")
        (_, message), *more = self.got[n:]
        assert not more
        return message

    def stored(self, client: Any, cfg: Any, *names: str) -> list[dict[str, Any]]:
        plants = [self.plant(n) for n in names]
        return wait_until(
            lambda: stored_predictions(client, cfg, plants, self.base - 60, self.base + 120),
            30,
            f"predictions of {names} in InfluxDB",
        )

    def api_failures(self) -> float:
        return sum(
            s.value
            for m in self.metrics.registry.collect()
            if m.name == "iot_ml_api_failures"
            for s in m.samples
            if s.name.endswith("_total")
        )

    def close(self) -> None:
        self.predictor.stop()
        admin = AdminClient({"bootstrap.servers": self.servers["KAFKA_BOOTSTRAP_SERVERS"]})
        if self.topic in admin.list_topics(timeout=10).topics:
            for future in admin.delete_topics([self.topic], operation_timeout=30).values():
                future.result()


@pytest.fixture
def runs(servers) -> Iterator[Callable[..., Run]]:
    made: list[Run] = []

    def make(**ml: Any) -> Run:
        made.append(Run(servers, **ml))
        return made[-1]

    try:
        yield make
    finally:
        for run in made:
            run.close()


def _expected(plant: str, inputs: dict[str, float]) -> tuple[str, float]:
    result = estimate(inputs, EstimatorConfig(), plant)  # what ml serve answers by default
    return result.prediction, result.confidence


def test_nothing_is_predicted_until_the_window_has_all_five_parameters(
    servers, influx, ml_server, runs
):
    client, cfg = influx
    run = runs(api_url=ml_server.url)
    plant = run.plant("a")
    for parameter in ("pH", "BOD", "COD", "TSS"):
        run.send(plant, {parameter: FIVE[parameter], "temperature": 18.0})
    time.sleep(2.0)
    assert run.got == []
    assert stored_predictions(client, cfg, [plant], run.base - 60, run.base + 120) == []

    run.send(plant, {"TDS": FIVE["TDS"]}, offset=9.0)
    wait_until(lambda: run.got, 20, "the prediction once TDS came")
    ((_, message),) = run.got
    inputs = {
        "flow_rate": 150.0,  # no flow reading: the design's default
        "influent_BOD": 150.0,
        "influent_COD": 300.0,
        "influent_TSS": 200.0,
        "influent_pH": 7.2,
        "influent_TDS": 650.0,
        "temperature": 18.0,
    }
    prediction, confidence = _expected(plant, inputs)
    assert (message["model"], message["prediction"], message["confidence"]) == (
        ML_API,
        prediction,
        confidence,
    )
    assert (message["inputs"], message["defaulted"]) == (inputs, ["flow_rate"])

    (row,) = run.stored(client, cfg, "a")
    assert (row["plant_id"], row["model"], row["prediction"], row["confidence"]) == (
        plant,
        ML_API,
        prediction,
        confidence,
    )
    assert {k: row[k] for k in inputs} == inputs and row["defaulted"] == "flow_rate"
    assert row["_time"].timestamp() == run.base + 9.0  # the newest input reading's time

    (published,) = read_topic(servers, run.topic, 1)
    assert published.key() == plant.encode()
    assert json.loads(published.value()) == message


def test_a_plant_is_predicted_at_most_once_per_interval(servers, ml_server, runs):
    run = runs(api_url=ml_server.url, interval_seconds=2.0)
    plant = run.plant("a")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 7.0:  # a batch with all five every 0.1 s for 7 s
        run.send(plant, FIVE, offset=5.0 + time.monotonic() - t0)
        time.sleep(0.1)
    time.sleep(1.0)
    times = [t for t, _ in run.got]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) in (3, 4), gaps  # at about 0, 2, 4 and 6 s
    assert all(1.8 <= g <= 2.8 for g in gaps), gaps  # never sooner (call latency aside)
    other = run.plant("b")  # another plant is not held back by the first one's interval
    run.send(other, FIVE)
    wait_until(lambda: any(m["plantId"] == other for _, m in run.got), 10, "plant b")


def test_the_circuit_opens_while_the_api_is_down_and_closes_when_it_is_back(
    servers, influx, ml_server, runs
):
    client, cfg = influx
    run = runs(
        api_url=ml_server.url,
        timeout_seconds=1.0,
        breaker_failures=2,
        breaker_reset_seconds=2.0,
    )
    breaker = run.predictor.breaker
    assert run.predict("up")["model"] == ML_API

    ml_server.stop()
    assert run.predict("down-1")["model"] == BUILTIN  # the call failed: the estimator answers
    assert breaker.state is BreakerState.CLOSED and run.api_failures() == 1
    assert run.predict("down-2")["model"] == BUILTIN
    assert breaker.state is BreakerState.OPEN and run.api_failures() == 2
    opened = time.monotonic()
    down = run.predict("down-3")  # open: no call at all
    assert down["model"] == BUILTIN and run.api_failures() == 2
    assert (down["prediction"], down["confidence"]) == _expected(
        run.plant("down-3"), down["inputs"]
    )

    (row,) = run.stored(client, cfg, "down-3")
    assert (row["model"], row["prediction"], row["confidence"]) == (
        BUILTIN,
        down["prediction"],
        down["confidence"],
    )
    assert row["effluent_BOD"] == down["effluent"]["BOD"]  # the estimator says why

    ml_server.start()  # the same port
    time.sleep(max(0.0, opened + 2.2 - time.monotonic()))  # past the cool-down
    assert run.predict("back")["model"] == ML_API  # the half-open probe succeeded
    assert breaker.state is BreakerState.CLOSED
    models = {r["plant_id"]: r["model"] for r in run.stored(client, cfg, "up", "back")}
    assert models == {run.plant("up"): ML_API, run.plant("back"): ML_API}


def test_stopping_does_not_wait_for_an_unreachable_influxdb(servers, runs):
    run = runs(influx_url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert run.predict("a")["model"] == BUILTIN  # the live feed still hears of it
    wait_until(
        lambda: run.predictor.health()[1].get("last_error", "").startswith("InfluxDB"),
        20,
        "the failing write in /health",
    )
    t0 = time.monotonic()
    run.predictor.stop()
    assert time.monotonic() - t0 < 7  # Kafka's producer flush aside, no retrying on
    assert run.predictor.health()[0] is False  # stopped


def test_raw_readings_on_kafka_become_predictions_in_influxdb_and_on_the_topic(
    servers, influx, ml_server, tmp_path
):
    """``processor run`` with ML_API_URL pointing at ``ml serve``: the environment overrides the
    file's (empty) api_url, and each plant whose minute has all five parameters gets one
    prediction (the 60 s interval holds back the rest), in InfluxDB and on the topic."""
    client, cfg = influx
    run = uuid.uuid4().hex[:8]
    plants = [f"p{run}-{c}" for c in "abc"]
    base = window_start(time.time()) - 40 * 60
    # Four rounds of the five parameters in one past minute, the same value each round: the
    # inputs are the same whichever partitions the processor has read when the window is ready.
    readings = [
        Reading(f"{parameter}-1", parameter, value, "", base + 5 + 10 * k, plant_id=plant)
        for k in range(4)
        for plant in plants
        for parameter, value in FIVE.items()
    ]
    data = Dataset(run, plants, readings)
    proc = Processor(
        data,
        servers,
        servers,
        tmp_path,
        extra_config='\n[ml]\napi_url = ""\n',
        env={"ML_API_URL": ml_server.url},
    )
    produce(servers, data)
    proc.start()
    try:

        def all_plants() -> list[dict[str, Any]]:
            rows = stored_predictions(client, cfg, plants, base - 60, base + 120)
            return rows if {r["plant_id"] for r in rows} == set(plants) else []

        rows = wait_until(all_plants, 90, "a prediction for every plant")
        assert sorted(r["plant_id"] for r in rows) == plants  # one each
        inputs = {
            "flow_rate": 150.0,
            "influent_BOD": 150.0,
            "influent_COD": 300.0,
            "influent_TSS": 200.0,
            "influent_pH": 7.2,
            "influent_TDS": 650.0,
            "temperature": 25.0,
        }
        for row in rows:
            assert (row["model"], row["prediction"], row["confidence"]) == (
                ML_API,
                *_expected(row["plant_id"], inputs),
            )
            assert {k: row[k] for k in inputs} == inputs
            assert row["defaulted"] == "flow_rate,temperature"

        topic = proc.topics["predictions"]
        messages = [json.loads(m.value()) for m in read_topic(servers, topic, 3)]
        assert sorted(m["plantId"] for m in messages) == plants
        by_plant = {r["plant_id"]: r for r in rows}
        for m in messages:
            row = by_plant[m["plantId"]]
            assert (m["model"], m["prediction"], m["confidence"], m["inputs"]) == (
                ML_API,
                row["prediction"],
                row["confidence"],
                inputs,
            )
    except AssertionError as e:
        raise AssertionError(f"{e}\n{proc.logs()}") from None
    finally:
        proc.stop_all()
        proc.delete_topics()
