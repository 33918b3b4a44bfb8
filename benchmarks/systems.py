"""Adapters: every system behind the same small interface.

An adapter is started fresh for each measurement (outside the timing) and
closed after it.  Operations a system has no equivalent for raise
``NotSupported``; a missing optional piece raises ``NotAvailable``.  Both
become "n/a" cells in the table, with the reason in the JSON.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from . import procs

SYSTEMS = ("minidist", "processpool", "mpool", "dask")
"""The systems ``--systems`` accepts (the socket floor joins latency and bandwidth on its own)."""


class NotSupported(Exception):
    """The system has no equivalent of this operation."""


class NotAvailable(Exception):
    """An optional part (a package, a module of minidist) is not installed here."""


class System:
    """The interface workloads use.  Handles are whatever the system's submit returns."""

    name = "system"
    n_workers = 0

    def start(self, n_workers: int = 2, payload_size: int | None = None,
              memory_limit: int | None = None) -> None:
        """Start the cluster or pool; ``payload_size`` asks pools to build payloads per worker;
        ``memory_limit`` is bytes per worker (clusters only; None: each system's default)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop everything ``start`` started."""
        raise NotImplementedError

    def submit(self, fn: Callable, *args: Any, workers: list[str] | None = None) -> Any:
        """Submit one call; ``workers`` restricts where it may run."""
        raise NotImplementedError

    def result(self, handle: Any) -> Any:
        """Wait for one handle and return its value."""
        raise NotImplementedError

    def gather(self, handles: list) -> list:
        """Values of many handles, in order."""
        return [self.result(h) for h in handles]

    def map(self, fn: Callable, *iterables: Any) -> list:
        """The system's own bulk map, results gathered into a list."""
        raise NotImplementedError

    def map_futures(self, fn: Callable, *iterables: Any) -> list:
        """A bulk map whose results stay remote (futures of futures are possible)."""
        raise NotSupported(f"{self.name} has no remote futures")

    def scatter(self, obj: Any, worker: str | None = None) -> Any:
        """Put ``obj`` on a worker (``worker`` or any); return a handle."""
        raise NotSupported(f"{self.name} has no scatter")

    def fetch(self, handle: Any) -> Any:
        """The value behind a scattered or computed handle."""
        return self.result(handle)

    def cancel(self, handles: list) -> None:
        """Cancel pending handles."""

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until the cluster holds no task (released handles are gone)."""

    def worker_addresses(self) -> list[str]:
        """Addresses of the workers, sorted."""
        raise NotSupported(f"{self.name} cannot address one worker")

    def dask_scheduler(self) -> Callable:
        """A function for ``dask.compute(..., scheduler=...)``."""
        raise NotSupported(f"{self.name} cannot run dask graphs")

    def center_pid(self) -> int:
        """PID of the scheduling process (center / scheduler)."""
        raise NotSupported(f"{self.name} has no separate scheduler process")

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes."""
        raise NotSupported(f"{self.name} worker PIDs are not tracked")

    def pending(self) -> int:
        """How many tasks the scheduler holds waiting for inputs."""
        raise NotSupported(f"{self.name} has no scheduler to ask")


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class _ClientSystem(System):
    """What minidist and dask.distributed share: a ``Client`` with the same futures API."""

    client: Any = None
    scatter_options: dict = {}

    def submit(self, fn: Callable, *args: Any, workers: list[str] | None = None) -> Any:
        return self.client.submit(fn, *args, workers=workers)

    def result(self, handle: Any) -> Any:
        return handle.result()

    def gather(self, handles: list) -> list:
        return self.client.gather(handles)

    def map(self, fn: Callable, *iterables: Any) -> list:
        return self.client.gather(self.client.map(fn, *iterables))

    def map_futures(self, fn: Callable, *iterables: Any) -> list:
        return self.client.map(fn, *iterables)

    def scatter(self, obj: Any, worker: str | None = None) -> Any:
        return self.client.scatter(obj, workers=[worker] if worker else None,
                                   **self.scatter_options)

    def fetch(self, handle: Any) -> Any:
        return self.client.gather(handle)

    def cancel(self, handles: list) -> None:
        self.client.cancel(handles)


DASHBOARD_POLL = "MINIDIST_BENCH_DASHBOARD_POLL"
"""Seconds between polls of the dashboard's data, as an open page polls; unset: no dashboard."""


