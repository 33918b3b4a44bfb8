"""Workers die for real (SIGKILL, SIGSTOP) during and between computations.

Tasks leave traces in files (which pid started them, how often they ran),
so the tests can kill exactly the worker that runs a given task and can
prove that lost inputs were recomputed rather than found somewhere else.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from operator import neg
from pathlib import Path

import pytest

import minidist
from minidist import Client, Executor, LocalCluster

from conftest import wait_for


# --------------------------------------------------------------------------- tasks


def logged_inc(x, log):
    """x + 1, appending a line to ``log`` every time it runs."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    return x + 1


def logged_padded(x, log):
    """(x + 1, 4 KB of padding): too big to travel with its event, so only its holder has it."""
    return logged_inc(x, log), bytes(4096)


def wait_then_add(x, started, gate, y=0):
    """Write our pid to ``started``, wait until ``gate`` exists, return x + y."""
    with open(started, "a") as f:
        f.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x + y


def kill_my_worker():
    os.kill(os.getpid(), signal.SIGKILL)


def inc(x):
    return x + 1


def add(*xs):
    return sum(xs)


def slow_inc(x, delay=0.002):
    time.sleep(delay)
    return x + 1


class SlowToSend:
    """A large value whose pickling (when a peer fetches it) stalls until ``gate`` exists.

    The first pickling writes ``sending``, so the test knows a peer's fetch
    is in flight on the worker that holds the value and can kill it right
    then.  The payload is a numpy array: it travels out of band, so its
    bytes start flowing as soon as pickling returns.
    """

    def __init__(self, payload, sending: str, gate: str) -> None:
        self.payload = payload
        self.sending = sending
        self.gate = gate

    def __reduce__(self):
        if not os.path.exists(self.sending):  # atomically: the test kills us on sight
            Path(self.sending + ".tmp").write_text(str(os.getpid()))
            os.replace(self.sending + ".tmp", self.sending)
        if not os.path.exists(self.gate):
            deadline = time.monotonic() + 60
            while not os.path.exists(self.gate) and time.monotonic() < deadline:
                time.sleep(0.01)
        return SlowToSend, (self.payload, self.sending, self.gate)


def make_big(n, sending, gate):
    import numpy as np
    return SlowToSend(np.arange(n, dtype=np.uint8), sending, gate)


def checksum(value):
    p = value.payload
    return len(p), int(p[-1]), int(p[:1000].sum())


# --------------------------------------------------------------------------- helpers


def pids_in(path) -> list[int]:
    try:
        return [int(line) for line in Path(path).read_text().split()]
    except FileNotFoundError:
        return []


def proc_with_pid(cluster: LocalCluster, pid: int):
    return next(p for p in cluster.workers if p.pid == pid)


def holders(executor: Executor, future) -> list[str]:
    return executor._center("who_has", keys=[future.key]).get(future.key, [])


def all_gone(procs) -> bool:
    return all(p.popen.poll() is not None for p in procs)


# --------------------------------------------------------------------------- during a computation


@pytest.mark.timeout(60)
def test_sigkill_mid_computation_reschedules_and_recomputes_lost_inputs(tmp_path):
    """The worker running ``b`` also holds its only input ``a``: both must be redone."""
    log, started, gate = (str(tmp_path / n) for n in ("a.log", "b.started", "gate"))
    with LocalCluster(n_workers=3) as cluster, Executor(cluster) as e:
        a = e.submit(logged_inc, 1, log)
        wait_for(lambda: a.done(), 20, message="a in memory")
        [a_holder] = holders(e, a)
        b = e.submit(wait_then_add, a, started, gate, y=10)
        others = [e.submit(slow_inc, i, 0.01) for i in range(60)]
        del a  # only b needs a now: it lives on as lineage
        [victim_pid] = wait_for(lambda: pids_in(started), 20, message="b started")
        victim = proc_with_pid(cluster, victim_pid)
        assert victim.address == a_holder  # b runs where its input is
        cluster.stop_worker(victim, signal.SIGKILL)
        Path(gate).touch()
        assert b.result(timeout=30) == 12
        assert [f.result(timeout=30) for f in others] == list(range(1, 61))
        assert len(pids_in(log)) == 2, "a was not recomputed from its task"
        assert victim_pid not in pids_in(log)[1:]
        assert pids_in(started)[-1] != victim_pid
        assert victim.address not in e.nthreads()


