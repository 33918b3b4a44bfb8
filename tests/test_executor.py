"""The Executor as a ``concurrent.futures`` user sees it (PEP 3148), plus its extras.

Everything runs on the module's real cluster (a center and two single-thread
workers).  Tasks that must stay pending wait for a flag file that the test
creates when it is done with them (the ``flag`` fixture always creates it at
teardown, so no worker thread stays blocked).
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import linecache
import os
import re
import subprocess
import sys
import threading
import time
from operator import add

import cloudpickle
import pytest

from minidist import Client, Executor, Future
from minidist.task import RemoteTraceback, fill_source_lines

import keyfuncs
from conftest import wait_for

HEX32 = r"[0-9a-f]{32}"
UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


# ---------------------------------------------------------------------------
# Functions run on the workers (shipped by value)


def inc(x):
    return x + 1


def double(x):
    return 2 * x


def wait_file(path, value=None, timeout=60):
    """Block until ``path`` exists, then return ``value``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"flag {path} never appeared")
        time.sleep(0.005)
    return value


def record(path, x):
    """Append a line to ``path`` (counts executions) and return ``x``."""
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return x


def record_after(path, flag, x):
    wait_file(flag)
    return record(path, x)


def raise_if(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def plus(x, y):
    return x + y


def divide(a, b):
    return a / b


class CustomError(Exception):
    """An exception class defined here, so it travels by value."""


def raise_custom(msg):
    raise CustomError(msg)


def fail_first(path, times):
    """Fail the first ``times`` calls (counted in ``path``), then return the call number."""
    n = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(n + 1))
    if n < times:
        raise RuntimeError(f"attempt {n + 1} fails")
    return n + 1


