"""Forwarder: committed buffer rows to Kafka with an idempotent producer, deleted once confirmed.

Rows are read in id order from a cursor and produced with key = sensor id; a row is deleted only
after its own delivery report says it landed. The idempotent producer (acks=all, at most 5 requests
in flight) keeps per-partition order through its internal retries. If a delivery still fails, we
stop producing, wait for every report still outstanding, and restart from the first failed row,
so a failed reading is never overtaken by a later one it was not already ahead of.

A row Kafka refuses for good (librdkafka's error code says so: too large, invalid, ...; see
``classify``) is not retried: it moves to the dead-letter store with the error, is counted in
``iot_kafka_dead_lettered_total``, marks /health degraded for a while, and every other row keeps
flowing. Anything else (an outage, a timeout, an unknown code) is retried, from the first failed
row, after a back-off that grows until that row is delivered (see ``Backoff``). A buffer that
cannot be read is retried the same way; the thread never dies of it.
"""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from gateway.common.kafka import KafkaConnection
from gateway.common.logs import RateLimitedLog
from gateway.common.memory import trim_heap
from gateway.common.metrics import Metrics
from gateway.common.stage import Health
from gateway.common.supervise import Heartbeat
from gateway.edge.buffer import Buffer, BufferClosed, Row
from gateway.edge.deadletter import DeadLetterStore

log = logging.getLogger(__name__)

HEADERS: list[tuple[str, str | bytes | None]] = [
    ("content-type", b"application/json"),
    ("source", b"iot-gateway"),
]
AUTH_ERRORS = {
    KafkaError._AUTHENTICATION,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError._SSL,
}
DOWN_ERRORS = {KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE}
# What Kafka (or librdkafka, before sending) says about one record that no retry can change. The
# producer retries everything else by itself (message.timeout.ms = 0): a delivery report with an
# error is its last word on that record.
PERMANENT_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,  # above message.max.bytes (the producer's or the broker's)
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_RECORD,  # the broker's validation refused this record
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.TOPIC_EXCEPTION,  # the row's topic name is invalid
        KafkaError._INVALID_ARG,
        KafkaError._BAD_MSG,
    }
)
DOWN_GRACE_S = 10.0
TRIM_AFTER_IN_FLIGHT = 2000  # rows in flight at once: then the heap is trimmed once none are
_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

Outcome = Literal["poison", "retry", "fatal", "refused"]


def classify(err: KafkaError) -> Outcome:
    """What a failed record's error means, by librdkafka's codes and flags, never by its text.

    - ``fatal``: the producer is unusable (idempotence broken): make a new one, resend.
    - ``refused``: authentication/authorization: every row is held until the config is fixed.
    - ``poison``: this record can never be delivered: dead-letter it, go on with the others.
    - ``retry``: anything else, unknown codes included (a row is dead-lettered only when Kafka
      says it is the row's fault; an outage must never empty the buffer into the dead letters).
    """
    code = err.code()
    if err.fatal():
        return "fatal"
    if code in AUTH_ERRORS:
        return "refused"
    if err.retriable():
        return "retry"
    if code in PERMANENT_ERRORS:
        return "poison"
    return "retry"


@dataclass
class Backoff:
    """Delay before resending from a failed row: doubles while the same row keeps failing, and
    resets only once that row is settled (delivered or dead-lettered), not on any delivery:
    other partitions delivering meanwhile must not turn the retries into a storm."""

    low: float = 0.5
    high: float = 30.0
    delay: float = field(init=False)
    row: int | None = field(default=None, init=False)  # the row the back-off is about

    def __post_init__(self) -> None:
        self.delay = self.low

    def mark(self, row_id: int) -> None:
        """``row_id`` failed: the episode lasts until the first failed row is settled."""
        if self.row is None or row_id < self.row:
            self.row = row_id

    def next_delay(self) -> float:
        """A resend is due: how long to wait first (each one waits twice as long)."""
        wait = self.delay
        self.delay = min(self.delay * 2, self.high)
        return wait

    def failed(self, row_id: int) -> float:
        self.mark(row_id)
        return self.next_delay()

    def settled(self, row_ids: Iterable[int]) -> bool:
        """Rows delivered or dead-lettered; True if that ended the failing episode."""
        if self.row is not None and self.row in set(row_ids):
            self.row = None
            self.delay = self.low
            return True
        return False


