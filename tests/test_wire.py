"""Framing, serialization, the Server and rpc, over real socketpairs and loopback sockets."""

from __future__ import annotations

import gc
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from minidist import wire
from minidist.wire import (NO_REPLY, BatchedSender, Connection, ConnectionPool, ProtocolError,
                           RemoteError, Serialized, Server, deserialize, dumps,
                           read_frames, rpc, serialize, write_frames)

from conftest import wait_for

MB = 1 << 20


@pytest.fixture
def pair():
    """Two connected Connections over a socketpair."""
    a, b = socket.socketpair()
    ca, cb = Connection(a, "a"), Connection(b, "b")
    yield ca, cb
    ca.close()
    cb.close()


def transfer(pair, obj):
    """Send ``obj`` one way on a thread (large frames do not fit the socket buffer)."""
    ca, cb = pair
    errors = []

    def send():
        try:
            ca.send(obj)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=send)
    t.start()
    got = cb.recv()
    t.join(10)
    assert not errors
    return got


# ---------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("obj", [
    None, 0, -1, 1.5, "text", "", [], {}, (), [1, [2, [3]]], {"op": "x", "args": (1, 2)},
    {"nested": {"deep": [None, True, b"small"]}}, set(range(10)), 2 ** 100,
])
def test_round_trip_plain_objects(pair, obj):
    assert transfer(pair, obj) == obj


def test_many_messages_in_order(pair):
    ca, cb = pair
    for i in range(200):
        ca.send({"i": i})
        assert cb.recv() == {"i": i}


def test_round_trip_user_values_through_serialize(pair):
    values = {
        "bytes": b"x" * (3 * MB),
        "small_bytes": b"abc",
        "bytearray": bytearray(b"y" * (2 * MB)),
        "memoryview": memoryview(b"z" * (2 * MB)),
        "typed_view": memoryview(np.arange(4096, dtype="float64")),
        "array": np.arange(MB, dtype="float64"),
        "small_array": np.arange(3),
        "matrix": np.arange(12.0).reshape(3, 4)[:, ::2],  # not contiguous
        "object": {"a": [1, 2], "b": None},
    }
    got = {k: deserialize(v) for k, v in transfer(
        pair, {k: serialize(v) for k, v in values.items()}).items()}
    assert got["bytes"] == values["bytes"] and type(got["bytes"]) is bytes
    assert got["small_bytes"] == b"abc" and type(got["small_bytes"]) is bytes
    assert got["bytearray"] == values["bytearray"] and type(got["bytearray"]) is bytearray
    assert bytes(got["memoryview"]) == bytes(values["memoryview"])
    assert type(got["memoryview"]) is memoryview
    assert got["typed_view"].format == "d" and got["typed_view"].shape == (4096,)
    assert got["typed_view"].tolist() == list(map(float, range(4096)))
    for name in ("array", "small_array", "matrix"):
        np.testing.assert_array_equal(got[name], values[name])
        assert got[name].dtype == values[name].dtype
    assert got["object"] == values["object"]


def test_large_bytes_inside_small_containers_travel_as_their_own_frames(pair):
    big, other = b"b" * MB, bytearray(b"o" * MB)
    value = (1, "x", [big, 2, None], {"k": other, "n": 3.5})
    s = serialize(value)
    assert len(s.buffers) == 2 and len(s.header) < 1000
    got = deserialize(transfer(pair, s))
    assert got == value
    assert type(got[2][0]) is bytes and type(got[3]["k"]) is bytearray
    plain = serialize((1, "x", [2, None], {"n": 3.5}))
    assert not plain.buffers


def test_numpy_arrays_arrive_writable(pair):
    arr = np.arange(2 * MB, dtype="uint8")
    got = deserialize(transfer(pair, serialize(arr)))
    assert got.flags.writeable
    got[0] = 99  # no error
    small = deserialize(transfer(pair, serialize(np.arange(10))))
    assert small.flags.writeable
    direct = transfer(pair, {"arr": np.ones(MB)})["arr"]  # a message holding an array
    assert direct.flags.writeable and direct.sum() == MB


