"""What users hold: ``Future``, ``Executor`` (PEP 3148) and ``Client`` (dask-style).

The following diagram shows the data flow from a user's call to a result::

  user thread                  this process                                  cluster
  submit(f, x) --pack--> _KeyInfo table --update_graph--> BatchedSender -----> center
                          (refcounts,                                          |
                           futures)  <--memory / erred / lost-- stream reader <-+
  result()  <--------------------------- get_data (direct) <------------------ worker

``submit()`` called:

- packs ``f`` and its arguments into a RunSpec (the pickled function is
  cached, so a ``map`` pickles it once) and names it ``<funcname>-<token>``,
  where the token hashes the function and the pickled arguments, so the
  same pure call has the same key on any machine with the same code;
- finds or creates the ``_KeyInfo`` of that key (a key this session already
  wants is not sent again: the center deduplicates the rest), creates a
  ``Future`` (a real ``concurrent.futures.Future``) and counts the reference;
- queues ``update_graph`` on the ``BatchedSender``, which sends everything
  queued since its last write as one frame.

The stream reader thread turns the center's events into future states: a
``memory`` event finishes every Future of the key without fetching
anything; ``result()`` fetches the value from a worker that holds it (and,
if that worker is gone, asks the center where the key is now).  When the
last Future of a key is garbage-collected, its key is released at the
center, which deletes the data once no task needs it.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import hashlib
import itertools
import logging
import os
import random
import threading
import time
import uuid
import weakref
from concurrent.futures import CancelledError
from concurrent.futures._base import FINISHED, PENDING, RUNNING
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Iterable, Iterator

from . import wire
from .default_scheduler import register_default_scheduler, unregister_default_scheduler
from .task import (HasKey, InitializerError, InitSpec, KeyConflictError, LostKeyError, RunSpec,
                   collect, emit_warnings, fill_source_lines, pack, unpack_exception)
from .wire import BatchedSender, ConnectionPool, Security

if TYPE_CHECKING:
    from .diagnostics import TaskStream

logger = logging.getLogger("minidist.executor")

_UNFETCHED = object()
SEND_CHUNK = 10_000
PIPE_CHUNK = int(__import__("os").environ.get("PIPE_CHUNK", 500))
"""A map of more calls than this is sent as several ``update_graph`` messages."""


class _Unloadable:
    """A fetched value whose bytes failed to unpickle here: its Future's ``result()`` raises."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _load(key: Any, blob: wire.Serialized) -> Any:
    """Unpickle one fetched value; a failure stays with that key (``_Unloadable``)."""
    try:
        return wire.deserialize(blob)
    except BaseException as e:  # noqa: B036 - even SystemExit belongs to that one result
        if isinstance(e, Exception):
            e.add_note(f"while unpickling the result of {key!r} in this process")
        return _Unloadable(e)
_sessions: weakref.WeakSet[Executor] = weakref.WeakSet()
_opened: list[weakref.ref[Executor]] = []
"""Every session of this process in the order they opened (dead ones pruned as met)."""
local_cluster_security: dict[str, Security] = {}
"""Security of the LocalClusters this process started, by address (their keys are random)."""


class _KeyInfo:
    """What this session knows of one key, shared by all its Futures."""

    __slots__ = ("key", "status", "who_has", "value", "exception", "tb", "refs", "futures",
                 "generation", "cancelled", "token", "warnings")

    def __init__(self, key: Any) -> None:
        self.key = key
        self.status = "pending"
        self.who_has: list[str] | tuple = ()
        self.value: wire.Serialized | None = None  # a small result that came with its event
        self.exception: BaseException | None = None
        self.tb: str | None = None
        self.refs = 0
        # The weakref of its one Future (the common case: no list), or a list of them.
        self.futures: weakref.ref | list[weakref.ref] | None = None
        self.generation = 0  # bumps on every event, so fetchers can wait for news
        self.token: str | None = None  # of the task, for a key named with ``key=``
        self.cancelled = False  # some Future of it was cancelled: do not finish it unwatched
        self.warnings: list | None = None  # what its run warned, until the caller takes it

    def add_future(self, future: Future) -> None:
        ref = weakref.ref(future)
        refs = self.futures
        if refs is None:
            self.futures = ref
        elif isinstance(refs, list):
            refs.append(ref)
        else:
            self.futures = [refs, ref]

    def live_futures(self) -> list[Future]:
        refs = self.futures
        if refs is None:
            return []
        if not isinstance(refs, list):
            future = refs()
            if future is None:
                self.futures = None
                return []
            return [future]
        alive = [f for f in (r() for r in refs) if f is not None]
        if len(alive) < len(refs):
            self.futures = [weakref.ref(f) for f in alive]
        return alive


def _finish_all(futures: list[Future], condition: threading.Condition) -> None:
    """``set_result(_UNFETCHED)`` on each pending Future, under their shared condition once.

    What ``concurrent.futures.Future.set_result`` does (state, waiters,
    one ``notify_all``, then callbacks outside the lock), for many Futures
    that share the session's condition.
    """
    done = []
    with condition:
        for future in futures:
            if future._state in (PENDING, RUNNING):
                future._result = _UNFETCHED
                future._state = FINISHED
                for waiter in future._waiters:
                    waiter.add_result(future)
                done.append(future)
        condition.notify_all()
    for future in done:
        future._invoke_callbacks()


class _EmptyList:
    """What an unset ``_LazyList`` attribute reads as: empty, and a list once appended to."""

    __slots__ = ("obj", "name")

    def __init__(self, obj: Any, name: str) -> None:
        self.obj, self.name = obj, name

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def append(self, item: Any) -> None:
        setattr(self.obj, self.name, [item])  # the instance's own list hides this from now on

    def remove(self, item: Any) -> None:
        raise ValueError(f"{item!r} is not in the list")


