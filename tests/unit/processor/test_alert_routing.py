"""The notification discipline (pure): grouping, repeat, inhibition, suppression, flood."""

from __future__ import annotations

from gateway.common.model import AlarmEvent
from gateway.processor.alerting.config import NotificationsConfig, RouteConfig, WebhookConfig
from gateway.processor.alerting.routing import Discipline

T0 = 1_700_000_000.0


def _config(**more: object) -> NotificationsConfig:
    hooks = {n: WebhookConfig(url="http://127.0.0.1:1/") for n in ("mail", "sms", "hook", "chat")}
    routes = [
        RouteConfig(channels=["mail", "sms", "hook"], levels=["critical"]),
        RouteConfig(channels=["chat"], levels=["warning"], resolved=False),
    ]
    args: dict[str, object] = {"group_wait": 1.0, "repeat_interval": 60.0, "routes": routes}
    return NotificationsConfig(webhook=hooks, **(args | more))  # type: ignore[arg-type]


def _event(
    state: str = "raised",
    *,
    n: int = 0,
    sensor: str = "s1",
    level: str = "critical",
    plant: str = "north",
    condition: str = "",
) -> AlarmEvent:
    cond = condition or ("HH" if level == "critical" else "H")
    return AlarmEvent(
        alarm_id=f"{plant}-{sensor}-BOD-{cond}",
        event_id=f"{plant}-{sensor}-{cond}-{state}-{n}",
        sensor_id=sensor,
        plant_id=plant,
        parameter="BOD",
        condition=cond,
        level=level,
        state=state,
        value=150.0,
        threshold=100.0,
        timestamp=T0 + n,
        message="BOD high",
    )


def test_a_critical_is_sent_once_after_the_group_wait_to_its_channels() -> None:
    d = Discipline(_config())
    assert d.apply(_event(), T0) == []
    assert d.tick(T0 + 0.5) == []
    (note,) = d.tick(T0 + 1.0)
    assert note.kind == "alert" and note.channels == ("mail", "sms", "hook")
    assert note.id == "alert:north-s1-HH-raised-0"
    for i in range(1, 101):  # repeats of the same condition add nothing
        d.apply(_event("re-raised", n=i), T0 + 1 + i * 0.1)
        assert d.tick(T0 + 1 + i * 0.1) == []


def test_a_reminder_after_the_repeat_interval_then_resolved() -> None:
    d = Discipline(_config())
    d.apply(_event(), T0)
    d.tick(T0 + 1)
    assert d.tick(T0 + 60) == []
    (reminder,) = d.tick(T0 + 61)
    assert reminder.kind == "reminder"
    assert d.tick(T0 + 62) == []
    (resolved,) = d.apply(_event("cleared", n=70), T0 + 70)
    assert resolved.kind == "resolved" and resolved.channels == ("mail", "sms", "hook")
    assert d.tick(T0 + 500) == []


def test_an_alarm_cleared_within_the_group_wait_is_never_sent() -> None:
    d = Discipline(_config())
    d.apply(_event(), T0)
    assert d.apply(_event("cleared", n=1), T0 + 0.5) == []
    assert d.tick(T0 + 5) == []


def test_critical_inhibits_the_warning_of_the_same_condition() -> None:
    d = Discipline(_config())
    d.apply(_event(), T0)
    d.apply(_event(level="warning"), T0)
    d.apply(_event(level="warning", sensor="s2"), T0)  # another sensor: not inhibited
    notes = d.tick(T0 + 1)
    assert sorted((n.level, n.alerts[0]["sensorId"]) for n in notes) == [
        ("critical", "s1"),
        ("warning", "s2"),
    ]
    assert all(n.alerts[0]["sensorId"] == "s2" for n in d.tick(T0 + 61) if n.level == "warning")


def test_ack_stops_reminders_and_shelve_holds_them_until_it_ends() -> None:
    d = Discipline(_config())
    d.apply(_event(), T0)
    d.apply(_event(sensor="s2"), T0)
    d.tick(T0 + 1)
    d.ack("north-s1-BOD-HH", "ana", T0 + 2, note="on it")
    d.shelve("north-s2-BOD-HH", T0 + 200, "bo", T0 + 2)
    assert d.tick(T0 + 100) == []
    (reminder,) = d.tick(T0 + 200)
    assert reminder.alerts[0]["sensorId"] == "s2"
    assert [h["action"] for h in d.history] == ["acknowledged", "shelved"]
    assert d.alerts["north-s1-BOD-HH"].doc()["ackedBy"] == "ana"


