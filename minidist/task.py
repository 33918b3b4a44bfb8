"""What a task is, as clients write it and workers run it.

A task is ``func(*args, **kwargs)`` where any argument may be (or contain,
inside lists, tuples, sets and dicts) a reference to another key.  Clients
pack a task into a ``RunSpec``: the function and the arguments are pickled
separately (so one pickled function is shared by every task of a ``map``),
and references become ``TaskRef`` placeholders.  The center never opens a
RunSpec; the worker unpacks it, swaps each ``TaskRef`` for the value of its
key and calls the function.

A RunSpec may also name an initializer (``Executor(initializer=...)``): an
``InitSpec`` holding the pickled ``initializer(*initargs)`` call and a
token.  An executor pickles it once and every one of its tasks carries
that same object (pickle's memo sends it once per frame).  A worker
process runs each distinct initializer once, before the first task that
carries it, and remembers the outcome: if the initializer raised, that
task and every later one carrying it fail with ``InitializerError`` (a
``concurrent.futures.BrokenExecutor``) without running it again.  A worker
that joins or restarts later runs it before its own first such task.

The errors that travel between processes live here too, so that every
process can unpickle them.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib
import linecache
import logging
import re
import sys
import threading
import traceback
import types
import warnings
import weakref
from typing import Any
from collections.abc import Callable, Mapping

from .serialize import Serialized, deserialize, pickled_by_value, serialize, shipped_source

logger = logging.getLogger("minidist.task")


class TaskRef:
    """Placeholder for the value of ``key`` inside a task's arguments."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key

    def __reduce__(self) -> Any:
        return TaskRef, (self.key,)

    def __repr__(self) -> str:
        return f"TaskRef({self.key!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskRef) and other.key == self.key

    def __hash__(self) -> int:
        return hash(("TaskRef", self.key))


class HasKey:
    """Mixin for client handles (Future, RemoteData) that name data on the cluster.

    A ``HasKey`` found among a task's arguments becomes a dependency.
    """

    key: Any


class InitSpec:
    """An executor's initializer: the pickled ``(initializer, initargs)`` and its token."""

    __slots__ = ("token", "call", "name")

    def __init__(self, token: str, call: Serialized, name: str) -> None:
        self.token = token
        self.call = call
        self.name = name

    @classmethod
    def pack(cls, initializer: Callable, initargs: tuple) -> InitSpec:
        """Pickle ``initializer(*initargs)`` once; the token names its bytes."""
        call = serialize((initializer, tuple(initargs)))
        h = hashlib.blake2b(call.header, digest_size=16)
        for buf in call.buffers:
            h.update(buf)
        name = getattr(initializer, "__qualname__", None) or repr(initializer)
        return cls(h.hexdigest(), call, name)

    def __reduce__(self) -> Any:
        return InitSpec, (self.token, self.call, self.name)


class RunSpec:
    """A packed task: pickled function, pickled arguments, whether they hold refs,
    and the initializer (an ``InitSpec``) to run first on each worker, if any."""

    __slots__ = ("func", "args", "has_refs", "init")

    def __init__(self, func: Serialized, args: Serialized, has_refs: bool,
                 init: InitSpec | None = None) -> None:
        self.func = func
        self.args = args
        self.has_refs = has_refs
        self.init = init

    def __reduce__(self) -> Any:
        if self.init is None:
            return RunSpec, (self.func, self.args, self.has_refs)
        return RunSpec, (self.func, self.args, self.has_refs, self.init)


class KilledWorker(Exception):
    """A task was running on too many workers that died; it is not retried again."""

    def __init__(self, key: Any, last_worker: str, count: int) -> None:
        super().__init__(key, last_worker, count)
        self.key, self.last_worker, self.count = key, last_worker, count

    def __str__(self) -> str:
        return (f"task {self.key!r} was running on {self.count} workers that died "
                f"(the last was {self.last_worker}); giving up on it")


class NoWorkerError(Exception):
    """No worker able to run a task was there for ``--no-workers-timeout`` seconds."""

    def __init__(self, key: Any, seconds: float, restrictions: list | None = None) -> None:
        super().__init__(key, seconds, restrictions)
        self.key, self.seconds, self.restrictions = key, seconds, restrictions

    def __str__(self) -> str:
        if self.restrictions:
            why = f"no worker matching workers={self.restrictions!r}"
        else:
            why = "no workers in the cluster"
        return f"task {self.key!r} could not run: {why} for {self.seconds:g}s"


