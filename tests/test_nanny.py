"""Supervised workers: the nanny restarts what dies, stops what it is told to, forwards output.

Workers die for real here (SIGKILL by PID, ``os._exit``, a segfault); the
worker's own PID comes from the nanny's ``Worker pid:`` line (``dworker``)
or from ``LocalCluster.workers`` (which follows restarts).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

import minidist
from minidist import Executor, LocalCluster

from conftest import Proc, alive, wait_for

# --------------------------------------------------------------------------- tasks


def inc(x):
    return x + 1


def getpid(_=None):
    return os.getpid()


def exit_hard():
    os._exit(1)


def segfault():
    import ctypes
    ctypes.string_at(0)


def kill_myself():
    os.kill(os.getpid(), signal.SIGKILL)


def chatty(nbytes, stream):
    """Print about ``nbytes`` in numbered lines to ``stream``; return how many lines."""
    out = getattr(sys, stream)
    line = "x" * 99
    n = nbytes // 100
    for i in range(n):
        print(f"{stream} {i} {line}", file=out)
    print(f"{stream} done", file=out)
    return n


def sleep_then(x, seconds):
    time.sleep(seconds)
    return x


# --------------------------------------------------------------------------- helpers


class Lines:
    """The stdout lines of a running ``dworker``, read by a thread, waited for with a deadline."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.seen = list(proc.lines)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.popen.stdout:
            self._queue.put(line.rstrip("\n"))

    def next(self, prefix: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line {prefix!r} within {timeout}s: {self.seen}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line.split()[-1]

    def worker(self, timeout: float = 20.0) -> tuple[str, int]:
        """Address and PID of the next worker to register."""
        address = self.next("Start worker at:", timeout)
        self.next("Registered with center at:", timeout)
        return address, int(self.next("Worker pid:", timeout))


def center_pids(e: Executor) -> dict[str, int]:
    return {address: w["pid"] for address, w in e._center("workers").items()}


# --------------------------------------------------------------------------- dworker


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fixed_port", [False, True], ids=["port-0", "fixed-port"])
def test_sigkilled_worker_is_restarted_and_registers_again(spawn, fixed_port):
    center = spawn("center", "--port", "0", "--log-level", "info")
    port = free_port() if fixed_port else 0
    worker = spawn("worker", center.address, "--port", str(port))
    lines = Lines(worker)
    first_pid = worker.pid
    assert first_pid != worker.popen.pid  # the nanny is another process
    with Executor(center.address) as e:
        assert center_pids(e) == {worker.address: first_pid}
        assert e.submit(getpid, pure=False).result(timeout=10) == first_pid
        t0 = time.monotonic()
        os.kill(first_pid, signal.SIGKILL)
        address, pid = lines.worker()
        assert time.monotonic() - t0 < 5
        assert pid != first_pid and not alive(first_pid)
        assert (address == worker.address) == fixed_port
        wait_for(lambda: center_pids(e) == {address: pid}, 10,
                 message="the center to know only the restarted worker")
        assert e.submit(getpid, pure=False).result(timeout=10) == pid
    assert f"(pid {first_pid}) died: killed by SIGKILL; restarting it" in worker.log()
    assert worker.stop(signal.SIGTERM) == 0
    assert not alive(pid)


@pytest.mark.timeout(60)
def test_sigterm_stops_every_worker_cleanly_and_leaves_nothing(spawn):
    center = spawn("center", "--port", "0", "--log-level", "info", "--heartbeat-timeout", "120")
    worker = spawn("worker", center.address, "--nworkers", "2", "--nthreads", "2")
    lines = Lines(worker)
    workers = {worker.address: worker.pid}
    address, pid = lines.worker()
    workers[address] = pid
    assert len(set(workers.values()) | {worker.popen.pid}) == 3
    with Executor(center.address) as e:
        assert e.nthreads() == {a: 2 for a in workers}
        assert center_pids(e) == workers
        assert sorted(e.map(inc, range(20))) == list(range(1, 21))
        assert worker.stop(signal.SIGTERM) == 0
        # They said goodbye: with a 120 s heartbeat timeout nothing else removes them fast.
        wait_for(lambda: not e.nthreads(), 5, message="the center to drop both workers")
    for address in workers:
        assert f"removing worker {address}: worker is leaving" in center.log()
    assert not any(alive(p) for p in workers.values())


@pytest.mark.timeout(60)
def test_workers_of_a_sigkilled_nanny_do_not_outlive_it(spawn):
    center = spawn("center", "--port", "0")
    worker = spawn("worker", center.address, "--nworkers", "2")
    lines = Lines(worker)
    pids = [worker.pid, lines.worker()[1]]
    with Executor(center.address) as e:
        assert len(e.nthreads()) == 2
        os.kill(worker.popen.pid, signal.SIGKILL)
        worker.popen.wait(10)
        wait_for(lambda: not any(alive(p) for p in pids), 15, message="orphaned workers exit")
        wait_for(lambda: not e.nthreads(), 10, message="the center to drop them")


@pytest.mark.timeout(60)
def test_crash_loop_backs_off_and_is_logged(spawn):
    center = spawn("center", "--port", "0", "--allowed-failures", "5")
    worker = spawn("worker", center.address, "--log-level", "info")
    with Executor(center.address) as e:
        bad = e.submit(kill_myself, key="crash-looper")
        with pytest.raises(minidist.KilledWorker, match="crash-looper"):
            bad.result(timeout=45)
        assert e.submit(inc, 1).result(timeout=20) == 2  # the worker came back after all
    log = worker.log()
    loop = [line for line in log.splitlines() if "crash loop" in line]
    assert len(loop) == 1, log
    assert "died 3 times in a row" in loop[0] and "last: killed by SIGKILL" in loop[0]
    assert log.count("died: killed by SIGKILL; restarting it") == 2  # then only info lines
    assert "died again: killed by SIGKILL; restarting it in 1.0s" in log  # backing off


def test_no_nanny_runs_the_worker_in_process_and_nothing_restarts_it(spawn):
    center = spawn("center", "--port", "0")
    worker = spawn("worker", center.address, "--no-nanny")
    assert len(worker.lines) == 2 and worker.pid == worker.popen.pid
    with Executor(center.address) as e:
        assert center_pids(e) == {worker.address: worker.popen.pid}
        assert e.submit(getpid, pure=False).result(timeout=10) == worker.popen.pid
        os.kill(worker.pid, signal.SIGKILL)
        assert worker.popen.wait(10) == -signal.SIGKILL
        wait_for(lambda: not e.nthreads(), 10, message="the worker gone for good")


def test_nworkers_flags_are_checked():
    for args, message in [(["--nworkers", "0"], "at least 1"),
                          (["--nworkers", "2", "--no-nanny"], "needs the nanny"),
                          (["--nworkers", "2", "--contact-address", "h:1"], "--contact-address")]:
        out = subprocess.run([sys.executable, "-m", "minidist.worker", "127.0.0.1:1", *args],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and message in out.stderr, out.stderr


def test_first_start_failure_is_not_retried(tmp_path):
    """A worker that cannot start (here: its port is taken) is a configuration error."""
    import socket
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "minidist.worker", "127.0.0.1:1",
                              "--port", str(port)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "cannot start worker" in out.stderr, out.stderr
    assert "exited before it was ready (exit status 1); not restarting it" in out.stderr
    assert out.stdout == "" and time.monotonic() - t0 < 20


# --------------------------------------------------------------------------- LocalCluster


@pytest.mark.timeout(60)
def test_local_cluster_restarts_a_sigkilled_worker():
    with LocalCluster(n_workers=2) as cluster, Executor(cluster) as e:
        victim = cluster.workers[0]
        old_pid, old_address = victim.pid, victim.address
        all_pids = set(cluster.pids)
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: victim.pid != old_pid and victim.ready, 10,
                 message="the worker restarted")
        assert victim.restarts == 1 and victim.address != old_address
        assert victim.pid in cluster.pids and old_pid not in cluster.pids
        all_pids |= set(cluster.pids)
        wait_for(lambda: set(center_pids(e).values()) == {w.pid for w in cluster.workers}, 10,
                 message="the center to know the restarted worker")
        pids = {e.submit(getpid, i, workers=[w.address]).result(timeout=10)
                for i, w in enumerate(cluster.workers)}
        assert pids == {w.pid for w in cluster.workers}
    assert not any(alive(p) for p in all_pids)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("task, death", [(exit_hard, "exit status 1"),
                                         (segfault, "killed by SIGSEGV")])
def test_task_that_crashes_its_process_ends_in_killed_worker(task, death, caplog):
    caplog.set_level(logging.WARNING, logger="minidist.nanny")
    with Executor(max_workers=2) as e:
        t0 = time.monotonic()
        bad = e.submit(task)
        with pytest.raises(minidist.KilledWorker) as info:
            bad.result(timeout=60)
        assert "3 workers" in str(info.value)
        assert time.monotonic() - t0 < 60
        assert e.submit(pow, 2, 8).result(timeout=30) == 256
        assert list(e.map(inc, range(10))) == list(range(1, 11))
        wait_for(lambda: len(e.nthreads()) == 2, 20, message="both workers back")
    assert f"died: {death}; restarting it" in caplog.text


@pytest.mark.timeout(90)
@pytest.mark.parametrize("nbytes", [100_000, 8_000_000], ids=["100KB", "8MB"])
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_what_a_task_prints_is_forwarded_without_blocking(capsys, nbytes, stream):
    with LocalCluster(n_workers=1) as cluster, Executor(cluster) as e:
        n = e.submit(chatty, nbytes, stream).result(timeout=60)
        assert n == nbytes // 100
        captured = []

        def everything() -> str:
            out, err = capsys.readouterr()
            captured.append(out if stream == "stdout" else err)
            return "".join(captured)
        wait_for(lambda: f"{stream} done\n" in everything(), 30, message="the last line")
        assert e.submit(inc, 1).result(timeout=10) == 2  # the worker is not stuck
    text = "".join(captured)
    lines = text.splitlines()
    numbered = [line for line in lines if line.startswith(f"{stream} ")]
    assert len(numbered) == n + 1
    assert numbered[:2] == [f"{stream} 0 {'x' * 99}", f"{stream} 1 {'x' * 99}"]
    assert numbered[-2] == f"{stream} {n - 1} {'x' * 99}"  # whole lines, in order
    assert all(line == f"{stream} {i} {'x' * 99}" for i, line in enumerate(numbered[:-1]))
    assert "Start worker at" not in text  # the ready lines are not the user's output


@pytest.mark.timeout(60)
def test_executor_that_lost_every_worker_for_good_is_broken():
    e = Executor(max_workers=2)
    try:
        pids = [w.pid for w in e._cluster.workers]
        slow = e.submit(sleep_then, 1, 60)
        wait_for(lambda: any(w["processing"] for w in e._center("workers").values()), 20,
                 message="the slow task running")
        for pid in pids:  # stopped on purpose: the nanny does not restart them
            os.kill(pid, signal.SIGTERM)
        t0 = time.monotonic()
        with pytest.raises(concurrent.futures.BrokenExecutor, match="gone for good"):
            slow.result(timeout=30)
        assert time.monotonic() - t0 < 20
        with pytest.raises(concurrent.futures.BrokenExecutor, match="gone for good"):
            e.submit(inc, 1)
        assert not any(alive(p) for p in pids)
    finally:
        e.shutdown()
    assert not any(alive(p) for p in e._cluster.pids)


@pytest.mark.timeout(60)
def test_without_nanny_dead_workers_stay_dead():
    with LocalCluster(n_workers=1, nanny=False) as cluster, Executor(cluster) as e:
        [worker] = cluster.workers
        pid = worker.pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: worker.gone, 10, message="the worker gone")
        assert worker.pid == pid and worker.restarts == 0
        wait_for(lambda: not e.nthreads(), 10, message="the center to drop it")