def total(obj):
    """Sum the numbers in nested lists, tuples and dict values."""
    if isinstance(obj, dict):
        return sum(total(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(total(v) for v in obj)
    return obj


def getpid(*args, **kwargs):
    return os.getpid()


def unpickled_here(path):
    """Runs when a ``Probe`` is unpickled: records the unpickling process."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return "probe"


class Probe:
    """A value whose unpickling leaves a trace (which process unpickled it)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return unpickled_here, (self.path,)


def make_probe(path):
    return Probe(path)


# ---------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def flag(tmp_path):
    """A flag file path; created at teardown so any task waiting on it finishes."""
    path = str(tmp_path / "flag")
    yield path
    open(path, "w").close()


@pytest.fixture
def ab(cluster):
    """Two worker addresses: tasks that block go to the first, the others to the second.

    (A task handed to a worker beyond its free threads waits there, behind
    whatever that worker runs; see test_locality for that behaviour.)
    """
    a, b = sorted(p.address for p in cluster.workers)
    return [a], [b]


def release(path):
    open(path, "w").close()


def lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().split()


# ---------------------------------------------------------------------------
# The Executor is a concurrent.futures.Executor


def test_executor_and_future_types(e):
    assert isinstance(e, cf.Executor)
    f = e.submit(inc, 1)
    assert isinstance(f, Future) and isinstance(f, cf.Future)
    assert f.result(timeout=10) == 2


# ---------------------------------------------------------------------------
# map


def test_map_returns_iterator_of_results_in_order(e):
    it = e.map(inc, range(20))
    assert iter(it) is it
    assert not isinstance(it, list)
    assert list(it) == list(range(1, 21))
    assert list(e.map(add, range(5), range(10, 15))) == [10, 12, 14, 16, 18]
    assert list(e.map(inc, [])) == []


def test_map_order_when_later_items_finish_first(e, flag):
    it = e.map(wait_file, [flag, os.path.dirname(flag)], ["first", "second"])
    # The second item is done long before the first: results still come in order.
    release_timer = threading.Timer(0.3, release, [flag])
    release_timer.start()
    try:
        assert list(it) == ["first", "second"]
    finally:
        release_timer.cancel()


def test_map_shortest_iterable_wins(e):
    assert list(e.map(add, [1, 2, 3], [10, 20])) == [11, 22]


def test_map_timeout_raises_when_items_are_late(e, flag):
    it = e.map(wait_file, [flag], [1], timeout=0.3)
    with pytest.raises(TimeoutError):
        next(it)


def test_map_timeout_counts_from_the_call(e, flag):
    it = e.map(wait_file, [flag], ["done"], timeout=0.5)
    time.sleep(0.6)  # ok: the deadline must pass before we ask for the first item
    # The item cannot be ready before the flag exists (0.3 s from now).  Counted
    # from the call, the deadline is already over; counted from next(), the
    # item would still arrive in time.
    timer = threading.Timer(0.3, release, [flag])
    timer.start()
    try:
        with pytest.raises(TimeoutError):
            next(it)
    finally:
        timer.cancel()


def test_map_timeout_met(e):
    assert list(e.map(inc, range(5), timeout=30)) == [1, 2, 3, 4, 5]


def test_map_exception_raised_when_item_reached(e):
    it = e.map(raise_if, range(6), [3] * 6)
    assert [next(it), next(it), next(it)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3"):
        next(it)
    # the cluster keeps working
    assert list(e.map(inc, range(3))) == [1, 2, 3]


def test_map_chunksize_same_results_fewer_tasks(e, cluster):
    values = list(range(1000, 1010))
    assert list(e.map(inc, values, chunksize=3)) == [v + 1 for v in values]
    assert list(e.map(add, values, values, chunksize=4)) == [2 * v for v in values]
    with pytest.raises(ValueError, match="bad item 1004"):
        list(e.map(raise_if, values, [1004] * 10, chunksize=3))

    def tasks_of_one_map(chunksize, offset):
        with Executor(cluster) as ex:  # a fresh session: its keys are this map's tasks
            it = ex.map(inc, [v + offset for v in values], chunksize=chunksize)
            keys = list(ex._keys)  # the iterator holds one future per task
            wait_for(lambda: len(ex._center("who_has", keys=keys)) == len(keys),
                     message="the tasks known to the center")
            assert list(it) == [v + offset + 1 for v in values]
        return len(keys)

    assert tasks_of_one_map(1, 100) == 10
    assert tasks_of_one_map(3, 200) == 4  # ceil(10 / 3) tasks
    assert tasks_of_one_map(10, 300) == 1


def test_map_with_lambda_and_large_count(e):
    assert list(e.map(lambda x: x * x, range(500))) == [x * x for x in range(500)]


# ---------------------------------------------------------------------------
# wait and as_completed


def test_wait_first_completed(e, flag, ab):
    slow = e.submit(wait_file, flag, "slow", workers=ab[0])
    fast = e.submit(inc, 41, workers=ab[1])
    done, not_done = cf.wait([slow, fast], timeout=10, return_when=cf.FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    release(flag)
    assert slow.result(timeout=10) == "slow"


def test_wait_first_exception(e, flag, ab):
    slow = e.submit(wait_file, flag, "slow", workers=ab[0])
    ok = e.submit(inc, 7, workers=ab[1])
    bad = e.submit(divide, 1, 0, workers=ab[1])
    done, not_done = cf.wait([slow, ok, bad], timeout=10, return_when=cf.FIRST_EXCEPTION)
    assert bad in done and slow in not_done
    assert isinstance(bad.exception(), ZeroDivisionError)


def test_wait_all_completed_and_timeout(e, flag, ab):
    fs = [e.submit(inc, i) for i in range(10, 20)]
    done, not_done = cf.wait(fs, timeout=10, return_when=cf.ALL_COMPLETED)
    assert done == set(fs) and not not_done
    slow = e.submit(wait_file, flag, 1, workers=ab[0])
    done, not_done = cf.wait(fs + [slow], timeout=0.2)
    assert not_done == {slow} and done == set(fs)


def test_as_completed(e, flag, ab):
    slow = e.submit(wait_file, flag, "slow", workers=ab[0])
    fast = [e.submit(inc, i, workers=ab[1]) for i in range(30, 35)]
    it = cf.as_completed([slow, *fast], timeout=10)
    got = [next(it) for _ in range(5)]
    assert set(got) == set(fast)
    release(flag)
    assert next(it) is slow
    with pytest.raises(StopIteration):
        next(it)
    assert sorted(f.result() for f in got) == [31, 32, 33, 34, 35]


def test_as_completed_timeout(e, flag, ab):
    slow = e.submit(wait_file, flag, "slow", workers=ab[0])
    fast = e.submit(inc, 99, workers=ab[1])
    assert fast.result(timeout=10) == 100
    seen = []
    with pytest.raises(TimeoutError):
        for f in cf.as_completed([slow, fast], timeout=0.3):
            seen.append(f)
    assert seen == [fast]


# ---------------------------------------------------------------------------
# cancel, callbacks, status, repr


def test_cancel_pending_future(e, flag, tmp_path):
    log = str(tmp_path / "ran")
    blocker = e.submit(wait_file, flag, 5)
    dependent = e.submit(record, log, blocker)  # waits at the center for blocker
    wait_for(lambda: e._center("who_has", keys=[dependent.key]), message="the task known")
    assert dependent.status == "pending"
    assert dependent.cancel() is True
    assert dependent.cancelled() and dependent.done()
    assert dependent.status == "cancelled"
    assert "cancelled" in repr(dependent)
    with pytest.raises(cf.CancelledError):
        dependent.result(timeout=1)
    assert dependent.cancel() is True  # cancelling again is harmless, as in concurrent.futures
    # The center forgets the cancelled task, so it can never run.
    wait_for(lambda: dependent.key not in e._center("who_has", keys=[dependent.key]),
             message="cancelled key forgotten by the center")
    release(flag)
    assert blocker.result(timeout=10) == 5
    assert e.submit(inc, blocker).result(timeout=10) == 6
    assert lines(log) == []


def test_cancel_finished_future_returns_false(e):
    f = e.submit(inc, 100)
    assert f.result(timeout=10) == 101
    assert f.cancel() is False
    assert f.status == "finished" and not f.cancelled()
    assert f.result() == 101


def test_cancel_via_executor_and_wait_sees_it(e, flag):
    blocked = e.submit(wait_file, flag, "x")
    waiter = e.submit(inc, blocked)
    e.cancel([waiter])
    assert waiter.status == "cancelled"
    done, not_done = cf.wait([waiter], timeout=5)
    assert done == {waiter}


def test_add_done_callback_called_once(e, flag):
    calls = []
    lock = threading.Lock()

    def cb(fut):
        with lock:
            calls.append(fut)

    slow = e.submit(wait_file, flag, 3)
    slow.add_done_callback(cb)
    assert calls == []
    release(flag)
    assert slow.result(timeout=10) == 3
    wait_for(lambda: calls, message="callback")
    # added after done: called at once, in this thread
    slow.add_done_callback(cb)
    assert calls == [slow, slow]
    # a later identical submit of the same key does not call old callbacks again
    again = e.submit(wait_file, flag, 3)
    assert again.result(timeout=10) == 3
    assert calls == [slow, slow]


def test_done_callback_on_error_and_result_inside_callback(e):
    results = []
    done = threading.Event()

    def cb(fut):
        results.append(fut.exception())
        done.set()

    f = e.submit(divide, 1, 0)
    f.add_done_callback(cb)
    assert done.wait(10)
    assert isinstance(results[0], ZeroDivisionError)

    values = []
    got = threading.Event()

    def fetch(fut):
        values.append(fut.result())
        got.set()

    g = e.submit(inc, 555)
    g.add_done_callback(fetch)
    assert got.wait(10)
    assert values == [556]


def test_status_values_and_repr(e, flag, ab):
    pending = e.submit(wait_file, flag, 1, workers=ab[0])
    assert pending.status == "pending"
    assert re.fullmatch(rf"<Future: status: pending, key: wait_file-{HEX32}>", repr(pending))
    f = e.submit(inc, 1, workers=ab[1])
    f.result(timeout=10)
    assert f.status == "finished"
    assert re.fullmatch(rf"<Future: status: finished, key: inc-{HEX32}>", repr(f))
    assert str(f) == repr(f)
    bad = e.submit(divide, 1, 0, workers=ab[1])
    cf.wait([bad], timeout=10)
    assert bad.status == "error"
    assert re.fullmatch(rf"<Future: status: error, key: divide-{HEX32}>", repr(bad))


def test_result_fetches_only_when_asked(e, tmp_path):
    path = str(tmp_path / "unpickled")
    f = e.submit(make_probe, path)
    cf.wait([f], timeout=10)
    assert f.done() and f.status == "finished"
    assert str(os.getpid()) not in lines(path)  # finished, yet nothing came here
    assert f.result(timeout=10) == "probe"
    assert lines(path).count(str(os.getpid())) == 1
    assert f.result() == "probe"  # fetched once, then kept
    assert lines(path).count(str(os.getpid())) == 1


def test_future_cannot_be_pickled(e):
    import pickle
    f = e.submit(inc, 1)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(f)


# ---------------------------------------------------------------------------
# shutdown and with


def test_submit_after_shutdown_raises(cluster):
    ex = Executor(cluster)
    assert ex.submit(inc, 1).result(timeout=10) == 2
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(inc, 2)
    with pytest.raises(RuntimeError):
        ex.map(inc, [1])
    ex.shutdown()  # twice is fine


def test_shutdown_wait_waits_for_pending_work(cluster, flag):
    ex = Executor(cluster)
    f = ex.submit(wait_file, flag, "waited")
    timer = threading.Timer(0.3, release, [flag])
    timer.start()
    try:
        ex.shutdown(wait=True)
        assert f.done()
        assert f.result(timeout=10) == "waited"
    finally:
        timer.cancel()


def test_results_available_after_with_block(cluster):
    # The classic ProcessPoolExecutor pattern: results are read after the with block.
    with Executor(cluster) as ex:
        futures = [ex.submit(inc, i) for i in range(300, 310)]
    assert [f.result(timeout=10) for f in futures] == list(range(301, 311))


def test_shutdown_cancel_futures(cluster, flag, tmp_path):
    log = str(tmp_path / "ran")
    ex = Executor(cluster)
    blocker = ex.submit(wait_file, flag, 0)
    queued = [ex.submit(record, log, blocker)] + \
        [ex.submit(record_after, log, flag, i) for i in range(1, 8)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() and f.status == "cancelled" for f in queued)
    release(flag)
    # the cluster forgets the cancelled tasks
    with Executor(cluster) as e2:
        wait_for(lambda: not e2._center("who_has", keys=[f.key for f in queued]),
                 message="cancelled keys forgotten")
        assert e2.submit(inc, 1).result(timeout=10) == 2


def test_shutdown_wait_false_does_not_hang_pending_futures(cluster, flag):
    ex = Executor(cluster)
    f = ex.submit(wait_file, flag, "later")
    ex.shutdown(wait=False)
    release(flag)
    # As with ProcessPoolExecutor, pending work still completes after shutdown(wait=False).
    assert f.result(timeout=20) == "later"


def test_with_block_shuts_down(cluster):
    with Executor(cluster) as ex:
        assert ex.submit(inc, 5).result(timeout=10) == 6
    with pytest.raises(RuntimeError):
        ex.submit(inc, 1)


# ---------------------------------------------------------------------------
# keys, purity, dedup


def test_keys_are_funcname_and_token(e):
    f = e.submit(inc, 1)
    assert re.fullmatch(rf"inc-{HEX32}", f.key)
    assert e.submit(inc, 1).key == f.key
    assert e.submit(inc, 2).key != f.key
    assert e.submit(add, 1, 2).key != e.submit(add, 2, 1).key
    assert e.submit(plus, 1, y=2).key != e.submit(plus, 1, 2).key
    assert re.fullmatch(rf"lambda-{HEX32}", e.submit(lambda: 1).key)


KEY_SCRIPT = """
import sys, cloudpickle
sys.path.insert(0, {tests!r})
import keyfuncs
cloudpickle.register_pickle_by_value(keyfuncs)
from operator import add
from minidist import Executor
with Executor({address!r}, auth_key={key!r}) as e:
    print(e.submit(keyfuncs.inc, 1).key)
    print(e.submit(add, 1, 2).key)
    print(e.submit(keyfuncs.inc, 1, pure=False).key)
    print(e.submit(keyfuncs.nested, 3).key)
"""


def test_keys_are_deterministic_across_processes(e, cluster):
    cloudpickle.register_pickle_by_value(keyfuncs)  # shipped by value, like a __main__ function
    here = [e.submit(keyfuncs.inc, 1).key, e.submit(add, 1, 2).key]
    assert re.fullmatch(rf"inc-{HEX32}", here[0]) and re.fullmatch(rf"add-{HEX32}", here[1])
    assert e.submit(keyfuncs.inc, 1).result(timeout=10) == 2
    nested = e.submit(keyfuncs.nested, 3)
    assert nested.result(timeout=10) == 5
    script = KEY_SCRIPT.format(tests=os.path.dirname(__file__), address=cluster.address,
                               key=cluster.auth_key.decode())
    outputs = []
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PYTHONHASHSEED": seed})
        assert out.returncode == 0, out.stderr
        outputs.append(out.stdout.split())
    for got in outputs:
        assert got[:2] == here
        assert re.fullmatch(rf"inc-{UUID4}", got[2])
        assert got[3] == nested.key  # code objects inside code keep their file names too
    assert outputs[0][2] != outputs[1][2]


def test_impure_keys_are_uuids(e):
    a = e.submit(inc, 1, pure=False)
    b = e.submit(inc, 1, pure=False)
    assert re.fullmatch(rf"inc-{UUID4}", a.key) and re.fullmatch(rf"inc-{UUID4}", b.key)
    assert a.key != b.key
    assert a.result(timeout=10) == b.result(timeout=10) == 2


def test_explicit_key(e):
    f = e.submit(inc, 10, key="my-key")
    assert f.key == "my-key"
    assert f.result(timeout=10) == 11
    assert "my-key" in e.who_has([f])


def test_dedup_in_memory_runs_nothing_new(e, cluster, tmp_path):
    log = str(tmp_path / "ran")
    f1 = e.submit(record, log, 1)
    assert f1.result(timeout=10) == 1
    f2 = e.submit(record, log, 1)
    assert f2.key == f1.key and f2.result(timeout=10) == 1
    with Executor(cluster) as other:
        f3 = other.submit(record, log, 1)
        assert f3.key == f1.key and f3.result(timeout=10) == 1
    assert lines(log) == ["1"]
    assert e.submit(record, log, 2).result(timeout=10) == 2
    assert lines(log) == ["1", "2"]


def test_dedup_in_flight_runs_nothing_new(e, cluster, flag, tmp_path):
    log = str(tmp_path / "ran")
    f1 = e.submit(record_after, log, flag, 7)
    with Executor(cluster) as other:
        f2 = other.submit(record_after, log, flag, 7)
        f3 = e.submit(record_after, log, flag, 7)
        assert f1.key == f2.key == f3.key
        assert not f1.done()
        release(flag)
        assert f2.result(timeout=10) == 7
    assert f1.result(timeout=10) == f3.result(timeout=10) == 7
    assert lines(log) == ["7"]


def test_dropped_key_recomputes_when_submitted_again(e, tmp_path):
    log = str(tmp_path / "ran")
    f = e.submit(record, log, 9)
    assert f.result(timeout=10) == 9
    key = f.key
    del f
    gc.collect()
    wait_for(lambda: key not in e.who_has(), message="released key deleted")
    assert e.submit(record, log, 9).result(timeout=10) == 9
    assert lines(log) == ["9", "9"]


# ---------------------------------------------------------------------------
# dependencies, placement, retries


def test_futures_nested_in_arguments_become_dependencies(e):
    a, b, c = e.submit(inc, 1), e.submit(inc, 2), e.submit(inc, 3)
    assert e.submit(total, [a, b, c]).result(timeout=10) == 9
    assert e.submit(total, (a, [b, (c,)])).result(timeout=10) == 9
    assert e.submit(total, {"x": a, "y": [b, {"z": c}]}).result(timeout=10) == 9
    assert e.submit(total, obj={"x": a, "y": 10}).result(timeout=10) == 12
    assert e.submit(plus, a, y=b).result(timeout=10) == 5
    # a chain of futures
    x = e.submit(inc, 0)
    for _ in range(20):
        x = e.submit(inc, x)
    assert x.result(timeout=20) == 21


def test_submit_workers_restricts_placement(e, cluster):
    pids = {p.address: p.pid for p in cluster.workers}
    for address, pid in pids.items():
        fs = [e.submit(getpid, i, pure=False, workers=[address]) for i in range(6)]
        assert [f.result(timeout=10) for f in fs] == [pid] * 6
        assert e.submit(getpid, "one", pure=False, workers=address).result(timeout=10) == pid


def test_retries_rerun_failing_task(e, tmp_path):
    counter = str(tmp_path / "count")
    assert e.submit(fail_first, counter, 2, retries=2).result(timeout=10) == 3
    counter2 = str(tmp_path / "count2")
    f = e.submit(fail_first, counter2, 2, retries=1)
    with pytest.raises(RuntimeError, match="attempt 2 fails"):
        f.result(timeout=10)
    assert open(counter2).read() == "2"


# ---------------------------------------------------------------------------
# errors


def test_task_error_reraises_original_type_with_remote_traceback(e):
    f = e.submit(divide, 1, 0)
    with pytest.raises(ZeroDivisionError) as info:
        f.result(timeout=10)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "Traceback" in str(cause) and "divide" in str(cause) and "ZeroDivisionError" in \
        str(cause)
    tb = f.traceback()
    assert isinstance(tb, str) and "return a / b" in tb
    assert isinstance(f.exception(), ZeroDivisionError)
    assert f.status == "error"


def code_file():
    """The file name of this very code, as the worker sees it."""
    return sys._getframe().f_code.co_filename


def test_functions_shipped_by_value_keep_their_file_name(e):
    # cloudpickle 3.1 would make it "<dynamic-code>": the worker could read no source line
    assert e.submit(code_file).result(timeout=10) == code_file.__code__.co_filename == __file__


FAILING_SOURCE = """\
def fails_here(x):
    y = x * 2
    raise ValueError(f"bad value {y}")  # the line the traceback must show


def fails_inside_lambda(x):
    return list(map(lambda v: 1 / v, [x]))
"""


def load_source(filename):
    """Functions compiled from FAILING_SOURCE under ``filename``, in a module no one can import."""
    namespace = {"__name__": "client_only_code"}
    exec(compile(FAILING_SOURCE, filename, "exec"), namespace)
    return namespace


def test_traceback_source_lines_for_a_file_the_worker_cannot_read(e, tmp_path):
    """The file is gone before the task fails: only the client ever read its source."""
    path = tmp_path / "client_only.py"
    path.write_text(FAILING_SOURCE)
    funcs = load_source(str(path))
    gate = str(tmp_path / "gate")
    f = e.submit(funcs["fails_here"], e.submit(wait_file, gate, 21))
    g = e.submit(funcs["fails_inside_lambda"], e.submit(wait_file, gate, 0))
    path.unlink()  # shipped already; the worker reads source lines only when a task fails
    open(gate, "w").close()
    with pytest.raises(ValueError, match="bad value 42") as info:
        f.result(timeout=10)
    for text in (f.traceback(), str(info.value.__cause__)):
        assert f'File "{path}", line 3, in fails_here' in text
        assert 'raise ValueError(f"bad value {y}")  # the line the traceback must show' in text
    with pytest.raises(ZeroDivisionError):
        g.result(timeout=10)
    assert f'File "{path}", line 7, in <lambda>' in g.traceback()
    assert "return list(map(lambda v: 1 / v, [x]))" in g.traceback()


def test_traceback_source_lines_for_code_that_exists_only_on_the_client(e):
    """As a notebook cell: the source is in the client's linecache, there is no file at all."""
    filename = "<client cell 7>"
    linecache.cache[filename] = (len(FAILING_SOURCE), None,
                                 FAILING_SOURCE.splitlines(keepends=True), filename)
    try:
        funcs = load_source(filename)
        f = e.submit(funcs["fails_here"], 1)
        with pytest.raises(ValueError, match="bad value 2"):
            f.result(timeout=10)
    finally:
        del linecache.cache[filename]
    tb = f.traceback()
    assert f'File "{filename}", line 3, in fails_here' in tb
    assert "# the line the traceback must show" in tb


def test_fill_source_lines_adds_only_what_is_missing(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    return 1 / 0\n")
    remote = (f'Traceback (most recent call last):\n'
              f'  File "/worker/only.py", line 9, in run\n'
              f'    already_there()\n'
              f'  File "{path}", line 2, in f\n'
              f'  File "/nowhere/missing.py", line 1, in g\n'
              f'ZeroDivisionError: division by zero\n')
    filled = fill_source_lines(remote)
    assert filled == remote.replace(f'line 2, in f\n', f'line 2, in f\n    return 1 / 0\n')
    assert fill_source_lines(filled) == filled


def test_custom_exception_class_survives(e):
    f = e.submit(raise_custom, "custom failure")
    with pytest.raises(CustomError, match="custom failure"):
        f.result(timeout=10)


def test_dependents_of_failed_task_err_and_cluster_keeps_working(e):
    bad = e.submit(divide, 1, 0)
    child = e.submit(inc, bad)
    grandchild = e.submit(total, [child, 1])
    for f in (child, grandchild):
        with pytest.raises(ZeroDivisionError):
            f.result(timeout=10)
        assert f.status == "error"
    assert e.submit(inc, 1000).result(timeout=10) == 1001
    assert list(e.map(inc, range(3))) == [1, 2, 3]


def test_unpicklable_argument_gives_clear_error(e):
    lock = threading.Lock()
    with pytest.raises(TypeError):
        e.submit(getpid, lock)
    assert e.submit(inc, 1).result(timeout=10) == 2


# ---------------------------------------------------------------------------
# gather, scatter, who_has, nthreads


def test_gather_nested_structures_and_non_futures(e):
    a, b = e.submit(inc, 1), e.submit(double, 5)
    assert e.gather([a, b]) == [2, 10]
    assert e.gather((a, b)) == (2, 10)
    assert e.gather({"x": a, "y": [b, 3, "s"], "z": (a, {"w": b})}) == \
        {"x": 2, "y": [10, 3, "s"], "z": (2, {"w": 10})}
    assert e.gather([1, "two", None]) == [1, "two", None]
    assert e.gather(5) == 5
    assert e.gather(a) == 2
    assert e.gather([]) == []


def test_gather_raises_task_error(e):
    good, bad = e.submit(inc, 1), e.submit(divide, 1, 0)
    with pytest.raises(ZeroDivisionError):
        e.gather([good, bad])


def test_scatter_list_dict_and_single(e):
    fs = e.scatter([1, 2, 3])
    assert isinstance(fs, list) and len(fs) == 3
    assert all(isinstance(f, Future) and f.status == "finished" for f in fs)
    assert e.gather(fs) == [1, 2, 3]
    assert e.submit(total, fs).result(timeout=10) == 6

    d = e.scatter({"sa": 10, "sb": [1, 2]})
    assert set(d) == {"sa", "sb"}
    assert d["sa"].key == "sa" and d["sb"].key == "sb"
    assert e.gather(d) == {"sa": 10, "sb": [1, 2]}
    assert e.submit(total, d).result(timeout=10) == 13

    one = e.scatter("hello")
    assert isinstance(one, Future) and one.result(timeout=10) == "hello"
    assert e.submit(str.upper, one).result(timeout=10) == "HELLO"


def test_who_has_and_nthreads(e, cluster):
    nthreads = e.nthreads()
    assert nthreads == {p.address: 1 for p in cluster.workers}
    f = e.submit(inc, 12345)
    f.result(timeout=10)
    who = e.who_has([f])
    assert list(who) == [f.key]
    assert len(who[f.key]) == 1 and who[f.key][0] in nthreads
    assert f.key in e.who_has()
    assert f.key in e.has_what()[who[f.key][0]]


@pytest.mark.parametrize("how", ["positional", "max_workers"])
def test_executor_int_starts_local_cluster(how):
    ex = Executor(3) if how == "positional" else Executor(max_workers=3)
    with ex:
        assert len(ex.nthreads()) == 3
        assert list(ex.map(inc, range(6))) == [1, 2, 3, 4, 5, 6]
        procs = [ex._cluster.center, *ex._cluster.workers]
    assert all(p.popen.poll() is not None for p in procs)


def test_client_map_returns_futures(c):
    fs = c.map(inc, range(5))
    assert isinstance(fs, list) and all(isinstance(f, Future) for f in fs)
    assert c.gather(fs) == [1, 2, 3, 4, 5]
    fs = c.map(plus, range(3), y=10)
    assert c.gather(fs) == [10, 11, 12]
    assert isinstance(c, Client) and isinstance(c, cf.Executor)


def test_client_close_cancels_pending_and_unfetched(cluster, flag, ab):
    client = Client(cluster)
    fetched = client.submit(inc, 77)
    assert fetched.result(timeout=10) == 78
    unfetched = client.submit(inc, 78)
    cf.wait([unfetched], timeout=10)
    pending = client.submit(wait_file, flag, 1, workers=ab[0])
    client.close()
    assert pending.cancelled() and pending.status == "cancelled"
    assert fetched.result() == 78
    with pytest.raises(cf.CancelledError):
        unfetched.result(timeout=5)
    with pytest.raises(RuntimeError):
        client.submit(inc, 1)


# ---------------------------------------------------------------------------
# edge cases


def return_none():
    return None


def make_lock():
    return threading.Lock()


class Unloadable(Exception):
    """Pickles fine on the worker, cannot be rebuilt anywhere (needs two arguments)."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def raise_unloadable():
    raise Unloadable(1, 2)


def test_result_and_exception_timeouts_on_pending(e, flag, ab):
    f = e.submit(wait_file, flag, "v", workers=ab[0])
    with pytest.raises(TimeoutError):
        f.result(timeout=0.1)
    with pytest.raises(TimeoutError):
        f.exception(timeout=0.1)
    assert not f.done()
    release(flag)
    assert f.result(timeout=10) == "v" and f.exception() is None


def test_none_result_and_large_result(e):
    import numpy as np
    assert e.submit(return_none).result(timeout=10) is None
    big = e.submit(np.arange, 5_000_000)
    value = big.result(timeout=30)
    assert value.shape == (5_000_000,) and value[-1] == 4_999_999 and value.flags.writeable


def test_unpicklable_result_errs_clearly(e):
    f = e.submit(make_lock)
    with pytest.raises(TypeError, match="cannot be pickled"):
        f.result(timeout=10)
    assert e.submit(inc, 1).result(timeout=10) == 2


def test_exception_that_cannot_be_rebuilt(e):
    from minidist import RemoteException
    f = e.submit(raise_unloadable)
    with pytest.raises(Exception) as info:
        f.result(timeout=10)
    assert isinstance(info.value, (Unloadable, RemoteException))
    assert "Unloadable" in f.traceback()


def test_gather_same_future_twice_and_tuple_keys(e):
    a = e.submit(inc, 1)
    assert e.gather([a, a, [a]]) == [2, 2, [2]]
    t = e.submit(inc, 2, key=("x", 1))
    assert t.key == ("x", 1) and t.result(timeout=10) == 3
    assert "('x', 1)" in repr(t)
    assert e.submit(inc, t).result(timeout=10) == 4


def test_scatter_broadcast_and_to_workers(e, cluster):
    addresses = sorted(p.address for p in cluster.workers)
    [x] = e.scatter([b"b" * 5000], broadcast=True)
    assert sorted(e.who_has([x])[x.key]) == addresses
    [y] = e.scatter([123], workers=[addresses[1]])
    assert e.who_has([y])[y.key] == [addresses[1]]


def test_unknown_worker_restriction_stays_pending_and_cancels(e):
    f = e.submit(inc, 1, workers=["no-such-worker"], pure=False)
    with pytest.raises(TimeoutError):
        f.result(timeout=0.3)
    assert f.status == "pending"
    assert f.cancel() and f.status == "cancelled"
    assert e.submit(inc, 1, pure=False).result(timeout=10) == 2


def test_future_from_another_session_as_argument(cluster, e):
    with Executor(cluster) as other:
        x = other.submit(inc, 700)
        assert x.result(timeout=10) == 701
        assert e.submit(inc, x).result(timeout=10) == 702
        done = list(cf.as_completed([x, e.submit(inc, 1)], timeout=10))
        assert len(done) == 2


# ---------------------------------------------------------------------------
# The same script on ProcessPoolExecutor and on minidist


def pep3148_script(make_executor) -> dict:
    """Exercise an executor the way concurrent.futures code does; record what it sees."""
    seen: dict = {}
    calls = []
    with make_executor() as ex:
        seen["map"] = list(ex.map(pow, range(6), range(6)))
        seen["map_chunks"] = list(ex.map(pow, range(7), [2] * 7, chunksize=3))
        seen["map_shortest"] = list(ex.map(plus, [1, 2, 3], [10, 20]))
        it = ex.map(raise_if, range(5), [2] * 5)
        seen["map_until_error"] = [next(it), next(it)]
        try:
            next(it)
        except ValueError as e:
            seen["map_error"] = str(e)
        bad = ex.submit(divide, 1, 0)
        exc = bad.exception(timeout=30)
        seen["exc_type"] = type(exc).__name__
        seen["exc_cause_has_traceback"] = "Traceback" in str(exc.__cause__) and \
            "divide" in str(exc.__cause__)
        try:
            bad.result()
        except ZeroDivisionError:
            seen["result_raises"] = True
        fs = [ex.submit(inc, i) for i in range(5)]
        done, not_done = cf.wait(fs, timeout=30)
        seen["wait_all"] = (len(done), len(not_done))
        done, not_done = cf.wait(fs + [bad], timeout=30, return_when=cf.FIRST_EXCEPTION)
        seen["wait_first_exception_has_bad"] = bad in done
        seen["as_completed"] = sorted(f.result() for f in cf.as_completed(fs, timeout=30))
        seen["cancel_finished"] = fs[0].cancel()
        seen["done_after_cancel_attempt"] = (fs[0].done(), fs[0].cancelled())
        fs[0].add_done_callback(calls.append)
        seen["callback_after_done"] = calls == [fs[0]]
        kept = ex.submit(plus, 40, y=2)
    seen["result_after_with"] = kept.result(timeout=30)
    try:
        ex.submit(inc, 1)
    except RuntimeError:
        seen["submit_after_shutdown"] = "RuntimeError"
    return seen


def test_same_observations_as_process_pool_executor(cluster):
    import multiprocessing
    # fork: spawn and forkserver leave helper processes running until this one exits
    fork = multiprocessing.get_context("fork")
    expected = pep3148_script(lambda: cf.ProcessPoolExecutor(2, mp_context=fork))
    got = pep3148_script(lambda: Executor(cluster))
    assert got == expected
    assert expected["map"] == [1, 1, 4, 27, 256, 3125]  # and the script did run


# ---------------------------------------------------------------------------
# connecting


def test_address_forms(cluster):
    host, port = cluster.address.split(":")
    for address in (cluster.address, f"tcp://{cluster.address}", (host, int(port)), cluster):
        with Executor(address) as ex:
            assert ex.submit(inc, 1).result(timeout=10) == 2


def test_no_center_gives_connection_error():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError):
        Executor(f"127.0.0.1:{port}", timeout=2)