class InitializerError(concurrent.futures.BrokenExecutor):
    """The executor's initializer raised on a worker: the executor is broken.

    Its futures fail with this error and ``submit`` raises it, as
    ``ProcessPoolExecutor`` does with ``BrokenProcessPool``.
    """


class LostKeyError(KeyError):
    """A key's data is gone and cannot be recomputed: its only copy died with its
    worker, or the key is not known to the center at all.

    A ``KeyError``, as dask's scheduler-function contract asks of a missing key.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "key lost"


class KeyConflictError(ValueError):
    """A task was submitted under a key the cluster already holds for a different task.

    Two computations never share a key: the first keeps it, the second gets
    this error (never the first one's value).
    """


class RemoteException(Exception):
    """Stands for a task's exception whose class cannot be unpickled here."""

    def __init__(self, type_name: str, text: str) -> None:
        super().__init__(type_name, text)
        self.type_name, self.text = type_name, text

    def __str__(self) -> str:
        return f"{self.type_name}: {self.text}"


class RemoteTraceback(Exception):
    """Attached as ``__cause__`` of a re-raised task error; shows the remote traceback."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


# ---------------------------------------------------------------------------
# Packing (client side)

_ATOMIC = frozenset({int, float, str, bytes, bool, type(None), complex, bytearray})


def find_refs(obj: Any, deps: dict) -> Any:
    """Return ``obj`` with every HasKey replaced by a TaskRef, recording keys in ``deps``.

    Containers are rebuilt only when something inside them changed.  ``deps``
    maps key -> the handle, so callers can keep the handle alive.
    """
    typ = type(obj)
    if typ in _ATOMIC:
        return obj
    if isinstance(obj, HasKey):
        deps[obj.key] = obj
        return TaskRef(obj.key)
    if typ is dict:
        values = None
        for k, v in obj.items():
            if type(v) not in _ATOMIC and (found := find_refs(v, deps)) is not v:
                values = values or dict(obj)
                values[k] = found
        return obj if values is None else values
    if typ not in (list, tuple, set, frozenset):
        return obj
    items = None
    for i, x in enumerate(obj):
        if type(x) not in _ATOMIC and (found := find_refs(x, deps)) is not x:
            items = items or list(obj)
            items[i] = found
    return obj if items is None else typ(items)


_func_cache: weakref.WeakKeyDictionary[Any, Serialized] = weakref.WeakKeyDictionary()
"""Pickled functions by function, held weakly: a cached bound method must not keep
its object alive once the caller has let go of it."""


def _import_attribute(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


class _ModuleAttribute:
    """Pickles as ``module.name``, to be looked up again where it is unpickled."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __reduce__(self) -> Any:
        return _import_attribute, (self.module, self.name)


def _as_module_attribute(func: Callable) -> _ModuleAttribute | None:
    """A bound method published by an importable module (``numpy.random.random``), by name.

    Pickled as a method, it would carry a copy of its object (the module's
    random generator with its current state), so every worker would run the
    same copy and impure calls would repeat each other's results.
    """
    owner = getattr(func, "__self__", None)
    if owner is None or isinstance(owner, types.ModuleType) or \
            not isinstance(func, (types.BuiltinMethodType, types.MethodType)):
        return None
    module, name = getattr(func, "__module__", None), getattr(func, "__name__", None)
    if not isinstance(module, str) or not isinstance(name, str) or module == "__main__" or \
            module in pickled_by_value():
        return None
    if getattr(sys.modules.get(module), name, None) is not func:
        return None
    return _ModuleAttribute(module, name)


def serialize_function(func: Callable) -> Serialized:
    """Pickle a function once (cloudpickle) and reuse the bytes for every task."""
    try:
        return _func_cache[func]
    except (KeyError, TypeError):
        pass
    s = serialize(_as_module_attribute(func) or func)
    try:
        if len(_func_cache) >= 256:
            _func_cache.pop(next(iter(_func_cache)), None)
        _func_cache[func] = s
    except TypeError:  # unhashable, or cannot be weakly referenced
        pass
    return s


def pack(func: Callable, args: tuple, kwargs: dict) -> tuple[RunSpec, dict]:
    """Pack a call into a RunSpec; returns it and the handles it depends on."""
    deps: dict = {}
    args = find_refs(args, deps)
    if kwargs:
        kwargs = find_refs(kwargs, deps)
    return RunSpec(serialize_function(func), serialize((args, kwargs)), bool(deps)), deps


# ---------------------------------------------------------------------------
# Unpacking and running (worker side)


def substitute(obj: Any, data: Mapping) -> Any:
    """Replace every TaskRef in ``obj`` by ``data[ref.key]``."""
    typ = type(obj)
    if typ is TaskRef:
        return data[obj.key]
    if typ in (list, tuple, set, frozenset):
        return typ(substitute(x, data) for x in obj)
    if typ is dict:
        return {k: substitute(v, data) for k, v in obj.items()}
    return obj


_loaded_funcs: dict[bytes, Callable] = {}


def load_function(s: Serialized) -> Callable:
    """Unpickle a function, caching by its bytes (a map sends the same bytes many times)."""
    if s.buffers:
        return deserialize(s)
    try:
        return _loaded_funcs[s.header]
    except KeyError:
        func = deserialize(s)
        if len(_loaded_funcs) >= 256:
            _loaded_funcs.pop(next(iter(_loaded_funcs)))
        _loaded_funcs[s.header] = func
        return func


_initialized: dict[str, BaseException | None] = {}
"""Initializer token -> None once it ran here, or the exception it raised."""
_init_lock = threading.Lock()


def ensure_initialized(init: InitSpec) -> None:
    """Run ``init`` in this process unless it ran already; raise if it failed (now or before).

    Task threads needing the same initializer wait for the one running it.
    """
    try:
        error = _initialized[init.token]
    except KeyError:
        with _init_lock:
            if init.token not in _initialized:
                try:
                    initializer, initargs = deserialize(init.call)
                    initializer(*initargs)
                    _initialized[init.token] = None
                except BaseException as e:  # noqa: B036 - an initializer must not kill a thread
                    logger.error("initializer %s failed", init.name, exc_info=True)
                    _initialized[init.token] = e
            error = _initialized[init.token]
    if error is not None:
        raise InitializerError(f"initializer {init.name} failed on this worker: "
                               f"{type(error).__name__}: {error}") from error


def run(spec: RunSpec, data: Mapping) -> Any:
    """Unpack and call a RunSpec with its references taken from ``data``.

    The executor's initializer, if the spec names one, runs first (once per process).
    """
    if spec.init is not None:
        ensure_initialized(spec.init)
    func = load_function(spec.func)
    args, kwargs = deserialize(spec.args)
    if spec.has_refs:
        args = substitute(args, data)
        kwargs = substitute(kwargs, data)
    return func(*args, **kwargs)


MAX_WARNINGS = 100
"""Distinct warnings (category, text, place) kept per task run; the rest are counted away."""

_capturing = threading.local()
_hook_lock = threading.Lock()
_original_showwarning: Callable[..., Any] | None = None


def _showwarning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
    records = getattr(_capturing, "records", None)
    if records is None:  # not in a task: the process's own warning, shown as usual
        assert _original_showwarning is not None
        _original_showwarning(message, category, filename, lineno, file, line)
        return
    place = (category, str(message), filename, lineno)
    if place not in records and len(records) < MAX_WARNINGS:
        records[place] = None


def _install_hook() -> None:
    """Route warnings through ``_showwarning``; every task sees each of its warnings.

    Without the ``always`` filter, a warning shown once in this process
    (the ``default`` action's registry) would be lost for every later task.
    """
    global _original_showwarning
    with _hook_lock:
        if _original_showwarning is None:
            _original_showwarning = warnings.showwarning
            warnings.showwarning = _showwarning
            warnings.simplefilter("always")


class captured_warnings:
    """``with captured_warnings() as records:`` what this thread's task warned, by place."""

    def __enter__(self) -> dict:
        if _original_showwarning is None:
            _install_hook()
        self.previous = getattr(_capturing, "records", None)
        _capturing.records = {}
        return _capturing.records

    def __exit__(self, *exc: Any) -> None:
        _capturing.records = self.previous


def pack_warnings(key: Any, records: dict) -> list | None:
    """The captured warnings for the trip to the client: ``[(origin, category, name,
    message, filename, lineno)]``, the category pickled alone (it may not unpickle there)."""
    if not records:
        return None
    packed = []
    for category, message, filename, lineno in records:
        try:
            blob = serialize(category)
        except Exception:
            blob = None
        packed.append((key_name(key), blob, f"{category.__module__}.{category.__qualname__}",
                       message, filename, lineno))
    return packed


def emit_warnings(packed: list) -> None:
    """Warn here what a task warned there, through ``warnings`` (the caller's filters apply)."""
    for _origin, blob, name, message, filename, lineno in packed:
        category: Any = UserWarning
        if blob is not None:
            try:
                loaded = deserialize(blob)
                if isinstance(loaded, type) and issubclass(loaded, Warning):
                    category = loaded
            except Exception:
                pass
        if category is UserWarning and not name.endswith(".UserWarning"):
            message = f"{name}: {message}"
        warnings.warn_explicit(message, category, filename, lineno)


def pack_exception(exc: BaseException) -> tuple[Serialized, str]:
    """Serialize a task's exception and its traceback text for the trip home."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc.__traceback__ = None
    try:
        blob = serialize(exc)
        deserialize(blob)  # an exception that pickles but cannot unpickle is common
    except Exception:
        blob = serialize(RemoteException(type(exc).__qualname__, str(exc)))
    return blob, tb


_FRAME_LINE = re.compile(r'^( *)File "(.+)", line (\d+), in ')


def fill_source_lines(tb: str) -> str:
    """Add the source lines a remote traceback lacks, from this process's copy of its files.

    A worker on another host cannot read the files of functions shipped to
    it by value, so its traceback names file and line but shows no code.
    The client can: from the lines it remembered when it shipped the code
    (``wire.shipped_source``), else from the file itself.
    """
    lines = tb.splitlines(keepends=True)
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        match = _FRAME_LINE.match(line)
        if match is None:
            continue
        indent, filename, lineno = match.group(1), match.group(2), int(match.group(3))
        body = indent + "  "
        if i + 1 < len(lines) and lines[i + 1].startswith(body):
            continue  # the worker could read the line itself
        source = shipped_source(filename) or linecache.getlines(filename)
        if 0 < lineno <= len(source) and source[lineno - 1].strip():
            out.append(f"{body}{source[lineno - 1].strip()}\n")
    return "".join(out)


def unpack_exception(blob: Serialized, tb: str) -> BaseException:
    """Rebuild a task's exception with the remote traceback as its ``__cause__``.

    Source lines the worker could not read are filled in from here
    (``fill_source_lines``).
    """
    tb = fill_source_lines(tb)
    try:
        exc = deserialize(blob)
        if not isinstance(exc, BaseException):
            raise TypeError(type(exc))
    except Exception:
        type_name, _, text = _last_exception_text(tb).partition(": ")
        exc = RemoteException(type_name, text)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return exc


def _last_exception_text(tb: str) -> str:
    """``"Type: message"`` of the last exception in a formatted traceback (all its lines)."""
    lines = tb.rstrip("\n").splitlines()
    start = 0
    for i, line in enumerate(lines):  # the message follows the last frame's indented lines
        if line.startswith("  File "):
            start = i + 1
    while start < len(lines) and lines[start].startswith("    "):
        start += 1
    return "\n".join(lines[start:]) or "unknown error"


def key_name(key: Any) -> str:
    """Short printable form of a key for logs and reprs."""
    return key if isinstance(key, str) else repr(key)


def collect(obj: Any, found: dict, kind: type[HasKey] = HasKey) -> None:
    """Record each ``kind`` handle inside nested lists, tuples, sets and dicts by key."""
    if isinstance(obj, kind):
        found.setdefault(obj.key, obj)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            collect(item, found, kind)
    elif isinstance(obj, dict):
        for item in obj.values():
            collect(item, found, kind)
