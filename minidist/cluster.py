"""LocalCluster: a center and N workers as real processes on this machine.

The processes are started with the same command lines a user would type
(``python -m minidist.center`` / ``python -m minidist.worker --no-nanny``),
all at once: the center's socket is bound and listening here, and handed
to the center process, so the workers need not wait for it to print its
address (a worker that dials early waits in the socket's queue).  Each
child watches its stdin, a pipe from this process, and exits if it
closes, so nothing outlives an interpreter that dies.  ``close()`` sends
SIGTERM (workers first), waits, then SIGKILLs stragglers; it runs at
interpreter exit for clusters left open, or closed only part way (a
KeyboardInterrupt during ``close``): a later call finishes the job.

The workers are supervised by a ``Nanny`` running in this process (one
thread per worker): a worker that dies is restarted and registers again
(``nanny=False``: it stays dead).  What the workers print reaches this
process's ``sys.stdout``/``sys.stderr`` line by line, through forwarder
threads that always drain the pipes.  When every worker is gone for good
(not by ``stop_worker``/``close``), the callbacks in ``on_workers_lost``
run: an Executor that owns the cluster breaks its futures instead of
letting them wait forever.

Each worker gets ``memory_limit`` (default ``auto``: this machine's
memory divided by ``n_workers``), spills above 60% of it, pauses above
80%, and the nanny kills and restarts it above 95% (``memory.py``).
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from typing import Any, Literal, cast
from collections.abc import Callable

from . import wire
from .executor import close_shared_sessions, local_cluster_security
from .memory import parse_memory_limit, terminate_policy
from .nanny import Child, Nanny
from .wire import Security

logger = logging.getLogger("minidist.cluster")

_clusters: weakref.WeakSet[LocalCluster] = weakref.WeakSet()


class Process:
    """The center process of a LocalCluster: its Popen, role and advertised address.

    Workers are ``nanny.Child`` records, which follow their restarts.
    """

    def __init__(self, popen: subprocess.Popen, role: str) -> None:
        self.popen = popen
        self.role = role
        self.address = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def __repr__(self) -> str:
        return f"<{self.role} pid={self.pid} {self.address}>"


def _listening_socket(host: str) -> socket.socket:
    """A socket bound to a free port of ``host`` and listening, for the center to serve.

    Bound here, the port cannot be taken by anyone else before the center
    runs, and workers dialling it early wait in its queue instead of being
    refused.
    """
    return socket.create_server((host, 0), backlog=512)


class LocalCluster:
    """A center and ``n_workers`` workers as local processes; ``with`` closes them.

    By default the cluster makes a random auth key for itself; Executors
    created in this process with its ``address`` (or the cluster itself)
    use it automatically.  Pass ``auth_key=False`` for no authentication.
    A worker that dies is restarted (``nanny=False``: it is not), and what
    the workers print appears on this process's stdout and stderr.
    ``memory_limit`` is per worker: bytes, ``"4GB"``, ``"512MiB"``, a
    fraction of the machine (``0.25``), ``"auto"`` (the machine's memory
    divided by ``n_workers``) or None/0 for none; ``local_directory`` is
    where workers spill (default: the temporary directory).
    ``dashboard_port=0`` (or a port) serves the center's dashboard, whose
    URL is then ``dashboard_link``.
    """

    def __init__(self, n_workers: int = 2, threads_per_worker: int = 1, *,
                 host: str = "127.0.0.1", auth_key: bytes | str | Literal[False] | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, heartbeat_timeout: float | None = None,
                 allowed_failures: int | None = None, log_level: str = "warning",
                 timeout: float = 30.0, nanny: bool = True,
                 dashboard_port: int | None = None,
                 memory_limit: int | float | str | None = "auto",
                 local_directory: str | None = None) -> None:
        if auth_key is None:
            auth_key = secrets.token_hex(32)
        self.security = Security(auth_key or None, tls_ca=tls_ca, tls_cert=tls_cert,
                                 tls_key=tls_key)
        self.auth_key = self.security.auth_key
        self.host = host
        self.threads_per_worker = threads_per_worker
        self.log_level = log_level
        self.timeout = timeout
        self.memory_limit = parse_memory_limit(memory_limit, n_workers)
        """Bytes of memory each worker may use (None: no limit)."""
        self.local_directory = local_directory
        # Heartbeat often enough that a short timeout still spans several beats.
        self._heartbeat_interval = None if heartbeat_timeout is None else \
            min(1.0, heartbeat_timeout / 5)
        self.dashboard_link: str | None = None
        """The dashboard's URL when started with ``dashboard_port`` (0: any free port)."""
        self.center: Process | None = None
        self.workers: list[Child] = []
        # Called with a reason once every worker is gone for good (not by stop/close).
        self.on_workers_lost: list[Callable[[str], None]] = []
        self._closed = False  # no worker callbacks from now on
        self._close_done = False  # every process has been stopped and reaped
        self._lock = threading.Lock()
        env = dict(os.environ)
        env.pop("MINIDIST_AUTH_KEY", None)
        if self.auth_key:
            env["MINIDIST_AUTH_KEY"] = self.auth_key.decode()
        self._env = env
        policies = [terminate_policy(self.memory_limit)] if self.memory_limit and nanny else []
        self._nanny = Nanny(restart=nanny, forward_output=True, new_session=True, env=env,
                            on_gone=self._worker_gone, policies=policies)
        listener = _listening_socket(host)
        self.address = wire.format_address(host, listener.getsockname()[1])
        center_args = ["--listen-fd", str(listener.fileno())]
        if heartbeat_timeout is not None:
            center_args += ["--heartbeat-timeout", str(heartbeat_timeout)]
        if allowed_failures is not None:
            center_args += ["--allowed-failures", str(allowed_failures)]
        if dashboard_port is not None:
            center_args += ["--dashboard-port", str(int(dashboard_port))]
        _clusters.add(self)
        try:
            try:
                self.center = self._spawn("center", center_args, pass_fds=(listener.fileno(),))
            finally:
                listener.close()  # the center's copy is the only one: a dead center refuses
            self.workers = [self._spawn_worker(threads_per_worker) for _ in range(n_workers)]
            self._wait_ready([self.center])
            deadline = time.monotonic() + self.timeout
            for child in self.workers:
                child.wait_ready(max(0.0, deadline - time.monotonic()))
        except BaseException:
            self.close()
            raise
        local_cluster_security[self.address] = self.security

    # ------------------------------------------------------------------ processes

    def _command(self, role: str, args: list[str]) -> list[str]:
        return [sys.executable, "-m", f"minidist.{role}", *args, "--host", self.host,
                "--log-level", self.log_level, "--exit-on-stdin-close",
                *self.security.cli_args()]

    def _spawn(self, role: str, args: list[str], pass_fds: tuple[int, ...] = ()) -> Process:
        popen = subprocess.Popen(self._command(role, args), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=self._env, start_new_session=True,
                                 pass_fds=pass_fds)
        return Process(popen, role)

    def _spawn_worker(self, nthreads: int | None, name: str | None = None) -> Child:
        args = [self.address, "--nthreads", str(nthreads or self.threads_per_worker),
                "--no-nanny", "--memory-limit", str(self.memory_limit or 0)]
        if self.local_directory:
            args += ["--local-directory", self.local_directory]
        if name:
            args += ["--name", name]
        if self._heartbeat_interval is not None:
            args += ["--heartbeat-interval", str(self._heartbeat_interval)]
        return self._nanny.start(self._command("worker", args))

    def _worker_gone(self, child: Child, requested: bool) -> None:
        """A worker slot ended; if it was the last one and nobody asked for it, say so."""
        with self._lock:
            if requested or self._closed or not all(c.gone for c in self.workers):
                return
            reasons = "; ".join(f"{c.address or f'pid {c.pid}'} {c.end_reason}"
                                for c in self.workers)
        for callback in list(self.on_workers_lost):
            try:
                callback(f"every worker of {self!r} is gone for good: {reasons}")
            except Exception:
                logger.exception("on_workers_lost callback failed")

    def _wait_ready(self, procs: list[Process]) -> None:
        """Read each child's ready lines until it has printed its address."""
        deadline = time.monotonic() + self.timeout
        waiting = {}
        for p in procs:
            assert p.popen.stdout is not None  # started with stdout=PIPE
            waiting[p.popen.stdout.fileno()] = p
        buffers = {fd: b"" for fd in waiting}
        with selectors.DefaultSelector() as sel:
            for fd in waiting:
                sel.register(fd, selectors.EVENT_READ)
            while waiting:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"cluster processes not ready within {self.timeout}s: "
                                       f"{list(waiting.values())}")
                for key, _ in sel.select(min(remaining, 0.5)):
                    fd = key.fd
                    chunk = os.read(fd, 4096)
                    proc = waiting[fd]
                    if not chunk:
                        raise RuntimeError(f"{proc.role} exited with code {proc.popen.wait()} "
                                           "before it was ready")
                    buffers[fd] += chunk
                    if self._parse_ready(proc, buffers[fd], self):
                        sel.unregister(fd)
                        del waiting[fd]
                for proc in list(waiting.values()):
                    if not proc.alive():
                        raise RuntimeError(f"{proc.role} exited with code "
                                           f"{proc.popen.returncode} before it was ready")

    @staticmethod
    def _parse_ready(proc: Process, text: bytes, cluster: LocalCluster) -> bool:
        wants_dashboard = "--dashboard-port" in cast("list[str]", proc.popen.args)  # an argv
        for line in text.decode(errors="replace").splitlines():
            if line.startswith("Start center at "):
                proc.address = line.split()[-1]
                if not wants_dashboard:
                    return True
            if line.startswith("Dashboard at "):
                cluster.dashboard_link = line.split()[-1]
                return True
            if line.startswith("Start worker at:"):
                proc.address = line.split()[-1]
            if line.startswith("Registered with center at:"):
                return True
        return False

    def start_worker(self, nthreads: int | None = None, name: str | None = None) -> Child:
        """Start one more worker and wait until it has registered."""
        child = self._spawn_worker(nthreads, name)
        try:
            child.wait_ready(self.timeout)
        except BaseException:
            self._nanny.stop(child, signal.SIGKILL)
            raise
        with self._lock:
            self.workers.append(child)
        return child

    def stop_worker(self, worker: Child | str, sig: int = signal.SIGTERM,
                    timeout: float = 10.0) -> None:
        """Stop one worker (by Child or address) with ``sig`` and reap it; it is not restarted."""
        with self._lock:
            child = worker if isinstance(worker, Child) else \
                next(p for p in self.workers if p.address == worker)
            if child in self.workers:
                self.workers.remove(child)
        self._nanny.stop(child, sig, timeout)

    @property
    def pids(self) -> list[int]:
        """PIDs of every process this cluster started that may still run."""
        procs = ([self.center] if self.center else []) + self.workers
        return [p.pid for p in procs if p.popen is not None]

    # ------------------------------------------------------------------ shutdown

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker, then the center; nothing is left running afterwards.

        A close interrupted part way (Ctrl-C while it waits) is finished by the
        next call, or at interpreter exit: only a completed close is final.
        """
        with self._lock:
            if self._close_done:
                return
            self._closed = True
            self.workers = []
        local_cluster_security.pop(self.address, None)
        close_shared_sessions(self.address)
        self._nanny.close(timeout)
        if self.center is not None:
            self._terminate([self.center], timeout)
        _clusters.discard(self)
        self._close_done = True

    def _terminate(self, procs: list[Process], timeout: float = 5.0) -> None:
        for proc in procs:
            if proc.alive():
                try:
                    proc.popen.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0fs; killing it", proc, timeout)
                proc.popen.kill()
                proc.popen.wait()
            self._close_pipes(proc)

    @staticmethod
    def _close_pipes(proc: Process) -> None:
        for pipe in (proc.popen.stdin, proc.popen.stdout):
            try:
                if pipe:
                    pipe.close()
            except OSError:
                pass

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LocalCluster {self.address} workers={len(self.workers)}>"

    def _repr_html_(self) -> str:
        """A notebook's view: address, workers, threads and the dashboard's link."""
        from .reprs import html_table
        rows = [("center", self.address), ("workers", len(self.workers)),
                ("threads", len(self.workers) * self.threads_per_worker)]
        if self.dashboard_link:
            rows.append(("dashboard", self.dashboard_link))
        return html_table("LocalCluster", rows)


def _close_all() -> None:
    for cluster in list(_clusters):
        cluster.close()


atexit.register(_close_all)
