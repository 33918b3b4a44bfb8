"""Run a function right after a module is imported, without importing it ourselves.

``import minidist`` must stay cheap, yet some libraries want to hear of
minidist as soon as they are loaded (dask's default scheduler, joblib's
backend registry).  So::

  after_import("joblib.parallel", fn)
      module imported already      --> fn(module) now
      not yet (or being imported   --> a finder on sys.meta_path wraps the loader the other
      through a loader we wrapped)     finders give that module; once the module has
                                       executed, fn(module) runs
  forget("joblib.parallel", fn)    --> fn no longer waits; the finder leaves sys.meta_path
                                       as soon as nothing waits for any module

A function that raises is logged, never breaks the user's import.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import TYPE_CHECKING, Any, cast
from collections.abc import Callable, Sequence

if TYPE_CHECKING:
    import importlib.abc
    import importlib.machinery

Hook = Callable[[types.ModuleType], None]

_lock = threading.RLock()
_waiting: dict[str, list[Hook]] = {}
_wrapped: set[str] = set()  # modules whose loader we wrapped and that have not finished yet


def after_import(name: str, fn: Hook) -> None:
    """Call ``fn(module)`` once the module ``name`` has been imported (now if it is)."""
    with _lock:
        module = sys.modules.get(name)
        if module is None or name in _wrapped:
            _waiting.setdefault(name, []).append(fn)
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            return
    _call(fn, module)


def forget(name: str, fn: Hook) -> None:
    """``fn`` no longer waits for ``name`` (nothing if it was not waiting)."""
    with _lock:
        hooks = _waiting.get(name, [])
        if fn in hooks:
            hooks.remove(fn)
        if not hooks:
            _waiting.pop(name, None)
        if not _waiting and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)


def waiting(name: str) -> bool:
    """Whether anything waits for the import of ``name``."""
    return bool(_waiting.get(name))


def _call(fn: Hook, module: types.ModuleType) -> None:
    try:
        fn(module)
    except Exception:
        import logging  # not at import: ``import minidist`` stays cheap
        logging.getLogger("minidist.import_hooks").exception(
            "hook for the import of %s failed", module.__name__)


def _fire(module: types.ModuleType) -> None:
    with _lock:
        _wrapped.discard(module.__name__)
        hooks = _waiting.pop(module.__name__, [])
        if not _waiting and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
    for fn in hooks:
        _call(fn, module)


class _ThenCall:
    """The module's own loader, followed by the hooks waiting for it."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        try:
            self.loader.exec_module(module)
        except BaseException:
            with _lock:
                _wrapped.discard(module.__name__)
            raise
        spec = module.__spec__
        assert spec is not None  # the import system executes a module from its spec
        module.__loader__ = spec.loader = self.loader
        _fire(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _OnImport:
    """Finds nothing itself; wraps the loader of a module that hooks wait for."""

    def find_spec(self, name: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name not in _waiting:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    # A loader by its methods, not a subclass: every other attribute
                    # is the wrapped loader's own.
                    spec.loader = cast("importlib.abc.Loader", _ThenCall(spec.loader))
                    with _lock:
                        _wrapped.add(name)
                return spec
        return None


_finder = _OnImport()
