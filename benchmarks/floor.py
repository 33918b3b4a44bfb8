"""The raw-socket floor: two processes on loopback, nothing but ``sendall``/``recv_into``.

``python -m benchmarks.floor [HOST]`` is the peer process: it binds HOST
(127.0.0.1 by default) on a free port, prints the port, serves one
connection and exits when it closes.  Commands are one byte plus an 8-byte count:

``P n``  ping-pong: n rounds of an 8-byte message echoed back;
``S n``  sink: receive n bytes into preallocated memory, answer one byte;
``F n``  sink into fresh memory: the same into a new mapping made for it;
``G n``  source: send n bytes from preallocated memory.

Any real transfer of a new value lands in memory the receiver has not
touched yet, which costs page faults that reused memory does not; the
``fresh`` variants measure that ceiling, with the fastest fresh memory
there is, the kind minidist receives into (``minidist.wire.fresh_buffer``:
an anonymous mapping with transparent huge pages where the kernel offers
them on request, else populated by the kernel in one go).
"""

from __future__ import annotations

import mmap
import socket
import statistics
import struct
import subprocess
import sys
import time

from minidist.wire import fresh_buffer

_HEADER = struct.Struct("!cQ")
_CHUNK = 4 * 2**20


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view, min(len(view), _CHUNK))
        if not n:
            raise ConnectionError("peer closed")
        view = view[n:]


def fresh_memory(nbytes: int) -> mmap.mmap | bytearray:
    """Untouched memory for ``nbytes``: the same kind minidist receives a large frame into
    (huge pages where the kernel gives them on request, else populated in one go)."""
    return fresh_buffer(nbytes)


def _send_view(sock: socket.socket, view: memoryview) -> None:
    for start in range(0, len(view), _CHUNK):
        sock.sendall(view[start:start + _CHUNK])


def serve(host: str = "127.0.0.1") -> None:
    """Serve one connection on ``host`` (see the module docstring), then exit."""
    with socket.socket() as listener:
        listener.bind((host, 0))
        listener.listen(1)
        print(listener.getsockname()[1], flush=True)
        conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    header = bytearray(_HEADER.size)
    buffer = bytearray()
    small = bytearray(8)
    with conn:
        while True:
            try:
                _recv_exactly(conn, memoryview(header))
            except ConnectionError:
                return
            cmd, n = _HEADER.unpack(header)
            if cmd == b"P":
                for _ in range(n):
                    _recv_exactly(conn, memoryview(small))
                    conn.sendall(small)
            else:
                if len(buffer) < n:
                    buffer = bytearray(n)
                if cmd == b"S":
                    _recv_exactly(conn, memoryview(buffer)[:n])
                    conn.sendall(b"k")
                elif cmd == b"F":
                    fresh = fresh_memory(n)
                    _recv_exactly(conn, memoryview(fresh))
                    conn.sendall(b"k")
                    del fresh
                elif cmd == b"G":
                    _send_view(conn, memoryview(buffer)[:n])


class SocketFloor:
    """The client side of the floor, holding the peer process and one connection.

    The peer listens on ``host``; ``prefix`` is put before its command line
    (``ip netns exec NS`` runs it on another host made of a namespace).
    """

    name = "socket"

    def __init__(self, host: str = "127.0.0.1", prefix: tuple[str, ...] = ()) -> None:
        self.host = host
        self.prefix = list(prefix)
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self._buffer = bytearray()

    def start(self) -> None:
        """Start the peer process and connect to it."""
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "benchmarks.floor",
                                      self.host],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        line = self.proc.stdout.readline()
        if not line.strip():
            raise RuntimeError(f"socket floor peer exited with {self.proc.wait()}")
        self.sock = socket.create_connection((self.host, int(line)), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def pids(self) -> list[int]:
        """PIDs of the processes this floor started."""
        return [self.proc.pid] if self.proc else []

    def latencies(self, rounds: int, warmup: int = 50) -> list[float]:
        """Round-trip seconds of ``rounds`` 8-byte ping-pongs after ``warmup`` untimed ones."""
        sock = self.sock
        msg = bytearray(8)
        view = memoryview(msg)
        sock.sendall(_HEADER.pack(b"P", warmup + rounds))
        out = []
        for i in range(warmup + rounds):
            t0 = time.perf_counter()
            sock.sendall(msg)
            _recv_exactly(sock, view)
            if i >= warmup:
                out.append(time.perf_counter() - t0)
        return out

    def send(self, nbytes: int, fresh: bool = False) -> float:
        """Seconds to push ``nbytes`` to the peer until it has them all in memory
        (``fresh``: in memory it allocates for them)."""
        if len(self._buffer) < nbytes:
            self._buffer = bytearray(b"x" * nbytes)
        ack = bytearray(1)
        t0 = time.perf_counter()
        self.sock.sendall(_HEADER.pack(b"F" if fresh else b"S", nbytes))
        _send_view(self.sock, memoryview(self._buffer)[:nbytes])
        _recv_exactly(self.sock, memoryview(ack))
        return time.perf_counter() - t0

    def receive(self, nbytes: int, fresh: bool = False) -> float:
        """Seconds to receive ``nbytes`` from the peer into preallocated memory
        (``fresh``: into memory allocated for them, inside the timing)."""
        if len(self._buffer) < nbytes:
            self._buffer = bytearray(b"x" * nbytes)
        t0 = time.perf_counter()
        self.sock.sendall(_HEADER.pack(b"G", nbytes))
        target = fresh_memory(nbytes) if fresh else memoryview(self._buffer)[:nbytes]
        _recv_exactly(self.sock, memoryview(target))
        elapsed = time.perf_counter() - t0
        del target
        return elapsed

    def close(self) -> None:
        """Close the connection and stop the peer."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.proc = None


def median_ms(samples: list[float]) -> float:
    """Median of second samples, in milliseconds."""
    return statistics.median(samples) * 1e3


if __name__ == "__main__":
    serve(*sys.argv[1:2])
