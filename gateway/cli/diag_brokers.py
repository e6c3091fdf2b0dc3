"""``edge-gateway diag mqtt|kafka|influx``: can the configured broker be reached, does it take the
credentials, may we use its topics / bucket? Each failure is named (refused, dns, tls, auth, acl,
missing, timeout) with what to do about it.

Exit codes: 0 every check passed, 1 a check failed (named, with the fix), 2 bad config.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gateway.cli import stores
from gateway.common.config import ConfigError

FIXES = {
    "refused": "nothing listens there: check host and port in the config, that the broker runs "
    "(systemctl status), and firewalls between",
    "dns": "the host name does not resolve: check its spelling, /etc/hosts or the DNS server",
    "tls": "the server's certificate is not trusted or does not match the host name: point the "
    "CA setting (ca_file / ssl_ca_location) at the CA that signed it, and use the name in it",
    "auth": "the broker refused the credentials: check the user name and the password reference "
    "(env:/file:/cred:) and what it holds",
    "acl": "the user may not use this topic or bucket: grant it in the broker's ACLs / the "
    "token's permissions",
    "missing": "it does not exist: create it (scripts/services or the broker's admin tools) or "
    "fix its name in the config",
    "timeout": "no answer in time: a firewall dropping packets, a wrong port (e.g. TLS vs plain), "
    "or an overloaded broker",
    "error": "see the detail",
}


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    kind: str = "ok"
    detail: str = ""

    @property
    def fix(self) -> str:
        return "" if self.ok else FIXES.get(self.kind, FIXES["error"])


def classify(error: BaseException | str) -> str:
    """The kind of a connection failure, from the exception or a client library's message."""
    if isinstance(error, socket.gaierror):
        return "dns"
    if isinstance(error, ssl.SSLError | ssl.CertificateError):
        return "tls"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, TimeoutError | socket.timeout):
        return "timeout"
    text = str(error).lower()
    rules = (
        ("dns", ("resolve", "name or service not known", "nodename", "getaddrinfo")),
        ("auth", ("authentication", "unauthorized", "bad user name", "401")),
        ("tls", ("certificate", "ssl handshake", "handshake", "tls")),
        ("acl", ("not authorized", "authorization", "forbidden", "403")),
        ("refused", ("refused", "connect failed", "errno 111")),
        ("missing", ("unknown topic", "not found", "does not exist", "404")),
        ("timeout", ("timed out", "timeout")),
    )
    return next((kind for kind, needles in rules if any(n in text for n in needles)), "error")


