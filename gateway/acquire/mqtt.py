"""MQTT source: subscribes to a broker and hands readings to the sink, acknowledging each message
only once its readings are durable.

Delivery: MQTT v5 with ``clean_start=False`` and a session expiry, so the broker keeps the session
and queues QoS 1 messages while the gateway is down; paho's manual ack sends the PUBACK from the
sink's ``on_durable`` callback. A message that is never made durable is never acknowledged, and
the broker redelivers it on the next connection.

Malformed payloads are counted, logged (rate-limited), stored in the dead-letter store and then
acknowledged: the dead-letter row is their durable home.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import build, secret
from gateway.deadletter import DeadLetterStore
from gateway.logs import RateLimitedLog
from gateway.metrics import Metrics
from gateway.model import (
    EARLIEST_TS,
    LATEST_TS,
    Quality,
    Reading,
    Record,
    Rejection,
    now_ts,
    parse_ts,
    reading_from_dict,
)

log = logging.getLogger(__name__)

SOURCE = "mqtt"
Sink = Callable[[list[Record], Callable[[], None] | None], None]

# Pattern placeholder -> Reading field it fills.
PLACEHOLDERS = {
    "plantId": "plant_id",
    "sensorId": "sensor_id",
    "parameter": "parameter",
    "location": "location",
}
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_MS_EPOCH = 1e11  # a numeric ts above this is in milliseconds (1e11 s is the year 5138)


@dataclass
class Subscription:
    """One ``[[mqtt.subscriptions]]`` entry."""

    topic: str  # MQTT topic filter, may use + and #
    qos: int = 1
    format: Literal["json", "number", "isa95"] = "json"
    # e.g. "plant/{plantId}/{sensorId}/{parameter}": one placeholder or literal per topic level.
    pattern: str = ""
    # Defaults for what neither the topic nor the payload says.
    plant_id: str = "default"
    sensor_id: str = ""
    parameter: str = ""
    unit: str = ""
    location: str = ""
    levels: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {self.qos}")
        _check_filter(self.topic)
        self.levels = _parse_pattern(self.pattern) if self.pattern else ()
        named = {name for name, _ in self.levels if name}
        if self.format != "json":
            if "sensorId" not in named and not self.sensor_id:
                raise ValueError(
                    f"format {self.format!r} needs {{sensorId}} in pattern or sensor_id"
                )
            if "parameter" not in named and not self.parameter:
                raise ValueError(
                    f"format {self.format!r} needs {{parameter}} in pattern or parameter"
                )


def _check_filter(topic: str) -> None:
    levels = topic.split("/")
    if not topic or any(
        ("#" in lv and (lv != "#" or i != len(levels) - 1)) or ("+" in lv and lv != "+")
        for i, lv in enumerate(levels)
    ):
        raise ValueError(f"topic {topic!r} is not a valid MQTT topic filter")


def _parse_pattern(pattern: str) -> tuple[tuple[str, str], ...]:
    """Pattern levels as (placeholder name, "") or ("", literal)."""
    out: list[tuple[str, str]] = []
    for level in pattern.split("/"):
        if level.startswith("{") and level.endswith("}"):
            name = level[1:-1]
            if name not in PLACEHOLDERS:
                known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                raise ValueError(
                    f"pattern {pattern!r}: unknown placeholder {level}; known: {known}"
                )
            if any(name == n for n, _ in out):
                raise ValueError(f"pattern {pattern!r}: {level} appears twice")
            out.append((name, ""))
        elif any(c in level for c in "{}+#"):
            raise ValueError(f"pattern {pattern!r}: a placeholder must be a whole level")
        else:
            out.append(("", level))
    return tuple(out)


@dataclass
class MqttConfig:
    """The ``[mqtt]`` section."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: str = ""  # empty: the system's CAs
    username: str = ""
    password: str = ""  # env:NAME or file:/path
    client_id: str = ""  # stable across restarts (it names the session); default from gateway id
    keepalive: int = 30
    session_expiry: int = 7 * 86400  # seconds the broker keeps queueing for us while we are down
    receive_maximum: int = 1000  # unacknowledged QoS 1 messages the broker may have in flight
    reconnect_min_delay: int = 1
    reconnect_max_delay: int = 60
    max_payload_bytes: int = 65536
    subscriptions: list[Subscription] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        if not 0 < self.receive_maximum < 65536:
            raise ValueError("receive_maximum must be 1-65535")
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


# ---------------------------------------------------------------- parsing (pure, never raises)


def parse_message(
    topic: str,
    payload: bytes,
    subscription: Subscription,
    *,
    max_payload_bytes: int = 65536,
    received_at: float | None = None,
) -> list[Reading] | Rejection:
    """Turn one MQTT message into readings, or say why not (a labelled Rejection)."""
    try:
        return _parse(topic, payload, subscription, max_payload_bytes, received_at)
    except Exception as e:  # the contract is "never raises": a bug here must not stop the source
        return Rejection("parser_error", f"{type(e).__name__}: {e}"[:200])