def test_out_of_service_suppresses_process_alarms_not_probe_faults() -> None:
    d = Discipline(_config())
    d.set_out_of_service("s1", T0 + 3600, "cal", T0)
    d.apply(_event(), T0)
    d.apply(_event(condition="probe_fault"), T0)
    (note,) = d.tick(T0 + 1)
    assert note.alerts[0]["condition"] == "probe_fault"
    assert d.history[0]["action"] == "out_of_service"


def test_a_flood_becomes_one_summary() -> None:
    d = Discipline(_config(flood_count=10))
    for i in range(50):
        d.apply(_event(sensor=f"s{i}", n=i), T0 + i * 0.01)
    (summary,) = d.tick(T0 + 2)
    assert summary.kind == "flood" and len(summary.alerts) == 50
    for i in range(50, 60):  # more of the flood within its window: no second summary
        d.apply(_event(sensor=f"s{i}", n=i), T0 + 3)
    assert d.tick(T0 + 5) == []


def test_a_replayed_decision_has_the_same_id() -> None:
    first, second = Discipline(_config()), Discipline(_config())
    for d in (first, second):
        d.apply(_event(), T0)
    assert [n.id for n in first.tick(T0 + 1)] == [n.id for n in second.tick(T0 + 1)]


def test_an_inhibited_warning_is_sent_once_its_critical_clears() -> None:
    d = Discipline(_config())
    d.apply(_event(), T0)
    d.apply(_event(level="warning"), T0)
    assert [n.level for n in d.tick(T0 + 1)] == ["critical"]
    d.apply(_event("cleared", n=5), T0 + 5)
    (note,) = d.tick(T0 + 61)
    assert (note.kind, note.level, note.channels) == ("alert", "warning", ("chat",))


def test_the_state_survives_a_restart_and_a_replay_decides_nothing_twice(tmp_path) -> None:
    from gateway.processor.alerting.statedb import StateDb

    config = _config()
    db = StateDb(tmp_path / "alerts.db")
    d = Discipline(config)
    d.apply(_event(), T0)
    notes = d.tick(T0 + 1)
    d.ack("north-s1-BOD-HH", "ana", T0 + 2)
    assert db.save(d, ["north-s1-HH-raised-0"], notes, T0 + 2) == 3
    db.close()
    db = StateDb(tmp_path / "alerts.db")
    again = Discipline(config)
    db.load(again)
    assert again.alerts["north-s1-BOD-HH"].acked_by == "ana"
    assert db.unseen(["north-s1-HH-raised-0", "other"]) == {"other"}
    assert db.save(again, [], notes, T0 + 3) == 0
    assert [p.id for p in db.due("sms", T0 + 3)] == ["alert:north-s1-HH-raised-0|sms"]
    assert db.history()[0]["action"] == "acknowledged"
    db.close()


def test_the_notifications_section_is_checked_when_loaded() -> None:
    import pytest

    from gateway.common.config import ConfigError, build

    table = {
        "enabled": True,
        "webhook": {"chat": {"url": "http://127.0.0.1:1/", "secret": "env:HOOK"}},
        "routes": [{"levels": ["critical"], "channels": ["chat", "pager"]}],
    }
    with pytest.raises(ConfigError, match="unknown channels"):
        build(NotificationsConfig, table, source="t.toml", prefix="notifications")
    table["routes"] = []
    table["webhook"] = {"chat": {"url": "http://127.0.0.1:1/", "secret": "plain"}}
    with pytest.raises(ConfigError, match="secret"):
        build(NotificationsConfig, table, source="t.toml", prefix="notifications")
    table["webhook"] = {"chat": {"url": "http://127.0.0.1:1/"}}
    config = build(NotificationsConfig, table, source="t.toml", prefix="notifications")
    assert [(r.levels, r.channels) for r in config.routes] == [(["critical"], ["chat"])]


def test_webhook_bodies_and_signature() -> None:
    import hashlib
    import hmac
    import json

    from gateway.processor.alerting.channels import Webhook, sign

    doc = {"id": "alert:e1", "kind": "alert", "subject": "s", "text": "t\nline", "alerts": []}
    slack = Webhook("chat", WebhookConfig(url="http://127.0.0.1:1/", format="slack"), "t")
    generic = Webhook("hook", WebhookConfig(url="http://127.0.0.1:1/"), "t")
    assert json.loads(slack.body(doc)) == {"text": "t\nline"}
    assert json.loads(generic.body(doc)) == doc
    expected = hmac.new(b"k", b"1700000000.{}", hashlib.sha256).hexdigest()
    assert sign(b"k", "1700000000", b"{}") == "sha256=" + expected