class _LazyList:
    """A list attribute made on the first append (most Futures never get a waiter or callback).

    concurrent.futures.Future keeps two lists per instance, ``_waiters``
    (``wait``, ``as_completed``) and ``_done_callbacks``, which it only
    iterates, appends to and removes from; until something is appended, a
    read gives an empty stand-in, saving two lists (about 140 bytes, and two
    objects for the garbage collector to visit) per Future.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else _EmptyList(obj, self.name)


class Future(HasKey, concurrent.futures.Future):
    """A remote result: a ``concurrent.futures.Future`` that names a key on the cluster.

    ``done()`` becomes true when the value exists on a worker; ``result()``
    fetches it from there (once, then caches it).  A small result already
    came with the event that finished the future and is not fetched again.
    ``status`` is one of ``pending``, ``finished``, ``error``, ``cancelled``
    or ``lost``.
    """

    __dask_future__ = True  # dask (delayed, persisted graphs) treats it as its key's value
    _waiters = _LazyList()
    _done_callbacks = _LazyList()
    _released = False  # set on the instance when its reference is dropped

    def __init__(self, key: Any, session: Executor, info: _KeyInfo) -> None:
        # concurrent.futures.Future.__init__, but with the session's Condition instead of
        # one of its own (a Condition, its RLock and its deque weigh about 1 KB): a wait
        # on it may wake for another Future, so result() and exception() wait in a loop.
        # The two lists it would make are _LazyList attributes.
        self._condition = session._future_condition
        self._state = PENDING
        self._result = None
        self._exception = None
        self.key = key
        self._session = session
        self._info = info

    @property
    def status(self) -> str:
        """``pending``, ``finished``, ``error``, ``cancelled`` or ``lost``."""
        if self._state == concurrent.futures._base.CANCELLED_AND_NOTIFIED or \
                self._state == concurrent.futures._base.CANCELLED:
            return "cancelled"
        return self._info.status

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the key, fetch its value from a worker, return it (or raise its error).

        Warnings the task raised are warned here, the first time its result is taken.
        """
        end = None if timeout is None else time.monotonic() + timeout
        self._wait_done(end)
        info = self._info
        if info.warnings and self._state == FINISHED:
            _emit_warnings(info)
        value = super().result(0)
        if info.status == "error":
            assert info.exception is not None  # set with the status
            raise info.exception
        if info.status == "lost":
            raise info.exception or LostKeyError(f"key {self.key!r} was lost")
        if info.status == "cancelled":
            raise CancelledError()
        if value is _UNFETCHED:
            try:
                left = None if end is None else max(0.0, end - time.monotonic())
                value = self._session._fetch_within([self.key], left)[self.key]
            except CancelledError:
                value = self._result  # a shutdown may have fetched it meanwhile
                if value is _UNFETCHED:
                    raise
            self._result = value
        if type(value) is _Unloadable:
            raise value.error
        return value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The task's exception (with the remote traceback as ``__cause__``), or None."""
        self._wait_done(None if timeout is None else time.monotonic() + timeout)
        exc = super().exception(0)
        if exc is None and self._info.status in ("error", "lost"):
            return self._info.exception
        return exc

    def _wait_done(self, end: float | None) -> None:
        """Wait until done or ``end`` (the Condition is shared: it also wakes for others)."""
        with self._condition:
            while self._state in (PENDING, RUNNING):
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return
                self._condition.wait(left)

    def traceback(self) -> str | None:
        """The traceback text from the worker where the task failed, if it failed."""
        return self._info.tb

    def cancel(self) -> bool:
        """Cancel if not finished: the center stops the task unless someone else wants it."""
        if not super().cancel():
            return False
        with self._condition:  # only the first cancel notifies waiters (wait, as_completed)
            if self._state == concurrent.futures._base.CANCELLED:
                self.set_running_or_notify_cancel()
        self._info.cancelled = True
        self._session._drop_ref(self)
        return True

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        """Call ``fn(future)`` once done, even if nothing else keeps this Future (PEP 3148).

        While the Future is pending and has a callback, its session holds it
        (``Executor._held``), so dropping it collects nothing and the callback
        runs when the key finishes; once done, the session lets it go.
        """
        held = self._session._held
        held.add(self)
        super().add_done_callback(fn)  # type: ignore[arg-type]  # it is called with this Future
        if self._state not in (PENDING, RUNNING):
            held.discard(self)

    def __await__(self) -> Any:
        """``await future``: its result on the running loop, as ``asyncio.wrap_future`` gives.

        The loop is not blocked: it waits for the key, then fetches the value
        (when it is not here yet) on the loop's default executor.  Cancelling
        the awaiting task cancels this Future.
        """
        return self._result_async().__await__()

    async def _result_async(self) -> Any:
        import asyncio
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        def wake(_: concurrent.futures.Future) -> None:
            try:
                loop.call_soon_threadsafe(finish)
            except RuntimeError:
                pass  # the loop closed meanwhile: nobody awaits any more

        self.add_done_callback(wake)
        try:
            await done
        except asyncio.CancelledError:
            self.cancel()
            raise
        if self.cancelled():
            raise asyncio.CancelledError()  # as an asyncio.wrap_future of it would
        if self._state == FINISHED and self._result is _UNFETCHED and \
                self._info.status == "finished":
            return await loop.run_in_executor(None, self.result)
        return self.result()

    def _invoke_callbacks(self) -> None:
        # Every way a Future ends (set_result, set_exception, cancel, _finish_all) calls this.
        super()._invoke_callbacks()  # type: ignore[misc]  # private in the stubs
        self._session._held.discard(self)

    def _finish(self) -> None:
        try:
            if self._state in (PENDING, RUNNING):
                self.set_result(_UNFETCHED)
        except concurrent.futures.InvalidStateError:
            pass

    def _fail(self, exc: BaseException) -> None:
        try:
            if self._state in (PENDING, RUNNING):
                self.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass

    def __del__(self) -> None:
        if not self._released:
            try:
                self._session._deferred.append((self._info, True))
            except Exception:
                pass

    def __dask_tokenize__(self) -> Any:
        return ("minidist.Future", self.key)

    def __reduce__(self) -> Any:
        raise TypeError("a Future cannot be pickled; pass it as an argument to submit/map "
                        "(also inside lists, tuples and dicts) and it becomes its value")

    def __repr__(self) -> str:
        return f"<Future: status: {self.status}, key: {self.key}>"

    def _repr_html_(self) -> str:
        """A notebook's view: key, status and, once fetched here, the result's type."""
        from .reprs import html_table
        rows = [("key", self.key), ("status", self.status)]
        if self._state == FINISHED and self._result is not _UNFETCHED and self._result is not None:
            rows.append(("type", type(self._result).__qualname__))
        elif self._info.status == "error" and self._info.exception is not None:
            rows.append(("exception", repr(self._info.exception)))
        return html_table("Future", rows)

    __str__ = __repr__


def funcname(func: Callable) -> str:
    """A readable name for keys: ``inc``, ``lambda``, the wrapped name of a partial."""
    while hasattr(func, "func"):  # functools.partial and friends
        func = func.func
    name = getattr(func, "__name__", None) or type(func).__name__
    return "lambda" if name == "<lambda>" else name


def _token(spec: RunSpec) -> str:
    h = hashlib.blake2b(spec.func.header, digest_size=16)
    h.update(spec.args.header)
    for buf in spec.args.buffers:
        h.update(buf)
    if spec.init is not None:
        h.update(spec.init.token.encode())
    return h.hexdigest()


