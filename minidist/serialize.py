"""Values as pickles: protocol 5 with large buffers out of band, cloudpickle when needed.

``serialize`` turns a value into a ``Serialized``: one pickle header plus the
large buffers it refers to (numpy arrays, bytes, bytearrays, memoryviews of
at least ``OOB_THRESHOLD`` bytes), which travel as frames of their own and
are never copied into the pickle.  Plain pickle is tried first; what it
cannot carry (lambdas, closures, functions of ``__main__``) goes through
cloudpickle, with one change: code pickled by value keeps its file name,
and this process remembers the source lines it shipped
(``shipped_source``), so a remote traceback can still show them.

``dumps``/``loads`` are the message-level pair that ``wire`` frames.
Nothing here touches a socket, a file descriptor or a clock, so the
scheduler's state machine can use it.
"""

from __future__ import annotations

import io
import linecache
import pickle
import sys
import threading
import types
from collections import ChainMap
from typing import Any, SupportsIndex
from collections.abc import Callable, Iterable

OOB_THRESHOLD = 2048  # buffers smaller than this stay inside the pickle


class SerializationError(pickle.PicklingError, TypeError):
    """A value cannot be pickled.

    A ``pickle.PicklingError``, as ``concurrent.futures`` code expects, and a
    ``TypeError``, as pickling an unpicklable object raises in plain Python.
    """



def _identity(obj: Any) -> Any:
    return obj


class _Bytes:
    """Wrap a bytes-like value so that pickling sends it out of band."""

    __slots__ = ("value",)

    def __init__(self, value: bytes | bytearray) -> None:
        self.value = value

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        return _identity, (pickle.PickleBuffer(self.value),)


def _as_view(buf: Any, fmt: str, shape: tuple) -> memoryview:
    view = memoryview(buf).cast("B")
    if fmt == "B" and len(shape) == 1:
        return view
    return view.cast(fmt, shape)  # type: ignore[call-overload]  # the format is only known at run time


class _View:
    """Wrap a contiguous memoryview so that pickling sends its memory out of band."""

    __slots__ = ("value",)

    def __init__(self, value: memoryview) -> None:
        self.value = value

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        view = self.value
        return _as_view, (pickle.PickleBuffer(view), view.format, view.shape)