def _poll_dashboard(link: str, interval: float, stop: Any) -> None:
    """Fetch ``data.json`` like the dashboard page does, every ``interval`` until ``stop``."""
    import json
    import urllib.request
    mark = 0
    while not stop.wait(interval):
        try:
            with urllib.request.urlopen(f"{link}data.json?since={mark}", timeout=30) as r:
                mark = json.load(r)["stream"]["mark"]
        except OSError:
            pass


class Minidist(_ClientSystem):
    """``LocalCluster(n_workers, threads_per_worker=1)`` and a ``Client`` on it.

    With ``MINIDIST_BENCH_DASHBOARD_POLL=S`` set, the center serves its dashboard and a
    thread polls it every S seconds, as an open page would (the cost of watching).
    """

    name = "minidist"

    def __init__(self) -> None:
        self.cluster = None
        self.client = None
        self._poller_stop = None

    def start(self, n_workers: int = 2, payload_size: int | None = None,
              memory_limit: int | None = None) -> None:
        import threading
        from minidist import Client, LocalCluster
        self.n_workers = n_workers
        poll = os.environ.get(DASHBOARD_POLL)
        self.cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, timeout=300,
                                    memory_limit=memory_limit or "auto",
                                    **({"dashboard_port": 0} if poll else {}))
        self.client = Client(self.cluster)
        if poll:
            self._poller_stop = threading.Event()
            threading.Thread(target=_poll_dashboard, daemon=True, name="dashboard-poll",
                             args=(self.cluster.dashboard_link, float(poll),
                                   self._poller_stop)).start()

    def close(self) -> None:
        if self._poller_stop is not None:
            self._poller_stop.set()
        try:
            if self.client is not None:
                self.client.close()
        finally:
            self.client = None
            if self.cluster is not None:
                self.cluster.close()
                self.cluster = None

    def settle(self, timeout: float = 60.0) -> None:
        _wait_until(lambda: self.client._center("info")["ntasks"] == 0, timeout,
                    "the center to forget released tasks")

    def worker_addresses(self) -> list[str]:
        return sorted(self.client.nthreads())

    def dask_scheduler(self) -> Callable:
        if callable(getattr(self.client, "get", None)):
            return self.client.get
        try:
            from minidist import dask_get
        except ImportError as e:
            raise NotAvailable(f"minidist.dask_get is not available ({e})") from None
        host, _, port = self.cluster.address.rpartition(":")
        return functools.partial(dask_get.get, host, int(port))

    def center_pid(self) -> int:
        return self.cluster.center.pid

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.cluster.workers]

    def pending(self) -> int:
        return self.client._center("info")["tasks"].get("waiting", 0)


class ProcessPool(System):
    """``concurrent.futures.ProcessPoolExecutor(n_workers)``."""

    name = "processpool"

    def __init__(self) -> None:
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None

    def start(self, n_workers: int = 2, payload_size: int | None = None) -> None:
        from .tasks import init_payloads
        self.n_workers = n_workers
        kwargs = {"initializer": init_payloads, "initargs": (payload_size,)} \
            if payload_size else {}
        self.pool = concurrent.futures.ProcessPoolExecutor(n_workers, **kwargs)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def submit(self, fn: Callable, *args: Any, workers: list[str] | None = None) -> Any:
        if workers:
            raise NotSupported("processpool cannot address one worker")
        return self.pool.submit(fn, *args)

    def result(self, handle: Any) -> Any:
        return handle.result()

    def map(self, fn: Callable, *iterables: Any) -> list:
        return list(self.pool.map(fn, *iterables))

    def cancel(self, handles: list) -> None:
        for h in handles:
            h.cancel()


class MultiprocessingPool(System):
    """``multiprocessing.Pool(n_workers)``."""

    name = "mpool"

    def __init__(self) -> None:
        self.pool = None

    def start(self, n_workers: int = 2, payload_size: int | None = None) -> None:
        from .tasks import init_payloads
        self.n_workers = n_workers
        self.pool = multiprocessing.Pool(n_workers, init_payloads if payload_size else None,
                                         (payload_size,) if payload_size else ())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None

    def submit(self, fn: Callable, *args: Any, workers: list[str] | None = None) -> Any:
        if workers:
            raise NotSupported("mpool cannot address one worker")
        return self.pool.apply_async(fn, args)

    def result(self, handle: Any) -> Any:
        return handle.get()

    def map(self, fn: Callable, *iterables: Any) -> list:
        if len(iterables) == 1:
            return self.pool.map(fn, iterables[0])
        return self.pool.starmap(fn, zip(*iterables))


