"""Every Executor/Client example of the original documents, with their values.

The Executor page (seed 002) and the Client page (seed 003), with
``minidist`` in place of ``distributed``.  ``Executor.map`` follows PEP 3148
here (an iterator of results), so the examples that use the futures
``map`` returns run on a ``Client``; those that work as written on an
Executor run there too.  The foundations page (seed 004): a server built
from named handlers, talked to with ``connect`` and ``rpc``, with blocking
calls in place of ``await``.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import socket
import subprocess
import sys
import threading
import time
from glob import glob
from operator import add

import pytest

from minidist import Client, Executor, Future
from minidist.core import RemoteError, Server, connect, rpc

from conftest import wait_for

HEX32 = r"[0-9a-f]{32}"
UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
UUID1 = r"[0-9a-f]{8}-[0-9a-f]{4}-1[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}"


def inc(x):
    return x + 1


def double(x):
    return 2 * x


def finished(futures):
    cf.wait(futures, timeout=30)
    return all(f.status == "finished" for f in futures)


# ---------------------------------------------------------------------------
# Seed 002: the Executor page


@pytest.fixture(params=["Executor", "Client"])
def session(request, cluster):
    """The seed's ``e``: once as an Executor, once as a Client."""
    cls = Executor if request.param == "Executor" else Client
    s = cls(cluster.address)
    try:
        yield s
    finally:
        s.shutdown()


def test_seed002_connect_by_address_string(cluster):
    host, port = cluster.address.split(":")
    e = Executor(f"{host}:{port}")
    try:
        assert e.submit(inc, 1).result(timeout=10) == 2
    finally:
        e.shutdown()


def test_seed002_submit_and_result(session):
    future = session.submit(inc, 1)  # calls inc(1) on a worker
    cf.wait([future], timeout=10)
    assert re.fullmatch(rf"<Future: status: finished, key: inc-{HEX32}>", repr(future))
    assert future.result() == 2


def test_seed002_map_and_gather(c):
    futures = c.map(inc, range(5))  # calls inc(0), inc(1), inc(2), ...
    assert isinstance(futures, list) and len(futures) == 5
    assert finished(futures)
    for f in futures:
        assert re.fullmatch(rf"<Future: status: finished, key: inc-{HEX32}>", repr(f))
    assert len({f.key for f in futures}) == 5
    assert futures[1].key == c.submit(inc, 1).key  # the seed shows the same key twice
    assert c.gather(futures) == [1, 2, 3, 4, 5]


def test_seed002_map_and_gather_on_executor_is_pep3148(e):
    # On an Executor, map yields the results themselves.
    assert list(e.map(inc, range(5))) == [1, 2, 3, 4, 5]
    futures = [e.submit(inc, i) for i in range(5)]
    assert e.gather(futures) == [1, 2, 3, 4, 5]


def test_seed002_submit_and_map_on_futures(session, c):
    future = session.submit(inc, 1)
    future2 = session.submit(double, future)
    assert future2.result(timeout=10) == 4

    futures = c.map(inc, range(5))
    doubled = c.map(double, futures)  # map over futures
    assert c.gather(doubled) == [2, 4, 6, 8, 10]


def test_seed002_submit_and_map_with_many_inputs(c):
    futures = c.map(double, range(10))
    total = c.submit(sum, futures)  # call sum on a list of futures
    assert total.result(timeout=10) == 90


def test_seed002_submit_with_args_and_kwargs(session):
    def function(a, b, scale=1):
        return (a + b) * scale

    assert session.submit(function, 1, 2, scale=10).result(timeout=10) == 30
    if isinstance(session, Client):
        futures = session.map(function, [1, 2], [3, 4], scale=2)
        assert session.gather(futures) == [8, 12]


def test_seed002_scatter(session):
    futures = session.scatter([1, 2, 3])
    assert isinstance(futures, list) and len(futures) == 3
    for i, f in enumerate(futures):
        assert isinstance(f, Future)
        assert re.fullmatch(rf"<Future: status: finished, key: {UUID1}-{i}>",
                            repr(f))
    assert len({f.key.rsplit("-", 1)[0] for f in futures}) == 1  # one prefix per call
    assert session.gather(futures) == [1, 2, 3]


def write_csvs(directory):
    import pandas as pd
    frames = {}
    for day in ("2015-01-01", "2015-01-02", "2015-02-01"):
        df = pd.DataFrame({"date": pd.to_datetime([day] * 3), "value": [1.0, 2.0, 3.0]})
        path = os.path.join(directory, f"{day}.csv")
        df.to_csv(path, index=False)
        frames[path] = df
    return frames


def test_seed002_scatter_local_dataframes(session, tmp_path):
    import pandas as pd
    frames = write_csvs(str(tmp_path))
    filenames = sorted(glob(str(tmp_path / "2015-*-*.csv")))
    assert len(filenames) == 3
    futures = []
    for fn in filenames:
        df = pd.read_csv(fn, parse_dates=["date"])
        futures.extend(session.scatter([df]))
    assert len(futures) == 3 and finished(futures)
    for fn, got in zip(filenames, session.gather(futures)):
        pd.testing.assert_frame_equal(got, frames[fn])


