"""CPython's own ``test_concurrent_futures`` (the ProcessPool variants), run against minidist.

Ported from ``Lib/test/test_concurrent_futures/`` of CPython 3.13
(``executor.py``, ``test_process_pool.py``, ``test_init.py``,
``test_shutdown.py``, ``test_wait.py``, ``test_as_completed.py``,
``test_future.py``, ``test_deadlock.py``).  Executors are built as CPython
builds them, ``Executor(max_workers=N, **kwargs)``, which starts and owns a
LocalCluster of N single-thread worker processes.

Adaptations that apply everywhere (each test-specific one is commented
where it is made, starting with "ADAPTED:"):

* No ``mp_context``: a cluster starts its workers as fresh interpreters
  (like "spawn"), so the fork/forkserver/spawn variants are one class here.
* ``worker_count`` is 2, not 5: the machine these run on has two cores,
  and a cluster starts all its workers up front (a process pool starts
  them on demand), so more workers would only slow every test down.
* One executor per test class (``setUpClass``) instead of one per test:
  starting a cluster costs about half a second; tests that shut their
  executor down, or need other options, get a fresh one.
* Task helpers live in ``cpython_futures_support`` (importable by the
  workers, as CPython's are by its pool processes).
* ``_processes`` (the pool's process table) becomes the owned cluster's
  worker processes, and ``multiprocessing`` semaphores and events become
  files, which any process can see.
* Sleeps of several seconds are scaled down where only their order matters.
"""

from __future__ import annotations

import concurrent.futures as futures
import gc
import io
import itertools
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import weakref
from concurrent.futures._base import (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING,
                                      RUNNING, BrokenExecutor, Future)
from pickle import PicklingError, UnpicklingError

import pytest

from minidist import Executor, KilledWorker
from minidist.task import RemoteTraceback

import cpython_futures_support as support_funcs
from conftest import wait_for
from cpython_futures_support import (CrashAtPickle, CrashAtUnpickle, ErrorAtPickle,
                                     ErrorAtUnpickle, ExitAtPickle, ExitAtUnpickle, _crash,
                                     _crash_with_data, _exit, _raise_error, _return_instance)

HERE = os.path.dirname(os.path.abspath(__file__))
SHORT_TIMEOUT = 30.0


def setUpModule():
    # Workers import the task helpers by name, as CPython's pool processes import its
    # test package: put this directory on the path of every process the tests start.
    global _saved_pythonpath
    _saved_pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, _saved_pythonpath) if p)


def tearDownModule():
    if _saved_pythonpath is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = _saved_pythonpath


_saved_pythonpath: str | None = None


def create_future(state=PENDING, exception=None, result=None):
    f = Future()
    f._state = state
    f._exception = exception
    f._result = result
    return f


PENDING_FUTURE = create_future(state=PENDING)
RUNNING_FUTURE = create_future(state=RUNNING)
CANCELLED_FUTURE = create_future(state=CANCELLED)
CANCELLED_AND_NOTIFIED_FUTURE = create_future(state=CANCELLED_AND_NOTIFIED)
EXCEPTION_FUTURE = create_future(state=FINISHED, exception=OSError())
SUCCESSFUL_FUTURE = create_future(state=FINISHED, result=42)


def mul(x, y):
    return x * y


def capture(*args, **kwargs):
    return args, kwargs


def sleep_and_raise(t):
    time.sleep(t)
    raise Exception('this is an exception')


class MyObject(object):
    def my_method(self):
        pass


def make_dummy_object(_):
    return MyObject()


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``assert_python_ok``: run ``code`` in a fresh interpreter that must exit 0."""
    env = {**os.environ, "PYTHONPATH": os.environ["PYTHONPATH"]}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc


class ExecutorMixin:
    worker_count = 2
    executor_kwargs: dict = {}

    @classmethod
    def setUpClass(cls):
        cls.tmpdir = tempfile.mkdtemp(prefix="cpython-futures-")
        cls.executor = Executor(max_workers=cls.worker_count, **cls.executor_kwargs)

    @classmethod
    def tearDownClass(cls):
        cls.executor.shutdown(wait=True)
        shutil.rmtree(cls.tmpdir, ignore_errors=True)  # after the tasks reading it

    def tearDown(self):
        # ADAPTED: CPython shuts its executor down after every test, which waits
        # for the tasks the test left running; the shared executor waits for
        # the cluster to be idle instead, so the next test starts on free workers.
        executor = type(self).executor
        if executor._shutdown or executor._broken is not None:
            return
        busy = ("waiting", "queued", "processing", "no-worker")
        deadline = time.monotonic() + 30
        while any(executor._center("info")["tasks"].get(state) for state in busy):
            if time.monotonic() > deadline:
                raise AssertionError("tasks still running 30 s after the test")
            time.sleep(0.02)

    def fresh_executor(self, max_workers=None, **kwargs):
        """An executor for this test only (it shuts it down, or needs other options)."""
        executor = Executor(max_workers=max_workers or self.worker_count, **kwargs)
        self.addCleanup(executor.shutdown, wait=True, cancel_futures=True)
        return executor

    def flag(self):
        """A file path that tasks may wait for; created at cleanup so none stays blocked."""
        path = os.path.join(self._tmp(), f"flag-{time.monotonic_ns()}")
        self.addCleanup(lambda: open(path, "w").close())
        return path

    def _tmp(self):
        """A fresh directory, removed with the class's (tasks may still read it)."""
        return tempfile.mkdtemp(dir=self.tmpdir)


