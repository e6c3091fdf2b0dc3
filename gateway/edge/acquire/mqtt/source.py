"""MQTT source: subscribes to a broker and hands readings to the sink, acknowledging each message
only once its readings are durable.

Delivery: MQTT v5 with ``clean_start=False`` and a session expiry, so the broker keeps the session
and queues QoS 1 messages while the gateway is down; paho's manual ack sends the PUBACK from the
sink's ``on_durable`` callback. A message that is never made durable is never acknowledged, and
the broker redelivers it on the next connection.

Redeliveries: an ack lost on the way (the connection dropped, the gateway was killed or stopped
between commit and ack) makes the broker deliver the message again with the DUP flag. Each QoS 1
message is committed with a receipt: the session and packet id as its key, a fingerprint of topic
and payload. A DUP message whose receipt is committed (or queued) with the same fingerprint is
acknowledged again and not stored again; a message without the DUP flag is always taken, also
when it is byte-identical to an earlier one. Receipts are dropped once the broker has confirmed
the acks (an UNSUBSCRIBE barrier, see ``_confirm``), and after a reconnect those of messages the
broker did not deliver again; they expire after the session expiry in any case.

Malformed payloads are counted, logged (rate-limited), stored in the dead-letter store and then
acknowledged: the dead-letter row is their durable home.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.common.config import SECRET, build, secret
from gateway.common.logs import RateLimitedLog
from gateway.common.model import Reading, Receipt, Record, Rejection
from gateway.common.stage import Health, OnDurable, Recall, Receipts, Sink, SinkClosed
from gateway.common.supervise import Heartbeat
from gateway.edge.acquire.mqtt.client import PahoClient
from gateway.edge.acquire.mqtt.payload import Subscription, parse_message

if TYPE_CHECKING:  # not at run time: the MQTT workers need neither (nor their imports)
    from gateway.common.metrics import Metrics
    from gateway.edge.deadletter import DeadLetterStore

log = logging.getLogger(__name__)

SOURCE = "mqtt"
CONFIRM_INTERVAL_S = 1.0  # how often the broker is asked to confirm the acks sent since


def fingerprint(topic: str, payload: bytes) -> bytes:
    return hashlib.blake2b(topic.encode() + b"\0" + payload, digest_size=16).digest()


@dataclass
class _Barrier:
    """What the UNSUBACK to an ack barrier confirms, if it answers the same connection."""

    generation: int
    acked: list[tuple[Receipt, float]]  # receipts whose acks were sent before it, with when
    cleanup_before: float | None = None  # after a (re)connect: drop older receipts not redelivered


@dataclass
class MqttConfig:
    """The ``[mqtt]`` section."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: str = ""  # empty: the system's CAs
    username: str = ""
    password: str = field(default="", metadata=SECRET)  # env:NAME, file:/path or cred:NAME
    client_id: str = ""  # stable across restarts (it names the session); default from gateway id
    keepalive: int = 30
    session_expiry: int = 7 * 86400  # seconds the broker keeps queueing for us while we are down
    receive_maximum: int = 1000  # unacknowledged QoS 1 messages the broker may have in flight
    reconnect_min_delay: int = 1
    reconnect_max_delay: int = 60
    max_payload_bytes: int = 65536
    # 0: one paho client in the gateway's process (the default). N > 0: N worker processes, each
    # a paho client on a shared subscription ($share/...) that receives and parses, feeding the
    # one buffer writer (workers.py). Its sessions are not the in-process one's: see README.
    workers: int = 0
    subscriptions: list[Subscription] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        if not 0 < self.receive_maximum < 65536:
            raise ValueError("receive_maximum must be 1-65535")
        if not 0 <= self.workers <= 64:
            raise ValueError(f"workers must be 0-64, got {self.workers}")
        if not 0 < self.reconnect_min_delay <= self.reconnect_max_delay:
            raise ValueError("need 0 < reconnect_min_delay <= reconnect_max_delay")
        if self.enabled and not self.subscriptions:
            raise ValueError("mqtt is enabled but has no [[mqtt.subscriptions]]")
        if self.enabled and self.ca_file and not Path(self.ca_file).is_file():
            raise ValueError(f"ca_file {self.ca_file} does not exist")

    @classmethod
    def from_toml(cls, table: dict[str, Any], *, source: str | Path) -> MqttConfig:
        return build(cls, table, source=source, prefix="mqtt").with_secrets(source)

    def with_secrets(self, source: str | Path) -> MqttConfig:
        """A copy with ``password`` resolved (env:/file:); a disabled source needs no secret."""
        if not self.enabled:
            return self
        return dataclasses.replace(
            self, password=secret(self.password, source=source, key="mqtt.password")
        )


