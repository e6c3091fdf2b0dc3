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
  A worker that keeps dying (``MAX_RESTARTS`` within ``RESTART_WINDOW_S``) ends its supervising
  thread, whose heartbeat then ends the daemon (systemd restarts it).

Workers die with the gateway: PR_SET_PDEATHSIG (Linux) and the end of the pipe from the gateway.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Sequence
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from gateway.common.logs import RateLimitedLog
from gateway.common.metrics import Metrics
from gateway.common.model import Receipt, Record
from gateway.common.stage import Health, OnDurable, Recall, Sink, SinkClosed
from gateway.common.supervise import Heartbeat
from gateway.edge.acquire.mqtt.source import SOURCE, MqttConfig, MqttSource

log = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
RECALL_TIMEOUT_S = 30.0
HEALTH_INTERVAL_S = 0.5

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


class _Uplink:
    """The worker's side of the pipe: the sink, dead-letter store and receipts its MqttSource
    sees. Items are queued in order and sent in batches by one thread."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._items: list[tuple[Any, ...]] = []
        self._token = 0
        self._callbacks: dict[int, OnDurable] = {}  # token -> the source's on_durable
        self._answers: dict[int, bool] = {}
        self._closed = False
        self.health = lambda: (False, "")

    def _put(self, item: tuple[Any, ...]) -> None:
        with self._cond:
            if self._closed:
                raise SinkClosed("the worker is stopping")
            self._items.append(item)
            if len(self._items) == 1:
                self._cond.notify()

    def _register(self, on_durable: OnDurable | None) -> int:
        with self._cond:
            self._token += 1
            token = self._token
            if on_durable is not None:
                self._callbacks[token] = on_durable
        return token

    # the sink
    def __call__(
        self,
        records: list[Record],
        on_durable: OnDurable | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        self._put(("s", self._register(on_durable), records))

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
        self._put(("d", self._register(on_durable), topic, reason, payload, detail))

    # the receipts
    def recall(self, receipt: Receipt, on_durable: OnDurable) -> Recall:
        token = self._register(on_durable)
        self._put(("r", token, receipt))
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
            self._put(("f", list(receipts)))

    def forget_older(self, source: str, before: float, keep: Collection[str]) -> None:
        with contextlib.suppress(SinkClosed):
            self._put(("o", source, before, list(keep)))

    # the threads
    def send_loop(self) -> None:
        last_health: tuple[bool, str] | None = None
        while True:
            with self._cond:
                if not self._items:
                    self._cond.wait(HEALTH_INTERVAL_S)
                items, self._items = self._items, []
            ok, detail = self.health()
            if (ok, detail) != last_health:
                last_health = (ok, detail)
                items.append(("h", ok, detail))
            if items:
                self.send(("m", items))

    def send(self, msg: tuple[Any, ...]) -> None:
        """One sender at a time: a message is written in more than one piece."""
        with self._send_lock:
            try:
                self._conn.send(msg)
            except OSError:
                os._exit(0)  # the gateway is gone

    def settle(self, tokens: list[int], durable: bool) -> None:
        with self._cond:
            callbacks = [self._callbacks.pop(t, None) for t in tokens]
        for cb in callbacks:
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

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def worker_main(
    config: MqttConfig,
    gateway_id: str,
    index: int,
    down: Connection,
    up: Connection,
    level: int = logging.INFO,
) -> None:
    """A worker process: an MqttSource on shared subscriptions whose sink is the pipe ``up``;
    ``down`` brings acks and the stop. Exits when the gateway's end of the pipe closes. It logs
    to the stderr it shares with the gateway, at the gateway's level."""
    _die_with_parent()
    # The gateway stops its workers itself, in order (a stop from systemd reaches the whole
    # control group, a Ctrl-C the whole process group): drained, acks confirmed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=level, format=f"mqtt-w{index} %(levelname)s %(message)s")
    uplink = _Uplink(up)
    cfg = dataclasses.replace(config, client_id=client_id_of(config, gateway_id, index))
    source = MqttSource(
        cfg,
        uplink,
        Metrics(),
        uplink,  # type: ignore[arg-type]  # the dead-letter store's submit()
        gateway_id,
        receipts=uplink,
        share_group=share_group_of(config, gateway_id),
    )
    uplink.health = lambda: (source.health()[0], source.last_error)
    threading.Thread(target=uplink.send_loop, name="mqtt-uplink", daemon=True).start()
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