def test_large_writable_frames_land_in_their_own_memory_and_outlive_the_message(pair):
    """Arrays of 1 MiB and more are received into a fresh mapping each; bytearrays stay so."""
    arrays = [np.full(MB, i, dtype="uint8") for i in range(3)]
    got = transfer(pair, {"arrays": arrays, "ba": bytearray(b"q" * (2 * MB))})
    assert type(got["ba"]) is bytearray and got["ba"] == bytearray(b"q" * (2 * MB))
    bases = {id(a.base) for a in got["arrays"]}
    assert len(bases) == 3  # no shared or reused receive buffer
    received = got["arrays"]
    del got
    gc.collect()
    received[1][:] = 7  # writing one leaves the others alone
    assert [int(a.sum()) for a in received] == [0, 7 * MB, 2 * MB]


def test_large_bytes_are_received_in_place_and_behave_as_bytes(pair):
    """Read-only frames of FRESH_BYTES_MIN and more arrive as bytes filled in place:
    equal, hashable, immutable, independent of each other and of later messages."""
    size = wire.FRESH_BYTES_MIN + 12345  # not a whole number of pages
    values = [os.urandom(size), bytes(size), b"\xff" * (wire.FRESH_BYTES_MIN // 2)]
    got = deserialize(transfer(pair, serialize(values)))
    assert [type(v) for v in got] == [bytes] * 3
    assert got == values
    assert wire._fresh_bytes is not None or not wire._FRESH_BYTES_OK  # the in-place path ran
    assert {hash(v) for v in got} == {hash(v) for v in values}
    again = deserialize(transfer(pair, serialize([b"\x01" * size])))
    assert got == values and again == [b"\x01" * size]  # nothing shared or reused
    with pytest.raises(TypeError):
        got[0][0] = 1  # type: ignore[index]
    ca, cb = pair
    whole = os.urandom(size)

    def die_mid_frame():
        ca.sock.sendall(wire.frame_views([b"head", whole])[0])
        ca.sock.sendall(b"head" + whole[: size // 2])
        ca.sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=die_mid_frame)
    sender.start()
    with pytest.raises(wire.ProtocolError, match="truncated"):
        cb.recv()
    sender.join(10)


def test_large_values_travel_out_of_band():
    arr = np.arange(4 * MB, dtype="uint8")
    frames = dumps(serialize(arr))
    assert len(frames) == 2
    assert len(frames[0]) < 1000  # the pickle holds no array data
    view = memoryview(frames[1])
    assert view.nbytes == arr.nbytes
    assert np.shares_memory(np.frombuffer(view, dtype="uint8"), arr)  # not even copied

    data = b"q" * (4 * MB)
    frames = dumps(serialize(data))
    assert len(frames) == 2 and len(frames[0]) < 1000
    assert memoryview(frames[1]).nbytes == len(data)
    assert np.shares_memory(np.frombuffer(memoryview(frames[1]), dtype="uint8"),
                            np.frombuffer(data, dtype="uint8"))  # the bytes object itself

    frames = dumps({"op": "x", "arr": arr})  # also when a message holds an array directly
    assert len(frames) == 2 and len(frames[0]) < 1000

    big = bytearray(3 * MB)
    frames = dumps(serialize(big))
    assert len(frames) == 2 and len(frames[0]) < 1000

    mv = memoryview(b"m" * (3 * MB))
    frames = dumps(serialize(mv))
    assert len(frames) == 2 and len(frames[0]) < 1000


def test_small_values_stay_in_the_pickle():
    assert len(dumps(serialize(b"abc"))) == 1
    assert len(dumps(serialize(np.arange(10)))) == 1
    assert len(dumps({"op": "ping"})) == 1


def test_write_frames_sends_header_and_frames_unjoined():
    a, b = socket.socketpair()
    try:
        frames = [b"head", bytes(10), np.arange(5, dtype="uint8")]
        write_frames(a, frames)
        raw = b""
        expected = 4 + 3 * 8 + 4 + 10 + 5
        while len(raw) < expected:
            raw += b.recv(65536)
        (count,) = struct.unpack("!I", raw[:4])
        lengths = struct.unpack("!3Q", raw[4:28])
        assert count == 3
        assert [n & ~(1 << 63) for n in lengths] == [4, 10, 5]
        assert not lengths[0] >> 63 and not lengths[1] >> 63  # bytes: read-only
        assert lengths[2] >> 63  # numpy memory: the receiver must be able to write it
        assert raw[28:] == b"head" + bytes(10) + bytes(range(5))
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------
# limits and garbage


def _header(*lengths):
    return struct.pack("!I", len(lengths)) + struct.pack(f"!{len(lengths)}Q", *lengths)


def test_oversized_frame_is_refused_before_allocation():
    a, b = socket.socketpair()
    try:
        a.sendall(_header(1 << 40))  # claims a 1 TiB frame, sends nothing else
        rfile = b.makefile("rb")
        # refused from the header alone: nothing allocated, no frame bytes awaited
        with pytest.raises(ProtocolError, match="exceeds"):
            read_frames(rfile, max_frame_bytes=MB)
    finally:
        a.close()
        b.close()


def test_frame_limit_on_connection(pair):
    ca, cb = pair
    cb.max_frame_bytes = MB
    ca.send(serialize(b"ok" * 1000))
    assert deserialize(cb.recv()) == b"ok" * 1000
    too_big = serialize(np.zeros(2 * MB, dtype="uint8"))
    t = threading.Thread(target=lambda: _swallow(ca.send, too_big))
    t.start()
    with pytest.raises(ConnectionError):
        cb.recv()
    assert cb.closed
    t.join(10)


def _swallow(fn, *args):
    try:
        fn(*args)
    except ConnectionError:
        pass


@pytest.mark.parametrize("raw", [
    struct.pack("!I", 0),                     # no frames
    struct.pack("!I", 10 ** 9),               # absurd frame count
    _header(5) + b"abc",                      # truncated frame, then EOF
    _header(4) + b"junk",                     # not a pickle
    b"\x00\x00",                              # truncated header
])
def test_garbage_raises_connection_error(raw):
    a, b = socket.socketpair()
    conn = Connection(b, "peer")
    try:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionError):
            conn.recv()
        assert conn.closed
    finally:
        a.close()
        conn.close()


def test_sum_of_frames_is_limited_too():
    a, b = socket.socketpair()
    try:
        a.sendall(_header(*([MB] * 10)))
        with pytest.raises(ProtocolError):
            read_frames(b.makefile("rb"), max_frame_bytes=2 * MB)
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------
# Server and rpc


class Boom(Exception):
    pass


@pytest.fixture
def server():
    def stream(conn, n):
        for i in range(n):
            conn.send({"i": i})
        return NO_REPLY

    def fail(conn):
        raise Boom("handler failed")

    srv = Server({
        "echo": lambda conn, x=None: x,
        "peer": lambda conn: conn.peer,
        "add": lambda conn, a, b: a + b,
        "fail": fail,
        "stream": stream,
    }, name="test-server")
    host, port = srv.listen("127.0.0.1", 0)
    srv.test_address = f"{host}:{port}"
    yield srv
    srv.stop()


def test_server_dispatches_ops(server):
    conn = wire.connect(server.test_address)
    try:
        assert conn.request({"op": "echo", "x": [1, 2]}) == [1, 2]
        assert conn.request({"op": "add", "a": 2, "b": 3}) == 5
        assert conn.request({"op": "echo"}) is None
        with pytest.raises(RemoteError, match="Boom: handler failed"):
            conn.request({"op": "fail"})
        assert conn.request({"op": "add", "a": 1, "b": 1}) == 2  # still usable
        with pytest.raises(RemoteError, match="TypeError"):
            conn.request({"op": "add", "a": 1})  # bad arguments: an error reply
        conn.send({"op": "stream", "n": 3})
        assert [conn.recv() for _ in range(3)] == [{"i": 0}, {"i": 1}, {"i": 2}]
    finally:
        conn.close()


def test_unknown_op_is_an_error_reply_and_the_connection_stays(server):
    conn = wire.connect(server.test_address)
    try:
        with pytest.raises(RemoteError, match="unknown operation 'no-such-op': test-server has "
                                              "add, echo, fail, peer, stream"):
            conn.request({"op": "no-such-op", "x": 1})
        assert conn.request({"op": "echo", "x": 1}) == 1
        conn.write({"op": "no-such-op"})
        with pytest.raises(RemoteError, match="no-such-op"):
            conn.read()
        conn.write({"op": "echo", "x": 2})
        assert conn.read() == 2
    finally:
        conn.close()


@pytest.mark.parametrize("bad", [
    {"no": "op"},
    {"op": ["not", "a", "name"]},
    ["not", "a", "dict"],
    "a string",
])
def test_non_operation_closes_only_that_connection(server, bad):
    good = wire.connect(server.test_address)
    victim = wire.connect(server.test_address)
    try:
        assert good.request({"op": "echo", "x": 1}) == 1
        victim.send(bad)
        with pytest.raises(ConnectionError):
            victim.recv()
        assert good.request({"op": "echo", "x": 2}) == 2
        fresh = wire.connect(server.test_address)
        assert fresh.request({"op": "echo", "x": 3}) == 3
        fresh.close()
    finally:
        good.close()
        victim.close()


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",      # not a minidist peer at all
    b"\xff" * 64,
    b"",                                      # connects and hangs up
])
def test_garbage_before_handshake_closes_only_that_connection(server, garbage):
    good = wire.connect(server.test_address)
    try:
        host, port = wire.parse_address(server.test_address)
        with socket.create_connection((host, port), timeout=10) as raw:
            try:
                raw.sendall(garbage)
                raw.shutdown(socket.SHUT_WR)
                while raw.recv(4096):  # the server hangs up on it
                    pass
            except (ConnectionResetError, BrokenPipeError, OSError) as e:
                assert not isinstance(e, TimeoutError)
        assert good.request({"op": "echo", "x": "still here"}) == "still here"
    finally:
        good.close()


