"""Warnings raised in a task are warned again in the caller that takes its result, once."""

from __future__ import annotations

import warnings

import dask
import dask.array as da
import numpy as np
import pytest

from minidist import Client


class CustomWarning(UserWarning):
    pass


def warns(x, category=RuntimeWarning):
    warnings.warn(f"careful with {x}", category)
    return x


def warns_then_fails(x):
    warnings.warn("about to fail", DeprecationWarning)
    raise ValueError(x)


def many_warnings(n):
    for i in range(n):
        warnings.warn("the same one")  # one place: the caller sees it once
    return n


@pytest.fixture
def client(cluster):
    c = Client(cluster, set_as_default=False)
    try:
        yield c
    finally:
        c.close()


def test_result_warns_once_with_category_text_and_place(client):
    future = client.submit(warns, 1, pure=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert future.result(timeout=20) == 1
        assert future.result(timeout=20) == 1
        assert client.gather(future) == 1
    assert [(w.category, str(w.message)) for w in seen] == [(RuntimeWarning, "careful with 1")]
    assert seen[0].filename.endswith("test_task_warnings.py")
    assert seen[0].lineno == warns.__code__.co_firstlineno + 1


def test_every_run_warns_even_from_the_same_line(client):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i in range(4):
            client.submit(warns, i, pure=False).result(timeout=20)
    assert sorted(str(w.message) for w in seen) == [f"careful with {i}" for i in range(4)]


def test_the_callers_filters_apply(client):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="careful with 5"):
            client.submit(warns, 5, pure=False).result(timeout=20)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("ignore")
        assert client.submit(warns, 6, pure=False).result(timeout=20) == 6
    assert seen == []


def test_a_user_category_and_a_failing_task(client):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        client.submit(warns, 7, CustomWarning, pure=False).result(timeout=20)
        with pytest.raises(ValueError):
            client.submit(warns_then_fails, 8, pure=False).result(timeout=20)
        assert client.submit(many_warnings, 1000, pure=False).result(timeout=20) == 1000
    assert [w.category.__name__ for w in seen] == ["CustomWarning", "DeprecationWarning",
                                                   "UserWarning"]


def test_dask_graph_warnings_of_inner_tasks(client):
    a = da.from_array(np.array([0.0, 1.0, 2.0, 3.0]), chunks=1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = (np.log(a) + 1).sum().compute(scheduler=client.get)
    assert out == -np.inf
    assert [str(w.message) for w in seen] == ["divide by zero encountered in log"]
    assert seen[0].category is RuntimeWarning
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert dask.compute(dask.delayed(warns)(9), scheduler=client.get) == (9,)
    assert [str(w.message) for w in seen] == ["careful with 9"]
