"""What the center remembers of the recent past: task runs and cluster events.

Workers send each run's ``(start, stop, thread)`` with ``task_finished`` and
``task_erred``; the scheduler thread appends one small tuple per run here
(``ran``) and one line per event that matters to someone watching
(``event``: a worker joined, left or was removed, a task erred).  Both
are bounded rings, so memory does not grow with the number of tasks.

Readers never touch the rings from another thread: they ask through the
center's query path (which runs on the scheduler thread) for what was
recorded since a *mark*, the count of runs recorded when they last asked
(``runs_since``).  That is how the dashboard draws its task stream and how
``Client.get_task_stream()`` collects the runs of a block of code.
"""

from __future__ import annotations

import time
from collections import deque
from itertools import islice
from typing import Any

RUNS_KEPT = 100_000
"""Task runs the center keeps (about 100 bytes each); older ones are dropped."""
EVENTS_KEPT = 500


class History:
    """Bounded rings of task runs ``(key, worker, (start, stop, thread), erred)`` and events.

    ``nruns`` and ``nerred`` count every run ever recorded (the Prometheus
    counters); ``nruns`` is also the mark of the next run.
    """

    def __init__(self, runs_kept: int = RUNS_KEPT, events_kept: int = EVENTS_KEPT) -> None:
        self.runs: deque[tuple] = deque(maxlen=runs_kept)
        self.events: deque[tuple[float, str, str]] = deque(maxlen=events_kept)
        self.nruns = 0
        self.nerred = 0
        self.nevents = 0
        self.started = time.time()

    def ran(self, key: Any, worker: str, run: tuple, erred: bool = False) -> None:
        """Record one run of ``key`` on ``worker``: ``run`` is ``(start, stop, thread)``."""
        self.runs.append((key, worker, run, erred))
        self.nruns += 1
        if erred:
            self.nerred += 1

    def event(self, kind: str, text: str) -> None:
        """Record one event (``worker-added``, ``worker-removed``, ``task-erred``, ...)."""
        self.events.append((time.time(), kind, text))
        self.nevents += 1

    def runs_since(self, mark: int = 0, limit: int | None = None) -> dict:
        """Runs recorded at or after ``mark`` (at most the last ``limit``), and the next mark.

        ``dropped`` says how many runs since ``mark`` the ring no longer has.
        """
        runs = self.runs
        first = self.nruns - len(runs)  # mark of the oldest run still kept
        wanted = self.nruns - max(mark, first)
        if limit is not None:
            wanted = min(wanted, limit)
        wanted = max(0, wanted)
        records = list(islice(reversed(runs), wanted))
        records.reverse()
        return {"mark": self.nruns, "dropped": max(0, self.nruns - mark - wanted),
                "runs": records}

    def events_since(self, mark: int = 0) -> tuple[int, list]:
        """Events recorded at or after ``mark`` (those the ring still has), and the next mark."""
        wanted = max(0, min(self.nevents - mark, len(self.events)))
        return self.nevents, list(islice(reversed(self.events), wanted))[::-1]