# =========================================================================== executor.py


class ExecutorTest(ExecutorMixin, unittest.TestCase):
    # Executor.shutdown() and context manager usage is tested by
    # ExecutorShutdownTest.
    def test_submit(self):
        future = self.executor.submit(pow, 2, 8)
        self.assertEqual(256, future.result())

    def test_submit_keyword(self):
        future = self.executor.submit(mul, 2, y=8)
        self.assertEqual(16, future.result())
        future = self.executor.submit(capture, 1, self=2, fn=3)
        self.assertEqual(future.result(), ((1,), {'self': 2, 'fn': 3}))
        with self.assertRaises(TypeError):
            self.executor.submit(fn=capture, arg=1)
        with self.assertRaises(TypeError):
            self.executor.submit(arg=1)

    def test_map(self):
        self.assertEqual(
                list(self.executor.map(pow, range(10), range(10))),
                list(map(pow, range(10), range(10))))

        self.assertEqual(
                list(self.executor.map(pow, range(10), range(10), chunksize=3)),
                list(map(pow, range(10), range(10))))

    def test_map_exception(self):
        i = self.executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
        self.assertEqual(i.__next__(), (0, 1))
        self.assertEqual(i.__next__(), (0, 1))
        self.assertRaises(ZeroDivisionError, i.__next__)

    def test_map_timeout(self):
        # ADAPTED: sleeps [0, 0, 6] with timeout=5 scaled to [0, 0, 3] and 1.5 s.
        results = []
        try:
            for i in self.executor.map(time.sleep,
                                       [0, 0, 3],
                                       timeout=1.5):
                results.append(i)
        except futures.TimeoutError:
            pass
        else:
            self.fail('expected TimeoutError')

        self.assertEqual([None, None], results)

    def test_shutdown_race_issue12456(self):
        # Issue #12456: race condition at shutdown where trying to post a
        # sentinel in the call queue blocks (the queue is full while processes
        # have exited).
        self.executor = self.fresh_executor()  # ADAPTED: shuts its executor down
        self.executor.map(str, [2] * (self.worker_count + 1))
        self.executor.shutdown()

    def test_no_stale_references(self):
        # Issue #16284: check that the executors don't unnecessarily hang onto
        # references.
        my_object = MyObject()
        my_object_collected = threading.Event()
        my_object_callback = weakref.ref(  # noqa: F841 - the callback is the test
            my_object, lambda obj: my_object_collected.set())
        # Deliberately discarding the future.
        self.executor.submit(my_object.my_method)
        del my_object

        collected = my_object_collected.wait(timeout=SHORT_TIMEOUT)
        self.assertTrue(collected,
                        "Stale reference not collected within timeout.")

    def test_max_workers_negative(self):
        for number in (0, -1):
            with self.assertRaisesRegex(ValueError,
                                        "max_workers must be greater "
                                        "than 0"):
                Executor(max_workers=number)

    def test_free_reference(self):
        # Issue #14406: Result iterator should not keep an internal
        # reference to result objects.
        for obj in self.executor.map(make_dummy_object, range(10)):
            wr = weakref.ref(obj)
            del obj
            gc.collect()  # For PyPy or other GCs.
            self.assertIsNone(wr())


# =========================================================================== test_process_pool.py


