"""The demo's child processes: started in their own session with a log file each, stopped by pid
(SIGTERM, then SIGKILL after a timeout), last started first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

EXE = [sys.executable, "-m", "gateway"]


class Procs:
    def __init__(self, run_dir: Path, env: dict[str, str], cwd: Path) -> None:
        self.dir, self.env, self.cwd = run_dir, env, cwd
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, *args: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        assert name not in self.procs or self.procs[name].poll() is not None, name
        with (self.dir / f"{name}.log").open("ab") as log:
            p = subprocess.Popen(
                list(args),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"},
                cwd=cwd or self.cwd,
                start_new_session=True,  # Ctrl-C reaches the demo only; it stops the rest in order
            )
        self.procs[name] = p
        return p

    def alive(self, name: str) -> bool:
        p = self.procs.get(name)
        return p is not None and p.poll() is None

    def stop(self, name: str, timeout: float = 30.0) -> int | None:
        p = self.procs.pop(name, None)
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    def stop_all(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name, 15)
