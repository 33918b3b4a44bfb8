"""The center process: streams, handshake, batching and heartbeat timing around the scheduler.

Every scheduling decision lives in ``scheduler.py`` (the state machine,
with no I/O, and the life of one task drawn at its top).  This module
connects it to the world: it serves the streams of workers and clients,
feeds what they send to the ``Scheduler`` as events with the current
time, writes the messages each event returns, and decides when a silent
worker is dead.  The following diagram shows who talks to the center and
how::

  clients                     center process                              workers
 +----------+  update_graph  +-----------+           +---------------+  compute   +--------+
 | Executor |  release, ...  | handler   |  events   |  scheduler    | delete_data| worker |
 | Client   |--------------->| threads   |---------->|  thread       |----------->|        |
 | Pool     |<---------------| (one per  |  (queue)  |  (Scheduler:  |<-----------|        |
 +----------+ memory, erred, | connection|           |  every table) | finished,  +--------+
              lost           |  I/O only)|           +---------------+ erred, ...
                             +-----------+              |        |
                                    BatchedSender per stream <---+  (one frame per send)

Handler threads only read sockets and put what they read on the event
queue.  The scheduler thread is the only code that calls the
``Scheduler``, so there are no locks around its tables; what an event
returns goes through a ``BatchedSender`` per connection (the stream token
the scheduler was given), which never blocks it.

One shortcut keeps a quiet center fast: the scheduler's state is guarded
by a single *baton* (a lock the scheduler thread holds for each tick).  A
handler thread that has just read a batch and finds the baton free, with
nothing of its own stream still queued, takes it and runs the tick itself
(the same handlers, then the same flush), saving a thread switch per
message.  When the center is busy the baton is taken, events queue, and
the scheduler thread handles them in batches as above.  Either way one
thread at a time runs scheduler code, and the events of one stream are
handled in the order they were read.

Time: the scheduler thread wakes for the heartbeat check (a worker not
heard from for ``heartbeat_timeout`` is removed) and whenever the
scheduler's ``next_timer`` says it has something to do (stalled
prefetch, the no-workers timeout).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import queue
import socket
import sys
import threading
import time
import uuid
from typing import Any
from collections.abc import Callable, Iterable

from . import wire
from .cli import DefaultsHelpFormatter, add_common_args, run_until_signalled, start_process
from .history import History
from .scheduler import Outgoing, Scheduler
from .wire import NO_REPLY, BatchedSender, Connection, Security

logger = logging.getLogger("minidist.center")


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


class Center:
    """The center process's streams and threads around a ``Scheduler``.  ``start()`` serves."""

    def __init__(self, *, security: Security | None = None, heartbeat_timeout: float = 5.0,
                 allowed_failures: int = 3, prefetch: int = 1,
                 no_workers_timeout: float | None = None) -> None:
        self.security = security or Security()
        self.heartbeat_timeout = heartbeat_timeout
        self.history = History()  # recent task runs and events, for the dashboard and clients
        self.scheduler = Scheduler(allowed_failures=allowed_failures, prefetch=prefetch,
                                   no_workers_timeout=no_workers_timeout,
                                   id=uuid.uuid4().hex, history=self.history)
        self._outbox: set[BatchedSender] = set()  # streams with messages queued this tick
        self._registered_at: dict[BatchedSender, float] = {}  # worker stream -> told registered
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._baton = threading.Lock()  # held by whichever thread runs scheduler code
        self._wake_at = float("inf")    # when the idle scheduler thread next looks at the clock
        self._next_check = float("inf")  # next heartbeat check
        self._halted = False
        self._stopped = threading.Event()
        self.uploads: dict[str, bytes] = {}  # Client.upload_file's files, for every new worker
        sched = self.scheduler
        self.server = wire.Server({
            "register_worker": self._handle_worker_stream,
            "register_client": self._handle_client_stream,
            "who_has": self._query(sched.who_has),
            "has_what": self._query(sched.has_what),
            "nthreads": self._query(sched.nthreads),
            "workers": self._query(self.worker_info),
            "info": self._query(self.info),
            "task_stream": self._query(self.history.runs_since),
            "identity": lambda conn: {"type": "center", "pid": os.getpid()},
            "upload_file": self._upload_file,
            "uploads": lambda conn: dict(self.uploads),
        }, security=self.security, name="center")
        self._event_handlers: dict[str, Callable[..., Outgoing | None]] = {
            "worker_msgs": sched.worker_msgs,
            "client_msgs": sched.client_msgs,
            "add_worker": self._add_worker,
            "worker_closed": lambda now, sender, address: sched.worker_removed(
                now, address, "its connection closed", sender),
            "add_client": sched.client_added,
            "client_closed": sched.client_removed,
            "query": self._on_query,
            "wake": lambda now: None,
        }
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self.address = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self, host: str = "127.0.0.1", port: int = wire.DEFAULT_PORT,
              sock: socket.socket | None = None, contact_address: str | None = None) -> str:
        """Bind (or serve ``sock``, already listening), start the scheduler, return the address.

        The address is the one other hosts should dial: ``contact_address``
        (``HOST`` or ``HOST:PORT``) if given, else the bound interface, or for
        a wildcard bind the host's primary routable address.
        """
        wire.warn_if_exposed(host, self.security, "center")
        bound_host, bound_port = self.server.listen(host, port, sock)
        self.address = _contact_address(bound_host, bound_port, contact_address)
        self.scheduler.address = self.address
        self._thread.start()
        return self.address

    def stop(self) -> None:
        """Stop serving and close every stream."""
        self._events.put(("stop", (), None))
        self._stopped.wait(5)
        self.server.stop()

    # ------------------------------------------------------------------ handler threads (I/O only)

    def _handle_worker_stream(self, conn: Connection, address: str, nthreads: int,
                              name: str | None = None, data: dict | None = None,
                              pid: int | None = None, center_id: str | None = None) -> Any:
        sender = BatchedSender(conn, name=f"center->{address}")
        inbox = _Inbox()
        self._deliver(inbox, "add_worker", (sender, address, nthreads, name or address,
                                            data or {}, pid, center_id))
        self._pump(conn, inbox, "worker_msgs", sender, address)
        self._deliver(inbox, "worker_closed", (sender, address))
        return NO_REPLY

    def _handle_client_stream(self, conn: Connection, client_id: str) -> Any:
        sender = BatchedSender(conn, name=f"center->client-{client_id[:8]}")
        inbox = _Inbox()
        self._deliver(inbox, "add_client", (sender, client_id))
        self._pump(conn, inbox, "client_msgs", sender, client_id)
        self._deliver(inbox, "client_closed", (sender, client_id))
        return NO_REPLY

    def _pump(self, conn: Connection, inbox: _Inbox, kind: str, sender: BatchedSender,
              who: str) -> None:
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
            self._deliver(inbox, kind, (sender, who, batch))

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
                    now = time.monotonic()
                    self._handle(kind, args, now)
                    self._end_tick(now)
                    timer = self.scheduler.next_timer
                    if timer < self._wake_at:  # the scheduler thread sleeps until then
                        self._wake_at = timer
                        self._events.put(("wake", (), None))
                    return
            finally:
                self._baton.release()
        inbox.queued += 1
        self._events.put((kind, args, inbox))

    def _upload_file(self, conn: Connection, name: str, content: bytes) -> list[str]:
        """Keep a client's file for workers that register from now on; answer the others."""
        from .uploads import check_name
        self.uploads[check_name(name)] = bytes(content)
        return sorted(self._query(self.scheduler.nthreads)(conn))

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
        sched = self.scheduler
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
                    self._handle(kind, args, time.monotonic())
                    if inbox is not None:
                        inbox.handled += 1
                now = time.monotonic()
                if now >= self._next_check:
                    self._next_check = now + check_every
                    self._check_heartbeats(now)
                self._end_tick(now)
                self._wake_at = min(self._next_check, sched.next_timer)
        for ws in list(sched.workers.values()):
            ws.stream.close()
            ws.stream.conn.close()
        for cs in list(sched.clients.values()):
            cs.stream.close()
            cs.stream.conn.close()
        self._stopped.set()

    def _handle(self, kind: str, args: tuple, now: float) -> None:
        try:
            out = self._event_handlers[kind](now, *args)
        except Exception:
            logger.exception("scheduler failed on %s event", kind)
            if kind in ("add_worker", "add_client"):
                # Its peer would wait forever for "registered": hang up on it instead, so
                # it sees a closed connection (and a worker dials again).
                sender = args[0]
                sender.close(timeout=0)
                sender.conn.close()
            return
        if out:
            self._send(out)

    def _send(self, out: Outgoing) -> None:
        """Queue what an event returned on its streams; closing a stream drops the rest."""
        outbox = self._outbox
        for sender, msgs in out.items():
            for msg in msgs:
                if msg is None:
                    sender.close(timeout=0)
                    sender.conn.close()
                    break
                sender.append(msg)
            outbox.add(sender)

    def _end_tick(self, now: float) -> None:
        """Let the scheduler act on the time if it asked to; write what the tick queued."""
        if now >= self.scheduler.next_timer:
            self._send(self.scheduler.tick(now))
        for sender in self._outbox:
            sender.flush()
        self._outbox.clear()

    def _on_query(self, now: float, fn: Callable[..., Any], kwargs: dict,
                  reply: queue.SimpleQueue) -> None:
        try:
            reply.put((True, fn(**kwargs)))
        except Exception as e:
            reply.put((False, e))

    def _add_worker(self, now: float, sender: BatchedSender, *args: Any) -> Outgoing | None:
        """Register a worker and tell it so at once: its heartbeats start when it reads that."""
        out = self.scheduler.worker_added(now, sender, *args)
        if out:
            self._send(out)
        if sender in self._outbox:
            sender.flush()
        self._registered_at[sender] = time.monotonic()
        return None

    def _silent_since(self, ws: Any) -> float:
        """Since when (monotonic) worker ``ws`` has been silent though it could have spoken.

        Measured by the handler thread reading its stream, not by when the
        scheduler gets to what it read: a scheduler busy for seconds with a
        large graph must not count that time against workers whose heartbeats
        wait in its queue.  Nor does the time before the worker was told it is
        registered count: it sends nothing until then.
        """
        stream = ws.stream
        return max(stream.conn.quiet_since(), self._registered_at.get(stream, 0.0))

    def _check_heartbeats(self, now: float) -> None:
        for sender in [s for s in self._registered_at if s.conn.closed]:
            del self._registered_at[sender]
        for ws in list(self.scheduler.workers.values()):
            silent = now - self._silent_since(ws)
            if silent > self.heartbeat_timeout and not ws.stream.conn.input_waiting():
                # (Bytes waiting: it spoke while this process was too busy to read them.)
                self._send(self.scheduler.worker_removed(
                    now, ws.address, f"no heartbeat for {silent:.1f}s"))

    # ------------------------------------------------------------------ queries

    def who_has(self, keys: Iterable | None = None) -> dict:
        """key -> addresses of the workers holding it (all keys in memory by default)."""
        return self.scheduler.who_has(keys)

    def worker_info(self) -> dict:
        """worker address -> name, threads, pid, running and held counts."""
        return self.scheduler.worker_info(time.monotonic())

    def info(self) -> dict:
        """Counts of tasks by state, of workers and of clients."""
        return self.scheduler.info()