@pytest.mark.timeout(60)
def test_task_that_kills_its_workers_errs_with_killed_worker():
    with LocalCluster(n_workers=3, nanny=False) as cluster:  # dead workers stay dead
        procs = list(cluster.workers)
        with Executor(cluster) as e:
            bad = e.submit(kill_my_worker, key="suicidal-task")
            with pytest.raises(minidist.KilledWorker, match="suicidal-task") as info:
                bad.result(timeout=30)
            assert info.value.key == "suicidal-task"
            assert bad.status == "error"
            assert "3 workers" in str(info.value)
            wait_for(lambda: all_gone(procs), 10, message="all three workers dead")
            cluster.start_worker()
            assert e.submit(inc, 1).result(timeout=20) == 2  # the cluster still serves


@pytest.mark.timeout(60)
def test_allowed_failures_is_configurable():
    with LocalCluster(n_workers=2, allowed_failures=1, nanny=False) as cluster:
        procs = list(cluster.workers)
        with Executor(cluster) as e:
            bad = e.submit(kill_my_worker, key="dies-once")
            with pytest.raises(minidist.KilledWorker, match="dies-once"):
                bad.result(timeout=30)
            # one death was enough: exactly one worker is gone, the other serves on
            assert len(e.nthreads()) == 1
            assert e.submit(inc, 2).result(timeout=20) == 3
        assert sum(p.popen.poll() is not None for p in procs) == 1


# --------------------------------------------------------------------------- between computations


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fn, value, then, then_value", [
    (logged_padded, (42, bytes(4096)), len, 2),  # lives only on its holder
    (logged_inc, 42, inc, 43),  # small: it came with its event, the client has it already
])
def test_only_holder_of_finished_future_dies_result_recomputes(tmp_path, fn, value, then,
                                                               then_value):
    """The key is recomputed on a survivor and is usable as an input again.

    ``result()`` of a large value waits for that recompute; a small value
    is returned at once while the cluster recomputes it for later tasks.
    """
    log = str(tmp_path / "x.log")
    with LocalCluster(n_workers=2) as cluster, Client(cluster) as c:
        x = c.submit(fn, 41, log)
        wait_for(lambda: x.status == "finished", 20, message="x finished")
        [holder] = holders(c, x)
        [pid] = pids_in(log)
        cluster.stop_worker(proc_with_pid(cluster, pid), signal.SIGKILL)
        assert x.result(timeout=30) == value
        if fn is logged_padded:
            assert len(pids_in(log)) == 2  # fetched from the recompute
        wait_for(lambda: len(pids_in(log)) == 2, 20, message="x recomputed")
        assert pids_in(log)[1] != pid
        wait_for(lambda: holders(c, x) and holder not in holders(c, x), 20,
                 message="x held by the survivor")
        assert c.submit(then, x).result(timeout=20) == then_value


@pytest.mark.timeout(60)
def test_scattered_data_whose_holder_dies_is_lost():
    with LocalCluster(n_workers=2) as cluster, Client(cluster) as c:
        victim = cluster.workers[0]
        [data] = c.scatter([123], workers=[victim.address])
        assert holders(c, data) == [victim.address]
        assert c.submit(inc, data).result(timeout=20) == 124
        cluster.stop_worker(victim, signal.SIGKILL)
        wait_for(lambda: data.status == "lost", 20, message="status lost")
        t0 = time.monotonic()
        with pytest.raises(minidist.LostKeyError) as info:
            data.result(timeout=20)
        assert time.monotonic() - t0 < 5
        assert data.key in str(info.value) and victim.address in str(info.value)
        assert "lost" in str(info.value)
        assert isinstance(data.exception(), minidist.LostKeyError)
        # a new task on the lost key fails cleanly; the cluster still serves
        with pytest.raises(minidist.LostKeyError, match=data.key):
            c.submit(add, data, 1).result(timeout=20)
        assert c.submit(inc, 5).result(timeout=20) == 6


