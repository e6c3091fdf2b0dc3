"""Both daemons speak systemd's notify protocol to a socket the test listens on, and the watchdog
pings stop when a stage thread is wedged; a dead stage thread ends the daemon."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.common.notify import Notifier
from gateway.common.supervise import StageDied, Supervisor
from gateway.edge.daemon import GatewayDaemon
from gateway.edge.settings import load_gateway_config
from tests.support.gateway_harness import (
    Gateway,
    GatewaySetup,
    KafkaCollector,
    Publisher,
    Simulator,
)
from tests.support.net import free_port
from tests.support.notify import NotifyListener
from tests.support.processor_harness import Processor, make_dataset
from tests.support.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

UNREACHABLE_KAFKA = "127.0.0.1:1"
WATCHDOG_USEC = "2000000"  # WatchdogSec=2: a ping every second


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    sock = NotifyListener(tmp_path / "notify.sock")
    yield sock
    sock.close()


def after(fields: list[str], first: str, then: str) -> bool:
    """``then`` comes somewhere after ``first``."""
    return first in fields and then in fields[fields.index(first) + 1 :]


def test_the_gateway_tells_systemd_ready_watchdog_status_reload_and_stopping(
    kafka_env: dict[str, str], pty_pair: Any, tmp_path: Path, listener: NotifyListener
) -> None:
    setup = GatewaySetup(tmp_path, kafka_env["KAFKA_BOOTSTRAP_SERVERS"], pty=pty_pair.a)
    env = {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": WATCHDOG_USEC}
    gw = Gateway(setup.write(), tmp_path / "logs", env=env)
    with Simulator(pty_pair.b, setup.probes):
        try:
            gw.start()
            wait_until(lambda: "READY=1" in listener.fields(), 60, "READY=1")
            ready_at = time.monotonic()
            wait_until(lambda: listener.count("WATCHDOG=1", ready_at) >= 3, 20, "watchdog pings")
            status = wait_until(
                lambda: [s for s in listener.statuses(ready_at) if "probes silent 0/3" in s],
                30,
                "a status line with every probe answering",
            )[-1]
            assert "readings/s" in status and "buffer" in status and "Kafka ok" in status

            hup_at = time.monotonic()
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGHUP)
            wait_until(
                lambda: after(listener.fields(hup_at), "RELOADING=1", "READY=1"),
                60,
                "RELOADING=1 then READY=1",
            )
            assert any(f.startswith("MONOTONIC_USEC=") for f in listener.fields(hup_at))
            wait_until(lambda: listener.count("WATCHDOG=1", hup_at) >= 2, 20, "pings go on")

            stop_at = time.monotonic()
            assert gw.terminate() == 0
            assert "STOPPING=1" in listener.fields(stop_at)
        finally:
            gw.close()


def test_the_processor_tells_systemd_ready_watchdog_status_and_stopping(
    kafka_env: dict[str, str], influx_env: dict[str, str], tmp_path: Path, listener: NotifyListener
) -> None:
    processor = Processor(make_dataset(total=200), kafka_env, influx_env, tmp_path)
    processor.http_port = free_port()
    env = {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": WATCHDOG_USEC}
    try:
        proc = processor.start(env=env)
        wait_until(lambda: "READY=1" in listener.fields(), 60, "READY=1")
        ready_at = time.monotonic()
        wait_until(lambda: listener.count("WATCHDOG=1", ready_at) >= 3, 20, "watchdog pings")
        status = listener.statuses(ready_at)[-1]
        assert "readings/s" in status and "open windows" in status

        hup_at = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: after(listener.fields(hup_at), "RELOADING=1", "READY=1"), 20, "reload answer"
        )
        assert proc.poll() is None, "SIGHUP must not stop the processor"

        stop_at = time.monotonic()
        proc.terminate()
        assert proc.wait(60) == 0, processor.logs()
        assert "STOPPING=1" in listener.fields(stop_at)
    finally:
        processor.stop_all()


def test_sighup_with_a_changed_threshold_changes_the_next_alarm_and_loses_nothing(
    kafka_env: dict[str, str], mqtt_env: dict[str, str], tmp_path: Path, listener: NotifyListener
) -> None:
    def limits(high_warning: float) -> dict[str, Any]:
        cod = {"high_warning": high_warning, "high_critical": 5000.0}
        return {"alarms": {"on_delay": 0.0, "thresholds": {"COD": cod}}}

    setup = GatewaySetup(
        tmp_path, kafka_env["KAFKA_BOOTSTRAP_SERVERS"], mqtt=mqtt_env, extra=limits(500.0)
    )
    env = {"NOTIFY_SOCKET": listener.path, "MQTT_PASSWORD": mqtt_env["MQTT_PASSWORD"]}
    gw = Gateway(setup.write(), tmp_path / "logs", env=env)
    topic = setup.number_topic("cod-1", "COD")
    publisher = Publisher(mqtt_env)
    with KafkaCollector(setup.kafka, [setup.raw_topic, "sensors.alerts"]) as kafka:
        try:
            gw.start()
            wait_until(lambda: "READY=1" in listener.fields(), 60, "READY=1")
            for i in range(5):
                publisher.publish(topic, b"300", ("before", i))
            publisher.wait_all_acknowledged()
            wait_until(lambda: len(kafka.snapshot(setup.raw_topic)) >= 5, 60, "5 readings")

            setup.extra = limits(200.0)
            setup.write()
            hup_at = time.monotonic()
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGHUP)
            wait_until(
                lambda: after(listener.fields(hup_at), "RELOADING=1", "READY=1"), 60, "reload"
            )
            for i in range(5):
                publisher.publish(topic, b"300", ("after", i))
            publisher.wait_all_acknowledged()
            wait_until(lambda: len(kafka.snapshot(setup.raw_topic)) >= 10, 60, "10 readings")
            raised = wait_until(
                lambda: [
                    m.value
                    for m in kafka.snapshot("sensors.alerts")
                    if m.value.get("sensorId") == "cod-1" and m.value.get("state") == "raised"
                ],
                30,
                "the alarm after the reload",
            )
            time.sleep(2)  # nothing more is coming
            readings = kafka.snapshot(setup.raw_topic)
        finally:
            publisher.close()
            gw.close()
    assert len(readings) == 10, "every reading across the reload, once"
    assert [r.value["value"] for r in readings] == [300.0] * 10
    assert [(a["condition"], a["threshold"]) for a in raised] == [("H", 200.0)], (
        "300 mg/L is below the old warning limit (500) and above the new one (200)"
    )


# -- supervision, in process: the same daemon and supervisor, with one stage made to hang ---------


@pytest.fixture
def daemon(pty_pair: Any, tmp_path: Path) -> Iterator[GatewayDaemon]:
    """A gateway polling three simulated probes, with Kafka unreachable (rows stay buffered)."""
    setup = GatewaySetup(tmp_path, UNREACHABLE_KAFKA, pty=pty_pair.a)
    with Simulator(pty_pair.b, setup.probes):
        d = GatewayDaemon(load_gateway_config(setup.write()))
        d.start()
        try:
            wait_until(lambda: d.intake.received > 0, 30, "readings from the probes")
            yield d
        finally:
            d.stop()


def supervise(d: GatewayDaemon, listener: NotifyListener) -> Supervisor:
    return Supervisor(d.heartbeats, d.status, Notifier(listener.path), watchdog=2.0)


def pings_while(sup: Supervisor, listener: NotifyListener, seconds: float) -> tuple[int, float]:
    """Tick like the daemon's loop for ``seconds``; (pings sent, when it started)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        sup.tick()
        time.sleep(sup.interval)
    time.sleep(0.2)  # the last datagrams arrive
    return listener.count("WATCHDOG=1", start), start


