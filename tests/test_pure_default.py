"""``Executor(pure=False)`` and ``Client(pure=False)``: every call runs, as in ProcessPoolExecutor."""

from __future__ import annotations

import random

from minidist import Client, Executor


def draw(*_):
    # Not random.random itself: pickling that bound method copies this process's generator,
    # state included, so every call would draw the same number (with ProcessPoolExecutor too).
    return random.random()


def test_executor_pure_false_runs_every_call(cluster):
    with Executor(cluster, pure=False) as e:
        a, b = e.submit(draw), e.submit(draw)
        assert a.key != b.key and a.result(timeout=20) != b.result(timeout=20)
        assert len(set(e.map(draw, [0] * 20))) == 20
        # an explicit pure=True still shares the key
        assert e.submit(pow, 2, 3, pure=True).key == e.submit(pow, 2, 3, pure=True).key


def test_client_pure_false_and_the_default_stays_pure(cluster):
    client = Client(cluster, pure=False, set_as_default=False)
    try:
        fs = client.map(draw, [1, 1, 1])
        assert len({f.key for f in fs}) == 3
    finally:
        client.close()
    with Executor(cluster) as e:
        assert e.pure is True
        assert e.submit(pow, 2, 3).key == e.submit(pow, 2, 3).key
        assert e.submit(pow, 2, 3).key.startswith("pow-")
