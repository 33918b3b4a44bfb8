"""The end-to-end example of the cluster-core issue, over real processes."""

import concurrent.futures as cf
import threading
import time

import pytest

from conftest import wait_for

from minidist import Client, Executor


def inc(x):
    return x + 1


def double(x):
    return 2 * x


def test_executor_map_and_futures_on_futures(e):
    assert list(e.map(pow, range(5), range(5))) == [1, 1, 4, 27, 256]
    x = e.submit(inc, 1)
    y = e.submit(double, x)
    assert y.result(timeout=10) == 4
    assert isinstance(x, cf.Future) and isinstance(e, cf.Executor)


def test_client_map_stays_remote(c):
    futures = c.map(inc, range(1000))
    assert all(not isinstance(f, int) for f in futures)
    assert c.submit(sum, futures).result(timeout=30) == sum(range(1, 1001))
    assert c.gather(futures)[:5] == [1, 2, 3, 4, 5]


def test_executor_without_address_owns_a_cluster():
    with Executor() as e:
        assert e.submit(inc, 41).result(timeout=20) == 42
        cluster = e._cluster
        assert len(cluster.workers) == 2
    assert all(p.popen.poll() is not None for p in [cluster.center, *cluster.workers] if p)


def test_streams_keep_their_order_when_the_center_is_busy_and_when_idle(cluster):
    """Quiet streams are handled by their own thread, busy ones queue; both at once.

    Each client submits, waits, drops and resubmits the same keys while
    another floods the center, so both paths run and hand over often;
    every result must be right and every released key forgotten.
    """
    errors = []

    def churn(n):
        try:
            with Executor(cluster) as ex:
                for i in range(60):
                    futures = [ex.submit(inc, n * 1000 + j) for j in range(5)]
                    assert [f.result(timeout=20) for f in futures] == \
                        [n * 1000 + j + 1 for j in range(5)]
                    del futures  # release; the next round wants the same keys again
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    with Client(cluster) as flood:
        base = flood._center("info")["ntasks"]
        threads = [threading.Thread(target=churn, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        for _ in range(4):
            assert sum(flood.gather(flood.map(double, range(2000), pure=False))) == \
                2 * sum(range(2000))
        for t in threads:
            t.join(60)
        assert not errors, errors
        wait_for(lambda: flood._center("info")["ntasks"] <= base, 20,
                 message="every released key forgotten")


def test_an_event_waits_behind_its_streams_queued_events_even_with_the_baton_free():
    """The center's shortcut must never let a stream's later event overtake an earlier one."""
    from minidist.center import Center, _Inbox

    center = Center()  # not started: its scheduler thread is not consuming yet
    seen = []
    center._event_handlers["probe"] = lambda now, item: seen.append(item)
    first, other = _Inbox(), _Inbox()
    with center._baton:  # the scheduler is busy: the event is queued
        center._deliver(first, "probe", ("first-0",))
    center._deliver(first, "probe", ("first-1",))  # baton free, but first-0 is still queued
    assert seen == []
    center._deliver(other, "probe", ("other-0",))  # another stream, nothing queued: handled now
    assert seen == ["other-0"]
    center._thread.start()
    try:
        wait_for(lambda: len(seen) == 3, 10, message="queued events handled")
        assert seen == ["other-0", "first-0", "first-1"]
        center._deliver(first, "probe", ("first-2",))  # caught up: handled by this thread
        assert seen[-1] == "first-2"
    finally:
        center.stop()
    center._thread.join(5)
    assert not center._thread.is_alive()


@pytest.mark.timeout(30)
def test_a_client_the_scheduler_fails_to_register_is_hung_up_on_not_left_waiting():
    """A scheduler error while registering a client ends that client's wait with an error."""
    from minidist.center import Center

    center = Center()
    address = center.start("127.0.0.1", 0)
    real = center._event_handlers["add_client"]

    def broken(now, sender, client_id):
        raise RuntimeError("scheduler bug while registering a client")

    center._event_handlers["add_client"] = broken
    try:
        start = time.monotonic()
        with pytest.raises(ConnectionError):
            Executor(address, timeout=10)
        assert time.monotonic() - start < 10  # hung up on at once, not left to time out
        center._event_handlers["add_client"] = real
        with Executor(address, timeout=10) as e:  # the center still serves
            assert e.nthreads() == {}
    finally:
        center.stop()
