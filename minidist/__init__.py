"""minidist: a small distributed task runtime on the standard library.

Start a center and workers (``dcenter``, ``dworker HOST:PORT``), or let
``Executor()`` start a LocalCluster, then use the ``concurrent.futures``
API you already know::

    from minidist import Executor
    with Executor("127.0.0.1:8787") as e:
        print(list(e.map(pow, range(5), range(5))))
"""

from typing import TYPE_CHECKING, Any

# Public names load on first use (PEP 562), so ``python -m minidist.worker``
# starts without importing the client side, and ``import minidist`` stays cheap.
_EXPORTS = {
    "AuthenticationError": "wire", "Client": "executor", "Executor": "executor",
    "Future": "executor", "InitializerError": "task", "KeyConflictError": "task",
    "KilledWorker": "task", "LocalCluster": "cluster", "LostKeyError": "task",
    "NoWorkerError": "task", "Pool": "pool", "RemoteData": "pool", "RemoteException": "task",
    "SerializationError": "wire", "get": "dask_get", "performance_report": "diagnostics",
    "progress": "diagnostics", "sizeof": "memory",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .cluster import LocalCluster
    from .dask_get import get
    from .diagnostics import performance_report, progress
    from .memory import sizeof
    from .executor import Client, Executor, Future
    from .pool import Pool, RemoteData
    from .task import (InitializerError, KeyConflictError, KilledWorker, LostKeyError,
                       NoWorkerError, RemoteException)
    from .wire import AuthenticationError, SerializationError


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minidist' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


def _joblib_backend(**kwargs: Any) -> Any:
    from .joblib_backend import MinidistBackend
    return MinidistBackend(**kwargs)


def _register_joblib_backend(parallel: Any) -> None:
    """joblib's ``"minidist"`` backend, named as soon as joblib is loaded (built on first use)."""
    parallel.register_parallel_backend("minidist", _joblib_backend)


from .import_hooks import after_import  # noqa: E402  (after the lazy names above)

after_import("joblib.parallel", _register_joblib_backend)

__version__ = "0.1.0"
