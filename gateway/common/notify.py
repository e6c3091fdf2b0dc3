"""systemd's notify protocol: datagrams of ``KEY=value`` lines to ``$NOTIFY_SOCKET``.

A few lines of our own rather than a library: the protocol is one sendto() on a Unix datagram
socket, and the maintained bindings (python-systemd) need libsystemd headers to build, which a
plant's Raspberry Pi may lack. Without ``$NOTIFY_SOCKET`` (not run by systemd) every call is a
no-op, so the daemons speak it unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "") if address is None else address
        # "@name" is a socket in the abstract namespace (Linux): a leading NUL byte.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        """Send ``fields`` (e.g. "READY=1", "STATUS=...") as one message; False if it failed."""
        if not self.address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
            self._failed = False
            return True
        except OSError as e:
            if not self._failed:  # once, not at every watchdog ping
                log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), e)
            self._failed = True
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_seconds() -> float | None:
    """The unit's WatchdogSec= as systemd passes it (``$WATCHDOG_USEC``), if it is meant for us."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000
