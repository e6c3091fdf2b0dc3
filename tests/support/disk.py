"""A small real filesystem for disk-full tests: tmpfs mounted under the test's tmp_path (the tests
run as root), always unmounted afterwards, and a filler that takes every byte left on it."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (e.g. "4m") at ``where`` for the block; unmounted even on failure
    (lazily if a file on it is still open, e.g. by a thread a failed test left behind)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], check=True
    )
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)


def fill(directory: Path, name: str = "filler") -> Path:
    """Write a file in ``directory`` until the filesystem has no byte left; returns its path."""
    path = directory / name
    chunk = b"\0" * 4096
    with path.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return path