def test_a_wedged_poll_loop_stops_the_watchdog_pings(
    daemon: GatewayDaemon, listener: NotifyListener
) -> None:
    sup = supervise(daemon, listener)
    pings, _ = pings_while(sup, listener, 3)
    assert pings >= 2, "a healthy gateway pings"

    release = threading.Event()
    worker = next(iter(daemon.modbus.workers.values()))
    original = worker._poll
    worker._poll = lambda dev: release.wait(120)  # type: ignore[method-assign]
    try:
        time.sleep(sup.stall_limit + 2)  # the loop is stuck in a poll now
        pings, since = pings_while(sup, listener, 3 * sup.interval)
        assert pings == 0, "a wedged poll loop must stop the pings"
        assert any("poll loop silent" in s for s in listener.statuses(since))
    finally:
        worker._poll = original  # type: ignore[method-assign]
        release.set()
    wait_until(lambda: sup.look().ok, 10, "the poll loop to move again")
    pings, _ = pings_while(sup, listener, 3)
    assert pings >= 2, "pings resume once the loop makes progress"


def test_a_stuck_buffer_writer_stops_the_watchdog_pings(
    daemon: GatewayDaemon, listener: NotifyListener
) -> None:
    sup = supervise(daemon, listener)
    release = threading.Event()
    buffer = daemon.buffer
    original = buffer._commit

    def stuck_commit(*args: Any) -> None:
        release.wait(120)  # as a commit blocked on a dead SD card would
        original(*args)

    buffer._commit = stuck_commit  # type: ignore[method-assign]
    try:
        time.sleep(sup.stall_limit + 2)  # probes keep submitting: the writer is inside a commit
        pings, since = pings_while(sup, listener, 3 * sup.interval)
        assert pings == 0, "a stuck buffer writer must stop the pings"
        assert any("buffer writer silent" in s for s in listener.statuses(since))
    finally:
        buffer._commit = original  # type: ignore[method-assign]
        release.set()
    wait_until(lambda: sup.look().ok, 10, "the writer to move again")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_stage_thread_ends_the_daemon(
    daemon: GatewayDaemon, listener: NotifyListener
) -> None:
    sup = supervise(daemon, listener)
    sup.tick()

    def broken(*_: Any) -> None:
        raise RuntimeError("simulated bug in the forwarder")

    daemon.forwarder._settle = broken  # type: ignore[method-assign]
    wait_until(lambda: daemon.forwarder.heartbeats()[0].dead(), 10, "the forwarder thread to die")
    died_at = time.monotonic()
    with pytest.raises(StageDied, match="kafka forwarder"):
        sup.tick()
    time.sleep(0.2)  # the datagram arrives
    assert listener.count("WATCHDOG=1", died_at) == 0, "no ping once a stage has died"
    assert any("kafka forwarder died" in s for s in listener.statuses(died_at))