class ProcessPoolExecutorTest(ExecutorMixin, unittest.TestCase):

    def test_killed_child(self):
        # ADAPTED: when a process pool's child is killed, the whole pool is broken
        # (BrokenProcessPool).  A cluster is built to survive that: the task that was
        # running on the killed worker runs again on another, and later submits work.
        # The worker to kill is the one running the task (a pool has no choice to make).
        executor = self.fresh_executor()
        pid_file = os.path.join(self._tmp(), "pid")
        future = executor.submit(support_funcs.write_pid_then_sleep, pid_file, 1)
        wait_for(lambda: os.path.exists(pid_file) and open(pid_file).read(), 30,
                 message="task started")
        killed = int(open(pid_file).read())
        os.kill(killed, signal.SIGKILL)
        self.assertNotEqual(future.result(timeout=SHORT_TIMEOUT), killed)
        self.assertEqual(executor.submit(pow, 2, 8).result(timeout=SHORT_TIMEOUT), 256)

    def test_map_chunksize(self):
        def bad_map():
            list(self.executor.map(pow, range(40), range(40), chunksize=-1))

        ref = list(map(pow, range(40), range(40)))
        self.assertEqual(
            list(self.executor.map(pow, range(40), range(40), chunksize=6)),
            ref)
        self.assertEqual(
            list(self.executor.map(pow, range(40), range(40), chunksize=50)),
            ref)
        self.assertEqual(
            list(self.executor.map(pow, range(40), range(40), chunksize=40)),
            ref)
        self.assertRaises(ValueError, bad_map)

    def test_traceback(self):
        # We want ensure that the traceback from the child process is
        # contained in the traceback raised in the main process.
        # ADAPTED: the raising function is a module function (CPython's is a classmethod
        # of the test class, which a worker could only get by value), and the remote
        # traceback is minidist's RemoteTraceback, not futures.process._RemoteTraceback.
        future = self.executor.submit(support_funcs.raise_runtime_error_123)
        with self.assertRaises(Exception) as cm:
            future.result()

        exc = cm.exception
        self.assertIs(type(exc), RuntimeError)
        self.assertEqual(exc.args, (123,))
        cause = exc.__cause__
        self.assertIs(type(cause), RemoteTraceback)
        self.assertIn('raise RuntimeError(123) # some comment', cause.tb)

        stderr, sys.stderr = sys.stderr, io.StringIO()
        try:
            try:
                raise exc
            except RuntimeError:
                sys.excepthook(*sys.exc_info())
            f1 = sys.stderr.getvalue()
        finally:
            sys.stderr = stderr
        self.assertIn('raise RuntimeError(123) # some comment', f1)

    def test_ressources_gced_in_workers(self):
        # Ensure that argument for a job are correctly gc-ed after the job
        # is finished
        # ADAPTED: the object leaves a file when the worker's copy is collected,
        # instead of setting a multiprocessing Manager event (a manager proxy needs
        # the authkey of the process that started it, which cluster workers lack).
        path = os.path.join(self._tmp(), "collected")
        obj = support_funcs.EventfulGCObj(path)
        future = self.executor.submit(id, obj)
        future.result()

        wait_for(lambda: os.path.exists(path), 10, message="argument collected in the worker")
        obj = None

    def test_saturation(self):
        # ADAPTED: a file instead of a semaphore; the number of processes is that of
        # the owned cluster's workers (a cluster starts them all up front).
        executor = self.executor
        flag = self.flag()
        job_count = 15 * self.worker_count
        fs = [executor.submit(support_funcs.wait_for_file, flag) for _ in range(job_count)]
        self.assertEqual(len(executor.nthreads()), self.worker_count)
        self.assertEqual(len(executor._cluster.workers), self.worker_count)
        open(flag, "w").close()
        futures.wait(fs, timeout=SHORT_TIMEOUT)
        self.assertTrue(all(f.done() and f.exception() is None for f in fs))

    # NOT PORTED: test_max_workers_too_large (Windows only); test_idle_process_reuse_one
    # and _multiple (on-demand process start: a cluster starts its workers up front);
    # test_max_tasks_per_child* (a ProcessPoolExecutor option tied to mp_context);
    # test_python_finalization_error (patches ProcessPoolExecutor's thread creation).


# =========================================================================== test_init.py


class InitializerTest(ExecutorMixin, unittest.TestCase):
    executor_kwargs = dict(initializer=support_funcs.init, initargs=('initialized',))

    def test_initializer(self):
        futures_ = [self.executor.submit(support_funcs.get_init_status)
                    for _ in range(self.worker_count)]

        for f in futures_:
            self.assertEqual(f.result(), 'initialized')


class FailingInitializerTest(ExecutorMixin, unittest.TestCase):
    executor_kwargs = dict(initializer=support_funcs.init_fail)

    def test_initializer(self):
        # ADAPTED: CPython checks that the child logged the error; a worker logs to
        # its own stderr, so this checks the error the futures carry instead.
        try:
            future = self.executor.submit(support_funcs.get_init_status)
        except BrokenExecutor:
            # Perhaps the executor is already broken
            pass
        else:
            with self.assertRaises(BrokenExecutor) as cm:
                future.result()
            self.assertIn('ValueError: error in initializer', future.traceback())
            self.assertIn('error in initializer', str(cm.exception))

        # At some point, the executor should break
        # ADAPTED: polls what submit() does rather than the private ``_broken``.
        def broken():
            try:
                self.executor.submit(support_funcs.get_init_status, pure=False)
            except BrokenExecutor:
                return True
            return False
        wait_for(broken, SHORT_TIMEOUT, message="executor not broken")

        # ... and from this point submit() is guaranteed to fail
        with self.assertRaises(BrokenExecutor):
            self.executor.submit(support_funcs.get_init_status)

    # NOT PORTED: FailingInitializerResourcesTest (multiprocessing's resource tracker).


# =========================================================================== test_shutdown.py


