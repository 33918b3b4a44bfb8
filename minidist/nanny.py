"""The nanny: starts worker processes, watches them, and restarts the ones that die.

``dworker HOST:PORT [--nworkers N]`` runs :func:`main`: one nanny process
supervising N worker processes.  ``LocalCluster`` runs a :class:`Nanny`
inside its owner's process instead (as dask's LocalCluster runs its
nannies in the client's process), so a cluster costs no extra process::

  nanny (dworker, or a LocalCluster's owner)
    Nanny ── slot thread 0 ── python -m minidist.worker ADDR --no-nanny --ready-fd 5 ...
          └─ slot thread 1 ── python -m minidist.worker ...      (one thread per worker)

  child --status pipe (--ready-fd)--> slot thread: "directory PATH" (its local directory),
                                      the ready lines, then "stopping"
  nanny --stdin pipe----------------> child: EOF (the nanny is gone) stops the worker
  child stdout/stderr: inherited (dworker: the worker prints to the nanny's terminal),
                       or pipes drained by forwarder threads into this process's
                       sys.stdout/sys.stderr, line by line (LocalCluster)

Each slot thread owns one worker slot: it spawns the process, reads its
status pipe, waits for it to exit (a pidfd wakes it at once) and every
``POLICY_INTERVAL`` asks the nanny's policies whether the running worker
must be restarted (``memory.terminate_policy``: its RSS passed 95% of its
memory limit; it is killed with SIGKILL, so the death counts against the
task it was running).  When the process ends, the slot thread removes its
local directories (a worker that stopped cleanly removed them itself, a
killed one could not: ``memory.remove_dead_worker_directory``), then:

- the nanny is closing, or the slot was stopped (``Nanny.stop``): the slot ends;
- a policy asked for the restart: it restarts at once;
- the worker said ``stopping`` first (SIGTERM/SIGINT to the worker itself,
  ``--death-timeout``, a center that refuses its key): it stopped on
  purpose, and a restart cannot help; the slot ends;
- its very first start failed before it was ready (bad address, port in
  use, wrong key): a configuration error; the slot ends;
- otherwise it died (a signal, a segfault, ``os._exit``, the OOM killer):
  it restarts, at once the first time, then backing off exponentially
  (up to ``MAX_BACKOFF``) while it keeps dying within ``STABLE_AFTER``
  seconds of starting; the third such death in a row is logged once as a
  crash loop, with the exit status or signal name.

The center sees a restarted worker as a new worker (a new process, and
with ``--port 0`` a new address) and counts the death against the tasks
that were running on it (``--allowed-failures``, then ``KilledWorker``).
Output is never the nanny's bottleneck: forwarder threads keep draining
the pipes whatever the supervision does, so a task that prints a lot
never blocks its worker.
"""

from __future__ import annotations

import argparse
import codecs
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import IO
from collections.abc import Callable, Iterable, Sequence

logger = logging.getLogger("minidist.nanny")

STABLE_AFTER = 10.0
"""A worker that ran this many seconds before dying is restarted without backoff."""

FIRST_BACKOFF = 0.25
"""Seconds before the second restart in a row; doubles for each further one."""

MAX_BACKOFF = 10.0
"""The longest wait between restarts of a worker that keeps dying."""

CRASH_LOOP = 3
"""Deaths in a row (each within STABLE_AFTER of starting) that are logged as a crash loop."""

POLICY_INTERVAL = 0.5
"""Seconds between policy checks of a running worker (and exit checks without a pidfd)."""

STOP_GRACE = 5.0
"""Seconds a worker has to stop after SIGTERM before it is killed."""

_LINE_LIMIT = 1 << 16
"""Forwarded output is written in whole lines; a longer line is cut at this many bytes."""

Policy = Callable[["Child"], "str | tuple[str, int] | None"]
"""A per-worker check: why the running worker must be restarted (and, optionally, the
signal to stop it with: ``(reason, signal.SIGKILL)``), or None."""