@pytest.mark.timeout(60)
def test_sigstopped_worker_is_declared_dead_and_cannot_corrupt_state(tmp_path):
    started, gate, log = (str(tmp_path / n) for n in ("started", "gate", "log"))
    with LocalCluster(n_workers=2, heartbeat_timeout=1.5) as cluster, \
            Executor(cluster) as e:
        held = e.submit(logged_inc, 0, log)  # ends up somewhere; maybe on the victim
        wait_for(held.done, 20, message="held in memory")
        slow = e.submit(wait_then_add, 5, started, gate, y=1)
        [victim_pid] = wait_for(lambda: pids_in(started), 20, message="task started")
        victim = proc_with_pid(cluster, victim_pid)
        held_on_victim = holders(e, held) == [victim.address]
        os.kill(victim_pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            wait_for(lambda: victim.address not in e.nthreads(), 15,
                     message="stopped worker removed")
            assert time.monotonic() - t0 < 10
            wait_for(lambda: len(pids_in(started)) == 2, 20, message="task redone elsewhere")
            assert pids_in(started)[1] != victim_pid
            Path(gate).touch()
            assert slow.result(timeout=20) == 6
            assert held.result(timeout=20) == 1
            if held_on_victim:  # recomputed while the victim is stopped, not waited for
                wait_for(lambda: len(pids_in(log)) == 2, 20, message="held recomputed")
        finally:
            os.kill(victim_pid, signal.SIGCONT)
        # It wakes, finds its stream closed, re-registers with what it holds.
        wait_for(lambda: victim.address in e.nthreads(), 20, message="re-registered")
        assert victim.popen.poll() is None
        assert slow.result(timeout=5) == 6 and held.result(timeout=5) == 1
        futures = e.map(inc, range(50))
        assert list(futures) == list(range(1, 51))
        for key, where in e.who_has([slow, held]).items():
            assert where  # every copy the center knows is real:
        for address in e.who_has([slow])[slow.key]:
            assert e._pool.call(address, "get_data", keys=[slow.key])["data"]


FLOOD = 150_000
"""Enough tasks that one ``update_graph`` keeps the center's scheduler busy for longer than
the heartbeat timeout below (about 1 s here; it removed workers before liveness was
measured on the stream)."""


@pytest.mark.timeout(120)
def test_busy_center_keeps_live_workers_and_still_drops_a_stopped_one(spawn):
    """Heartbeats waiting in a busy center's queue keep their workers; a hung worker still goes.

    The center is busy for seconds with one large graph and with releasing
    it; the workers beat every 0.15 s.  No worker may be removed and the
    answer must be right.  Then one worker is stopped with SIGSTOP and must
    be removed within about the heartbeat timeout.
    """
    timeout = 0.8
    center = spawn("center", "--port", "0", "--heartbeat-timeout", str(timeout))
    workers = [spawn("worker", center.address, "--heartbeat-interval", "0.15")
               for _ in range(2)]
    with Client(center.address) as c:
        futures = c.map(neg, range(FLOOD), pure=False)
        assert c.submit(sum, futures).result(timeout=100) == -sum(range(FLOOD))
        del futures
        wait_for(lambda: c._center("info")["ntasks"] <= 1, 60, message="flood released")
        assert "removing worker" not in center.log(), center.log()
        assert sorted(c.nthreads()) == sorted(w.address for w in workers)

        victim = workers[0]
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            wait_for(lambda: victim.address not in c.nthreads(), 15,
                     message="stopped worker removed")
            assert time.monotonic() - t0 < timeout + 2  # one check interval and slack for load
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        assert f"removing worker {victim.address}: no heartbeat" in center.log()
        assert c.submit(inc, 1, pure=False).result(timeout=20) == 2


@pytest.mark.timeout(60)
def test_stopped_holder_of_lost_data_wakes_up_without_confusing_anyone():
    """Scattered data is lost when its stopped holder is dropped; its return changes nothing."""
    with LocalCluster(n_workers=2, heartbeat_timeout=1.5) as cluster, Client(cluster) as c:
        victim = cluster.workers[0]
        [data] = c.scatter([7], workers=[victim.address])
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: data.status == "lost", 15, message="lost")
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        wait_for(lambda: victim.address in c.nthreads(), 20, message="re-registered")
        assert c.submit(inc, 1).result(timeout=20) == 2
        assert data.status == "lost"
        with pytest.raises(minidist.LostKeyError, match=data.key):
            data.result(timeout=10)
        with pytest.raises(minidist.LostKeyError):
            c.submit(inc, data, pure=False).result(timeout=10)
        assert c.who_has([data])[data.key] == []


