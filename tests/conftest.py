"""Shared fixtures: real clusters on 127.0.0.1, and a check that no process outlives the suite.

Every process a test starts inherits ``MINIDIST_TEST_SESSION``; at the end
of the session no live process may still carry it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Callable

import cloudpickle
import pytest

import gates
from minidist import Client, Executor, LocalCluster

SESSION_MARK = f"minidist-test-{uuid.uuid4().hex}"
os.environ["MINIDIST_TEST_SESSION"] = SESSION_MARK
os.environ["MINIDIST_STRICT_TRANSITIONS"] = "1"  # centers raise on a forbidden state change


def marked_pids(mark: str = SESSION_MARK) -> list[int]:
    """PIDs of live processes whose environment carries ``mark`` (other than this one)."""
    found = []
    needle = f"MINIDIST_TEST_SESSION={mark}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue  # a zombie has already exited
        except OSError:
            continue
        found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def wait_for(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> object:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def _ship_test_functions_by_value(request):
    """Workers cannot import test modules: ship their functions by value, as for ``__main__``."""
    module = request.module
    if module.__name__ not in _registered:
        cloudpickle.register_pickle_by_value(module)
        _registered.add(module.__name__)
    yield


_registered: set[str] = set()
cloudpickle.register_pickle_by_value(gates)


@pytest.fixture(scope="session", autouse=True)
def no_leaked_processes():
    yield
    deadline = time.monotonic() + 10
    while marked_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not marked_pids(), f"processes left behind: {marked_pids()}"


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster with 2 single-thread workers, shared by one test module."""
    with LocalCluster(n_workers=2, threads_per_worker=1) as c:
        yield c


@pytest.fixture
def e(cluster):
    """A fresh Executor on the module's cluster."""
    with Executor(cluster) as ex:
        yield ex


@pytest.fixture
def c(cluster):
    """A fresh Client on the module's cluster."""
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(params=["Executor", "Client"])
def session(request, cluster):
    """An Executor, then a Client (the same test runs with each), on the module's cluster."""
    kind = {"Executor": Executor, "Client": Client}[request.param]
    s = kind(cluster)
    try:
        yield s
    finally:
        s.shutdown()


def reap(popen: subprocess.Popen) -> None:
    """Kill ``popen`` if it still runs, wait for it, and close its pipes."""
    if popen.poll() is None:
        popen.kill()
        popen.wait()
    for pipe in (popen.stdin, popen.stdout, popen.stderr):
        if pipe:
            pipe.close()


def address_in(lines: list[str]) -> str:
    """The address a center's or worker's ready lines announce."""
    for line in lines:
        if line.startswith(("Start center at", "Start worker at")):
            return line.split()[-1]
    raise AssertionError(f"no address in {lines}")


class Proc:
    """A process started by a test, with its ready lines parsed and its stderr in a file.

    ``popen`` is the command the test ran (for a worker: its nanny, unless
    ``--no-nanny``); ``pid`` is the process that serves (the worker itself).
    """

    def __init__(self, popen: subprocess.Popen, lines: list[str], log_path: str = "") -> None:
        self.popen = popen
        self.lines = lines
        self.log_path = log_path

    def log(self) -> str:
        """Everything the process wrote to stderr so far (its log lines)."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        """The serving process: the worker under a nanny (its ``Worker pid:`` line), else ours."""
        for line in self.lines:
            if line.startswith("Worker pid:"):
                return int(line.split()[-1])
        return self.popen.pid

    @property
    def address(self) -> str:
        return address_in(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        finally:
            reap(self.popen)


@pytest.fixture
def spawn(tmp_path):
    """Start ``python -m minidist.<role> ...``; waits for its ready lines; ends it by PID.

    stderr goes to a file (``proc.log()``), so a chatty process never
    blocks on a full pipe.
    """
    procs: list[Proc] = []

    def start(role: str, *args: str, ready: str | None = None, env: dict | None = None,
              timeout: float = 20.0, pass_fds: tuple[int, ...] = ()) -> Proc:
        ready = ready or ("Start center at" if role == "center" else "Registered with center")
        log_path = str(tmp_path / f"{role}-{len(procs)}.log")
        with open(log_path, "wb") as log:
            popen = subprocess.Popen([sys.executable, "-m", f"minidist.{role}", *args],
                                     stdout=subprocess.PIPE, stderr=log, text=True,
                                     env={**os.environ, **(env or {})}, pass_fds=pass_fds)
        proc = Proc(popen, [], log_path)
        procs.append(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = popen.stdout.readline()
            if not line:
                raise AssertionError(f"{role} exited ({popen.wait()}): {proc.log()}")
            proc.lines.append(line.rstrip("\n"))
            if line.startswith(ready):
                if role == "worker" and "--no-nanny" not in args:  # the nanny names the worker
                    proc.lines.append(popen.stdout.readline().rstrip("\n"))
                return proc
        raise AssertionError(f"{role} not ready within {timeout}s: {proc.lines}")

    yield start
    for proc in procs:  # SIGTERM, so that workers remove their directories; then SIGKILL
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.popen.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        reap(proc.popen)