def _oob(buffers: list) -> Callable[[pickle.PickleBuffer], bool]:
    def callback(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes < OOB_THRESHOLD:
            return True  # small: keep it inside the pickle
        buffers.append(buf)
        return False
    return callback


# ---------------------------------------------------------------------------
# Code shipped by value keeps its file name

_CODE_MARK = "<minidist-code>"
"""Stands in for a code object's file name inside cloudpickle's own reduction of it."""

SHIPPED_SOURCE_FILES = 64
"""Source files remembered by ``shipped_source`` (the oldest is dropped first)."""
_shipped_sources: dict[str, list[str]] = {}
_shipped_sources_lock = threading.Lock()


def _code_with_filename(code: types.CodeType, filename: str) -> types.CodeType:
    return code.replace(co_filename=filename)


def _remember_source(filename: str) -> None:
    if filename in _shipped_sources:
        return
    lines = linecache.getlines(filename)
    if lines:
        with _shipped_sources_lock:
            if len(_shipped_sources) >= SHIPPED_SOURCE_FILES:
                del _shipped_sources[next(iter(_shipped_sources))]
            _shipped_sources[filename] = lines


def shipped_source(filename: str) -> list[str]:
    """The lines of a source file whose code this process shipped by value, as they were then.

    Empty when none was shipped from ``filename`` (or it could not be read).
    """
    return _shipped_sources.get(filename, [])


_pickler_class: type | None = None


def _cloudpickler() -> type:
    """cloudpickle's Pickler, but code objects keep their real ``co_filename``.

    cloudpickle 3.1 and later replace it with ``"<dynamic-code>"`` (so that
    the bytes do not depend on where a function was defined); a traceback on
    the worker then has no file to read its source lines from, and neither
    has the client.  Here the file name travels beside cloudpickle's own
    reduction of the code (made with a fixed placeholder name, so the bytes
    are as deterministic as cloudpickle makes them), and the code is renamed
    back when unpickled.  The source lines are remembered when the code is
    pickled, for the client to fill in a remote traceback (see
    ``shipped_source``).
    """
    global _pickler_class
    if _pickler_class is None:
        import cloudpickle
        base_table = cloudpickle.Pickler.dispatch_table
        reduce_code_by_value = base_table[types.CodeType]

        def reduce_code(code: types.CodeType) -> Any:
            filename = code.co_filename
            if filename == _CODE_MARK:
                return reduce_code_by_value(code)
            _remember_source(filename)
            # A fresh copy of the name: pickle's memo never makes the bytes depend on
            # which code objects happened to share one string object.
            return _code_with_filename, (code.replace(co_filename=_CODE_MARK), "".join(filename))

        class Pickler(cloudpickle.Pickler):
            dispatch_table = ChainMap({types.CodeType: reduce_code}, base_table)

        _pickler_class = Pickler
    return _pickler_class


def _cloudpickle_dumps(obj: Any, buffer_callback: Callable[[pickle.PickleBuffer], bool]) -> bytes:
    """``cloudpickle.dumps`` with protocol 5, keeping code objects' file names."""
    f = io.BytesIO()
    _cloudpickler()(f, protocol=5, buffer_callback=buffer_callback).dump(obj)
    return f.getvalue()


def dumps(obj: Any) -> list:
    """Pickle ``obj`` into frames: the pickle, then its out-of-band buffers.

    Plain pickle first (fast, C); cloudpickle when that fails (lambdas,
    closures, classes defined in ``__main__``).
    """
    buffers: list = []
    try:
        head = pickle.dumps(obj, protocol=5, buffer_callback=_oob(buffers))
    except Exception:
        buffers = []
        head = _cloudpickle_dumps(obj, _oob(buffers))
    return [head, *buffers]


def loads(frames: list) -> Any:
    """Inverse of ``dumps``."""
    return pickle.loads(frames[0], buffers=frames[1:])


class Serialized:
    """A user value pickled once and carried opaquely (the center never opens it).

    Functions, arguments and results travel this way: the client pickles with
    cloudpickle, the center only forwards, the worker unpickles.  Large
    buffers stay out of band all the way.
    """

    __slots__ = ("header", "buffers")

    def __init__(self, header: bytes, buffers: Iterable = ()) -> None:
        self.header = header
        self.buffers = tuple(buffers)  # the empty tuple is shared: no cost per small value

    def __reduce__(self) -> Any:
        header: bytes | pickle.PickleBuffer = self.header
        if len(self.header) >= OOB_THRESHOLD:  # a big in-band pickle travels as its own frame too
            header = pickle.PickleBuffer(header)
        return Serialized, (header, [pickle.PickleBuffer(b) for b in self.buffers])

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(memoryview(b).nbytes for b in self.buffers)


_PLAIN = frozenset({int, float, str, bool, type(None), complex})
"""Types ``_lift_bytes`` has nothing to look at in (most task arguments)."""


def _lift_bytes(obj: Any, depth: int = 2) -> Any:
    """Wrap large bytes (also directly inside small lists, tuples and dicts) for out-of-band travel.

    pickle copies plain bytes into the stream; wrapped, they go as their own
    frames and arrive as the very bytes objects that were received.  A
    container is copied only when something inside it was wrapped.
    """
    typ = type(obj)
    if typ in (bytes, bytearray):
        return _Bytes(obj) if len(obj) >= OOB_THRESHOLD else obj
    if typ is memoryview:  # cloudpickle would copy it into the pickle as bytes
        return _View(obj) if obj.c_contiguous and obj.nbytes >= OOB_THRESHOLD else obj
    if typ not in (list, tuple, dict) or not depth or len(obj) > 64:
        return obj
    if typ is dict:
        items = None
        for k, v in obj.items():
            if type(v) not in _PLAIN and (lifted := _lift_bytes(v, depth - 1)) is not v:
                items = items or dict(obj)
                items[k] = lifted
        return obj if items is None else items
    changed = None
    for i, x in enumerate(obj):
        if type(x) not in _PLAIN and (lifted := _lift_bytes(x, depth - 1)) is not x:
            changed = changed or list(obj)
            changed[i] = lifted
    return obj if changed is None else typ(changed)


def _is_plain_call(obj: Any) -> bool:
    """Is ``obj`` a call's ``(args, kwargs)`` holding nothing but a few numbers, strings
    and Nones (the arguments of most small tasks)?  Their pickle refers to no code and
    has no buffer to send apart."""
    if type(obj) is not tuple or len(obj) != 2:
        return False
    args, kwargs = obj
    if type(args) is not tuple or type(kwargs) is not dict or kwargs or len(args) > 8:
        return False
    return all(type(x) in _PLAIN for x in args)


def pickled_by_value() -> Iterable[str]:
    """Modules registered with ``cloudpickle.register_pickle_by_value``.

    Nobody can have registered one before cloudpickle was imported.
    """
    cloudpickle = sys.modules.get("cloudpickle")
    return cloudpickle.list_registry_pickle_by_value() if cloudpickle else ()


def _needs_by_value(header: bytes) -> bool:
    """Does a plain pickle refer to code a worker may not be able to import?"""
    if b"__main__" in header:
        return True
    return any(name.encode() in header for name in pickled_by_value())


def serialize(obj: Any) -> Serialized:
    """Pickle a user value (protocol 5, large buffers out of band).

    Plain pickle (C, fast) when the result refers only to importable code;
    cloudpickle when it fails or refers to ``__main__`` or to a module
    registered to travel by value (so lambdas, closures and classes defined
    in scripts and notebooks work).
    """
    if _is_plain_call(obj):  # (args, kwargs) of small plain values: nothing to lift or ship
        return Serialized(pickle.dumps(obj, protocol=5))
    obj = _lift_bytes(obj)
    buffers: list = []
    try:
        header = pickle.dumps(obj, protocol=5, buffer_callback=_oob(buffers))
        if _needs_by_value(header):
            raise pickle.PicklingError("refers to code that must travel by value")
    except Exception:
        buffers = []
        try:
            header = _cloudpickle_dumps(obj, _oob(buffers))
        except Exception as e:
            raise SerializationError(f"cannot serialize {type(obj).__qualname__!s} object: "
                                     f"{e}") from e
    return Serialized(header, [b.raw() for b in buffers])


def deserialize(s: Serialized) -> Any:
    """Inverse of ``serialize``."""
    return pickle.loads(s.header, buffers=s.buffers)