def test_garbage_after_handshake_closes_only_that_connection(server):
    good = wire.connect(server.test_address)
    victim = wire.connect(server.test_address)
    try:
        victim.sock.sendall(_header(8) + b"notapick")
        victim.sock.settimeout(10)
        assert victim.sock.recv(100) == b""  # closed by the server
        oversized = wire.connect(server.test_address)
        oversized.sock.sendall(_header(1 << 50))
        oversized.sock.settimeout(10)
        assert oversized.sock.recv(100) == b""
        oversized.close()
        assert good.request({"op": "echo", "x": 5}) == 5
    finally:
        good.close()
        victim.close()


def test_rpc_reuses_one_pooled_connection(server):
    pool = ConnectionPool()
    proxy = rpc(server.test_address, pool)
    try:
        peers = {proxy.peer() for _ in range(100)}
        assert len(peers) == 1  # every call came from the same client socket
        assert [proxy.add(a=i, b=1) for i in range(50)] == list(range(1, 51))
        assert proxy.peer() in peers
        wait_for(lambda: len(server._conns) == 1, message="one server-side connection")
        with pytest.raises(RemoteError):
            proxy.fail()
        assert proxy.peer() in peers  # an error reply does not cost the connection
    finally:
        pool.close()


def test_rpc_concurrent_callers_share_the_pool(server):
    pool = ConnectionPool()
    proxy = rpc(server.test_address, pool)
    results = []

    def work(i):
        for j in range(20):
            results.append(proxy.add(a=i, b=j) == i + j)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert len(results) == 80 and all(results)
        assert len(server._conns) <= 4
    finally:
        pool.close()


