"""The test Kafka is a real broker: plain and SASL_SSL (SCRAM, CA-verified) round trips, auth on.

The broker comes from scripts/services.d/kafka.sh (Apache Kafka 4.x, one KRaft node).
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

pytestmark = pytest.mark.integration

N = 1000


def _conf(env: dict[str, str], *, sasl: bool, password: str | None = None) -> dict[str, object]:
    if not sasl:
        return {"bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"]}
    return {
        "bootstrap.servers": env["KAFKA_SASL_BOOTSTRAP_SERVERS"],
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": env["KAFKA_SASL_MECHANISM"],
        "sasl.username": env["KAFKA_SASL_USERNAME"],
        "sasl.password": env["KAFKA_SASL_PASSWORD"] if password is None else password,
        "ssl.ca.location": env["KAFKA_CA_FILE"],
        # verify the broker's name against the certificate (librdkafka's default, made explicit)
        "ssl.endpoint.identification.algorithm": "https",
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sasl", [False, True], ids=["plaintext", "sasl_ssl"])
def test_produce_and_consume_1000(kafka_env, sasl):
    topic = f"test.kafka-service.{uuid.uuid4().hex}"
    errors: list[KafkaError] = []

    producer = Producer(
        {
            **_conf(kafka_env, sasl=sasl),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "error_cb": errors.append,
        }
    )
    delivered: list[tuple[int, int]] = []
    failed: list[KafkaError] = []

    def on_delivery(err, msg):
        if err is not None:
            failed.append(err)
        else:
            delivered.append((msg.partition(), msg.offset()))

    sent = {}
    for i in range(N):
        key = f"sensor-{i % 7}"
        value = json.dumps({"seq": i, "sensorId": key, "value": i * 0.5})
        sent[i] = (key, value)
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
        producer.poll(0)
    assert producer.flush(20) == 0, "not every message was delivered within 20 s"
    assert not failed, failed[:3]
    assert len(delivered) == N

    # auto-created with the broker's num.partitions
    md = producer.list_topics(topic, timeout=10)
    assert len(md.topics[topic].partitions) == 3

    consumer = Consumer(
        {
            **_conf(kafka_env, sasl=sasl),
            "group.id": f"test-group-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "error_cb": errors.append,
        }
    )
    got: dict[int, tuple[str, str]] = {}
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 25
        while len(got) < N and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=1.0):
                assert msg.error() is None, msg.error()
                raw_key, raw_value = msg.key(), msg.value()
                assert raw_key is not None and raw_value is not None
                payload = json.loads(raw_value)
                assert payload["seq"] not in got, f"duplicate message {payload['seq']}"
                got[payload["seq"]] = (raw_key.decode(), raw_value.decode())
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()

    assert len(got) == N, f"read back {len(got)} of {N} messages"
    assert got == sent
    fatal = [e for e in errors if e.fatal()]
    assert not fatal, fatal


@pytest.mark.timeout(60)
def test_wrong_sasl_password_is_refused(kafka_env):
    auth_failed = threading.Event()
    seen: list[KafkaError] = []

    def on_error(err: KafkaError) -> None:
        seen.append(err)
        if err.code() == KafkaError._AUTHENTICATION:
            auth_failed.set()

    producer = Producer(
        {
            **_conf(kafka_env, sasl=True, password="not-the-password"),
            "error_cb": on_error,
            "reconnect.backoff.ms": 500,
        }
    )
    deadline = time.monotonic() + 15
    while not auth_failed.is_set() and time.monotonic() < deadline:
        producer.poll(0.2)
    assert auth_failed.is_set(), f"expected an authentication error, got {seen}"
    assert any("SASL" in e.str() or "uthentication" in e.str() for e in seen), seen
    # and no metadata is served to it
    with pytest.raises(KafkaException):
        producer.list_topics(timeout=3)


@pytest.mark.timeout(60)
def test_right_sasl_password_lists_topics(kafka_env):
    producer = Producer(_conf(kafka_env, sasl=True))
    md = producer.list_topics(timeout=10)
    assert md.brokers, "no broker in the metadata"
    assert {b.port for b in md.brokers.values()} == {
        int(kafka_env["KAFKA_SASL_BOOTSTRAP_SERVERS"].rsplit(":", 1)[1])
    }