class ProcessPoolShutdownTest(ExecutorMixin, unittest.TestCase):
    def test_run_after_shutdown(self):
        self.executor = self.fresh_executor()
        self.executor.shutdown()
        self.assertRaises(RuntimeError,
                          self.executor.submit,
                          pow, 2, 5)

    def _interpreter_shutdown(self):
        path = os.path.join(self._tmp(), "apple")
        proc = run_python(f"""if 1:
            from minidist import Executor
            from time import sleep
            from cpython_futures_support import sleep_print_and_write
            if __name__ == "__main__":
                t = Executor(2)
                t.submit(sleep_print_and_write, 1.0, "apple", {path!r})
            """)
        return proc, path

    def test_interpreter_shutdown(self):
        # Test the atexit hook for shutdown of worker threads and processes
        # ADAPTED: the task also writes a file, and this half checks that side effect
        # (the printed output is checked by test_interpreter_shutdown_output).
        proc, path = self._interpreter_shutdown()
        # Errors in atexit hooks don't change the process exit code, check
        # stderr manually.
        self.assertFalse(proc.stderr)
        with open(path) as f:
            self.assertEqual(f.read(), "apple")

    def test_interpreter_shutdown_output(self):
        proc, _ = self._interpreter_shutdown()
        self.assertFalse(proc.stderr)
        self.assertEqual(proc.stdout.strip(), b"apple")

    def test_submit_after_interpreter_shutdown(self):
        # Test the atexit hook for shutdown of worker threads and processes
        proc = run_python("""if 1:
            import atexit
            @atexit.register
            def run_last():
                try:
                    t.submit(id, None)
                except RuntimeError:
                    print("runtime-error")
                    raise
            from minidist import Executor
            if __name__ == "__main__":
                t = Executor(2)
                t.submit(id, 42).result()
            """)
        # Errors in atexit hooks don't change the process exit code, check
        # stderr manually.
        self.assertIn("RuntimeError: cannot schedule new futures", proc.stderr.decode())
        self.assertEqual(proc.stdout.strip(), b"runtime-error")

    def test_hang_issue12364(self):
        self.executor = self.fresh_executor()
        fs = [self.executor.submit(time.sleep, 0.1) for _ in range(50)]
        self.executor.shutdown()
        for f in fs:
            f.result()

    def test_cancel_futures(self):
        self.executor = self.fresh_executor()
        assert self.worker_count <= 5, "test needs few workers"
        # ADAPTED: pure=False, since 50 identical pure calls share one key and one task.
        fs = [self.executor.submit(time.sleep, .1, pure=False) for _ in range(50)]
        self.executor.shutdown(cancel_futures=True)
        # We can't guarantee the exact number of cancellations, but we can
        # guarantee that *some* were cancelled. With few workers, many of
        # the submitted futures should have been cancelled.
        cancelled = [fut for fut in fs if fut.cancelled()]
        self.assertGreater(len(cancelled), 20)

        # Ensure the other futures were able to finish.
        # Use "not fut.cancelled()" instead of "fut.done()" to include futures
        # that may have been left in a pending state.
        others = [fut for fut in fs if not fut.cancelled()]
        for fut in others:
            self.assertTrue(fut.done(), msg=f"{fut._state=}")
            self.assertIsNone(fut.exception())

        # Similar to the number of cancelled futures, we can't guarantee the
        # exact number that completed. But, we can guarantee that at least
        # one finished.
        # ADAPTED: not here.  The center does not tell clients when a task starts,
        # so a Future never shows RUNNING and cancel() succeeds on every unfinished
        # one, also on those a worker is running (their results are dropped).

    def test_hang_gh83386(self):
        """shutdown(wait=False) doesn't hang at exit with running futures.

        See https://github.com/python/cpython/issues/83386.
        """
        # ADAPTED: CPython skips this for ProcessPoolExecutor (it hangs there); it
        # runs here, and checks the task's file as well as its output (see
        # test_interpreter_shutdown).
        path = os.path.join(self._tmp(), "apple")
        proc = run_python(f"""if True:
            from minidist import Executor
            from cpython_futures_support import sleep_print_and_write
            if __name__ == "__main__":
                t = Executor(max_workers=3)
                t.submit(sleep_print_and_write, 1.0, "apple", {path!r})
                t.shutdown(wait=False)
            """)
        self.assertFalse(proc.stderr)
        with open(path) as f:
            self.assertEqual(f.read(), "apple")

    def test_hang_gh94440(self):
        """shutdown(wait=True) doesn't hang when a future was submitted and
        quickly canceled right before shutdown.

        See https://github.com/python/cpython/issues/94440.
        """
        def timeout(_signum, _frame):
            raise RuntimeError("timed out waiting for shutdown")

        executor = self.fresh_executor(max_workers=1)
        executor.submit(int).result()
        old_handler = signal.signal(signal.SIGALRM, timeout)
        try:
            signal.alarm(5)
            executor.submit(int).cancel()
            executor.shutdown(wait=True)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old_handler)

    def test_processes_terminate(self):
        # ADAPTED: a file instead of a semaphore; the processes are the owned
        # cluster's (all started up front, like the fork context's pre-spawned pool).
        self.executor = self.fresh_executor()
        flag = self.flag()
        for _ in range(3):
            self.executor.submit(support_funcs.wait_for_file, flag, pure=False)
        self.assertEqual(len(self.executor._cluster.workers), self.worker_count)
        open(flag, "w").close()
        processes = [p.popen for p in self.executor._cluster.workers]
        self.executor.shutdown()

        for p in processes:
            self.assertIsNotNone(p.poll())

    def test_context_manager_shutdown(self):
        with Executor(max_workers=self.worker_count) as e:
            processes = [p.popen for p in e._cluster.workers]
            self.assertEqual(list(e.map(abs, range(-5, 5))),
                             [5, 4, 3, 2, 1, 0, 1, 2, 3, 4])

        for p in processes:
            self.assertIsNotNone(p.poll())

    def test_del_shutdown(self):
        # ADAPTED: the map iterator holds its session, so ``del executor`` does not
        # end it while ``res`` lives (CPython's pool also finishes the map first);
        # the processes stop when the iterator is gone (here: explicitly, to reap).
        executor = Executor(max_workers=self.worker_count)
        res = executor.map(abs, range(-5, 5))
        processes = [p.popen for p in executor._cluster.workers]
        cluster = executor._cluster
        del executor
        gc.collect()  # For PyPy or other GCs.

        # Make sure the results were all computed before the
        # executor got shutdown.
        assert all([r == abs(v) for r, v in zip(res, range(-5, 5))])
        cluster.close()
        for p in processes:
            self.assertIsNotNone(p.poll())

    def test_shutdown_no_wait(self):
        # Ensure that the executor cleans up the processes when calling
        # shutdown with wait=False
        executor = Executor(max_workers=self.worker_count)
        res = executor.map(abs, range(-5, 5))
        processes = [p.popen for p in executor._cluster.workers]
        executor.shutdown(wait=False)

        # Make sure that all the executor resources were properly cleaned by
        # the shutdown process
        executor._finisher.join(SHORT_TIMEOUT)  # ADAPTED: the thread finishing the shutdown
        for p in processes:
            self.assertIsNotNone(p.poll())

        # Make sure the results were all computed before the executor got
        # shutdown.
        assert all([r == abs(v) for r, v in zip(res, range(-5, 5))])


