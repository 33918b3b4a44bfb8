"""The scheduler: the center's state machine, with no I/O.

``Scheduler`` owns every table the center keeps and makes every decision:
which worker runs a task, when a task is ready, what a worker's death
costs, when data can be deleted.  It reads no socket and no clock and
starts no thread: the center (``center.py``) feeds it events with the
current time, and each event returns the messages to send, per stream::

  center.py (streams, batching, heartbeat timing)          scheduler.py
  ---------------------------------------------------      ------------------------------
  worker registered             -> worker_added(now, stream, address, ...)
  batch read from a worker      -> worker_msgs(now, stream, address, batch)
                                     task_finished, task_erred, missing_data, lost_data,
                                     data_erred, steal_response, add_keys, heartbeat,
                                     memory, unregister
  worker stream closed/silent   -> worker_removed(now, address, reason, stream)
  client registered / left      -> client_added / client_removed(now, stream, client_id)
  batch read from a client      -> client_msgs(now, stream, client_id, batch)
                                     update_graph, release, scatter, locate
  the clock reached next_timer  -> tick(now)   (stalled prefetch, no-workers timeout)
                                <- {stream: [msg, ...]}  (``None`` in a list: close it)

A *stream* is whatever token the caller registered a worker or client
with; the scheduler only compares and returns it.  The center passes its
``BatchedSender``; the simulator (``sim.py``) passes simulated streams and
drives this very code on virtual time.

Tables: ``tasks`` (key -> TaskState), ``workers`` (address -> WorkerState,
each with ``processing`` and ``has_what``), ``clients`` (id -> ClientState,
each with the keys it wants).  ``who_has`` is ``TaskState.who_has``.

A task's state changes only through ``_transition``, checked against the
table ``TRANSITIONS`` (a forbidden change raises ``InvalidTransition`` under
the simulator and in the tests' centers, and is logged elsewhere), and
``validate()`` checks that every table agrees with every other: the
simulator calls it after every event.

Life of one task, ``e.submit(inc, 1)``:

1. The client packs the call into a RunSpec under the key ``inc-<token>``
   and sends ``update_graph`` with ``wants=[key]`` on its stream.
2. The center reads the batch and hands it to ``client_msgs``, which
   creates the TaskState (or finds it: a pure key already known runs
   nothing new), adds the client to ``who_wants`` and activates it.
3. Activation walks dependencies: a task waits until every input is in
   memory, then is *ready*.  A ready task goes to the worker where the
   fewest input bytes must move (ties: the least busy), if that worker has
   a free slot (``nthreads`` plus a prefetch worth a few milliseconds of
   work); otherwise it waits at the center, in that worker's pending queue
   or, with no inputs, in the global queue.  A worker paused for memory has
   no free slot and is chosen only if every candidate is paused.  Workers
   take from these queues as slots free up, and an idle worker steals from
   a pending queue longer than its owner's capacity (any pending queue of a
   paused worker), so a worker that joins mid-job gets work at
   once while work on data still runs where the data is.  None of this
   scans the workers: those with a free slot are in a heap by occupancy,
   those with a backlog or prefetched tasks in tables of their own, so a
   decision costs the same with 2 workers or 1,000.
4. The worker runs it and sends ``task_finished``; the task goes to
   ``memory``, the client gets a ``memory`` event naming the holders and
   fetches the bytes from the worker itself when asked.  A result whose
   pickle is at most ``worker.INLINE_BYTES`` rides with ``task_finished``
   and ``memory`` instead (unopened, never stored here), which saves the
   client a round trip to the worker.  Dependents whose
   last input arrived become ready; inputs nobody waits on any more are
   deleted from the workers (their TaskState stays as lineage while a
   dependent needs it for a possible recompute).
5. When no client wants the key and no task waits on it, the scheduler
   tells the workers to delete it and forgets it.

Failures: a removed worker (its stream closed, it missed heartbeats, it
left) has its tasks rescheduled (after ``allowed_failures`` such deaths a
task errs with ``KilledWorker``), and keys whose only copy died are
recomputed from their RunSpec if still needed, or marked ``lost`` when
they have none.  Clients and workers hear ``worker_left`` and drop their
connections to it, so a request waiting on a worker that hangs (rather
than dies) fails at once instead of forever.  With ``no_workers_timeout``
set, a task that no worker could run for that long (there are no workers,
or none matching its ``workers=``) errs with ``NoWorkerError``.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections import deque
from types import MappingProxyType
from typing import Any
from collections.abc import Callable, Iterable, Mapping, Sequence

from .history import History
from .serialize import Serialized, serialize
from .task import KeyConflictError, KilledWorker, LostKeyError, NoWorkerError, RunSpec, key_name

logger = logging.getLogger("minidist.center")

# Task states
RELEASED, WAITING, QUEUED, PROCESSING, MEMORY, ERRED, LOST, NO_WORKER = (
    "released", "waiting", "queued", "processing", "memory", "erred", "lost", "no-worker")
SCHEDULED = (QUEUED, PROCESSING, NO_WORKER)
STATES = frozenset({RELEASED, WAITING, QUEUED, PROCESSING, MEMORY, ERRED, LOST, NO_WORKER})

TRANSITIONS: dict[str, frozenset[str]] = {
    RELEASED: frozenset({RELEASED, WAITING, QUEUED, PROCESSING, NO_WORKER, MEMORY, ERRED, LOST}),
    WAITING: frozenset({QUEUED, PROCESSING, NO_WORKER, RELEASED}),
    QUEUED: frozenset({QUEUED, PROCESSING, RELEASED}),
    PROCESSING: frozenset({PROCESSING, MEMORY, RELEASED}),
    NO_WORKER: frozenset({QUEUED, PROCESSING, RELEASED}),
    MEMORY: frozenset({RELEASED, ERRED}),
    ERRED: frozenset({ERRED, RELEASED, MEMORY}),
    LOST: frozenset({LOST, RELEASED, MEMORY, ERRED}),
}
"""The state changes a task may make: ``TRANSITIONS[old]`` holds the allowed new states.

Every change goes through ``_transition``.  A task leaves the scheduled
states (waiting, queued, processing, no-worker) for memory or an error only
through ``released`` (``_unschedule``), except a task whose own worker
reports it finished (processing -> memory); ``processing -> processing`` is a
steal, ``queued -> queued`` a move between queues.
"""


class InvalidTransition(AssertionError):
    """A task was asked to change state in a way ``TRANSITIONS`` does not allow."""


class InvariantError(AssertionError):
    """``Scheduler.validate`` found tables that disagree."""


STRICT = bool(os.environ.get("MINIDIST_STRICT_TRANSITIONS"))
"""Raise ``InvalidTransition`` on a forbidden change (the simulator, and the centers the
tests start); else log it once per kind of change and go on."""

_reported: set[tuple[str, str]] = set()


def _transition(ts: TaskState, new: str) -> None:
    """Move ``ts`` to state ``new``, checked against ``TRANSITIONS``."""
    old = ts.state
    if new not in TRANSITIONS[old]:
        if STRICT:
            raise InvalidTransition(f"{ts!r}: {old} -> {new} is not allowed")
        if (old, new) not in _reported:
            _reported.add((old, new))
            logger.error("task %s went %s -> %s, which is not an allowed transition",
                         key_name(ts.key), old, new)
    ts.state = new

STEAL_BYTES = 1 << 20
"""An idle worker may take a task from another's long backlog if its inputs are this small."""

PREFETCH_SECONDS = 0.005
"""Queue about this much work on a worker beyond its running tasks (at least 1, at most
``MAX_PREFETCH`` tasks a thread): enough to hide a round trip, small enough that the
rest waits at the center where any worker can take it."""
MAX_PREFETCH = 64
STALL_SECONDS = 0.02
"""A worker that has finished nothing for this long (or three of its mean task times, if
more) while tasks wait in its prefetch is stalled: idle workers take those tasks back."""

Outgoing = dict
"""What an event returns: stream -> messages to write on it, in order (``None``: close it)."""