def test_rpc_redials_after_server_side_close(server):
    pool = ConnectionPool()
    proxy = rpc(server.test_address, pool)
    try:
        first = proxy.peer()
        for conn in list(server._conns):
            conn.close()  # the server drops every connection
        assert proxy.echo(x="back") == "back"  # the stale connection is replaced
        assert proxy.peer() != first
    finally:
        pool.close()


def test_rpc_unreachable_address_raises_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError):
        rpc(f"127.0.0.1:{port}", ConnectionPool(timeout=2)).echo(x=1)


def test_silence_counts_only_while_a_reader_waits_and_nothing_is_waiting(pair):
    """What the center's heartbeat check reads: time spent waiting in recv for bytes."""
    ca, cb = pair
    assert abs(cb.quiet_since() - time.monotonic()) < 1  # no reader: not silent at all
    got = []
    reader = threading.Thread(target=lambda: got.append(cb.recv()))
    reader.start()
    wait_for(lambda: cb.quiet_since() < time.monotonic() - 0.05, 10, message="reader waits")
    since = cb.quiet_since()
    assert cb.quiet_since() == since  # the clock runs from when the wait began
    assert not cb.input_waiting()
    ca.send("news")
    reader.join(10)
    assert got == ["news"]
    assert abs(cb.quiet_since() - time.monotonic()) < 1
    ca.send("unread")
    wait_for(cb.input_waiting, 10, message="unread bytes seen")
    assert cb.recv() == "unread" and not cb.input_waiting()
    cb.close()
    assert not cb.input_waiting()


