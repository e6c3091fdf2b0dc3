"""Ports on 127.0.0.1 for servers a test or script starts, and a relay that breaks connections."""

from __future__ import annotations

import contextlib
import socket
import threading


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TcpRelay:
    """A TCP relay on 127.0.0.1 to ``host:port`` that misbehaves on demand, as a flaky network does:
    ``hold_upstream`` drops what clients send (e.g. an MQTT client's acks never reach the broker)
    while their connections stay up; ``cut()`` closes every current connection. New connections
    are relayed as they come, unless the relay is ``down()``: then it accepts and closes at once,
    as a broken WAN link does, until ``up()``. ``listen`` picks its port (0: any free one)."""

    def __init__(self, host: str, port: int, listen: int = 0) -> None:
        self.target = (host, port)
        self.hold_upstream = False
        self.refusing = False
        self._listener = socket.create_server(("127.0.0.1", listen))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        threading.Thread(target=self._accept, name="tcp-relay", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if self.refusing:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if not (upstream and self.hold_upstream):
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Close every relayed connection (both ends)."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def down(self) -> None:
        """Break the link: cut every connection and refuse new ones until ``up()``."""
        self.refusing = True
        self.cut()

    def up(self) -> None:
        self.refusing = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._listener.close()
        self.cut()

    def __enter__(self) -> TcpRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