class TaskState:
    """One key as the scheduler knows it.  Collections are created only when needed.

    Collections that are iterated are dicts used as insertion-ordered sets,
    so that the same events always give the same decisions (the simulator
    replays a run from its seed).
    """

    __slots__ = ("key", "state", "spec", "deps", "dependents", "waiting_on", "waiters",
                 "who_wants", "who_has", "worker", "nbytes", "exc", "tb", "suspicious",
                 "retries", "restrictions", "warnings", "__weakref__")

    def __init__(self, key: Any, spec: RunSpec | None) -> None:
        self.key = key
        self.state = RELEASED
        self.spec = spec
        self.deps: tuple[TaskState, ...] = ()
        self.dependents: dict[TaskState, None] | None = None  # all known dependents (lineage)
        self.waiting_on: set[TaskState] | None = None         # inputs not yet in memory
        self.waiters: dict[TaskState, None] | None = None     # dependents that still need me
        self.who_wants: Mapping[str, None] | None = None      # client ids (see _want)
        self.who_has: dict[WorkerState, None] | None = None
        self.worker: WorkerState | None = None          # processing on / queued for
        self.nbytes = 0
        self.exc: Serialized | None = None
        self.tb: str | None = None
        self.suspicious = 0
        self.retries = 0
        self.restrictions: frozenset | None = None
        # Warnings its run raised (and those of inputs nobody wanted), for its clients.
        self.warnings: list | None = None

    def needed(self) -> bool:
        return bool(self.who_wants or self.waiters)

    def __repr__(self) -> str:
        return f"<TaskState {key_name(self.key)} {self.state}>"


class WorkerState:
    """A registered worker: its stream, capacity and what it holds and runs."""

    __slots__ = ("address", "name", "nthreads", "stream", "processing", "pending",
                 "has_what", "nbytes", "last_seen", "pid", "capacity", "min_prefetch",
                 "duration", "last_progress", "free_entry", "paused", "managed", "spilled",
                 "unmanaged", "memory_limit", "spill_error")

    def __init__(self, address: str, name: str, nthreads: int, stream: Any,
                 pid: int | None, prefetch: int, now: float) -> None:
        self.address = address
        self.name = name
        self.nthreads = nthreads
        self.min_prefetch = prefetch
        self.capacity = nthreads + prefetch
        self.duration = 0.0  # moving average of task run time, seconds
        self.last_progress = now  # last finish, or when it last became busy
        self.stream = stream
        self.processing: dict[TaskState, None] = {}  # ordered: first ones are running
        self.pending: deque[TaskState] = deque()     # ready, prefer this worker, no slot yet
        self.has_what: dict[TaskState, None] = {}
        self.nbytes = 0
        self.last_seen = now
        self.pid = pid
        self.free_entry: tuple | None = None  # its newest entry in the scheduler's free heap
        # What the worker last said of its memory (its "memory" message); paused: no new tasks.
        self.paused = False
        self.managed = self.spilled = self.unmanaged = 0
        self.memory_limit: int | None = None
        self.spill_error: str | None = None

    def has_slot(self) -> bool:
        return len(self.processing) < self.capacity and not self.paused

    def backlogged(self) -> bool:
        """Whether an idle worker may steal from its pending queue (any, once paused)."""
        return len(self.pending) > (0 if self.paused else self.capacity)

    def stalled_since(self) -> float | None:
        """When this worker counts as stalled with prefetched tasks, or None if it has none."""
        if len(self.processing) <= self.nthreads:
            return None
        return self.last_progress + max(STALL_SECONDS, 3 * self.duration)

    def observe(self, duration: float) -> None:
        """Update the task-duration average and the prefetch depth it implies."""
        self.duration = duration if not self.duration else 0.8 * self.duration + 0.2 * duration
        per_thread = int(PREFETCH_SECONDS / max(self.duration, 1e-5))
        prefetch = max(self.min_prefetch, min(MAX_PREFETCH, per_thread) * self.nthreads)
        self.capacity = self.nthreads + prefetch

    def occupancy(self) -> float:
        return len(self.processing) / self.nthreads

    def matches(self, restrictions: frozenset) -> bool:
        host = self.address.rpartition(":")[0]
        return self.address in restrictions or self.name in restrictions or host in restrictions

    def __repr__(self) -> str:
        return f"<WorkerState {self.address} processing={len(self.processing)}>"


class ClientState:
    """A connected client: its stream and the keys it holds futures for."""

    __slots__ = ("id", "stream", "wants", "refused", "alone")

    def __init__(self, client_id: str, stream: Any) -> None:
        self.id = client_id
        self.stream = stream
        self.alone = MappingProxyType({client_id: None})  # who_wants when only it does
        self.wants: dict[TaskState, None] = {}
        self.refused: set = set()  # keys refused as conflicts, until the client releases them


def _same_spec(a: RunSpec, b: RunSpec) -> bool:
    """Whether two packed tasks are the same computation (function, arguments, initializer)."""
    if a is b:
        return True
    init_a, init_b = a.init, b.init
    if (init_a is None) != (init_b is None) or (init_a is not None and init_b is not None and
                                                 init_a.token != init_b.token):
        return False
    return _same_bytes(a.func, b.func) and _same_bytes(a.args, b.args)


def _same_bytes(a: Serialized, b: Serialized) -> bool:
    if a is b:
        return True
    if len(a.buffers) != len(b.buffers) or memoryview(a.header) != memoryview(b.header):
        return False
    return all(memoryview(x).cast("B") == memoryview(y).cast("B")
               for x, y in zip(a.buffers, b.buffers, strict=False))


def _add(ts: TaskState, attr: str, item: Any) -> None:
    s = getattr(ts, attr)
    if s is None:
        setattr(ts, attr, {item: None})
    else:
        s[item] = None


def _discard(ts: TaskState, attr: str, item: Any) -> None:
    s = getattr(ts, attr)
    if s:
        s.pop(item, None)


def _want(ts: TaskState, cs: ClientState) -> None:
    """Add ``cs`` to ``ts.who_wants``.

    A key wanted by one client (nearly every key) shares that client's
    read-only ``alone`` mapping instead of a dict of its own, which would
    cost about 200 bytes per task; a second client makes it a dict.
    """
    wants = ts.who_wants
    if wants is None:
        ts.who_wants = cs.alone
    elif type(wants) is dict:
        wants[cs.id] = None
    elif cs.id not in wants:
        ts.who_wants = {**wants, cs.id: None}


def _unwant(ts: TaskState, client_id: str) -> None:
    """Remove a client from ``ts.who_wants`` (see ``_want``)."""
    wants = ts.who_wants
    if not wants:
        return
    if type(wants) is dict:
        wants.pop(client_id, None)
    elif client_id in wants:
        ts.who_wants = None


