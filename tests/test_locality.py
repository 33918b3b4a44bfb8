"""Where tasks run and when data goes away.

A task records where it ran by returning ``os.getpid()``, compared with the
PIDs of the cluster's worker processes.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import time

import pytest

from minidist import Client, Executor, LocalCluster

from conftest import wait_for

MB = 1 << 20


def make_bytes(n, tag=0):
    return bytes([tag % 256]) * n


def pid_of(*args, **kwargs):
    return os.getpid()


def inc(x):
    return x + 1


def wait_file(path, value=None, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return value


def pid_after(path, i):
    wait_file(path)
    return os.getpid()


@pytest.fixture
def pids(cluster):
    """worker address -> pid."""
    return {p.address: p.pid for p in cluster.workers}


def holder(e, future):
    who = wait_for(lambda: e.who_has([future]).get(future.key), message="a holder")
    assert len(who) == 1
    return who[0]


def worker_keys(e, address):
    return set(e._pool.call(address, "keys"))


# ---------------------------------------------------------------------------
# placement


def test_task_on_a_future_runs_where_it_lives(e, pids):
    for i in range(6):
        x = e.submit(make_bytes, MB, i)
        cf.wait([x], timeout=10)
        where = holder(e, x)
        assert e.submit(pid_of, x).result(timeout=10) == pids[where]
        assert e.submit(len, x).result(timeout=10) == MB


def test_small_data_also_stays_put_when_workers_are_free(e, pids):
    for address, pid in pids.items():
        x = e.submit(str.upper, address, workers=[address])
        assert e.submit(pid_of, x, pure=False).result(timeout=10) == pid


def test_several_inputs_run_where_most_bytes_are(e, pids):
    a, b = sorted(pids)
    for tag, (big_on, small_on) in enumerate(((a, b), (b, a))):
        big = e.submit(make_bytes, 4 * MB, 10 * tag + 1, workers=[big_on])
        small1 = e.submit(make_bytes, MB, 10 * tag + 2, workers=[small_on])
        small2 = e.submit(make_bytes, MB, 10 * tag + 3, workers=[small_on])
        cf.wait([big, small1, small2], timeout=10)
        assert e.who_has([big])[big.key] == [big_on]
        assert e.submit(pid_of, small1, big, small2).result(timeout=10) == pids[big_on]
        assert e.submit(pid_of, [small1, small2], {"x": big}, pure=False).result(
            timeout=10) == pids[big_on]


def test_scattered_data_is_computed_on_in_place(e, pids):
    for address, pid in pids.items():
        [x] = e.scatter([b"s" * MB], workers=[address])
        assert e.who_has([x])[x.key] == [address]
        assert e.submit(pid_of, x).result(timeout=10) == pid


def test_inputs_move_peer_to_peer_when_needed(e, pids):
    a, b = sorted(pids)
    x = e.submit(make_bytes, MB, 7, workers=[a])
    y = e.submit(len, x, workers=[b])  # must run on b: x travels a -> b
    assert y.result(timeout=10) == MB
    wait_for(lambda: set(e.who_has([x])[x.key]) == {a, b},
             message="the fetched copy to be registered")


def test_worker_joining_mid_job_gets_work_at_once(tmp_path):
    flag = str(tmp_path / "go")
    with LocalCluster(n_workers=1) as cluster, Executor(cluster) as e:
        first = cluster.workers[0]
        futures = [e.submit(pid_after, flag, i) for i in range(20)]
        wait_for(lambda: e._center("workers")[first.address]["processing"] > 0,
                 message="the first worker busy")
        try:
            new = cluster.start_worker()
            # the newcomer is handed queued work as soon as it registers
            wait_for(lambda: e._center("workers").get(new.address, {}).get("processing"),
                     message="work for the new worker")
        finally:
            open(flag, "w").close()
        ran = [f.result(timeout=30) for f in futures]
        assert set(ran) == {first.pid, new.pid}


# ---------------------------------------------------------------------------
# memory release


def test_dropped_futures_release_memory(e, cluster):
    futures = [e.submit(make_bytes, 100_000, i) for i in range(10)]
    cf.wait(futures, timeout=10)
    keys = [f.key for f in futures]
    who = e.who_has(futures)
    assert set(who) == set(keys)
    held = {address: worker_keys(e, address) for address in e.nthreads()}
    for key, holders in who.items():
        for address in holders:
            assert key in held[address]
    del futures
    gc.collect()
    wait_for(lambda: not set(keys) & set(e.who_has()), message="keys gone from who_has")
    wait_for(lambda: not any(set(keys) & worker_keys(e, a) for a in e.nthreads()),
             message="keys deleted on the workers")
    assert not e._center("who_has", keys=keys)  # the center forgot them


def test_info_counts_drop_after_release(e):
    before = e._center("info")["ntasks"]
    futures = [e.submit(inc, i) for i in range(5000, 5050)]
    cf.wait(futures, timeout=20)
    during = e._center("info")
    assert during["ntasks"] >= before + 50
    assert during["tasks"].get("memory", 0) >= 50
    del futures
    gc.collect()
    wait_for(lambda: e._center("info")["ntasks"] <= before, message="task count back down")


def test_intermediate_results_released_when_no_longer_needed(e):
    x = e.submit(make_bytes, MB, 11)
    y = e.submit(len, x)
    xkey = x.key
    del x
    gc.collect()
    assert y.result(timeout=10) == MB
    wait_for(lambda: xkey not in e.who_has(), message="the input deleted")
    assert y.key in e.who_has()


def test_held_futures_keep_their_data(e):
    x = e.submit(make_bytes, 1000, 12)
    y = e.submit(len, x)
    assert y.result(timeout=10) == 1000
    assert x.key in e.who_has()  # still referenced: kept
    assert x.result(timeout=10) == make_bytes(1000, 12)


def test_result_fetched_value_survives_release(e):
    x = e.submit(make_bytes, 1000, 13)
    value = x.result(timeout=10)
    key = x.key
    del x
    gc.collect()
    wait_for(lambda: key not in e.who_has(), message="released")
    assert value == make_bytes(1000, 13)


def test_closed_client_releases_its_keys(cluster):
    c = Client(cluster)
    futures = c.map(make_bytes, [50_000] * 5, range(20, 25))
    cf.wait(futures, timeout=10)
    keys = [f.key for f in futures]
    with Executor(cluster) as observer:
        assert set(observer.who_has()) >= set(keys)
        c.close()
        wait_for(lambda: not set(keys) & set(observer.who_has()), message="keys released")
        wait_for(lambda: not any(set(keys) & worker_keys(observer, a)
                                 for a in observer.nthreads()),
                 message="keys deleted on the workers")


def test_key_shared_by_two_clients_lives_while_either_holds_it(cluster):
    c1, c2 = Client(cluster), Client(cluster)
    try:
        f1 = c1.submit(make_bytes, 1000, 30)
        f2 = c2.submit(make_bytes, 1000, 30)
        assert f1.key == f2.key
        cf.wait([f1, f2], timeout=10)
        key = f1.key
        c1.close()
        # c2 still holds it: it stays
        assert f2.result(timeout=10) == make_bytes(1000, 30)
        assert key in c2.who_has()
        del f2
        gc.collect()
        wait_for(lambda: key not in c2.who_has(), message="released by the last holder")
    finally:
        c1.close()
        c2.close()


def test_idle_worker_takes_tasks_waiting_behind_a_long_one(e, tmp_path):
    """Quick tasks prefetched behind a long one are taken back by the idle worker."""
    flag = str(tmp_path / "go")
    long = e.submit(wait_file, flag, "long")
    try:
        wait_for(lambda: any(w["processing"] for w in e._center("workers").values()),
                 message="the long task running")
        quick = [e.submit(inc, i) for i in range(6000, 6006)]
        done, not_done = cf.wait(quick, timeout=3)
        assert not not_done, f"{len(not_done)} quick tasks wait behind the long one"
    finally:
        open(flag, "w").close()
    assert long.result(timeout=10) == "long"


def record_run(path, i):
    with open(path, "a") as f:
        f.write(f"{i}\n")
    return i


def test_tasks_taken_back_from_a_stalled_worker_run_exactly_once(e, tmp_path):
    flag = str(tmp_path / "go")
    log = str(tmp_path / "runs")
    long = e.submit(wait_file, flag, "long-2")
    try:
        wait_for(lambda: any(w["processing"] for w in e._center("workers").values()),
                 message="the long task running")
        quick = [e.submit(record_run, log, i, pure=False) for i in range(40)]
        done, not_done = cf.wait(quick, timeout=5)
        assert not not_done
    finally:
        open(flag, "w").close()
    assert long.result(timeout=10) == "long-2"
    assert [f.result() for f in quick] == list(range(40))
    runs = open(log).read().split()
    assert sorted(map(int, runs)) == list(range(40)), "a task ran twice or not at all"
