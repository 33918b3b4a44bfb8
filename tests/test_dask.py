"""The dask scheduler function and dask collections on real cluster processes."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from functools import partial
from operator import add

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from minidist import Client, Executor, Pool, get
from minidist.wire import AuthenticationError
from conftest import wait_for
from gates import wait_for_file


class Custom(Exception):
    pass


def inc(x):
    return x + 1


def boom(x):
    raise Custom(f"boom {x}")


def div(a, b):
    return a / b


def total(*args):
    return sum(args)


def record(x, path):
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return x


@pytest.fixture(scope="module")
def hp(cluster):
    host, port = cluster.address.rsplit(":", 1)
    return host, int(port)


def worker_pids(cluster):
    return {w.pid for w in cluster.workers}


def cluster_keys(e, keys):
    """Which of ``keys`` the center still knows, and which are on some worker."""
    known = e._center("who_has", keys=keys)
    held = {k for k, holders in known.items() if holders}
    return known, held


# ---------------------------------------------------------------------- raw graphs


def test_seed_get_examples(hp):
    host, port = hp
    inc_ = lambda x: x + 1  # noqa: E731  (the seed's own lambda)
    dsk = {"a": 1, "b": (inc_, "a")}
    assert get(host, port, dsk, "b") == 2
    get2 = partial(get, host, port)
    x = da.arange(10, chunks=(5,))
    assert x.sum().compute(scheduler=get2) == 45


def test_raw_graph_features(hp):
    host, port = hp
    dsk = {
        "lit": 10,
        "lst": [1, 2, 3],
        ("x", 0, 1): (inc, "lit"),                       # tuple key
        "nested": (add, (inc, "lit"), (inc, (inc, 1))),  # tasks inside arguments
        "keys": (sum, ["lit", ("x", 0, 1), "nested"]),   # a list of keys as an argument
        "alias": "keys",                                 # a key whose value is a key
        "listval": ["lit", (inc, "lit"), 5],             # a list value with keys and tasks
        "kw": (total, "lit", ("x", 0, 1)),
        "str": (str.upper, "not-a-key"),                 # strings that are not keys stay
        "tup": (list, ("lit", 1)),                       # a tuple of a key and a literal
    }
    assert get(host, port, dsk, "lit") == 10
    assert get(host, port, dsk, ("x", 0, 1)) == 11
    assert get(host, port, dsk, "nested") == 14
    assert get(host, port, dsk, "keys") == 10 + 11 + 14
    assert get(host, port, dsk, ["alias", "lst"]) == (35, [1, 2, 3])
    assert get(host, port, dsk, [["alias"], [("x", 0, 1), ["kw", "listval"]]]) == \
        ((35,), (11, (21, [10, 11, 5])))
    assert get(host, port, dsk, ["str", "tup"]) == ("NOT-A-KEY", [10, 1])
    assert get(host, port, dsk, []) == ()


def test_raw_graph_with_futures_and_remote_data(hp, cluster):
    host, port = hp
    with Executor(cluster) as e:
        f = e.submit(inc, 1)
        with Pool(cluster) as pool:
            (r,) = pool.map(inc, [10])
            dsk = {"with-handles": (add, f, (sum, [r, f]))}
            assert get(host, port, dsk, "with-handles") == 2 + 11 + 2
            assert e.get(dsk, ["with-handles"]) == (15,)


def test_errors_keep_their_type(hp):
    host, port = hp
    with pytest.raises(Custom, match="boom 1"):
        get(host, port, {"e-a": 1, "e-b": (boom, "e-a"), "e-c": (inc, "e-b")}, "e-c")
    with pytest.raises(ZeroDivisionError):
        get(host, port, {"z": (div, 1, 0)}, ["z"])
    with pytest.raises(ZeroDivisionError):
        dask.delayed(div)(1, 0).compute(scheduler=partial(get, host, port))
    assert get(host, port, {"ok": (inc, 1)}, "ok") == 2  # still serving


def test_bad_graphs_get_a_clear_error(hp):
    host, port = hp
    with pytest.raises(ValueError, match="cycle"):
        get(host, port, {"cy-a": (inc, "cy-b"), "cy-b": (inc, "cy-a"), "cy-c": 1}, "cy-a")
    with pytest.raises(ValueError, match="cycle"):
        get(host, port, {"cy-self": (inc, "cy-self")}, "cy-self")
    with pytest.raises(TypeError):
        get(host, port, 42, "x")
    assert get(host, port, {"cy-a": 1, "cy-b": (inc, "cy-a")}, "cy-b") == 2


def test_connection_options(hp, cluster):
    host, port = hp
    with pytest.raises(AuthenticationError):
        get(host, port, {"a": 1}, "a", auth_key=b"not the key", timeout=5)
    assert get(host, port, {"a": (inc, 1)}, "a", auth_key=cluster.auth_key, timeout=5) == 2


def keys_named(e, prefix):
    """Keys the center or any worker still has whose name starts with ``prefix``."""
    names = [k if isinstance(k, str) else k[0] for k in e._center("who_has")]
    for w in e.nthreads():
        names += [k if isinstance(k, str) else k[0] for k in e._pool.call(w, "keys")]
    return [n for n in names if str(n).startswith(prefix)]


def test_no_keys_left_after_get(hp, e):
    host, port = hp
    base = e._center("info")["ntasks"]
    dsk = {f"nk-{i}": (inc, i) for i in range(20)}
    dsk["nk-sum"] = (sum, list(dsk))
    assert get(host, port, dsk, "nk-sum") == sum(range(1, 21))
    wait_for(lambda: e._center("info")["ntasks"] <= base and not keys_named(e, "nk-"),
             message="keys released")


def test_no_growth_after_many_calls(hp, e):
    host, port = hp
    get(host, port, {"g-a": 1, "g-b": (inc, "g-a")}, "g-b")  # warm the shared session
    base = e._center("info")["ntasks"]
    for i in range(100):
        dsk = {"g-a": i, "g-b": (inc, "g-a"), f"g-{i}": (add, "g-b", "g-a")}
        assert get(host, port, dsk, [f"g-{i}", "g-b"]) == (2 * i + 1, i + 1)
    wait_for(lambda: e._center("info")["ntasks"] <= base, message="no task left behind")


def test_intermediate_keys_released_while_the_graph_runs(hp, e, tmp_path):
    host, port = hp
    gate = str(tmp_path / "gate")
    dsk = {"im-a": (np.arange, 1000), "im-b": (np.sum, "im-a"),
           "im-c": (wait_for_file, "im-b", gate)}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        result = pool.submit(get, host, port, dsk, "im-c")
        wait_for(lambda: keys_named(e, "im-b"), message="im-b in memory")
        wait_for(lambda: not keys_named(e, "im-a"), message="im-a deleted")
        assert not result.done()
        open(gate, "w").close()
        assert result.result(timeout=30) == sum(range(1000))


# ---------------------------------------------------------------------- dask collections


def test_dask_array_matches_the_synchronous_scheduler(hp):
    sched = partial(get, *hp)
    x = da.arange(1000, chunks=100).reshape((10, 100)).rechunk((5, 25))
    y = (x + x.T[:10, :10].sum()) * 2
    for expr in (y.sum(), y.mean(axis=0), y[::3, 5:20].std(), da.dot(x, x.T)):
        ours = expr.compute(scheduler=sched)
        np.testing.assert_allclose(ours, expr.compute(scheduler="sync"))


def test_dask_array_graph_of_thousands_of_tasks(hp):
    from dask._expr import FinalizeCompute
    from dask.base import collections_to_expr
    x = da.ones((800, 800), chunks=(20, 20))
    y = (x + x.T).sum(axis=0)
    sent = FinalizeCompute(collections_to_expr([y])).optimize().__dask_graph__()
    assert len(sent) >= 2000
    result = y.compute(scheduler=partial(get, *hp))
    np.testing.assert_array_equal(result, np.full(800, 1600.0))


def test_dask_bag_matches_the_synchronous_scheduler(hp):
    sched = partial(get, *hp)
    b = db.from_sequence(range(100), npartitions=7)
    pipeline = b.map(lambda v: v * 3).filter(lambda v: v % 2).map(lambda v: (v % 5, v))
    assert pipeline.compute(scheduler=sched) == pipeline.compute(scheduler="sync")
    folded = pipeline.foldby(lambda kv: kv[0], lambda acc, kv: acc + kv[1], 0, add, 0)
    assert sorted(folded.compute(scheduler=sched)) == sorted(folded.compute(scheduler="sync"))
    assert b.sum().compute(scheduler=sched) == 4950


def test_dask_dataframe_matches_the_synchronous_scheduler(hp):
    sched = partial(get, *hp)
    pdf = pd.DataFrame({"k": list("abcde") * 40, "v": np.arange(200.0),
                        "w": np.arange(200) % 7})
    df = dd.from_pandas(pdf, npartitions=5)
    pd.testing.assert_series_equal(df.groupby("k").v.mean().compute(scheduler=sched),
                                   df.groupby("k").v.mean().compute(scheduler="sync"))
    query = df[df.w > 2].assign(z=df.v * 2)[["k", "z"]]
    pd.testing.assert_frame_equal(query.compute(scheduler=sched),
                                  query.compute(scheduler="sync"))
    assert len(df) == 200


def test_dask_delayed_matches_the_synchronous_scheduler(hp):
    sched = partial(get, *hp)
    parts = [dask.delayed(inc)(i) for i in range(10)]
    pairs = [dask.delayed(add)(a, b) for a, b in zip(parts[:-1], parts[1:])]
    out = dask.delayed(sum)(pairs)
    nested = dask.delayed(dict)(a=parts[0], b=[parts[1], (parts[2], 7)])
    assert out.compute(scheduler=sched) == out.compute(scheduler="sync") == 99
    assert dask.compute(out, nested, scheduler=sched) == \
        dask.compute(out, nested, scheduler="sync")
    containers = dask.delayed(lambda d, s: (d["a"] + d["b"][0], sorted(s)))(
        {"a": parts[0], "b": [parts[1]]}, {parts[2], parts[3]})
    assert containers.compute(scheduler=sched) == containers.compute(scheduler="sync") == \
        (3, [3, 4])


# ---------------------------------------------------------------------- Client / Executor


def test_client_is_dasks_default_scheduler(cluster):
    before = dask.config.get("scheduler", None)
    client = Client(cluster)
    try:
        assert dask.config.get("scheduler") == client.get
        pid = dask.delayed(os.getpid)().compute()
        assert pid in worker_pids(cluster)
        pdf = pd.DataFrame({"k": list("ab") * 10, "v": range(20)})
        df = dd.from_pandas(pdf, npartitions=3)
        means = df.groupby("k").v.mean()
        pd.testing.assert_series_equal(means.compute(), means.compute(scheduler="sync"))
        other = Client(cluster, set_as_default=False)
        assert dask.config.get("scheduler") == client.get
        other.close()
    finally:
        client.close()
    assert dask.config.get("scheduler", None) == before


def test_default_scheduler_restored_past_closed_clients(cluster):
    before = dask.config.get("scheduler", None)
    first = Client(cluster)
    second = Client(cluster)
    assert dask.config.get("scheduler") == second.get
    first.close()
    assert dask.config.get("scheduler") == second.get
    second.close()
    assert dask.config.get("scheduler", None) == before


def test_executor_get(e):
    assert e.get({"x": 1, "y": (inc, "x")}, ["y", ["x"]]) == (2, (1,))
    x = da.arange(10, chunks=(5,))
    assert x.sum().compute(scheduler=e.get) == 45


def test_compute_returns_futures(c):
    x = da.arange(10, chunks=(5,))
    future = c.compute(x.sum())
    assert future.result(timeout=30) == 45
    futures = c.compute([x.sum(), x.mean(), 7])
    assert futures[2] == 7
    assert [f.result(timeout=30) for f in futures[:2]] == [45, 4.5]
    assert c.compute(dask.delayed(inc)(1)).result(timeout=30) == 2


def test_persist_then_two_computes(c, tmp_path):
    path = str(tmp_path / "runs")
    b = db.from_sequence(range(8), npartitions=4).map(record, path)
    persisted = c.persist(b)
    assert type(persisted) is type(b)
    keys = list(dask.core.flatten(persisted.__dask_keys__()))
    wait_for(lambda: len(cluster_keys(c, keys)[1]) == len(keys), message="persisted")
    assert persisted.sum().compute() == 28
    assert persisted.count().compute() == 8
    with open(path) as f:
        assert sorted(int(line) for line in f) == list(range(8))  # each item ran once

    x = da.random.default_rng(0).random((40, 40), chunks=(10, 10))
    xp = c.persist(x)
    assert type(xp) is type(x)
    expected = x.compute(scheduler="sync")
    np.testing.assert_allclose(xp.sum().compute(), expected.sum())
    np.testing.assert_allclose((xp + 1).T.compute(), (expected + 1).T)
    (again,) = dask.persist(x)  # through the default scheduler: the client's persist
    assert type(again) is type(x)
    np.testing.assert_allclose(again.persist().max().compute(), expected.max())

    df = dd.from_pandas(pd.DataFrame({"v": range(30)}), npartitions=3)
    dfp = c.persist(df)
    assert dfp.v.sum().compute() == 435
    assert len(dfp) == 30

    del persisted
    wait_for(lambda: not cluster_keys(c, keys)[0], message="persisted keys released")


def test_futures_inside_delayed(c):
    future = c.submit(inc, 1)
    assert dask.delayed(inc)(future).compute() == 3
    assert dask.delayed(sum)([future, future, 1]).compute() == 5
    assert dask.delayed(future).compute() == 2
    assert c.compute(dask.delayed(add)(future, 10)).result(timeout=30) == 12
    remote = c.scatter([5, 6])
    assert dask.delayed(lambda xs: [v * 2 for v in xs])(remote).compute() == [10, 12]


def run_script(cluster, script: str) -> None:
    """Run ``script`` in a fresh interpreter that may use ``cluster``; it must print ok."""
    env = {**os.environ, "MINIDIST_AUTH_KEY": cluster.auth_key.decode()}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "ok"


def test_import_without_dask(cluster, hp):
    host, port = hp
    script = f"""
