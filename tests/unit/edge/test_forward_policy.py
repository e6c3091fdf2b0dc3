"""The forwarder's pure decisions: which Kafka errors dead-letter a row, and the resend back-off."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from gateway.edge.forward import Backoff, classify

POISON = [
    "MSG_SIZE_TOO_LARGE",
    "INVALID_MSG_SIZE",
    "INVALID_MSG",
    "INVALID_RECORD",
    "RECORD_LIST_TOO_LARGE",
    "TOPIC_EXCEPTION",
    "_INVALID_ARG",
    "_BAD_MSG",
]
# An outage, a slow or moving broker, a purge, a code this version does not know: all retried.
TRANSIENT = [
    "_MSG_TIMED_OUT",
    "_ALL_BROKERS_DOWN",
    "_TRANSPORT",
    "REQUEST_TIMED_OUT",
    "NOT_LEADER_FOR_PARTITION",
    "UNKNOWN_TOPIC_OR_PART",
    "NOT_ENOUGH_REPLICAS",
    "_PURGE_QUEUE",
    "_PURGE_INFLIGHT",
    "OUT_OF_ORDER_SEQUENCE_NUMBER",
]
AUTH = ["SASL_AUTHENTICATION_FAILED", "TOPIC_AUTHORIZATION_FAILED", "_AUTHENTICATION", "_SSL"]


def err(name: str, **flags: bool) -> KafkaError:
    return KafkaError(getattr(KafkaError, name), **flags)


@pytest.mark.parametrize("name", POISON)
def test_a_record_kafka_refuses_for_good_is_poison(name: str) -> None:
    assert classify(err(name)) == "poison"


@pytest.mark.parametrize("name", TRANSIENT)
def test_outages_and_transient_errors_are_retried(name: str) -> None:
    assert classify(err(name)) == "retry"


def test_a_code_it_does_not_know_is_retried_never_dead_lettered() -> None:
    assert classify(KafkaError(9999)) == "retry"


@pytest.mark.parametrize("name", AUTH)
def test_refused_credentials_hold_every_row(name: str) -> None:
    assert classify(err(name)) == "refused"


def test_the_flags_librdkafka_sets_come_before_the_code() -> None:
    assert classify(err("MSG_SIZE_TOO_LARGE", fatal=True)) == "fatal"
    assert classify(err("_TRANSPORT", fatal=True)) == "fatal"
    assert classify(err("INVALID_MSG", retriable=True)) == "retry"


def test_backoff_doubles_while_the_same_row_keeps_failing_up_to_its_ceiling() -> None:
    b = Backoff(low=0.5, high=4.0)
    assert [b.failed(100) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_is_not_reset_by_deliveries_of_other_rows() -> None:
    b = Backoff(low=0.5, high=30.0)
    b.failed(100)
    b.failed(100)
    assert not b.settled([101, 102, 250])  # other partitions got through meanwhile
    assert b.failed(100) == 2.0


def test_backoff_resets_once_the_failed_row_is_settled() -> None:
    b = Backoff(low=0.5, high=30.0)
    b.failed(100)
    b.failed(100)
    assert b.settled([99, 100, 101])
    assert b.row is None
    assert b.failed(300) == 0.5


def test_an_earlier_row_failing_becomes_the_row_the_episode_waits_for() -> None:
    b = Backoff(low=0.5, high=30.0)
    b.mark(100)
    b.mark(90)
    b.mark(95)
    assert b.row == 90
    assert not b.settled([100])
    assert b.settled([90])


def test_mark_alone_does_not_grow_the_delay() -> None:
    b = Backoff(low=0.5, high=30.0)
    for _ in range(5):
        b.mark(7)  # several reports of one failing episode before the resend
    assert b.next_delay() == 0.5
    assert b.next_delay() == 1.0
