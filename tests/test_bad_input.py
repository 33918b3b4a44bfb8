"""Bad bytes on real ports, and a fuzzer for the frame decoder.

Every bad connection must be closed on its own, with a log line naming it
(its peer address, i.e. our socket's port), while the process stays up and
the cluster keeps computing.  Nothing is unpickled before the handshake.
"""

from __future__ import annotations

import io
import pickle
import random
import socket
import struct
import time
import tracemalloc

import pytest

from minidist import Executor, wire

from conftest import wait_for

KEY = "bad-input-test-key"


def inc(x):
    return x + 1


@pytest.fixture
def keyed(spawn):
    """A center and one worker with an auth key, their logs, and a connected Executor."""
    env = {"MINIDIST_AUTH_KEY": KEY}
    center = spawn("center", "--port", "0", "--host", "127.0.0.1", env=env)
    port = int(center.address.rpartition(":")[2])
    address = f"127.0.0.1:{port}"
    worker = spawn("worker", address, "--host", "127.0.0.1", env=env)
    with Executor(address, auth_key=KEY) as e:
        assert e.submit(inc, 1).result(timeout=20) == 2
        yield {"center": (address, center), "worker": (worker.address, worker), "e": e}


def dial(address: str) -> socket.socket:
    host, port = wire.parse_address(address)
    return socket.create_connection((host, port), timeout=10)


def authenticated(address: str) -> socket.socket:
    """A raw socket that has passed the real handshake (done by hand with wire's pieces)."""
    sock = dial(address)
    wire.answer_challenge(sock, KEY.encode(), address)
    return sock


def header(*lengths: int) -> bytes:
    """The documented frame header: ``!I`` count, then ``!nQ`` lengths."""
    return struct.pack("!I", len(lengths)) + struct.pack(f"!{len(lengths)}Q", *lengths)


def closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Wait until the server closes ``sock``; True if it did."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    finally:
        sock.close()


def peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def bad_inputs(rng: random.Random):
    """(name, authenticate first?, bytes to send, expected log text)."""
    garbage = rng.randbytes(4096)
    not_a_pickle = b"\x00this is not a pickle\xff" * 10
    forty_two = pickle.dumps(42)
    no_name = pickle.dumps({"op": None, "path": "/"})
    return [
        ("garbage", False, garbage, "bad magic"),
        ("truncated hello", False, wire.MAGIC[:5], "closed during handshake"),
        ("10 GB header first", False, header(10 << 30), "bad magic"),
        ("pickle instead of hello", False, pickle.dumps({"op": "identity"}), "bad magic"),
        ("garbage after handshake", True, b"\xff" * 64, "bad frame count"),
        ("truncated header", True, struct.pack("!I", 3) + b"\x00" * 5, "truncated"),
        ("truncated frame", True, header(100) + b"x" * 10, "truncated"),
        ("10 GB frame", True, header(10 << 30), "exceeds limit"),
        ("10 GB writable frame", True, header((10 << 30) | (1 << 63)), "exceeds limit"),
        ("zero frames", True, header(), "bad frame count"),
        ("non-pickle payload", True, header(len(not_a_pickle)) + not_a_pickle,
         "undecodable message"),
        ("pickle of a non-operation", True, header(len(forty_two)) + forty_two,
         "not an operation"),
        ("operation without a name", True, header(len(no_name)) + no_name, "not an operation"),
    ]


