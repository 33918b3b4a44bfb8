"""The scheduler driven directly through its events, for exact scenarios.

The simulator finds bugs by chance; a bug it found is kept here as the
sequence of events that shows it, which stays meaningful when the
simulator's random paths change.
"""

from __future__ import annotations

import pytest

from minidist.scheduler import MEMORY, PROCESSING, Scheduler


class Stream:
    """A stream token with a name, for readable failures."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def ops(out: dict, stream: Stream, key: str) -> list:
    """The ops sent on ``stream`` that name ``key``."""
    return [m["op"] for m in out.get(stream, []) if m and
            (m.get("key") == key or key in m.get("keys", ()))]


@pytest.mark.timeout(10)
def test_fetched_copy_of_a_key_recomputed_on_that_worker_is_kept():
    """A worker fetched X, X's only holder died, X was sent to that worker to recompute
    (answered from the copy), and then the fetch's add_keys arrived: deleting the copy
    then made the worker's next task read a missing input."""
    sched = Scheduler(address="center:1", id="center")
    w0, w1, client = Stream("w0"), Stream("w1"), Stream("client")
    sched.worker_added(0.0, w0, "w0:1", 1)
    sched.worker_added(0.0, w1, "w1:1", 1)
    sched.client_added(0.0, client, "c")
    out = sched.client_msgs(0.1, client, "c", [{"op": "update_graph", "tasks": [
        ("x", "spec-x", (), {"workers": ["w0:1"]})], "wants": ["x"]}])
    assert ops(out, w0, "x") == ["compute"]
    sched.worker_msgs(0.2, w0, "w0:1", [{"op": "task_finished", "key": "x", "nbytes": 8,
                                         "duration": 0.01}])
    out = sched.client_msgs(0.3, client, "c", [{"op": "update_graph", "tasks": [
        ("y", "spec-y", ("x",), {"workers": ["w1:1"]})], "wants": ["y"]}])
    assert ops(out, w1, "y") == ["compute"]  # w1 fetches x from w0 ...
    sched.tasks["x"].restrictions = None  # ... and x may be recomputed anywhere
    out = sched.worker_removed(0.4, "w0:1", "its connection closed", w0)
    assert ops(out, w1, "x") == ["compute"] and sched.tasks["x"].state == PROCESSING
    # The fetch's report arrives now, after the recompute was sent.
    out = sched.worker_msgs(0.5, w1, "w1:1", [{"op": "add_keys", "keys": {"x": 8}}])
    assert "delete_data" not in ops(out, w1, "x")
    x = sched.tasks["x"]
    assert x.state == MEMORY and [ws.address for ws in x.who_has] == ["w1:1"]
    # The worker answers the recompute from its copy; nothing is lost or run twice.
    out = sched.worker_msgs(0.6, w1, "w1:1", [{"op": "task_finished", "key": "x",
                                               "nbytes": 8, "duration": 0.0}])
    assert "delete_data" not in ops(out, w1, "x") and x.state == MEMORY


@pytest.mark.timeout(10)
def test_releasing_many_keys_deletes_them_from_each_holder_in_one_message():
    """A release of many keys sends each holder one delete_data naming them all, and a
    message shared by two holders is not changed for the other one."""
    sched = Scheduler(address="center:1", id="center")
    w0, w1, client = Stream("w0"), Stream("w1"), Stream("client")
    sched.worker_added(0.0, w0, "w0:1", 1)
    sched.worker_added(0.0, w1, "w1:1", 1)
    sched.client_added(0.0, client, "c")
    keys = [f"k{i}" for i in range(5)]
    sched.client_msgs(0.1, client, "c", [{"op": "update_graph", "tasks": [
        (k, f"spec-{k}", (), {"workers": ["w0:1"]}) for k in keys], "wants": keys}])
    sched.worker_msgs(0.2, w0, "w0:1", [{"op": "task_finished", "key": k, "nbytes": 8,
                                         "duration": 0.01} for k in keys])
    sched.worker_msgs(0.3, w1, "w1:1", [{"op": "add_keys", "keys": {"k0": 8, "k1": 8}}])
    out = sched.client_msgs(0.4, client, "c", [{"op": "release", "keys": keys}])
    assert out[w0] == [{"op": "delete_data", "keys": keys}]
    assert out[w1] == [{"op": "delete_data", "keys": ["k0", "k1"]}]
    assert not sched.tasks
