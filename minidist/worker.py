"""The worker: holds data, runs tasks, serves its data to peers and clients.

The following diagram shows the threads of one worker and what flows
between them::

  center  --compute, delete_data, cancel_compute-->  center-stream thread
          <--task_finished, task_erred, add_keys---  BatchedSender    |
                    ^                                                 |  inputs here?
                    |                      yes                        v
                    +---- task threads <---------- ready queue <--+--(...)
                          (nthreads)                              |  no
                                                                  v
                                  fetch threads --get_data--> peer workers

  peers, clients --get_data, update_data, delete_data--> Server (a thread per connection)

Life of one task, ``compute(key, spec, who_has)`` from the center:

1. The center-stream thread reads the batch.  If every input named in
   ``who_has`` is already in ``data``, the task goes to the ready queue.
2. Otherwise the missing inputs are fetched from their holders, one
   ``get_data`` per holder, in parallel on the fetch threads; an input
   already being fetched for another task is awaited, not fetched twice.
   Fetched inputs are kept and reported to the center (``add_keys``) so
   later tasks can use them here.  An input no holder can give is
   reported as ``missing_data`` and the center reschedules.
3. A task thread unpacks the RunSpec, swaps references for values and
   calls the function.  The result stays in ``data``; the center hears
   ``task_finished`` with its size (and, for a small builtin or numpy
   result, its pickle, which the center passes on to waiting clients),
   or ``task_erred`` with the pickled exception and the traceback text;
   either carries ``run``, the run's ``(start, stop, thread)`` (wall-clock
   seconds and the task thread's number), for the center's task stream.
4. Clients and peers fetch the value with ``get_data`` when they need it;
   the center sends ``delete_data`` when nobody needs it any more.

If the center connection breaks, the worker keeps its data and dials
again with backoff; on registering it reports every key it holds.

Memory (``memory.py``): ``data`` is a ``SpillBuffer``, which moves least
recently used keys to files in the worker's local directory when the
memory limit's target is passed and reads them back when a task, peer or
client asks for them; ``get_data`` sends a spilled key's file frames as
they are.  A key whose file cannot be read back (deleted, damaged) is
dropped and reported with ``lost_data``: the center recomputes it or errs
whoever needs it.  A ``MemoryManager`` watches the RSS: above the pause
threshold the task threads start nothing new (the center hears
``memory`` with ``paused`` and sends no more work) until it drops, and
an idle worker trims freed memory.
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import os
import queue
import random
import sys
import threading
import time
from concurrent.futures import Future as _Future
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast
from collections.abc import Callable

from . import wire
from .cli import (DefaultsHelpFormatter, add_common_args, run_until_signalled, start_process,
                  tell_status)
from .memory import (LocalDirectory, MemoryManager, SpillBuffer, SpillError,
                     make_local_directory, parse_memory_limit, sizeof, tune_allocator)
from .task import RunSpec, captured_warnings, pack_exception, pack_warnings, run
from .wire import BatchedSender, Connection, ConnectionPool, Security

logger = logging.getLogger("minidist.worker")

_FIRST_RETRY = 0.005
"""Seconds before the first redial of an unreachable center; doubles up to 2 s."""

INLINE_BYTES = 1024
"""Results whose pickle is at most this long ride with ``task_finished`` to waiting clients."""

_INLINE_TYPES = frozenset({type(None), bool, int, float, complex, str, bytes, tuple, list,
                           dict, set, frozenset})


def _small_value(result: Any, nbytes: int) -> wire.Serialized | None:
    """The pickled result if it is small enough to travel with its event, else None.

    Only builtin values and objects that report ``nbytes`` (numpy) qualify,
    because ``sizeof`` estimates them well: a large result is pickled here
    only when it is a container whose unsampled items are large, and the
    length check below then drops it.
    """
    if nbytes > INLINE_BYTES or (type(result) not in _INLINE_TYPES
                                 and not isinstance(getattr(result, "nbytes", None), int)):
        return None
    try:
        value = wire.serialize(result)
    except BaseException:  # noqa: B036 - clients asking with get_data get the error
        return None
    return value if not value.buffers and len(value.header) <= INLINE_BYTES else None


class _TaskItem:
    """A task received from the center, on its way to a task thread."""

    __slots__ = ("key", "spec", "deps", "missing", "cancelled")

    def __init__(self, key: Any, spec: RunSpec, deps: Any = ()) -> None:
        self.key = key
        self.spec = spec
        self.deps = deps  # keys of its inputs
        self.missing = 0  # inputs still being fetched
        self.cancelled = False


class Worker:
    """A worker process's state and threads.  ``start()`` serves and registers."""

    def __init__(self, center_address: str, *, nthreads: int = 1, name: str | None = None,
                 security: Security | None = None, contact_address: str | None = None,
                 heartbeat_interval: float = 1.0, death_timeout: float | None = None,
                 memory_limit: int | None = None, local_directory: str | None = None) -> None:
        self.center_address = wire.format_address(*wire.parse_address(center_address))
        self.nthreads = max(1, int(nthreads))
        self.name = name
        self.security = security or Security()
        self.contact_address = contact_address
        self.heartbeat_interval = heartbeat_interval
        self.death_timeout = death_timeout
        self.address = ""
        self.memory_limit = memory_limit or None
        self.local_directory_parent = local_directory
        self.local_directory: LocalDirectory | None = None  # made by start(), removed by stop()
        self.on_local_directory: Callable[[str], None] | None = None  # told each path it uses
        self.data = SpillBuffer()
        self.nbytes: dict[Any, int] = {}
        self.executed = 0
        self._running: dict[_TaskItem, None] = {}  # tasks executing now
        self.memory = MemoryManager(self.data, self.memory_limit, is_idle=self._is_idle,
                                    activity=lambda: self.executed, report=self._send)
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: dict[Any, _TaskItem] = {}  # received, not started: what a cancel stops
        self._waiting_lock = threading.Lock()  # a task is either started or taken back, not both
        self._fetching: dict[Any, _Future] = {}
        self._fetch_lock = threading.Lock()
        self._fetch_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fetch")
        self._peers = ConnectionPool(self.security)
        self._conn: Connection | None = None
        self._sender: BatchedSender | None = None
        self._registered = threading.Event()
        self._center_id: str | None = None
        self._stopping = threading.Event()
        self._fatal: BaseException | None = None
        self._uploaded: dict[str, str] = {}  # file name -> digest of what is installed
        self.server = wire.Server({
            "get_data": self._get_data,
            "update_data": self._update_data,
            "delete_data": self._delete_data,
            "keys": lambda conn: list(self.data),
            "run": self._run_function,
            "upload_file": self._upload_file,
            "identity": lambda conn: {"type": "worker", "address": self.address,
                                      "pid": os.getpid(), "nthreads": self.nthreads},
        }, security=self.security, name="worker")
        self._stream_ops: dict[str, Callable[..., Any]] = {
            "compute": self._compute,
            "delete_data": self._on_delete_data,
            "cancel_compute": self._on_cancel,
            "steal": self._on_steal,
            "worker_left": lambda address: self._peers.abort(address),
            "registered": lambda center=None, id=None: None,
        }
        self._bind_host = "127.0.0.1"

    # ------------------------------------------------------------------ lifecycle

    def start(self, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> str:
        """Serve on ``host:port``, register with the center and start the task threads."""
        wire.warn_if_exposed(host, self.security, "worker")
        self._bind_host = host
        self.make_local_directory()
        assert self.local_directory is not None  # just made
        tune_allocator()
        try:
            self.server.listen(host, port)
        except OSError:
            self.local_directory.remove()
            raise
        self.memory.start()
        for i in range(self.nthreads):
            threading.Thread(target=self._task_loop, args=(i,), name=f"task-{i}",
                             daemon=True).start()
        threading.Thread(target=self._center_loop, name="center-stream", daemon=True).start()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        try:
            self._wait_registered(timeout)
        except BaseException:  # a signal while registering too: leave no directory behind
            self.stop()
            raise
        return self.address

    def _wait_registered(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._registered.wait(0.05):
            if self._fatal is not None:
                raise self._fatal
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not register with center {self.center_address} "
                                   f"within {timeout}s")

    def stop(self) -> None:
        """Tell the center we leave, then close everything."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        sender = self._sender
        if sender is not None and self._registered.is_set():
            sender.send({"op": "unregister"})
            sender.close(timeout=2)
        if self._conn is not None:
            self._conn.close()
        self.server.stop()
        for _ in range(self.nthreads):
            self._ready.put(None)
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        self._peers.close()
        self.memory.stop()
        if self.local_directory is not None:
            self.data.clear_files()
            self.local_directory.remove()

    def make_local_directory(self) -> str:
        """Make the worker's private spill directory (``start`` does, if not done); its path.

        Stale directories of dead workers in the same place are removed first.
        """
        if self.local_directory is None:
            try:
                directory = make_local_directory(self.local_directory_parent)
            except OSError as e:
                raise OSError(e.errno, f"cannot create a local directory in "
                              f"{self.local_directory_parent or 'the temporary directory'}: "
                              f"{e.strerror or e}") from e
            directory.on_renew = self.on_local_directory
            self.local_directory = self.data.directory = directory
            if self.on_local_directory is not None:
                self.on_local_directory(directory.path)
        return self.local_directory.path

    # ------------------------------------------------------------------ center stream

    def _center_loop(self) -> None:
        # A refused dial on a local network costs next to nothing, and a center
        # started alongside its workers is usually listening within milliseconds.
        delay = _FIRST_RETRY
        lost_since = time.monotonic()
        while not self._stopping.is_set():
            try:
                conn = self._register()
            except wire.AuthenticationError as e:
                logger.error("cannot register with center %s: %s", self.center_address, e)
                self._fatal = e
                if self._registered.is_set():  # refused on reconnecting: no way back, stop
                    os.kill(os.getpid(), 15)
                return
            except Exception as e:
                if not isinstance(e, OSError):  # a bug, not the network: say so loudly
                    logger.exception("registering with center %s failed", self.center_address)
                if self.death_timeout is not None and \
                        time.monotonic() - lost_since > self.death_timeout:
                    logger.error("center %s unreachable for %.0fs; giving up",
                                 self.center_address, self.death_timeout)
                    self._fatal = e
                    os.kill(os.getpid(), 15)
                    return
                logger.info("center %s unreachable (%s); retrying in %.1fs",
                            self.center_address, e, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = _FIRST_RETRY
            self._serve_center(conn)
            lost_since = time.monotonic()
            if not self._stopping.is_set():
                logger.warning("lost the center %s; reconnecting", self.center_address)

    def _register(self) -> Connection:
        self._fetch_uploads()  # before any task can arrive: what clients uploaded
        conn = wire.connect(self.center_address, security=self.security)
        if not self.address:
            self.address = self.contact_address or wire.format_address(
                self._reachable_host(conn), self.server.port)
        held = dict(self.nbytes)
        conn.send({"op": "register_worker", "address": self.address,
                   "nthreads": self.nthreads, "name": self.name or self.address,
                   "data": held, "pid": os.getpid(),
                   "center_id": self._center_id})
        batch = conn.recv()
        if not batch or batch[0].get("op") != "registered":
            conn.close()
            raise ConnectionError(f"unexpected registration reply {batch!r:.200}")
        self._center_id = batch[0].get("id")  # the same center again: it knows what it released
        # Tasks queued for the previous registration were rescheduled by the center.
        self._drain_ready()
        self._conn = conn
        self._sender = BatchedSender(conn, name="worker->center")
        self._registered.set()
        self.memory.resend()
        # A task that finished while no stream was up could not say so: report it now.
        late = {k: n for k, n in list(self.nbytes.items()) if k not in held}
        if late:
            self._send({"op": "add_keys", "keys": late, "from_registration": True})
        self._fetch_uploads()  # and what was uploaded while this worker registered
        for msg in batch[1:]:
            self._dispatch(msg)
        return conn

    def _fetch_uploads(self) -> None:
        try:
            uploads = self._peers.call(self.center_address, "uploads")
        except (ConnectionError, OSError) as e:
            logger.info("could not ask the center for uploaded files: %s", e)
            return
        for name, content in uploads.items():
            self._upload_file(None, name, content)

    def _reachable_host(self, conn: Connection) -> str:
        """The host to advertise: the bound interface, or with a wildcard bind the local end
        of the route to the center (the host's routable address if that is loopback)."""
        if self._bind_host not in wire.WILDCARD_HOSTS:
            return self._bind_host
        host = conn.sock.getsockname()[0]
        return wire.reachable_host() if host.startswith("127.") else host

    def _serve_center(self, conn: Connection) -> None:
        while True:
            try:
                batch = conn.recv()
            except ConnectionError:
                break
            for msg in batch:
                self._dispatch(msg)
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close(timeout=0)
        conn.close()

    def _dispatch(self, msg: dict) -> None:
        op = msg.pop("op")
        try:
            self._stream_ops[op](**msg)
        except Exception:
            logger.exception("failed to handle %r from the center", op)

    def _send(self, msg: dict) -> None:
        sender = self._sender
        if sender is not None:
            sender.send(msg)

    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(self.heartbeat_interval):
            self._send({"op": "heartbeat"})

    def _drain_ready(self) -> None:
        with self._waiting_lock:
            for item in self._waiting.values():  # the center reschedules them after registration
                item.cancelled = True
            self._waiting.clear()
        while True:
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self._ready.put(None)
                return

    # ------------------------------------------------------------------ center ops

    def _compute(self, key: Any, spec: RunSpec, who_has: dict) -> None:
        if key in self.data:
            self._send({"op": "task_finished", "key": key, "nbytes": self.nbytes.get(key, 0)})
            return
        item = _TaskItem(key, spec, who_has.keys())
        with self._waiting_lock:
            self._waiting[key] = item
        missing = {dep: holders for dep, holders in who_has.items() if dep not in self.data}
        if not missing:
            self._ready.put(item)
            return
        item.missing = len(missing)
        for fut in self._fetch_futures(missing):
            fut.add_done_callback(functools.partial(self._input_arrived, item))

    def _on_delete_data(self, keys: list) -> None:
        for key in keys:
            self.data.discard(key)
            self.nbytes.pop(key, None)

    def _on_cancel(self, key: Any) -> None:
        # Only a task not started yet is stopped; a cancel that finds none (the task
        # already ran) leaves no mark that could swallow a later compute of the key.
        self._take_back(key)

    def _on_steal(self, key: Any) -> None:
        """The center wants to run a task elsewhere: give it back if it has not started."""
        self._send({"op": "steal_response", "key": key, "ok": self._take_back(key)})

    def _take_back(self, key: Any) -> bool:
        with self._waiting_lock:
            item = self._waiting.pop(key, None)
            if item is None:
                return False
            item.cancelled = True
            return True

    def _take_waiting(self, item: _TaskItem) -> bool:
        """A task thread claims ``item``; False if it was cancelled or taken back first."""
        with self._waiting_lock:
            if self._waiting.get(item.key) is item:
                del self._waiting[item.key]
            return not item.cancelled

    # ------------------------------------------------------------------ fetching inputs

    def _fetch_futures(self, missing: dict) -> list[_Future]:
        """One future per missing input; inputs already in flight are shared."""
        futures: list[_Future] = []
        groups: dict[str | None, list[tuple[Any, list]]] = {}
        with self._fetch_lock:
            for dep, holders in missing.items():
                fut = self._fetching.get(dep)
                if fut is None:
                    fut = self._fetching[dep] = _Future()
                    holder = random.choice(holders) if holders else None
                    groups.setdefault(holder, []).append((dep, holders))
                futures.append(fut)
        for holder, deps in groups.items():
            self._fetch_pool.submit(self._fetch_group, holder, deps)
        return futures

    def _fetch_group(self, holder: str | None, deps: list) -> None:
        got: dict = {}
        errors: dict = {}
        if holder is not None:
            got, errors = self._get_from(holder, [dep for dep, _ in deps])
        for dep, holders in deps:
            if dep not in got and dep not in errors:
                for other in holders:  # try the other holders one by one
                    if other == holder:
                        continue
                    more, errs = self._get_from(other, [dep])
                    got.update(more)
                    errors.update(errs)
                    if dep in got or dep in errors:
                        break
        added = {}
        for dep, holders in deps:
            with self._fetch_lock:
                fut = self._fetching.pop(dep)
            if dep in got:
                value = got[dep]
                if dep not in self.data:
                    nbytes = self.nbytes[dep] = added[dep] = sizeof(value)
                    self.data.put(dep, value, nbytes)
                fut.set_result(None)
            elif dep in errors:
                fut.set_exception(_InputError(dep, holders, errors[dep]))
            else:
                fut.set_exception(_InputError(dep, holders, None))
        if added:
            self._send({"op": "add_keys", "keys": added})

    def _get_from(self, holder: str, keys: list) -> tuple[dict, dict]:
        got: dict = {}
        errors: dict = {}
        while keys:  # a holder reading spilled keys back sends them a few at a time
            try:
                reply = self._peers.call(holder, "get_data", keys=keys)
            except (ConnectionError, wire.RemoteError, OSError) as e:
                logger.info("could not fetch %d keys from %s: %s", len(keys), holder, e)
                break
            for key, blob in reply["data"].items():
                got[key] = wire.deserialize(blob)
            errors.update(reply.get("errors", {}))
            keys = reply.get("later") or []
        return got, errors

    def _input_arrived(self, item: _TaskItem, fut: _Future) -> None:
        exc = fut.exception()
        if exc is not None:
            assert isinstance(exc, _InputError)  # the only error a fetch sets
            if item.missing <= 0:
                return  # already failed for another input
            item.missing = -1
            self._take_waiting(item)
            if exc.error is not None:  # the holder could not serialize it: an error, not a loss
                blob, tb = exc.error
                self._send({"op": "task_erred", "key": item.key, "exception": blob,
                            "traceback": tb})
            else:
                self._send({"op": "missing_data", "key": item.key, "dep": exc.key,
                            "holders": exc.holders})
            return
        item.missing -= 1
        if item.missing == 0:
            self._ready.put(item)

    # ------------------------------------------------------------------ running tasks

    def _task_loop(self, thread: int) -> None:
        memory = self.memory
        unpaused = memory.unpaused
        while True:
            item = self._ready.get()
            if item is None:
                return
            memory.before_task()
            if not unpaused.is_set():  # paused for memory: start nothing until it drops
                unpaused.wait()
            if self._take_waiting(item):
                self._running[item] = None
                try:
                    self._execute(item, thread)
                finally:
                    del self._running[item]

    def _is_idle(self) -> bool:
        return not self._running and not self._waiting

    def _execute(self, item: _TaskItem, thread: int = 0) -> None:
        """Run one task on task thread number ``thread``; report it with its run times."""
        key = item.key
        gone = [dep for dep in item.deps if dep not in self.data]
        if gone:  # dropped here since the task was queued (its spill file was damaged):
            # the center, told already, reschedules the task once the input is back
            self._send({"op": "missing_data", "key": key, "dep": gone[0], "holders": []})
            return
        start = time.time()
        records: dict = {}
        try:
            with captured_warnings() as records:
                result = run(item.spec, self.data)
        except BaseException as e:  # a task must never take a worker thread down
            if isinstance(e, SpillError) and e.key is not None and e.key != key:
                # An input's spill file is gone or damaged: the center recomputes the
                # input (or errs who needs it) and runs this task again.
                self._lost([e.key], str(e))
                self._send({"op": "missing_data", "key": key, "dep": e.key, "holders": []})
                return
            blob, tb = pack_exception(e)
            msg = {"op": "task_erred", "key": key, "exception": blob, "traceback": tb,
                   "run": (start, time.time(), thread)}
            if records:
                msg["warnings"] = pack_warnings(key, records)
            self._send(msg)
            return
        finally:
            self.executed += 1
        stop = time.time()
        nbytes = self.nbytes[key] = sizeof(result)
        self.data.put(key, result, nbytes)
        msg = {"op": "task_finished", "key": key, "nbytes": nbytes, "duration": stop - start,
               "run": (start, stop, thread)}
        value = _small_value(result, nbytes)
        if value is not None:
            msg["value"] = value
        if records:
            msg["warnings"] = pack_warnings(key, records)
        self._send(msg)
        self.memory.after_put()

    # ------------------------------------------------------------------ peer / client ops

    def _run_function(self, conn: Connection, call: wire.Serialized) -> dict:
        """``Client.run``: call a function in this process now (not as a task)."""
        try:
            fn, args, kwargs = wire.deserialize(call)
            return {"status": "OK", "result": wire.serialize(fn(*args, **kwargs))}
        except BaseException as e:  # noqa: B036 - the caller gets it, naming this worker
            blob, tb = pack_exception(e)
            return {"status": "error", "exception": blob, "traceback": tb}

    def _upload_file(self, conn: Connection | None, name: str, content: bytes) -> dict:
        """``Client.upload_file``: install a ``.py``, ``.zip`` or ``.egg`` for tasks to import."""
        from .uploads import install
        try:
            assert self.local_directory is not None  # made by start()
            install(os.path.join(self.local_directory.path, "uploads"), name, bytes(content),
                    self._uploaded)
            return {"status": "OK"}
        except BaseException as e:  # noqa: B036 - the uploading client gets it
            logger.warning("installing the uploaded %s failed: %r", name, e)
            blob, tb = pack_exception(e)
            return {"status": "error", "exception": blob, "traceback": tb}

    def _get_data(self, conn: Connection, keys: list) -> dict:
        data, errors, missing, lost, later = {}, {}, [], {}, []
        budget, spent = self.memory.read_budget(), 0
        for key in keys:
            cost = self.data.on_disk(key) if budget is not None else 0
            if cost:  # spilled keys beyond the budget: in the next request
                assert budget is not None  # a cost is counted only against a budget
                if spent and spent + cost > budget:
                    later.append(key)
                    continue
                spent += cost
            try:
                in_memory, value = self.data.serialized(key)
            except KeyError:
                missing.append(key)
                continue
            except SpillError as e:  # logged; the key is lost here
                missing.append(key)
                lost[key] = str(e)
                continue
            if not in_memory:  # a spilled key: its file's frames, as they are
                data[key] = value
                continue
            try:
                data[key] = wire.serialize(value)
            except BaseException as e:  # noqa: B036 - SystemExit in a __reduce__ is its error
                err: BaseException = e
                if isinstance(e, Exception):
                    err = wire.SerializationError(
                        f"result of {key!r} ({type(value).__qualname__}) cannot be pickled: {e}")
                errors[key] = pack_exception(err)
                self._send({"op": "data_erred", "key": key, "exception": errors[key][0],
                            "traceback": errors[key][1]})
        if lost:
            self._lost(list(lost), "; ".join(lost.values()))
        return {"data": data, "errors": errors, "missing": missing, "later": later}

    def _lost(self, keys: list, reason: str) -> None:
        """Drop keys whose spill files cannot be read back and tell the center they are lost."""
        for key in keys:
            self.data.discard(key)
            self.nbytes.pop(key, None)
        self._send({"op": "lost_data", "keys": keys, "reason": reason})

    def _update_data(self, conn: Connection, data: dict) -> dict:
        nbytes = {}
        for key, blob in data.items():
            value = wire.deserialize(blob)
            nbytes[key] = self.nbytes[key] = sizeof(value)
            self.data.put(key, value, nbytes[key])
        return nbytes

    def _delete_data(self, conn: Connection, keys: list) -> None:
        self._on_delete_data(keys)


class _InputError(Exception):
    def __init__(self, key: Any, holders: list, error: Any) -> None:
        super().__init__(key)
        self.key, self.holders, self.error = key, holders, error


def main(argv: list[str] | None = None) -> int:
    """``python -m minidist.worker HOST:PORT`` / ``dworker``: workers under a nanny by default."""
    parser = argparse.ArgumentParser(prog="dworker", description="Start a minidist worker.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("center", help="address of the center, HOST:PORT")
    parser.add_argument("--nthreads", type=int, default=1, help="task threads")
    parser.add_argument("--port", type=int, default=0, help="port to serve data on (0: any)")
    parser.add_argument("--name", default=None,
                        help="name shown by the center and the dashboard (several workers: "
                             "NAME-0, NAME-1, ...; default: the worker's address)")
    parser.add_argument("--contact-address", default=None,
                        help="HOST:PORT that peers and clients should dial (NAT, containers)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0,
                        help="seconds between heartbeats to the center")
    parser.add_argument("--death-timeout", type=float, default=None,
                        help="exit when the center is unreachable this many seconds (default: "
                             "keep trying)")
    parser.add_argument("--nworkers", type=int, default=1,
                        help="worker processes to start, each on its own port")
    parser.add_argument("--memory-limit", default="auto", metavar="LIMIT",
                        help="memory per worker: bytes, '4GB', '512MiB', a fraction of the "
                             "machine (0.25), 'auto' (the machine's memory / --nworkers) or "
                             "'none'; spill at 60%%, pause at 80%% (resume below 75%%), "
                             "restart at 95%%")
    parser.add_argument("--local-directory", default=None, metavar="DIR",
                        help="where spilled data goes: a fresh private directory inside DIR, "
                             "removed when the worker stops (default: the temporary "
                             "directory)")
    parser.add_argument("--no-nanny", action="store_true",
                        help="run the worker in this process, without a nanny to restart it")
    parser.add_argument("--ready-fd", type=int, default=None,
                        help=argparse.SUPPRESS)  # used by the nanny: a pipe for the ready lines
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.nworkers < 1:
        parser.error("--nworkers must be at least 1")
    try:
        args.memory_limit_bytes = parse_memory_limit(args.memory_limit, args.nworkers)
    except ValueError as e:
        parser.error(str(e))
    if not args.no_nanny:
        if args.nworkers > 1 and args.contact_address:
            parser.error("--contact-address names one worker; it cannot go with --nworkers")
        from . import nanny
        return nanny.main(args, sys.argv[1:] if argv is None else argv)
    if args.nworkers > 1:
        parser.error("--nworkers needs the nanny; drop --no-nanny")
    if args.ready_fd is not None:  # under a nanny: forwarded output comes out line by line
        os.set_inheritable(args.ready_fd, False)
        # The interpreter's own stdout, a text file over the pipe.
        cast(io.TextIOWrapper, sys.stdout).reconfigure(line_buffering=True)
    security, host = start_process(args)
    worker = Worker(args.center, nthreads=args.nthreads, name=args.name, security=security,
                    contact_address=args.contact_address,
                    heartbeat_interval=args.heartbeat_interval,
                    death_timeout=args.death_timeout,
                    memory_limit=args.memory_limit_bytes,
                    local_directory=args.local_directory)
    if args.ready_fd is not None:  # the nanny removes the directory if the worker dies
        worker.on_local_directory = lambda path: tell_status(args.ready_fd, f"directory {path}")
    try:
        address = worker.start(host, args.port,
                               timeout=args.death_timeout or float("inf"))
    except (OSError, TimeoutError) as e:
        print(f"cannot start worker: {e}", file=sys.stderr)
        return 1
    if security.auth_key is None:
        logger.warning("no auth key: listening on %s only", host)
    run_until_signalled(worker.stop, args.exit_on_stdin_close,
                        [f"Start worker at:            {address}",
                         f"Registered with center at:  {worker.center_address}"],
                        ready_fd=args.ready_fd)
    return 1 if worker._fatal is not None else 0


if __name__ == "__main__":
    sys.exit(main())