@pytest.mark.timeout(60)
def test_a_policy_can_restart_a_running_worker(tmp_path, caplog):
    """The hook a memory limit uses: a per-worker check that asks for a restart."""
    caplog.set_level(logging.WARNING, logger="minidist.nanny")
    flag = tmp_path / "too-big"
    with LocalCluster(n_workers=1) as cluster, Executor(cluster) as e:
        [worker] = cluster.workers
        old_pid = worker.pid
        cluster._nanny.policies.append(
            lambda child: "over its limit" if flag.exists() and child.pid == old_pid else None)
        assert e.submit(getpid, pure=False).result(timeout=10) == old_pid
        flag.touch()
        wait_for(lambda: worker.pid != old_pid and worker.ready, 15, message="restarted")
        assert worker.restarts == 1 and worker.crashes == 0  # asked for, not a crash
        assert not alive(old_pid)
        wait_for(lambda: set(center_pids(e).values()) == {worker.pid}, 10,
                 message="the center to know only the new worker")
        assert e.submit(getpid, pure=False).result(timeout=10) == worker.pid
    assert f"(pid {old_pid}): over its limit" in caplog.text


# --------------------------------------------------------------------------- local directories


def ten_mib(i):
    import numpy as np
    return np.full(10 << 17, float(i))