class Scheduler:
    """Every table of the center and every transition, driven by events (see the module doc).

    Each public event method takes ``now`` (seconds on any monotonic clock)
    and returns the messages it produced, as ``{stream: [msg, ...]}``.
    """

    def __init__(self, *, allowed_failures: int = 3, prefetch: int = 1,
                 no_workers_timeout: float | None = None, address: str = "",
                 id: str = "", history: History | None = None) -> None:
        self.allowed_failures = allowed_failures
        self.history = history  # where task runs and events are recorded, if anywhere
        self.prefetch = prefetch
        self.no_workers_timeout = no_workers_timeout
        self.address = address  # the center's, told to workers and clients on registration
        self.id = id  # this center's incarnation, so a worker can tell it reconnects to it
        self.now = 0.0
        self.tasks: dict[Any, TaskState] = {}
        self.workers: dict[str, WorkerState] = {}
        self.clients: dict[str, ClientState] = {}
        self.queued: deque[TaskState] = deque()  # ready, no input, waiting for any slot
        self.no_worker: dict[TaskState, float] = {}  # restricted to absent workers -> since
        self._starved: dict[TaskState, float] = {}  # queued while no worker exists -> since
        self._dirty: dict[WorkerState, None] = {}  # workers whose free slots need filling
        self._out: Outgoing = {}                 # messages of the event being handled
        self._merged: dict[Any, dict] = {}      # stream -> its delete_data grown in _out
        self._stealing: dict[TaskState, WorkerState] = {}  # asked back from a stalled worker
        self._next_steal_check = float("inf")
        self._paused = 0  # workers paused for memory
        # Placement without a scan of every worker (the cost per task must not grow
        # with the cluster): candidates are kept where they can be found at once.
        self._free: list[tuple[float, int, WorkerState]] = []  # heap: (occupancy, n, ws)
        self._free_n = 0
        self._backlogged: dict[WorkerState, None] = {}  # pending queue may be stolen from
        self._prefetched: dict[WorkerState, None] = {}  # may run more than nthreads
        self._no_stall_before = 0.0  # no worker with prefetched tasks is stalled before this
        self._worker_ops: dict[str, Callable[..., None]] = {
            "task_finished": self._on_task_finished,
            "task_erred": self._on_task_erred,
            "missing_data": self._on_missing_data,
            "lost_data": self._on_lost_data,
            "data_erred": self._on_data_erred,
            "steal_response": self._on_steal_response,
            "add_keys": self._on_add_keys,
            "heartbeat": lambda ws: None,
            "memory": self._on_memory,
            "unregister": lambda ws: self._remove_worker(ws, "worker is leaving"),
        }
        self._client_ops: dict[str, Callable[..., None]] = {
            "update_graph": self._update_graph,
            "release": self._on_release,
            "scatter": self._on_scatter,
            "locate": self._on_locate,
        }

    # ------------------------------------------------------------------ events

    def worker_added(self, now: float, stream: Any, address: str, nthreads: int,
                     name: str | None = None, data: dict | None = None,
                     pid: int | None = None, center_id: str | None = None) -> Outgoing:
        """A worker registered on ``stream``, holding ``data`` (key -> nbytes).

        ``center_id`` is the ``id`` of the center it was registered with before,
        if any: keys it holds that this scheduler does not know are adopted
        only from a worker that comes from another center (this one restarted),
        and deleted when it is this center, which released them while the
        worker was away.
        """
        self.now = now
        self._add_worker(stream, address, nthreads, name or address, data or {}, pid,
                         adopt=center_id is None or center_id != self.id)
        return self._done()

    def worker_msgs(self, now: float, stream: Any, address: str, batch: list) -> Outgoing:
        """A batch of messages read from a worker's stream (a stale stream's are ignored)."""
        self.now = now
        ws = self.workers.get(address)
        if ws is not None and ws.stream is stream:
            ws.last_seen = now
            ops = self._worker_ops
            for msg in batch:
                try:
                    op = msg.pop("op", None)
                    ops[op](ws, **msg)
                except InvalidTransition:
                    raise  # only raised when STRICT: a bug of the scheduler, not of the sender
                except Exception:
                    logger.exception("bad message from worker %s: %.200r", address, msg)
                if self.workers.get(address) is not ws:
                    break
        return self._done()

    def worker_removed(self, now: float, address: str, reason: str,
                       stream: Any = None) -> Outgoing:
        """Forget a worker (only if still registered on ``stream``, when one is given)."""
        self.now = now
        ws = self.workers.get(address)
        if ws is not None and (stream is None or ws.stream is stream):
            self._remove_worker(ws, reason)
        return self._done()

    def client_added(self, now: float, stream: Any, client_id: str) -> Outgoing:
        """A client registered on ``stream``."""
        self.now = now
        self.clients[client_id] = ClientState(client_id, stream)
        self._post(stream, {"op": "registered", "center": self.address})
        return self._done()

    def client_removed(self, now: float, stream: Any, client_id: str) -> Outgoing:
        """A client's stream closed: it releases every key it held."""
        self.now = now
        cs = self.clients.get(client_id)
        if cs is not None and cs.stream is stream:
            del self.clients[client_id]
            self._out.setdefault(stream, []).append(None)
            for ts in cs.wants:
                _unwant(ts, client_id)
                self._release_if_unneeded(ts)
            logger.info("client %s left; released %d keys", client_id[:8], len(cs.wants))
        return self._done()

    def client_msgs(self, now: float, stream: Any, client_id: str, batch: list) -> Outgoing:
        """A batch of messages read from a client's stream."""
        self.now = now
        cs = self.clients.get(client_id)
        if cs is not None and cs.stream is stream:
            ops = self._client_ops
            for msg in batch:
                try:
                    op = msg.pop("op", None)
                    ops[op](cs, **msg)
                except InvalidTransition:
                    raise  # only raised when STRICT: a bug of the scheduler, not of the sender
                except Exception:
                    logger.exception("bad message from client %s: %.200r", client_id[:8], msg)
        return self._done()

    def tick(self, now: float) -> Outgoing:
        """Time passed: take back stalled prefetch, err tasks no worker could run in time."""
        self.now = now
        if now >= self._next_steal_check:
            self._next_steal_check = float("inf")
            for ws in list(self.workers.values()):
                if len(ws.processing) < ws.nthreads:
                    self._take_back_for(ws)
        if self.no_workers_timeout is not None:
            self._check_unrunnable(now)
        return self._done()

    @property
    def next_timer(self) -> float:
        """When ``tick`` next has something to do (``inf``: only after another event)."""
        when = self._next_steal_check
        timeout = self.no_workers_timeout
        if timeout is not None:
            for table in (self.no_worker, self._starved):
                if table:
                    when = min(when, next(iter(table.values())) + timeout)
        return when

    def _done(self) -> Outgoing:
        if self._dirty:
            self._fill_dirty()
        out, self._out = self._out, {}
        self._merged.clear()
        return out

    def _post(self, stream: Any, msg: dict) -> None:
        out = self._out.get(stream)
        if out is None:
            self._out[stream] = [msg]
        elif msg["op"] == "delete_data" and out[-1] is not None and \
                out[-1]["op"] == "delete_data":
            # Releasing many keys deletes them from a worker in one message, not one each
            # (consecutive ones only: the order of a stream's messages is kept).
            merged = self._merged.get(stream)
            if merged is not out[-1]:  # the message may be shared with other streams: copy
                merged = out[-1] = self._merged[stream] = {"op": "delete_data",
                                                           "keys": list(out[-1]["keys"])}
            merged["keys"].extend(msg["keys"])
        else:
            out.append(msg)

    # ------------------------------------------------------------------ workers

    def _add_worker(self, stream: Any, address: str, nthreads: int, name: str, data: dict,
                    pid: int | None, adopt: bool) -> None:
        old = self.workers.get(address)
        if old is not None:
            self._remove_worker(old, "it registered again")
        ws = WorkerState(address, name, max(1, int(nthreads)), stream, pid, self.prefetch,
                         self.now)
        self.workers[address] = ws
        self._starved.clear()
        self._post(stream, {"op": "registered", "center": self.address, "id": self.id})
        logger.info("worker %s registered (%d threads, %d keys held)", address, ws.nthreads,
                    len(data))
        if self.history is not None:
            self.history.event("worker-added", f"worker {address} ({name}) joined with "
                               f"{ws.nthreads} thread{'s' if ws.nthreads != 1 else ''}")
        if data:
            self._on_add_keys(ws, data, from_registration=True, adopt=adopt)
        for ts in list(self.no_worker):
            assert ts.restrictions is not None  # only a restricted task waits for a worker
            if ws.matches(ts.restrictions):
                del self.no_worker[ts]
                _transition(ts, RELEASED)
                self._activate([ts])
        self._dirty[ws] = None

    def _remove_worker(self, ws: WorkerState, reason: str) -> None:
        """Forget a worker: reschedule what it ran, recompute or lose what only it held."""
        if self.workers.get(ws.address) is not ws:
            return
        log = logger.info if reason == "worker is leaving" else logger.warning
        log("removing worker %s: %s", ws.address, reason)
        if self.history is not None:
            self.history.event(
                "worker-left" if reason == "worker is leaving" else "worker-removed",
                f"worker {ws.address} ({ws.name}) removed: {reason}")
        del self.workers[ws.address]
        self._dirty.pop(ws, None)
        if ws.paused:
            self._paused -= 1
        self._stealing = {ts: thief for ts, thief in self._stealing.items()
                          if thief is not ws and ts.worker is not ws}
        self._out.setdefault(ws.stream, []).append(None)
        # Whoever waits on a reply from it (it may be hung, not dead) stops waiting.
        left = {"op": "worker_left", "address": ws.address}
        others: tuple[WorkerState | ClientState, ...] = (*self.workers.values(),
                                                         *self.clients.values())
        for other in others:
            self._post(other.stream, left)
        if not self.workers and self.no_workers_timeout is not None:
            for ts in self.queued:
                if ts.state == QUEUED and ts.worker is None:
                    self._starved.setdefault(ts, self.now)
        restart: list[TaskState] = []
        died = reason != "worker is leaving"
        for ts in ws.has_what:
            if not self._holder_gone(ts, ws, f"with worker {ws.address} ({reason})"):
                continue
            if died:
                # A value whose holders keep dying (one that kills its worker when it is
                # pickled for a fetch, say) counts like a task whose workers keep dying.
                ts.suspicious += 1
                if ts.suspicious >= self.allowed_failures:
                    self._killed(ts, ws)
                    continue
            self._restart(ts, restart)
        ws.has_what = {}
        for i, ts in enumerate(list(ws.processing)):
            ts.worker = None
            _transition(ts, RELEASED)
            if i < ws.nthreads:  # the first nthreads were running, the rest prefetched
                ts.suspicious += 1
                if ts.suspicious >= self.allowed_failures:
                    self._killed(ts, ws)
                    continue
            restart.append(ts)
        ws.processing.clear()
        for ts in ws.pending:
            if ts.state == QUEUED and ts.worker is ws:
                ts.worker = None
                _transition(ts, RELEASED)
                restart.append(ts)
        ws.pending.clear()
        self._activate(restart)
        self._dirty.update(dict.fromkeys(self.workers.values()))

    # ------------------------------------------------------------------ worker messages

    def _on_task_finished(self, ws: WorkerState, key: Any, nbytes: int = 0,
                          duration: float = 0.0, value: Serialized | None = None,
                          run: tuple | None = None, warnings: list | None = None) -> None:
        if run is not None and self.history is not None:
            self.history.ran(key, ws.address, run)
        ws.observe(duration)
        ws.last_progress = self.now
        self._dirty[ws] = None  # its capacity may have grown
        since = ws.stalled_since()
        if since is not None and since < self._no_stall_before:
            self._no_stall_before = since
        if ws.backlogged():  # its capacity shrank
            self._backlogged[ws] = None
        ts = self.tasks.get(key)
        if ts is None or ts.state in (RELEASED, ERRED, LOST):
            self._post(ws.stream, {"op": "delete_data", "keys": [key]})
            return
        if ts.state == MEMORY:
            self._add_holder(ts, ws)
            return
        if ts.state in SCHEDULED or ts.state == WAITING:
            if ts.worker is not ws or ts.state != PROCESSING:
                self._unschedule(ts)  # a result for a task moved elsewhere is still valid
            else:
                del ws.processing[ts]
                ts.worker = None
                self._dirty[ws] = None
        ts.nbytes = nbytes
        if warnings:
            ts.warnings = (ts.warnings or []) + warnings
        self._to_memory(ts, ws, value)

    def _to_memory(self, ts: TaskState, ws: WorkerState, value: Serialized | None = None) -> None:
        """``ts`` is held by ``ws``; tell its clients (a small ``value`` is passed on unopened)."""
        _transition(ts, MEMORY)
        ts.waiting_on = None
        self._add_holder(ts, ws)
        ready = []
        for waiter in ts.waiters or ():
            if waiter.state == WAITING and waiter.waiting_on and ts in waiter.waiting_on:
                waiter.waiting_on.discard(ts)
                if not waiter.waiting_on:
                    ready.append(waiter)
        if ts.who_wants:
            assert ts.who_has is not None  # just added a holder
            msg = {"op": "memory", "key": ts.key, "who_has": [w.address for w in ts.who_has]}
            if value is not None:
                msg["value"] = value
            if ts.warnings:
                msg["warnings"] = ts.warnings
            for cid in ts.who_wants:
                self._post(self.clients[cid].stream, msg)
        elif ts.warnings:  # an input nobody wants: its warnings travel with its dependents
            for waiter in ts.waiters or ():
                waiter.warnings = (waiter.warnings or []) + ts.warnings
        for waiter in ready:
            self._ready(waiter)
        for dep in ts.deps:
            _discard(dep, "waiters", ts)
            self._release_if_unneeded(dep)
        if not (ts.who_wants or ts.waiters):
            self._release_if_unneeded(ts)

    def _add_holder(self, ts: TaskState, ws: WorkerState) -> None:
        if ts.who_has is None:
            ts.who_has = {ws: None}
        else:
            ts.who_has[ws] = None
        if ts not in ws.has_what:
            ws.has_what[ts] = None
            ws.nbytes += ts.nbytes

    def _on_task_erred(self, ws: WorkerState, key: Any, exception: Serialized,
                       traceback: str, run: tuple | None = None,
                       warnings: list | None = None) -> None:
        if run is not None and self.history is not None:
            self.history.ran(key, ws.address, run, erred=True)
            self.history.event("task-erred", f"task {key_name(key)} erred on {ws.address}: "
                                             f"{_last_line(traceback)}")
        ts = self.tasks.get(key)
        if ts is None or ts.state not in (PROCESSING, QUEUED, WAITING, NO_WORKER):
            return
        if ts.state == PROCESSING and ts.worker is ws:
            del ws.processing[ts]
            ts.worker = None
            self._dirty[ws] = None
        else:
            self._unschedule(ts)
        if ts.retries > 0:
            ts.retries -= 1
            logger.info("task %s failed, retrying (%d retries left)", key_name(key), ts.retries)
            _transition(ts, RELEASED)
            self._activate([ts])
            return
        if warnings:
            ts.warnings = (ts.warnings or []) + warnings
        self._set_erred(ts, exception, traceback)

    def _on_missing_data(self, ws: WorkerState, key: Any, dep: Any,
                         holders: Iterable[str] = ()) -> None:
        """``ws`` could not get ``dep`` from ``holders`` to run ``key``."""
        dts = self.tasks.get(dep)
        if dts is not None and dts.who_has:
            for address in holders:
                holder = self.workers.get(address)
                if holder is None or holder not in dts.who_has:
                    continue
                if any(dts in t.deps for t in holder.processing):
                    # A task of its own reads the copy there, so the copy is real and
                    # stays on record (and is deleted with the key): a copy kept but
                    # untracked would outlive the task, or the task's move elsewhere.
                    continue
                dts.who_has.pop(holder, None)
                holder.has_what.pop(dts, None)
                holder.nbytes -= dts.nbytes
                # Untracked from now on: a copy it may still have must not stay.
                self._post(holder.stream, {"op": "delete_data", "keys": [dep]})
            if not dts.who_has and dts.state == MEMORY:
                # Every copy is gone though the holders still run: recompute or lose it.
                _transition(dts, RELEASED)
                if dts.spec is None:
                    self._lose(dts, f"key {key_name(dep)!r} could not be fetched from "
                                    f"{', '.join(holders)} and has no task to recompute it")
        ts = self.tasks.get(key)
        if ts is None or ts.state != PROCESSING or ts.worker is not ws:
            return
        self._unschedule(ts)
        self._activate([ts])

    def _on_lost_data(self, ws: WorkerState, keys: Iterable, reason: str = "") -> None:
        """``ws`` no longer holds ``keys`` (their spill files could not be read back).

        As for keys that died with a worker: a key with copies elsewhere
        lives on; one still needed is recomputed, with the tasks waiting on
        it, or lost (its waiters err) if it has no task to recompute it from.
        """
        restart: list[TaskState] = []
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None or ts not in ws.has_what:
                continue
            del ws.has_what[ts]
            ws.nbytes -= ts.nbytes
            if not self._holder_gone(ts, ws, f"on worker {ws.address} ({reason})"):
                continue
            logger.warning("key %s was lost on worker %s (%s); recomputing it",
                           key_name(key), ws.address, reason)
            self._restart(ts, restart)
        self._activate(restart)

    def _holder_gone(self, ts: TaskState, ws: WorkerState, where: str) -> bool:
        """``ws`` no longer holds ``ts``: True if that was its last copy and it must be
        recomputed.  A key nobody needs is forgotten, and one with no task to recompute
        it from is lost (its waiters err)."""
        if ts.who_has is not None:
            ts.who_has.pop(ws, None)
        if ts.who_has or ts.state != MEMORY:
            return False
        _transition(ts, RELEASED)
        if not ts.needed():
            self._forget_if_unreferenced(ts)
            return False
        if ts.spec is None:
            self._lose(ts, f"key {key_name(ts.key)!r} was lost {where} and has no task to "
                           "recompute it from")
            return False
        return True

    def _restart(self, ts: TaskState, restart: list[TaskState]) -> None:
        """Queue ``ts`` for activation with the tasks already scheduled to wait on it."""
        restart.append(ts)
        for waiter in list(ts.waiters or ()):
            if waiter.state in SCHEDULED or waiter.state == WAITING:
                self._unschedule(waiter)
                restart.append(waiter)

    def _on_data_erred(self, ws: WorkerState, key: Any, exception: Serialized,
                       traceback: str) -> None:
        """A result in memory cannot be sent anywhere (it does not pickle): it is an error."""
        ts = self.tasks.get(key)
        if ts is None or ts.state != MEMORY:
            return
        msg = {"op": "delete_data", "keys": [key]}
        assert ts.who_has is not None  # in memory: it has holders
        for holder in ts.who_has:
            holder.has_what.pop(ts, None)
            self._post(holder.stream, msg)
        ts.who_has = None
        self._set_erred(ts, exception, traceback)

    def _on_memory(self, ws: WorkerState, managed: int, spilled: int, unmanaged: int,
                   paused: bool, limit: int | None = None, spill_error: str | None = None,
                   **_: Any) -> None:
        """A worker's memory figures; a paused worker gets no new task until it resumes."""
        ws.managed, ws.spilled, ws.unmanaged = managed, spilled, unmanaged
        ws.memory_limit, ws.spill_error = limit, spill_error
        paused = bool(paused)
        if paused == ws.paused:
            return
        ws.paused = paused
        self._paused += 1 if paused else -1
        if paused and ws.backlogged():  # idle workers may take all it has pending
            self._backlogged[ws] = None
        if paused:
            logger.warning("worker %s paused: its memory is nearly full (managed %d MiB, "
                           "unmanaged %d MiB, limit %s MiB); it gets no new tasks",
                           ws.address, managed >> 20, unmanaged >> 20,
                           "?" if limit is None else limit >> 20)
        else:
            logger.warning("worker %s resumed", ws.address)
            self._dirty[ws] = None
        if self.history is not None:
            self.history.event("worker-paused" if paused else "worker-resumed",
                               f"worker {ws.address} {'paused' if paused else 'resumed'}: "
                               f"managed {managed >> 20} MiB, unmanaged {unmanaged >> 20} MiB")

    def _on_add_keys(self, ws: WorkerState, keys: dict, from_registration: bool = False,
                     adopt: bool = False) -> None:
        """``ws`` holds copies of ``keys``: inputs it fetched, or all it held when it registered.

        At registration, data the center does not know is kept as
        lineage-less keys if the center restarted (``adopt``).  A needed key
        that is not in memory (its holders died, it is being recomputed) takes
        the copy instead of running again, whether the copy was fetched or held
        at registration: deleting it could race the worker's own use of it (a
        recompute sent to that same worker is answered from the copy).  Keys
        already reported lost stay lost.
        """
        unwanted = []
        for key, nbytes in keys.items():
            ts = self.tasks.get(key)
            if ts is None:
                if adopt:
                    ts = self.tasks[key] = TaskState(key, None)
                    _transition(ts, MEMORY)
                    ts.nbytes = nbytes
                    self._add_holder(ts, ws)
                else:
                    unwanted.append(key)
            elif ts.state == MEMORY:
                self._add_holder(ts, ws)
            # A loss already reported stays final: a copy that comes back is dropped.
            elif ts.needed() and ts.state not in (ERRED, LOST):
                if ts.state in SCHEDULED or ts.state == WAITING:
                    self._unschedule(ts)
                ts.nbytes = nbytes
                self._to_memory(ts, ws)
            else:
                unwanted.append(key)
        if unwanted:
            self._post(ws.stream, {"op": "delete_data", "keys": unwanted})

    # ------------------------------------------------------------------ stealing

    def _take_back_for(self, thief: WorkerState) -> None:
        """An idle worker asks stalled workers for tasks sitting in their prefetch.

        The victim gives back only tasks it has not started (``steal_response``),
        so nothing runs twice.  A victim not stalled yet is looked at again
        when it would be.
        """
        now = self.now
        if now < self._no_stall_before:  # nobody can be stalled yet: look again then
            self._next_steal_check = min(self._next_steal_check, self._no_stall_before)
            return
        wanted = thief.nthreads - len(thief.processing) - \
            sum(1 for t in self._stealing.values() if t is thief)
        earliest = float("inf")
        for victim in list(self._prefetched):
            if wanted <= 0:
                return
            since = victim.stalled_since()
            if since is None or self.workers.get(victim.address) is not victim:
                del self._prefetched[victim]
                continue
            if victim is thief:
                continue
            if since > now:
                self._next_steal_check = min(self._next_steal_check, since)
                earliest = min(earliest, since)
                continue
            for ts in reversed(list(victim.processing)[victim.nthreads:]):
                if wanted <= 0:
                    break
                if ts in self._stealing or (ts.restrictions is not None and
                                            not thief.matches(ts.restrictions)):
                    continue
                if self._move_cost(ts, thief) > STEAL_BYTES:
                    continue
                self._stealing[ts] = thief
                self._post(victim.stream, {"op": "steal", "key": ts.key})
                wanted -= 1
            earliest = min(earliest, since)  # still stalled: look again next time
        self._no_stall_before = earliest

    def _on_steal_response(self, ws: WorkerState, key: Any, ok: bool) -> None:
        ts = self.tasks.get(key)
        thief = self._stealing.pop(ts, None) if ts is not None else None
        if not ok or ts is None or ts.state != PROCESSING or ts.worker is not ws:
            return
        del ws.processing[ts]
        self._dirty[ws] = None
        if thief is not None and self.workers.get(thief.address) is thief:
            self._assign(ts, thief)
        else:
            ts.worker = None
            _transition(ts, RELEASED)
            self._activate([ts])

    def _steal_for(self, thief: WorkerState) -> TaskState | None:
        """Take a task from the longest pending queue when its backlog is real."""
        backlogged = self._backlogged
        victims = []
        for ws in list(backlogged):
            if not ws.backlogged() or self.workers.get(ws.address) is not ws:
                del backlogged[ws]
            elif ws is not thief:
                victims.append(ws)
        if not victims:
            return None
        victim = max(victims, key=lambda ws: len(ws.pending))
        for _ in range(len(victim.pending)):
            ts = victim.pending.pop()
            if ts.state != QUEUED or ts.worker is not victim:
                continue
            if (ts.restrictions is None or thief.matches(ts.restrictions)) and \
                    self._move_cost(ts, thief) <= STEAL_BYTES:
                return ts
            victim.pending.appendleft(ts)
        return None

    # ------------------------------------------------------------------ clients

    def _update_graph(self, cs: ClientState, tasks: Sequence = (), wants: Iterable = (),
                      check: bool = False) -> None:
        """New tasks ``(key, spec, dep_keys, opts)`` and the keys this client wants.

        With ``check`` (keys the client named itself), a task whose key the
        center already knows for a different task is refused (see
        ``_conflicts``), and so is every task that depends on it.  Tasks that
        no wanted key reaches are forgotten again at the end, so a graph
        leaves nothing behind that it did not use.
        """
        conflicts = self._conflicts(cs, tasks, check) if tasks and (check or cs.refused) \
            else None
        new = []
        for key, spec, dep_keys, opts in tasks:
            if conflicts and key in conflicts:
                continue
            ts = self.tasks.get(key)
            if ts is None:
                ts = self.tasks[key] = TaskState(key, spec)
            elif ts.spec is None and spec is not None and ts.state in (RELEASED, LOST):
                ts.spec = spec  # a key known only as data gains lineage
                _transition(ts, RELEASED)
            else:
                continue
            new.append((ts, dep_keys, opts))
        for ts, dep_keys, opts in new:
            deps = []
            for k in dep_keys:
                dts = self.tasks.get(k)
                if dts is None:
                    dts = self.tasks[k] = TaskState(k, None)
                    _transition(dts, LOST)
                    dts.tb = f"key {key_name(k)!r} is not known to the center (released or lost)"
                    dts.exc = serialize(LostKeyError(dts.tb))
                deps.append(dts)
                _add(dts, "dependents", ts)
            ts.deps = tuple(deps)
            if opts:
                ts.retries = opts.get("retries") or 0
                workers = opts.get("workers")
                if workers:
                    ts.restrictions = frozenset(
                        [workers] if isinstance(workers, str) else workers)
        roots = []
        for key in wants:
            if conflicts and key in conflicts:
                exc = KeyConflictError(conflicts[key])
                cs.refused.add(key)
                self._post(cs.stream, {"op": "erred", "key": key, "exception": serialize(exc),
                                       "traceback": str(exc)})
                continue
            ts = self.tasks.get(key)
            if ts is None:
                self._post(cs.stream, {"op": "lost", "key": key, "reason":
                                       f"key {key_name(key)!r} is not known to the center"})
                continue
            _want(ts, cs)
            cs.wants[ts] = None
            if ts.state == RELEASED:
                roots.append(ts)
            else:
                self._report(ts, cs)
        self._activate(roots)
        for ts, _, _ in new:  # a task nobody wants or needs (a graph's unused branch)
            if ts.state == RELEASED and not ts.needed():
                self._forget_if_unreferenced(ts)

    def _conflicts(self, cs: ClientState, tasks: Sequence, check: bool) -> dict:
        """Keys of ``tasks`` the center holds for another task, and those that need them.

        A key is one computation: a task sent under a key whose known task was
        packed differently (other function, arguments or initializer) is
        refused rather than answered with the other task's value, and so is
        every task that depends on a refused one (in this message, or refused
        to this client before).  Returns key -> reason.
        """
        conflicts = {}
        for key, spec, _, _ in tasks if check else ():
            ts = self.tasks.get(key)
            if ts is not None and ts.spec is not None and spec is not None and \
                    not _same_spec(ts.spec, spec):
                conflicts[key] = (f"key {key_name(key)!r} is already on the cluster for a "
                                  "different task; give this task another key")
        if not conflicts and not cs.refused:
            return conflicts
        refused = {k: f"key {key_name(k)!r} was refused" for k in cs.refused}
        grew = True
        while grew:  # spread to dependents in the message, whatever its order
            grew = False
            for key, _, dep_keys, _ in tasks:
                if key not in conflicts:
                    for dep in dep_keys:
                        reason = conflicts.get(dep) or refused.get(dep)
                        if reason:
                            conflicts[key] = (f"task {key_name(key)!r} depends on "
                                              f"{key_name(dep)!r}: {reason}")
                            grew = True
                            break
        if conflicts:
            logger.warning("refused %d tasks whose keys hold different tasks (e.g. %s)",
                           len(conflicts), next(iter(conflicts.values())))
        return conflicts

    def _report(self, ts: TaskState, cs: ClientState) -> None:
        """Tell one client where ``ts`` stands, if it has finished one way or another."""
        if ts.state == MEMORY:
            assert ts.who_has is not None  # in memory: it has holders
            msg = {"op": "memory", "key": ts.key, "who_has": [w.address for w in ts.who_has]}
            if ts.warnings:
                msg["warnings"] = ts.warnings
            self._post(cs.stream, msg)
        elif ts.state == ERRED:
            msg = {"op": "erred", "key": ts.key, "exception": ts.exc, "traceback": ts.tb}
            if ts.warnings:
                msg["warnings"] = ts.warnings
            self._post(cs.stream, msg)
        elif ts.state == LOST:
            self._post(cs.stream, {"op": "lost", "key": ts.key, "reason": ts.tb or "lost"})

    def _on_release(self, cs: ClientState, keys: Iterable) -> None:
        if cs.refused:
            cs.refused.difference_update(keys)
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None:
                continue
            _unwant(ts, cs.id)
            cs.wants.pop(ts, None)
            self._release_if_unneeded(ts)

    def _on_scatter(self, cs: ClientState, data: dict) -> None:
        """The client put ``data`` (key -> (worker addresses, nbytes)) on workers itself."""
        for key, (addresses, nbytes) in data.items():
            ts = self.tasks.get(key)
            if ts is None:
                ts = self.tasks[key] = TaskState(key, None)
            _want(ts, cs)
            cs.wants[ts] = None
            holders = [self.workers[a] for a in addresses if a in self.workers]
            if not holders:
                if ts.state != MEMORY:
                    self._lose(ts, f"worker {', '.join(addresses)} left before the scatter "
                                   f"of {key_name(key)!r} was registered")
                else:
                    self._report(ts, cs)
                continue
            if ts.state != MEMORY:
                if ts.state in SCHEDULED or ts.state == WAITING:
                    self._unschedule(ts)
                ts.nbytes = nbytes
                for ws in holders[1:]:
                    self._add_holder(ts, ws)
                self._to_memory(ts, holders[0])
            else:
                for ws in holders:
                    self._add_holder(ts, ws)
                self._report(ts, cs)

    def _on_locate(self, cs: ClientState, keys: Iterable) -> None:
        """Re-send the state of finished keys (after a fetch from a holder failed)."""
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None:
                self._post(cs.stream, {"op": "lost", "key": key, "reason":
                                       f"key {key_name(key)!r} is not known to the center"})
            else:
                self._report(ts, cs)

    # ------------------------------------------------------------------ transitions

    def _activate(self, roots: Iterable[TaskState]) -> None:
        """Make released tasks (and the released inputs they need) run, inputs first."""
        order: list[TaskState] = []
        seen: set[TaskState] = set()
        stack = [(ts, False) for ts in roots]
        while stack:
            ts, expanded = stack.pop()
            if expanded:
                order.append(ts)
                continue
            if ts in seen or ts.state != RELEASED:
                continue
            seen.add(ts)
            stack.append((ts, True))
            for dep in ts.deps:
                if dep.state == RELEASED and dep not in seen:
                    stack.append((dep, False))
        for ts in order:
            self._to_waiting(ts)

    def _to_waiting(self, ts: TaskState) -> None:
        if ts.state != RELEASED:
            return
        if ts.spec is None:
            self._lose(ts, f"key {key_name(ts.key)!r} is needed but was lost and has "
                           "no task to recompute it from")
            return
        for dep in ts.deps:
            if dep.state in (ERRED, LOST):
                self._set_erred(ts, dep.exc, dep.tb)
                return
        waiting_on = None
        released = None
        for dep in ts.deps:
            _add(dep, "waiters", ts)
            if dep.state != MEMORY:
                if waiting_on is None:
                    waiting_on = set()
                waiting_on.add(dep)
                if dep.state == RELEASED:
                    released = [dep] if released is None else released + [dep]
        _transition(ts, WAITING)
        ts.waiting_on = waiting_on
        if waiting_on is None:
            self._ready(ts)
        elif released:
            # An input activated with this task can have been released again before
            # this task claimed it (a sibling erred and let go of it): run it again.
            self._activate(released)

    def _ready(self, ts: TaskState) -> None:
        """Send a task whose inputs are all in memory to a worker, or queue it."""
        ts.waiting_on = None
        candidates: list[WorkerState] | dict[WorkerState, None]
        if ts.restrictions is not None:
            candidates = [ws for ws in self.workers.values() if ws.matches(ts.restrictions)]
            if not candidates:
                _transition(ts, NO_WORKER)
                self.no_worker[ts] = self.now
                return
        elif not ts.deps:
            ws = self._least_busy_free()
            if ws is not None:
                self._assign(ts, ws)
            else:
                self._queue_anywhere(ts)
            return
        else:
            # The best worker holds inputs, or else is the least busy one with a slot:
            # any other worker moves every input too and is busier.
            candidates = {}
            for dep in ts.deps:
                for ws in dep.who_has or ():
                    candidates[ws] = None
            ws = self._least_busy_free()
            if ws is not None:
                candidates[ws] = None
        if not ts.deps:
            free = [ws for ws in candidates if ws.has_slot()]
            if free:
                self._assign(ts, min(free, key=WorkerState.occupancy))
            elif ts.restrictions is None or not candidates:
                self._queue_anywhere(ts)
            else:
                self._queue_on(ts, min(candidates, key=WorkerState.occupancy))
            return
        if not candidates:
            self._queue_anywhere(ts)
            return
        if self._paused:  # a paused worker gets work only when every candidate is paused
            candidates = [ws for ws in candidates if not ws.paused] or list(candidates)
        cost = self._move_cost
        best = min(candidates, key=lambda ws: (cost(ts, ws), ws.occupancy()))
        if best.has_slot():
            self._assign(ts, best)
        else:
            self._queue_on(ts, best)  # wait for the holder; a long backlog gets stolen from

    def _least_busy_free(self) -> WorkerState | None:
        """The registered worker with a free slot and the lowest occupancy, if any."""
        heap = self._free
        while heap:
            entry = heap[0]
            ws = entry[2]
            if entry is ws.free_entry:
                n = len(ws.processing)
                if n < ws.capacity and not ws.paused and entry[0] == n / ws.nthreads and \
                        self.workers.get(ws.address) is ws:
                    return ws
            heapq.heappop(heap)  # stale: its load changed since, or it left
            if entry is ws.free_entry:
                ws.free_entry = None
        return None

    def _offer(self, ws: WorkerState) -> None:
        """File ``ws`` among the workers with a free slot (after its load changed)."""
        n = len(ws.processing)
        if n >= ws.capacity or ws.paused:
            return
        occupancy = n / ws.nthreads
        entry = ws.free_entry
        if entry is not None and entry[0] == occupancy:
            return  # filed already
        heap = self._free
        if len(heap) > 2 * len(self.workers) + 64:  # mostly stale entries: rebuild
            for entry in heap:
                entry[2].free_entry = None
            heap.clear()
            for other in self.workers.values():
                if other is not ws and other.has_slot():
                    self._free_n += 1
                    other.free_entry = (other.occupancy(), self._free_n, other)
                    heap.append(other.free_entry)
            heapq.heapify(heap)
        self._free_n += 1
        ws.free_entry = entry = (occupancy, self._free_n, ws)
        heapq.heappush(heap, entry)

    @staticmethod
    def _move_cost(ts: TaskState, ws: WorkerState) -> int:
        return sum(dep.nbytes for dep in ts.deps if ws not in (dep.who_has or ()))

    def _queue_anywhere(self, ts: TaskState) -> None:
        _transition(ts, QUEUED)
        ts.worker = None
        self.queued.append(ts)
        if not self.workers and self.no_workers_timeout is not None:
            self._starved.setdefault(ts, self.now)

    def _queue_on(self, ts: TaskState, ws: WorkerState) -> None:
        _transition(ts, QUEUED)
        ts.worker = ws
        ws.pending.append(ts)
        if ws.backlogged():
            self._backlogged[ws] = None

    def _assign(self, ts: TaskState, ws: WorkerState) -> None:
        _transition(ts, PROCESSING)
        ts.worker = ws
        if not ws.processing:
            ws.last_progress = self.now
        ws.processing[ts] = None
        if len(ws.processing) > ws.nthreads:
            self._prefetched[ws] = None
            since = ws.last_progress + max(STALL_SECONDS, 3 * ws.duration)
            if since < self._no_stall_before:
                self._no_stall_before = since
        self._offer(ws)
        who_has = {}
        for dep in ts.deps:
            holders = dep.who_has or ()
            if ws not in holders:
                who_has[dep.key] = [w.address for w in holders]
        self._post(ws.stream, {"op": "compute", "key": ts.key, "spec": ts.spec,
                               "who_has": who_has})

    def _fill_dirty(self) -> None:
        dirty, self._dirty = self._dirty, {}
        for ws in sorted(dirty, key=WorkerState.occupancy) if len(dirty) > 1 else dirty:
            if self.workers.get(ws.address) is ws:
                self._fill(ws)

    def _fill(self, ws: WorkerState) -> None:
        """Give ``ws`` work for its free slots: its own queue, the global one, then steal."""
        while len(ws.processing) < ws.capacity and not ws.paused:
            ts = (ws.pending and self._pop_pending(ws)) or (self.queued and self._pop_queued()) \
                or (self._backlogged and self._steal_for(ws)) or None
            if ts is None:
                if len(ws.processing) < ws.nthreads:
                    self._take_back_for(ws)
                break
            self._assign(ts, ws)
        self._offer(ws)

    @staticmethod
    def _pop_pending(ws: WorkerState) -> TaskState | None:
        pending = ws.pending
        while pending:
            ts = pending.popleft()
            if ts.state == QUEUED and ts.worker is ws:
                return ts
        return None

    def _pop_queued(self) -> TaskState | None:
        queued = self.queued
        while queued:
            ts = queued.popleft()
            if ts.state == QUEUED and ts.worker is None:
                if ts.deps and any(dep.state != MEMORY for dep in ts.deps):
                    continue  # an input was lost meanwhile: it was re-activated
                return ts
        return None

    def _check_unrunnable(self, now: float) -> None:
        """Err tasks that have had no worker able to run them for ``no_workers_timeout``."""
        timeout = self.no_workers_timeout
        assert timeout is not None  # checked only with a timeout set
        for table, runnable in ((self.no_worker, NO_WORKER), (self._starved, QUEUED)):
            expired = []
            for ts, since in table.items():  # insertion order is time order
                if since + timeout > now:
                    break
                expired.append(ts)
            for ts in expired:
                table.pop(ts, None)
                if ts.state != runnable or (runnable == QUEUED and ts.worker is not None):
                    continue
                exc = NoWorkerError(ts.key, timeout,
                                    sorted(ts.restrictions) if ts.restrictions else None)
                self._set_erred(ts, serialize(exc), str(exc) + "\n")

    def _killed(self, ts: TaskState, ws: WorkerState) -> None:
        """``ts`` saw too many of its workers die (the last was ``ws``): it errs."""
        exc = KilledWorker(ts.key, ws.address, ts.suspicious)
        self._set_erred(ts, serialize(exc), str(exc) + "\n")
        if self.history is not None:
            self.history.event("task-erred", str(exc))

    def _unschedule(self, ts: TaskState) -> None:
        """Take a waiting/queued/processing task back to released (cancelling it on its worker)."""
        ws = ts.worker
        if ts.state == PROCESSING and ws is not None:
            ws.processing.pop(ts, None)
            if self.workers.get(ws.address) is ws:
                self._post(ws.stream, {"op": "cancel_compute", "key": ts.key})
                self._dirty[ws] = None
        elif ts.state == NO_WORKER:
            self.no_worker.pop(ts, None)
        ts.worker = None
        ts.waiting_on = None
        _transition(ts, RELEASED)

    def _set_erred(self, ts: TaskState, exc: Serialized | None, tb: str | None) -> None:
        """Mark ``ts`` and every dependent waiting on it as erred with the same error."""
        stack = [ts]
        while stack:
            t = stack.pop()
            if t.state in (PROCESSING, QUEUED, NO_WORKER, WAITING):
                self._unschedule(t)
            _transition(t, ERRED)
            t.exc, t.tb = exc, tb
            if t.who_wants:
                msg = {"op": "erred", "key": t.key, "exception": exc, "traceback": tb}
                if t.warnings:
                    msg["warnings"] = t.warnings
                for cid in t.who_wants:
                    self._post(self.clients[cid].stream, msg)
            for waiter in t.waiters or ():
                if waiter.state not in (MEMORY, ERRED):
                    stack.append(waiter)
            t.waiters = None
            for dep in t.deps:
                _discard(dep, "waiters", t)
                self._release_if_unneeded(dep)

    def _lose(self, ts: TaskState, reason: str) -> None:
        """A key with no copy and no lineage: tell who wants it, err who needs it."""
        ts.who_has = None
        exc = serialize(LostKeyError(reason))
        waiters = list(ts.waiters or ())
        ts.waiters = None
        _transition(ts, LOST)
        ts.exc, ts.tb = exc, reason
        for cid in ts.who_wants or ():
            self._post(self.clients[cid].stream, {"op": "lost", "key": ts.key, "reason": reason})
        for waiter in waiters:
            if waiter.state not in (MEMORY, ERRED):
                self._set_erred(waiter, exc, reason)

    def _release_if_unneeded(self, ts: TaskState) -> None:
        """Delete data / stop work nobody needs any more; forget what has no lineage role."""
        stack = [ts]
        while stack:
            t = stack.pop()
            if t.needed() or self.tasks.get(t.key) is not t:
                continue
            if t.state == MEMORY:
                msg = {"op": "delete_data", "keys": [t.key]}
                assert t.who_has is not None  # in memory: it has holders
                for ws in t.who_has:
                    ws.has_what.pop(t, None)
                    ws.nbytes -= t.nbytes
                    self._post(ws.stream, msg)
                t.who_has = None
                _transition(t, RELEASED)
            elif t.state in SCHEDULED or t.state == WAITING:
                self._unschedule(t)
                for dep in t.deps:
                    _discard(dep, "waiters", t)
                    stack.append(dep)
            self._forget_if_unreferenced(t)

    def _forget_if_unreferenced(self, ts: TaskState) -> None:
        stack = [ts]
        while stack:
            t = stack.pop()
            if t.state not in (RELEASED, ERRED, LOST) or t.needed() or t.dependents:
                continue
            if self.tasks.get(t.key) is not t:
                continue
            del self.tasks[t.key]
            for dep in t.deps:
                _discard(dep, "dependents", t)
                _discard(dep, "waiters", t)
                stack.append(dep)

    # ------------------------------------------------------------------ queries

    def validate(self) -> None:
        """Check that every table agrees with every other; ``InvariantError`` names the first
        disagreement.  The simulator calls it after every event."""
        tasks, workers, clients = self.tasks, self.workers, self.clients
        for key, ts in tasks.items():
            if ts.key != key:
                raise InvariantError(f"{ts!r} filed under {key!r}")
            state = ts.state
            if state not in STATES:
                raise InvariantError(f"{ts!r} has an unknown state")
            if state == MEMORY and not ts.who_has:
                raise InvariantError(f"{ts!r} in memory with no holder")
            if state != MEMORY and ts.who_has:
                raise InvariantError(f"{ts!r} not in memory but held by {list(ts.who_has)}")
            ws: WorkerState | None
            for ws in ts.who_has or ():
                if workers.get(ws.address) is not ws:
                    raise InvariantError(f"{ts!r} held by removed worker {ws.address}")
                if ts not in ws.has_what:
                    raise InvariantError(f"who_has/has_what disagree: {ts!r} says "
                                         f"{ws.address} holds it")
            ws = ts.worker
            if state == PROCESSING:
                if ws is None or workers.get(ws.address) is not ws:
                    raise InvariantError(f"{ts!r} assigned to a removed worker {ws!r}")
                if ts not in ws.processing:
                    raise InvariantError(f"{ts!r} not in the processing of {ws.address}")
            elif state == QUEUED:
                if ws is not None and workers.get(ws.address) is not ws:
                    raise InvariantError(f"{ts!r} queued for a removed worker {ws.address}")
            elif ws is not None:
                raise InvariantError(f"{ts!r} names worker {ws.address}")
            if (state == NO_WORKER) != (ts in self.no_worker):
                raise InvariantError(f"{ts!r} and the no-worker table disagree")
            if state in (ERRED, LOST) and ts.exc is None:
                raise InvariantError(f"{ts!r} has no error")
            for cid in ts.who_wants or ():
                cs = clients.get(cid)
                if cs is None or ts not in cs.wants:
                    raise InvariantError(f"{ts!r} wanted by {cid}, which does not hold it")
            if state in (WAITING, QUEUED, PROCESSING, NO_WORKER):
                for dep in ts.deps:
                    if tasks.get(dep.key) is not dep:
                        raise InvariantError(f"{ts!r} needs {dep!r}, which was forgotten")
                    if not dep.waiters or ts not in dep.waiters:
                        raise InvariantError(f"{ts!r} needs {dep!r} but is not among its waiters")
            if state == WAITING and ts.waiting_on:
                for dep in ts.waiting_on:
                    if dep.state == MEMORY:
                        raise InvariantError(f"{ts!r} waits on {dep!r}, which is in memory")
                    elif dep.state not in (WAITING, QUEUED, PROCESSING, NO_WORKER):
                        raise InvariantError(f"{ts!r} waits on {dep!r}, which nothing will compute")
            elif state == WAITING:
                raise InvariantError(f"{ts!r} waits on nothing but is not ready")
        for ws in workers.values():
            for ts in ws.processing:
                if ts.state != PROCESSING or ts.worker is not ws:
                    raise InvariantError(f"{ws.address} processes {ts!r} (worker {ts.worker!r})")
                if tasks.get(ts.key) is not ts:
                    raise InvariantError(f"{ws.address} processes forgotten {ts!r}")
            nbytes = 0
            for ts in ws.has_what:
                nbytes += ts.nbytes
                if ws not in (ts.who_has or ()):
                    raise InvariantError(f"who_has/has_what disagree: {ws.address} says it "
                                         f"holds {ts!r}")
                if tasks.get(ts.key) is not ts:
                    raise InvariantError(f"{ws.address} holds forgotten {ts!r}")
            if nbytes != ws.nbytes:
                raise InvariantError(f"{ws.address} counts {ws.nbytes} bytes, holds {nbytes}")
        valid_free = {e[2] for e in self._free
                      if e is e[2].free_entry and e[0] == e[2].occupancy()}
        for ws in workers.values():  # the placement indexes find every candidate
            if ws.has_slot() and ws not in valid_free:
                raise InvariantError(f"{ws.address} has a free slot but is not among the free "
                                     "workers")
            if ws.backlogged() and ws not in self._backlogged:
                raise InvariantError(f"{ws.address} has a backlog but is not among the backlogged")
            since = ws.stalled_since()
            if since is not None:
                if ws not in self._prefetched:
                    raise InvariantError(f"{ws.address} has prefetched tasks but is not among "
                                         "the prefetched")
                if since < self._no_stall_before:
                    raise InvariantError(f"{ws.address} stalls at {since} before the bound "
                         f"{self._no_stall_before}")

    def who_has(self, keys: Iterable | None = None) -> dict:
        """key -> addresses of the workers holding it (all keys in memory by default)."""
        if keys is None:
            items = [ts for ts in self.tasks.values() if ts.state == MEMORY]
        else:
            items = [self.tasks[k] for k in keys if k in self.tasks]
        return {ts.key: sorted(w.address for w in ts.who_has or ()) for ts in items}

    def has_what(self) -> dict:
        """worker address -> keys it holds."""
        return {ws.address: sorted((ts.key for ts in ws.has_what), key=str)
                for ws in self.workers.values()}

    def nthreads(self) -> dict:
        """worker address -> number of task threads."""
        return {ws.address: ws.nthreads for ws in self.workers.values()}

    def worker_info(self, now: float) -> dict:
        """worker address -> name, threads, pid, running and held counts, memory figures.

        ``memory_managed`` (bytes of results in memory), ``memory_spilled``
        (bytes of results on disk), ``memory_unmanaged`` (RSS minus managed)
        and ``paused`` are what the worker last reported.
        """
        return {ws.address: {"name": ws.name, "nthreads": ws.nthreads, "pid": ws.pid,
                             "processing": len(ws.processing), "keys": len(ws.has_what),
                             "nbytes": ws.nbytes, "last_seen": now - ws.last_seen,
                             "memory_managed": ws.managed, "memory_spilled": ws.spilled,
                             "memory_unmanaged": ws.unmanaged, "paused": ws.paused,
                             "memory_limit": ws.memory_limit, "spill_error": ws.spill_error}
                for ws in self.workers.values()}

    def info(self) -> dict:
        """Counts of tasks by state, of workers and of clients."""
        states: dict[str, int] = {}
        for ts in self.tasks.values():
            states[ts.state] = states.get(ts.state, 0) + 1
        return {"tasks": states, "ntasks": len(self.tasks), "workers": len(self.workers),
                "clients": len(self.clients), "queued": len(self.queued)}


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1][:300] if lines else "no traceback"
