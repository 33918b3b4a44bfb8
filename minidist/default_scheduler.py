"""A ``Client`` as dask's default scheduler, without importing dask for it.

A Client becomes dask's default scheduler when it opens and hands the
place back when it closes, so a bare ``.compute()`` runs on the cluster.
Importing ``dask.config`` to say so costs about 0.2 s, which a session
that never touches dask should not pay.  So:

- dask already imported: the Client registers at once;
- not yet: the Client waits in a list, and a hook (``import_hooks``)
  registers every waiting, still-open Client (oldest first, so the newest
  ends up the default) right after ``dask.config`` has executed, whoever
  imports it.  The hook is dropped when it has fired or when no Client
  waits any longer.

On close, a Client that registered gives dask back the scheduler it found,
skipping Clients closed since; one that was still waiting just leaves the
list.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import TYPE_CHECKING

from .import_hooks import after_import, forget

if TYPE_CHECKING:
    from .executor import Client

_DASK_CONFIG = "dask.config"
_lock = threading.RLock()
_waiting: list[Client] = []
"""Clients opened before dask was imported, oldest first; they leave it when closed."""


def register_default_scheduler(client: Client) -> None:
    """Make ``client.get`` dask's default scheduler, now or once dask is imported."""
    with _lock:
        _waiting.append(client)
        if len(_waiting) == 1:  # registers at once when dask.config has been imported
            after_import(_DASK_CONFIG, _register_waiting)


def unregister_default_scheduler(client: Client) -> None:
    """Give dask back the scheduler it had before ``client`` (skipping closed clients)."""
    from .executor import Executor
    with _lock:
        if client in _waiting:
            _waiting.remove(client)
            if not _waiting:
                forget(_DASK_CONFIG, _register_waiting)
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


def _register_waiting(config: types.ModuleType) -> None:
    """Every waiting, still-open Client in turn (oldest first: the newest ends up the default)."""
    with _lock:
        for client in _waiting:
            client._previous_scheduler = config.get("scheduler", None)
            config.set(scheduler=client.get)
        _waiting.clear()
