"""HTTP ingest in worker processes (``[http] ingest_workers = N``, opt-in).

Each of N processes serves the gateway's HTTP port too (SO_REUSEPORT: the kernel spreads the
connections over the gateway and its workers). A worker answers ``POST /api/readings`` itself: it
reads, authorizes and parses the request (the work that held the GIL) with the same
:class:`HttpIngest` code, then sends the valid readings of a loop pass to the gateway in one
batch over its pipe. The gateway hands them to the one sink (pipeline, then buffer) and, once
they are committed, sends back the answer of each request, which the worker gives. So the
guarantees are the in-process ones: 202 only after the commit, 400 before anything is stored,
503 at ``commit_timeout_s``, seq receipts recalled in the gateway (one buffer knows them all).

Every other request a worker gets (``/health``, ``/metrics``, the calibration API) it passes on
to the gateway's own server over a unix socket, so they are answered where they always were.

A worker that dies takes its connections with it: their requests in progress are not answered,
so the devices retry (a reading sent with its ``seq`` is stored once). It is started again (see
``acquire.workers``); meanwhile the gateway and the other workers take the new connections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
from functools import partial
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from gateway.common.http import HttpConfig, HttpServer
from gateway.common.nometrics import no_metrics
from gateway.common.stage import Health, SinkClosed
from gateway.common.supervise import Heartbeat
from gateway.edge.acquire.http import SOURCE, Answer, Answered, Entry, HttpIngest
from gateway.edge.acquire.workers import Slot, Uplink, WorkerPool, worker_entry, worker_process

if TYPE_CHECKING:  # the workers import no prometheus_client
    from gateway.common.metrics import Metrics

log = logging.getLogger(__name__)

# worker -> gateway: ("m", items); items, each one of
#   ("s", token, entries)      readings of a loop pass; answered ("a", token, answers)
#   ("j", reason)              a reading refused (400), for the gateway's metrics
#   ("h", ok, error)           health: ok once the worker serves the port
# gateway -> worker: ("a", token, answers), ("stop",); the worker answers ("bye",) and exits.


# ---------------------------------------------------------------- in the worker process


class _Remote(Uplink):
    """The worker's ingest ``submit``: a loop pass's entries go to the gateway in one item."""

    def submit(self, entries: list[Entry], answered: Answered) -> None:
        self.put(("s", self.register(answered), entries))

    def answered(self, token: int, answers: list[Answer]) -> None:
        for callback in self.take([token]):
            if callback is not None:
                callback(answers)

    def rejected(self, reason: str) -> None:
        with contextlib.suppress(SinkClosed):  # stopping
            self.put(("j", reason))


def worker_main(
    config: HttpConfig,
    token: str,
    plant_id: str,
    relay_to: str,
    index: int,
    down: Connection,
    up: Connection,
) -> None:
    """A worker process: the HTTP port's ingest, readings to the gateway through ``up``;
    ``down`` brings answers and the stop. Exits when the gateway's end of the pipe closes."""
    worker_process(index, "http")
    remote = _Remote(up)
    metrics = no_metrics()  # the gateway counts what the workers send it and serves /metrics
    server = HttpServer(config, metrics)
    server.reuse_port = True
    server.relay_to = relay_to
    ingest = HttpIngest(config, _no_sink, metrics, plant_id, token, on_rejected=remote.rejected)
    ingest.attach(server, submit=remote.submit)
    server.start()
    remote.health = lambda: (True, "")
    remote.start("http-uplink")
    while True:
        try:
            msg = down.recv()
        except (EOFError, OSError):
            os._exit(0)  # the gateway is gone
        if msg[0] == "a":
            remote.answered(msg[1], msg[2])
        elif msg[0] == "stop":

            def stop() -> None:
                server.stop()  # requests in progress get their answers first
                remote.close()
                remote.send(("bye",))
                os._exit(0)

            threading.Thread(target=stop, daemon=True).start()


def _no_sink(*_: Any, **__: Any) -> None:
    raise AssertionError("an ingest worker hands its readings to the gateway")


# ---------------------------------------------------------------- in the gateway's process


class HttpWorkers:
    """``[http] ingest_workers = N``: N worker processes sharing ``server``'s port, their
    readings committed through ``ingest`` (the gateway's own, on its sink)."""

    def __init__(self, config: HttpConfig, ingest: HttpIngest, metrics: Metrics, token: str):
        self.config = config
        self._ingest = ingest
        self._metrics = metrics
        self._port = 0
        self._relay = ""

        def init(index: int) -> tuple[Any, ...]:
            worker = dataclasses.replace(config, port=self._port)
            return (worker, token, ingest.plant_id, self._relay, index)

        self._pool = WorkerPool(
            "HTTP",
            __name__,
            config.ingest_workers,
            init,
            self._handle,
            lost=" (requests it had in progress are not answered: devices retry them)",
        )

    def start(self, port: int, relay: str) -> None:
        """Start the workers on ``port`` (the gateway's server is bound to it already, with
        SO_REUSEPORT); they pass what is not ingest on to the unix socket ``relay``."""
        self._port, self._relay = port, relay
        self._pool.start()

    def pids(self) -> list[int]:
        return self._pool.pids()

    def _handle(self, slot: Slot, epoch: int, items: list[tuple[Any, ...]]) -> None:
        for item in items:
            kind = item[0]
            if kind == "s":
                _, token, entries = item
                self._ingest.commit(entries, partial(_answer, slot, epoch, token))
            elif kind == "j":
                self._metrics.rejected_payloads.labels(SOURCE, item[1]).inc()
            elif kind == "h":
                slot.ok, slot.error = item[1], item[2]

    def stop(self, timeout: float = 10.0) -> None:
        """Each worker stops serving (its requests in progress answered first), then exits."""
        self._pool.stop(("stop",), timeout)

    def health(self) -> Health:
        """Healthy while every worker is alive and serving."""
        return self._pool.health()

    def heartbeats(self) -> list[Heartbeat]:
        return self._pool.heartbeats()


def _answer(slot: Slot, epoch: int, token: int, answers: list[Answer]) -> None:
    slot.send(epoch, ("a", token, answers))


if __name__ == "__main__":

    def _main(init: tuple[Any, ...], down: Connection, up: Connection) -> None:
        config, token, plant_id, relay_to, index = init
        worker_main(config, token, plant_id, relay_to, index, down, up)

    worker_entry(sys.argv, _main)
