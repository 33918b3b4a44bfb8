"""A burst of SIGTERMs and SIGINTs always stops a process, and within its timeout.

``timeout`` sends SIGTERM to a process and to its group, so a process
usually receives two signals at once, and an impatient user adds Ctrl-C.
Each test starts real processes in their own sessions (a group of their
own), waits for their ready lines, sends each a burst (SIGTERM and SIGINT,
each to the process and to its group), and checks that every process, and
every process it started, ends within its timeout.  A handler that takes a
lock (``threading.Event.set``) deadlocks now and then when the second signal
interrupts the first handler: one burst in ten to forty hung before the
handlers only set a lock-free flag, so 200 bursts across the four kinds of
process find it.  Processes run in batches, several at once, to keep the
test short.  Also here: dssh's bootstrap (run without ssh) stops its
programs on a burst, and a LocalCluster whose ``close`` a Ctrl-C interrupted
is closed by the next ``close``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Callable

import pytest

from conftest import alive, reap
from minidist import LocalCluster
from minidist.ssh import _BOOTSTRAP

BURST = (signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGINT)
STOP_TIMEOUT = 15.0
"""Seconds a signalled process (and whatever it started) has to end."""

READY_TIMEOUT = 60.0
BATCH = 8

LOCAL_CLUSTER_SCRIPT = """\
import time
from minidist import Executor, LocalCluster
with LocalCluster(n_workers=1) as cluster:
    print("ready", *cluster.pids, flush=True)
    with Executor(cluster) as e:
        while True:
            e.submit(time.sleep, 0.01, pure=False).result()
"""


class Started:
    """One process of a batch: its Popen, the ready lines read so far, what it started."""

    def __init__(self, argv: list[str], ready: str, stdin: int = subprocess.DEVNULL) -> None:
        self.popen = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        self.ready = ready
        self.lines: list[str] = []
        self.children: list[int] = []  # PIDs it announced (a LocalCluster's processes)
        self._buffer = b""

    def read_ready(self, deadline: float) -> None:
        """Read stdout until the ready line; fail at ``deadline`` or if the process exits."""
        fd = self.popen.stdout.fileno()
        while not any(line.startswith(self.ready) for line in self.lines):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{self.popen.args} not ready: {self.lines}"
            if not select.select([fd], [], [], remaining)[0]:
                continue
            chunk = os.read(fd, 4096)
            assert chunk, f"{self.popen.args} exited ({self.popen.wait()}) before it was ready"
            self._buffer += chunk
            *done, self._buffer = self._buffer.split(b"\n")
            self.lines += [line.decode() for line in done]
        for line in self.lines:
            if line.startswith("ready "):
                self.children = [int(pid) for pid in line.split()[1:]]

    def burst(self, pause: float) -> None:
        """SIGTERM and SIGINT, each to the process and to its group, ``pause`` apart."""
        for sig in BURST:
            for send in (os.kill, os.killpg):
                try:
                    send(self.popen.pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(pause)

    def stopped(self, deadline: float) -> int | None:
        """Its exit status once it and what it started have ended; None at ``deadline``."""
        try:
            code = self.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None
        while any(alive(pid) for pid in self.children):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)
        return code

    def kill(self) -> None:
        """End it, its group and what it announced, by their ids."""
        for pid in self.children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        reap(self.popen)


def run_bursts(command: Callable[[], list[str]], ready: str, count: int,
               expect_zero: bool = True) -> None:
    """Start ``count`` processes, ``BATCH`` at a time, burst each; all must stop in time."""
    hung, codes = [], []
    for first in range(0, count, BATCH):
        batch = [Started(command(), ready) for _ in range(min(BATCH, count - first))]
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            for proc in batch:
                proc.read_ready(deadline)
            for i, proc in enumerate(batch):
                proc.burst(pause=0.001 * (i % 3))
            deadline = time.monotonic() + STOP_TIMEOUT
            for proc in batch:
                code = proc.stopped(deadline)
                if code is None:
                    hung.append(proc.popen.pid)
                else:
                    codes.append(code)
        finally:
            for proc in batch:
                proc.kill()
    assert not hung, f"{len(hung)} of {count} did not stop within {STOP_TIMEOUT}s: {hung}"
    if expect_zero:
        assert set(codes) == {0}, codes


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


@pytest.mark.timeout(300)
def test_center_stops_on_every_burst():
    run_bursts(lambda: python("-m", "minidist.center", "--port", "0"),
               "Start center at", 80)


@pytest.mark.timeout(300)
def test_unsupervised_worker_stops_on_every_burst(spawn):
    center = spawn("center", "--port", "0")
    run_bursts(lambda: python("-m", "minidist.worker", center.address, "--no-nanny"),
               "Registered with center", 60)


@pytest.mark.timeout(300)
def test_dworker_stops_on_every_burst(spawn):
    center = spawn("center", "--port", "0")
    run_bursts(lambda: python("-m", "minidist.worker", center.address), "Worker pid:", 40)


@pytest.mark.timeout(300)
def test_local_cluster_owner_stops_on_every_burst():
    # The owner has Python's default handlers: SIGTERM ends it, SIGINT unwinds the with
    # blocks; either way the cluster's processes must end too (they watch their stdin).
    run_bursts(lambda: python("-c", LOCAL_CLUSTER_SCRIPT), "ready ", 20, expect_zero=False)


def test_ssh_bootstrap_stops_its_programs_on_a_burst():
    # The bootstrap dssh runs on each host, here without ssh: a signal stops its programs.
    proc = Started(python("-u", "-c", _BOOTSTRAP), "Start center at", stdin=subprocess.PIPE)
    boot = proc.popen
    try:
        spec = {"env": {}, "commands": [["-m", "minidist.center", "--port", "0",
                                         "--exit-on-stdin-close"]]}
        boot.stdin.write(json.dumps(spec).encode() + b"\n")
        boot.stdin.flush()
        proc.read_ready(time.monotonic() + READY_TIMEOUT)
        with open(f"/proc/{boot.pid}/task/{boot.pid}/children") as f:
            proc.children = [int(pid) for pid in f.read().split()]
        assert proc.children, "the bootstrap started no program"
        proc.burst(pause=0.0)
        assert proc.stopped(time.monotonic() + STOP_TIMEOUT) == 0
    finally:
        proc.kill()


def test_local_cluster_close_interrupted_by_ctrl_c_is_finished_by_the_next(monkeypatch):
    # Ctrl-C in a notebook while close() runs: the kernel goes on, and so must the close.
    import minidist.cluster
    cluster = LocalCluster(n_workers=2)
    pids = list(cluster.pids)

    def interrupted(address: str) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)  # the KeyboardInterrupt lands here

    monkeypatch.setattr(minidist.cluster, "close_shared_sessions", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            cluster.close()
        monkeypatch.undo()
        assert all(alive(pid) for pid in pids)
        cluster.close()
        assert not any(alive(pid) for pid in pids)
    finally:
        cluster._nanny.close(2.0)  # no restart of what is killed next
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