def _parse(
    topic: str, payload: bytes, sub: Subscription, max_bytes: int, received_at: float | None
) -> list[Reading] | Rejection:
    if len(payload) > max_bytes:
        return Rejection("too_large", f"{len(payload)} bytes, limit {max_bytes}")
    fields = _topic_fields(topic, sub)
    if isinstance(fields, Rejection):
        return fields
    ts = now_ts() if received_at is None else received_at
    if sub.format == "json":
        return _parse_json(payload, sub, fields)
    if sub.format == "number":
        value = _parse_number(payload)
        if isinstance(value, Rejection):
            return value
        return [_finish(_reading(sub, fields, value, sub.unit, ts, Quality.GOOD))]
    return _parse_isa95(payload, sub, fields, ts)


def _topic_fields(topic: str, sub: Subscription) -> dict[str, str] | Rejection:
    if not sub.levels:
        return {}
    levels = topic.split("/")
    mismatch = Rejection("topic_mismatch", f"{topic[:200]!r} does not match {sub.pattern!r}")
    if len(levels) != len(sub.levels):
        return mismatch
    out: dict[str, str] = {}
    for (name, literal), level in zip(sub.levels, levels, strict=True):
        if name:
            if not level or len(level) > 256:
                return mismatch
            out[PLACEHOLDERS[name]] = level
        elif level != literal:
            return mismatch
    return out


def _reading(
    sub: Subscription,
    fields: dict[str, str],
    value: float | None,
    unit: str,
    ts: float,
    quality: Quality,
) -> Reading:
    return Reading(
        sensor_id=fields.get("sensor_id", sub.sensor_id),
        parameter=fields.get("parameter", sub.parameter),
        value=value,
        unit=unit,
        timestamp=ts,
        plant_id=fields.get("plant_id", sub.plant_id),
        location=fields.get("location", sub.location),
        quality=quality,
    )


def _finish(r: Reading) -> Reading:
    """Flag what the publisher sent as unusable: the reading is kept, bad, with a reason."""
    if r.value is None:
        r.flag(Quality.BAD, "no_value")
    elif not math.isfinite(r.value):
        r.flag(Quality.BAD, "nan" if math.isnan(r.value) else "inf")
        r.value = None
    return r


def _parse_number(payload: bytes) -> float | Rejection:
    try:
        text = payload.decode("ascii").strip()
    except UnicodeDecodeError:
        return Rejection("not_a_number", "payload is not ASCII")
    if _NUMBER.fullmatch(text):
        return float(text)  # may overflow to inf, which _finish flags
    if text.lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return float(text)
    return Rejection("not_a_number", repr(text[:50]))


def _load_json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return Rejection("not_json", str(e)[:200])


def _parse_json(
    payload: bytes, sub: Subscription, fields: dict[str, str]
) -> list[Reading] | Rejection:
    data = _load_json(payload)
    if isinstance(data, Rejection):
        return data
    items = data if isinstance(data, list) else [data]
    if not items:
        return Rejection("empty", "an empty array")
    defaults: dict[str, Any] = {
        k: v
        for k, v in {
            "sensorId": fields.get("sensor_id", sub.sensor_id),
            "parameter": fields.get("parameter", sub.parameter),
            "unit": sub.unit,
            "location": fields.get("location", sub.location),
        }.items()
        if v
    }
    plant_id = fields.get("plant_id", sub.plant_id)
    readings: list[Reading] = []
    for i, item in enumerate(items):
        merged = {**defaults, **item} if isinstance(item, dict) else item
        r = reading_from_dict(merged, plant_id=plant_id)
        if isinstance(r, Rejection):
            return Rejection(r.reason, f"item {i}: {r.detail}" if len(items) > 1 else r.detail)
        readings.append(_finish(r))
    return readings