@pytest.mark.timeout(60)
def test_bad_bytes_close_only_that_connection(keyed):
    e = keyed["e"]
    targets = [keyed["center"], keyed["worker"]]
    rss_before = {proc.pid: peak_rss_kb(proc.pid) for _, proc in targets}
    # Peers that say nothing: the handshake timeout must close them.
    silent = [(dial(address), proc) for address, proc in targets]
    t_silent = time.monotonic()

    for address, proc in targets:
        for name, auth, payload, expected in bad_inputs(random.Random(1)):
            sock = authenticated(address) if auth else dial(address)
            port = sock.getsockname()[1]
            try:
                sock.sendall(payload)
                if name.startswith("truncated"):
                    sock.shutdown(socket.SHUT_WR)  # the rest never comes
            except OSError:
                pass  # the server may have closed already: that is fine too
            assert closed_by_server(sock), f"{name}: server kept the connection open"
            lines = wait_for(lambda: [ln for ln in proc.log().splitlines()
                                      if f"127.0.0.1:{port}" in ln], 5,
                             message=f"log line for {name}")
            assert any(expected in ln for ln in lines), f"{name}: {lines}"
            assert proc.popen.poll() is None

        # 200 connections opened and dropped at once
        socks = [dial(address) for _ in range(200)]
        ports = {s.getsockname()[1] for s in socks}
        for s in socks:
            s.close()
        wait_for(lambda: len(ports & _logged_ports(proc.log())) == 200, 15,
                 message="a log line per dropped connection")

    for sock, proc in silent:
        port = sock.getsockname()[1]
        assert closed_by_server(sock, timeout=wire.HANDSHAKE_TIMEOUT + 5)
        assert time.monotonic() - t_silent < wire.HANDSHAKE_TIMEOUT + 5
        assert any(f"127.0.0.1:{port}" in ln and "timed out" in ln
                   for ln in proc.log().splitlines())

    # An operation the process does not have is an error for that call only.
    for address, proc in targets:
        conn = wire.connect(address, security=wire.Security(KEY))
        try:
            conn.write({"op": "format_disk", "path": "/"})
            with pytest.raises(wire.RemoteError, match="unknown operation 'format_disk'"):
                conn.read()
            conn.write({"op": "identity"})
            assert conn.read()["pid"] == proc.pid
        finally:
            conn.close()

    # Still up, nothing big was allocated, and the cluster computes right after,
    # on the connection that was open all along and on new ones.
    for _, proc in targets:
        assert proc.popen.poll() is None
        assert peak_rss_kb(proc.pid) - rss_before[proc.pid] < 64 * 1024
    assert e.submit(inc, 10).result(timeout=20) == 11
    assert list(e.map(inc, range(100))) == list(range(1, 101))
    with Executor(keyed["center"][0], auth_key=KEY) as e2:
        assert list(e2.map(inc, range(10))) == list(range(1, 11))
        assert e2.submit(sum, [1, 2, 3]).result(timeout=20) == 6


def _logged_ports(log: str) -> set[int]:
    ports = set()
    for line in log.splitlines():
        if "dropped connection from 127.0.0.1:" in line:
            ports.add(int(line.split("dropped connection from 127.0.0.1:")[1].split(":")[0]))
    return ports


@pytest.mark.timeout(30)
def test_hello_with_huge_answer_reads_only_fixed_fields(keyed):
    """Before authentication the server reads fixed-size fields only: a flood is never buffered."""
    address, proc = keyed["center"]
    rss_before = peak_rss_kb(proc.pid)
    sock = dial(address)
    port = sock.getsockname()[1]
    sock.sendall(struct.pack("!8sBB", wire.MAGIC, wire.VERSION, 1))
    assert sock.recv(1)[0] != 0  # it wants our proof
    try:
        sock.sendall(header(10 << 30) + b"\x00" * (8 << 20))  # 8 MB instead of a 64 byte proof
    except OSError:
        pass
    assert closed_by_server(sock)
    wait_for(lambda: any(f"127.0.0.1:{port}" in ln and "wrong auth key" in ln
                         for ln in proc.log().splitlines()), 5, message="rejection logged")
    assert peak_rss_kb(proc.pid) - rss_before < 32 * 1024
    assert keyed["e"].submit(inc, 3).result(timeout=20) == 4


# --------------------------------------------------------------------------- fuzzing the decoder


