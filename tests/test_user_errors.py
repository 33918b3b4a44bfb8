"""Bad input from users: what does not pickle, and exceptions that cannot travel home."""

from __future__ import annotations

import socket
import sys
import threading
import uuid

import pytest

from minidist import RemoteException

from conftest import wait_for


def inc(x):
    return x + 1


def make_lock():
    return threading.Lock()


def type_name(x):
    return type(x).__name__


def holders(executor, future):
    return executor._center("who_has", keys=[future.key])[future.key]


def still_serving(executor):
    assert executor.submit(inc, 1, pure=False).result(timeout=20) == 2
    assert executor.gather([executor.submit(inc, i) for i in range(5)]) == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- at submit


def test_unpicklable_function_fails_at_submit(c):
    lock = threading.Lock()
    with pytest.raises(TypeError, match="lock"):
        c.submit(lambda: lock)
    with pytest.raises(TypeError, match="lock"):
        c.map(lambda x: (x, lock), range(3))
    still_serving(c)


def test_unpicklable_argument_fails_at_submit(c, e):
    lock = threading.Lock()
    with socket.socket() as sock:
        for call in (lambda: c.submit(inc, lock), lambda: e.submit(inc, x=lock),
                     lambda: c.submit(len, [1, 2, {"deep": lock}])):
            with pytest.raises(TypeError, match="lock"):
                call()
        with pytest.raises(TypeError, match="socket"):
            c.submit(type_name, sock)
        with pytest.raises(TypeError, match="socket"):
            list(e.map(type_name, [1, sock]))
    still_serving(c)
    still_serving(e)


# --------------------------------------------------------------------------- results


def test_unpicklable_result_errs_that_task(c):
    f = c.submit(make_lock, pure=False)
    wait_for(f.done, 20, message="task done")
    with pytest.raises(TypeError, match="lock") as info:
        f.result(timeout=20)
    assert f.key in str(info.value)
    wait_for(lambda: f.status == "error", 10, message="status error")
    with pytest.raises(TypeError, match="lock"):
        f.result(timeout=20)
    assert "lock" in str(f.exception())
    with pytest.raises(TypeError, match="lock"):  # a dependent submitted now errs too
        c.submit(type_name, f).result(timeout=20)
    still_serving(c)


def test_unpicklable_result_fails_dependents_on_another_worker(c):
    f = c.submit(make_lock, pure=False)
    wait_for(f.done, 20, message="task done")
    [holder] = holders(c, f)
    other = next(a for a in c.nthreads() if a != holder)
    same = c.submit(type_name, f, workers=[holder])
    assert same.result(timeout=20) == "lock"  # on its own worker the value is fine
    g = c.submit(type_name, f, workers=[other], pure=False)  # must be fetched: cannot be
    with pytest.raises(TypeError, match="lock") as info:
        g.result(timeout=20)
    assert "cannot be pickled" in str(info.value)
    assert g.status == "error"
    wait_for(lambda: f.status == "error", 10, message="the input itself is an error")
    still_serving(c)


# --------------------------------------------------------------------------- exceptions


def raise_local_class():
    class LocalError(Exception):
        pass
    raise LocalError("raised from a class made inside the task")


class NeedsTwoArgs(Exception):
    """Pickles fine, but unpickling calls NeedsTwoArgs(message) and fails."""

    def __init__(self, a, b):
        super().__init__(f"{a} went wrong with {b}")


def raise_needs_two_args():
    raise NeedsTwoArgs("the frobnicator", "the widget")


class BadReduce(Exception):
    def __reduce__(self):
        raise RuntimeError("refusing to be pickled")


def raise_bad_reduce():
    raise BadReduce("an exception that will not pickle\nsecond line of the message")


def raise_worker_only_class(directory, name):
    """Raise an exception whose class lives in a module only the worker can import."""
    import importlib
    import os
    with open(os.path.join(directory, f"{name}.py"), "w") as f:
        f.write("class WorkerOnlyError(Exception):\n    pass\n")
    sys.path.insert(0, directory)
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(directory)
    raise module.WorkerOnlyError("only the worker knows this class\nand it says two lines")


@pytest.mark.parametrize("case", ["local-class", "bad-init", "bad-reduce", "worker-only"])
def test_exception_that_cannot_travel_arrives_as_clear_error(c, tmp_path, case):
    module_name = f"worker_only_{uuid.uuid4().hex}"
    func, args, text, where = {
        "local-class": (raise_local_class, (), "raised from a class made inside the task",
                        "raise_local_class"),
        "bad-init": (raise_needs_two_args, (), "the frobnicator went wrong with the widget",
                     "raise_needs_two_args"),
        "bad-reduce": (raise_bad_reduce, (),
                       "an exception that will not pickle\nsecond line of the message",
                       "raise_bad_reduce"),
        "worker-only": (raise_worker_only_class, (str(tmp_path), module_name),
                        "only the worker knows this class\nand it says two lines",
                        "raise_worker_only_class"),
    }[case]
    f = c.submit(func, *args, pure=False)
    with pytest.raises(Exception) as info:
        f.result(timeout=20)
    exc = info.value
    assert text in str(exc), str(exc)
    assert f.status == "error"
    tb = f.traceback()
    assert where in tb and text.splitlines()[-1] in tb
    assert where in str(exc.__cause__)  # the remote traceback is attached
    if case != "local-class":  # the client cannot rebuild these classes
        assert isinstance(exc, RemoteException)
        expected_type = {"bad-init": "NeedsTwoArgs", "bad-reduce": "BadReduce",
                         "worker-only": f"{module_name}.WorkerOnlyError"}[case]
        assert exc.type_name.endswith(expected_type), exc.type_name
    else:
        assert type(exc).__name__ == "LocalError" or isinstance(exc, RemoteException)
    still_serving(c)
