"""MQTT ingest in worker processes (``[mqtt] workers = N``, opt-in).

Each of N processes runs an :class:`MqttSource` of its own: a paho client with its own persistent
session (client id ``<client_id>-w<i>``) on shared subscriptions (``$share/<group>/<filter>``), so
the broker spreads the messages over the workers. A worker receives and parses (the work that
held the GIL); its sink, dead-letter store and receipts are proxies that ship compact batches to
the gateway's process over a pipe. There :class:`MqttWorkers` hands each batch to the one sink
(pipeline, then buffer) in one call, and once it is durable tells the worker which messages to
acknowledge. So the guarantees are the in-process source's, per worker session:

- a message is acknowledged only after its rows are committed (the worker's MqttSource acks from
  ``on_durable``, which the gateway sends back after the commit);
- a redelivery (DUP) is checked against the receipts in the buffer (a synchronous question to the
  gateway's process), keyed by the worker's session and packet id, as today;
- a worker that dies leaves its messages unacknowledged in its session; it is started again with
  the same client id, and the broker redelivers them to it (with DUP, so they are stored once).
  A worker that keeps dying ends the daemon (see ``acquire.workers``, the channel and supervision
  this shares with the HTTP ingest workers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import threading
from collections.abc import Collection, Sequence
from functools import partial
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from gateway.common.logs import RateLimitedLog
from gateway.common.model import Receipt, Record
from gateway.common.nometrics import no_metrics
from gateway.common.stage import Health, OnDurable, Recall, Sink, SinkClosed
from gateway.common.supervise import Heartbeat
from gateway.edge.acquire.mqtt.source import SOURCE, MqttConfig, MqttSource
from gateway.edge.acquire.workers import Slot, Uplink, WorkerPool, worker_entry, worker_process

if TYPE_CHECKING:  # the workers do not import prometheus_client
    from gateway.common.metrics import Metrics

log = logging.getLogger(__name__)

RECALL_TIMEOUT_S = 30.0

# worker -> gateway: ("m", items); items in order, each one of
#   ("s", token, records)                          sink: records, ack token once durable
#   ("d", token, topic, reason, payload, detail)   dead letter
#   ("r", token, receipt)                          recall; answered ("a", token, same)
#   ("f", [(receipt, t), ...])                     forget
#   ("o", source, before, keep)                    forget_older
#   ("h", ok, error)                               health
# gateway -> worker: ("d", tokens) durable, ("x", tokens) cancelled, ("a", token, same),
#   ("stop", drain_timeout, ack_timeout); the worker answers the stop with ("bye",) and exits.


def client_id_of(config: MqttConfig, gateway_id: str, index: int) -> str:
    return f"{config.client_id or f'edge-gateway-{gateway_id}'}-w{index}"


def share_group_of(config: MqttConfig, gateway_id: str) -> str:
    base = config.client_id or f"edge-gateway-{gateway_id}"
    return re.sub(r"[/+#$\s]", "_", base)


# ---------------------------------------------------------------- in the worker process


class _Uplink(Uplink):
    """The sink, dead-letter store and receipts the worker's MqttSource sees."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self._answers: dict[int, bool] = {}

    # the sink
    def __call__(
        self,
        records: list[Record],
        on_durable: OnDurable | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        self.put(("s", self.register(on_durable), records))

    # the dead-letter store
    def submit(
        self,
        source: str,
        topic: str,
        reason: str,
        payload: bytes,
        detail: str,
        on_durable: OnDurable | None = None,
    ) -> None:
        self.put(("d", self.register(on_durable), topic, reason, payload, detail))

    # the receipts
    def recall(self, receipt: Receipt, on_durable: OnDurable) -> Recall:
        token = self.register(on_durable)
        self.put(("r", token, receipt))
        with self._cond:
            if not self._cond.wait_for(
                lambda: token in self._answers or self._closed, RECALL_TIMEOUT_S
            ):
                self._callbacks.pop(token, None)
                raise TimeoutError("the gateway did not answer a recall")
            if token not in self._answers:
                self._callbacks.pop(token, None)
                raise SinkClosed("the worker is stopping")
            same = self._answers.pop(token)
            if not same:
                self._callbacks.pop(token, None)
        return Recall.SAME if same else Recall.NEW

    def forget(self, receipts: Sequence[tuple[Receipt, float]]) -> None:
        with contextlib.suppress(SinkClosed):
            self.put(("f", list(receipts)))

    def forget_older(self, source: str, before: float, keep: Collection[str]) -> None:
        with contextlib.suppress(SinkClosed):
            self.put(("o", source, before, list(keep)))

    def settle(self, tokens: list[int], durable: bool) -> None:
        for cb in self.take(tokens):
            if cb is None:
                continue
            if durable:
                cb()
            else:  # the source's _InFlight: settle it without an ack (the broker redelivers)
                cancel = getattr(getattr(cb, "__self__", None), "cancel", None)
                if cancel is not None:
                    cancel()

    def answer(self, token: int, same: bool) -> None:
        with self._cond:
            self._answers[token] = same
            self._cond.notify_all()


def worker_main(
    config: MqttConfig, gateway_id: str, index: int, down: Connection, up: Connection
) -> None:
    """A worker process: an MqttSource on shared subscriptions whose sink is the pipe ``up``;
    ``down`` brings acks and the stop. Exits when the gateway's end of the pipe closes."""
    worker_process(index, "mqtt")
    uplink = _Uplink(up)
    cfg = dataclasses.replace(config, client_id=client_id_of(config, gateway_id, index))
    source = MqttSource(
        cfg,
        uplink,
        no_metrics(),
        uplink,  # type: ignore[arg-type]  # the dead-letter store's submit()
        gateway_id,
        receipts=uplink,
        share_group=share_group_of(config, gateway_id),
    )
    uplink.health = lambda: (source.health()[0], source.last_error)
    uplink.start("mqtt-uplink")
    source.start()
    stopper: threading.Thread | None = None
    while True:
        try:
            msg = down.recv()
        except (EOFError, OSError):
            os._exit(0)  # the gateway is gone: unacked messages are redelivered
        kind = msg[0]
        if kind == "d":
            uplink.settle(msg[1], True)
        elif kind == "x":
            uplink.settle(msg[1], False)
        elif kind == "a":
            uplink.answer(msg[1], msg[2])
        elif kind == "stop" and stopper is None:

            def stop(drain: float, ack: float) -> None:
                uplink.close()
                source.stop(drain_timeout=drain, ack_timeout=ack)
                uplink.send(("bye",))
                os._exit(0)

            stopper = threading.Thread(target=stop, args=msg[1:], daemon=True)
            stopper.start()


# ---------------------------------------------------------------- in the gateway's process


class MqttWorkers:
    """``[mqtt] workers = N``: the MqttSource's interface (start, stop, health, heartbeats) over
    N worker processes."""

    def __init__(
        self,
        config: MqttConfig,
        sink: Sink,
        metrics: Metrics,
        dead_letters: Any,
        gateway_id: str,
        *,
        receipts: Any = None,
        log_interval: float = 10.0,
    ) -> None:
        self.config = config
        self._sink = sink
        self._metrics = metrics
        self._dead = dead_letters
        self._receipts = receipts
        self._gateway_id = gateway_id
        self._log = RateLimitedLog(log, log_interval)
        self._pool = WorkerPool(
            "MQTT",
            __name__,
            config.workers,
            lambda index: (config, gateway_id, index),
            self._handle,
            lost=" (its unacked messages are redelivered)",
        )

    # -- lifetime

    def start(self) -> None:
        self._pool.start()

    def pids(self) -> list[int]:
        return self._pool.pids()

    @property
    def last_error(self) -> str:
        return self._pool.last_error

    def _handle(self, slot: Slot, epoch: int, items: list[tuple[Any, ...]]) -> None:
        records: list[Record] = []
        tokens: list[int] = []
        for item in items:
            kind = item[0]
            if kind == "s":
                tokens.append(item[1])
                records.extend(item[2])
                continue
            if tokens:
                self._store(slot, epoch, records, tokens)
                records, tokens = [], []
            if kind == "d":
                _, token, topic, reason, payload, detail = item
                self._metrics.rejected_payloads.labels(SOURCE, reason).inc()
                try:
                    self._dead.submit(
                        SOURCE,
                        topic,
                        reason,
                        payload,
                        detail,
                        on_durable=partial(slot.send, epoch, ("d", [token])),
                    )
                except Exception:
                    slot.send(epoch, ("x", [token]))
            elif kind == "r":
                _, token, receipt = item
                same = False
                try:
                    if self._receipts is not None:
                        answer = self._receipts.recall(
                            receipt, partial(slot.send, epoch, ("d", [token]))
                        )
                        same = answer is Recall.SAME
                except Exception as e:  # answered "new": the worker hands it on (or drops it)
                    self._log.warning("recall", "MQTT worker redelivery not checked: %r", e)
                if same:
                    self._metrics.redeliveries.labels(SOURCE).inc()
                slot.send(epoch, ("a", token, same))
            elif kind == "f":
                if self._receipts is not None:
                    self._receipts.forget(item[1])
            elif kind == "o":
                if self._receipts is not None:
                    self._receipts.forget_older(item[1], item[2], set(item[3]))
            elif kind == "h":
                slot.ok, slot.error = item[1], item[2]
        if tokens:
            self._store(slot, epoch, records, tokens)

    def _store(self, slot: Slot, epoch: int, records: list[Record], tokens: list[int]) -> None:
        """One sink call for the batch; once durable, the worker acks every message in it."""
        try:
            self._sink(records, partial(slot.send, epoch, ("d", tokens)))
        except SinkClosed:  # stopping: unacknowledged, so the broker redelivers them next time
            slot.send(epoch, ("x", tokens))
        except BaseException:
            slot.send(epoch, ("x", tokens))
            raise

    def stop(self, drain_timeout: float = 5.0, ack_timeout: float = 5.0) -> None:
        """Each worker stops as the in-process source does (drain, acks confirmed, disconnect);
        the reading threads go on handling their batches and acks meanwhile. Then any worker
        still there is killed."""
        self._pool.stop(("stop", drain_timeout, ack_timeout), drain_timeout + ack_timeout + 2.0)

    def health(self) -> Health:
        """Healthy while every worker is alive, connected and subscribed."""
        return self._pool.health()

    def heartbeats(self) -> list[Heartbeat]:
        return self._pool.heartbeats()


if __name__ == "__main__":

    def _main(init: tuple[Any, ...], down: Connection, up: Connection) -> None:
        config, gateway_id, index = init
        worker_main(config, gateway_id, index, down, up)

    worker_entry(sys.argv, _main)
