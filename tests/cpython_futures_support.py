"""Helpers for test_cpython_futures that workers import by name, as CPython's are.

CPython's ``test_concurrent_futures`` keeps its task functions in an
importable module (its worker processes import ``test.test_concurrent_futures``);
these are the same functions, importable by the cluster's workers because
the tests put this directory on their ``PYTHONPATH``.  Imported by
reference, an initializer and the tasks that read what it set share one
module, and tracebacks show source lines.
"""

from __future__ import annotations

import os
import sys
import time

INITIALIZER_STATUS = "uninitialized"


def init(x):
    global INITIALIZER_STATUS
    INITIALIZER_STATUS = x


def get_init_status():
    return INITIALIZER_STATUS


def init_fail():
    time.sleep(0.1)  # let some futures be scheduled
    raise ValueError("error in initializer")


def sleep_and_print(t, msg):
    time.sleep(t)
    print(msg)
    sys.stdout.flush()


def sleep_print_and_write(t, msg, path):
    """``sleep_and_print`` that also leaves a file, a side effect visible without output."""
    sleep_and_print(t, msg)
    with open(path, "w") as f:
        f.write(msg)


def raise_runtime_error_123():
    raise RuntimeError(123) # some comment


def wait_for_file(path, timeout=30.0):
    """Block until ``path`` exists (a cross-process semaphore for tasks)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def write_pid_then_sleep(path, t):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(t)
    return os.getpid()


class EventfulGCObj:
    """Leaves a file when an unpickled copy is garbage-collected in a worker."""

    def __init__(self, path):
        self.path = path
        self.original = True

    def __reduce__(self):
        return _worker_copy, (self.path,)

    def __del__(self):
        if not self.original:
            with open(self.path, "w") as f:
                f.write("collected")


def _worker_copy(path):
    obj = EventfulGCObj(path)
    obj.original = False
    return obj


# --------------------------------------------------------------------------- test_deadlock


def _crash(delay=None):
    """Induces a segfault."""
    if delay:
        time.sleep(delay)
    import faulthandler
    faulthandler.disable()
    faulthandler._sigsegv()


def _crash_with_data(data):
    """Induces a segfault with dummy data in input."""
    _crash()


def _exit():
    """Induces a sys exit with exitcode 1."""
    sys.exit(1)


def _raise_error(Err):
    """Function that raises an Exception in process."""
    raise Err()


def _raise_error_ignore_stderr(Err):
    """Function that raises an Exception in process and ignores stderr."""
    import io
    sys.stderr = io.StringIO()
    raise Err()


def _return_instance(cls):
    """Function that returns a instance of cls."""
    return cls()


class CrashAtPickle(object):
    """Bad object that triggers a segfault at pickling time."""
    def __reduce__(self):
        _crash()


class CrashAtUnpickle(object):
    """Bad object that triggers a segfault at unpickling time."""
    def __reduce__(self):
        return _crash, ()


class ExitAtPickle(object):
    """Bad object that triggers a process exit at pickling time."""
    def __reduce__(self):
        _exit()


class ExitAtUnpickle(object):
    """Bad object that triggers a process exit at unpickling time."""
    def __reduce__(self):
        return _exit, ()


class ErrorAtPickle(object):
    """Bad object that triggers an error at pickling time."""
    def __reduce__(self):
        from pickle import PicklingError
        raise PicklingError("Error in pickle")


class ErrorAtUnpickle(object):
    """Bad object that triggers an error at unpickling time."""
    def __reduce__(self):
        from pickle import UnpicklingError
        return _raise_error_ignore_stderr, (UnpicklingError, )