class _InFlight:
    """One message handed on and not settled yet (one object, not two closures per message)."""

    __slots__ = ("done", "generation", "mid", "qos", "receipt", "source")

    def __init__(
        self, source: MqttSource, mid: int, qos: int, generation: int, receipt: Receipt | None
    ) -> None:
        self.source, self.mid, self.qos = source, mid, qos
        self.generation, self.receipt, self.done = generation, receipt, False

    def durable(self) -> None:
        """Settle and ack it; a second call must not ack twice or unbalance _pending."""
        src = self.source
        with src._lock:
            if self.done:
                return
            self.done = True
            src._settle()
            if src._ack_locked(self.mid, self.qos, self.generation) and self.receipt is not None:
                src._unconfirmed.append((self.receipt, time.time()))

    def cancel(self) -> None:
        """Settle it without an ack: it will never be durable (the broker redelivers it)."""
        src = self.source
        with src._lock:
            if not self.done:
                self.done = True
                src._settle()


# ---------------------------------------------------------------- the source


class MqttSource:
    """Subscribes per ``config`` and feeds ``sink``; ``start()``/``stop()`` own the paho thread."""

    def __init__(
        self,
        config: MqttConfig,
        sink: Sink,
        metrics: Metrics,
        dead_letters: DeadLetterStore,
        gateway_id: str,
        *,
        receipts: Receipts | None = None,
        log_interval: float = 10.0,
        share_group: str = "",
    ) -> None:
        self.config = config
        self._share = f"$share/{share_group}/" if share_group else ""  # a worker's filters
        self._sink = sink
        self._metrics = metrics
        self._dead = dead_letters
        self._gateway_id = gateway_id
        self._client_id = config.client_id or f"edge-gateway-{gateway_id}"
        self._log = RateLimitedLog(log, log_interval)
        self._client: mqtt.Client | None = None
        # Guards connection state and acks. ``_generation`` changes at every disconnect: an ack
        # for a message of an earlier connection is dropped (the broker redelivers it), because
        # its packet id may name another message on the new connection.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._generation = 0
        self._connected = False
        self._subscribed = False
        self._accepting = False
        self._pending = 0  # handed to the sink, not yet durable
        self._unsubacked: set[int] = set()  # mids of answered ack barriers (see _confirm_acks)
        self.last_error = ""  # for /health details
        self._beat = Heartbeat("mqtt network loop", progress=False)
        self._sub_cache: dict[str, Subscription | None] = {}
        # Redeliveries (see the module's docstring). None: every delivery is taken.
        self._receipts = receipts
        self._receipt_source = f"mqtt:{self._client_id}"
        self._unconfirmed: list[tuple[Receipt, float]] = []  # acked, not confirmed by the broker
        self._barriers: dict[int, _Barrier] = {}  # UNSUBSCRIBE mid -> what its answer confirms
        self._connected_at = 0.0
        self._redelivered: set[str] = set()  # keys of DUP messages in this connection
        self._stopping = threading.Event()
        self._confirmer: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> None:
        cfg = self.config
        client = PahoClient(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password or None)
        if cfg.tls:
            client.tls_set(ca_certs=cfg.ca_file or None, cert_reqs=ssl.CERT_REQUIRED)
        client.reconnect_delay_set(cfg.reconnect_min_delay, cfg.reconnect_max_delay)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_unsubscribe = self._on_unsubscribe
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = cfg.session_expiry
        props.ReceiveMaximum = cfg.receive_maximum
        with self._lock:
            self._accepting = True
        self._client = client
        # connect_async + loop_start: the first connection is retried with back-off like later ones.
        client.connect_async(cfg.host, cfg.port, cfg.keepalive, clean_start=False, properties=props)
        client.loop_start()
        # paho's network thread: not ours to instrument, so only watched for being alive.
        self._beat.watch(getattr(client, "_thread", None))
        if self._receipts is not None:
            self._stopping.clear()
            self._confirmer = threading.Thread(
                target=self._confirm_loop, name="mqtt-ack-confirm", daemon=True
            )
            self._confirmer.start()

    def stop(self, drain_timeout: float = 5.0, ack_timeout: float = 5.0) -> None:
        """Stop taking messages, wait up to ``drain_timeout`` for those in the sink to become
        durable (and be acknowledged), up to ``ack_timeout`` for the broker to confirm it has read
        those acks, then disconnect. Unacknowledged ones are redelivered later.
        """
        client = self._client
        if client is None:
            return
        self._stopping.set()
        if self._confirmer is not None:
            self._confirmer.join()
            self._confirmer = None
        with self._lock:
            self._accepting = False
            self._idle.wait_for(lambda: self._pending == 0, timeout=drain_timeout)
            self._generation += 1  # late acks must not reach a later connection
            connected, generation = self._connected, self._generation
        if connected:
            self._confirm_acks(client, generation, ack_timeout)
        client.disconnect()
        client.loop_stop()
        with self._lock:
            self._set_disconnected()
        self._client = None

    def _confirm_acks(self, client: mqtt.Client, generation: int, timeout: float) -> None:
        """Wait until the broker has read every PUBACK written so far.

        paho writes the acks, then DISCONNECT, and closes the socket at once; a busy broker may not
        have read them yet. If the same client id connects first (a quick restart), Mosquitto
        drops the old connection with its unread acks ("already connected, closing old
        connection") and redelivers messages we had acknowledged. The broker handles a
        connection's packets in order, so its UNSUBACK to an UNSUBSCRIBE of a filter we never
        subscribed to (no side effect) comes after every earlier ack was processed.
        """
        with self._lock:
            mid = self._barrier_locked(client)
            if mid is None:
                return
            confirmed = self._idle.wait_for(
                lambda: mid in self._unsubacked or self._generation != generation, timeout
            )
            self._unsubacked.clear()
        if not confirmed:
            log.warning("MQTT broker did not confirm the last acks; some may be redelivered")

    def heartbeats(self) -> list[Heartbeat]:
        return [self._beat]

    def _barrier_locked(
        self, client: mqtt.Client, cleanup_before: float | None = None
    ) -> int | None:
        """Send an ack barrier; its answer confirms the acks sent so far (and, with
        ``cleanup_before``, that every redelivery of this connection has arrived). Caller holds
        _lock, so the answer cannot be handled before the barrier is registered."""
        rc, mid = client.unsubscribe(f"edge-gateway/ack-barrier/{uuid.uuid4().hex}")
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return None
        acked, self._unconfirmed = self._unconfirmed, []
        self._barriers[mid] = _Barrier(self._generation, acked, cleanup_before)
        return int(mid)

    def _confirm_loop(self) -> None:
        """Now and then, have the broker confirm the acks sent since: their receipts can go."""
        while not self._stopping.wait(CONFIRM_INTERVAL_S):
            client = self._client
            with self._lock:
                waiting = any(b.cleanup_before is None for b in self._barriers.values())
                if client is not None and self._connected and self._unconfirmed and not waiting:
                    self._barrier_locked(client)

    def _confirmed(self, barrier: _Barrier, keep: set[str]) -> None:
        """The broker has read every ack sent before ``barrier``: it delivers those messages no
        more; after a reconnect, it has also sent again all it will (the MQTT resend at
        connection comes before its answer to any later packet)."""
        if self._receipts is None:
            return
        if barrier.acked:
            self._receipts.forget(barrier.acked)
        if barrier.cleanup_before is not None:
            self._receipts.forget_older(self._receipt_source, barrier.cleanup_before, keep)

    def health(self) -> Health:
        """Healthy while connected and the broker accepted every subscription."""
        with self._lock:
            ok = self._accepting and self._connected and self._subscribed
        return ok, {"error": self.last_error}

    # -- paho callbacks (paho's network thread)

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self.last_error = f"broker refused the connection: {rc}"
            self._log.warning("connect", "MQTT %s: %s", self._where(), self.last_error)
            return
        with self._lock:
            if not self._connected:
                self._connected = True
                self._metrics.active_connections.inc()
            self._connected_at = time.time()
            self._redelivered = set()
        log.info("MQTT connected to %s (session present: %s)", self._where(), flags.session_present)
        subs = [(self._share + s.topic, s.qos) for s in self.config.subscriptions]
        if subs:
            client.subscribe(subs)

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        self.last_error = "cannot connect"
        self._log.warning("connect", "MQTT %s: cannot connect, retrying", self._where())

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        with self._lock:
            was_connected = self._connected
            self._set_disconnected()
            accepting = self._accepting
        if was_connected and accepting:
            self.last_error = f"connection lost: {rc}"
            self._log.warning("disconnect", "MQTT connection to %s lost: %s", self._where(), rc)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        subs = self.config.subscriptions
        refused = [(s.topic, c) for s, c in zip(subs, codes, strict=False) if c.is_failure]
        for topic, code in refused:
            log.error("MQTT broker refused subscription %r: %s", topic, code)
        with self._lock:
            self._subscribed = not refused
            if self._receipts is not None and self._client is not None and self._connected:
                self._barrier_locked(self._client, cleanup_before=self._connected_at)

    def _on_unsubscribe(self, _c: mqtt.Client, _u: Any, mid: int, _codes: Any, _p: Any) -> None:
        with self._lock:
            self._unsubacked.add(mid)
            self._idle.notify_all()
            barrier = self._barriers.pop(mid, None)
            if barrier is None or barrier.generation != self._generation:
                return
            keep = set(self._redelivered)
        self._confirmed(barrier, keep)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handle(msg)
        except SinkClosed:  # stopping: unacknowledged, so the broker redelivers it next time
            log.debug("MQTT message not taken: the gateway is stopping")
        except Exception as e:  # paho would stop its thread; the message stays unacked
            self._log.warning("handler", "MQTT message not handled, it will be redelivered: %r", e)

    # -- message handling

    def _handle(self, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            if not self._accepting:
                return  # stopping: the broker redelivers it next time
            generation = self._generation
        mid, qos = msg.mid, msg.qos
        payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = msg._topic.decode("utf-8", "replace")
            rejection = Rejection("bad_topic", "topic is not UTF-8")
            self._store(partial(self._reject, topic, payload, rejection), mid, qos, generation)
            return
        receipt = None
        if qos and self._receipts is not None:
            receipt = Receipt(
                self._receipt_source,
                str(mid),
                fingerprint(topic, payload),
                self.config.session_expiry,
            )
            if msg.dup and self._recognised(receipt, mid, qos, generation):
                return
        sub = self._subscription_for(topic)
        if sub is None:  # e.g. a filter left in the persistent session by an older config
            result: list[Reading] | Rejection = Rejection("no_subscription", topic[:200])
        else:
            result = parse_message(
                topic, payload, sub, max_payload_bytes=self.config.max_payload_bytes
            )
        if isinstance(result, Rejection):
            self._store(partial(self._reject, topic, payload, result), mid, qos, generation)
            return
        for r in result:
            r.gateway_id = self._gateway_id
        records: list[Record] = [*result]
        if receipt is not None:
            records.append(receipt)
        self._store(partial(self._sink, records), mid, qos, generation, receipt)

    def _store(
        self,
        store: Callable[[OnDurable], None],
        mid: int,
        qos: int,
        generation: int,
        receipt: Receipt | None = None,
    ) -> None:
        """Hand a message to ``store`` (the sink, or the dead-letter store), which calls back
        once it is durable: only then is the message acknowledged. Counted in ``_pending`` until
        then, so ``stop()`` can wait for it."""
        on_durable, cancel = self._durable_ack(mid, qos, generation, receipt)
        try:
            store(on_durable)
        except BaseException:
            cancel()
            raise

    def _durable_ack(
        self, mid: int, qos: int, generation: int, receipt: Receipt | None
    ) -> tuple[OnDurable, OnDurable]:
        """A message now in flight (counted in _pending): the callback that settles and acks it
        once it is durable, and the one that settles it if it will never be."""
        flight = _InFlight(self, mid, qos, generation, receipt)
        with self._lock:
            self._pending += 1
        return flight.durable, flight.cancel

    def _recognised(self, receipt: Receipt, mid: int, qos: int, generation: int) -> bool:
        """Whether a DUP message was committed (or is queued) already: then it is acknowledged
        once that is durable, and not taken again."""
        assert self._receipts is not None
        with self._lock:
            self._redelivered.add(receipt.key)
        on_durable, cancel = self._durable_ack(mid, qos, generation, receipt)
        try:
            recall = self._receipts.recall(receipt, on_durable)
        except BaseException:
            cancel()
            raise
        if recall is not Recall.SAME:
            cancel()
            return False
        self._metrics.redeliveries.labels(SOURCE).inc()
        self._log.info(
            "redelivery", "MQTT redelivery of a committed message recognised: not stored again"
        )
        return True

    def _reject(
        self, topic: str, payload: bytes, rejection: Rejection, on_durable: Callable[[], None]
    ) -> None:
        """Count, log and hand to the dead-letter store, which calls ``on_durable`` once the
        row is committed; raises (and so leaves it unacked) if the store is closed."""
        self._metrics.rejected_payloads.labels(SOURCE, rejection.reason).inc()
        self._log.warning(
            rejection.reason,
            "rejected MQTT payload on %r (%d bytes): %s",
            topic[:200],
            len(payload),
            rejection,
        )
        self._dead.submit(
            SOURCE, topic, rejection.reason, payload, rejection.detail, on_durable=on_durable
        )

    def _ack_locked(self, mid: int, qos: int, generation: int) -> bool:
        """Send the ack if the message's connection is still the current one; whether it was."""
        # paho's ack() only appends the PUBACK to a deque and wakes the network thread through
        # its socketpair (as publish() does), so any thread may call it while loop_start()'s
        # thread runs. Holding _lock keeps it off a later connection (see _generation).
        client = self._client
        if qos and client is not None and self._connected and generation == self._generation:
            client.ack(mid, qos)
            return True
        return False

    def _settle(self) -> None:  # caller holds _lock
        self._pending -= 1
        if self._pending == 0:
            self._idle.notify_all()

    def _set_disconnected(self) -> None:  # caller holds _lock
        self._subscribed = False
        # Whether the broker read the acks not yet confirmed is unknown: their receipts stay, and
        # the cleanup after the next connection drops those of messages not delivered again.
        self._unconfirmed = []
        self._barriers.clear()
        if self._connected:
            self._connected = False
            self._generation += 1
            self._idle.notify_all()  # a wait for this connection's answer is over
            self._metrics.active_connections.dec()

    def _subscription_for(self, topic: str) -> Subscription | None:
        """The first subscription whose filter matches; memoised, as a plant's topics are few."""
        try:
            return self._sub_cache[topic]
        except KeyError:
            pass
        found = next(
            (s for s in self.config.subscriptions if mqtt.topic_matches_sub(s.topic, topic)), None
        )
        if len(self._sub_cache) >= 10_000:
            self._sub_cache.clear()
        self._sub_cache[topic] = found
        return found

    def _where(self) -> str:
        return f"{self.config.host}:{self.config.port}"
