"""Worker processes of a source (``[mqtt] workers``, ``[http] ingest_workers``): the channel and
the supervision they share.

Each worker is a fresh interpreter (``python -m <module> <down fd> <up fd>``) with two pipes to
the gateway's process: ``down`` brings it ``("init", level, *args)`` first (the gateway's log
level, its configuration, secrets included, never on the command line), then what its kind
defines, and ``("stop", *args)``;
``up`` carries ``("m", items)`` batches, sent by one thread of the worker (:class:`Uplink`), and
``("bye",)`` before it exits. In the gateway, :class:`WorkerPool` reads each worker on a thread
of its own, hands each batch to the kind's handler, and starts a worker that dies again; one that
keeps dying (``MAX_RESTARTS`` within ``RESTART_WINDOW_S``) ends its thread, whose heartbeat then
ends the daemon (systemd restarts it). Workers die with the gateway: PR_SET_PDEATHSIG (Linux) and
the end of the pipe from the gateway.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from gateway.common.logs import RateLimitedLog
from gateway.common.stage import Health, SinkClosed
from gateway.common.supervise import Heartbeat

log = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
HEALTH_INTERVAL_S = 0.5

Item = tuple[Any, ...]


# ---------------------------------------------------------------- in the worker process


class Uplink:
    """The worker's side of the pipe: items are queued in order and sent in batches by one
    thread (``send_loop``); a change of ``health()`` goes with them as ``("h", ok, error)``.
    Tokens name what the gateway answers later (``settle``)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._items: list[Item] = []
        self._token = 0
        self._callbacks: dict[int, Callable[..., object]] = {}  # token -> what runs when settled
        self._closed = False
        self.health: Callable[[], tuple[bool, str]] = lambda: (False, "")

    def put(self, item: Item) -> None:
        with self._cond:
            if self._closed:
                raise SinkClosed("the worker is stopping")
            self._items.append(item)
            if len(self._items) == 1:
                self._cond.notify()

    def register(self, on_settled: Callable[..., object] | None) -> int:
        with self._cond:
            self._token += 1
            token = self._token
            if on_settled is not None:
                self._callbacks[token] = on_settled
        return token

    def take(self, tokens: list[int]) -> list[Callable[..., object] | None]:
        """The callbacks of ``tokens``, forgotten here."""
        with self._cond:
            return [self._callbacks.pop(t, None) for t in tokens]

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

    def start(self, name: str) -> None:
        threading.Thread(target=self.send_loop, name=name, daemon=True).start()

    def send(self, msg: Item) -> None:
        """One sender at a time: a message is written in more than one piece."""
        with self._send_lock:
            try:
                self._conn.send(msg)
            except OSError:
                os._exit(0)  # the gateway is gone

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def worker_process(index: int, name: str) -> None:
    """What every worker does first: die with the gateway, leave signals to it (it stops its
    workers itself, in order: a stop from systemd reaches the whole control group, a Ctrl-C the
    whole process group), log under its name (at the gateway's level, set by worker_entry)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(format=f"{name}-w{index} %(levelname)s %(message)s")


def worker_entry(argv: list[str], main: Callable[[Item, Connection, Connection], None]) -> None:
    """A worker's ``__main__``: its pipes from ``argv``, then ``main(init, down, up)`` with the
    ``("init", ...)`` message's arguments."""
    down = Connection(int(argv[1]), writable=False)
    up = Connection(int(argv[2]), readable=False)
    try:
        kind, level, *init = down.recv()
    except (EOFError, OSError):
        os._exit(0)
    assert kind == "init"
    logging.getLogger().setLevel(level)  # the gateway's --log-level: it shares our stderr
    main(tuple(init), down, up)


# ---------------------------------------------------------------- in the gateway's process


class Slot:
    """One worker: its process, pipe ends and the thread that reads from it (and restarts it)."""

    def __init__(self, index: int, what: str) -> None:
        self.index = index
        self.process: subprocess.Popen[bytes] | None = None
        self.down: Connection | None = None  # to the worker
        self.up: Connection | None = None  # from the worker
        self.lock = threading.Lock()  # one sender on ``down`` at a time
        self.epoch = 0  # which process of this slot a callback belongs to
        self.ok = False
        self.error = "starting"
        self.thread: threading.Thread | None = None
        self.beat = Heartbeat(f"{what} worker {index}", progress=False)

    def send(self, epoch: int, msg: Item) -> None:
        """To the worker, if it is still the process ``epoch`` (a restarted one knows nothing
        of what the dead one sent)."""
        with self.lock:
            if epoch == self.epoch and self.down is not None:
                with contextlib.suppress(OSError, ValueError):
                    self.down.send(msg)