LIMIT = 4096


def encode(frames: list[bytes], writable: list[bool]) -> bytes:
    lengths = [len(f) | ((1 << 63) if w else 0) for f, w in zip(frames, writable)]
    return header(*lengths) + b"".join(frames)


def fuzz_input(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(64))
    n = rng.randrange(1, 5)
    frames = [rng.randbytes(rng.choice([0, 1, 7, 100, 900])) for _ in range(n)]
    data = bytearray(encode(frames, [rng.random() < 0.5 for _ in frames]))
    data += encode([b"tail"], [False]) if rng.random() < 0.3 else b""
    if kind == 1:  # truncate anywhere
        del data[rng.randrange(len(data) + 1):]
    elif kind == 2:  # flip bytes, mostly in the header
        for _ in range(rng.randrange(1, 6)):
            i = rng.randrange(min(len(data), 4 + 8 * n + 4))
            data[i] = rng.randrange(256)
    elif kind == 3:  # lie about a length
        i = rng.randrange(n)
        big = rng.choice([LIMIT, LIMIT + 1, 2 * LIMIT, 10 << 30, (1 << 64) - 1, 1 << 63,
                          (1 << 63) | (LIMIT + 1), rng.randrange(1 << 64)])
        data[4 + 8 * i:12 + 8 * i] = struct.pack("!Q", big)
    elif kind == 4:  # lie about the count
        data[:4] = struct.pack("!I", rng.choice([0, n + 1, n + 1000, 1 << 16, (1 << 16) + 1,
                                                 (1 << 32) - 1, rng.randrange(1 << 32)]))
    else:  # splice random bytes in
        i = rng.randrange(len(data) + 1)
        data[i:i] = rng.randbytes(rng.randrange(1, 20))
    return bytes(data)


@pytest.mark.timeout(60)
def test_fuzz_read_frames():
    """>= 5,000 inputs: only frames, ProtocolError or ConnectionError, never a big allocation."""
    rng = random.Random(20240601)
    outcomes = {"frames": 0, "protocol": 0, "closed": 0}
    tracemalloc.start()
    try:
        for i in range(6000):
            data = fuzz_input(rng)
            stream = io.BufferedReader(io.BytesIO(data), buffer_size=1024)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            try:
                for _ in range(4):  # a stream may hold several messages
                    frames = wire.read_frames(stream, LIMIT)
                    assert isinstance(frames, list) and frames
                    assert all(type(f) in (bytes, bytearray) for f in frames)
                    assert all(len(f) <= LIMIT for f in frames)
                    outcomes["frames"] += 1
            except wire.ProtocolError:
                outcomes["protocol"] += 1
            except ConnectionError:
                outcomes["closed"] += 1
            peak = tracemalloc.get_traced_memory()[1] - base
            assert peak < 6 * LIMIT + 16384, f"input {i} made read_frames allocate {peak} bytes"
    finally:
        tracemalloc.stop()
    assert all(outcomes.values()), outcomes  # every kind of outcome was exercised


def test_read_frames_round_trip_and_clean_eof():
    """The fuzzer's encoder matches the real one, and EOF between messages is a clean close."""
    a, b = socket.socketpair()
    try:
        frames = [b"x" * 10, bytearray(b"y" * 5000)]
        wire.write_frames(a, frames)
        a.close()
        rfile = b.makefile("rb")
        got = wire.read_frames(rfile, LIMIT * 4)
        assert [bytes(f) for f in got] == [bytes(f) for f in frames]
        assert type(got[1]) is bytearray  # writable frames arrive writable
        with pytest.raises(ConnectionError) as info:
            wire.read_frames(rfile, LIMIT)
        assert not isinstance(info.value, wire.ProtocolError)
        rfile.close()
    finally:
        b.close()
    assert encode([b"x" * 10, b"y" * 5000], [False, True])[:20] == header(10, 5000 | (1 << 63))
