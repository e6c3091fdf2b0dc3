"""/health's answer from the stages' checks: healthy, degraded or unhealthy, and its HTTP code."""

from __future__ import annotations

from gateway.common.http import HttpConfig, HttpServer
from gateway.common.metrics import Metrics
from gateway.common.stage import Health


def answer(*checks: Health) -> tuple[int, dict]:
    server = HttpServer(HttpConfig(), Metrics())
    for i, check in enumerate(checks):
        server.add_check(f"c{i}", lambda check=check: check)
    return server.health()


def test_all_healthy_is_200() -> None:
    code, body = answer((True, {}), (True, {"rows": 3}))
    assert (code, body["status"]) == (200, "healthy")
    assert body["checks"]["c1"] == {"status": "healthy", "rows": 3}


def test_a_degraded_check_says_so_with_its_reason_and_is_not_200() -> None:
    code, body = answer((True, {}), (False, {"degraded": True, "error": "row 7 dead-lettered"}))
    assert (code, body["status"]) == (503, "degraded")
    assert body["checks"]["c1"] == {"status": "degraded", "error": "row 7 dead-lettered"}


def test_unhealthy_outranks_degraded() -> None:
    code, body = answer((False, {"degraded": True, "error": "a"}), (False, {"error": "b"}))
    assert (code, body["status"]) == (503, "unhealthy")
    assert [c["status"] for c in body["checks"].values()] == ["degraded", "unhealthy"]