_UUID_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def _uuid4s(block: int = 256) -> Iterator[str]:
    """Random UUIDs as ``str(uuid.uuid4())`` gives them, made from one ``urandom`` per block.

    ``uuid.uuid4()`` costs a system call and a UUID object per key, a fair
    part of submitting an impure task; these are the same 122 random bits in
    the same text.
    """
    variant = _UUID_VARIANT
    while True:
        text = os.urandom(16 * block).hex()
        for i in range(0, 32 * block, 32):
            h = text[i:i + 32]
            yield f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant[h[16]]}{h[17:20]}-{h[20:]}"


def _call_repr(args: tuple, kwargs: dict, limit: int = 200) -> str:
    """``(1, x=2)``, shortened: names the call whose arguments would not pickle."""
    parts = [_short_repr(a) for a in args] + [f"{k}={_short_repr(v)}" for k, v in kwargs.items()]
    text = f"({', '.join(parts)})"
    return text if len(text) <= limit else text[:limit - 4] + "...)"


def _short_repr(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__qualname__} object>"
    return text if len(text) <= 60 else text[:57] + "..."


def _run_chunk(func: Callable, chunk: list) -> list:
    return [func(*args) for args in chunk]


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` whose tasks run on a minidist cluster.

    ``Executor("host:port")`` connects to a center; ``Executor()`` starts a
    LocalCluster and owns it (``Executor(4)`` or ``max_workers=4`` sizes it,
    as with ProcessPoolExecutor; ``memory_limit=`` is each of its workers'
    limit, default ``"auto"``).  ``map`` follows PEP 3148 and returns an
    iterator of results; see ``Client`` for a map that returns futures.

    As with ProcessPoolExecutor, ``initializer(*initargs)`` runs on each
    worker before the first task of this executor there (also on workers
    that join later); if it raises, the executor is broken: its futures
    fail with ``InitializerError`` (a ``BrokenExecutor``) and ``submit``
    raises it.  Work submitted is done even if its Future is dropped, and
    work still pending when the interpreter exits is waited for.

    ``pure`` is the default of ``submit``'s and ``map``'s ``pure=``: with
    ``pure=False`` every call runs (``submit(random.random)`` twice gives two
    numbers), as with ``ProcessPoolExecutor``; with the default, identical
    calls share one key and one result.
    """

    _finish_dropped = True
    """Run a task whose Futures were all garbage-collected (PEP 3148); a Client cancels it."""

    def __init__(self, address: Any = None, *, max_workers: int | None = None,
                 n_workers: int | None = None, threads_per_worker: int = 1,
                 timeout: float = 10.0, auth_key: bytes | str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, initializer: Callable[..., Any] | None = None,
                 initargs: tuple = (),
                 memory_limit: int | float | str | None = "auto", pure: bool = True) -> None:
        self._cluster = None
        self.pure = bool(pure)
        if isinstance(address, int) and not isinstance(address, bool):
            address, max_workers = None, address
        for name, value in (("max_workers", max_workers), ("n_workers", n_workers)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        # Pickled once here: an unpicklable initializer fails now, in the caller.
        self._init = InitSpec.pack(initializer, initargs) if initializer is not None else None
        self._broken_pool: InitializerError | None = None
        self._finisher: threading.Thread | None = None  # a shutdown(wait=False) finishing
        if address is not None and hasattr(address, "address") and hasattr(address, "security"):
            cluster_security = address.security  # a LocalCluster object
            address = address.address
        else:
            cluster_security = None
        if address is None:
            from .cluster import LocalCluster
            self._cluster = LocalCluster(n_workers=n_workers or max_workers or 2,
                                         threads_per_worker=threads_per_worker,
                                         memory_limit=memory_limit,
                                         tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
            address, cluster_security = self._cluster.address, self._cluster.security
        self.address = wire.format_address(*wire.parse_address(address))
        if auth_key is None and not (tls_ca or tls_cert):
            cluster_security = cluster_security or local_cluster_security.get(self.address)
        self.security = cluster_security if auth_key is None and cluster_security else \
            Security(auth_key, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca)
        self.id = uuid.uuid4().hex
        self._lock = threading.RLock()
        self._keys: dict[Any, _KeyInfo] = {}
        self._deferred: collections.deque[tuple[_KeyInfo, bool]] = collections.deque()
        self._news = threading.Condition(self._lock)
        self._future_condition = threading.Condition()  # shared by this session's Futures
        # Pending Futures with a done-callback, held so that dropping them loses no callback.
        self._held: set[Future] = set()
        self._shutdown = False
        self._broken: BaseException | None = None
        self._closed = False
        self._pool = ConnectionPool(self.security, timeout=timeout)
        self._gather_pool: concurrent.futures.ThreadPoolExecutor | None = None
        try:
            self._conn = wire.connect(self.address, timeout=timeout, security=self.security)
            self._conn.send({"op": "register_client", "client_id": self.id})
            reply = self._conn.recv()
            if not reply or reply[0].get("op") != "registered":
                raise ConnectionError(f"unexpected reply from center: {reply!r:.200}")
        except BaseException:
            if self._cluster is not None:
                self._cluster.close()
            raise
        self._sender = BatchedSender(self._conn, name="client->center")
        self._sender_idle = threading.Event()
        self._reader = threading.Thread(target=self._read_events, name="client-events",
                                         daemon=True)
        self._reader.start()
        self._releaser = threading.Thread(target=self._release_loop, name="client-release",
                                          daemon=True)
        self._releaser.start()
        if self._cluster is not None:
            self._cluster.on_workers_lost.append(self._workers_lost)
        _sessions.add(self)
        _opened.append(weakref.ref(self))

    # ------------------------------------------------------------------ submitting

    def submit(  # type: ignore[override]  # dask's options: key, pure, workers, retries
            self, fn: Callable, /, *args: Any, key: Any = None, pure: bool | None = None,
            workers: Any = None, retries: int = 0, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on the cluster; returns a Future at once.

        Futures among the arguments (also inside lists, tuples and dicts)
        become dependencies.  ``key=`` names the result, ``pure=False``
        makes a fresh key for every call (default: the session's ``pure``),
        ``workers=`` restricts where it may run (addresses, names or hosts),
        ``retries=`` reruns it on error.
        """
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        opts = {"workers": workers, "retries": retries} if workers or retries else None
        return self._submit_many(fn, [(args, kwargs)], [key],
                                 self.pure if pure is None else pure, opts)[0]

    def _submit_many(self, fn: Callable, calls: Iterable[tuple[tuple, dict]],
                     keys: Iterable[Any] | None, pure: bool, opts: dict | None) -> list[Future]:
        self._check_open()  # a broken executor says so before pickling anything
        name = funcname(fn)
        tasks = []
        named = {}  # explicitly named key -> token of its task
        fresh_ids = None if pure else _uuid4s()
        futures: list[Future] = []
        for (args, kwargs), key in zip(calls, keys or itertools.repeat(None), strict=False):
            try:
                spec, deps = pack(fn, args, kwargs)
            except wire.SerializationError as e:
                for future in futures:  # sent already: those not started yet never will
                    future.cancel()
                raise wire.SerializationError(
                    f"cannot submit {name}{_call_repr(args, kwargs)}: {e}") from e.__cause__
            spec.init = self._init  # part of the key: another initializer, another result
            if key is None:
                key = f"{name}-{_token(spec) if fresh_ids is None else next(fresh_ids)}"
            else:
                named[key] = _token(spec)
            tasks.append((key, spec, tuple(deps), opts))
            if len(tasks) >= SEND_CHUNK:
                futures += self._send_tasks(tasks, [t[0] for t in tasks], named)
                tasks = []
        if tasks:
            futures += self._send_tasks(tasks, [t[0] for t in tasks], named)
        return futures

    def _send_tasks(self, tasks: list[tuple], wants: list,
                    named: dict | None = None) -> list[Future]:
        """Send packed tasks ``(key, RunSpec, dep_keys, opts)``; one Future per key in ``wants``.

        This is what ``submit``, ``map``, Pool and the dask scheduler share:
        tasks may depend on each other and on keys already on the cluster;
        tasks whose keys this session already wants are not sent again.
        Only the keys in ``wants`` are held (and so kept) for the caller;
        the others live while a wanted task still needs them.

        ``named`` maps keys the caller chose (``key=``) to a token of their
        task.  Such a key names one computation: one this session already
        holds for another task gives a Future failed with
        ``KeyConflictError``, and the center refuses one it knows for another
        task (``check``).  Other keys are tokens of their task (pure calls,
        dask collections) or private to one call (``get``).
        """
        if self._init is not None:
            for task in tasks:
                if task[1].init is None:
                    task[1].init = self._init
        with self._lock:
            self._check_open()
            futures = []
            fresh = set()
            for key in wants:
                info = self._keys.get(key) if named else None
                if info is not None and named and key in named and info.token != named[key]:
                    futures.append(_conflicting_future(key, self))
                    continue
                future, is_new = self._new_future(key)
                futures.append(future)
                if is_new:
                    fresh.add(key)
                    if named and key in named:
                        future._info.token = named[key]
            new = [t for t in tasks if t[0] in fresh or t[0] not in self._keys]
            if new or fresh:
                msg: dict[str, Any] = {"op": "update_graph", "tasks": new, "wants": list(fresh)}
                if named:
                    msg["check"] = True
                self._sender.send(msg)
        return futures

    def _new_future(self, key: Any) -> tuple[Future, bool]:
        """A Future for ``key`` (caller holds the lock); True if the key is new here."""
        info = self._keys.get(key)
        fresh = info is None
        if info is None:
            info = self._keys[key] = _KeyInfo(key)
        future = Future(key, self, info)
        info.refs += 1
        info.add_future(future)
        if info.status == "finished":
            future._finish()
        elif info.status in ("error", "lost"):
            assert info.exception is not None  # set with the status
            future._fail(info.exception)
        return future, fresh

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """PEP 3148 map: submits every call now, yields results in order.

        ``timeout`` counts from this call; ``chunksize`` > 1 sends that many
        calls per task.  An exception is raised when its item is reached.
        Calls go out in batches as they are pickled; one that cannot be
        pickled raises here, and the calls sent before it are cancelled
        (those already running finish).
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else time.monotonic() + timeout
        calls = list(zip(*iterables, strict=False))
        if chunksize > 1:
            chunks = [calls[i:i + chunksize] for i in range(0, len(calls), chunksize)]
            futures = self._submit_many(_run_chunk, [((fn, c), {}) for c in chunks],
                                        None, self.pure, None)
        else:
            futures = self._submit_many(fn, [(c, {}) for c in calls], None, self.pure, None)
        return self._result_iterator(futures, end_time, chunksize > 1)

    def _result_iterator(self, futures: list[Future], end_time: float | None,
                         chunked: bool) -> Iterator[Any]:
        """Yield results in order, holding none once yielded (no local keeps a value)."""
        try:
            futures.reverse()
            while futures:
                remaining = None if end_time is None else end_time - time.monotonic()
                concurrent.futures.wait([futures[-1]], timeout=remaining)
                self._prefetch(futures)
                if chunked:
                    chunk = futures.pop().result(
                        None if end_time is None else max(0, end_time - time.monotonic()))
                    chunk.reverse()
                    while chunk:
                        yield chunk.pop()
                else:
                    yield futures.pop().result(
                        None if end_time is None else max(0, end_time - time.monotonic()))
        finally:
            for future in futures:
                future.cancel()

    def _prefetch(self, futures: list[Future], limit: int = 1024) -> None:
        """Fetch the values of the finished futures at the head of a reversed list at once."""
        batch = []
        for future in reversed(futures[-limit:]):
            if future._state != FINISHED or future._result is not _UNFETCHED or \
                    future._info.status != "finished":
                break
            batch.append(future)
        if len(batch) > 1:
            values = self._fetch([f.key for f in batch], None)
            for future in batch:
                future._result = values[future.key]

    _keep_results = True
    """Fetch the values of the futures still held before disconnecting (PEP 3148)."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally cancel or wait for what is pending; disconnect.

        As with ``ProcessPoolExecutor``, submitted work still completes
        (``wait=False`` returns at once and lets it finish in the background)
        and the futures still referenced keep their results: their values are
        fetched before the session disconnects.  Keys this session held are
        then released on the cluster.  An owned LocalCluster is shut down too.
        """
        self._flush_releases()  # Futures dropped by now: their work still runs (orphans)
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            pending = [f for info in self._keys.values() for f in info.live_futures()
                       if not f.done()]
        if cancel_futures:
            for future in pending:
                future.cancel()
            self._cancel_orphans()
        if wait:
            self._finish(pending)
        else:
            self._finisher = threading.Thread(target=self._finish, args=(pending,),
                                              name="client-shutdown", daemon=True)
            self._finisher.start()

    def _terminate(self) -> None:
        """Disconnect now: pending futures are cancelled, values not yet fetched are dropped."""
        with self._lock:
            self._shutdown = True
            pending = [f for info in self._keys.values() for f in info.live_futures()
                       if not f.done()]
        for future in pending:
            future.cancel()
        self._close()

    def _finish(self, pending: list[Future]) -> None:
        """Wait for ``pending``, keep the held results, then disconnect."""
        try:
            if self._broken is None:
                concurrent.futures.wait(pending)
                self._wait_for_orphans()
                if self._keep_results:
                    self._fetch_held()
        finally:
            self._close()

    def _orphans(self) -> list[_KeyInfo]:
        """Keys whose Futures were all dropped while their work was pending (caller locks)."""
        return [info for info in self._keys.values()
                if info.refs <= 0 and info.status == "pending"]

    def _wait_for_orphans(self) -> None:
        with self._news:
            while self._orphans() and self._broken is None and not self._closed:
                self._news.wait(1.0)

    def _cancel_orphans(self) -> None:
        with self._lock:
            keys = [info.key for info in self._orphans()]
            for key in keys:
                del self._keys[key]
            if keys and self._broken is None:
                self._sender.send({"op": "release", "keys": keys})

    def _fetch_held(self) -> None:
        with self._lock:
            futures = [f for info in self._keys.values() if info.status == "finished"
                       for f in info.live_futures()
                       if f._state == FINISHED and f._result is _UNFETCHED]
        if not futures:
            return
        try:
            values = self._fetch(list({f.key: None for f in futures}), None)
        except Exception as e:
            logger.warning("could not fetch held results before shutdown: %r", e)
            return
        for future in futures:
            future._result = values[future.key]

    def _close(self) -> None:
        with self._news:
            self._closed = True
            self._news.notify_all()
        self._sender.close(timeout=2)
        self._conn.close()
        self._reader.join(2)
        self._pool.close()
        if self._gather_pool is not None:
            self._gather_pool.shutdown(wait=False)
        if self._cluster is not None:
            self._cluster.close()
        _sessions.discard(self)

    def _check_open(self) -> None:
        if self._broken_pool is not None:
            raise InitializerError(*self._broken_pool.args)
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self._broken is not None:
            raise _fresh(self._broken)

    # ------------------------------------------------------------------ extras

    def gather(self, futures: Any, errors: str = "raise") -> Any:
        """Values of futures, keeping the structure (lists, tuples, sets, dicts, nesting).

        Non-future items pass through.  ``errors="skip"`` leaves out the
        failed ones from lists instead of raising.
        """
        found: dict = {}
        _collect_futures(futures, found)
        if not found:
            return futures
        concurrent.futures.wait(list(found.values()))
        for future in found.values():
            if future._info.warnings:
                _emit_warnings(future._info)
        failed = {k for k, f in found.items() if f.status in ("error", "lost", "cancelled")}
        if failed and errors == "raise":
            for key in _keys_in_order(futures):
                if key in failed:
                    found[key].result()  # raises the task's own exception
        values = self._fetch([k for k in found if k not in failed], None)
        for key in _keys_in_order(futures):
            if type(values.get(key)) is _Unloadable:
                if errors == "raise":
                    raise values[key].error
                failed.add(key)
        return _rebuild(futures, values, failed)

    def scatter(self, data: Any, workers: Any = None, broadcast: bool = False) -> Any:
        """Put local data on workers; returns futures in the shape given.

        A list (or other iterable) gives a list of futures, a dict gives a
        dict with the same keys (its keys become the data's keys), a single
        object gives one future.  Items go round-robin to the workers (or to
        ``workers=``), or to all of them with ``broadcast=True``.
        """
        if isinstance(data, dict):
            items = list(data.items())
            shape = "dict"
        elif isinstance(data, (list, tuple, set, frozenset, Iterator)) or \
                type(data).__name__ in ("range", "generator"):
            prefix = uuid.uuid1()
            items = [(f"{prefix}-{i}", x) for i, x in enumerate(data)]
            shape = "list"
        else:
            items = [(f"{type(data).__name__}-{uuid.uuid4().hex}", data)]
            shape = "one"
        self._check_open()
        targets = self._target_workers(workers)
        blobs = {key: wire.serialize(value) for key, value in items}
        plan: dict[str, dict] = collections.defaultdict(dict)
        start = random.randrange(len(targets))
        for i, (key, _) in enumerate(items):
            chosen = targets if broadcast else [targets[(start + i) % len(targets)]]
            for address in chosen:
                plan[address][key] = blobs[key]
        stored: dict = collections.defaultdict(lambda: ([], 0))
        replies = self._map_parallel(
            lambda address: (address, self._pool.call(address, "update_data",
                                                       data=plan[address])), list(plan))
        for address, sizes in replies:
            for key, nbytes in sizes.items():
                stored[key] = (stored[key][0] + [address], nbytes)
        with self._lock:
            self._check_open()
            futures = {key: self._new_future(key)[0] for key, _ in items}
            self._sender.send({"op": "scatter", "data": dict(stored)})
        concurrent.futures.wait(list(futures.values()), timeout=30)
        if shape == "dict":
            return futures
        if shape == "one":
            return next(iter(futures.values()))
        return list(futures.values())

    def _target_workers(self, workers: Any, purpose: str = "scatter to") -> list[str]:
        nthreads = self._center("nthreads")
        if workers is not None:
            wanted = {workers} if isinstance(workers, str) else set(workers)
            info = self._center("workers")
            nthreads = {a: n for a, n in nthreads.items()
                        if a in wanted or info[a]["name"] in wanted
                        or a.rpartition(":")[0] in wanted}
        if not nthreads:
            raise ValueError(f"no workers to {purpose}" +
                             (f" among {workers!r}" if workers is not None else ""))
        return sorted(nthreads)

    def cancel(self, futures: Any) -> None:
        """Cancel futures: pending ones stop, finished ones are released and marked cancelled."""
        found: dict = {}
        _collect_futures(futures, found)
        with self._lock:
            for key in found:
                info = self._keys.get(key)
                if info is None:
                    continue
                for future in info.live_futures():
                    if not future.cancel():
                        self._drop_ref(future)  # counts against the key's own info
                        future._info = _cancelled_info(key)

    def run(self, fn: Callable, /, *args: Any, workers: Any = None, **kwargs: Any) -> dict:
        """Call ``fn(*args, **kwargs)`` in every worker process now (not as a task).

        Returns ``{worker address: result}``.  ``workers=`` picks some
        (addresses, names or hosts).  If the call raises on a worker, that
        exception is raised here, with a note naming the worker.
        """
        self._check_open()
        call = wire.serialize((fn, args, kwargs))

        def one(address: str) -> tuple[str, dict]:
            return address, self._pool.call(address, "run", call=call)

        results = {}
        for address, reply in self._map_parallel(one, self._target_workers(workers, "run on")):
            if reply["status"] != "OK":
                exc = unpack_exception(reply["exception"], reply["traceback"])
                exc.add_note(f"raised by {funcname(fn)} on the worker {address}")
                raise exc
            results[address] = wire.deserialize(reply["result"])
        return results

    def upload_file(self, path: str | os.PathLike) -> None:
        """Make a ``.py``, ``.zip`` or ``.egg`` file importable on every worker.

        Workers that join or restart later get it too (the center keeps
        it).  A module of that name already imported on a worker is
        reloaded.  An error importing it on a worker is raised here, naming
        the worker.
        """
        from .uploads import check_name
        self._check_open()
        name = check_name(os.path.basename(os.fspath(path)))
        with open(path, "rb") as f:
            content = f.read()
        addresses = self._center("upload_file", name=name, content=content)

        def one(address: str) -> tuple[str, dict]:
            return address, self._pool.call(address, "upload_file", name=name, content=content)

        for address, reply in self._map_parallel(one, addresses):
            if reply["status"] != "OK":
                exc = unpack_exception(reply["exception"], reply["traceback"])
                exc.add_note(f"while installing {name} on the worker {address}")
                raise exc

    def who_has(self, futures: Any = None) -> dict:
        """key -> worker addresses holding it, for ``futures`` or for every key in memory."""
        keys = None
        if futures is not None:
            found: dict = {}
            _collect_futures(futures, found)
            keys = list(found)
        return self._center("who_has", keys=keys)

    def has_what(self) -> dict:
        """worker address -> keys it holds."""
        return self._center("has_what")

    def nthreads(self) -> dict:
        """worker address -> number of task threads."""
        return self._center("nthreads")

    ncores = nthreads

    def memory(self) -> dict:
        """worker address -> its memory, as it last reported it (every half second at most).

        ``managed``: bytes of results held in memory; ``spilled``: bytes of
        results written to its local directory; ``unmanaged``: the rest of
        its RSS (interpreter, libraries, a running task's temporaries);
        ``paused``: True while it starts no new task because its memory is
        nearly full; ``limit``: its memory limit in bytes (None: none);
        ``spill_error``: why its last spill failed, or None.
        """
        return {address: {"managed": w.get("memory_managed", 0),
                          "spilled": w.get("memory_spilled", 0),
                          "unmanaged": w.get("memory_unmanaged", 0),
                          "paused": w.get("paused", False),
                          "limit": w.get("memory_limit"),
                          "spill_error": w.get("spill_error")}
                for address, w in self._center("workers").items()}

    def get_task_stream(self) -> TaskStream:
        """Collect every task run on the cluster inside a ``with`` block.

        ``with e.get_task_stream() as ts: ...`` then ``ts.data`` is a list of
        dicts (``key``, ``worker``, ``thread``, ``start``, ``stop``, ``status``).
        """
        from .diagnostics import TaskStream
        return TaskStream(self)

    def _center(self, op: str, **kwargs: Any) -> Any:
        return self._pool.call(self.address, op, **kwargs)

    # ------------------------------------------------------------------ dask

    def get(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        """Run a dask graph on the cluster; values of ``keys`` in the same nesting.

        dask's scheduler-function contract: ``dsk`` is a raw graph (tuples)
        or what a dask collection gives; every key the call creates is
        released when it returns.  ``x.compute(scheduler=e.get)`` works.
        """
        from .dask_get import get_with
        return get_with(self, dsk, keys)

    def compute(self, collections: Any, *, optimize_graph: bool = True,
                traverse: bool = True, **kwargs: Any) -> Any:
        """Start computing dask collections; a Future for one, a list for several."""
        from .dask_get import compute
        return compute(self, collections, optimize_graph=optimize_graph, traverse=traverse)

    def persist(self, collections: Any, *, optimize_graph: bool = True,
                **kwargs: Any) -> Any:
        """The same collections, backed by data computing (then kept) on the cluster."""
        from .dask_get import persist
        return persist(self, collections, optimize_graph=optimize_graph)

    # ------------------------------------------------------------------ fetching results

    def _fetch(self, keys: list, timeout: float | None) -> dict:
        """Fetch values straight from workers; ask the center again if a holder is gone.

        A value that cannot be pickled there or unpickled here comes back as
        an ``_Unloadable`` for its key only: the others are still good.
        """
        end = None if timeout is None else time.monotonic() + timeout
        results: dict = {}
        remaining = list(dict.fromkeys(keys))
        if remaining and self._closed:
            raise CancelledError(f"the session was closed before {remaining[0]!r} was fetched")
        while remaining:
            by_worker: dict[str, list] = collections.defaultdict(list)
            generations = {}
            inline = {}
            with self._lock:
                for key in remaining:
                    info = self._keys.get(key)
                    if info is None:
                        raise CancelledError(f"key {key!r} was released")
                    if info.status in ("error", "lost"):
                        assert info.exception is not None  # set with the status
                        raise info.exception
                    generations[key] = info.generation
                    if info.value is not None:
                        inline[key] = info.value
                    elif info.who_has:
                        by_worker[random.choice(info.who_has)].append(key)
            for key, value in inline.items():
                results[key] = _load(key, value)
            located = {k for ks in by_worker.values() for k in ks}
            failed = [k for k in remaining if k not in located and k not in inline]
            for _address, got, missing in self._map_parallel(
                    lambda item: self._get_data(*item), list(by_worker.items())):
                results.update(got)
                failed.extend(missing)
            if not failed:
                break
            remaining = failed
            with self._lock:
                for key in remaining:
                    info = self._keys.get(key)
                    if info is not None:
                        info.who_has = []
                        info.generation += 1
                        generations[key] = info.generation
                self._sender.send({"op": "locate", "keys": remaining})
            self._wait_for_news(remaining, generations, end)
        return results

    def _fetch_within(self, keys: list, timeout: float | None) -> dict:
        """``_fetch`` that returns or raises ``TimeoutError`` in time even if a worker hangs."""
        if timeout is None or self._closed:
            return self._fetch(keys, timeout)
        try:
            job = self._gather_threads().submit(self._fetch, keys, timeout)
        except RuntimeError:  # closing right now: _fetch says so
            return self._fetch(keys, timeout)
        try:
            return job.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"timed out fetching {len(keys)} keys from workers") from None

    def _get_data(self, address: str, keys: list) -> tuple[str, dict, list]:
        got: dict = {}
        missing: list = []
        while keys:  # a worker reading spilled keys back sends them a few at a time
            try:
                reply = self._pool.call(address, "get_data", keys=keys)
            except (ConnectionError, OSError) as e:
                logger.info("could not fetch from %s: %s", address, e)
                return address, got, missing + keys
            got.update((key, _load(key, blob)) for key, blob in reply["data"].items())
            for key, (blob, tb) in (reply.get("errors") or {}).items():
                got[key] = _Unloadable(unpack_exception(blob, tb))
            missing.extend(reply.get("missing") or ())
            keys = list(reply.get("later") or ())
        return address, got, missing

    def _wait_for_news(self, keys: list, generations: dict, end: float | None) -> None:
        with self._news:
            while True:
                if self._broken is not None:
                    raise _fresh(self._broken)
                if self._closed:
                    raise CancelledError(f"the session was closed before {keys[0]!r} was "
                                         "fetched")
                if any(self._keys.get(k) is None or self._keys[k].generation != generations[k]
                       for k in keys):
                    return
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"timed out waiting for {len(keys)} keys")
                self._news.wait(remaining if remaining is not None else 1.0)

    def _map_parallel(self, fn: Callable, items: list) -> list:
        if len(items) <= 1:
            return [fn(item) for item in items]
        return list(self._gather_threads().map(fn, items))

    def _gather_threads(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._gather_pool is None:
                self._gather_pool = concurrent.futures.ThreadPoolExecutor(
                    8, thread_name_prefix="gather")
            return self._gather_pool

    # ------------------------------------------------------------------ events from the center

    def _read_events(self) -> None:
        handlers: dict[str, Callable[..., Any]] = {
            "memory": self._on_memory, "erred": self._on_erred, "lost": self._on_lost,
            "worker_left": lambda address: self._pool.abort(address)}
        try:
            while True:
                finished: list[dict] = []  # a run of "memory" events, handled together
                for msg in self._conn.recv():
                    if msg["op"] == "memory":
                        finished.append(msg)
                        continue
                    if finished:
                        self._on_memory(finished)
                        finished = []
                    handlers[msg.pop("op")](**msg)
                if finished:
                    self._on_memory(finished)
        except ConnectionError as e:
            if not self._shutdown:
                logger.warning("lost the center at %s: %s", self.address, e)
                self._break(e)
        except Exception as e:
            logger.exception("client event loop failed")
            self._break(e)

    def _on_memory(self, events: list[dict]) -> None:
        """Keys are in memory (``key``, ``who_has``, maybe ``value``): finish their Futures.

        A batch of them takes the session's lock and the Futures' condition
        once each, not once per key.
        """
        futures: list[Future] = []
        with self._lock:
            for event in events:
                info = self._keys.get(event["key"])
                if info is None:
                    continue
                info.status = "finished"
                info.who_has = event["who_has"]
                info.value = event.get("value")
                if "warnings" in event:
                    info.warnings = event["warnings"]
                info.generation += 1
                futures += info.live_futures()
                self._release_orphan(info)
            self._news.notify_all()
        if futures:
            _finish_all(futures, self._future_condition)

    def _on_erred(self, key: Any, exception: wire.Serialized, traceback: str,
                  warnings: list | None = None) -> None:
        traceback = fill_source_lines(traceback)
        if warnings:
            info = self._keys.get(key)
            if info is not None:
                info.warnings = warnings
        exc = unpack_exception(exception, traceback)
        if isinstance(exc, InitializerError) and self._init is not None:
            self._break_pool(exc)
        self._set_failed(key, "error", exc, traceback)

    def _break_pool(self, exc: InitializerError) -> None:
        """The initializer failed on a worker: fail every pending Future, refuse new work."""
        with self._lock:
            first = self._broken_pool is None
            if first:
                self._broken_pool = exc
                logger.error("executor broken: %s", exc)
            futures = [f for info in self._keys.values() if info.status == "pending"
                       for f in info.live_futures()]
        for future in futures:
            error = InitializerError(*exc.args)
            error.__cause__ = exc.__cause__
            future._fail(error)

    def _on_lost(self, key: Any, reason: str) -> None:
        self._set_failed(key, "lost", LostKeyError(reason), None)

    def _set_failed(self, key: Any, status: str, exc: BaseException, tb: str | None) -> None:
        with self._lock:
            info = self._keys.get(key)
            if info is None:
                return
            info.status, info.exception, info.tb = status, exc, tb
            info.generation += 1
            futures = info.live_futures()
            self._release_orphan(info)
            self._news.notify_all()
        for future in futures:
            future._fail(exc)

    def _break(self, exc: BaseException) -> None:
        self._set_broken(ConnectionError(f"lost the center at {self.address}: {exc}"))

    def _workers_lost(self, reason: str) -> None:
        """The owned LocalCluster has no worker left and none will come: nothing can run."""
        self._set_broken(concurrent.futures.BrokenExecutor(reason))

    def _set_broken(self, error: BaseException) -> None:
        """From now on pending futures fail with ``error`` and new work raises it."""
        with self._lock:
            if self._broken is not None:
                return
            self._broken = error
            futures = [f for info in self._keys.values() for f in info.live_futures()]
            self._news.notify_all()
        for future in futures:
            future._fail(error)

    # ------------------------------------------------------------------ reference counting

    def _release_orphan(self, info: _KeyInfo) -> None:
        """A key nobody holds any more is done: release it now (caller holds the lock)."""
        if info.refs <= 0 and self._keys.get(info.key) is info:
            del self._keys[info.key]
            if not self._shutdown and self._broken is None:
                self._sender.send({"op": "release", "keys": [info.key]})

    def _drop_ref(self, future: Future) -> None:
        if not future._released:
            future._released = True
            self._deferred.append((future._info, False))

    def _release(self, futures: Iterable[Future]) -> None:
        """Drop these handles and tell the center now, not at the next release tick."""
        for future in futures:
            self._drop_ref(future)
        self._flush_releases()

    def _release_loop(self) -> None:
        """Turn dropped futures into ``release`` messages (off the GC's thread)."""
        while not self._shutdown and self._broken is None:
            time.sleep(0.05)
            if self._deferred:
                self._flush_releases()

    def _flush_releases(self) -> None:
        deferred = self._deferred
        released = []
        with self._lock:
            while deferred:
                info, collected = deferred.popleft()
                info.refs -= 1
                if info.refs <= 0 and self._keys.get(info.key) is info:
                    if collected and self._finish_dropped and info.status == "pending" and \
                            not info.cancelled and self._broken_pool is None:
                        continue  # an orphan: it runs, and is released when it finishes
                    del self._keys[info.key]
                    released.append(info.key)
            if released and not self._shutdown and self._broken is None:
                self._sender.send({"op": "release", "keys": released})

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(wait=True)

    def __repr__(self) -> str:
        state = "closed" if self._shutdown else "connected"
        return f"<{type(self).__name__}: center={self.address} {state}>"

    def _repr_html_(self) -> str:
        """A notebook's view: center, workers, threads, memory and the dashboard's link."""
        from .reprs import html_table, human_bytes
        rows: list[tuple[str, Any]] = [("center", self.address)]
        if self._shutdown or self._broken is not None:
            rows.append(("state", "closed" if self._shutdown else f"broken: {self._broken}"))
        else:
            try:
                memory = self.memory()
                threads = sum(self.nthreads().values())
            except Exception as e:  # a display never raises
                rows.append(("state", f"unreachable: {e}"))
            else:
                limits = [m["limit"] for m in memory.values()]
                rows += [("workers", len(memory)), ("threads", threads),
                         ("memory", human_bytes(sum(limits)) if limits and None not in limits
                          else "no limit"),
                         ("held", human_bytes(sum(m["managed"] for m in memory.values())))]
        link = getattr(self._cluster, "dashboard_link", None)
        if link:
            rows.append(("dashboard", link))
        return html_table(type(self).__name__, rows)


def _conflicting_future(key: Any, session: Executor) -> Future:
    """A Future for a task refused because this session holds ``key`` for another task."""
    info = _KeyInfo(key)
    info.status = "error"
    info.exception = KeyConflictError(
        f"key {key!r} already names another task in this session; give this task another "
        "key, or drop the futures of the other task first")
    future = Future(key, session, info)
    future._released = True  # it never held the key
    future._fail(info.exception)
    return future


def _emit_warnings(info: _KeyInfo) -> None:
    """Warn the task's warnings in the caller, once: whoever takes them first empties them."""
    packed, info.warnings = info.warnings, None
    if packed:
        emit_warnings(packed)


def _fresh(error: BaseException) -> BaseException:
    """A new exception like ``error``, to raise again without growing its traceback."""
    return type(error)(*error.args)


def _cancelled_info(key: Any) -> _KeyInfo:
    info = _KeyInfo(key)
    info.status = "cancelled"
    return info


def _collect_futures(obj: Any, found: dict) -> None:
    collect(obj, found, Future)


def _keys_in_order(obj: Any) -> Iterator[Any]:
    if isinstance(obj, Future):
        yield obj.key
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            yield from _keys_in_order(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _keys_in_order(item)


_SKIP = object()


def _rebuild(obj: Any, values: dict, failed: set) -> Any:
    if isinstance(obj, Future):
        return _SKIP if obj.key in failed else values[obj.key]
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [_rebuild(x, values, failed) for x in obj]
        return type(obj)(x for x in items if x is not _SKIP)
    if isinstance(obj, dict):
        rebuilt = {k: _rebuild(v, values, failed) for k, v in obj.items()}
        return {k: v for k, v in rebuilt.items() if v is not _SKIP}
    return obj


class Client(Executor):
    """The dask-style session of the seeds: ``map`` returns Futures that stay remote.

    On creation it becomes dask's default scheduler, so a bare ``.compute()``
    runs on the cluster (``set_as_default=False`` opts out; the previous
    scheduler comes back when it closes).  dask is not imported for that:
    if it is not loaded yet, the Client registers when it is.  Everything
    else is the Executor's; ``close()`` ends the session.
    """

    asynchronous = False  # what dask asks of a client given as ``scheduler=``
    _previous_scheduler: Any  # dask's default before this Client, once it has registered

    def __init__(self, address: Any = None, *, set_as_default: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._set_as_default = set_as_default
        if set_as_default:
            register_default_scheduler(self)

    def _close(self) -> None:
        super()._close()
        if self._set_as_default:
            unregister_default_scheduler(self)

    def map(  # type: ignore[override]  # dask's: a list of Futures, not an iterator of results
            self, fn: Callable, *iterables: Iterable, key: Any = None, pure: bool | None = None,
            workers: Any = None, retries: int = 0, **kwargs: Any) -> list[Future]:
        """Submit ``fn`` over the iterables; returns a list of Futures (no results fetched).

        Keyword arguments go to every call.  ``key=`` is a list of keys, one per call.
        Calls go out in batches as they are pickled; one that cannot be pickled
        raises here, and the calls sent before it are cancelled.
        """
        opts = {"workers": workers, "retries": retries} if workers or retries else None
        calls = [(args, kwargs) for args in zip(*iterables, strict=False)]
        keys = key if isinstance(key, (list, tuple)) else None
        return self._submit_many(fn, calls, keys, self.pure if pure is None else pure, opts)

    _keep_results = False  # a closed Client's futures are cancelled, as in dask
    _finish_dropped = False  # as in dask: a task whose futures are all gone is cancelled

    def close(self) -> None:
        """End the session: pending futures are cancelled, its keys released on the cluster."""
        self.shutdown(wait=True, cancel_futures=True)


def default_session() -> Executor:
    """The newest open ``Client`` or ``Executor`` of this process (joblib's backend uses it).

    Raises ``ValueError`` when there is none.
    """
    _opened[:] = [ref for ref in _opened if ref() is not None]
    for ref in reversed(_opened):
        session = ref()
        if session is not None and not session._shutdown and session._broken is None:
            return session
    raise ValueError("no open minidist Client or Executor in this process: create one "
                     "first, e.g. Client('host:port') or Executor()")


_shared: dict[tuple, Executor] = {}
_shared_lock = threading.Lock()


def shared_session(address: Any, *, timeout: float = 10.0, auth_key: bytes | str | None = None,
                   tls_ca: str | None = None, tls_cert: str | None = None,
                   tls_key: str | None = None) -> Executor:
    """This process's long-lived session to the center at ``address`` with these options.

    The dask ``get`` function and handles unpickled in another process use
    it; a broken one is replaced, and all are closed at exit.
    """
    address = wire.format_address(*wire.parse_address(address))
    ident = (address, auth_key, tls_ca, tls_cert, tls_key)
    session: Executor | None
    with _shared_lock:
        for other, session in list(_shared.items()):
            if session._shutdown or session._broken is not None:
                del _shared[other]
                session.shutdown(wait=False)
        session = _shared.get(ident)
        if session is None:
            session = _shared[ident] = Executor(address, timeout=timeout, auth_key=auth_key,
                                                tls_ca=tls_ca, tls_cert=tls_cert,
                                                tls_key=tls_key)
            # An internal session (dask's get, Pool handles) is nobody's default.
            _opened[:] = [ref for ref in _opened if ref() is not session]
        return session


def close_shared_sessions(address: str) -> None:
    """Close this process's shared sessions to the center at ``address`` (it is going away)."""
    with _shared_lock:
        for ident, session in list(_shared.items()):
            if ident[0] == address:
                del _shared[ident]
                session.shutdown(wait=False)


def _finish_all_sessions() -> None:
    """At interpreter exit, before atexit hooks: Executors finish the work they were given.

    As ``ProcessPoolExecutor`` does, pending work (also work whose Futures
    were dropped) runs to the end, and an owned LocalCluster then stops.
    Clients are left to ``_close_all_sessions``, which cancels their work.
    """
    for session in list(_sessions):
        if not session._finish_dropped:
            continue
        try:
            if not session._shutdown:
                session.shutdown(wait=True)
            elif session._finisher is not None:  # shutdown(wait=False): its work still runs
                session._finisher.join()
        except Exception:
            logger.exception("shutting down %r at exit failed", session)


def _close_all_sessions() -> None:
    for session in list(_sessions):
        try:
            session._terminate()
        except Exception:
            pass


# threading's exit hooks run before atexit's (which stop LocalClusters): the same
# moment at which concurrent.futures' own executors finish their work.
threading._register_atexit(_finish_all_sessions)  # type: ignore[attr-defined]
atexit.register(_close_all_sessions)