def worker_directories(parent, pid=None) -> list:
    prefix = "minidist-worker-" + (f"{pid}-" if pid else "")
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefix))


@pytest.mark.timeout(60)
def test_sigkilled_worker_leaves_no_spill_files_behind(spawn, tmp_path):
    """A worker killed with spilled data: the nanny removes its directory, and the worker
    it starts in its place has a fresh one of its own."""
    center = spawn("center", "--port", "0")
    worker = spawn("worker", center.address, "--memory-limit", "200MB",
                   "--local-directory", str(tmp_path))
    lines = Lines(worker)
    first_pid = worker.pid
    (directory,) = worker_directories(tmp_path, first_pid)
    with Executor(center.address) as e:
        futures = [e.submit(ten_mib, i) for i in range(20)]  # 210 MB: over half spilled
        concurrent.futures.wait(futures, timeout=30)
        wait_for(lambda: sum(w["spilled"] for w in e.memory().values()) >= 8 * (10 << 20),
                 message="80 MB spilled")
        assert len(list(directory.glob("*.spill"))) >= 8
        os.kill(first_pid, signal.SIGKILL)
        _, pid = lines.worker()
    assert not directory.exists()
    assert [d.name.split("-")[2] for d in worker_directories(tmp_path)] == [str(pid)]
    assert worker.stop(signal.SIGTERM) == 0
    assert worker_directories(tmp_path) == []  # a clean stop removes its own


