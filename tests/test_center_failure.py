"""The center dies and comes back; clients die without saying goodbye."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from minidist import Executor, LocalCluster

from conftest import wait_for


def inc(x):
    return x + 1


def wait_for_file(value, gate):
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(90)
def test_center_restart_workers_reregister_and_clients_fail_fast(spawn, tmp_path):
    gate = str(tmp_path / "gate")
    port = free_port()
    address = f"127.0.0.1:{port}"
    center = spawn("center", "--port", str(port))
    workers = [spawn("worker", address, "--log-level", "info") for _ in range(2)]
    e1 = Executor(address, timeout=5)
    try:
        scattered = e1.scatter([10, 20, 30, 40])
        computed = e1.map(inc, range(6))
        assert list(computed) == list(range(1, 7))
        results = [e1.submit(inc, i) for i in range(100, 104)]
        assert [f.result(timeout=20) for f in results] == [101, 102, 103, 104]
        pending = e1.submit(wait_for_file, "late", gate)
        wait_for(lambda: any(w["processing"] for w in e1._center("workers").values()),
                 message="the pending task running on a worker")
        held = e1.who_has(scattered + results)
        assert all(held.values()) and len(held) == 8

        # The center vanishes: a pending result() fails promptly and clearly.
        center.stop(signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="lost the center"):
            pending.result(timeout=30)
        assert time.monotonic() - t0 < 5
        with pytest.raises(ConnectionError):
            e1.submit(inc, 1)
        t0 = time.monotonic()
        with pytest.raises(ConnectionError):
            Executor(address, timeout=5)
        assert time.monotonic() - t0 < 5

        # Keep it down a while: the workers retry with growing delays.
        Path(gate).touch()
        wait_for(lambda: all(len(re.findall(r"retrying in", w.log())) >= 4 for w in workers),
                 15, interval=0.1, message="workers retrying")
        for w in workers:
            delays = [float(d) for d in re.findall(r"retrying in ([0-9.]+)s", w.log())]
            assert delays == sorted(delays) and delays[-1] > delays[0], delays

        # Back on the same port: the workers re-register with what they hold.
        spawn("center", "--port", str(port))
        with Executor(address, timeout=5) as e2:
            wait_for(lambda: len(e2.nthreads()) == 2, 15, message="workers re-registered")
            worker_addresses = {w.address for w in workers}
            assert set(e2.nthreads()) == worker_addresses

            def reregistered():
                now = e2._center("who_has", keys=list(held) + [pending.key])
                return now if all(now.get(k) for k in held) and now.get(pending.key) else None

            now = wait_for(reregistered, 15, message="data re-registered")
            for key, where in held.items():
                assert set(now[key]) == set(where), key
            assert set(now[pending.key]) <= worker_addresses  # finished while the center was away
            assert e2.submit(inc, 41).result(timeout=20) == 42
            assert list(e2.map(inc, range(20))) == list(range(1, 21))
        for w in workers:
            assert w.popen.poll() is None
            assert "lost the center" in w.log()
    finally:
        e1.shutdown(wait=False)


CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from minidist import Client
    c = Client(sys.argv[1])
    data = c.scatter([1, 2, 3])
    futures = c.map(sum, [[i, 1] for i in range(5)])
    c.gather(futures)
    print(" ".join(str(f.key) for f in data + futures), flush=True)
    sys.stdin.readline()     # the test has seen our keys on the cluster
    how = sys.argv[2]
    if how == "exit":        # interpreter exit, shutdown never called
        sys.exit(0)
    if how == "os._exit":    # no atexit handlers at all
        os._exit(3)
    time.sleep(60)           # "sigkill": the test kills us
""")


@pytest.fixture(scope="module")
def keyed_cluster():
    with LocalCluster(n_workers=2) as cluster:
        yield cluster


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["exit", "os._exit", "sigkill"])
def test_client_that_dies_without_shutdown_releases_its_keys(keyed_cluster, how):
    cluster = keyed_cluster
    env = {**os.environ, "MINIDIST_AUTH_KEY": cluster.auth_key.decode()}
    child = subprocess.Popen([sys.executable, "-c", CHILD, cluster.address, how],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        keys = child.stdout.readline().split()
        assert len(keys) == 8
        with Executor(cluster) as e:
            assert all(e.who_has()[k] for k in keys)
            assert e._center("info")["clients"] == 2
            if how == "sigkill":
                child.send_signal(signal.SIGKILL)
            else:
                child.stdin.write("go\n")
                child.stdin.flush()
            child.wait(20)

            def released():
                who_has = e.who_has()
                info = e._center("info")
                return not any(k in who_has for k in keys) and info["clients"] == 1

            wait_for(released, 10, message="keys of the dead client released")
            assert not any(k in e.has_what()[w] for w in e.has_what() for k in keys)
            for address in e.nthreads():  # the workers dropped the data too
                assert not set(keys) & set(e._pool.call(address, "keys"))
            assert e.submit(inc, 1).result(timeout=10) == 2
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()
        child.stdin.close()


@pytest.mark.timeout(60)
def test_worker_refused_by_a_restarted_center_exits(spawn):
    """A center back with another auth key refuses the worker: it exits non-zero, saying why."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    center = spawn("center", "--port", str(port), "--host", "127.0.0.1",
                   env={"MINIDIST_AUTH_KEY": "first-key"})
    worker = spawn("worker", address, "--host", "127.0.0.1",
                   env={"MINIDIST_AUTH_KEY": "first-key"})
    center.stop(signal.SIGKILL)
    spawn("center", "--port", str(port), "--host", "127.0.0.1",
          env={"MINIDIST_AUTH_KEY": "second-key"})
    assert worker.popen.wait(20) != 0
    assert "rejected the auth key" in worker.log()
