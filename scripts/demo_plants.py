"""Two simulated plants, end to end: per plant six probes on an RS-485 bus, a Modbus TCP flow
meter, an MQTT device, an HTTP-pushing device and an edge gateway; centrally the processor with
InfluxDB, the built-in ML API, and an SMTP server and a webhook receiver for mail and chat. Run
through ``scripts/demo``; the story it plays is in ``scripts/demolib/story.py``.

Everything it starts lives under var/demo/<run>/ and is stopped by pid when it ends (Ctrl-C too).
With --duration it ends by itself; either way it prints a summary read back from Kafka, InfluxDB
and the receivers, and exits non-zero unless every reading produced was stored and the story
happened.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.support and scripts.demolib

from scripts.demolib import inbox  # noqa: E402
from scripts.demolib.configs import (  # noqa: E402
    DASHBOARD_TOKEN_VAR,
    HTTP_TOKEN_VAR,
    SMTP_PASSWORD_VAR,
    WEBHOOK_SECRET_VAR,
    gateway_toml,
    notifier_present,
    notify_toml,
    processor_toml,
)
from scripts.demolib.devices import HttpDevice, MqttDevice  # noqa: E402
from scripts.demolib.procs import EXE, Procs  # noqa: E402
from scripts.demolib.readback import Influx, collapse, end_offsets, kafka_seqs  # noqa: E402
from scripts.demolib.story import OUTAGE, PLANT_A, PLANT_B, PLANTS, STORY_END  # noqa: E402
from scripts.demolib.view import Snapshot, View  # noqa: E402
from scripts.demolib.watch import (  # noqa: E402
    GatewayStats,
    PlantState,
    TopicWatcher,
    poll_gateway,
    start_group_at_end,
)
from tests.support.net import TcpRelay, free_port  # noqa: E402
from tests.support.services import read_env  # noqa: E402
from tests.support.wait import wait_until  # noqa: E402


class Demo:
    def __init__(self, env: dict[str, str], run_id: str) -> None:
        self.run_id = run_id
        self.dir = ROOT / "var" / "demo" / run_id
        self.dir.mkdir(parents=True)
        self.http_token, self.dashboard_token = secrets.token_hex(8), secrets.token_hex(12)
        smtp_password, webhook_secret = inbox.secrets()
        self.env = {
            **env,
            HTTP_TOKEN_VAR: self.http_token,
            DASHBOARD_TOKEN_VAR: self.dashboard_token,
            SMTP_PASSWORD_VAR: smtp_password,
            WEBHOOK_SECRET_VAR: webhook_secret,
        }
        self.procs = Procs(self.dir, self.env, ROOT)
        self.ports = {n: free_port() for n in ("processor", "ml", "smtp", "sms", "webhook")}
        self.gw_ports = {p: {"http": free_port(), "flow": free_port()} for p in PLANTS}
        self.gateway_ids = {p: f"demo-{p}-{run_id}" for p in PLANTS}
        self.certs, self.receivers_log = self.dir / "receivers-certs", self.dir / "receivers.log"
        self.relay: TcpRelay | None = None
        self.start_offsets = {
            p: end_offsets(env["KAFKA_BOOTSTRAP_SERVERS"], f"sensors.raw.{p}") for p in PLANTS
        }
        self.story_start = 0.0

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['processor']}/#token={self.dashboard_token}"

    def start_central(self) -> None:
        py = sys.executable
        self.procs.spawn("receivers", *inbox.command(py, self.ports, self.certs))
        wait_until(lambda: inbox.ready(self.receivers_log), 60, "the receivers")
        self.procs.spawn("ml", *EXE, "ml", "serve", "--port", str(self.ports["ml"]))
        cfg, group = self.dir / "processor.toml", f"demo-{self.run_id}"
        cfg.write_text(
            processor_toml(
                self.env, self.ports["processor"], self.ports["ml"], group,
                notify_toml(
                    self.ports["smtp"], self.ports["webhook"], inbox.smtp_ca(self.certs),
                    self.dir / "alerts.db",
                ),
            )
        )  # fmt: skip
        setup = subprocess.run(
            [*EXE, "processor", "setup-influx", "--config", str(cfg)],
            env={**os.environ, **self.env}, capture_output=True, text=True, cwd=self.dir,
        )  # fmt: skip
        if setup.returncode != 0:
            raise SystemExit(f"setup-influx failed:\n{setup.stdout}{setup.stderr}")
        # The run's processor and notifier start after what earlier runs left on the topics.
        kafka = self.env["KAFKA_BOOTSTRAP_SERVERS"]
        start_group_at_end(kafka, group, tuple(f"sensors.raw.{p}" for p in PLANTS))
        start_group_at_end(kafka, f"{group}-alerts", ("sensors.alerts",))
        self.procs.spawn("processor", *EXE, "processor", "run", "--config", str(cfg))

    def start_plant(self, plant: str) -> None:
        pdir = self.dir / plant
        pdir.mkdir()
        kafka = self.env["KAFKA_BOOTSTRAP_SERVERS"]
        if plant == PLANT_B:  # through a link the story cuts
            host, _, port = self.env["KAFKA_RELAYED_LISTENER"].rpartition(":")
            listen = int(self.env["KAFKA_RELAYED_BOOTSTRAP_SERVERS"].rpartition(":")[2])
            self.relay = TcpRelay(host, int(port), listen=listen)
            kafka = self.env["KAFKA_RELAYED_BOOTSTRAP_SERVERS"]
        ports = self.gw_ports[plant]
        cfg = pdir / "gateway.toml"
        cfg.write_text(gateway_toml(plant, self.gateway_ids[plant], pdir, self.env, kafka, ports))
        self.procs.spawn(
            f"{plant}-socat", "socat", f"pty,raw,echo=0,link={pdir / 'tty-gateway'}",
            f"pty,raw,echo=0,link={pdir / 'tty-probes'}",
        )  # fmt: skip
        wait_until(lambda: (pdir / "tty-probes").exists(), 10, "socat pty pair")
        probes = [
            sys.executable, str(ROOT / "scripts" / "demolib" / "probes.py"),
            "--port", str(pdir / "tty-probes"), "--tcp", f"127.0.0.1:{ports['flow']}",
            "--story-start", str(self.story_start),
        ]  # fmt: skip
        self.procs.spawn(f"{plant}-probes", *probes, *(["--polluted"] if plant == PLANT_A else []))
        self.procs.spawn(f"{plant}-gateway", *EXE, "run", "--config", str(cfg), cwd=pdir)

    def wait_gateways(self) -> None:
        for p in PLANTS:
            port = self.gw_ports[p]["http"]
            wait_until(lambda port=port: poll_gateway(port, GatewayStats()).status != "down", 60,
                       f"gateway {p}")  # fmt: skip

    def buffer_left(self, plant: str) -> int:
        with sqlite3.connect(self.dir / plant / "buffer.db") as db:
            return int(db.execute("SELECT count(*) FROM records").fetchone()[0])


def run(args: argparse.Namespace) -> int:
    env = read_env()
    demo = Demo(env, time.strftime("%Y%m%d-%H%M%S"))
    interrupted = False

    def on_signal(*_: object) -> None:
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    notifier = notifier_present()
    devices: list[MqttDevice | HttpDevice] = []
    watcher: TopicWatcher | None = None
    stats = {p: GatewayStats() for p in PLANTS}
    story: list[str] = []
    outage_done = shot = False
    print(f"two plants ({', '.join(PLANTS)}); logs in {demo.dir}", flush=True)
    try:
        demo.start_central()
        watcher = TopicWatcher(env["KAFKA_BOOTSTRAP_SERVERS"], PLANTS)
        watcher.start()
        demo.story_start = time.time()
        for p in PLANTS:
            demo.start_plant(p)
        demo.wait_gateways()
        for p in PLANTS:
            devices.append(MqttDevice(env, p))
            devices.append(HttpDevice(p, demo.gw_ports[p]["http"], demo.http_token))
        for d in devices:
            d.start()
        print(f"dashboard: {demo.dashboard}", flush=True)
        end = demo.story_start + args.duration if args.duration else float("inf")
        with View(every=args.every) as view:
            while not interrupted and time.time() < end:
                t = time.time() - demo.story_start
                if (
                    demo.relay is not None
                    and OUTAGE[0] <= t < OUTAGE[1]
                    and not demo.relay.refusing
                ):
                    demo.relay.down()
                    story.append(
                        f"t+{t:.0f}s {PLANT_B}: link to Kafka cut for {OUTAGE[1] - OUTAGE[0]:.0f} s"
                    )
                elif demo.relay is not None and t >= OUTAGE[1] and demo.relay.refusing:
                    demo.relay.up()
                    outage_done = True
                    story.append(f"t+{t:.0f}s {PLANT_B}: link back, buffer draining")
                for p in PLANTS:
                    stats[p] = poll_gateway(demo.gw_ports[p]["http"], stats[p])
                mails, hooks = inbox.counts(demo.receivers_log)
                with watcher.lock:
                    narrate(story, t, watcher.state[PLANT_A], mails, hooks)
                    snap = Snapshot(
                        t, watcher.state, stats, mails, hooks, notifier,
                        demo.dashboard, story,
                    )  # fmt: skip
                    view.update(snap)
                if args.screenshots and not shot and t >= args.shot_at:
                    shot = True
                    with watcher.lock:
                        take_screenshots(args.screenshots, snap, demo.dashboard)
                time.sleep(1.0)
        if demo.relay is not None:
            demo.relay.up()
        print("stopping the devices, then the gateways (they forward what they hold)", flush=True)
        for d in devices:
            d.stopped.set()
        for d in devices:
            d.join(15)
        for p in PLANTS:
            demo.procs.stop(f"{p}-probes")
        rc = {p: demo.procs.stop(f"{p}-gateway", 60) for p in PLANTS}
        return summary(demo, env, devices, stats, rc, outage_done, notifier)
    finally:
        for d in devices:
            d.stopped.set()
        if watcher is not None:
            watcher.stopped.set()
        demo.procs.stop_all()
        if demo.relay is not None:
            demo.relay.close()
        if interrupted:
            print("stopped on request", flush=True)


def summary(
    demo: Demo,
    env: dict[str, str],
    devices: list[MqttDevice | HttpDevice],
    stats: dict[str, GatewayStats],
    rc: dict[str, int | None],
    outage_done: bool,
    notifier: bool,
) -> int:
    influx = Influx(env, demo.story_start - 30)
    ok = True
    lines = ["", "== summary (read back from Kafka, InfluxDB and the receivers)"]
    for p in PLANTS:
        seqs = kafka_seqs(env["KAFKA_BOOTSTRAP_SERVERS"], f"sensors.raw.{p}",
                          demo.gateway_ids[p], demo.start_offsets[p])  # fmt: skip
        produced, left = len(set(seqs)), demo.buffer_left(p)
        stored, deadline = 0, time.monotonic() + 90
        while time.monotonic() < deadline:  # the processor catches up
            stored = influx.stored(p)
            if stored >= produced:
                break
            time.sleep(2)
        alerts, preds = influx.alerts(p), influx.predictions(p)
        mq = next(d for d in devices if isinstance(d, MqttDevice) and p in d.topic)
        ht = next(d for d in devices if isinstance(d, HttpDevice) and d.plant == p)
        lines += [
            f"plant {p} (gateway {demo.gateway_ids[p]}, exit code {rc[p]})",
            f"  readings produced   {produced} (in Kafka; {left} left in the buffer)",
            f"  readings stored     {stored} (InfluxDB water_quality)",
            f"  MQTT / HTTP acked   {mq.acked} of {mq.sent} / {ht.acked} of {ht.sent}",
            f"  buffer peak         {stats[p].max_buffered} readings",
            "  alerts raised       "
            + (", ".join(f"{n} {lvl}" for lvl, n in sorted(alerts.items())) or "none"),
            f"  predictions         {len(preds)}: {' -> '.join(collapse(preds)) or '-'}",
        ]
        ok &= produced > 0 and left == 0 and stored == produced
    mails, hooks = inbox.counts(demo.receivers_log)
    lines.append(
        f"notifications       {mails} emails, {hooks} webhook calls"
        + ("" if notifier else " (the processor has no notifier yet: not required)")
    )
    a, b = PLANT_A, PLANT_B
    alerts_a = influx.alerts(a)
    checks = {
        f"{a}: warning then critical alarm": alerts_a["warning"] >= 1 and alerts_a["critical"] >= 1,
        f"{a}: prediction changed class": len(collapse(influx.predictions(a))) >= 2,
        f"{b}: Kafka outage filled the buffer": outage_done and stats[b].max_buffered > 0,
    }
    if notifier:
        checks[f"{a}: email received"] = mails >= 1
        checks[f"{a}: webhook received"] = hooks >= 1
    story_due = time.time() - demo.story_start >= STORY_END  # an early Ctrl-C cut it short
    for what, passed in checks.items():
        lines.append(f"  {'ok  ' if passed else 'MISSING'} {what}")
        ok &= passed or not story_due
    lines.append(
        "result              " + ("OK: stored == produced, the story happened" if ok else "FAILED")
    )
    print("\n".join(lines), flush=True)
    return 0 if ok else 1


def narrate(story: list[str], t: float, st: PlantState, mails: int, hooks: int) -> None:
    """Adds each of plant A's story events once, as it is first seen."""
    raised = [e for e in st.events.values() if e.get("state") != "cleared"]
    events = {
        "warning": next((e for e in raised if e["level"] == "warning"), None),
        "critical": next((e for e in raised if e["level"] == "critical"), None),
    }
    lines = [
        f"{PLANT_A}: {lvl} alarm, {e['parameter']} at {e['sensorId']}"
        for lvl, e in events.items()
        if e is not None
    ]
    if mails:
        lines.append(f"{PLANT_A}: email received")
    if hooks:
        lines.append(f"{PLANT_A}: webhook received")
    if len(st.classes()) > 1:
        lines.append(f"{PLANT_A}: prediction {st.classes()[0]} -> {st.classes()[1]}")
    for line in lines:
        if not any(told.endswith(line) for told in story):
            story.append(f"t+{t:.0f}s {line}")


def take_screenshots(where: Path, snap: Snapshot, dashboard: str) -> None:
    from scripts.demolib.screens import dashboard_png, terminal_png

    where.mkdir(parents=True, exist_ok=True)
    terminal_png(snap, where / "demo-terminal.png")
    dashboard_png(dashboard, where / "demo-dashboard.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=0, help="seconds; 0 runs until Ctrl-C")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between plain status lines")
    ap.add_argument("--screenshots", type=Path, help="save the README's screenshots here")
    ap.add_argument("--shot-at", type=float, default=110.0, help="seconds in for --screenshots")
    return run(ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
