"""The gateway killed with SIGKILL at random moments, 20 times, while probes are polled, MQTT
readings arrive at a steady rate and the forwarder sends to Kafka: nothing committed or
acknowledged is lost.

The proof, after the last restart and a drain:
- the buffer's seq (the row id, committed with the row) of every record this gateway ever committed
  is in Kafka: the seqs are contiguous from the first to the last one committed, so a gap would be
  a committed reading (polled or from MQTT) or alarm event that was lost;
- every MQTT publish the broker acknowledged (each carries its own number as its value) is in Kafka;
- a seq sent twice carries the same record both times (Kafka confirmed it, the kill came before
  its row was deleted);
- every MQTT message is stored once: one committed before a kill whose acknowledgement never
  reached the broker is redelivered (DUP) and recognised by its receipt.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway_harness import (
    Gateway,
    GatewaySetup,
    KafkaCollector,
    Publisher,
    Simulator,
    buffer_state,
    init_buffer,
    numbered_message,
    stop_and_settle,
    wait_all_in_kafka,
)
from tests.support.wait import wait_settled, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.timeout(600)]

KILLS = 20
RATE = 200.0  # MQTT publishes per second: enough to have some in flight at most kills
MQTT_SENSORS = 4


def message(setup: GatewaySetup, n: int) -> tuple[str, bytes, int]:
    return numbered_message(setup, n, MQTT_SENSORS)


def mqtt_healthy(gw: Gateway) -> bool:
    return gw.health()[1]["checks"]["mqtt"]["status"] == "healthy"


def test_sigkill_at_random_moments_loses_no_committed_or_acknowledged_reading(
    kafka_env: dict[str, str], mqtt_env: dict[str, str], pty_pair: Any, tmp_path: Path
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"kill schedule seed: {seed}")
    setup = GatewaySetup(
        tmp_path, kafka_env["KAFKA_BOOTSTRAP_SERVERS"], pty=pty_pair.a, mqtt=mqtt_env, interval=0.3
    )
    seq0 = init_buffer(setup.buffer_path, setup.gateway_id)
    gw = Gateway(setup.write(), tmp_path / "logs", env={"MQTT_PASSWORD": mqtt_env["MQTT_PASSWORD"]})
    # boundaries[k]: the last seq committed by run k (run 0: the empty buffer's start)
    boundaries = [seq0]
    with (
        Simulator(pty_pair.b, setup.probes),
        KafkaCollector(setup.kafka, [setup.raw_topic, "sensors.alerts"]) as kafka,
    ):
        publisher = None
        try:
            gw.start()
            gw.wait_serving()
            # From here on the broker keeps the gateway's session, queueing while it is down.
            wait_until(lambda: mqtt_healthy(gw), 60, "the gateway's MQTT subscription")
            publisher = Publisher(mqtt_env)
            publisher.run_steadily(RATE, lambda n: message(setup, n))
            for k in range(KILLS):
                if k % 5 == 4:  # now and then, during start-up
                    time.sleep(rng.uniform(0.0, 1.0))
                else:  # usually while it runs, polls, ingests and forwards
                    gw.wait_serving()
                    time.sleep(rng.uniform(1.0, 4.0))
                gw.kill()
                boundaries.append(buffer_state(setup.buffer_path)[0])
                gw.start()
            gw.wait_serving()
            wait_until(lambda: mqtt_healthy(gw), 60, "the MQTT subscription after the last start")
            publisher.stop()
            publisher.wait_all_acknowledged()
            acked = set(publisher.acknowledged())
            sent = set(publisher.sent())

            def mqtt_ids() -> set[int]:
                return {
                    int(m.value["value"])
                    for m in kafka.snapshot(setup.raw_topic)
                    if m.key.startswith("mq-")
                }

            wait_settled(
                lambda: len(mqtt_ids()),
                lambda: acked <= mqtt_ids(),
                300,
                "the MQTT readings to arrive in Kafka",
            )
            last = stop_and_settle(gw, setup.buffer_path)
            boundaries.append(last)
            everything = set(range(seq0 + 1, last + 1))
            wait_all_in_kafka(kafka, setup.gateway_id, everything)
            time.sleep(2)  # let late duplicates, if any, arrive too
        finally:
            if publisher is not None:
                publisher.close()
            gw.close()
        records = kafka.snapshot(gateway_id=setup.gateway_id)

    logs = gw.all_logs()
    assert len(boundaries) == KILLS + 2  # the empty buffer, one per kill, the final stop
    assert "Traceback" not in logs, logs[-5000:]

    # 1. Every committed seq arrived, and nothing else did.
    by_seq: dict[int, set[bytes]] = defaultdict(set)
    for m in records:
        by_seq[m.value["seq"]].add(m.raw)
    assert set(by_seq) == everything, f"missing seqs: {sorted(everything - set(by_seq))[:20]}"
    # 2. A seq sent twice is the same record both times.
    assert not [s for s, payloads in by_seq.items() if len(payloads) > 1], "a seq was reused"
    # 3. Every acknowledged publish arrived, and nothing that was not published.
    seqs_of: dict[int, set[int]] = defaultdict(set)
    for m in records:
        if m.topic == setup.raw_topic and m.key.startswith("mq-"):
            seqs_of[int(m.value["value"])].add(m.value["seq"])
    assert acked <= set(seqs_of), f"acknowledged but lost: {sorted(acked - set(seqs_of))[:20]}"
    assert set(seqs_of) <= sent
    # 4. No MQTT message was stored twice, though kills left acks unsent or unread.
    stored_twice = {ident: sorted(seqs) for ident, seqs in seqs_of.items() if len(seqs) > 1}
    assert not stored_twice, f"stored twice: {list(stored_twice.items())[:10]}"

    recognised = logs.count("MQTT redelivery of a committed message recognised")
    resent = len(records) - len(by_seq)
    print(
        f"{KILLS} kills, {len(everything)} records committed, {len(acked)} MQTT publishes "
        f"acknowledged; {resent} Kafka resends; runs that recognised redeliveries: {recognised}"
    )