def _dask_waiting(dask_scheduler: Any) -> int:
    """Run on the dask scheduler: how many tasks wait for inputs."""
    return sum(1 for ts in dask_scheduler.tasks.values() if ts.state == "waiting")


class Dask(_ClientSystem):
    """dask.distributed: ``LocalCluster(n_workers, threads_per_worker=1, processes=True)``.

    The dashboard is off (it would only cost dask time).  With
    ``separate_scheduler=True`` the scheduler and workers are started as
    their own processes with dask's command line tools instead, so the
    scheduler's memory can be read apart from this process (a LocalCluster
    runs its scheduler inside the client's process).
    """

    name = "dask"

    def __init__(self, separate_scheduler: bool = False) -> None:
        self.separate = separate_scheduler
        self.cluster = None
        self.client = None
        self._procs: list[subprocess.Popen] = []
        self._tmp: tempfile.TemporaryDirectory | None = None

    def start(self, n_workers: int = 2, payload_size: int | None = None,
              memory_limit: int | None = None) -> None:
        try:
            import distributed
        except ImportError as e:
            raise NotAvailable(f"dask.distributed is not installed ({e})") from None
        self.n_workers = n_workers
        if self.separate:
            self._start_processes(n_workers)
            return
        self.cluster = distributed.LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True,
            dashboard_address=None, silence_logs=logging.ERROR,
            memory_limit=memory_limit or "auto")
        self.client = distributed.Client(self.cluster)

    def _start_processes(self, n_workers: int) -> None:
        import distributed
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-dask-")
        sched_file = os.path.join(self._tmp.name, "scheduler.json")
        log = open(os.path.join(self._tmp.name, "log"), "wb")
        try:
            self._procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                 "--port", "0", "--no-dashboard", "--scheduler-file", sched_file],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log))
            _wait_until(lambda: os.path.exists(sched_file), 60, "the dask scheduler")
            for _ in range(n_workers):
                self._procs.append(subprocess.Popen(
                    [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                     sched_file, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                     "--host", "127.0.0.1"], stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        finally:
            log.close()
        self.client = distributed.Client(scheduler_file=sched_file)
        self.client.wait_for_workers(n_workers, timeout=120)

    def close(self) -> None:
        try:
            if self.separate:
                self._stop_processes()  # first: a busy scheduler would make the client wait
            if self.client is not None:
                self.client.close(timeout=10 if self.separate else None)
        finally:
            self.client = None
            try:
                if self.cluster is not None:
                    self.cluster.close(timeout=30)
            finally:
                self.cluster = None
                self._stop_processes()

    def _stop_processes(self) -> None:
        running = {p.pid: procs.start_time(p.pid) for p in self._procs}
        procs.stop({pid: t for pid, t in running.items() if t is not None}, grace=10)
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self._procs = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # hash=False: no hashing of 256 MB before sending, and no reuse of an earlier copy
    scatter_options = {"hash": False}

    def settle(self, timeout: float = 60.0) -> None:
        _wait_until(lambda: self.client.run_on_scheduler(_dask_ntasks) == 0, timeout,
                    "the dask scheduler to forget released tasks")

    def worker_addresses(self) -> list[str]:
        return sorted(self.client.scheduler_info()["workers"])

    def dask_scheduler(self) -> Callable:
        return self.client.get

    def center_pid(self) -> int:
        if not self.separate:
            raise NotSupported("a dask LocalCluster runs its scheduler in the client process")
        return self._procs[0].pid

    def worker_pids(self) -> list[int]:
        if self.separate:
            return [p.pid for p in self._procs[1:]]
        return [w.process.pid for w in self.cluster.workers.values()]

    def pending(self) -> int:
        return self.client.run_on_scheduler(_dask_waiting)


def _dask_ntasks(dask_scheduler: Any) -> int:
    return len(dask_scheduler.tasks)


def make(name: str, **options: Any) -> System:
    """A new, unstarted adapter for ``name``."""
    classes = {"minidist": Minidist, "processpool": ProcessPool,
               "mpool": MultiprocessingPool, "dask": Dask}
    if name not in classes:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
    return classes[name](**options)
