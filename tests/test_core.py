"""The end-to-end example of the cluster-core issue, over real processes."""

import concurrent.futures as cf

from minidist import Client, Executor


def inc(x):
    return x + 1


def double(x):
    return 2 * x


def test_executor_map_and_futures_on_futures(e):
    assert list(e.map(pow, range(5), range(5))) == [1, 1, 4, 27, 256]
    x = e.submit(inc, 1)
    y = e.submit(double, x)
    assert y.result(timeout=10) == 4
    assert isinstance(x, cf.Future) and isinstance(e, cf.Executor)


def test_client_map_stays_remote(c):
    futures = c.map(inc, range(1000))
    assert all(not isinstance(f, int) for f in futures)
    assert c.submit(sum, futures).result(timeout=30) == sum(range(1, 1001))
    assert c.gather(futures)[:5] == [1, 2, 3, 4, 5]


def test_executor_without_address_owns_a_cluster():
    with Executor() as e:
        assert e.submit(inc, 41).result(timeout=20) == 42
        cluster = e._cluster
        assert len(cluster.workers) == 2
    assert all(p.popen.poll() is not None for p in [cluster.center, *cluster.workers] if p)
