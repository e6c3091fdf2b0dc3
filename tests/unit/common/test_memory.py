"""trim_heap: glibc's malloc_trim, found without a library search."""

from __future__ import annotations

import sys

import pytest

from gateway.common.memory import trim_heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_memory_freed_by_a_burst_goes_back_to_the_system() -> None:
    blobs = [bytearray(2048) for _ in range(20_000)]  # ~40 MB from malloc (pymalloc stops at 512 B)
    blobs.append(bytearray(16))  # so the freed blocks are not all at the heap's top
    del blobs[:-1]
    assert trim_heap() is True
