"""``dcenter --no-workers-timeout S``: tasks no worker can run err instead of waiting forever."""

from __future__ import annotations

import os
import signal
import time

import pytest

from minidist import Executor, NoWorkerError

from conftest import wait_for


def inc(x):
    return x + 1


def started_then_wait(path):
    """Say we started (by creating ``path``), then wait to be killed."""
    open(path, "w").close()
    time.sleep(60)


@pytest.mark.timeout(60)
def test_task_errs_when_no_worker_comes_then_a_new_worker_runs_work(spawn):
    center = spawn("center", "--port", "0", "--no-workers-timeout", "1")
    with Executor(center.address) as e:
        start = time.monotonic()
        fut = e.submit(inc, 1)
        dependent = e.submit(inc, fut)
        with pytest.raises(NoWorkerError, match="no workers in the cluster for 1s"):
            fut.result(timeout=30)
        assert time.monotonic() - start >= 0.9
        with pytest.raises(NoWorkerError):
            dependent.result(timeout=30)
        spawn("worker", center.address)
        assert e.submit(inc, 10).result(timeout=30) == 11


@pytest.mark.timeout(60)
def test_restricted_task_errs_while_others_run(spawn):
    center = spawn("center", "--port", "0", "--no-workers-timeout", "1")
    spawn("worker", center.address, "--name", "alice")
    with Executor(center.address) as e:
        fut = e.submit(inc, 1, workers=["bob"])
        assert e.submit(inc, 2, workers=["alice"]).result(timeout=30) == 3
        with pytest.raises(NoWorkerError, match=r"workers=\['bob'\] for 1s"):
            fut.result(timeout=30)


@pytest.mark.timeout(60)
def test_off_by_default_a_restricted_task_waits_for_its_worker(spawn):
    center = spawn("center", "--port", "0")
    with Executor(center.address) as e:
        fut = e.submit(inc, 1, workers=["bob"])
        with pytest.raises(TimeoutError):
            fut.result(timeout=1.5)
        spawn("worker", center.address, "--name", "bob")
        assert fut.result(timeout=30) == 2


@pytest.mark.timeout(60)
def test_task_of_the_last_worker_to_die_errs_with_no_workers(spawn, tmp_path):
    center = spawn("center", "--port", "0", "--no-workers-timeout", "1")
    worker = spawn("worker", center.address, "--no-nanny")  # so that it stays dead
    flag = tmp_path / "started"
    with Executor(center.address) as e:
        fut = e.submit(started_then_wait, str(flag))
        wait_for(flag.exists, 30, message="the task to start")
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(NoWorkerError):
            fut.result(timeout=30)