# =========================================================================== test_wait.py


class WaitTests(ExecutorMixin, unittest.TestCase):
    def test_20369(self):
        # See https://bugs.python.org/issue20369
        future = self.executor.submit(time.sleep, 1.5)
        done, not_done = futures.wait([future, future],
                            return_when=futures.ALL_COMPLETED)
        self.assertEqual({future}, done)
        self.assertEqual(set(), not_done)

    def test_first_completed(self):
        future1 = self.executor.submit(mul, 21, 2)
        future2 = self.executor.submit(time.sleep, 1.5)

        done, not_done = futures.wait(
                [CANCELLED_FUTURE, future1, future2],
                 return_when=futures.FIRST_COMPLETED)

        self.assertEqual(set([future1]), done)
        self.assertEqual(set([CANCELLED_FUTURE, future2]), not_done)

    def test_first_completed_some_already_completed(self):
        future1 = self.executor.submit(time.sleep, 1.5)

        finished, pending = futures.wait(
                 [CANCELLED_AND_NOTIFIED_FUTURE, SUCCESSFUL_FUTURE, future1],
                 return_when=futures.FIRST_COMPLETED)

        self.assertEqual(
                set([CANCELLED_AND_NOTIFIED_FUTURE, SUCCESSFUL_FUTURE]),
                finished)
        self.assertEqual(set([future1]), pending)

    def test_first_exception(self):
        future1 = self.executor.submit(mul, 2, 21)
        future2 = self.executor.submit(sleep_and_raise, 1.5)
        future3 = self.executor.submit(time.sleep, 3)

        finished, pending = futures.wait(
                [future1, future2, future3],
                return_when=futures.FIRST_EXCEPTION)

        self.assertEqual(set([future1, future2]), finished)
        self.assertEqual(set([future3]), pending)

    def test_first_exception_some_already_complete(self):
        future1 = self.executor.submit(divmod, 21, 0)
        future2 = self.executor.submit(time.sleep, 1.5)

        finished, pending = futures.wait(
                [SUCCESSFUL_FUTURE,
                 CANCELLED_FUTURE,
                 CANCELLED_AND_NOTIFIED_FUTURE,
                 future1, future2],
                return_when=futures.FIRST_EXCEPTION)

        self.assertEqual(set([SUCCESSFUL_FUTURE,
                              CANCELLED_AND_NOTIFIED_FUTURE,
                              future1]), finished)
        self.assertEqual(set([CANCELLED_FUTURE, future2]), pending)

    def test_first_exception_one_already_failed(self):
        future1 = self.executor.submit(time.sleep, 2)

        finished, pending = futures.wait(
                 [EXCEPTION_FUTURE, future1],
                 return_when=futures.FIRST_EXCEPTION)

        self.assertEqual(set([EXCEPTION_FUTURE]), finished)
        self.assertEqual(set([future1]), pending)

    def test_all_completed(self):
        future1 = self.executor.submit(divmod, 2, 0)
        future2 = self.executor.submit(mul, 2, 21)

        finished, pending = futures.wait(
                [SUCCESSFUL_FUTURE,
                 CANCELLED_AND_NOTIFIED_FUTURE,
                 EXCEPTION_FUTURE,
                 future1,
                 future2],
                return_when=futures.ALL_COMPLETED)

        self.assertEqual(set([SUCCESSFUL_FUTURE,
                              CANCELLED_AND_NOTIFIED_FUTURE,
                              EXCEPTION_FUTURE,
                              future1,
                              future2]), finished)
        self.assertEqual(set(), pending)

    def test_timeout(self):
        short_timeout = 0.050
        long_timeout = short_timeout * 10

        future = self.executor.submit(time.sleep, long_timeout)

        finished, pending = futures.wait(
                [CANCELLED_AND_NOTIFIED_FUTURE,
                 EXCEPTION_FUTURE,
                 SUCCESSFUL_FUTURE,
                 future],
                timeout=short_timeout,
                return_when=futures.ALL_COMPLETED)

        self.assertEqual(set([CANCELLED_AND_NOTIFIED_FUTURE,
                              EXCEPTION_FUTURE,
                              SUCCESSFUL_FUTURE]),
                         finished)
        self.assertEqual(set([future]), pending)


# =========================================================================== test_as_completed.py


