"""A simulated pH electrode of known slope and offset behind ``edge-gateway simulate --control``,
and a pseudo-terminal to drive an interactive CLI command the way an operator would."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.services import ROOT

NERNST_25 = 59.16


@dataclass
class Electrode:
    """Writes the control file so the simulated probe (``unit``) answers as an electrode of
    ``slope`` mV/pH and ``offset`` mV at 25 °C sitting in a solution of pH ``ph``. The probe's own
    pH register is what a probe with an ideal factory calibration would show."""

    control: Path
    unit: int = 1
    slope: float = 56.2
    offset: float = 12.0

    def mv(self, ph: float) -> float:
        return self.offset - self.slope * (ph - 7.0)

    def put_in(self, ph: float) -> None:
        mv = self.mv(ph)
        values = {"temperature": 25.0, "electrode_mv": mv, "ph": 7.0 - mv / NERNST_25}
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps({str(self.unit): {"values": values}}))
        os.replace(tmp, self.control)


class Terminal:
    """A command on a pseudo-terminal: ``expect`` what it prints, ``send`` what a person types."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            cwd=ROOT,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            close_fds=True,
        )
        os.close(slave)
        self.text = ""
        self._seen = 0  # expect() looks at output after this offset

    def _read(self, timeout: float) -> None:
        if select.select([self.master], [], [], timeout)[0]:
            try:
                self.text += os.read(self.master, 4096).decode(errors="replace")
            except OSError:  # the command exited and closed its end
                time.sleep(timeout)

    def expect(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            m = regex.search(self.text, self._seen)
            if m:
                self._seen = m.end()
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} within {timeout} s; output:\n{self.text}")
            self._read(0.1)

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        self._read(0.1)
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        os.close(self.master)
