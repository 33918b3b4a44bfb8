"""Connections that talk too slowly: a few bytes a second to a port, all from one thread."""

from __future__ import annotations

import socket
import threading
import time


class SlowTalkers:
    """Connections that send ``payload`` one byte every ``pace`` seconds, all from one thread.

    ``closed_at[i]`` is when the server closed connection ``i`` (monotonic).
    """

    def __init__(self, address: str, n: int, payload: bytes, pace: float = 0.5) -> None:
        self.payload = payload
        self.pace = pace
        self.socks = [socket.create_connection(_host_port(address), timeout=10)
                      for _ in range(n)]
        for sock in self.socks:
            sock.setblocking(False)
        self.opened = time.monotonic()
        self.ports = [s.getsockname()[1] for s in self.socks]
        self.closed_at: dict[int, float] = {}
        self.sent = [0] * n
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, daemon=True)
        self._thread.start()

    def _drip(self) -> None:
        while not self._stop.is_set() and len(self.closed_at) < len(self.socks):
            for i, sock in enumerate(self.socks):
                if i not in self.closed_at and self._closed(sock):
                    self.closed_at[i] = time.monotonic()
                elif i not in self.closed_at:
                    try:
                        sock.send(self.payload[self.sent[i] % len(self.payload):][:1])
                        self.sent[i] += 1
                    except OSError:
                        self.closed_at[i] = time.monotonic()
            self._stop.wait(self.pace)

    @staticmethod
    def _closed(sock: socket.socket) -> bool:
        """Has the server closed ``sock``?  Reads (and drops) what it sent; never blocks."""
        try:
            while True:
                if not sock.recv(4096):
                    return True
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.socks:
            sock.close()


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)
