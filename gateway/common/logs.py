"""Logging that a failing probe or a misbehaving device cannot flood."""

from __future__ import annotations

import logging
import math
import threading
import time


class RateLimitedLog:
    """At most one log line per key per ``interval`` seconds, saying how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self._logger, self._interval = logger, interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: object) -> None:
        self._log(logging.WARNING, key, msg, *args)

    def info(self, key: str, msg: str, *args: object) -> None:
        self._log(logging.INFO, key, msg, *args)

    def _log(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -math.inf) < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += f" ({suppressed} more like this suppressed)"
        self._logger.log(level, msg, *args)