class AsCompletedTests(ExecutorMixin, unittest.TestCase):
    def test_no_timeout(self):
        future1 = self.executor.submit(mul, 2, 21)
        future2 = self.executor.submit(mul, 7, 6)

        completed = set(futures.as_completed(
                [CANCELLED_AND_NOTIFIED_FUTURE,
                 EXCEPTION_FUTURE,
                 SUCCESSFUL_FUTURE,
                 future1, future2]))
        self.assertEqual(set(
                [CANCELLED_AND_NOTIFIED_FUTURE,
                 EXCEPTION_FUTURE,
                 SUCCESSFUL_FUTURE,
                 future1, future2]),
                completed)

    def test_future_times_out(self):
        """Test ``futures.as_completed`` timing out before
        completing it's final future."""
        already_completed = {CANCELLED_AND_NOTIFIED_FUTURE,
                             EXCEPTION_FUTURE,
                             SUCCESSFUL_FUTURE}

        # Windows clock resolution is around 15.6 ms
        short_timeout = 0.100
        for timeout in (0, short_timeout):
            with self.subTest(timeout):

                completed_futures = set()
                future = self.executor.submit(time.sleep, short_timeout * 10)

                try:
                    for f in futures.as_completed(
                        already_completed | {future},
                        timeout
                    ):
                        completed_futures.add(f)
                except futures.TimeoutError:
                    pass

                # Check that ``future`` wasn't completed.
                self.assertEqual(completed_futures, already_completed)

    def test_duplicate_futures(self):
        # Issue 20367. Duplicate futures should not raise exceptions or give
        # duplicate responses.
        # Issue #31641: accept arbitrary iterables.
        future1 = self.executor.submit(time.sleep, 2)
        completed = [
            f for f in futures.as_completed(itertools.repeat(future1, 3))
        ]
        self.assertEqual(len(completed), 1)

    def test_free_reference_yielded_future(self):
        # Issue #14406: Generator should not keep references
        # to finished futures.
        futures_list = [Future() for _ in range(8)]
        futures_list.append(create_future(state=CANCELLED_AND_NOTIFIED))
        futures_list.append(create_future(state=FINISHED, result=42))

        with self.assertRaises(futures.TimeoutError):
            for future in futures.as_completed(futures_list, timeout=0):
                futures_list.remove(future)
                wr = weakref.ref(future)
                del future
                gc.collect()  # For PyPy or other GCs.
                self.assertIsNone(wr())

        futures_list[0].set_result("test")
        for future in futures.as_completed(futures_list):
            futures_list.remove(future)
            wr = weakref.ref(future)
            del future
            gc.collect()  # For PyPy or other GCs.
            self.assertIsNone(wr())
            if futures_list:
                futures_list[0].set_result("test")

    def test_free_reference_yielded_executor_future(self):
        # ADAPTED: the same check with the executor's own Futures (CPython's uses
        # bare Futures, which the test above keeps).
        futures_list = [self.executor.submit(mul, i, 2) for i in range(8)]
        for future in futures.as_completed(futures_list, timeout=SHORT_TIMEOUT):
            futures_list.remove(future)
            wr = weakref.ref(future)
            del future
            gc.collect()
            self.assertIsNone(wr())

    def test_correct_timeout_exception_msg(self):
        futures_list = [CANCELLED_AND_NOTIFIED_FUTURE, PENDING_FUTURE,
                        RUNNING_FUTURE, SUCCESSFUL_FUTURE]

        with self.assertRaises(futures.TimeoutError) as cm:
            list(futures.as_completed(futures_list, timeout=0))

        self.assertEqual(str(cm.exception), '2 (of 4) futures unfinished')


# =========================================================================== test_future.py