@pytest.mark.timeout(60)
def test_fetches_from_a_sigstopped_holder_do_not_hang(tmp_path):
    """Client and peer both have a connection open to the holder when it stops answering.

    Their requests sit unanswered on those connections; once the center
    declares the holder dead they must give up on it and get the values
    (recomputed) elsewhere, instead of waiting for it to wake.
    """
    log = str(tmp_path / "log")
    with LocalCluster(n_workers=3, heartbeat_timeout=1.5) as cluster, Client(cluster) as c:
        first = c.submit(logged_inc, 0, log, pure=False)
        wait_for(first.done, 20, message="first done")
        [holder] = holders(c, first)
        # Two more values made from it: they run where it is, so only the holder has them.
        a = c.submit(logged_inc, first, log, pure=False)
        b = c.submit(logged_inc, first, log, pure=False)
        wait_for(lambda: a.done() and b.done(), 20, message="a and b done")
        assert holders(c, a) == holders(c, b) == [holder]
        victim = next(p for p in cluster.workers if p.address == holder)
        peer = next(p for p in cluster.workers if p is not victim)
        # Open connections to the holder: from the client and from the peer.
        assert first.result(timeout=20) == 1
        assert c.submit(inc, first, workers=[peer.address]).result(timeout=20) == 2
        os.kill(victim.pid, signal.SIGSTOP)
        waker = threading.Timer(30, os.kill, (victim.pid, signal.SIGCONT))
        waker.start()
        try:
            t0 = time.monotonic()
            from_peer = c.submit(inc, b, workers=[peer.address], pure=False)
            assert a.result(timeout=20) == 2
            assert from_peer.result(timeout=20) == 3
            assert time.monotonic() - t0 < 12, "fetches waited for the stopped worker"
        finally:
            waker.cancel()
            os.kill(victim.pid, signal.SIGCONT)


# --------------------------------------------------------------------------- chaos


