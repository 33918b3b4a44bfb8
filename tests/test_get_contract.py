"""dask's own contract for scheduler functions, and keys that must not outlive a call.

``dask.utils_test.GetFunctionTestMixin`` is what dask ships to check foreign
``get`` functions.  It runs here against ``minidist.get`` and ``Executor.get``
on one cluster shared by the whole module, in the mixin's order: a graph that
failed must leave nothing behind for the next graph that uses the same names.
"""

from __future__ import annotations

import signal
import threading
from functools import partial
from operator import add

import pytest
from dask.utils_test import GetFunctionTestMixin

from minidist import Client, Executor, KeyConflictError, LocalCluster, get
from conftest import wait_for
from gates import wait_for_file


def inc(x):
    return x + 1


def boom(x):
    raise RuntimeError(f"boom {x}")


@pytest.fixture(scope="module")
def shared():
    """One cluster for every test here, and an Executor to ask its center what it holds."""
    with LocalCluster(n_workers=2) as cluster, Executor(cluster) as e:
        yield cluster, e


def held(e) -> tuple[int, list]:
    """Tasks the center knows and keys the workers hold (beyond the probe session's)."""
    keys = []
    for w in e.nthreads():
        keys += e._pool.call(w, "keys")
    return e._center("info")["ntasks"], keys


@pytest.fixture(autouse=True)
def nothing_left(shared):
    """After every test, the cluster holds nothing that a call created."""
    cluster, e = shared
    yield
    wait_for(lambda: held(e) == (0, []), timeout=10,
             message=f"an empty cluster after the call (holds {held(e)})")


class TestGet(GetFunctionTestMixin):
    """``minidist.get`` bound to the shared cluster, as dask would call it."""

    @pytest.fixture(autouse=True)
    def _bind(self, shared):
        host, port = shared[0].address.rsplit(":", 1)
        self.get = partial(get, host, int(port))


class TestExecutorGet(GetFunctionTestMixin):
    """``Executor.get`` on the shared cluster."""

    @pytest.fixture(autouse=True)
    def _bind(self, shared):
        self.get = shared[1].get


@pytest.fixture
def g(shared):
    host, port = shared[0].address.rsplit(":", 1)
    return partial(get, host, int(port))


def test_stale_values_never_answer_a_new_graph(g):
    # The sequence that once returned 2 and 3: a failed call, then graphs that
    # reuse its names with other definitions.
    with pytest.raises(KeyError):
        g({"x": 1, "y": 2, "z": (sum, ["x", "y"])}, [["badkey"], "y"])
    assert g({"x": 1, "y": (add, "x", 10)}, "y") == 11
    assert g({"x": 1, "y": (inc, "x"), "z": (add, (inc, "x"), "y")}, "z") == 4


def test_same_names_in_concurrent_graphs(g, tmp_path):
    # Two graphs running at once, each defining "x" its own way.
    gate = str(tmp_path / "gate")
    out = {}
    slow = threading.Thread(target=lambda: out.update(
        a=g({"x": (wait_for_file, 1, gate), "y": (inc, "x")}, "y")))
    slow.start()
    try:
        assert g({"x": 100, "y": (inc, "x")}, "y") == 101
    finally:
        open(gate, "w").close()
        slow.join(30)
    assert out == {"a": 2}


@pytest.mark.parametrize("graph, wanted, error", [
    ({"a": 1, "b": (boom, "a"), "c": (inc, "b"), "d": (inc, "a")}, ["c", "d"], RuntimeError),
    ({"a": 1, "b": (inc, "a")}, ["b", "missing"], KeyError),
    ({"a": (inc, "b"), "b": (inc, "a")}, "a", ValueError),
])
def test_a_failed_call_releases_everything(g, graph, wanted, error):
    with pytest.raises(error):
        g(graph, wanted)
    # ``nothing_left`` asks the center and every worker afterwards


def test_interrupted_call_releases_everything(g, shared, tmp_path):
    # KeyboardInterrupt while the graph runs (a Ctrl-C in the caller).
    gate = str(tmp_path / "gate")
    cluster, e = shared

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            g({"s": (wait_for_file, 1, gate), "t": (inc, "s")}, "t")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        open(gate, "w").close()  # let the worker thread go


def test_explicit_keys_for_two_computations(shared):
    # Two sessions, one key, two different computations: the second is refused
    # with a clear error instead of being answered with the first one's value.
    cluster, e = shared
    with Client(cluster, set_as_default=False) as c1, \
            Client(cluster, set_as_default=False) as c2:
        first = c1.submit(inc, 1, key="answer")
        assert first.result(timeout=30) == 2
        second = c2.submit(inc, 41, key="answer")
        with pytest.raises(KeyConflictError, match="answer"):
            second.result(timeout=30)
        # The same computation under the same key is shared, as before.
        with Executor(cluster) as e3:
            assert e3.submit(inc, 1, key="answer").result(timeout=30) == 2
        # A graph that builds on the refused key is refused too, not computed
        # from the other session's value.
        third = c2.submit(inc, 5, key="taken-dep")
        assert third.result(timeout=30) == 6
        tasks = c1.submit(inc, 0, key="taken-dep")
        after = c1.submit(inc, tasks, key="uses-taken-dep")
        with pytest.raises(KeyConflictError):
            after.result(timeout=30)
        assert first.result() == 2 and third.result() == 6
        del first, second, third, tasks, after


def test_explicit_key_twice_in_one_session(shared):
    cluster, e = shared
    with Executor(cluster) as ex:
        first = ex.submit(inc, 1, key="mine")
        again = ex.submit(inc, 1, key="mine")       # the same task: shared
        other = ex.submit(inc, 2, key="mine")       # another task: refused here
        assert first.result(timeout=30) == again.result(timeout=30) == 2
        with pytest.raises(KeyConflictError, match="mine"):
            other.result(timeout=30)
        del first, again, other


def test_executor_map_with_an_error_midway_releases(shared):
    cluster, e = shared
    with Executor(cluster) as ex:
        results = ex.map(lambda x: 1 // (x - 3), range(6))
        with pytest.raises(ZeroDivisionError):
            list(results)
        del results


def fails_on(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def test_pool_map_with_an_error_midway_releases(shared):
    from minidist import Pool
    cluster, e = shared
    with Pool(cluster) as pool:
        with pytest.raises(ValueError, match="bad item 3"):
            pool.starmap(fails_on, [(i, 3) for i in range(8)])
        with pytest.raises(ValueError):
            pool.apply(fails_on, (1, 1))
        async_result = pool.map_async(partial(fails_on, bad=5), range(8))
        with pytest.raises(ValueError):
            async_result.get(timeout=30)
        del async_result


def test_failed_compute_and_persist_release(shared):
    import dask
    cluster, e = shared
    with Client(cluster, set_as_default=False) as c:
        parts = [dask.delayed(fails_on)(i, 2) for i in range(4)]
        total = dask.delayed(sum)(parts)
        future = c.compute(total)
        with pytest.raises(ValueError, match="bad item 2"):
            future.result(timeout=30)
        persisted = c.persist(parts)
        with pytest.raises(ValueError):
            c.gather(c.compute(persisted))
        del future, persisted
