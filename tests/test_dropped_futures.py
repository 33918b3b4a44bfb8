"""A Future nobody keeps still calls back (PEP 3148), and is let go once it is done.

``executor.submit(job).add_done_callback(log)`` is ordinary
``concurrent.futures`` code; dask's own ``get_async`` relies on it when it
is given an Executor as its scheduler.
"""

from __future__ import annotations

import asyncio
import gc
import threading

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from minidist import Executor
from conftest import wait_for
from gates import wait_for_file


def inc(x):
    return x + 1


def boom(x):
    raise ValueError(f"boom {x}")


@pytest.fixture
def flag(tmp_path):
    """A flag file path; created at teardown so any task waiting on it finishes."""
    path = str(tmp_path / "flag")
    yield path
    open(path, "w").close()


def test_callback_of_a_dropped_pending_future_runs(session, flag):
    called = threading.Event()
    got = []

    def log(future):
        got.append(future.result())
        called.set()

    session.submit(wait_for_file, 41, flag, pure=False).add_done_callback(log)
    gc.collect()  # nothing but the callback refers to the Future now
    assert len(session._held) == 1
    open(flag, "w").close()
    assert called.wait(20), "the callback of a dropped Future never ran"
    assert got == [41]
    wait_for(lambda: not session._held, message="the session letting the done Future go")


def test_callback_of_a_dropped_failing_future_gets_the_error(session):
    called = threading.Event()
    errors = []

    def log(future):
        errors.append(future.exception())
        called.set()

    session.submit(boom, 1, pure=False).add_done_callback(log)
    gc.collect()
    assert called.wait(20)
    assert isinstance(errors[0], ValueError) and "boom 1" in str(errors[0])


def test_many_dropped_futures_with_callbacks_are_let_go_once_done(e):
    done = []
    n = 2000
    for i in range(n):
        e.submit(inc, i, pure=False).add_done_callback(lambda f: done.append(f.key))
    gc.collect()
    wait_for(lambda: len(done) == n, timeout=60, message="every callback")
    gc.collect()
    # Nothing of them is left in the client: no held Future, no key, no Future object.
    wait_for(lambda: not e._held, message="held Futures released")
    wait_for(lambda: not e._keys, timeout=20, message="keys released")
    from minidist.executor import Future
    assert not [o for o in gc.get_objects() if type(o) is Future and o._session is e]


def test_asyncio_wrap_future_of_a_dropped_future(e):
    async def main():
        return await asyncio.wrap_future(e.submit(inc, 1, pure=False))

    assert asyncio.run(asyncio.wait_for(main(), 30)) == 2


def test_dask_compute_with_the_executor_as_scheduler(e):
    """dask's get_async submits, drops the Future, and waits on its callback's queue."""
    x = dask.delayed(inc)(1)
    y = dask.delayed(sum)([x, dask.delayed(inc)(10), 3])
    assert dask.compute(y, scheduler=e) == (16,)

    arr = da.arange(100, chunks=10)
    assert int((arr * 2).sum().compute(scheduler=e)) == 9900
    assert np.array_equal((arr + 1).compute(scheduler=e), np.arange(1, 101))

    df = pd.DataFrame({"a": np.arange(40), "b": np.arange(40) % 3})
    ddf = dd.from_pandas(df, npartitions=4)
    got = ddf.groupby("b").a.sum().compute(scheduler=e)
    pd.testing.assert_series_equal(got.sort_index(), df.groupby("b").a.sum())


def test_dask_compute_with_a_fresh_executor_as_scheduler():
    with Executor(2) as ex:
        assert dask.compute(dask.delayed(inc)(1), scheduler=ex) == (2,)
