"""The functions benchmark tasks run, importable by every worker process.

Workers of every system import this module by reference (the runner puts
the project root on ``PYTHONPATH``), so no system pays for shipping code.
"""

from __future__ import annotations

import os
import time
from typing import Any

_payloads: dict[str, Any] = {}


def noop(i: int) -> int:
    """Return the argument: the smallest possible task."""
    return i


def inc(i: int) -> int:
    """``i + 1``: a trivial task whose result can be checked."""
    return i + 1


def nbytes(obj: Any) -> int:
    """Size in bytes of a bytes-like object or numpy array."""
    return getattr(obj, "nbytes", None) or len(obj)


def make_bytes(i: int, size: int) -> bytes:
    """``size`` bytes, distinct for every ``i`` (so pure keys never collide)."""
    head = i.to_bytes(8, "little")
    return head + bytes(size - len(head))


def sleep_task(seconds: float, i: int) -> int:
    """Sleep ``seconds``; ``i`` only makes each call a distinct task."""
    time.sleep(seconds)
    return i


def wait_for_file(path: str, timeout: float) -> bool:
    """Block until ``path`` exists (or ``timeout`` passes, so nothing waits forever)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def after(blocker: Any, i: int) -> int:
    """A task that only depends on ``blocker``."""
    return i


def make_payload(kind: str, size: int) -> Any:
    """A ``size``-byte payload: a float64 numpy array or a bytes object."""
    if kind == "numpy":
        import numpy as np
        return np.arange(size // 8, dtype="float64")
    return bytes(range(256)) * (size // 256)


def init_payloads(size: int) -> None:
    """Pool initializer: build both payloads in this worker process, once."""
    for kind in ("numpy", "bytes"):
        _payloads[kind] = make_payload(kind, size)


def get_payload(kind: str) -> Any:
    """Return this worker's payload built by ``init_payloads``."""
    return _payloads[kind]


def make_array(i: int, nbytes: int) -> Any:
    """A numpy array of ``nbytes`` filled with ``i`` (numpy imported on first use)."""
    import numpy as np
    return np.full(nbytes // 8, float(i))


def first_and_sum(x: Any) -> tuple[float, float]:
    """``(x[0], x.sum())`` of a numpy array: reads every byte of it."""
    return float(x[0]), float(x.sum())
