"""joblib's ``"minidist"`` backend (and scikit-learn through it) on real cluster processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import joblib
import numpy as np
import pytest
from joblib import Parallel, delayed



def square(x):
    return x * x


def total(arr, i):
    return float(arr.sum()) + i


def fails(x):
    if x == 3:
        raise KeyError(f"no {x}")
    return x


def nested(n):
    # A Parallel inside a task runs inside that worker (joblib's threads), never deadlocks.
    return sum(Parallel(n_jobs=2)(delayed(square)(i) for i in range(n)))


def worker_pid(_):
    return os.getpid()


def test_parallel_runs_on_the_newest_session(session, cluster):
    with joblib.parallel_config(backend="minidist"):
        assert Parallel(n_jobs=-1)(delayed(square)(i) for i in range(50)) == \
            [i * i for i in range(50)]
        pids = set(Parallel(n_jobs=-1, batch_size=1)(delayed(worker_pid)(i) for i in range(20)))
    assert os.getpid() not in pids
    assert pids <= {w.pid for w in cluster.workers}


def test_n_jobs_minus_one_is_every_thread_of_the_cluster(session):
    from minidist.joblib_backend import MinidistBackend
    backend = MinidistBackend()
    threads = sum(session.nthreads().values())
    assert backend.effective_n_jobs(-1) == threads
    assert backend.effective_n_jobs(-2) == max(threads - 1, 1)
    assert backend.effective_n_jobs(3) == 3


def test_an_error_in_a_call_is_raised_with_its_type(session):
    with joblib.parallel_config(backend="minidist"):
        with pytest.raises(KeyError, match="no 3"):
            Parallel(n_jobs=-1)(delayed(fails)(i) for i in range(8))
        # the session keeps serving
        assert Parallel(n_jobs=-1)(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]


def test_large_arguments_are_scattered_once(session):
    arr = np.arange(1 << 18, dtype="float64")  # 2 MiB
    calls = []
    scatter = session.scatter

    def counting_scatter(data, *args, **kwargs):
        calls.append(len(data))
        return scatter(data, *args, **kwargs)

    session.scatter = counting_scatter
    try:
        with joblib.parallel_config(backend="minidist"):
            got = Parallel(n_jobs=-1, batch_size=1)(delayed(total)(arr, i) for i in range(12))
    finally:
        del session.scatter
    assert got == [float(arr.sum()) + i for i in range(12)]
    assert calls == [1]


def test_the_scatter_keyword_sends_named_objects_before_the_first_batch(session):
    small = np.arange(10)
    with joblib.parallel_config(backend="minidist", scatter=[small]):
        assert Parallel(n_jobs=-1)(delayed(total)(small, i) for i in range(3)) == [45.0, 46.0, 47.0]


def test_nested_parallel_inside_a_task(session):
    with joblib.parallel_config(backend="minidist"):
        assert Parallel(n_jobs=-1)(delayed(nested)(n) for n in (3, 4, 5)) == [5, 14, 30]


def test_without_a_session_the_error_says_what_to_do(cluster):
    from minidist.executor import _opened
    for ref in _opened:
        s = ref()
        assert s is None or s._shutdown, "a session of an earlier test is still open"
    with joblib.parallel_config(backend="minidist"):
        with pytest.raises(ValueError, match="no open minidist Client or Executor"):
            Parallel(n_jobs=-1)(delayed(square)(i) for i in range(3))


def test_gridsearchcv_gives_the_results_of_one_job(session):
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC
    assert sklearn
    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1.0, 10.0], "gamma": [0.01, 0.1, 1.0]}
    alone = GridSearchCV(SVC(), grid, cv=3, n_jobs=1).fit(X, y)
    with joblib.parallel_config(backend="minidist"):
        spread = GridSearchCV(SVC(), grid, cv=3, n_jobs=-1).fit(X, y)
    assert spread.best_params_ == alone.best_params_
    np.testing.assert_array_equal(spread.cv_results_["mean_test_score"],
                                  alone.cv_results_["mean_test_score"])


def test_a_script_whose_functions_live_in_main(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import joblib
        from joblib import Parallel, delayed
        from minidist import Executor

        def cube(x):
            return x ** 3

        if __name__ == "__main__":
            with Executor(2):
                with joblib.parallel_config(backend="minidist"):
                    print(Parallel(n_jobs=-1)(delayed(cube)(i) for i in range(5)))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0, 1, 8, 27, 64]"


def test_the_backend_is_named_when_joblib_is_imported_after_minidist():
    code = ("import sys, minidist, joblib.parallel as p; "
            "from minidist import import_hooks as h; "
            "print('minidist' in p.BACKENDS, h._finder in sys.meta_path)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    # and once nothing waits for an import any more, the finder is gone
    assert out.stdout.split() == ["True", "False"], out.stderr