# ---------------------------------------------------------------------------
# BatchedSender


def test_batched_sender_batches_and_keeps_order(pair):
    ca, cb = pair
    sender = BatchedSender(ca)
    try:
        # The peer reads nothing yet: this frame cannot leave at once, so the
        # stream stays busy and what follows piles up behind it.
        sender.send(serialize(b"x" * (16 * MB)))
        for i in range(1000):
            sender.send({"i": i})
        for i in range(1000, 1010):
            sender.append({"i": i})
        sender.flush()
        frames = [cb.recv()]
        assert deserialize(frames[0][0]) == b"x" * (16 * MB)
        got: list = []
        while len(got) < 1010:
            batch = cb.recv()
            frames.append(batch)
            got += batch
        assert [m["i"] for m in got] == list(range(1010))
        assert len(frames) <= 3  # 1011 messages, at most three writes
    finally:
        sender.close()


def test_batched_sender_append_then_flush_is_one_frame(pair):
    ca, cb = pair
    sender = BatchedSender(ca)
    try:
        for i in range(100):
            sender.append(i)
        sender.flush()
        assert cb.recv() == list(range(100))
    finally:
        sender.close()


def test_batched_sender_sends_promptly_when_idle():
    a, b = socket.socketpair()
    ca, cb = Connection(a, "a"), Connection(b, "b")
    sender = BatchedSender(ca)
    try:
        for i in range(3):
            sender.send(i)
            got = []
            while i not in got:
                got += cb.recv()
        assert got[-1] == 2
    finally:
        sender.close()
        ca.close()
        cb.close()


def test_serialized_is_opaque_and_comparable():
    s = serialize({"a": np.arange(5000)})
    t = pickle.loads(pickle.dumps(s, protocol=5))
    assert isinstance(t, Serialized) and t.header == s.header
    assert [bytes(b) for b in t.buffers] == [bytes(b) for b in s.buffers]
    assert deserialize(t)["a"].sum() == np.arange(5000).sum()
    with pytest.raises(TypeError, match="cannot serialize"):
        serialize(threading.Lock())


def test_tls_and_cloudpickle_load_only_when_needed():
    """Each costs a starting process about 10 ms; plain clusters need neither."""
    code = ("import sys\n"
            "import minidist.center, minidist.worker, minidist.executor\n"
            "from minidist.wire import deserialize, serialize\n"
            "print(sorted(m for m in ('ssl', 'cloudpickle') if m in sys.modules))\n"
            "assert deserialize(serialize(lambda x: x + 1))(1) == 2\n"
            "print('cloudpickle' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "True"]