class _Slot:
    """One worker: its process, pipe ends and the thread that reads from it (and restarts it)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen[bytes] | None = None
        self.down: Connection | None = None  # to the worker
        self.up: Connection | None = None  # from the worker
        self.lock = threading.Lock()  # one sender on ``down`` at a time
        self.epoch = 0  # which process of this slot a callback belongs to
        self.ok = False
        self.error = "starting"
        self.thread: threading.Thread | None = None
        self.beat = Heartbeat(f"mqtt worker {index}", progress=False)

    def send(self, epoch: int, msg: tuple[Any, ...]) -> None:
        """To the worker, if it is still the process ``epoch`` (a restarted one has other
        packet ids: the broker redelivers what the dead one did not ack)."""
        with self.lock:
            if epoch == self.epoch and self.down is not None:
                with contextlib.suppress(OSError, ValueError):
                    self.down.send(msg)


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
        self._slots = [_Slot(i) for i in range(config.workers)]
        self._stopping = threading.Event()
        self.last_error = ""

    # -- lifetime

    def start(self) -> None:
        self._stopping.clear()
        for slot in self._slots:
            self._spawn(slot)
            slot.thread = threading.Thread(
                target=self._run, args=(slot,), name=f"mqtt-worker-{slot.index}", daemon=True
            )
            slot.beat.watch(slot.thread)
            slot.thread.start()

    def pids(self) -> list[int]:
        return [s.process.pid for s in self._slots if s.process is not None]

    def _spawn(self, slot: _Slot) -> None:
        """A fresh interpreter (not fork: the gateway has threads; not multiprocessing's spawn,
        which imports the gateway's __main__ again), given its pipes' ends as fds and its
        configuration (password included) through the pipe, never on the command line."""
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(down_r), str(up_w)],
                pass_fds=(down_r, up_w),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            for fd in (down_r, down_w, up_r, up_w):
                os.close(fd)
            raise
        finally:
            os.close(down_r)
            os.close(up_w)
        down = Connection(down_w, readable=False)
        up = Connection(up_r, writable=False)
        with contextlib.suppress(OSError):
            level = logging.getLogger().getEffectiveLevel()  # the gateway's --log-level
            down.send(("init", self.config, self._gateway_id, slot.index, level))
        with slot.lock:
            slot.epoch += 1
            slot.process, slot.down, slot.up = process, down, up
            slot.ok, slot.error = False, "starting"

    def _run(self, slot: _Slot) -> None:
        """Read the worker's batches; start it again if it dies, until it dies too often."""
        deaths: list[float] = []
        while True:
            self._read(slot)
            process = slot.process
            assert process is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
            if self._stopping.is_set():
                return
            slot.ok, slot.error = False, f"worker exited with {process.returncode}"
            self.last_error = f"MQTT worker {slot.index}: {slot.error}"
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < RESTART_WINDOW_S] + [now]
            if len(deaths) > MAX_RESTARTS:
                log.error(
                    "%s; it died %d times in a minute: giving up", self.last_error, MAX_RESTARTS
                )
                return  # the heartbeat of this thread ends the daemon
            log.error(
                "%s; starting it again (its unacked messages are redelivered)", self.last_error
            )
            time.sleep(0.5)
            if self._stopping.is_set():
                return
            self._spawn(slot)

    def _read(self, slot: _Slot) -> None:
        up, epoch = slot.up, slot.epoch
        assert up is not None
        while True:
            try:
                msg = up.recv()
            except (EOFError, OSError):
                return
            if msg[0] == "bye":
                return
            try:
                self._handle(slot, epoch, msg[1])
            except Exception as e:  # unacked: redelivered by the broker
                self._log.warning("handler", "MQTT worker batch not handled: %r", e)

    def _handle(self, slot: _Slot, epoch: int, items: list[tuple[Any, ...]]) -> None:
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

    def _store(self, slot: _Slot, epoch: int, records: list[Record], tokens: list[int]) -> None:
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
        self._stopping.set()
        for slot in self._slots:
            slot.send(slot.epoch, ("stop", drain_timeout, ack_timeout))
        deadline = time.monotonic() + drain_timeout + ack_timeout + 2.0
        for slot in self._slots:
            if slot.process is not None:
                try:
                    slot.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("MQTT worker %d did not stop: killing it", slot.index)
                    slot.process.kill()
                    slot.process.wait()
        for slot in self._slots:
            if slot.thread is not None:
                slot.thread.join(5)
            with slot.lock:
                for conn in (slot.down, slot.up):
                    if conn is not None:
                        conn.close()
                slot.down = slot.up = None
                slot.ok = False

    def health(self) -> Health:
        """Healthy while every worker is alive, connected and subscribed."""
        bad = {
            f"w{s.index}": s.error or "not connected"
            for s in self._slots
            if not (s.ok and s.process is not None and s.process.poll() is None)
        }
        return not bad, (
            {"error": "; ".join(f"{k}: {v}" for k, v in bad.items())} if bad else {"error": ""}
        )

    def heartbeats(self) -> list[Heartbeat]:
        return [s.beat for s in self._slots]


def _main(argv: list[str]) -> None:
    down = Connection(int(argv[1]), writable=False)
    up = Connection(int(argv[2]), readable=False)
    try:
        kind, config, gateway_id, index, level = down.recv()
    except (EOFError, OSError):
        os._exit(0)
    assert kind == "init"
    worker_main(config, gateway_id, index, down, up, level)


if __name__ == "__main__":
    _main(sys.argv)
