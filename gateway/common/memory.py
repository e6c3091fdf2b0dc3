"""Giving the memory a burst freed back to the system."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:  # the process's own symbols: glibc's, without looking for a library file
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


def trim_heap() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``): after a burst, e.g.
    a backlog sent to Kafka, glibc would keep what librdkafka and Python freed as the process's
    RSS until the next burst. True if it gave memory back; False if none, or no malloc_trim."""
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))
