"""Task functions that hold a worker thread until the test lets it go.

Registered with cloudpickle by ``conftest``, so they travel by value like the
test modules' own functions.
"""

import os
import time


def wait_for_file(x, path):
    """Return ``x`` once ``path`` exists (bounded: TimeoutError after 60 s)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    return x