def test_seed002_scatter_filenames_then_map_read_csv(c, tmp_path):
    import pandas as pd
    frames = write_csvs(str(tmp_path))
    filenames = sorted(glob(str(tmp_path / "2015-*-*.csv")))
    filename_futures = c.scatter(filenames)
    futures = c.map(pd.read_csv, filename_futures, parse_dates=["date"])
    assert all(re.fullmatch(rf"read_csv-{HEX32}", f.key) for f in futures)
    results = c.gather(futures)
    for fn, got in zip(filenames, results):
        pd.testing.assert_frame_equal(got, frames[fn])
        assert str(got["date"].dtype).startswith("datetime64")


# ---------------------------------------------------------------------------
# Seed 003: the Client page


def test_seed003_client_concurrent_futures(c):
    x = c.submit(inc, 10)
    assert re.fullmatch(rf"inc-{HEX32}", x.key)
    L = c.map(inc, range(1000))
    assert len(L) == 1000 and all(isinstance(f, Future) for f in L)
    assert all(re.fullmatch(rf"inc-{HEX32}", f.key) for f in L)
    assert L[10].key == x.key and L[9].key != x.key  # the same call has the same key

    y = c.submit(inc, x)      # Submit on x, a Future
    total = c.submit(sum, L)  # Map on L, a list of Futures
    assert x.result(timeout=30) == 11
    assert y.result(timeout=30) == 12
    assert total.result(timeout=30) == sum(range(1, 1001))
    gathered = c.gather(L)
    assert gathered[:5] == [1, 2, 3, 4, 5] and gathered == list(range(1, 1001))


def test_seed003_results_live_on_workers(c):
    L = c.map(inc, range(100, 110))
    assert finished(L)
    who = c.who_has(L)
    assert set(who) == {f.key for f in L}
    workers = set(c.nthreads())
    assert all(holders and set(holders) <= workers for holders in who.values())


def test_seed003_pure_keys(c):
    x = c.submit(add, 1, 2)
    assert re.fullmatch(rf"add-{HEX32}", x.key)
    assert c.submit(add, 1, 2).key == x.key
    assert x.result(timeout=10) == 3


KEY_SCRIPT = """
from operator import add
from minidist import Client
client = Client({address!r}, auth_key={key!r})
print(client.submit(add, 1, 2).key)
client.close()
"""