class FutureTests(ExecutorMixin, unittest.TestCase):
    # ADAPTED: CPython drives bare Futures by hand (set_result, set_exception);
    # these are the executor's Futures, driven by real tasks: a pending one waits
    # for a flag file, a failed one divides by zero.  Tests of Future internals
    # (set_result twice, states forced by hand) stay with CPython's own suite.

    def pending(self, value=5):
        flag = self.flag()
        return self.executor.submit(support_funcs.wait_for_file, flag, pure=False), flag

    def test_done_callback_with_result(self):
        callback_result = []
        f = self.executor.submit(mul, 5, 1)
        f.add_done_callback(lambda fut: callback_result.append(fut.result()))
        f.result(SHORT_TIMEOUT)
        wait_for(lambda: callback_result, 10, message="callback")
        self.assertEqual([5], callback_result)

    def test_done_callback_with_exception(self):
        callback_exception = []
        f = self.executor.submit(_raise_error, ValueError)
        f.add_done_callback(lambda fut: callback_exception.append(fut.exception()))
        futures.wait([f], SHORT_TIMEOUT)
        wait_for(lambda: callback_exception, 10, message="callback")
        self.assertIsInstance(callback_exception[0], ValueError)

    def test_done_callback_with_cancel(self):
        was_cancelled = None
        def fn(callback_future):
            nonlocal was_cancelled
            was_cancelled = callback_future.cancelled()

        f, _ = self.pending()
        f.add_done_callback(fn)
        self.assertTrue(f.cancel())
        self.assertTrue(was_cancelled)

    def test_done_callback_raises(self):
        raising_was_called = threading.Event()
        fn_was_called = threading.Event()

        def raising_fn(callback_future):
            raising_was_called.set()
            raise Exception('doh!')

        def fn(callback_future):
            fn_was_called.set()

        f, _ = self.pending()
        f.add_done_callback(raising_fn)
        f.add_done_callback(fn)
        self.assertTrue(f.cancel())
        self.assertTrue(raising_was_called.is_set())
        self.assertTrue(fn_was_called.is_set())

    def test_done_callback_already_successful(self):
        callback_result = None
        def fn(callback_future):
            nonlocal callback_result
            callback_result = callback_future.result()

        f = self.executor.submit(mul, 5, 1)
        f.result(SHORT_TIMEOUT)
        f.add_done_callback(fn)
        self.assertEqual(5, callback_result)

    def test_done_callback_already_failed(self):
        callback_exception = None
        def fn(callback_future):
            nonlocal callback_exception
            callback_exception = callback_future.exception()

        f = self.executor.submit(_raise_error, ValueError)
        futures.wait([f], SHORT_TIMEOUT)
        f.add_done_callback(fn)
        self.assertIsInstance(callback_exception, ValueError)

    def test_done_callback_already_cancelled(self):
        was_cancelled = None
        def fn(callback_future):
            nonlocal was_cancelled
            was_cancelled = callback_future.cancelled()

        f, _ = self.pending()
        self.assertTrue(f.cancel())
        f.add_done_callback(fn)
        self.assertTrue(was_cancelled)

    def test_repr(self):
        # ADAPTED: minidist's repr is ``<Future: status: ..., key: ...>`` (its design).
        f, flag = self.pending()
        self.assertRegex(repr(f), '<Future: status: pending, key: wait_for_file-')
        open(flag, "w").close()
        f.result(SHORT_TIMEOUT)
        self.assertRegex(repr(f), '<Future: status: finished, key: wait_for_file-')
        g = self.executor.submit(divmod, 1, 0)
        futures.wait([g], SHORT_TIMEOUT)
        self.assertRegex(repr(g), '<Future: status: error, key: divmod-')
        h, _ = self.pending()
        h.cancel()
        self.assertRegex(repr(h), '<Future: status: cancelled, key: wait_for_file-')

    def test_cancel(self):
        # ADAPTED: a task a worker has started cannot be stopped either, but the
        # Future of a cluster task never shows RUNNING, so cancel() succeeds until
        # it is finished (as CPython's does for a PENDING future).
        f1, _ = self.pending()
        f6 = self.executor.submit(mul, 5, 1)
        f6.result(SHORT_TIMEOUT)
        f5 = self.executor.submit(divmod, 1, 0)
        futures.wait([f5], SHORT_TIMEOUT)

        self.assertTrue(f1.cancel())
        self.assertEqual(f1._state, CANCELLED_AND_NOTIFIED)
        self.assertTrue(f1.cancel())
        self.assertEqual(f1._state, CANCELLED_AND_NOTIFIED)

        self.assertFalse(f5.cancel())
        self.assertEqual(f5._state, FINISHED)

        self.assertFalse(f6.cancel())
        self.assertEqual(f6._state, FINISHED)

    def test_cancelled_done_running(self):
        f1, flag = self.pending()
        self.assertFalse(f1.cancelled())
        self.assertFalse(f1.done())
        self.assertFalse(f1.running())
        f2, _ = self.pending()
        f2.cancel()
        self.assertTrue(f2.cancelled())
        self.assertTrue(f2.done())
        self.assertFalse(f2.running())
        open(flag, "w").close()
        f1.result(SHORT_TIMEOUT)
        self.assertFalse(f1.cancelled())
        self.assertTrue(f1.done())
        self.assertFalse(f1.running())

    def test_result_with_timeout(self):
        f, _ = self.pending()
        self.assertRaises(futures.TimeoutError, f.result, timeout=0)
        f.cancel()
        self.assertRaises(futures.CancelledError, f.result, timeout=0)
        g = self.executor.submit(_raise_error, OSError)
        futures.wait([g], SHORT_TIMEOUT)
        self.assertRaises(OSError, g.result, timeout=0)
        h = self.executor.submit(mul, 42, 1)
        futures.wait([h], SHORT_TIMEOUT)
        self.assertEqual(h.result(timeout=SHORT_TIMEOUT), 42)

    def test_result_with_success(self):
        f1, flag = self.pending()
        t = threading.Timer(0.5, lambda: open(flag, "w").close())
        t.start()
        self.assertIsNone(f1.result(timeout=SHORT_TIMEOUT))
        t.join()

    def test_result_with_cancel(self):
        f1, _ = self.pending()
        t = threading.Timer(0.5, f1.cancel)
        t.start()
        self.assertRaises(futures.CancelledError,
                          f1.result, timeout=SHORT_TIMEOUT)
        t.join()

    def test_exception_with_timeout(self):
        f, _ = self.pending()
        self.assertRaises(futures.TimeoutError, f.exception, timeout=0)
        f.cancel()
        self.assertRaises(futures.CancelledError, f.exception, timeout=0)
        g = self.executor.submit(_raise_error, OSError)
        futures.wait([g], SHORT_TIMEOUT)
        self.assertTrue(isinstance(g.exception(timeout=0), OSError))
        h = self.executor.submit(mul, 42, 1)
        futures.wait([h], SHORT_TIMEOUT)
        self.assertEqual(h.exception(timeout=0), None)

    def test_exception_with_success(self):
        f1 = self.executor.submit(_raise_error, OSError)
        self.assertTrue(isinstance(f1.exception(timeout=SHORT_TIMEOUT), OSError))


# =========================================================================== test_deadlock.py




