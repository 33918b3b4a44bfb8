"""``Pool``, a ``multiprocessing.Pool`` whose results stay on the cluster, and ``RemoteData``.

::

  pool = Pool("127.0.0.1:8787")
  A = pool.map(lambda x: x**2, range(10))   # list of RemoteData: values stay on workers
  B = pool.map(lambda x: -x, A)             # each runs where its input lives
  pool.apply(sum, [B]).get()                # -285
  pool.gather(A)                            # [0, 1, 4, ..., 81]

A Pool is a thin layer over an ``Executor`` session: ``map``, ``starmap``
and ``apply`` submit through it, wait until the work is done (raising the
first task error, as ``multiprocessing`` does) and hand back ``RemoteData``
handles instead of values.  A ``RemoteData`` given as an argument (also
inside lists, tuples and dicts) becomes a dependency, so the center runs
the task where the data already is and the worker reads it locally.

A ``RemoteData`` holds a Future, so the value it names lives while some
handle to it does.  Pickled, it carries only its key and the center's
address: unpickled in another process, it registers its own interest in
the key through that process's shared session to the center (which
authenticates with ``MINIDIST_AUTH_KEY``, or the key of a LocalCluster the
process started).  The original handle must still be alive at that
moment, or the key may already be gone.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import threading
import weakref
from concurrent.futures import CancelledError
from typing import Any
from collections.abc import Callable, Iterable

from .executor import Executor, Future, shared_session
from .task import HasKey, collect, key_name

logger = logging.getLogger("minidist.pool")


class RemoteData(HasKey):
    """A value that lives on a worker: ``.key``, ``.get()``; pass it to ``map``, ``apply``
    or ``submit``."""

    __dask_future__ = True  # dask treats it as a reference to its key

    def __init__(self, future: Future) -> None:
        self._future = future
        self.key = future.key
        self.center = future._session.address

    @property
    def status(self) -> str:
        """``pending``, ``finished``, ``error``, ``cancelled`` or ``lost`` (as for Futures)."""
        return self._future.status

    def get(self, timeout: float | None = None) -> Any:
        """Fetch the value from the worker that holds it (waiting for it if needed)."""
        return self._future.result(timeout)

    def ready(self) -> bool:
        """Whether the value exists (or its task failed)."""
        return self._future.done()

    def __reduce__(self) -> Any:
        return _unpickle_remote_data, (self.key, self.center)

    def __copy__(self) -> RemoteData:
        return RemoteData(self._future)

    def __deepcopy__(self, memo: dict) -> RemoteData:
        return RemoteData(self._future)

    def __dask_tokenize__(self) -> Any:
        return ("minidist.RemoteData", self.key)

    def __repr__(self) -> str:
        return f"<RemoteData: key={key_name(self.key)}, center={self.center}, status={self.status}>"

    __str__ = __repr__


def _unpickle_remote_data(key: Any, center: str) -> RemoteData:
    session = shared_session(center)
    return RemoteData(session._send_tasks([], [key])[0])


def _raise_first_error(futures: list[Future]) -> None:
    """After a wait: raise the first failed future's error, in order."""
    for future in futures:
        status = future.status
        if status == "cancelled":
            raise CancelledError(f"task {key_name(future.key)!r} was cancelled")
        if status in ("error", "lost"):
            error = future.exception()
            assert error is not None  # set with the status
            raise error


class AsyncResult:
    """The result of ``apply_async``/``map_async``, like ``multiprocessing.pool.AsyncResult``.

    ``get()`` returns RemoteData (a list of them for ``map_async``) once the
    work is done, or raises the task's exception.
    """

    def __init__(self, futures: list[Future], single: bool,
                 callback: Callable[[Any], Any] | None = None,
                 error_callback: Callable[[BaseException], Any] | None = None) -> None:
        self._futures = futures
        self._single = single
        self._data = [RemoteData(f) for f in futures]
        if callback is not None or error_callback is not None:
            self._remaining = len(futures)
            self._lock = threading.Lock()
            self._callbacks = (callback, error_callback)
            for future in futures:
                future.add_done_callback(self._one_done)

    def _one_done(self, _: Any) -> None:
        with self._lock:
            self._remaining -= 1
            if self._remaining:
                return
        callback, error_callback = self._callbacks
        try:
            value = self.get(0)
        except BaseException as e:
            if error_callback is not None:
                error_callback(e)
            return
        if callback is not None:
            callback(value)

    def get(self, timeout: float | None = None) -> Any:
        """The RemoteData (or list of them) once done; raises the task's error."""
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError(f"not ready after {timeout}s")
        _raise_first_error(self._futures)
        return self._data[0] if self._single else list(self._data)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the work is done (or ``timeout`` seconds)."""
        concurrent.futures.wait(self._futures, timeout)

    def ready(self) -> bool:
        """Whether the work is done, one way or the other."""
        return all(f.done() for f in self._futures)

    def successful(self) -> bool:
        """Whether the work finished without error; ``ValueError`` if it is not done."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return all(f.status == "finished" for f in self._futures)

    def __repr__(self) -> str:
        state = "ready" if self.ready() else "pending"
        return f"<AsyncResult: {len(self._futures)} task(s), {state}>"