Handler = Callable[[Slot, int, list[Item]], None]


class WorkerPool:
    """``count`` workers running ``module``; ``init(index)`` is each one's init message's
    arguments, ``handle(slot, epoch, items)`` takes each batch it sends (a raise is logged, the
    worker goes on). ``what`` names them in logs and health; ``lost`` says in the log what
    becomes of a dead worker's work."""

    def __init__(
        self,
        what: str,
        module: str,
        count: int,
        init: Callable[[int], Item],
        handle: Handler,
        *,
        lost: str = "",
    ) -> None:
        self._what = what
        self._module = module
        self._init = init
        self._handle = handle
        self._lost = lost
        self.slots = [Slot(i, what) for i in range(count)]
        self._stopping = threading.Event()
        self._log = RateLimitedLog(log, 10.0)
        self.last_error = ""

    def start(self) -> None:
        self._stopping.clear()
        for slot in self.slots:
            self._spawn(slot)
            name = f"{self._what.lower()}-worker-{slot.index}"
            slot.thread = threading.Thread(target=self._run, args=(slot,), name=name, daemon=True)
            slot.beat.watch(slot.thread)
            slot.thread.start()

    def pids(self) -> list[int]:
        return [s.process.pid for s in self.slots if s.process is not None]

    def _spawn(self, slot: Slot) -> None:
        """A fresh interpreter (not fork: the gateway has threads; not multiprocessing's spawn,
        which imports the gateway's __main__ again), given its pipes' ends as fds."""
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", self._module, str(down_r), str(up_w)],
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
            level = logging.getLogger().getEffectiveLevel()
            down.send(("init", level, *self._init(slot.index)))
        with slot.lock:
            slot.epoch += 1
            slot.process, slot.down, slot.up = process, down, up
            slot.ok, slot.error = False, "starting"

    def _run(self, slot: Slot) -> None:
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
            self.last_error = f"{self._what} worker {slot.index}: {slot.error}"
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < RESTART_WINDOW_S] + [now]
            if len(deaths) > MAX_RESTARTS:
                log.error(
                    "%s; it died %d times in a minute: giving up", self.last_error, MAX_RESTARTS
                )
                return  # the heartbeat of this thread ends the daemon
            log.error("%s; starting it again%s", self.last_error, self._lost)
            time.sleep(0.5)
            if self._stopping.is_set():
                return
            self._spawn(slot)

    def _read(self, slot: Slot) -> None:
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
            except Exception as e:
                self._log.warning("handler", "%s worker batch not handled: %r", self._what, e)

    def stop(self, message: Item, timeout: float) -> None:
        """Send each worker ``message`` (its stop), wait up to ``timeout`` for them to exit,
        then kill any still there. The reading threads go on handling batches meanwhile."""
        self._stopping.set()
        for slot in self.slots:
            slot.send(slot.epoch, message)
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            if slot.process is not None:
                try:
                    slot.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s worker %d did not stop: killing it", self._what, slot.index)
                    slot.process.kill()
                    slot.process.wait()
        for slot in self.slots:
            if slot.thread is not None:
                slot.thread.join(5)
            with slot.lock:
                for conn in (slot.down, slot.up):
                    if conn is not None:
                        conn.close()
                slot.down = slot.up = None
                slot.ok = False

    def health(self) -> Health:
        """Healthy while every worker is alive and says it is."""
        bad = {
            f"w{s.index}": s.error or "not ready"
            for s in self.slots
            if not (s.ok and s.process is not None and s.process.poll() is None)
        }
        return not bad, (
            {"error": "; ".join(f"{k}: {v}" for k, v in bad.items())} if bad else {"error": ""}
        )

    def heartbeats(self) -> list[Heartbeat]:
        return [s.beat for s in self.slots]