class ExecutorDeadlockTest(ExecutorMixin, unittest.TestCase):
    TIMEOUT = 60  # ADAPTED: support.LONG_TIMEOUT is 5 minutes; the contract here is one

    # ADAPTED: CPython builds a new Executor(max_workers=2) for every check; the
    # checks that cannot break it share this class's one, which then also shows
    # that no worker thread was lost: every check ends by running more tasks than
    # there are workers.  Where a process pool's child process dies (BrokenProcessPool)
    # a cluster's task thread catches the error and the task fails with it; a real
    # process crash ends in KilledWorker after the allowed failures, and the same
    # executor goes on.

    def _check_crash(self, error, func, *args, executor=None):
        executor = executor or self.executor
        res = executor.submit(func, *args)
        try:
            with self.assertRaises(error) as cm:
                res.result(timeout=self.TIMEOUT)
        except futures.TimeoutError:
            self.fail(f"executor deadlock: {func.__name__}{args} did not end "
                      f"within {self.TIMEOUT}s")
        self.assertEqual(list(executor.map(pow, [2] * 4, range(4))), [1, 2, 4, 8])
        return cm.exception

    def _check_process_crash(self, func, *args):
        executor = self.fresh_executor(max_workers=2)
        self._check_crash(KilledWorker, func, *args, executor=executor)

    def test_error_at_task_pickle(self):
        # Check problem occurring while pickling a task in
        # the task_handler thread
        # ADAPTED: the arguments are pickled in submit(), which raises at once.
        with self.assertRaises(PicklingError) as cm:
            self.executor.submit(id, ErrorAtPickle())
        self.assertIn("ErrorAtPickle", str(cm.exception))

    def test_exit_at_task_unpickle(self):
        # Check problem occurring while unpickling a task on workers
        # ADAPTED: BrokenProcessPool -> the SystemExit itself, the task's error.
        self._check_crash(SystemExit, id, ExitAtUnpickle())

    def test_error_at_task_unpickle(self):
        # gh-109832: Restore stderr overriden by _raise_error_ignore_stderr()
        self.addCleanup(setattr, sys, 'stderr', sys.stderr)

        # Check problem occurring while unpickling a task on workers
        # ADAPTED: BrokenProcessPool -> the UnpicklingError itself, the task's error.
        self._check_crash(UnpicklingError, id, ErrorAtUnpickle())

    def test_crash_at_task_unpickle(self):
        # Check problem occurring while unpickling a task on workers
        # ADAPTED: BrokenProcessPool -> KilledWorker (here and in the other crashes).
        self._check_process_crash(id, CrashAtUnpickle())

    def test_crash_during_func_exec_on_worker(self):
        # Check problem occurring during func execution on workers
        self._check_process_crash(_crash)

    def test_exit_during_func_exec_on_worker(self):
        # Check problem occurring during func execution on workers
        self._check_crash(SystemExit, _exit)

    def test_error_during_func_exec_on_worker(self):
        # Check problem occurring during func execution on workers
        self._check_crash(RuntimeError, _raise_error, RuntimeError)

    def test_crash_during_result_pickle_on_worker(self):
        # Check problem occurring while pickling a task result
        # on workers
        self._check_process_crash(_return_instance, CrashAtPickle)

    def test_exit_during_result_pickle_on_worker(self):
        # Check problem occurring while pickling a task result
        # on workers
        self._check_crash(SystemExit, _return_instance, ExitAtPickle)

    def test_error_during_result_pickle_on_worker(self):
        # Check problem occurring while pickling a task result
        # on workers
        self._check_crash(PicklingError, _return_instance, ErrorAtPickle)

    def test_error_during_result_unpickle_in_result_handler(self):
        # gh-109832: Restore stderr overriden by _raise_error_ignore_stderr()
        self.addCleanup(setattr, sys, 'stderr', sys.stderr)

        # Check problem occurring while unpickling a task in
        # the result_handler thread
        # ADAPTED: the result is unpickled by result(), which raises the error.
        self._check_crash(UnpicklingError, _return_instance, ErrorAtUnpickle)

    def test_exit_during_result_unpickle_in_result_handler(self):
        # Check problem occurring while unpickling a task in
        # the result_handler thread
        # ADAPTED: the result is unpickled by result(), which raises the SystemExit.
        self._check_crash(SystemExit, _return_instance, ExitAtUnpickle)

    def test_shutdown_deadlock(self):
        # Test that the pool calling shutdown do not cause deadlock
        # if a worker fails after the shutdown call.
        with Executor(max_workers=2) as executor:
            f = executor.submit(_crash, delay=.1)
            executor.shutdown(wait=True)
            with self.assertRaises(KilledWorker):
                f.result()

    def test_shutdown_deadlock_pickle(self):
        # Test that the pool calling shutdown with wait=False does not cause
        # a deadlock if a task fails at pickle after the shutdown call.
        # Reported in bpo-39104.
        with Executor(max_workers=2) as executor:
            executor.submit(id, 42).result()

            # Submit a task that fails at pickle and shutdown the executor
            # without waiting
            # ADAPTED: submit() itself raises the PicklingError.
            with self.assertRaises(PicklingError):
                executor.submit(id, ErrorAtPickle())
            executor.shutdown(wait=False)
        executor._finisher.join(SHORT_TIMEOUT)
        self.assertFalse(executor._finisher.is_alive())

    def test_crash_big_data(self):
        # Test that there is a clean exception instad of a deadlock when a
        # child process crashes while some data is being written into the
        # queue.
        # https://github.com/python/cpython/issues/94777
        data = "a" * (4 << 20)  # ADAPTED: support.PIPE_MAX_SIZE
        with Executor(max_workers=2) as executor:
            with self.assertRaises(KilledWorker):
                list(executor.map(_crash_with_data, [data] * 10))

    # NOT PORTED: test_gh105829_should_not_deadlock_if_wakeup_pipe_full (patches
    # ProcessPoolExecutor's manager thread and wakeup pipe).