def describe_exit(returncode: int | None) -> str:
    """``exit status 1`` or ``killed by SIGSEGV``, for logs and errors."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class Child:
    """One supervised worker slot: its current process and what the nanny knows of it.

    ``popen``, ``pid`` and ``address`` follow the current process: after a
    restart they name the new one.  ``restarts`` counts restarts so far.
    """

    role = "worker"

    def __init__(self, nanny: Nanny, argv: list[str]) -> None:
        self.nanny = nanny
        self.argv = argv
        self.popen: subprocess.Popen | None = None
        self.address = ""
        self.ready_lines: list[str] = []
        self.ready = False  # the current process has registered
        self.restarts = 0
        self.directories: list[str] = []  # the current process's local directories
        self.crashes = 0  # deaths in a row, each soon after starting
        self.started_at = 0.0
        self.keep = True  # False once stopped on request: never restarted again
        self.gone = False  # the slot has ended for good
        self.end_reason = ""
        self._ever_ready = False
        self._stopping = False  # the current process said it stops on purpose
        self._restart_reason: str | None = None
        self._kill_at: float | None = None
        self._status_fd: int | None = None
        self._forwarders: list[threading.Thread] = []
        self._ready_event = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int:
        """PID of the current worker process."""
        return self.popen.pid if self.popen else 0

    def alive(self) -> bool:
        """True while the current worker process runs."""
        return self.popen is not None and self.popen.poll() is None

    def wait_ready(self, timeout: float) -> None:
        """Wait until the current process has registered; raise if the slot ends first."""
        deadline = time.monotonic() + timeout
        while not self._ready_event.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if self.gone:
                raise RuntimeError(f"worker (pid {self.pid}) {self.end_reason}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker pid {self.pid} not ready within {timeout}s")

    def __repr__(self) -> str:
        return f"<{self.role} pid={self.pid} {self.address}>"


class Nanny:
    """Supervises worker processes: start, watch, restart with backoff, forward output.

    ``restart=False`` only watches (a dead worker stays dead), for
    ``LocalCluster(nanny=False)``.  ``forward_output=True`` pipes each
    worker's stdout and stderr into this process's ``sys.stdout`` and
    ``sys.stderr``; otherwise the workers inherit them.  ``on_ready(child)``
    runs when a worker (or its restart) has registered, ``on_gone(child,
    requested)`` when a slot ends for good.  ``policies`` are checked for
    every running worker every ``POLICY_INTERVAL`` seconds.
    """

    def __init__(self, *, restart: bool = True, forward_output: bool = False,
                 new_session: bool = False, env: dict | None = None,
                 on_ready: Callable[[Child], None] | None = None,
                 on_gone: Callable[[Child, bool], None] | None = None,
                 policies: Sequence[Policy] = ()) -> None:
        self.restart = restart
        self.forward_output = forward_output
        self.new_session = new_session
        self.env = env
        self.on_ready = on_ready
        self.on_gone = on_gone
        self.policies = list(policies)
        self.children: list[Child] = []
        self._lock = threading.Lock()
        self._closing = False

    # ------------------------------------------------------------------ public

    def start(self, argv: list[str]) -> Child:
        """Start ``argv`` (a worker command line) now and supervise it from then on."""
        child = Child(self, argv)
        with self._lock:
            if self._closing:
                raise RuntimeError("the nanny is closing")
            self._spawn(child)
            self.children.append(child)
        child._thread = threading.Thread(target=self._supervise, args=(child,),
                                         name=f"nanny-{child.pid}", daemon=True)
        child._thread.start()
        return child

    def stop(self, child: Child, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """End ``child``'s slot for good: send ``sig`` to its process and reap it."""
        with self._lock:
            child.keep = False
            popen = child.popen
        child._wake.set()
        if popen is not None:
            _signal(popen, sig)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        if child._thread is not None and child._thread is not threading.current_thread():
            child._thread.join(timeout)

    def restart_child(self, child: Child, reason: str, sig: int = signal.SIGTERM) -> None:
        """Restart ``child`` now (``sig``, SIGKILL after ``STOP_GRACE``); logs ``reason``."""
        with self._lock:
            if not child.keep or child._restart_reason is not None or not child.alive():
                return
            child._restart_reason = reason
            child._kill_at = time.monotonic() + STOP_GRACE
            logger.warning("restarting worker %s (pid %d): %s", child.address or "?",
                           child.pid, reason)
            assert child.popen is not None  # alive
            _signal(child.popen, sig)

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after ``timeout``); wait for all of them."""
        with self._lock:
            self._closing = True
            children = list(self.children)
            for child in children:
                child.keep = False
                child._wake.set()
                if child.popen is not None:
                    _signal(child.popen, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in children:
            if child.popen is None:
                continue
            try:
                child.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("worker pid %d did not stop in %.0fs; killing it", child.pid,
                               timeout)
                child.popen.kill()
                child.popen.wait()
        for child in children:  # the last output lines are delivered before close returns
            threads = [child._thread, *child._forwarders]
            for thread in threads:
                if thread is not None and thread is not threading.current_thread():
                    thread.join(max(1.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ one slot

    def _spawn(self, child: Child) -> None:
        """Start the slot's process (with ``self._lock`` held)."""
        read_fd, write_fd = os.pipe()
        pipe = subprocess.PIPE if self.forward_output else None
        try:
            popen = subprocess.Popen([*child.argv, "--ready-fd", str(write_fd)],
                                     stdin=subprocess.PIPE, stdout=pipe, stderr=pipe,
                                     env=self.env, start_new_session=self.new_session,
                                     pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        child.popen = popen
        child._status_fd = read_fd
        child.started_at = time.monotonic()
        child.ready = False
        child.ready_lines = []
        child._stopping = False
        child._restart_reason = None
        child._kill_at = None
        child._ready_event.clear()
        child._forwarders = [t for t in child._forwarders if t.is_alive()]
        if self.forward_output:
            for stream, name in ((popen.stdout, "stdout"), (popen.stderr, "stderr")):
                thread = threading.Thread(target=_forward, args=(stream, name), daemon=True,
                                          name=f"forward-{name}-{popen.pid}")
                thread.start()
                child._forwarders.append(thread)

    def _supervise(self, child: Child) -> None:
        while True:
            self._watch(child)
            _remove_directories(child)
            delay = self._after_exit(child)
            if delay is None:
                return self._end(child)
            child._wake.wait(delay)
            with self._lock:
                if self._closing or not child.keep:
                    break
                try:
                    self._spawn(child)
                except OSError as e:
                    logger.error("cannot restart worker: %s", e)
                    child.end_reason = f"could not be restarted ({e})"
                    break
                child.restarts += 1
        self._end(child)

    def _watch(self, child: Child) -> None:
        """Read the status pipe and run the policies until the process has exited."""
        popen = child.popen
        assert popen is not None  # spawned before it is watched
        pidfd = _pidfd(popen.pid)
        buffer = b""
        try:
            while True:
                fds = [fd for fd in (child._status_fd, pidfd) if fd is not None]
                readable = select.select(fds, [], [], POLICY_INTERVAL)[0]
                if child._status_fd in readable:
                    buffer, _ = self._read_status(child, buffer)
                if popen.poll() is not None:
                    while child._status_fd is not None:  # what it said before it died
                        buffer, more = self._read_status(child, buffer)
                        if not more:
                            break
                    return
                if child.ready and child.keep:
                    self._check_policies(child)
                if child._kill_at is not None and time.monotonic() > child._kill_at:
                    popen.kill()
        finally:
            if pidfd is not None:
                os.close(pidfd)
            if child._status_fd is not None:
                os.close(child._status_fd)
                child._status_fd = None

    def _read_status(self, child: Child, buffer: bytes) -> tuple[bytes, bool]:
        """Read what the worker wrote on its status pipe; (unfinished line, read anything)."""
        fd = child._status_fd
        assert fd is not None  # read only while the pipe is open
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return buffer, False
        if not chunk:
            os.close(fd)
            child._status_fd = None
            return b"", False
        *lines, rest = (buffer + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            if line == "stopping":
                child._stopping = True
                continue
            if line.startswith("directory "):
                child.directories.append(line[len("directory "):])
                continue
            child.ready_lines.append(line)
            if line.startswith("Start worker at:"):
                child.address = line.split()[-1]
            elif line.startswith("Registered with center at:"):
                child.ready = child._ever_ready = True
                child._ready_event.set()
                if self.on_ready is not None:
                    try:
                        self.on_ready(child)
                    except Exception:
                        logger.exception("on_ready failed")
        return rest, True

    def _check_policies(self, child: Child) -> None:
        for policy in self.policies:
            try:
                reason = policy(child)
            except Exception:
                logger.exception("policy %r failed for worker pid %d", policy, child.pid)
                continue
            if reason:
                if isinstance(reason, tuple):
                    self.restart_child(child, *reason)
                else:
                    self.restart_child(child, reason)
                return

    def _after_exit(self, child: Child) -> float | None:
        """Seconds to wait before restarting the slot's process, or None: the slot ends."""
        assert child.popen is not None  # it has run
        returncode = child.popen.wait()
        how = describe_exit(returncode)
        name = f"worker {child.address or '(not started)'} (pid {child.pid})"
        if self._closing or not child.keep:
            child.end_reason = f"stopped ({how})"
            return None
        if child._restart_reason is not None:
            return 0.0
        if child._stopping:
            (logger.info if returncode == 0 else logger.warning)(
                "%s stopped on its own (%s); not restarting it", name, how)
            child.end_reason = f"stopped on its own ({how})"
            return None
        if not child._ever_ready:
            logger.error("%s exited before it was ready (%s); not restarting it", name, how)
            child.end_reason = f"exited before it was ready ({how})"
            return None
        if not self.restart:
            logger.warning("%s died: %s", name, how)
            child.end_reason = f"died ({how})"
            return None
        lived = time.monotonic() - child.started_at
        child.crashes = child.crashes + 1 if lived < STABLE_AFTER else 1
        delay = 0.0 if child.crashes <= 1 else \
            min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (child.crashes - 2))
        if child.crashes < CRASH_LOOP:
            logger.warning("%s died: %s; restarting it", name, how)
        elif child.crashes == CRASH_LOOP:
            logger.warning("%s is in a crash loop: it died %d times in a row, each within "
                           "%.0fs of starting (last: %s); restarting it with backoff up to "
                           "%.0fs", name, child.crashes, STABLE_AFTER, how, MAX_BACKOFF)
        else:
            logger.info("%s died again: %s; restarting it in %.1fs", name, how, delay)
        return delay

    def _end(self, child: Child) -> None:
        requested = self._closing or not child.keep
        child.ready = False
        child.gone = True
        child.end_reason = child.end_reason or "stopped"
        if child.popen is not None and child.popen.stdin:
            try:
                child.popen.stdin.close()
            except OSError:
                pass
        if self.on_gone is not None:
            try:
                self.on_gone(child, requested)
            except Exception:
                logger.exception("on_gone failed")


def _remove_directories(child: Child) -> None:
    """Remove the local directories of a worker process that has exited (a worker
    that stops cleanly has removed them already; a killed one could not)."""
    from .memory import remove_dead_worker_directory
    for path in child.directories:
        try:
            if remove_dead_worker_directory(path):
                logger.info("removed the local directory %s of worker pid %d", path, child.pid)
        except Exception:
            logger.exception("cannot remove the local directory %s", path)
    child.directories = []


def _signal(popen: subprocess.Popen, sig: int) -> None:
    try:
        popen.send_signal(sig)
    except ProcessLookupError:
        pass


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits (Linux 5.3+), else None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


_write_lock = threading.Lock()


def _forward(pipe: IO[bytes], name: str) -> None:
    """Copy a worker's output pipe into ``sys.<name>``, whole lines at a time, until EOF.

    The pipe is drained whatever happens to the writes: output that cannot
    be written (a closed or replaced stream) is dropped, never left to fill
    the pipe and block the worker.
    """
    fd = pipe.fileno()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = b""
    try:
        while True:
            try:
                chunk = os.read(fd, _LINE_LIMIT)
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if not cut and len(pending) < _LINE_LIMIT:
                continue
            cut = cut or len(pending)
            _emit(name, decoder.decode(pending[:cut]))
            pending = pending[cut:]
        if pending:
            _emit(name, decoder.decode(pending, final=True))
    finally:
        pipe.close()


def _emit(name: str, text: str) -> None:
    with _write_lock:
        for stream in (getattr(sys, name, None), getattr(sys, f"__{name}__", None)):
            if stream is None:
                continue
            try:
                stream.write(text)
                stream.flush()
                return
            except Exception:  # closed or broken: try the original stream, else drop
                continue


# ---------------------------------------------------------------------- dworker


def child_command(argv: Sequence[str], args: argparse.Namespace, index: int) -> list[str]:
    """The command line of worker ``index`` of ``dworker argv``: the same options, unsupervised.

    The user's arguments are passed on as given (so every worker option
    reaches the worker), followed by what differs per worker: ``--port P``
    becomes ``P + index`` and ``--name N`` becomes ``N-index`` when there
    are several workers, and ``--memory-limit`` is the limit in bytes
    (``auto`` divides the machine by ``--nworkers`` here, not in each worker).
    """
    extra = ["--memory-limit", str(getattr(args, "memory_limit_bytes", None) or 0)]
    if args.port and index:
        extra += ["--port", str(args.port + index)]
    if args.name and args.nworkers > 1:
        extra += ["--name", f"{args.name}-{index}"]
    return [sys.executable, "-m", "minidist.worker", *argv, *extra, "--no-nanny",
            "--nworkers", "1", "--exit-on-stdin-close"]


def main(args: argparse.Namespace, argv: Iterable[str]) -> int:
    """``dworker`` by default: run ``args.nworkers`` supervised workers until SIGINT/SIGTERM.

    Prints each worker's ready lines, then ``Worker pid:  PID``, when it
    registers, and again when a restarted worker registers.  Exits when signalled (0) or
    when every worker has stopped for good (their worst exit status).
    """
    from .cli import StopFlag, configure_logging, ignore_stop_signals, watch_stdin

    stop = StopFlag()  # set from the handler: it must take no lock
    signalled = []

    def handler(signum: int, frame: object) -> None:
        signalled.append(signum)
        stop.set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    stop.wake_on_signals()
    configure_logging(args.log_level)
    if args.exit_on_stdin_close:
        watch_stdin(stop.set)
    print_lock = threading.Lock()

    def on_ready(child: Child) -> None:
        with print_lock:
            for line in child.ready_lines:
                print(line, flush=False)
            print(f"Worker pid:                 {child.pid}", flush=True)

    def on_gone(child: Child, requested: bool) -> None:
        if all(c.gone for c in nanny.children):
            stop.set()

    limit = getattr(args, "memory_limit_bytes", None)
    from .memory import terminate_policy
    nanny = Nanny(on_ready=on_ready, on_gone=on_gone,
                  policies=[terminate_policy(limit)] if limit else [])
    argv = list(argv)
    try:
        for i in range(args.nworkers):
            nanny.start(child_command(argv, args, i))
    except OSError as e:
        print(f"cannot start worker: {e}", file=sys.stderr)
        nanny.close()
        return 1
    stop.wait()
    ignore_stop_signals()  # a worker started from now on sets its own handlers first
    nanny.close()
    if signalled:
        return 0
    codes = [c.popen.returncode for c in nanny.children if c.popen is not None]
    return max((abs(code) for code in codes), default=1) or 0
