"""Pool and RemoteData over real cluster processes: the seeds' Pool examples and more."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from minidist import Client, Executor, LocalCluster, Pool, RemoteData
from conftest import wait_for


class Oops(Exception):
    pass


def inc(x):
    return x + 1


def fail(x):
    if x == 3:
        raise Oops(f"bad item {x}")
    return x


def sleep_then(x, seconds):
    time.sleep(seconds)
    return x


def block(i):
    """About 2.4 MB: too big for the center to move it rather than wait for its holder."""
    return np.full(300_000, i, dtype=np.int64)


def pid_and_negative_sum(a):
    return os.getpid(), int(-a.sum())


@pytest.fixture
def pool(cluster):
    p = Pool(cluster.address)
    try:
        yield p
    finally:
        p.terminate()


def test_seed_quickstart_example(pool):
    A = pool.map(lambda x: x**2, range(10))
    assert all(isinstance(a, RemoteData) for a in A)
    assert all(a.status == "finished" for a in A)
    B = pool.map(lambda x: -x, A)
    total = pool.apply(sum, [B])
    assert total.get() == -285
    assert pool.gather(A) == [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]
    assert pool.gather(B) == [-x**2 for x in range(10)]


def test_remote_data_handle(pool, cluster):
    (a,) = pool.map(inc, [41])
    assert a.get() == 42
    assert a.get(timeout=5) == 42
    assert a.ready()
    assert a.key.startswith("inc-")
    assert a.center == cluster.address
    text = repr(a)
    assert a.key in text and cluster.address in text and "finished" in text


def test_apply_async_like_multiprocessing(pool):
    result = pool.apply_async(sleep_then, (7, 1.0))
    assert not result.ready()
    with pytest.raises(ValueError):
        result.successful()
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=0.05)
    data = result.get(timeout=30)
    assert isinstance(data, RemoteData)
    assert data.get() == 7
    assert result.ready() and result.successful()
    result.wait(timeout=1)

    keyword = pool.apply_async(sleep_then, (), {"x": 5, "seconds": 0})
    assert keyword.get(timeout=30).get() == 5


def test_apply_async_callbacks(pool):
    got, errors = [], []
    done = threading.Event()

    def on_value(value):
        got.append(value)
        done.set()

    def on_error(exc):
        errors.append(exc)
        done.set()

    pool.apply_async(inc, (1,), callback=on_value, error_callback=on_error).wait(30)
    wait_for(done.is_set, 10, message="callback")
    assert len(got) == 1 and isinstance(got[0], RemoteData) and got[0].get() == 2
    done.clear()
    pool.apply_async(fail, (3,), callback=on_value, error_callback=on_error).wait(30)
    wait_for(done.is_set, 10, message="error callback")
    assert len(errors) == 1 and isinstance(errors[0], Oops)


def test_map_async_and_starmap(pool):
    many = pool.map_async(inc, range(5))
    assert pool.gather(many.get(timeout=30)) == [1, 2, 3, 4, 5]
    pairs = pool.starmap(pow, [(2, 3), (3, 2), (10, 0)])
    assert pool.gather(pairs) == [8, 9, 1]
    star = pool.starmap_async(pow, [(2, 5)])
    assert pool.gather(star.get(timeout=30)) == [32]


def test_scatter_and_gather_shapes(pool):
    remote = pool.scatter([10, 20, 30])
    assert all(isinstance(r, RemoteData) for r in remote)
    assert pool.gather(remote) == [10, 20, 30]
    by_name = pool.scatter({"pool-x": 1, "pool-y": 2})
    assert set(by_name) == {"pool-x", "pool-y"} and by_name["pool-x"].key == "pool-x"
    assert pool.gather(by_name) == {"pool-x": 1, "pool-y": 2}
    one = pool.scatter(np.arange(5))
    assert isinstance(one, RemoteData) and one.get().tolist() == [0, 1, 2, 3, 4]
    nested = {"a": [remote[0], (remote[1], 7)], "b": by_name["pool-y"]}
    assert pool.gather(nested) == {"a": [10, (20, 7)], "b": 2}
    moved = pool.map(inc, remote)
    assert pool.gather(moved) == [11, 21, 31]
    assert pool.apply(sum, [remote], {"start": 4}).get() == 64


def test_errors_are_raised_with_their_type(pool):
    with pytest.raises(Oops, match="bad item 3"):
        pool.map(fail, range(6))
    with pytest.raises(ZeroDivisionError):
        pool.apply(lambda: 1 / 0)
    result = pool.apply_async(fail, (3,))
    with pytest.raises(Oops):
        result.get(timeout=30)
    assert result.ready() and not result.successful()
    assert pool.gather(pool.map(fail, [1, 2])) == [1, 2]  # the pool still works


def test_remote_data_as_argument_to_executor_and_client(pool, cluster):
    A = pool.map(inc, range(4))
    with Executor(cluster) as e:
        assert e.submit(sum, A).result(timeout=30) == 10
        assert e.submit(inc, A[0]).result(timeout=30) == 2
    client = Client(cluster, set_as_default=False)
    try:
        assert client.submit(lambda d: d["x"] * 2, {"x": A[3]}).result(timeout=30) == 8
    finally:
        client.close()


def test_map_over_remote_data_runs_on_the_holding_worker(pool, cluster):
    A = pool.map(block, range(6))
    with Executor(cluster) as e:
        holders = e.who_has([a._future for a in A])
    assert all(len(holders[a.key]) == 1 for a in A)
    pid_of = {w.address: w.pid for w in cluster.workers}
    B = pool.map(pid_and_negative_sum, A)
    for a, (pid, total), i in zip(A, pool.gather(B), range(6)):
        assert total == -300_000 * i
        assert pid == pid_of[holders[a.key][0]], f"item {i} ran away from its data"
    with Executor(cluster) as e:
        after = e.who_has([a._future for a in A])
    assert after == holders  # no copies were made


def test_pickled_remote_data_in_this_process(pool):
    (a,) = pool.map(inc, [99])
    copy = pickle.loads(pickle.dumps(a))
    assert isinstance(copy, RemoteData) and copy.key == a.key
    assert copy.get() == 100
    assert pool.apply(inc, [copy]).get() == 101


def test_pickled_remote_data_in_another_process(pool, cluster):
    (a,) = pool.map(inc, [1000])
    blob = pickle.dumps(a)
    script = ("import pickle, sys; rd = pickle.loads(sys.stdin.buffer.read()); "
              "print(rd.get(timeout=30), flush=True)")
    env = {**os.environ, "MINIDIST_AUTH_KEY": cluster.auth_key.decode()}
    done = subprocess.run([sys.executable, "-c", script], input=blob, env=env,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "1001"


def test_data_is_released_when_no_handle_is_left(pool):
    A = pool.map(lambda x: x * 3, range(5))
    keys = [a.key for a in A]
    client = pool._client
    assert set(client.who_has([a._future for a in A])) == set(keys)
    alias = A[2]
    del A
    wait_for(lambda: set(client._center("who_has", keys=keys)) == {alias.key},
             message="released keys")
    assert alias.get() == 6
    del alias
    wait_for(lambda: not client._center("who_has", keys=keys), message="last key released")


def test_close_join_terminate(cluster):
    pool = Pool(cluster)
    pending = pool.apply_async(sleep_then, (3, 0.3))
    with pytest.raises(ValueError):
        pool.join()  # still running
    pool.close()
    with pytest.raises(ValueError):
        pool.map(inc, [1])
    pool.join()
    assert pending.ready() and pending.get().get() == 3
    pool.terminate()
    with pytest.raises(ValueError):
        pool.apply(inc, (1,))


def test_context_manager_terminates(cluster):
    with Pool(cluster.address) as pool:
        assert pool.apply(inc, (1,)).get() == 2
        session = pool._client
    assert session._shutdown


def test_pool_without_address_owns_a_cluster():
    with Pool(2) as pool:
        assert pool.gather(pool.map(inc, range(3))) == [1, 2, 3]
        cluster = pool._client._cluster
        assert isinstance(cluster, LocalCluster) and len(cluster.workers) == 2
        procs = [cluster.center, *cluster.workers]
    assert all(p.popen.poll() is not None for p in procs)
