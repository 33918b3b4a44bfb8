"""The concurrent.futures contract beyond CPython's own tests: initializers, pickling
errors, BaseExceptions in tasks, what the executor keeps alive, work left at exit."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref

import cloudpickle
import pytest

from minidist import Executor, KilledWorker, Pool
from minidist.task import InitializerError

from conftest import wait_for

HERE = os.path.dirname(os.path.abspath(__file__))

# The module-scoped executor pickles its initializer before conftest's per-test fixture
# registers this module to travel by value: register it now.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# --------------------------------------------------------------------------- tasks

def remember(key, value):
    """An initializer: keeps ``value`` in this worker process (by-value functions share
    no globals across pickles, so the state lives on an importable module)."""
    import builtins
    builtins.__dict__.setdefault("_minidist_test_state", {})[key] = value
    builtins._minidist_test_state.setdefault("calls", []).append(key)


def recall(key):
    import builtins
    return builtins.__dict__.get("_minidist_test_state", {}).get(key)


def init_calls():
    import builtins
    return os.getpid(), list(builtins.__dict__.get("_minidist_test_state", {}).get("calls", []))


def fail_init():
    raise ValueError("no database")


def identity(x):
    return x


class Payload:
    pass


def make_payload(_):
    return Payload()


def raise_base(kind):
    raise {"exit": SystemExit(3), "interrupt": KeyboardInterrupt()}[kind]


class ExitAtPickle:
    def __reduce__(self):
        raise SystemExit(4)


class InterruptAtPickle:
    def __reduce__(self):
        raise KeyboardInterrupt()


def _fail_to_load():
    raise ValueError("cannot rebuild")


class FailsToUnpickle:
    def __reduce__(self):
        return _fail_to_load, ()


def make(cls):
    return cls()


def make_lock():
    return threading.Lock()


# --------------------------------------------------------------------------- initializer


@pytest.fixture(scope="module")
def ex():
    """An executor with an initializer, owning a cluster of two workers."""
    with Executor(max_workers=2, initializer=remember, initargs=("who", "init-ran")) as e:
        yield e


def test_initializer_runs_on_each_worker_before_its_tasks(ex):
    assert ex.gather([ex.submit(recall, "who", pure=False) for _ in range(8)]) == \
        ["init-ran"] * 8
    seen = {}
    for pid, calls in ex.gather([ex.submit(init_calls, pure=False) for _ in range(20)]):
        seen[pid] = calls
    assert all(calls == ["who"] for calls in seen.values()), seen  # once per process


def test_initializer_runs_on_a_worker_that_joins_later(ex):
    proc = ex._cluster.start_worker(name="late")
    f = ex.submit(init_calls, pure=False, workers=["late"])
    pid, calls = f.result(timeout=30)
    assert pid == proc.pid and calls == ["who"]
    assert ex.submit(recall, "who", pure=False, workers=["late"]).result(timeout=30) == \
        "init-ran"


def test_executors_with_other_initializers_do_not_share_results(ex):
    with Executor(ex.address, initializer=remember, initargs=("who", "other")) as other:
        # Same call, other initializer: another key, so not the first executor's result.
        assert ex.submit(recall, "who").key != other.submit(recall, "who").key


def test_failing_initializer_breaks_the_executor():
    with Executor(max_workers=2, initializer=fail_init) as e:
        f = e.submit(identity, 1)
        with pytest.raises(cf.BrokenExecutor) as info:
            f.result(timeout=30)
        assert isinstance(info.value, InitializerError)
        assert "fail_init" in str(info.value) and "no database" in str(info.value)
        assert "ValueError: no database" in f.traceback()
        with pytest.raises(cf.BrokenExecutor):
            e.submit(identity, 2)
        with pytest.raises(cf.BrokenExecutor):
            e.map(identity, [1])


def test_pool_initializer():
    with Pool(2, initializer=remember, initargs=("who", "pool-init")) as p:
        assert p.gather(p.map(recall, ["who"] * 4)) == ["pool-init"] * 4
    with Pool(1, initializer=fail_init) as p:
        with pytest.raises(cf.BrokenExecutor):
            p.apply(identity, (1,))


def test_unpicklable_initializer_fails_in_the_caller():
    lock = threading.Lock()
    with pytest.raises(pickle.PicklingError):
        Executor("127.0.0.1:1", initializer=identity, initargs=(lock,))


# --------------------------------------------------------------------------- arguments checked


@pytest.mark.parametrize("n", [0, -1])
def test_max_workers_must_be_positive(n):
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        Executor(max_workers=n)
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        Executor(n)


def test_map_chunksize_must_be_positive(e):
    for chunksize in (0, -1):
        with pytest.raises(ValueError):
            e.map(identity, [1, 2], chunksize=chunksize)


# --------------------------------------------------------------------------- nothing kept alive


def test_map_drops_each_result_once_yielded(e):
    for chunksize in (1, 3):
        for obj in e.map(make_payload, range(7), chunksize=chunksize):
            ref = weakref.ref(obj)
            del obj
            gc.collect()
            assert ref() is None


def test_nothing_keeps_callable_arguments_or_result_alive(e):
    owner, arg = Payload(), Payload()
    refs = [weakref.ref(owner), weakref.ref(arg)]
    f = e.submit(identity, arg)
    g = e.submit(lambda x, o=owner: x, 1)
    value = f.result(timeout=30)
    refs.append(weakref.ref(value))
    assert g.result(timeout=30) == 1
    del owner, arg, value, f, g
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


# --------------------------------------------------------------------------- pickling errors


def test_unpicklable_argument_is_a_pickling_error_naming_task_and_object(e):
    lock = threading.Lock()
    with pytest.raises(pickle.PicklingError) as info:
        e.submit(identity, lock)
    assert "identity" in str(info.value) and "lock" in str(info.value)
    with pytest.raises(pickle.PicklingError):
        list(e.map(identity, [1, lock]))
    assert e.submit(identity, 5).result(timeout=30) == 5


def test_map_that_cannot_pickle_a_later_call_cancels_the_batches_it_sent(e):
    """A long map goes out in batches as it is pickled; a bad call far in raises, the
    calls sent before it are cancelled and released, and the executor serves on."""
    from minidist.executor import SEND_CHUNK
    calls = [*range(2 * SEND_CHUNK + 5), threading.Lock()]
    with pytest.raises(pickle.PicklingError, match="lock"):
        e.map(identity, calls)
    wait_for(lambda: e._center("info")["ntasks"] == 0, timeout=30,
             message="the batches sent before the bad call are released")
    assert list(e.map(identity, range(3))) == [0, 1, 2]


def test_unpicklable_result_is_a_pickling_error_naming_key_and_type(e):
    f = e.submit(make_lock, pure=False)
    with pytest.raises(pickle.PicklingError) as info:
        f.result(timeout=30)
    assert f.key in str(info.value) and "lock" in str(info.value)


# --------------------------------------------------------------------------- BaseException


@pytest.mark.parametrize("kind,exc", [("exit", SystemExit), ("interrupt", KeyboardInterrupt)])
def test_base_exception_in_task_is_its_error(e, kind, exc):
    fs = [e.submit(raise_base, kind, pure=False) for _ in range(4)]  # every task thread
    for f in fs:
        with pytest.raises(exc):
            f.result(timeout=30)
    assert list(e.map(pow, [2] * 6, range(6))) == [1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize("cls,exc", [(ExitAtPickle, SystemExit),
                                     (InterruptAtPickle, KeyboardInterrupt)])
def test_base_exception_pickling_result_is_its_error(e, cls, exc):
    fs = [e.submit(make, cls, pure=False) for _ in range(4)]
    for f in fs:
        with pytest.raises(exc):
            f.result(timeout=30)
    # a result inside a list is pickled to travel with its event: same thing
    g = e.submit(lambda: [cls()], pure=False)
    with pytest.raises(exc):
        g.result(timeout=30)
    assert list(e.map(pow, [2] * 6, range(6))) == [1, 2, 4, 8, 16, 32]


# --------------------------------------------------------------------------- unpickling here


def test_result_that_fails_to_unpickle_raises_from_its_future_only(cluster):
    e = Executor(cluster)
    good = [e.submit(identity, i) for i in range(3)]
    bad = e.submit(make, FailsToUnpickle, pure=False)
    more = e.submit(identity, 10)
    wait_for(lambda: all(f.done() for f in [*good, bad, more]), 30, message="all done")
    assert list(e.map(identity, [1, 2])) == [1, 2]
    it = e.map(make, [Payload, FailsToUnpickle, Payload])
    assert isinstance(next(it), Payload)
    with pytest.raises(ValueError, match="cannot rebuild"):
        next(it)
    with pytest.raises(ValueError, match="cannot rebuild") as info:
        bad.result(timeout=30)
    assert any(bad.key in note for note in getattr(info.value, "__notes__", []))
    assert [f.result(timeout=30) for f in good] == [0, 1, 2]
    with pytest.raises(ValueError):
        e.gather([good[0], bad])
    assert more.result(timeout=30) == 10
    e.shutdown()  # fetches held results (the bad one included) and never raises
    with pytest.raises(ValueError):
        bad.result()


# --------------------------------------------------------------------------- work left at exit


SCRIPT = """
import sys
from minidist import Executor