def _parse_isa95(
    payload: bytes, sub: Subscription, fields: dict[str, str], received_at: float
) -> list[Reading] | Rejection:
    d = _load_json(payload)
    if isinstance(d, Rejection):
        return d
    if not isinstance(d, dict):
        return Rejection("not_an_object", f"expected a JSON object, got {type(d).__name__}")
    if "value" not in d:
        return Rejection("missing_field", "value")
    value = d["value"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        return Rejection(
            "wrong_type", f"value must be a number or null, got {type(value).__name__}"
        )
    ts = _isa95_ts(d.get("ts"), received_at)
    if isinstance(ts, Rejection):
        return ts
    unit = d.get("unit", sub.unit)
    if not isinstance(unit, str) or len(unit) > 32:
        return Rejection("wrong_type", "unit must be a string of at most 32 characters")
    try:
        quality = Quality(d.get("quality", "good"))
    except (ValueError, TypeError):
        return Rejection("wrong_type", "quality must be good, uncertain or bad")
    seq = d.get("seq")  # the publisher's own counter; checked, not kept
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
        return Rejection("wrong_type", "seq must be an integer")
    fval = None if value is None else float(value)
    return [_finish(_reading(sub, fields, fval, unit, ts, quality))]


def _isa95_ts(ts: Any, received_at: float) -> float | Rejection:
    """RFC 3339 text or epoch seconds (or milliseconds, when too large for seconds)."""
    if ts is None:
        return received_at
    if isinstance(ts, str):
        try:
            t = parse_ts(ts)
        except (ValueError, OverflowError, OSError) as e:
            return Rejection("bad_timestamp", str(e)[:200])
    elif isinstance(ts, int | float) and not isinstance(ts, bool):
        t = float(ts) / 1000 if ts > _MS_EPOCH else float(ts)
    else:
        return Rejection(
            "bad_timestamp", f"ts must be RFC 3339 text or epoch, got {type(ts).__name__}"
        )
    if not EARLIEST_TS <= t <= LATEST_TS:
        return Rejection("bad_timestamp", "ts is outside 1970-2100")
    return t


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
        log_interval: float = 10.0,
    ) -> None:
        self.config = config
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
        self._sub_cache: dict[str, Subscription | None] = {}
        self._received_by_plant: dict[str, Any] = {}

    # -- lifecycle

    def start(self) -> None:
        cfg = self.config
        client = mqtt.Client(
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

    def stop(self, drain_timeout: float = 5.0, ack_timeout: float = 5.0) -> None:
        """Stop taking messages, wait up to ``drain_timeout`` for those in the sink to become
        durable (and be acknowledged), up to ``ack_timeout`` for the broker to confirm it has read
        those acks, then disconnect. Unacknowledged ones are redelivered later.
        """
        client = self._client
        if client is None:
            return
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
        rc, mid = client.unsubscribe(f"edge-gateway/ack-barrier/{uuid.uuid4().hex}")
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            return
        with self._lock:
            confirmed = self._idle.wait_for(
                lambda: mid in self._unsubacked or self._generation != generation, timeout
            )
            self._unsubacked.clear()
        if not confirmed:
            log.warning("MQTT broker did not confirm the last acks; some may be redelivered")

    def healthy(self) -> bool:
        """Connected, and the broker accepted every subscription."""
        with self._lock:
            return self._accepting and self._connected and self._subscribed

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
        log.info("MQTT connected to %s (session present: %s)", self._where(), flags.session_present)
        subs = [(s.topic, s.qos) for s in self.config.subscriptions]
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

    def _on_unsubscribe(self, _c: mqtt.Client, _u: Any, mid: int, _codes: Any, _p: Any) -> None:
        with self._lock:
            self._unsubacked.add(mid)
            self._idle.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handle(msg)
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
            self._reject(topic, payload, Rejection("bad_topic", "topic is not UTF-8"))
            self._ack(mid, qos, generation)
            return
        sub = self._subscription_for(topic)
        if sub is None:  # e.g. a filter left in the persistent session by an older config
            result: list[Reading] | Rejection = Rejection("no_subscription", topic[:200])
        else:
            result = parse_message(
                topic, payload, sub, max_payload_bytes=self.config.max_payload_bytes
            )
        if isinstance(result, Rejection):
            self._reject(topic, payload, result)
            self._ack(mid, qos, generation)
            return
        for r in result:
            r.gateway_id = self._gateway_id
        done = False

        def on_durable() -> None:
            nonlocal done
            with self._lock:
                if done:  # a second call must not ack twice or unbalance _pending
                    return
                done = True
                self._settle()
                self._ack_locked(mid, qos, generation)
            for r in result:
                self._received(r.plant_id).inc()

        records: list[Record] = [*result]
        with self._lock:
            self._pending += 1
        try:
            self._sink(records, on_durable)
        except BaseException:
            with self._lock:
                if not done:
                    done = True
                    self._settle()
            raise

    def _reject(self, topic: str, payload: bytes, rejection: Rejection) -> None:
        """Count, log and dead-letter; raises (and so leaves it unacked) if the store fails."""
        self._metrics.rejected_payloads.labels(SOURCE, rejection.reason).inc()
        self._log.warning(
            rejection.reason,
            "rejected MQTT payload on %r (%d bytes): %s",
            topic[:200],
            len(payload),
            rejection,
        )
        self._dead.add(SOURCE, topic, rejection.reason, payload, rejection.detail)

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        with self._lock:
            self._ack_locked(mid, qos, generation)

    def _ack_locked(self, mid: int, qos: int, generation: int) -> None:
        # paho's ack() only appends the PUBACK to a deque and wakes the network thread through
        # its socketpair (as publish() does), so any thread may call it while loop_start()'s
        # thread runs. Holding _lock keeps it off a later connection (see _generation).
        client = self._client
        if qos and client is not None and self._connected and generation == self._generation:
            client.ack(mid, qos)

    def _settle(self) -> None:  # caller holds _lock
        self._pending -= 1
        if self._pending == 0:
            self._idle.notify_all()

    def _received(self, plant_id: str) -> Any:
        counter = self._received_by_plant.get(plant_id)
        if counter is None:
            counter = self._metrics.messages_received.labels(SOURCE, plant_id)
            self._received_by_plant[plant_id] = counter
        return counter

    def _set_disconnected(self) -> None:  # caller holds _lock
        self._subscribed = False
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
