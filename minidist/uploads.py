"""Files a client ships to every worker (``Client.upload_file``), and where workers put them.

::

  client --upload_file(name, content)--> center: keeps {name: content}, answers its workers
         --upload_file(name, content)--> each of those workers: install
  a worker that (re)registers later --uploads--> center: installs every file it does not have

Installing writes ``name`` into the worker's ``uploads`` directory (0700,
inside its local directory), puts the directory (a ``.py``) or the archive
itself (a ``.zip`` or ``.egg``) on ``sys.path``, imports a ``.py`` (its
errors go back to the uploader) and reloads modules already imported from
what it replaced, so the newest upload wins.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import threading
import zipimport

SUFFIXES = (".py", ".zip", ".egg")

_lock = threading.Lock()


def check_name(name: str) -> str:
    """``name`` if it is a plain file name with an allowed suffix; ``ValueError`` otherwise."""
    if not isinstance(name, str) or os.path.basename(name) != name or name.startswith(".") \
            or "\0" in name or not name.endswith(SUFFIXES):
        raise ValueError(f"cannot upload {name!r}: a .py, .zip or .egg file name is needed")
    return name


def install(directory: str, name: str, content: bytes, installed: dict[str, str]) -> bool:
    """Write and import ``name`` into ``directory`` unless this content is there already.

    ``installed`` maps names to the digest of what was installed (the
    worker's record).  Returns whether anything changed.
    """
    check_name(name)
    digest = hashlib.blake2b(content, digest_size=16).hexdigest()
    with _lock:
        if installed.get(name) == digest:
            return False
        os.makedirs(directory, mode=0o700, exist_ok=True)
        path = os.path.join(directory, name)
        temporary = f"{path}.{os.getpid()}.{digest}.part"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(temporary, path)
        entry = directory if name.endswith(".py") else path
        if entry not in sys.path:
            sys.path.insert(0, entry)
        zipimport._zip_directory_cache.pop(path, None)  # type: ignore[attr-defined]
        importlib.invalidate_caches()
        _reload_from(entry, name)
        installed[name] = digest
    return True


def _reload_from(entry: str, name: str) -> None:
    """Import a ``.py`` now (its errors go to the uploader), reload what was replaced."""
    if name.endswith(".py"):
        module = sys.modules.get(name[:-3])
        if module is not None:
            importlib.reload(module)
        else:
            importlib.import_module(name[:-3])
        return
    for module in [m for m in list(sys.modules.values())
                   if (getattr(m, "__file__", None) or "").startswith(entry + os.sep)]:
        importlib.reload(module)