import sys
sys.modules['dask'] = None
import minidist
from minidist import Client, get
inc = lambda x: x + 1
assert get({host!r}, {port}, {{'a': 1, 'b': (inc, 'a'), 'c': ['b', (inc, 'b')]}}, 'c') == [2, 3]
client = Client({cluster.address!r})
assert client.submit(inc, 1).result(timeout=30) == 2
client.close()
assert sys.modules['dask'] is None and 'dask.config' not in sys.modules
print('ok')
"""
    run_script(cluster, script)


def test_client_becomes_the_default_when_dask_is_imported_after_it(cluster):
    """Opening a Client does not import dask; importing dask later makes it the default."""
    script = f"""
import os, sys
from minidist import Client
first = Client({cluster.address!r})
second = Client({cluster.address!r})
closed = Client({cluster.address!r})
closed.close()
loaded = [m for m in ('dask', 'dask.config') if m in sys.modules]
assert not loaded, loaded
import dask
assert dask.config.get('scheduler') == second.get
assert dask.delayed(os.getpid)().compute() != os.getpid()
second.close()
assert dask.config.get('scheduler') == first.get
first.close()
assert dask.config.get('scheduler', None) is None
later = Client({cluster.address!r})
assert dask.config.get('scheduler') == later.get
later.close()
assert dask.config.get('scheduler', None) is None
from minidist import import_hooks
assert not import_hooks.waiting('dask.config')
print('ok')
"""
    run_script(cluster, script)


def test_closing_every_waiting_client_removes_the_import_hook(cluster):
    script = f"""
import sys
from minidist import Client
clients = [Client({cluster.address!r}) for _ in range(2)]
from minidist import import_hooks
assert import_hooks.waiting('dask.config')
for client in clients:
    client.close()
from minidist import import_hooks
assert not import_hooks.waiting('dask.config')
import dask
assert dask.config.get('scheduler', None) is None
print('ok')
"""
    run_script(cluster, script)