def build_graph(c: Client, delay: float = 0.003):
    """Chains of slow increments joined by fan-in sums (>= 2,000 tasks): futures, values."""
    n_chains, length = 250, 8
    chains, expected = [], []
    for i in range(n_chains):
        x = c.submit(slow_inc, i * 1000, delay, key=f"chain-{i}-0")
        value = i * 1000 + 1
        for j in range(1, length):
            x = c.submit(slow_inc, x, delay, key=f"chain-{i}-{j}")
            value += 1
        chains.append(x)
        expected.append(value)
    level, level_values, depth = chains, expected, 0
    while len(level) > 1:  # a fan-in tree of sums over the chain ends
        level_next, values_next = [], []
        for k in range(0, len(level), 4):
            level_next.append(c.submit(add, *level[k:k + 4], key=f"sum-{depth}-{k}"))
            values_next.append(sum(level_values[k:k + 4]))
        level, level_values, depth = level_next, values_next, depth + 1
    sums_of_pairs = c.map(add, chains[::2], chains[1::2], key=[
        f"pair-{i}" for i in range(n_chains // 2)])
    futures = chains + [level[0]] + sums_of_pairs
    values = expected + [level_values[0]] + [a + b for a, b in zip(expected[::2],
                                                                     expected[1::2])]
    ntasks = n_chains * length + (n_chains // 2) + sum_tree_size(n_chains)
    assert ntasks >= 2000
    return futures, values


def sum_tree_size(n: int) -> int:
    size = 0
    while n > 1:
        n = (n + 3) // 4
        size += n
    return size


@pytest.mark.timeout(120)
def test_chaos_random_sigkill_every_half_second():
    """Kill a random worker every 0.5 s (and start a replacement) while 2,000+ tasks run.

    Every kill throws away a third of the results and, through lineage,
    the chains behind them; so the killing stops after ``max_kills`` (the
    first ~5 s of the run) to let the run finish in bounded time.  Each
    kill must land while results are still pending.
    """
    # A task can be running on several of the many workers killed here, so
    # allowed_failures is raised: this test is about correctness under churn,
    # not about giving up on a task.
    max_kills = 10
    started = []
    with LocalCluster(n_workers=3, allowed_failures=20) as cluster, Client(cluster) as c:
        started.extend(cluster.workers)
        futures, expected = build_graph(c)
        stop = threading.Event()
        kills = []  # (pid, results still pending at that moment)
        rng = random.Random(4)

        def chaos():
            next_kill = time.monotonic() + 0.5
            while len(kills) < max_kills and \
                    not stop.wait(max(0.0, next_kill - time.monotonic())):
                next_kill += 0.5
                victim = rng.choice(cluster.workers)
                cluster.stop_worker(victim, signal.SIGKILL)
                kills.append((victim.pid, sum(not f.done() for f in futures)))
                started.append(cluster.start_worker())

        killer = threading.Thread(target=chaos, daemon=True)
        killer.start()
        try:
            results = c.gather(futures)
        finally:
            stop.set()
            killer.join(30)
        assert results == expected
        during = [pid for pid, pending in kills if pending]
        assert len(during) >= 5, f"only {len(during)} kills happened during the run: {kills}"
        wait_for(lambda: c._center("info")["workers"] == len(cluster.workers), 10,
                 message="the center to see exactly the live workers")
        assert len(c.nthreads()) == 3
    assert all_gone(started)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stall", [True, False], ids=["stalled-send", "streaming-send"])
def test_worker_killed_while_sending_a_large_value_to_a_peer(tmp_path, stall):
    """``use`` runs on another worker than ``big``: kill big's holder as the peer fetches it.

    stalled: the holder is killed while it serializes the reply (no byte
    sent yet); streaming: it is killed as soon as it starts sending 128 MB.
    """
    sending, gate = str(tmp_path / "sending"), str(tmp_path / "gate")
    if not stall:
        Path(gate).touch()
    n = (16 if stall else 128) << 20
    expected = (n, 255, sum((bytes(range(256)) * 4)[:1000]))
    with LocalCluster(n_workers=3) as cluster, Client(cluster) as c:
        big = c.submit(make_big, n, sending, gate)
        wait_for(lambda: big.status == "finished", 20, message="big value made")
        [holder_address] = holders(c, big)
        holder = next(p for p in cluster.workers if p.address == holder_address)
        peer = next(p for p in cluster.workers if p is not holder)
        use = c.submit(checksum, big, workers=[peer.address])  # the peer must fetch it
        wait_for(lambda: Path(sending).exists(), 20, interval=0.0005, message="fetch in flight")
        cluster.stop_worker(holder, signal.SIGKILL)
        Path(gate).touch()
        assert use.result(timeout=30) == expected
        assert checksum(big.result(timeout=30)) == expected
        assert holder.address not in c.who_has([big])[big.key]
        assert pids_in(sending) == [holder.pid]
        assert c.submit(inc, 1).result(timeout=10) == 2


@pytest.mark.timeout(60)
def test_small_result_travels_with_its_event_large_one_stays_on_its_worker():
    """result() of a small value needs no worker: it works while the holder is stopped."""
    with LocalCluster(n_workers=1, heartbeat_timeout=30) as cluster, Client(cluster) as c:
        small = c.submit(inc, 1)
        large = c.submit(bytes, 4096)
        wait_for(lambda: small.done() and large.done(), 20, message="both finished")
        [worker] = cluster.workers
        os.kill(worker.popen.pid, signal.SIGSTOP)
        try:
            assert small.result(timeout=5) == 2
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):  # honoured while fetching from a hung worker too
                large.result(timeout=0.5)
            assert time.monotonic() - t0 < 3
        finally:
            os.kill(worker.popen.pid, signal.SIGCONT)
        assert large.result(timeout=20) == bytes(4096)