def write(path, text):
    import time
    time.sleep(0.5)
    print(text, flush=True)
    with open(path, "w") as f:
        f.write(text)

e = Executor(max_workers=2)
e.submit(write, sys.argv[1], "written")   # the Future is dropped at once
e.submit(write, sys.argv[2], "also")
"""


def run_script(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    a, b = tmp_path / "a", tmp_path / "b"
    proc = subprocess.run([sys.executable, str(script), str(a), str(b)], capture_output=True,
                          text=True, timeout=60)
    return proc, a, b


@pytest.mark.timeout(60)
def test_work_never_waited_for_still_runs_before_exit(tmp_path):
    proc, a, b = run_script(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert a.read_text() == "written" and b.read_text() == "also"


@pytest.mark.timeout(60)
def test_output_of_work_never_waited_for_appears(tmp_path):
    proc, _, _ = run_script(tmp_path)
    assert sorted(proc.stdout.split()) == ["also", "written"]


def test_dropped_future_of_an_executor_still_runs(e, tmp_path):
    path = tmp_path / "x"
    e.submit(_write_later, str(path), pure=False)  # dropped at once
    gc.collect()
    wait_for(path.exists, 30, message="the dropped task ran")


def _write_later(path):
    time.sleep(0.2)
    with open(path, "w") as f:
        f.write("x")


# --------------------------------------------------------------------------- process crashes


def _segfault():
    import faulthandler
    faulthandler.disable()
    faulthandler._sigsegv()


def _exit_now(*_):
    os._exit(7)


class CrashAtUnpickle:
    def __reduce__(self):
        return _exit_now, ()


class CrashAtPickle:
    def __reduce__(self):
        _exit_now()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["unpickling arguments", "running", "pickling result"])
def test_process_crash_ends_in_killed_worker_and_executor_goes_on(how):
    with Executor(max_workers=2) as e:
        f = {"unpickling arguments": lambda: e.submit(identity, CrashAtUnpickle()),
             "running": lambda: e.submit(_segfault),
             "pickling result": lambda: e.submit(make, CrashAtPickle)}[how]()
        with pytest.raises(KilledWorker):
            f.result(timeout=60)
        assert e.submit(pow, 2, 8).result(timeout=30) == 256
