"""A ``Client`` as dask's default scheduler, without importing dask for it.

A Client becomes dask's default scheduler when it opens and hands the
place back when it closes, so a bare ``.compute()`` runs on the cluster.
Importing ``dask.config`` to say so costs about 0.2 s, which a session
that never touches dask should not pay.  So:

- dask already imported: the Client registers at once;
- not yet: the Client waits in a list, and a finder on ``sys.meta_path``
  registers every waiting, still-open Client (oldest first, so the newest
  ends up the default) right after ``dask.config`` has executed, whoever
  imports it.  The finder leaves ``sys.meta_path`` when it has fired or when
  no Client waits any longer.

On close, a Client that registered gives dask back the scheduler it found,
skipping Clients closed since; one that was still waiting just leaves the
list.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import types
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .executor import Executor

_DASK_CONFIG = "dask.config"
_lock = threading.RLock()
_waiting: list[Executor] = []
"""Clients opened before dask was imported, oldest first; they leave it when closed."""
_state = {"wrapped": False, "fired": False}
"""Whether the finder has wrapped ``dask.config``'s loader, and whether that has run."""


def register_default_scheduler(client: Executor) -> None:
    """Make ``client.get`` dask's default scheduler, now or once dask is imported."""
    with _lock:
        loaded = _DASK_CONFIG in sys.modules  # also while it executes: then wait for it
        if loaded and (_state["fired"] or not _state["wrapped"]):
            _register(client)
            return
        _waiting.append(client)
        if not loaded and _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def unregister_default_scheduler(client: Executor) -> None:
    """Give dask back the scheduler it had before ``client`` (skipping closed clients)."""
    from .executor import Executor
    with _lock:
        if client in _waiting:
            _waiting.remove(client)
            if not _waiting and _finder in sys.meta_path:
                sys.meta_path.remove(_finder)
            return
        config = sys.modules.get(_DASK_CONFIG)
        if config is None or config.get("scheduler", None) != client.get:
            return  # never registered, or another scheduler was set since: leave it
        previous = getattr(client, "_previous_scheduler", None)
        seen = set()
        while previous is not None and id(previous) not in seen:
            seen.add(id(previous))
            owner = getattr(previous, "__self__", None)
            if not (isinstance(owner, Executor) and owner._shutdown):
                break
            previous = getattr(owner, "_previous_scheduler", None)
        config.set(scheduler=previous)


def _register(client: Executor) -> None:
    config = sys.modules[_DASK_CONFIG]
    client._previous_scheduler = config.get("scheduler", None)
    config.set(scheduler=client.get)


def _register_waiting() -> None:
    with _lock:
        _state["fired"] = True
        if _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        for client in _waiting:
            _register(client)
        _waiting.clear()


class _ThenRegister(importlib.abc.Loader):
    """``dask.config``'s own loader, followed by the waiting registrations."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader
        _register_waiting()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _OnDaskImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader the other finders give ``dask.config``."""

    def find_spec(self, name: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name != _DASK_CONFIG:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRegister(spec.loader)
                    with _lock:
                        _state["wrapped"] = True
                return spec
        return None


_finder = _OnDaskImport()