class _Failure(NamedTuple):
    row_id: int
    err: KafkaError
    topic: str
    payload: bytes


@dataclass(kw_only=True)
class ForwardConfig(KafkaConnection):
    """TOML ``[kafka]``: the connection, and how readings become Kafka records."""

    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    linger_ms: int = 20
    batch_size: int = 1_000_000  # bytes per partition batch
    topic_prefix: str = "sensors.raw"  # readings go to <prefix>.<plantId>
    alerts_topic: str = "sensors.alerts"
    plant: str = "default"  # for readings without a plantId
    fetch_batch: int = 5000  # rows read from the buffer at a time
    # rows produced, not yet confirmed. Each holds ~0.8 KB in librdkafka and Python while Kafka is
    # slow or away (50,000 cost ~40 MB of RSS); 10,000 drain as fast here (scripts/bench forward).
    max_in_flight: int = 10000
    stall_timeout_s: float = 30.0  # unhealthy when rows wait this long without any confirmation
    degraded_s: float = 3600.0  # /health says degraded this long after a row was dead-lettered

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fetch_batch < 1 or self.max_in_flight < 1:
            raise ValueError("fetch_batch and max_in_flight must be at least 1")
        if self.degraded_s < 0:
            raise ValueError("degraded_s must be at least 0")

    def producer_config(self) -> dict[str, Any]:
        conf = self.client_conf(client_id="edge-gateway", section="kafka")
        conf |= {
            "enable.idempotence": True,
            "acks": "all",
            "max.in.flight.requests.per.connection": 5,
            "compression.type": self.compression,
            "linger.ms": self.linger_ms,
            "batch.size": self.batch_size,
            # Never give up on a message: through an outage librdkafka retries until the broker
            # is back, in order. A finite timeout could fail a message yet deliver the next one
            # of its partition, and resending the failed one would put it after its successor.
            "message.timeout.ms": 0,
            "queue.buffering.max.messages": max(2 * self.max_in_flight, 10000),
        }
        conf.update(self.extra)
        return conf


def how_to_fix_credentials(password: str) -> str:
    """What to do about refused credentials, by where the password comes from: a reload re-reads
    the config and credential files, but cannot change the environment systemd gave the process."""
    if password.startswith("env:"):
        return (
            f"The password comes from the environment variable {password[4:]}, which a reload "
            "cannot change: fix it and restart the gateway (systemctl restart edge-gateway), or "
            "better, keep it in a credential file, which a reload reads again: sasl_password = "
            '"file:/etc/edge-gateway/kafka-password", or "cred:kafka-password" with '
            "LoadCredential= in the unit. Check [kafka] sasl_username and ssl_ca_location too."
        )
    if password.startswith(("file:", "cred:")):
        where = f"the credential file ({password})"
    else:
        where = "[kafka] sasl_password (better: a credential file, file:/path or cred:NAME)"
    return (
        f"Fix {where}, or [kafka] sasl_username/ssl_ca_location, then reload the gateway "
        "(SIGHUP: systemctl reload edge-gateway): a reload reads the config and credential files "
        "again, and a bad one leaves the gateway running as it is."
    )


