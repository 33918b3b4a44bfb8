"""LocalCluster: real processes that never outlive their owner."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from minidist import Executor, LocalCluster, wire

from conftest import alive, reap, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def inc(x):
    return x + 1


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def test_local_cluster_runs_real_processes(cluster):
    assert re.fullmatch(r"127\.0\.0\.1:\d+", cluster.address)
    assert cluster.center.address == cluster.address
    assert len(cluster.workers) == 2
    for proc in [cluster.center, *cluster.workers]:
        assert proc.pid != os.getpid() and alive(proc.pid)
    assert "minidist.center" in cmdline(cluster.center.pid)
    assert all("minidist.worker" in cmdline(w.pid) for w in cluster.workers)
    with Executor(cluster.address) as e:  # the address alone finds the cluster's key
        assert set(e.nthreads()) == {w.address for w in cluster.workers}
        info = e._center("workers")
        assert {w["pid"] for w in info.values()} == {w.pid for w in cluster.workers}
        assert e.submit(inc, 1).result(timeout=10) == 2


def test_a_dead_center_refuses_dials():
    """LocalCluster hands its listening socket to the center and keeps no copy of it."""
    with LocalCluster(n_workers=1) as cluster:
        host, port = wire.parse_address(cluster.address)
        os.kill(cluster.center.pid, signal.SIGKILL)
        cluster.center.popen.wait(10)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, port), timeout=5).close()


def test_context_manager_and_close_leave_nothing():
    with LocalCluster(n_workers=3, threads_per_worker=2) as cluster:
        pids = cluster.pids
        assert len(pids) == 4 and all(alive(p) for p in pids)
        with Executor(cluster) as e:
            assert sorted(e.nthreads().values()) == [2, 2, 2]
            assert list(e.map(inc, range(10))) == list(range(1, 11))
    assert not any(alive(p) for p in pids)
    cluster.close()  # again: harmless


def test_close_without_with():
    cluster = LocalCluster(n_workers=1)
    pids = cluster.pids
    assert all(alive(p) for p in pids)
    cluster.close()
    assert not any(alive(p) for p in pids)


def test_start_and_stop_worker():
    with LocalCluster(n_workers=1) as cluster, Executor(cluster) as e:
        new = cluster.start_worker(nthreads=2, name="extra")
        assert alive(new.pid)
        assert e.nthreads()[new.address] == 2
        assert e._center("workers")[new.address]["name"] == "extra"
        cluster.stop_worker(new)
        assert not alive(new.pid)
        wait_for(lambda: new.address not in e.nthreads(), message="the worker gone")
        assert e.submit(inc, 2).result(timeout=10) == 3


def test_cluster_without_auth_key():
    with LocalCluster(n_workers=1, auth_key=False) as cluster:
        assert cluster.auth_key is None
        with Executor(cluster.address, auth_key=None) as e:
            assert e.submit(inc, 3).result(timeout=10) == 4


def test_cluster_rejects_strangers(cluster):
    from minidist import AuthenticationError
    with pytest.raises(AuthenticationError):
        Executor(cluster.address, auth_key="not-the-key", timeout=5)


ABANDON = """
import sys
from minidist import LocalCluster
cluster = LocalCluster(n_workers=2)
print(" ".join(map(str, cluster.pids)), flush=True)
{ending}
"""


def run_child(ending: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ABANDON.format(ending=ending)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cluster_left_open_at_exit_leaves_nothing():
    child = run_child("sys.exit(0)  # no close()")
    try:
        pids = [int(p) for p in child.stdout.readline().split()]
        assert len(pids) == 3
        assert child.wait(30) == 0
        wait_for(lambda: not any(alive(p) for p in pids), timeout=15,
                 message="the cluster's processes to exit")
    finally:
        reap(child)


def test_cluster_of_a_killed_parent_leaves_nothing():
    child = run_child("import time\nwhile True: time.sleep(1)")
    try:
        pids = [int(p) for p in child.stdout.readline().split()]
        assert len(pids) == 3 and all(alive(p) for p in pids)
        child.send_signal(signal.SIGKILL)  # no atexit, no cleanup: only the stdin pipes close
        child.wait(10)
        wait_for(lambda: not any(alive(p) for p in pids), timeout=15,
                 message="orphaned cluster processes to exit")
    finally:
        reap(child)


def test_executor_without_address_owns_its_cluster():
    e = Executor()
    pids = e._cluster.pids
    assert all(alive(p) for p in pids)
    assert e.submit(inc, 9).result(timeout=20) == 10
    e.shutdown()
    assert not any(alive(p) for p in pids)


def test_executor_owned_cluster_closes_after_shutdown_without_wait():
    e = Executor(1)
    pids = e._cluster.pids
    f = e.submit(inc, 1)
    e.shutdown(wait=False)
    assert f.result(timeout=20) == 2
    wait_for(lambda: not any(alive(p) for p in pids), timeout=20,
             message="the owned cluster to close")
