"""The alert API on the processor's HTTP server (bearer ``processor.http_token``), for the CLI.

- ``GET /api/alerts?active=1&plant=P``: the alert state: ``alerts`` (each alarm's lifecycle, who
  acknowledged or shelved it and when), ``outOfService`` (sensors, until when, who) and
  ``history`` (every operator action, newest first);
- ``POST /api/alerts/action`` with JSON ``{"action": "ack"|"shelve"|"unshelve"|"out_of_service",
  "id": alarm id | "sensorId": sensor, "by": name, "note": text, "seconds": duration}``: applied
  at once (routing honours it from the next decision) and told to every instance.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import orjson

from gateway.common.http import Answer, HttpServer, Route
from gateway.processor.alerting.notifier import ActionError, AlertNotifier

MAX_BODY = 16 * 1024
MAX_SECONDS = 30 * 86400.0


def attach_api(server: HttpServer, notifier: AlertNotifier, token: bytes) -> None:
    async def listing(query: Mapping[str, str]) -> Answer:
        active = query.get("active", "") in ("1", "true", "yes")
        return 200, notifier.listing(active=active, plant=query.get("plant", ""))

    def action(body: bytes) -> Answer:
        try:
            given = orjson.loads(body)
            if not isinstance(given, dict):
                raise ActionError("expected a JSON object")
            doc = {k: given[k] for k in ("action", "id", "sensorId", "by", "note") if k in given}
            if "seconds" in given:
                seconds = float(given["seconds"])
                if not 0 < seconds <= MAX_SECONDS:
                    raise ActionError(f"seconds must be between 0 and {MAX_SECONDS:g}")
                doc["until"] = time.time() + seconds
            elif doc.get("action") in ("shelve", "out_of_service"):
                raise ActionError("say for how long: seconds")
            return 200, notifier.apply_action(doc)
        except ActionError as e:
            return 400, {"error": str(e)}
        except (orjson.JSONDecodeError, TypeError, ValueError) as e:
            return 400, {"error": f"bad request: {e}"}

    server.add_get("/api/alerts", listing, token)
    server.add_route("/api/alerts/action", Route(action, MAX_BODY, token))