def _contact_address(bound_host: str, bound_port: int, contact: str | None) -> str:
    if contact:
        host, sep, port = contact.rpartition(":")
        if sep and port.isdigit():
            return wire.format_address(host.strip("[]"), int(port))
        return wire.format_address(contact.strip("[]"), bound_port)
    return wire.format_address(wire.reachable_host(bound_host), bound_port)


# ---------------------------------------------------------------------- command line


GC_THRESHOLDS = (50_000, 10, 10)
"""The center's cyclic garbage collector: a young collection every 50,000 allocations."""


def tune_gc() -> None:
    """Make the center's garbage collection cost the same per task at any number of tasks.

    The center keeps a few objects that the cyclic collector tracks for every
    task it knows, and they are freed by reference counting when the task is
    forgotten.  With CPython's default thresholds (700, 10, 10) a full
    collection, which visits every tracked object, runs each time a quarter
    more objects have survived into the old generation: with 200,000 pending
    tasks that was 16 full collections and 2.6 s of 3.1 s spent in the
    collector, about 12 us per task, growing with the task count.  The objects
    of start-up are frozen (never visited again), and young collections run
    every 50,000 allocations instead of 700, which makes full ones about 70
    times rarer; cyclic garbage (tracebacks, mostly) still goes within
    50,000 allocations.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main(argv: list[str] | None = None) -> int:
    """``python -m minidist.center`` / ``dcenter``."""
    parser = argparse.ArgumentParser(prog="dcenter", description="Start a minidist center.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--port", type=int, default=wire.DEFAULT_PORT,
                        help="port to serve clients and workers on (0: any free port)")
    parser.add_argument("--dashboard-port", type=int, default=None,
                        help="serve the dashboard (page, JSON, /metrics) on this port (0: any; "
                             "default: no dashboard)")
    parser.add_argument("--dashboard-host", default=None,
                        help="interface for the dashboard (default: --host if given, "
                        "else 127.0.0.1; it has no authentication)")
    parser.add_argument("--dashboard-allowed-host", action="append", default=[], metavar="NAME",
                        help="a host name the dashboard may be reached by, besides its "
                        "address, localhost and --contact-address (repeatable); other "
                        "Host headers get 403")
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0,
                        help="seconds without news before a worker is declared dead")
    parser.add_argument("--allowed-failures", type=int, default=3,
                        help="worker deaths a task may witness before it errs with KilledWorker")
    parser.add_argument("--no-workers-timeout", type=float, default=None, metavar="S",
                        help="err tasks that no worker could run for S seconds (no workers, "
                             "or none matching their workers=); default: wait forever")
    parser.add_argument("--contact-address", default=None,
                        help="HOST or HOST:PORT that workers and clients should dial "
                             "(default: the bound interface, or the host's routable address)")
    parser.add_argument("--listen-fd", type=int, default=None,
                        help=argparse.SUPPRESS)  # used by LocalCluster: serve this socket
    add_common_args(parser)
    args = parser.parse_args(argv)
    security, host = start_process(args)
    tune_gc()
    center = Center(security=security, heartbeat_timeout=args.heartbeat_timeout,
                    allowed_failures=args.allowed_failures,
                    no_workers_timeout=args.no_workers_timeout)
    if args.dashboard_port is not None:
        from .dashboard import serve_dashboard  # imports http.server (and ssl) before serving
    try:
        sock = None if args.listen_fd is None else socket.socket(fileno=args.listen_fd)
        address = center.start(host, args.port, sock, contact_address=args.contact_address)
    except OSError as e:
        where = f"{host}:{args.port}" if args.listen_fd is None else f"socket {args.listen_fd}"
        print(f"cannot start center on {where}: {e}", file=sys.stderr)
        return 1
    ready = [f"Start center at {address}"]
    if args.dashboard_port is not None:
        dashboard_host = args.dashboard_host or args.host or "127.0.0.1"
        try:
            url = serve_dashboard(center, dashboard_host, args.dashboard_port,
                                  args.dashboard_allowed_host)
        except OSError as e:
            print(f"cannot serve the dashboard on {dashboard_host}:{args.dashboard_port}: {e}",
                  file=sys.stderr)
            center.stop()
            return 1
        ready.append(f"Dashboard at {url}")
        if dashboard_host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning("the dashboard on %s has no authentication: anyone who can reach "
                           "it sees worker addresses, task keys and errors", dashboard_host)
    if security.auth_key is None:
        logger.warning("no auth key: listening on %s only", host)
    run_until_signalled(center.stop, args.exit_on_stdin_close, ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
