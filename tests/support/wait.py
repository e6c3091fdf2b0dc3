"""Waiting for something to become true, with a deadline that names what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something truthy (returned); AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def wait_settled(
    value: Callable[[], Any],
    done: Callable[[], bool],
    timeout: float,
    what: str,
    quiet: float = 15.0,
) -> None:
    """Poll until ``done()``, or until ``value()`` has not changed for ``quiet`` seconds (nothing
    more is coming: the caller's assertions then say what is missing). Fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    last, since = value(), time.monotonic()
    while not done():
        now = time.monotonic()
        if now > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        current = value()
        if current != last:
            last, since = current, now
        elif now - since > quiet:
            return
        time.sleep(0.2)