@pytest.mark.timeout(60)
def test_a_worker_that_is_not_restarted_leaves_no_directory(tmp_path):
    with LocalCluster(n_workers=1, nanny=False, local_directory=str(tmp_path)) as cluster:
        [worker] = cluster.workers
        (directory,) = worker_directories(tmp_path, worker.pid)
        os.kill(worker.pid, signal.SIGKILL)
        wait_for(lambda: worker.gone, 10, message="the worker gone")
        assert not directory.exists()


@pytest.mark.timeout(60)
def test_a_starting_worker_removes_only_dead_workers_directories(spawn, tmp_path):
    """Left in the local directory: a dead worker's directory (its lock free), one without
    a lock whose PID is gone, a live one (locked), a link and a directory of another
    user named like ours, and something else.  Only the two dead ones are removed."""
    import fcntl

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    parent = tmp_path / "parent"
    victim = tmp_path / "victim"
    parent.mkdir()
    victim.mkdir()
    (victim / "keep").write_bytes(b"precious")

    def make(name: str, lock: bool = True):
        path = parent / name
        path.mkdir(mode=0o700)
        (path / "0.spill").write_bytes(b"x" * 1000)
        if lock:
            (path / "lock").write_bytes(b"")
        return path

    unlocked = make("minidist-worker-1234-0123456789abcdef")
    lockless = make(f"minidist-worker-{dead_pid}-abcdefgh", lock=False)  # an older name
    live = make(f"minidist-worker-{os.getpid()}-fedcba9876543210")
    held = os.open(live / "lock", os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # a worker alive holds its lock
    link = parent / "minidist-worker-4321-0123456789abcdef"
    link.symlink_to(victim)
    other = parent / "unrelated-directory"
    other.mkdir()
    others = None
    if os.geteuid() == 0:
        others = make("minidist-worker-5678-0123456789abcdef", lock=True)
        for p in (others, others / "lock", others / "0.spill"):
            os.chown(p, 65534, 65534)
    try:
        center = spawn("center", "--port", "0")
        worker = spawn("worker", center.address, "--no-nanny", "--local-directory",
                       str(parent))
        assert not unlocked.exists() and not lockless.exists()
        assert (live / "0.spill").exists() and link.is_symlink() and other.is_dir()
        assert (victim / "keep").read_bytes() == b"precious"
        if others is not None:
            assert (others / "0.spill").exists()
        (mine,) = worker_directories(parent, worker.pid)
        assert worker.stop(signal.SIGTERM) == 0
        assert not mine.exists()
    finally:
        os.close(held)


FIXTURE_RUN = '''
import os, signal
from minidist import Executor

def inc(x):
    return x + 1

def test_cluster_fixture(c, e):
    assert e.submit(inc, 1).result(30) == 2

def test_spawned(spawn):
    center = spawn("center", "--port", "0")
    spawn("worker", center.address, "--nworkers", "2")
    worker = spawn("worker", center.address, "--no-nanny")
    killed = spawn("worker", center.address)
    os.kill(killed.pid, signal.SIGKILL)  # its nanny restarts it
    with Executor(center.address) as e:
        assert e.submit(inc, 1).result(30) == 2
'''


@pytest.mark.timeout(120)
def test_a_run_of_the_cluster_fixtures_leaves_no_directories(tmp_path):
    """The suite's own fixtures (a module's LocalCluster, spawned centers and workers with
    and without a nanny, one killed) leave no worker directory in the temporary directory."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp_path / "test_fixture_run.py").write_text(FIXTURE_RUN)
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TMPDIR": str(tmp),
           "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    env.pop("MINIDIST_TEST_SESSION", None)  # its own session, checked by its own conftest
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest",
                          "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                          str(tmp_path / "test_fixture_run.py")],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path),
                         timeout=100)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout
    assert sorted(p.name for p in tmp.glob("minidist-worker-*")) == []