class _DebugLog:
    """librdkafka's own log lines, demoted to DEBUG: error_cb reports what matters, once."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def log(self, level: int, msg: str, *args: Any) -> None:
        self.logger.debug(msg, *args)


def topic_for(config: ForwardConfig, kind: str, plant_id: str) -> str:
    """The topic of a buffer row: alarms to the alerts topic, readings to <prefix>.<plant>."""
    if kind == "alarm":
        return config.alerts_topic
    # A topic name allows only [A-Za-z0-9._-]; anything else would fail forever.
    plant = _TOPIC_UNSAFE.sub("_", plant_id or config.plant)
    return f"{config.topic_prefix}.{plant}"[:249]


class Forwarder:
    def __init__(
        self,
        config: ForwardConfig,
        buffer: Buffer,
        metrics: Metrics,
        dead_letters: DeadLetterStore,
        producer_conf: dict[str, Any] | None = None,
    ) -> None:
        """``producer_conf``: librdkafka settings with the secrets already resolved (the daemon
        resolves them before it replaces a running gateway); by default from ``config`` now."""
        self.config = config
        # Resolved once: a producer made anew after a fatal error must not fail on a credential
        # file that changed meanwhile (a reload is what re-reads it).
        self._conf = config.producer_config() if producer_conf is None else dict(producer_conf)
        self.buffer = buffer
        self.metrics = metrics
        self.dead_letters = dead_letters
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat = Heartbeat("kafka forwarder")
        self._producer: Producer | None = None
        self._topics: dict[str, str] = {}  # plant id -> readings topic
        self._observed = 0.0  # commit time of the last latency observed
        self._cursor = 0  # highest row id produced
        self._generation = buffer.generation  # of the buffer file the cursor is about
        self._in_flight = 0
        self._in_flight_peak = 0  # most rows in flight since the heap was last trimmed
        self._acked: list[int] = []
        self._acked_topics: Counter[str] = Counter()
        self._failed: list[_Failure] = []
        self._rewind_to: int | None = None
        self._backoff = Backoff()
        self._read_backoff = Backoff()
        self._read_error = ""  # why the buffer cannot be read, "" when it can
        self._fatal = False
        self._problem = ""  # why Kafka is unhealthy, "" when it is fine
        self._problem_code: int | None = None
        self._problem_serious = False
        self._poisoned = 0  # rows dead-lettered since start
        self._last_poison: tuple[float, str] | None = None  # (monotonic time, what and why)
        self._stop_timeout = 10.0
        self._last_delivery = time.monotonic()
        self._busy_since = time.monotonic()  # when rows last went in flight after none were
        self._down: tuple[int, str, float] | None = None  # a reported connection loss
        self._last_probe = 0.0
        self._latency = metrics.delivery_latency
        self._log = RateLimitedLog(log, 30.0)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._producer = self._make_producer()
        self._thread = threading.Thread(target=self._run, name="forwarder", daemon=True)
        self._thread.start()
        self._beat.watch(self._thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop producing, wait up to ``timeout`` for outstanding confirmations, close.

        Call before Buffer.stop(): confirmed rows are deleted on the way out; unconfirmed rows
        stay buffered and are sent again on the next start.
        """
        self._stop_timeout = timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout + 10.0)
            if self._thread.is_alive():
                log.error("forwarder did not stop within %.0f s; leaving it", timeout + 10.0)
            self._thread = None

    def heartbeats(self) -> list[Heartbeat]:
        return [self._beat]

    def _make_producer(self) -> Producer:
        conf = dict(self._conf)
        conf["error_cb"] = self._on_error
        conf["logger"] = _DebugLog(logging.getLogger("gateway.edge.forward.librdkafka"))
        return Producer(conf)

    def health(self) -> Health:
        now = time.monotonic()
        detail: dict[str, Any] = {
            "in_flight": self._in_flight,
            "last_delivery_age_s": round(now - self._last_delivery, 1),
            "dead_lettered": self._poisoned,
        }
        waiting = now - max(self._last_delivery, self._busy_since)
        if self._thread is None or not self._thread.is_alive():
            return False, {**detail, "error": "forwarder is not running"}
        if self._read_error:
            return False, {**detail, "error": self._read_error}
        if self._problem:
            return False, {**detail, "error": self._problem}
        if self._in_flight and waiting > self.config.stall_timeout_s:
            return False, {**detail, "error": f"Kafka has confirmed nothing for {waiting:.0f} s"}
        if self._last_poison is not None and now - self._last_poison[0] < self.config.degraded_s:
            ago = now - self._last_poison[0]
            reason = f"{self._last_poison[1]} ({ago:.0f} s ago; {self._poisoned} since start)"
            return False, {**detail, "degraded": True, "error": reason}
        return True, detail

    # -- forwarder thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._beat.beat()
                if self.buffer.generation != self._generation:
                    # A corrupt buffer file was replaced: salvaged rows may lie below the cursor.
                    self._generation = self.buffer.generation
                    self._rewind(0)
                if self._rewind_to is not None:
                    self._recover()
                    continue
                produced = 0
                room = self.config.max_in_flight - self._in_flight
                if room > 0 and self.buffer.last_id > self._cursor:
                    rows = self._fetch(min(room, self.config.fetch_batch))
                    if rows is None:
                        continue
                    produced = self._produce(rows)
                    # Produced rows live on in librdkafka: this copy would stay held (~3 MB for
                    # 5,000) for as long as a full window waits on Kafka, e.g. through an outage.
                    del rows
                assert self._producer is not None
                if produced:
                    self._producer.poll(0)
                elif self._in_flight:
                    self._producer.poll(0.05)
                else:
                    self._producer.poll(0)
                    self.buffer.wait_for_rows(self._cursor, 0.1)
                self._settle()
                self._check_down()
        except Exception:
            log.exception("forwarder stopped by an unexpected error")
            raise
        finally:
            self._shutdown()

    def _fetch(self, limit: int) -> list[Row] | None:
        """The next rows, or None (after a back-off) if the buffer cannot be read now."""
        try:
            rows = self.buffer.fetch(limit, self._cursor)
        except sqlite3.Error as e:
            wait = self._read_backoff.failed(self._cursor + 1)
            self._read_error = f"cannot read the buffer ({e}); retrying in {wait:.1f} s"
            self._log.error("read", "forwarder: %s", self._read_error)
            self._wait_serving(wait)
            return None
        if self._read_error:
            log.info("forwarder reads the buffer again")
            self._read_error = ""
            self._read_backoff = Backoff()
        return rows

    def _wait_serving(self, seconds: float) -> None:
        """Wait, beating and serving delivery reports, until ``seconds`` pass or stop."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            self._beat.beat()
            assert self._producer is not None
            self._producer.poll(min(left, 0.5))
            self._settle()

    def _topic(self, row: Row) -> str:
        if row.kind == "alarm":
            return self.config.alerts_topic
        topic = self._topics.get(row.plant_id)
        if topic is None:
            topic = self._topics[row.plant_id] = topic_for(self.config, row.kind, row.plant_id)
        return topic

    def _produce(self, rows: list[Row]) -> int:
        assert self._producer is not None
        produce = self._producer.produce
        on_delivery = self._on_delivery
        n = 0
        for row in rows:
            topic = self._topic(row)
            callback = functools.partial(on_delivery, row.id, row.created, topic)
            try:
                produce(topic, row.payload, row.key, on_delivery=callback, headers=HEADERS)
            except BufferError:  # librdkafka's queue is full: serve reports, try again later
                self._producer.poll(0.1)
                break
            except KafkaException as e:  # refused before sending, or a producer in a fatal state
                err: KafkaError = e.args[0]
                if classify(err) == "poison" and self._dead_letter(
                    _Failure(row.id, err, topic, row.payload)
                ):
                    self.buffer.delete([row.id])
                    self._cursor = row.id
                    continue
                self._on_error(err)
                self._rewind(row.id)
                break
            self._cursor = row.id
            n += 1
        if n and not self._in_flight:
            self._busy_since = time.monotonic()
        self._in_flight += n
        self._in_flight_peak = max(self._in_flight_peak, self._in_flight)
        return n

    def _on_delivery(
        self, row_id: int, created: float, topic: str, err: KafkaError | None, msg: Message
    ) -> None:
        if err is None:
            self._acked.append(row_id)
            self._acked_topics[topic] += 1
            if created != self._observed:  # once per buffer transaction: its rows share it
                self._observed = created
                self._latency.observe(time.time() - created)
            return
        self.metrics.kafka_delivery_failures.labels(err.name()).inc()
        self._failed.append(_Failure(row_id, err, topic, msg.value() or b""))
        outcome = classify(err)
        if outcome in ("fatal", "refused") or err.code() in DOWN_ERRORS:
            self._on_error(err)
        elif outcome == "retry":
            self._set_problem(err.code(), f"delivery to {topic} failed: {err.str()}")

    def _settle(self) -> None:
        if self._failed:
            failed, self._failed = self._failed, []
            self._in_flight -= len(failed)
            poison = {
                f.row_id for f in failed if classify(f.err) == "poison" and self._dead_letter(f)
            }
            if poison:
                self.buffer.delete(poison)
                self._backoff.settled(poison)
            retry = [f.row_id for f in failed if f.row_id not in poison]
            if retry:
                self._backoff.mark(min(retry))
                self._rewind(min(retry))
        if self._acked:
            self.buffer.delete(self._acked)
            self._in_flight -= len(self._acked)
            for topic, n in self._acked_topics.items():
                self.metrics.kafka_delivered.labels(topic).inc(n)
            self._acked_topics.clear()
            self._last_delivery = time.monotonic()
            self._down = None
            # Only the failed row's own delivery ends its episode: back-off and problem stay
            # while other rows (other partitions) get through.
            if self._backoff.settled(self._acked) or self._backoff.row is None:
                self._clear_problem()
            self._acked = []
            if not self._in_flight and self._in_flight_peak >= TRIM_AFTER_IN_FLIGHT:
                # A backlog went out: what librdkafka and the rows took is free now, but glibc
                # would keep it as RSS (~10 MB after 10,000 in flight) until the next backlog.
                self._in_flight_peak = 0
                trim_heap()

    def _dead_letter(self, failure: _Failure) -> bool:
        """Store a row Kafka refused for good in the dead-letter store, durably (the caller then
        deletes it from the buffer); False if the store failed, and the row stays buffered."""
        row_id, err, topic, payload = failure
        reason = err.name()
        try:
            self.dead_letters.add(
                "kafka",
                topic,
                reason,
                payload,
                f"buffer row {row_id} (seq {row_id}): {err.str()}",
                whole=True,
            )
        except (sqlite3.Error, TimeoutError, RuntimeError) as e:
            self._log.error(
                "dead-letter",
                "Kafka refused row %d for good (%s), but the dead-letter store failed (%s): "
                "it stays buffered and is retried",
                row_id,
                err.str(),
                e,
            )
            return False
        self._poisoned += 1
        self.metrics.kafka_dead_lettered.labels(reason).inc()
        what = f"Kafka refused buffer row {row_id} for {topic} for good: {err.str()} ({reason})"
        self._last_poison = (time.monotonic(), f"{what}; it was moved to the dead-letter store")
        log.error("%s; moved it to the dead-letter store, the other rows go on", what)
        return True

    def _rewind(self, row_id: int) -> None:
        self._rewind_to = row_id if self._rewind_to is None else min(self._rewind_to, row_id)

    def _recover(self) -> None:
        """After a failed delivery: let every outstanding report arrive, then resend from the
        first failed row (rows delivered meanwhile are deleted first, so they are not resent)."""
        assert self._producer is not None
        if self._fatal:  # a fatal producer delivers nothing more: fail what it holds, start anew
            self._producer.purge()
        while self._in_flight and not self._stop.is_set():
            self._beat.beat()
            self._producer.poll(0.1)
            self._settle()
        if self._stop.is_set() or self._rewind_to is None:
            return
        if self._fatal:
            self._producer = self._make_producer()
            self._fatal = False
        try:
            self.buffer.delete([], wait=True)  # barrier: the deletes queued so far are committed
        except TimeoutError:
            log.warning("buffer slow to delete delivered rows: some may be sent twice")
        rewind_to, self._rewind_to = self._rewind_to, None
        self._cursor = rewind_to - 1
        if self._backoff.row is not None:  # not just a replaced buffer file
            self._wait_serving(self._backoff.next_delay())

    def _check_down(self) -> None:
        """Confirm a reported connection loss before calling Kafka unhealthy: brokers also close
        idle connections. Down for DOWN_GRACE_S without a delivery or an answer = a problem."""
        if self._down is None:
            return
        code, message, since = self._down
        now = time.monotonic()
        if now - since > DOWN_GRACE_S:
            self._set_problem(code, message)
        if self._in_flight or now - self._last_probe < 2.0:
            return  # with rows in flight, a delivery report tells
        self._last_probe = now
        assert self._producer is not None
        try:
            self._producer.list_topics(timeout=2.0)
        except KafkaException:
            return
        self._down = None
        self._clear_problem()

    def _shutdown(self) -> None:
        producer = self._producer
        if producer is None:
            return
        unreachable = self._problem or self._down  # then no confirmation is coming: no wait
        deadline = time.monotonic() + (0.5 if unreachable else self._stop_timeout)
        while self._in_flight and time.monotonic() < deadline:
            producer.poll(0.1)
            self._settle()
        self._settle()
        if self._in_flight:
            log.warning(
                "forwarder stopping with %d rows unconfirmed: they stay buffered", self._in_flight
            )
        try:  # barrier: the deletes queued above are committed (bounded: the disk may refuse)
            self.buffer.delete([], wait=True, timeout=min(5.0, self._stop_timeout))
        except (BufferClosed, TimeoutError) as e:
            log.warning("confirmed rows not deleted (%s): they will be resent", e)
        producer.purge()
        producer.flush(0)
        self._producer = None

    # -- health ------------------------------------------------------------------------------

    def _on_error(self, err: KafkaError) -> None:
        code = err.code()
        cfg = self.config
        if err.fatal():
            self._fatal = True
            self._set_problem(code, f"Kafka producer fatal error: {err.str()}", serious=True)
        elif code in AUTH_ERRORS:
            self._set_problem(
                code,
                f"Kafka refused the gateway ({err.str()}): user {cfg.sasl_username!r} at "
                f"{cfg.bootstrap_servers} ({cfg.security_protocol}). Readings stay buffered. "
                + how_to_fix_credentials(cfg.sasl_password),
                serious=True,
            )
        elif code in DOWN_ERRORS:
            if self._down is None:
                message = (
                    f"cannot reach Kafka at {cfg.bootstrap_servers} ({err.str()}); "
                    "readings stay buffered and are sent when it is back"
                )
                self._down = (code, message, time.monotonic())
        else:
            log.warning("Kafka: %s", err.str())

    def _set_problem(self, code: int, message: str, *, serious: bool = False) -> None:
        """Mark Kafka unhealthy and log it once: librdkafka repeats its errors on every reconnect,
        and an authentication failure is followed by transport errors that only a serious
        problem (authentication, fatal) may replace."""
        if self._problem and (self._problem_serious or not serious):
            return
        log.error("%s", message)
        self._problem = message
        self._problem_code = code
        self._problem_serious = serious

    def _clear_problem(self) -> None:
        if self._problem:
            log.info("Kafka delivery works again (after: %s)", self._problem)
            self._problem = ""
            self._problem_code = None
            self._problem_serious = False
