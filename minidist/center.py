"""The center: registry of workers and data, and the scheduler.

The following diagram shows who talks to the center and how::

  clients                     center process                              workers
 +----------+  update_graph  +-----------+           +---------------+  compute   +--------+
 | Executor |  release, ...  | handler   |  events   |  scheduler    | delete_data| worker |
 | Client   |--------------->| threads   |---------->|  thread       |----------->|        |
 | Pool     |<---------------| (one per  |  (queue)  |  (owns every  |<-----------|        |
 +----------+ memory, erred, | connection|           |   table)      | finished,  +--------+
              lost           |  I/O only)|           +---------------+ erred, ...
                             +-----------+              |        |
                                    BatchedSender per stream <---+  (one frame per send)

Handler threads only read sockets and put what they read on the event
queue.  The scheduler thread is the only code that reads or writes the
tables below, so there are no locks around them; what it sends goes
through a ``BatchedSender`` per connection, which never blocks it.

One shortcut keeps a quiet center fast: the scheduler's state is guarded
by a single *baton* (a lock the scheduler thread holds for each tick).  A
handler thread that has just read a batch and finds the baton free, with
nothing of its own stream still queued, takes it and runs the tick itself
(the same handlers, then the same flush), saving a thread switch per
message.  When the center is busy the baton is taken, events queue, and
the scheduler thread handles them in batches as above.  Either way one
thread at a time runs scheduler code, and the events of one stream are
handled in the order they were read.

Tables: ``tasks`` (key -> TaskState), ``workers`` (address -> WorkerState,
each with ``processing`` and ``has_what``), ``clients`` (id -> ClientState,
each with the keys it wants).  ``who_has`` is ``TaskState.who_has``.

Life of one task, ``e.submit(inc, 1)``:

1. The client packs the call into a RunSpec under the key ``inc-<token>``
   and sends ``update_graph`` with ``wants=[key]`` on its stream.
2. A handler thread reads the batch and queues it (or, with the baton
   free, handles it itself); the scheduler code
   creates the TaskState (or finds it: a pure key already known runs
   nothing new), adds the client to ``who_wants`` and activates it.
3. Activation walks dependencies: a task waits until every input is in
   memory, then is *ready*.  A ready task goes to the worker where the
   fewest input bytes must move (ties: the least busy), if that worker has
   a free slot (``nthreads`` plus a prefetch worth a few milliseconds of
   work); otherwise it waits at the center, in that worker's pending queue
   or, with no inputs, in the global queue.  Workers take from these queues
   as slots free up, and an idle worker steals from a pending queue longer
   than its owner's capacity, so a worker that joins mid-job gets work at
   once while work on data still runs where the data is.
4. The worker runs it and sends ``task_finished``; the task goes to
   ``memory``, the client gets a ``memory`` event naming the holders and
   fetches the bytes from the worker itself when asked.  A result whose
   pickle is at most ``worker.INLINE_BYTES`` rides with ``task_finished``
   and ``memory`` instead (unopened, never stored here), which saves the
   client a round trip to the worker.  Dependents whose
   last input arrived become ready; inputs nobody waits on any more are
   deleted from the workers (their TaskState stays as lineage while a
   dependent needs it for a possible recompute).
5. When no client wants the key and no task waits on it, the center tells
   the workers to delete it and forgets it.

Failures: a worker that disconnects or misses heartbeats is removed (its
silence is what the thread reading its stream waited, see
``WorkerState.last_seen``, so a busy scheduler never counts against it); tasks
it was running are rescheduled (after ``allowed_failures`` such deaths a
task errs with ``KilledWorker``), keys whose only copy died are recomputed
from their RunSpec if still needed, or marked ``lost`` when they have none.
Clients and workers hear ``worker_left`` and drop their connections to it,
so a request waiting on a worker that hangs (rather than dies) fails at
once instead of forever.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable

from . import wire
from .cli import add_common_args, run_until_signalled, start_process
from .task import KilledWorker, LostKeyError, RunSpec, key_name
from .wire import NO_REPLY, BatchedSender, Connection, Security, Serialized

logger = logging.getLogger("minidist.center")

# Task states
RELEASED, WAITING, QUEUED, PROCESSING, MEMORY, ERRED, LOST, NO_WORKER = (
    "released", "waiting", "queued", "processing", "memory", "erred", "lost", "no-worker")
SCHEDULED = (QUEUED, PROCESSING, NO_WORKER)

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


class TaskState:
    """One key as the scheduler knows it.  Sets are created only when needed."""

    __slots__ = ("key", "state", "spec", "deps", "dependents", "waiting_on", "waiters",
                 "who_wants", "who_has", "worker", "nbytes", "exc", "tb", "suspicious",
                 "retries", "restrictions", "__weakref__")

    def __init__(self, key: Any, spec: RunSpec | None) -> None:
        self.key = key
        self.state = RELEASED
        self.spec = spec
        self.deps: tuple[TaskState, ...] = ()
        self.dependents: set[TaskState] | None = None   # all known dependents (lineage)
        self.waiting_on: set[TaskState] | None = None   # inputs not yet in memory
        self.waiters: set[TaskState] | None = None      # dependents that still need me
        self.who_wants: set[str] | None = None          # client ids
        self.who_has: set[WorkerState] | None = None
        self.worker: WorkerState | None = None          # processing on / queued for
        self.nbytes = 0
        self.exc: Serialized | None = None
        self.tb: str | None = None
        self.suspicious = 0
        self.retries = 0
        self.restrictions: frozenset | None = None

    def needed(self) -> bool:
        return bool(self.who_wants or self.waiters)

    def __repr__(self) -> str:
        return f"<TaskState {key_name(self.key)} {self.state}>"


class _Inbox:
    """Counts of one stream's events queued for the scheduler thread and handled by it.

    Each count has one writer (the stream's handler thread, or whoever holds
    the baton), so comparing them tells a handler thread whether an earlier
    event of its stream still waits in the queue.
    """

    __slots__ = ("queued", "handled")

    def __init__(self) -> None:
        self.queued = 0
        self.handled = 0


class WorkerState:
    """A registered worker: its stream, capacity and what it holds and runs."""

    __slots__ = ("address", "name", "nthreads", "conn", "sender", "processing", "pending",
                 "has_what", "nbytes", "pid", "capacity", "min_prefetch",
                 "duration", "last_progress", "registered_at")

    def __init__(self, address: str, name: str, nthreads: int, conn: Connection,
                 sender: BatchedSender, pid: int | None, prefetch: int) -> None:
        self.address = address
        self.name = name
        self.nthreads = nthreads
        self.min_prefetch = prefetch
        self.capacity = nthreads + prefetch
        self.duration = 0.0  # moving average of task run time, seconds
        self.last_progress = time.monotonic()  # last finish, or when it last became busy
        self.conn = conn
        self.sender = sender
        self.processing: dict[TaskState, None] = {}  # ordered: first ones are running
        self.pending: deque[TaskState] = deque()     # ready, prefer this worker, no slot yet
        self.has_what: set[TaskState] = set()
        self.nbytes = 0
        self.pid = pid
        self.registered_at = time.monotonic()  # when it was told it is registered

    @property
    def last_seen(self) -> float:
        """Since when (monotonic) this worker has been silent though it could have spoken.

        Measured by the handler thread reading its stream, not by when the
        scheduler gets to what it read: a scheduler busy for seconds with a
        large graph must not count that time against workers whose
        heartbeats wait in its queue.  Nor does the time before the worker
        was told it is registered count: it sends nothing until then.
        """
        return max(self.conn.quiet_since(), self.registered_at)

    def has_slot(self) -> bool:
        return len(self.processing) < self.capacity

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
    __slots__ = ("id", "sender", "conn", "wants")

    def __init__(self, client_id: str, conn: Connection, sender: BatchedSender) -> None:
        self.id = client_id
        self.conn = conn
        self.sender = sender
        self.wants: set[TaskState] = set()


def _add(ts: TaskState, attr: str, item: Any) -> None:
    s = getattr(ts, attr)
    if s is None:
        setattr(ts, attr, {item})
    else:
        s.add(item)


def _discard(ts: TaskState, attr: str, item: Any) -> None:
    s = getattr(ts, attr)
    if s:
        s.discard(item)


class Center:
    """The center process's state and threads.  ``start()`` binds and serves."""

    def __init__(self, *, security: Security | None = None, heartbeat_timeout: float = 5.0,
                 allowed_failures: int = 3, prefetch: int = 1) -> None:
        self.security = security or Security()
        self.heartbeat_timeout = heartbeat_timeout
        self.allowed_failures = allowed_failures
        self.prefetch = prefetch
        self.tasks: dict[Any, TaskState] = {}
        self.workers: dict[str, WorkerState] = {}
        self.clients: dict[str, ClientState] = {}
        self.queued: deque[TaskState] = deque()  # ready, no input, waiting for any slot
        self.no_worker: set[TaskState] = set()   # restricted to workers that are not here
        self._dirty: set[WorkerState] = set()    # workers whose free slots need filling
        self._outbox: set[BatchedSender] = set()  # streams with messages queued this tick
        self._stealing: dict[TaskState, WorkerState] = {}  # asked back from a stalled worker
        self._next_steal_check = float("inf")
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._baton = threading.Lock()  # held by whichever thread runs scheduler code
        self._wake_at = float("inf")    # when the idle scheduler thread next looks at the clock
        self._next_check = float("inf")  # next heartbeat check
        self._halted = False
        self._stopped = threading.Event()
        self.server = wire.Server({
            "register_worker": self._handle_worker_stream,
            "register_client": self._handle_client_stream,
            "who_has": self._query(self.who_has),
            "has_what": self._query(self.has_what),
            "nthreads": self._query(self.nthreads),
            "workers": self._query(self.worker_info),
            "info": self._query(self.info),
            "identity": lambda conn: {"type": "center", "pid": os.getpid()},
        }, security=self.security, name="center")
        self._worker_ops: dict[str, Callable[..., None]] = {
            "task_finished": self._on_task_finished,
            "task_erred": self._on_task_erred,
            "missing_data": self._on_missing_data,
            "data_erred": self._on_data_erred,
            "steal_response": self._on_steal_response,
            "add_keys": self._on_add_keys,
            "heartbeat": lambda ws: None,
            "unregister": lambda ws: self._remove_worker(ws, "worker is leaving"),
        }
        self._client_ops: dict[str, Callable[..., None]] = {
            "update_graph": self._update_graph,
            "release": self._on_release,
            "scatter": self._on_scatter,
            "locate": self._on_locate,
        }
        self._event_handlers: dict[str, Callable[..., None]] = {
            "worker_msgs": self._on_worker_msgs,
            "client_msgs": self._on_client_msgs,
            "add_worker": self._add_worker,
            "worker_closed": self._on_worker_closed,
            "add_client": self._add_client,
            "client_closed": self._on_client_closed,
            "query": self._on_query,
            "wake": lambda: None,
        }
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self.address = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self, host: str = "127.0.0.1", port: int = wire.DEFAULT_PORT,
              sock: socket.socket | None = None) -> str:
        """Bind (or serve ``sock``, already listening), start the scheduler, return the address."""
        wire.warn_if_exposed(host, self.security, "center")
        bound_host, bound_port = self.server.listen(host, port, sock)
        self._thread.start()
        self.address = wire.format_address(_advertised_host(bound_host), bound_port)
        return self.address

    def stop(self) -> None:
        """Stop serving and close every stream."""
        self._events.put(("stop", (), None))
        self._stopped.wait(5)
        self.server.stop()

    # ------------------------------------------------------------------ handler threads (I/O only)

    def _handle_worker_stream(self, conn: Connection, address: str, nthreads: int,
                              name: str | None = None, data: dict | None = None,
                              pid: int | None = None) -> Any:
        sender = BatchedSender(conn, name=f"center->{address}")
        inbox = _Inbox()
        self._deliver(inbox, "add_worker", (conn, sender, address, nthreads, name or address,
                                            data or {}, pid))
        self._pump(conn, inbox, "worker_msgs", address)
        self._deliver(inbox, "worker_closed", (conn, address))
        return NO_REPLY

    def _handle_client_stream(self, conn: Connection, client_id: str) -> Any:
        sender = BatchedSender(conn, name=f"center->client-{client_id[:8]}")
        inbox = _Inbox()
        self._deliver(inbox, "add_client", (conn, sender, client_id))
        self._pump(conn, inbox, "client_msgs", client_id)
        self._deliver(inbox, "client_closed", (conn, client_id))
        return NO_REPLY

    def _pump(self, conn: Connection, inbox: _Inbox, kind: str, who: str) -> None:
        while True:
            try:
                batch = conn.recv()
            except wire.ProtocolError as e:
                logger.warning("dropped stream from %s: %s", conn.peer, e)
                return
            except ConnectionError:
                return
            if type(batch) is not list:
                logger.warning("dropped stream from %s: expected a list of messages", conn.peer)
                return
            self._deliver(inbox, kind, (conn, who, batch))

    def _deliver(self, inbox: _Inbox, kind: str, args: tuple) -> None:
        """Hand one event of a stream to the scheduler.

        If no thread is running scheduler code and nothing of this stream
        is still queued, this handler thread takes the baton and handles
        the event itself, which saves a thread switch on every message
        when the center is not busy.  Otherwise the event is queued, and
        the scheduler thread handles it in its next tick with everything
        else that arrived meanwhile.
        """
        if self._baton.acquire(blocking=False):
            try:
                if inbox.handled == inbox.queued and not self._halted:
                    self._handle(kind, args)
                    self._end_tick(time.monotonic())
                    if self._next_steal_check < self._wake_at:  # the scheduler thread sleeps
                        self._wake_at = self._next_steal_check
                        self._events.put(("wake", (), None))
                    return
            finally:
                self._baton.release()
        inbox.queued += 1
        self._events.put((kind, args, inbox))

    def _query(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap a read-only query so it runs on the scheduler thread."""
        def handler(conn: Connection, **kwargs: Any) -> Any:
            reply: queue.SimpleQueue = queue.SimpleQueue()
            self._events.put(("query", (fn, kwargs, reply), None))
            ok, value = reply.get(timeout=30)
            if not ok:
                raise value
            return value
        return handler

    # ------------------------------------------------------------------ scheduler thread

    def _run(self) -> None:
        check_every = min(1.0, self.heartbeat_timeout / 4)
        self._next_check = self._wake_at = time.monotonic() + check_every
        events = self._events
        while not self._halted:
            # One tick: every event queued so far, then one write per stream touched.
            batch = []
            try:
                batch.append(events.get(timeout=max(0.0, self._wake_at - time.monotonic())))
                while True:
                    batch.append(events.get_nowait())
            except queue.Empty:
                pass
            with self._baton:
                for kind, args, inbox in batch:
                    if kind == "stop":
                        self._halted = True
                        break
                    self._handle(kind, args)
                    if inbox is not None:
                        inbox.handled += 1
                now = time.monotonic()
                if now >= self._next_check:
                    self._next_check = now + check_every
                    self._check_heartbeats(now)
                self._end_tick(now)
                self._wake_at = min(self._next_check, self._next_steal_check)
        for ws in list(self.workers.values()):
            ws.sender.close()
            ws.conn.close()
        for cs in list(self.clients.values()):
            cs.sender.close()
            cs.conn.close()
        self._stopped.set()

    def _handle(self, kind: str, args: tuple) -> None:
        try:
            self._event_handlers[kind](*args)
        except Exception:
            logger.exception("scheduler failed on %s event", kind)
        if self._dirty:
            self._fill_dirty()

    def _end_tick(self, now: float) -> None:
        """Take back work from stalled workers if it is time; write what the tick queued."""
        if now >= self._next_steal_check:
            self._check_stalls()
        for sender in self._outbox:
            sender.flush()
        self._outbox.clear()

    def _post(self, sender: BatchedSender, msg: dict) -> None:
        """Queue a message on a stream; it is written once this tick ends."""
        sender.append(msg)
        self._outbox.add(sender)

    def _on_query(self, fn: Callable[..., Any], kwargs: dict, reply: queue.SimpleQueue) -> None:
        try:
            reply.put((True, fn(**kwargs)))
        except Exception as e:
            reply.put((False, e))

    # ------------------------------------------------------------------ workers

    def _add_worker(self, conn: Connection, sender: BatchedSender, address: str, nthreads: int,
                    name: str, data: dict, pid: int | None) -> None:
        old = self.workers.get(address)
        if old is not None:
            self._remove_worker(old, "it registered again")
        ws = WorkerState(address, name, max(1, int(nthreads)), conn, sender, pid, self.prefetch)
        self.workers[address] = ws
        # Written now, not at the end of this tick: its heartbeats start when it reads this.
        sender.send({"op": "registered", "center": self.address})
        ws.registered_at = time.monotonic()
        logger.info("worker %s registered (%d threads, %d keys held)", address, ws.nthreads,
                    len(data))
        if data:
            self._on_add_keys(ws, data, from_registration=True)
        for ts in list(self.no_worker):
            if ws.matches(ts.restrictions):
                self.no_worker.discard(ts)
                ts.state = RELEASED
                self._activate([ts])
        self._dirty.add(ws)

    def _on_worker_closed(self, conn: Connection, address: str) -> None:
        ws = self.workers.get(address)
        if ws is not None and ws.conn is conn:
            self._remove_worker(ws, "its connection closed")

    def _check_heartbeats(self, now: float) -> None:
        for ws in list(self.workers.values()):
            if now - ws.last_seen > self.heartbeat_timeout and not ws.conn.input_waiting():
                # (Bytes waiting: it spoke while this process was too busy to read them.)
                self._remove_worker(ws, f"no heartbeat for {now - ws.last_seen:.1f}s")

    def _on_worker_msgs(self, conn: Connection, address: str, batch: list) -> None:
        ws = self.workers.get(address)
        if ws is None or ws.conn is not conn:
            return  # a stale stream from a worker already removed: it must re-register
        ops = self._worker_ops
        for msg in batch:
            try:
                op = msg.pop("op", None)
                ops[op](ws, **msg)
            except Exception:
                logger.exception("bad message from worker %s: %.200r", address, msg)
            if self.workers.get(address) is not ws:
                return

    def _remove_worker(self, ws: WorkerState, reason: str) -> None:
        """Forget a worker: reschedule what it ran, recompute or lose what only it held."""
        if self.workers.get(ws.address) is not ws:
            return
        log = logger.info if reason == "worker is leaving" else logger.warning
        log("removing worker %s: %s", ws.address, reason)
        del self.workers[ws.address]
        self._dirty.discard(ws)
        self._stealing = {ts: thief for ts, thief in self._stealing.items()
                          if thief is not ws and ts.worker is not ws}
        ws.sender.close(timeout=0)
        ws.conn.close()
        # Whoever waits on a reply from it (it may be hung, not dead) stops waiting.
        left = {"op": "worker_left", "address": ws.address}
        for other in (*self.workers.values(), *self.clients.values()):
            self._post(other.sender, left)
        restart: list[TaskState] = []
        for ts in ws.has_what:
            ts.who_has.discard(ws)
            if ts.who_has or ts.state != MEMORY:
                continue
            ts.state = RELEASED
            if not ts.needed():
                self._forget_if_unreferenced(ts)
                continue
            if ts.spec is None:
                self._lose(ts, f"key {key_name(ts.key)!r} was lost with worker {ws.address} "
                               f"({reason}) and has no task to recompute it from")
                continue
            restart.append(ts)
            for waiter in list(ts.waiters or ()):
                if waiter.state in SCHEDULED or waiter.state == WAITING:
                    self._unschedule(waiter)
                    restart.append(waiter)
        ws.has_what = set()
        for i, ts in enumerate(list(ws.processing)):
            ts.worker = None
            ts.state = RELEASED
            if i < ws.nthreads:  # the first nthreads were running, the rest prefetched
                ts.suspicious += 1
                if ts.suspicious >= self.allowed_failures:
                    exc = KilledWorker(ts.key, ws.address, ts.suspicious)
                    self._set_erred(ts, wire.serialize(exc), str(exc) + "\n")
                    continue
            restart.append(ts)
        ws.processing.clear()
        for ts in ws.pending:
            if ts.state == QUEUED and ts.worker is ws:
                ts.worker = None
                ts.state = RELEASED
                restart.append(ts)
        ws.pending.clear()
        self._activate(restart)
        self._dirty.update(self.workers.values())

    # ------------------------------------------------------------------ worker messages

    def _on_task_finished(self, ws: WorkerState, key: Any, nbytes: int = 0,
                          duration: float = 0.0, value: Serialized | None = None) -> None:
        ws.observe(duration)
        ws.last_progress = time.monotonic()
        ts = self.tasks.get(key)
        if ts is None or ts.state in (RELEASED, ERRED, LOST):
            self._post(ws.sender, {"op": "delete_data", "keys": [key]})
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
                self._dirty.add(ws)
        ts.nbytes = nbytes
        self._to_memory(ts, ws, value)

    def _to_memory(self, ts: TaskState, ws: WorkerState, value: Serialized | None = None) -> None:
        """``ts`` is held by ``ws``; tell its clients (a small ``value`` is passed on unopened)."""
        ts.state = MEMORY
        ts.waiting_on = None
        self._add_holder(ts, ws)
        ready = []
        for waiter in ts.waiters or ():
            if waiter.state == WAITING and waiter.waiting_on and ts in waiter.waiting_on:
                waiter.waiting_on.discard(ts)
                if not waiter.waiting_on:
                    ready.append(waiter)
        if ts.who_wants:
            msg = {"op": "memory", "key": ts.key, "who_has": [w.address for w in ts.who_has]}
            if value is not None:
                msg["value"] = value
            for cid in ts.who_wants:
                self._post(self.clients[cid].sender, msg)
        for waiter in ready:
            self._ready(waiter)
        for dep in ts.deps:
            _discard(dep, "waiters", ts)
            self._release_if_unneeded(dep)
        self._release_if_unneeded(ts)

    def _add_holder(self, ts: TaskState, ws: WorkerState) -> None:
        _add(ts, "who_has", ws)
        if ts not in ws.has_what:
            ws.has_what.add(ts)
            ws.nbytes += ts.nbytes

    def _on_task_erred(self, ws: WorkerState, key: Any, exception: Serialized,
                       traceback: str) -> None:
        ts = self.tasks.get(key)
        if ts is None or ts.state not in (PROCESSING, QUEUED, WAITING, NO_WORKER):
            return
        if ts.state == PROCESSING and ts.worker is ws:
            del ws.processing[ts]
            ts.worker = None
            self._dirty.add(ws)
        else:
            self._unschedule(ts)
        if ts.retries > 0:
            ts.retries -= 1
            logger.info("task %s failed, retrying (%d retries left)", key_name(key), ts.retries)
            ts.state = RELEASED
            self._activate([ts])
            return
        self._set_erred(ts, exception, traceback)

    def _on_missing_data(self, ws: WorkerState, key: Any, dep: Any,
                         holders: Iterable[str] = ()) -> None:
        """``ws`` could not get ``dep`` from ``holders`` to run ``key``."""
        dts = self.tasks.get(dep)
        if dts is not None and dts.who_has:
            for address in holders:
                holder = self.workers.get(address)
                if holder is not None and holder in dts.who_has:
                    dts.who_has.discard(holder)
                    holder.has_what.discard(dts)
                    holder.nbytes -= dts.nbytes
            if not dts.who_has and dts.state == MEMORY:
                # Every copy is gone though the holders still run: recompute or lose it.
                dts.state = RELEASED
                if dts.spec is None:
                    self._lose(dts, f"key {key_name(dep)!r} could not be fetched from "
                                    f"{', '.join(holders)} and has no task to recompute it")
        ts = self.tasks.get(key)
        if ts is None or ts.state != PROCESSING or ts.worker is not ws:
            return
        self._unschedule(ts)
        self._activate([ts])

    def _on_data_erred(self, ws: WorkerState, key: Any, exception: Serialized,
                       traceback: str) -> None:
        """A result in memory cannot be sent anywhere (it does not pickle): it is an error."""
        ts = self.tasks.get(key)
        if ts is None or ts.state != MEMORY:
            return
        msg = {"op": "delete_data", "keys": [key]}
        for holder in ts.who_has:
            holder.has_what.discard(ts)
            self._post(holder.sender, msg)
        ts.who_has = None
        self._set_erred(ts, exception, traceback)

    def _on_add_keys(self, ws: WorkerState, keys: dict, from_registration: bool = False) -> None:
        """``ws`` holds copies of ``keys``: inputs it fetched, or all it held when it registered.

        At registration, data the center does not know (it restarted) is kept
        as lineage-less keys, and needed keys that are being recomputed take
        the copy instead of running again.  Keys already reported lost stay
        lost.
        """
        unwanted = []
        for key, nbytes in keys.items():
            ts = self.tasks.get(key)
            if ts is None:
                if from_registration:
                    ts = self.tasks[key] = TaskState(key, None)
                    ts.state = MEMORY
                    ts.nbytes = nbytes
                    self._add_holder(ts, ws)
                else:
                    unwanted.append(key)
            elif ts.state == MEMORY:
                self._add_holder(ts, ws)
            # A loss already reported stays final: a copy that comes back is dropped.
            elif from_registration and ts.needed() and ts.state not in (ERRED, LOST):
                if ts.state in SCHEDULED or ts.state == WAITING:
                    self._unschedule(ts)
                ts.nbytes = nbytes
                self._to_memory(ts, ws)
            else:
                unwanted.append(key)
        if unwanted:
            self._post(ws.sender, {"op": "delete_data", "keys": unwanted})

    # ------------------------------------------------------------------ clients

    def _add_client(self, conn: Connection, sender: BatchedSender, client_id: str) -> None:
        self.clients[client_id] = ClientState(client_id, conn, sender)
        self._post(sender, {"op": "registered", "center": self.address})

    def _on_client_closed(self, conn: Connection, client_id: str) -> None:
        cs = self.clients.get(client_id)
        if cs is None or cs.conn is not conn:
            return
        del self.clients[client_id]
        cs.sender.close(timeout=0)
        for ts in cs.wants:
            _discard(ts, "who_wants", client_id)
            self._release_if_unneeded(ts)
        logger.info("client %s left; released %d keys", client_id[:8], len(cs.wants))

    def _on_client_msgs(self, conn: Connection, client_id: str, batch: list) -> None:
        cs = self.clients.get(client_id)
        if cs is None or cs.conn is not conn:
            return
        ops = self._client_ops
        for msg in batch:
            try:
                op = msg.pop("op", None)
                ops[op](cs, **msg)
            except Exception:
                logger.exception("bad message from client %s: %.200r", conn.peer, msg)

    def _update_graph(self, cs: ClientState, tasks: list = (), wants: Iterable = ()) -> None:
        """New tasks ``(key, spec, dep_keys, opts)`` and the keys this client wants."""
        new = []
        for key, spec, dep_keys, opts in tasks:
            ts = self.tasks.get(key)
            if ts is None:
                ts = self.tasks[key] = TaskState(key, spec)
            elif ts.spec is None and spec is not None and ts.state in (RELEASED, LOST):
                ts.spec = spec  # a key known only as data gains lineage
                ts.state = RELEASED
            else:
                continue
            new.append((ts, dep_keys, opts))
        for ts, dep_keys, opts in new:
            deps = []
            for k in dep_keys:
                dts = self.tasks.get(k)
                if dts is None:
                    dts = self.tasks[k] = TaskState(k, None)
                    dts.state = LOST
                    dts.tb = f"key {key_name(k)!r} is not known to the center (released or lost)"
                    dts.exc = wire.serialize(LostKeyError(dts.tb))
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
            ts = self.tasks.get(key)
            if ts is None:
                self._post(cs.sender, {"op": "lost", "key": key,
                                "reason": f"key {key_name(key)!r} is not known to the center"})
                continue
            _add(ts, "who_wants", cs.id)
            cs.wants.add(ts)
            if ts.state == RELEASED:
                roots.append(ts)
            else:
                self._report(ts, cs)
        self._activate(roots)

    def _report(self, ts: TaskState, cs: ClientState) -> None:
        """Tell one client where ``ts`` stands, if it has finished one way or another."""
        if ts.state == MEMORY:
            self._post(cs.sender, {"op": "memory", "key": ts.key,
                            "who_has": [w.address for w in ts.who_has]})
        elif ts.state == ERRED:
            self._post(cs.sender, {"op": "erred", "key": ts.key, "exception": ts.exc,
                            "traceback": ts.tb})
        elif ts.state == LOST:
            self._post(cs.sender, {"op": "lost", "key": ts.key, "reason": ts.tb or "lost"})

    def _on_release(self, cs: ClientState, keys: Iterable) -> None:
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None:
                continue
            _discard(ts, "who_wants", cs.id)
            cs.wants.discard(ts)
            self._release_if_unneeded(ts)

    def _on_scatter(self, cs: ClientState, data: dict) -> None:
        """The client put ``data`` (key -> (worker addresses, nbytes)) on workers itself."""
        for key, (addresses, nbytes) in data.items():
            ts = self.tasks.get(key)
            if ts is None:
                ts = self.tasks[key] = TaskState(key, None)
            _add(ts, "who_wants", cs.id)
            cs.wants.add(ts)
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
                self._post(cs.sender, {"op": "lost", "key": key,
                                "reason": f"key {key_name(key)!r} is not known to the center"})
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
        for dep in ts.deps:
            _add(dep, "waiters", ts)
            if dep.state != MEMORY:
                if waiting_on is None:
                    waiting_on = set()
                waiting_on.add(dep)
        ts.state = WAITING
        ts.waiting_on = waiting_on
        if waiting_on is None:
            self._ready(ts)

    def _ready(self, ts: TaskState) -> None:
        """Send a task whose inputs are all in memory to a worker, or queue it."""
        ts.waiting_on = None
        if ts.restrictions is not None:
            candidates = [ws for ws in self.workers.values() if ws.matches(ts.restrictions)]
            if not candidates:
                ts.state = NO_WORKER
                self.no_worker.add(ts)
                return
        else:
            candidates = self.workers.values()
        if not ts.deps:
            free = [ws for ws in candidates if ws.has_slot()]
            if free:
                self._assign(ts, min(free, key=WorkerState.occupancy))
            elif ts.restrictions is None or not candidates:
                ts.state = QUEUED
                ts.worker = None
                self.queued.append(ts)
            else:
                self._queue_on(ts, min(candidates, key=WorkerState.occupancy))
            return
        if not candidates:
            ts.state = QUEUED
            ts.worker = None
            self.queued.append(ts)
            return
        cost = self._move_cost
        best = min(candidates, key=lambda ws: (cost(ts, ws), ws.occupancy()))
        if best.has_slot():
            self._assign(ts, best)
        else:
            self._queue_on(ts, best)  # wait for the holder; a long backlog gets stolen from

    @staticmethod
    def _move_cost(ts: TaskState, ws: WorkerState) -> int:
        return sum(dep.nbytes for dep in ts.deps if ws not in (dep.who_has or ()))

    def _queue_on(self, ts: TaskState, ws: WorkerState) -> None:
        ts.state = QUEUED
        ts.worker = ws
        ws.pending.append(ts)

    def _assign(self, ts: TaskState, ws: WorkerState) -> None:
        ts.state = PROCESSING
        ts.worker = ws
        if not ws.processing:
            ws.last_progress = time.monotonic()
        ws.processing[ts] = None
        who_has = {}
        for dep in ts.deps:
            holders = dep.who_has or ()
            if ws not in holders:
                who_has[dep.key] = [w.address for w in holders]
        self._post(ws.sender, {"op": "compute", "key": ts.key, "spec": ts.spec, "who_has": who_has})

    def _fill_dirty(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for ws in sorted(dirty, key=WorkerState.occupancy):
            if self.workers.get(ws.address) is ws:
                self._fill(ws)

    def _fill(self, ws: WorkerState) -> None:
        """Give ``ws`` work for its free slots: its own queue, the global one, then steal."""
        while ws.has_slot():
            ts = self._pop_pending(ws) or self._pop_queued() or self._steal_for(ws)
            if ts is None:
                if len(ws.processing) < ws.nthreads:
                    self._take_back_for(ws)
                return
            self._assign(ts, ws)

    def _take_back_for(self, thief: WorkerState) -> None:
        """An idle worker asks stalled workers for tasks sitting in their prefetch.

        The victim gives back only tasks it has not started (``steal_response``),
        so nothing runs twice.  A victim not stalled yet is looked at again
        when it would be.
        """
        now = time.monotonic()
        wanted = thief.nthreads - len(thief.processing) - \
            sum(1 for t in self._stealing.values() if t is thief)
        for victim in self.workers.values():
            if wanted <= 0:
                return
            if victim is thief:
                continue
            since = victim.stalled_since()
            if since is None:
                continue
            if since > now:
                self._next_steal_check = min(self._next_steal_check, since)
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
                self._post(victim.sender, {"op": "steal", "key": ts.key})
                wanted -= 1

    def _on_steal_response(self, ws: WorkerState, key: Any, ok: bool) -> None:
        ts = self.tasks.get(key)
        thief = self._stealing.pop(ts, None) if ts is not None else None
        if not ok or ts is None or ts.state != PROCESSING or ts.worker is not ws:
            return
        del ws.processing[ts]
        self._dirty.add(ws)
        if thief is not None and self.workers.get(thief.address) is thief:
            self._assign(ts, thief)
        else:
            ts.worker = None
            ts.state = RELEASED
            self._activate([ts])

    def _check_stalls(self) -> None:
        self._next_steal_check = float("inf")
        for ws in list(self.workers.values()):
            if len(ws.processing) < ws.nthreads:
                self._take_back_for(ws)

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

    def _steal_for(self, thief: WorkerState) -> TaskState | None:
        """Take a task from the longest pending queue when its backlog is real."""
        victims = [ws for ws in self.workers.values()
                   if ws is not thief and len(ws.pending) > ws.capacity]
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

    def _unschedule(self, ts: TaskState) -> None:
        """Take a waiting/queued/processing task back to released (cancelling it on its worker)."""
        ws = ts.worker
        if ts.state == PROCESSING and ws is not None:
            ws.processing.pop(ts, None)
            if self.workers.get(ws.address) is ws:
                self._post(ws.sender, {"op": "cancel_compute", "key": ts.key})
                self._dirty.add(ws)
        elif ts.state == NO_WORKER:
            self.no_worker.discard(ts)
        ts.worker = None
        ts.waiting_on = None
        ts.state = RELEASED

    def _set_erred(self, ts: TaskState, exc: Serialized | None, tb: str | None) -> None:
        """Mark ``ts`` and every dependent waiting on it as erred with the same error."""
        stack = [ts]
        while stack:
            t = stack.pop()
            if t.state in (PROCESSING, QUEUED, NO_WORKER, WAITING):
                self._unschedule(t)
            t.state = ERRED
            t.exc, t.tb = exc, tb
            if t.who_wants:
                msg = {"op": "erred", "key": t.key, "exception": exc, "traceback": tb}
                for cid in t.who_wants:
                    self._post(self.clients[cid].sender, msg)
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
        exc = wire.serialize(LostKeyError(reason))
        waiters = list(ts.waiters or ())
        ts.waiters = None
        ts.state = LOST
        ts.exc, ts.tb = exc, reason
        for cid in ts.who_wants or ():
            self._post(self.clients[cid].sender, {"op": "lost", "key": ts.key, "reason": reason})
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
                for ws in t.who_has:
                    ws.has_what.discard(t)
                    ws.nbytes -= t.nbytes
                    self._post(ws.sender, msg)
                t.who_has = None
                t.state = RELEASED
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

    def worker_info(self) -> dict:
        """worker address -> name, threads, pid, running and held counts."""
        now = time.monotonic()
        return {ws.address: {"name": ws.name, "nthreads": ws.nthreads, "pid": ws.pid,
                             "processing": len(ws.processing), "keys": len(ws.has_what),
                             "nbytes": ws.nbytes, "last_seen": now - ws.last_seen}
                for ws in self.workers.values()}

    def info(self) -> dict:
        """Counts of tasks by state, of workers and of clients."""
        states: dict[str, int] = {}
        for ts in self.tasks.values():
            states[ts.state] = states.get(ts.state, 0) + 1
        return {"tasks": states, "ntasks": len(self.tasks), "workers": len(self.workers),
                "clients": len(self.clients), "queued": len(self.queued)}


def _advertised_host(bound: str) -> str:
    if bound not in ("0.0.0.0", "", "::"):
        return bound
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: picks the outward interface
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


# ---------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """``python -m minidist.center`` / ``dcenter``."""
    parser = argparse.ArgumentParser(prog="dcenter", description="Start a minidist center.")
    parser.add_argument("--port", type=int, default=wire.DEFAULT_PORT)
    parser.add_argument("--dashboard-port", type=int, default=None,
                        help="serve a JSON status page on this port")
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0,
                        help="seconds without news before a worker is declared dead")
    parser.add_argument("--allowed-failures", type=int, default=3,
                        help="worker deaths a task may witness before it errs with KilledWorker")
    parser.add_argument("--listen-fd", type=int, default=None,
                        help=argparse.SUPPRESS)  # used by LocalCluster: serve this socket
    add_common_args(parser)
    args = parser.parse_args(argv)
    security, host = start_process(args)
    center = Center(security=security, heartbeat_timeout=args.heartbeat_timeout,
                    allowed_failures=args.allowed_failures)
    try:
        sock = None if args.listen_fd is None else socket.socket(fileno=args.listen_fd)
        address = center.start(host, args.port, sock)
    except OSError as e:
        where = f"{host}:{args.port}" if args.listen_fd is None else f"socket {args.listen_fd}"
        print(f"cannot start center on {where}: {e}", file=sys.stderr)
        return 1
    if args.dashboard_port is not None:
        from .dashboard import serve_dashboard
        try:
            url = serve_dashboard(center, host, args.dashboard_port)
        except OSError as e:
            print(f"cannot serve the dashboard on port {args.dashboard_port}: {e}",
                  file=sys.stderr)
            center.stop()
            return 1
        logger.warning("status page at %s", url)
    if security.auth_key is None:
        logger.warning("no auth key: listening on %s only", host)
    run_until_signalled(center.stop, args.exit_on_stdin_close,
                        [f"Start center at {address}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
