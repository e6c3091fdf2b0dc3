"""A stand-in for systemd's side of the notify protocol: a datagram socket that records messages."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class NotifyListener:
    """Listens where ``$NOTIFY_SOCKET`` points; ``messages`` are (monotonic time, fields)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.2)
        self.messages: list[tuple[float, list[str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode().split("\n")))

    def fields(self, since: float = 0.0) -> list[str]:
        """Every field received after ``since`` (monotonic), in order."""
        with self._lock:
            return [f for t, fs in self.messages if t >= since for f in fs]

    def count(self, field: str, since: float = 0.0) -> int:
        return self.fields(since).count(field)

    def statuses(self, since: float = 0.0) -> list[str]:
        return [f[7:] for f in self.fields(since) if f.startswith("STATUS=")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