def tcp_probe(address: str, timeout: float) -> BaseException | None:
    """Why a TCP connection to ``host:port`` fails (DNS, refused, timeout), or None if it opens."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        return e
    return None


def _report(checks: list[Check], as_json: bool, title: str) -> None:
    if as_json:
        typer.echo(json.dumps([{**asdict(c), "fix": c.fix} for c in checks]))
    else:
        table = Table("check", "result", "detail", "fix", title=title)
        for c in checks:
            table.add_row(c.what, "ok" if c.ok else c.kind.upper(), c.detail[:120], c.fix)
        Console().print(table)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


JsonOut = Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")]
Timeout = Annotated[float, typer.Option(help="Seconds to wait for the broker.")]


# --- MQTT ----------------------------------------------------------------------------------------


def mqtt_checks(cfg: Any, timeout: float) -> list[Check]:
    import paho.mqtt.client as mqtt

    where = f"{cfg.host}:{cfg.port}"
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"diag-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password or None)
    if cfg.tls:
        client.tls_set(ca_certs=cfg.ca_file or None, cert_reqs=ssl.CERT_REQUIRED)
    connected, subscribed = threading.Event(), threading.Event()
    answer: dict[str, Any] = {}

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        answer["connack"] = rc
        connected.set()

    def on_subscribe(_c: Any, _u: Any, _mid: int, codes: Any, _p: Any = None) -> None:
        answer["suback"] = codes
        subscribed.set()

    client.on_connect, client.on_subscribe = on_connect, on_subscribe
    try:
        client.connect(cfg.host, cfg.port, keepalive=10)
    except Exception as e:  # socket, DNS, TLS: all are the answer we report
        return [Check(f"connect {where}", False, classify(e), str(e))]
    client.loop_start()
    try:
        if not connected.wait(timeout):
            return [Check(f"connect {where}", False, "timeout", "no CONNACK")]
        rc = answer["connack"]
        if rc.is_failure:
            kind = "auth" if rc.value in (134, 135, 4, 5) else "error"
            return [Check(f"connect {where}", False, kind, str(rc))]
        checks = [Check(f"connect {where}", True, detail=f"as {cfg.username or 'anonymous'}")]
        for sub in cfg.subscriptions:
            subscribed.clear()
            client.subscribe(sub.topic, qos=1)
            if not subscribed.wait(timeout):
                checks.append(Check(f"subscribe {sub.topic}", False, "timeout", "no SUBACK"))
                continue
            code = answer["suback"][0]
            ok = not code.is_failure
            checks.append(Check(f"subscribe {sub.topic}", ok, "ok" if ok else "acl", str(code)))
        return checks
    finally:
        client.disconnect()
        client.loop_stop()


def mqtt(
    config: stores.Config = Path("config.toml"),
    timeout: Timeout = 10.0,
    as_json: JsonOut = False,
) -> None:
    """Connect to the [mqtt] broker with its credentials and subscribe to each subscription.

    Exit codes: 0 every check passed, 1 a check failed (named, with the fix), 2 bad config.
    """
    cfg = stores.load(config)
    try:
        # an enabled source has its password resolved already; a disabled one is checked too
        mcfg = (
            cfg.mqtt
            if cfg.mqtt.enabled
            else replace(cfg.mqtt, enabled=True).with_secrets(cfg.source)
        )
    except ConfigError as e:
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None
    _report(mqtt_checks(mcfg, timeout), as_json, f"MQTT {mcfg.host}:{mcfg.port}")


# --- Kafka ---------------------------------------------------------------------------------------


def kafka_checks(settings: dict[str, Any], topics: list[str], timeout: float) -> list[Check]:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    where = str(settings.get("bootstrap.servers"))
    errors: list[str] = []
    conf = dict(settings)
    conf["error_cb"] = lambda err: errors.append(str(err))
    conf["log_level"] = 0  # the failures are reported here, once
    admin = AdminClient(conf)
    try:
        meta = admin.list_topics(timeout=timeout)
    except KafkaException as e:
        admin.poll(1.0)  # serves error_cb: the reason (auth, TLS) the metadata call does not give
        text = " | ".join([*dict.fromkeys(errors[:5]), str(e)])
        reach = tcp_probe(where.split(",")[0], timeout)
        kind = classify(reach) if reach is not None else classify(text)
        return [Check(f"connect {where}", False, kind, f"{reach or ''} {text}".strip())]
    checks = [Check(f"connect {where}", True, detail=f"{len(meta.brokers)} broker(s)")]
    for topic in topics:
        t = meta.topics.get(topic)
        if t is None:
            checks.append(Check(f"topic {topic}", False, "missing", "not in the cluster"))
        elif t.error is not None:
            checks.append(Check(f"topic {topic}", False, classify(str(t.error)), str(t.error)))
        else:
            checks.append(Check(f"topic {topic}", True, detail=f"{len(t.partitions)} partitions"))
    return checks


def kafka(
    config: stores.Config = Path("config.toml"),
    topic: Annotated[
        list[str] | None, typer.Option(help="Topics to check (default: ours).")
    ] = None,
    timeout: Timeout = 10.0,
    as_json: JsonOut = False,
) -> None:
    """Connect to Kafka with the [kafka] settings; check the gateway's topics exist.

    Exit codes: 0 every check passed, 1 a check failed (named, with the fix), 2 bad config.
    """
    from gateway.edge.forward import topic_for

    cfg = stores.load(config)
    try:
        # the connection the forwarder uses, without its producer tuning
        settings = cfg.kafka.client_conf(client_id="edge-gateway-diag", section="kafka")
        settings |= cfg.kafka.extra
    except ConfigError as e:
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None
    topics = topic or [
        topic_for(cfg.kafka, "reading", cfg.gateway.plant_id),
        cfg.kafka.alerts_topic,
    ]
    _report(
        kafka_checks(settings, topics, timeout), as_json, f"Kafka {cfg.kafka.bootstrap_servers}"
    )


# --- InfluxDB ------------------------------------------------------------------------------------


def influx_checks(icfg: Any, source: str, timeout: float) -> list[Check]:
    import urllib.error
    import urllib.parse
    import urllib.request

    from gateway.common.config import secret

    token = secret(icfg.token, source=source, key="influxdb.token")
    base = icfg.url.rstrip("/")

    def get(path: str) -> Any:
        req = urllib.request.Request(f"{base}{path}", headers={"Authorization": f"Token {token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"{}")

    def failed(what: str, e: BaseException) -> Check:
        if isinstance(e, urllib.error.HTTPError):
            kind = {401: "auth", 403: "acl", 404: "missing"}.get(e.code, "error")
            return Check(
                what, False, kind, f"HTTP {e.code}: {e.read()[:200].decode(errors='replace')}"
            )
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        return Check(
            what,
            False,
            classify(reason if isinstance(reason, BaseException) else str(reason)),
            str(reason),
        )

    try:
        health = get("/health")
    except (urllib.error.URLError, OSError, ValueError) as e:
        return [failed(f"connect {base}", e)]
    checks = [Check(f"connect {base}", True, detail=f"InfluxDB {health.get('version', '?')}")]
    query = urllib.parse.urlencode({"org": icfg.org, "name": icfg.bucket})
    try:
        found = get(f"/api/v2/buckets?{query}").get("buckets", [])
    except (urllib.error.URLError, OSError, ValueError) as e:
        return [*checks, failed(f"bucket {icfg.bucket} (org {icfg.org})", e)]
    ok = bool(found)
    checks.append(
        Check(
            f"bucket {icfg.bucket} (org {icfg.org})",
            ok,
            "ok" if ok else "missing",
            "found" if ok else "no such bucket, or the token may not see it",
        )
    )
    return checks


def influx(
    config: stores.Config = Path("config.toml"),
    timeout: Timeout = 10.0,
    as_json: JsonOut = False,
) -> None:
    """Reach InfluxDB at [influxdb] url with its token; check the raw bucket exists.

    Exit codes: 0 every check passed, 1 a check failed (named, with the fix), 2 bad config.
    """
    from gateway.processor.settings import load_processor_config

    try:
        pcfg = load_processor_config(config)
        checks = influx_checks(pcfg.influxdb, str(config), timeout)
    except ConfigError as e:
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None
    _report(checks, as_json, f"InfluxDB {pcfg.influxdb.url}")
