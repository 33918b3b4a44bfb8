"""joblib's ``"minidist"`` backend: ``Parallel`` (and scikit-learn's ``n_jobs``) on the cluster.

``import minidist`` registers the backend with joblib once joblib is
imported (``import_hooks``), so neither import pays for the other::

    with joblib.parallel_config(backend="minidist"):
        Parallel(n_jobs=-1)(delayed(f)(x) for x in xs)   # on the newest open Client/Executor

The life of one joblib batch::

  Parallel --submit(batch)--> large arguments swapped for scattered Futures (once each)
           --> session.submit(_run_batch, batch, futures, pure=False) --> a task on a worker
  worker:  the Futures arrive as their values; the batch runs (a nested Parallel in it
           uses joblib's threads inside that worker, never the cluster: no deadlock)
  done:    the Future's callback is handed to this backend's own thread, which fetches
           the result and gives it to joblib (the session's event thread never blocks)

``n_jobs=-1`` is every thread of the cluster.  Arguments of at least
``SCATTER_BYTES`` (or those named with ``parallel_config(backend="minidist",
scatter=[...])``) go to the cluster once and are shared by every batch
that uses them.
"""

from __future__ import annotations

import concurrent.futures
import copy
import threading
from typing import Any
from collections.abc import Callable

from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase

from .executor import Executor, Future, default_session

SCATTER_BYTES = 1 << 20
"""An argument at least this large is scattered once instead of pickled into each batch."""


class _Slot:
    """Stands in a batch for the scattered argument number ``index``."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> Any:
        return _Slot, (self.index,)


def _fill(value: Any, values: list) -> Any:
    return values[value.index] if type(value) is _Slot else value


def _run_batch(batch: Any, values: list) -> Any:
    """On a worker: put the scattered values back into the batch's calls, then run it."""
    if values:
        batch.items = [(func, tuple(_fill(a, values) for a in args),
                        {k: _fill(v, values) for k, v in kwargs.items()})
                       for func, args, kwargs in batch.items]
    return batch()


class MinidistBackend(AutoBatchingMixin, ParallelBackendBase):
    """A joblib backend that runs ``Parallel``'s batches as tasks on a minidist cluster.

    ``client`` is the Client or Executor to use (default: the newest open
    one of this process); ``scatter`` lists objects to send to the cluster
    once, before the first batch.
    """

    supports_retrieve_callback = True
    supports_timeout = True
    default_n_jobs = -1

    def __init__(self, client: Executor | None = None, scatter: list | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client = client
        self._to_scatter = list(scatter or ())
        self._scattered: dict[int, tuple[Any, Future]] = {}
        self._futures: set[Future] = set()
        self._callbacks: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _session(self) -> Executor:
        if self.client is not None and not self.client._shutdown:
            return self.client
        return default_session()

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """``-1`` is every thread of the cluster, ``-2`` all but one, and so on."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs < 0:
            total = sum(self._session().nthreads().values())
            return max(total + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, **kwargs: Any) -> int:
        """Bind to the session, scatter the named objects, return the number of workers."""
        session = self._session()
        self.client = session
        self.parallel = parallel
        if self._to_scatter:
            self._scatter(self._to_scatter)
        if self._callbacks is None:
            self._callbacks = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="minidist-joblib")
        return self.effective_n_jobs(n_jobs)

    def _scatter(self, objects: list) -> None:
        new = [obj for obj in objects if id(obj) not in self._scattered]
        if new:
            assert self.client is not None  # configured
            futures = self.client.scatter(new)
            for obj, future in zip(new, futures, strict=True):
                self._scattered[id(obj)] = (obj, future)  # obj kept: its id stays its own

    def _swap(self, value: Any, slots: dict[int, int], futures: list) -> Any:
        """A scattered (or large, then scattered now) argument becomes a ``_Slot``."""
        key = id(value)
        if key not in self._scattered:
            nbytes = getattr(value, "nbytes", None)
            if nbytes is None and isinstance(value, (bytes, bytearray)):
                nbytes = len(value)
            if not isinstance(nbytes, int) or nbytes < SCATTER_BYTES:
                return value
            self._scatter([value])
        if key not in slots:
            slots[key] = len(futures)
            futures.append(self._scattered[key][1])
        return _Slot(slots[key])

    def submit(self, func: Any, callback: Callable | None = None) -> Future:
        """Send one joblib batch as a task; ``callback`` runs on this backend's thread."""
        slots: dict[int, int] = {}
        futures: list[Future] = []
        items = getattr(func, "items", None)
        if items is not None:
            swapped = [(f, tuple(self._swap(a, slots, futures) for a in args),
                        {k: self._swap(v, slots, futures) for k, v in kwargs.items()})
                       for f, args, kwargs in items]
            if futures:
                func = copy.copy(func)
                func.items = swapped
        assert self.client is not None  # configured
        future = self.client.submit(_run_batch, func, futures, pure=False)
        with self._lock:
            self._futures.add(future)
        if callback is not None:
            pool = self._callbacks
            assert pool is not None  # configured
            future.add_done_callback(lambda f: pool.submit(self._done, f, callback))
        return future

    def _done(self, future: Future, callback: Callable) -> None:
        with self._lock:
            self._futures.discard(future)
        callback(future)

    def retrieve_result_callback(self, future: Future) -> Any:
        """The batch's list of results (fetched on this backend's thread), or its error."""
        return future.result()

    def retrieve_result(self, out: Future, timeout: float | None = None) -> Any:
        """The batch's results, waiting at most ``timeout`` seconds."""
        return out.result(timeout)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel every batch not finished yet (a batch raised)."""
        with self._lock:
            pending, self._futures = list(self._futures), set()
        for future in pending:
            future.cancel()

    def terminate(self) -> None:
        """End of a ``Parallel`` call: forget its scattered data and stop the callback thread."""
        self._scattered.clear()
        if self._callbacks is not None:
            self._callbacks.shutdown(wait=False)
            self._callbacks = None
        self.reset_batch_stats()


