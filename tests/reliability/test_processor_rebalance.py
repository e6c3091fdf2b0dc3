"""Rebalances under load: a third processor instance joins the two running ones and leaves again,
four times, while readings flow. A partition taken from an instance is never brought back by it: it
neither aggregates nor commits a partition outside its assignment. Aggregates equal the raw data
and no alert is raised twice. Real Kafka and InfluxDB, instances as subprocesses.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections import defaultdict

import pytest

from tests.support.processor_harness import (
    Processor,
    assert_windows_match_raw,
    influx_config,
    make_dataset,
    produce,
    read_topic,
    wait_until_done,
)

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.timeout(300)]

_EVENT = re.compile(r" INFO gateway\.processor\.consume: (assigned|revoked) (.*)$")
_PARTITION = re.compile(r"(\S+)\[(\d+)\]")


def ownership_violations(log: str) -> list[str]:
    """What one instance's log says it took that the group never gave it: a partition assigned
    while it still held it, or still held after it closed (closing revokes what the group gave)."""
    held: set[tuple[str, int]] = set()
    found = []
    for line in log.splitlines():
        m = _EVENT.search(line)
        if m is None:
            continue
        parts = {(t, int(p)) for t, p in _PARTITION.findall(m.group(2))}
        if m.group(1) == "assigned":
            found += [f"assigned again while held: {p}" for p in sorted(parts & held)]
            held |= parts
        else:
            held -= parts
    found += [f"held after closing: {p}" for p in sorted(held)]
    return found


def test_a_third_instance_joining_and_leaving_takes_nothing_twice(kafka_env, influx_env, tmp_path):
    servers = {**kafka_env, **influx_env}
    data = make_dataset(seed=6)
    # A long linger keeps each turn's consume calls open across rebalances: messages taken before
    # a revocation are in hand when it comes, as with any batch that fills slowly.
    proc = Processor(
        data, servers, servers, tmp_path, settings={"processor": {"batch_linger": 1.0}}
    )
    proc.write_config()
    proc.start()
    proc.start()
    time.sleep(4)  # both joined
    # Each join revokes partitions from the two running instances (a leave only assigns).
    steps = {k / 10: ("leave", "join")[k % 2] for k in range(1, 9)}
    third: list = []
    lock = threading.Lock()

    def churn(fraction: float) -> None:
        with lock:
            for at in [a for a in steps if fraction >= a]:
                if steps.pop(at) == "join":
                    third.append(proc.start())
                else:
                    proc.stop(third[-1])

    cfg = influx_config(servers)
    try:
        produce(servers, data, seconds=60, on_progress=churn)
        with cfg.client() as client:
            wait_until_done(client, cfg, data, proc, timeout=150)
            assert_windows_match_raw(client, cfg, data)
            alerts = [json.loads(m.value()) for m in read_topic(servers, proc.topics["alerts"], 1)]
    finally:
        proc.stop_all()
        proc.delete_topics()

    logs = sorted(tmp_path.glob("processor-*.log"))
    assert len(logs) == 6
    violations = {p.name: ownership_violations(p.read_text()) for p in logs}
    assert violations == {p.name: [] for p in logs}, proc.logs()
    assert all("not committing" not in p.read_text() for p in logs), proc.logs()

    # Replays re-send alerts (at least once, same ids); none is raised twice under another id.
    events = {a["eventId"]: (a["alarmId"], a["state"], a["timestamp"]) for a in alerts}
    assert len(events) == len({(a["alarmId"], a["state"], a["timestamp"]) for a in alerts})
    states: dict[str, list[str]] = defaultdict(list)
    for alarm, state, _ in sorted(events.values(), key=lambda e: (e[0], e[2])):
        states[alarm].append(state)
    doubled = {
        a: s for a, s in states.items() if any(x == y == "raised" for x, y in itertools.pairwise(s))
    }
    assert doubled == {}
    assert any(s[0] == "raised" for s in states.values())