def test_seed003_same_key_on_another_process(c, cluster):
    key = c.submit(add, 1, 2).key
    out = subprocess.run(
        [sys.executable, "-c", KEY_SCRIPT.format(address=cluster.address,
                                                 key=cluster.auth_key.decode())],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [key]


def test_seed003_impure_keys(c):
    import numpy as np
    a = c.submit(np.random.random, 1000, pure=False)
    b = c.submit(np.random.random, 1000, pure=False)
    name = np.random.random.__name__  # 'random_sample' in the seed's numpy, 'random' now
    assert re.fullmatch(rf"{name}-{UUID4}", a.key)
    assert re.fullmatch(rf"{name}-{UUID4}", b.key)
    assert a.key != b.key
    va, vb = c.gather([a, b])
    assert va.shape == vb.shape == (1000,)
    assert not np.array_equal(va, vb)


def test_seed003_impure_call_runs_again(c):
    import numpy as np
    first = c.submit(np.random.random, 5, pure=False).result(timeout=10)
    second = c.submit(np.random.random, 5, pure=False).result(timeout=10)
    assert not np.array_equal(first, second)
    pure1 = c.submit(np.random.random, 5)
    pure2 = c.submit(np.random.random, 5)
    assert pure1.key == pure2.key
    assert np.array_equal(pure1.result(timeout=10), pure2.result(timeout=10))


def test_seed003_client_results_stay_until_released(c):
    x = c.submit(inc, 2000)
    assert x.result(timeout=10) == 2001
    key = x.key
    assert key in c.who_has()
    del x
    import gc
    gc.collect()
    wait_for(lambda: key not in c.who_has(), message="released key deleted")


# ---------------------------------------------------------------------------
# Seed 004: the foundations page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def seed_server():
    """The seed's server side as written; a free port in place of 8888 (others may hold it)."""
    port = free_port()

    def add(comm, x=None, y=None):  # simple handler, just a function
        return x + y

    def stream_data(comm, interval=1):  # complex handler, multiple responses
        data = 0
        while True:
            time.sleep(interval)
            data += 1
            comm.write(data)

    s = Server({'add': add, 'stream_data': stream_data})
    s.listen(f'tcp://:{port}')   # listen on TCP port 8888
    assert s.port == port
    try:
        yield s
    finally:
        s.stop()


def test_seed004_client_side(seed_server):
    address = f'tcp://127.0.0.1:{seed_server.port}'

    def f():
        comm = connect(address)
        comm.write({'op': 'add', 'x': 1, 'y': 2})
        result = comm.read()
        comm.close()
        return result

    assert f() == 3

    def g(n):  # the seed's loop reads forever; three values here, at a shorter interval
        comm = connect(address)
        comm.write({'op': 'stream_data', 'interval': 0.01})
        results = [comm.read() for _ in range(n)]
        comm.close()
        return results

    assert g(3) == [1, 2, 3]
    # The streaming handler notices the closed connection at its next write and ends.
    wait_for(lambda: not seed_server._conns, 10, message="stream handler ended")


def test_seed004_client_side_with_rpc(seed_server):
    with rpc(f'tcp://127.0.0.1:{seed_server.port}') as r:
        result = r.add(x=1, y=2)
    assert result == 3


def test_seed004_one_rpc_shared_by_many_threads(seed_server):
    results = {}

    def work(i):
        results[i] = [r.add(x=i, y=j) for j in range(50)]

    with rpc(f'tcp://127.0.0.1:{seed_server.port}') as r:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == {i: [i + j for j in range(50)] for i in range(8)}
        assert 1 <= len(seed_server._conns) <= 8  # pooled, not one connection per call
    wait_for(lambda: not seed_server._conns, 10, message="connections closed with the rpc")


def test_seed004_unknown_op_is_an_error_for_that_call_only(seed_server):
    with rpc(f'tcp://127.0.0.1:{seed_server.port}') as r:
        assert r.add(x=1, y=2) == 3
        with pytest.raises(RemoteError, match="unknown operation 'sub'.*add, stream_data"):
            r.sub(x=1, y=2)
        with pytest.raises(RemoteError, match="TypeError"):
            r.add(x=1)  # the handler raised: an error for this call, too
        assert r.add(x=2, y=3) == 5
        assert len(seed_server._conns) == 1  # the same pooled connection served every call
    comm = connect(f'tcp://127.0.0.1:{seed_server.port}')
    try:
        comm.write({'op': 'sub', 'x': 1, 'y': 2})
        with pytest.raises(RemoteError, match="unknown operation 'sub'"):
            comm.read()
        comm.write({'op': 'add', 'x': 1, 'y': 2})
        assert comm.read() == 3
    finally:
        comm.close()


@pytest.mark.parametrize("form", ["int", "str", ":port", "tcp://host:port", "tcp://:port"])
def test_seed004_listen_address_forms(form):
    port = free_port()
    address = {"int": port, "str": str(port), ":port": f":{port}",
               "tcp://host:port": f"tcp://127.0.0.1:{port}", "tcp://:port": f"tcp://:{port}"}
    s = Server({'add': lambda comm, x=None, y=None: x + y})
    assert s.listen(address[form]) == ("127.0.0.1", port)  # no auth key: loopback only
    try:
        assert s.port == port
        with rpc(f'127.0.0.1:{port}') as r:
            assert r.add(x=1, y=2) == 3
    finally:
        s.stop()


def test_seed004_port_zero_picks_a_port():
    servers = [Server({'add': lambda comm, x=None, y=None: x + y}) for _ in range(2)]
    servers[0].listen(0)
    servers[1].listen('tcp://:0')
    try:
        assert servers[0].port != servers[1].port and all(s.port > 0 for s in servers)
        for s in servers:
            with rpc(('127.0.0.1', s.port)) as r:
                assert r.add(x=1, y=2) == 3
    finally:
        for s in servers:
            s.stop()
    with pytest.raises(ValueError, match="not an address"):
        Server({}).listen('tcp://:port')


def test_seed004_server_keeps_serving_after_garbage(seed_server):
    address = ('127.0.0.1', seed_server.port)
    with rpc(address) as r:
        assert r.add(x=1, y=2) == 3
        with socket.create_connection(address, timeout=10) as raw:  # not a minidist peer
            try:
                raw.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)))
                raw.shutdown(socket.SHUT_WR)
                while raw.recv(4096):  # until the server hangs up on it
                    pass
            except OSError as e:  # it may have hung up already
                assert not isinstance(e, TimeoutError)
        victim = connect(address)
        victim.sock.sendall(b"\x00\x00\x00\x01" + b"\xff" * 8)  # a frame header 4 EB long
        victim.sock.settimeout(10)
        assert victim.sock.recv(100) == b""  # that one connection is closed
        victim.close()
        not_an_op = connect(address)
        not_an_op.write(["not", "an", "operation"])
        with pytest.raises(ConnectionError):
            not_an_op.read()
        not_an_op.close()
        assert r.add(x=2, y=2) == 4  # the pooled connection is still served
        fresh = connect(address)
        fresh.write({'op': 'add', 'x': 3, 'y': 3})
        assert fresh.read() == 6
        fresh.close()