class Pool:
    """A ``multiprocessing.Pool`` over a minidist cluster whose results stay remote.

    ``Pool("host:port")`` (or a LocalCluster) uses a running cluster;
    ``Pool()`` starts a LocalCluster and owns it (``Pool(4)`` sizes it).
    Connection options (``timeout``, ``auth_key``, ``tls_*``) are those of
    ``Executor``.  ``map``, ``starmap`` and ``apply`` wait for the work and
    return ``RemoteData``; ``gather`` brings values home.  ``with Pool() as
    p:`` terminates the pool (and an owned cluster) on exit.
    """

    def __init__(self, address: Any = None, **options: Any) -> None:
        self._client = Executor(address, **options)
        self._running = True
        self._submitted: weakref.WeakSet[Future] = weakref.WeakSet()

    @property
    def address(self) -> str:
        """The center's address."""
        return self._client.address

    def _check_running(self) -> None:
        if not self._running:
            raise ValueError("Pool not running")

    def _submit(self, func: Callable, calls: list[tuple[tuple, dict]]) -> list[Future]:
        self._check_running()
        if not callable(func):
            raise TypeError(f"{func!r} is not callable")
        futures = self._client._submit_many(func, calls, None, True, None)
        self._submitted.update(futures)
        return futures

    @staticmethod
    def _finish(futures: list[Future]) -> list[RemoteData]:
        concurrent.futures.wait(futures)
        _raise_first_error(futures)
        return [RemoteData(f) for f in futures]

    # ------------------------------------------------------------------ multiprocessing API

    def map(self, func: Callable, iterable: Iterable, chunksize: int | None = None
            ) -> list[RemoteData]:
        """``func`` over the items; waits, returns a list of RemoteData.

        Items that are RemoteData are read where they live.  ``chunksize``
        is accepted for compatibility; every item is its own task.
        """
        return self._finish(self._submit(func, [((x,), {}) for x in iterable]))

    def starmap(self, func: Callable, iterable: Iterable[Iterable],
                chunksize: int | None = None) -> list[RemoteData]:
        """``func(*args)`` for each ``args`` in ``iterable``; waits, returns RemoteData."""
        return self._finish(self._submit(func, [(tuple(args), {}) for args in iterable]))

    def apply(self, func: Callable, args: Iterable = (), kwds: dict | None = None
              ) -> RemoteData:
        """``func(*args, **kwds)`` on the cluster; waits, returns its RemoteData."""
        return self._finish(self._submit(func, [(tuple(args), dict(kwds or {}))]))[0]

    def apply_async(self, func: Callable, args: Iterable = (), kwds: dict | None = None,
                    callback: Callable[[Any], Any] | None = None,
                    error_callback: Callable[[BaseException], Any] | None = None
                    ) -> AsyncResult:
        """Like ``apply`` without waiting: ``.get()`` on the result gives the RemoteData."""
        futures = self._submit(func, [(tuple(args), dict(kwds or {}))])
        return AsyncResult(futures, True, callback, error_callback)

    def map_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                  callback: Callable[[Any], Any] | None = None,
                  error_callback: Callable[[BaseException], Any] | None = None
                  ) -> AsyncResult:
        """Like ``map`` without waiting: ``.get()`` gives the list of RemoteData."""
        futures = self._submit(func, [((x,), {}) for x in iterable])
        return AsyncResult(futures, False, callback, error_callback)

    def starmap_async(self, func: Callable, iterable: Iterable[Iterable],
                      chunksize: int | None = None,
                      callback: Callable[[Any], Any] | None = None,
                      error_callback: Callable[[BaseException], Any] | None = None
                      ) -> AsyncResult:
        """Like ``starmap`` without waiting: ``.get()`` gives the list of RemoteData."""
        futures = self._submit(func, [(tuple(args), {}) for args in iterable])
        return AsyncResult(futures, False, callback, error_callback)

    # ------------------------------------------------------------------ data

    def scatter(self, data: Any) -> Any:
        """Put local data on the workers: RemoteData in the shape given (list, dict or one)."""
        self._check_running()
        futures = self._client.scatter(data)
        if isinstance(futures, dict):
            return {k: RemoteData(f) for k, f in futures.items()}
        if isinstance(futures, list):
            return [RemoteData(f) for f in futures]
        return RemoteData(futures)

    def gather(self, data: Any) -> Any:
        """Values of RemoteData, keeping the structure (lists, tuples, sets, dicts, nesting)."""
        found: dict[Any, RemoteData] = {}
        _collect(data, found)
        by_session: dict[Executor, list[Future]] = {}
        for handle in found.values():
            by_session.setdefault(handle._future._session, []).append(handle._future)
        values: dict = {}
        for session, futures in by_session.items():
            values.update(zip((f.key for f in futures), session.gather(futures), strict=True))
        return _replace(data, values)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Accept no more work; what was submitted goes on."""
        self._running = False

    def join(self) -> None:
        """Wait until all submitted work is done (after ``close`` or ``terminate``)."""
        if self._running:
            raise ValueError("Pool is still running")
        concurrent.futures.wait(list(self._submitted))

    def terminate(self) -> None:
        """Stop at once: cancel pending work, end the session (and an owned cluster).

        RemoteData of this pool cannot be read afterwards.
        """
        self._running = False
        self._client._terminate()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()

    def __repr__(self) -> str:
        state = "running" if self._running else "closed"
        return f"<Pool: center={self.address} {state}>"


def _collect(obj: Any, found: dict) -> None:
    collect(obj, found, RemoteData)


def _replace(obj: Any, values: dict) -> Any:
    if isinstance(obj, RemoteData):
        return values[obj.key]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return type(obj)(_replace(x, values) for x in obj)
    if isinstance(obj, dict):
        return {k: _replace(v, values) for k, v in obj.items()}
    return obj
