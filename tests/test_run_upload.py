"""``Client.run`` (a function in every worker process now) and ``Client.upload_file``."""

from __future__ import annotations

import os
import signal
import zipfile

import pytest

from minidist import Client, Executor, LocalCluster
from conftest import wait_for


def pid():
    return os.getpid()


def add(a, b=0):
    return a + b


def fails():
    raise KeyError("not here")


def use(module, attr="f"):
    import importlib
    return getattr(importlib.import_module(module), attr)()


def test_run_calls_every_worker_now(cluster, c):
    got = c.run(pid)
    assert got == {w.address: w.pid for w in cluster.workers}
    assert c.run(add, 1, b=2) == {w.address: 3 for w in cluster.workers}
    one = cluster.workers[0].address
    assert c.run(pid, workers=[one]) == {one: cluster.workers[0].pid}
    with pytest.raises(ValueError, match="no workers to run on"):
        c.run(pid, workers=["nowhere:1"])


def test_run_raises_naming_the_worker_and_the_cluster_keeps_serving(cluster, c):
    with pytest.raises(KeyError, match="not here") as info:
        c.run(fails)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert any(w.address in notes for w in cluster.workers)
    assert c.submit(add, 2, 3).result(timeout=20) == 5


def test_run_is_on_the_executor_too(cluster):
    with Executor(cluster) as e:
        assert set(e.run(pid).values()) == {w.pid for w in cluster.workers}


def test_upload_py_then_a_new_version(tmp_path, cluster, c):
    mod = tmp_path / "uploaded_mod_a.py"
    mod.write_text("def f():\n    return 1\n")
    c.upload_file(str(mod))
    assert c.submit(use, "uploaded_mod_a", pure=False).result(timeout=20) == 1
    assert set(c.run(use, "uploaded_mod_a").values()) == {1}
    mod.write_text("def f():\n    return 2\n")
    c.upload_file(mod)
    assert set(c.run(use, "uploaded_mod_a").values()) == {2}


def test_upload_zip_package(tmp_path, c):
    archive = tmp_path / "uploaded_pkg.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("uploaded_zpkg/__init__.py", "def f():\n    return 'from the zip'\n")
    c.upload_file(archive)
    assert c.submit(use, "uploaded_zpkg", pure=False).result(timeout=20) == "from the zip"


def test_upload_errors(tmp_path, cluster, c):
    bad = tmp_path / "uploaded_broken.py"
    bad.write_text("raise RuntimeError('broken on import')\n")
    with pytest.raises(RuntimeError, match="broken on import") as info:
        c.upload_file(bad)
    assert any(w.address in n for n in info.value.__notes__ for w in cluster.workers)
    for name in ("notes.txt", ".hidden.py"):
        (tmp_path / name).write_text("x = 1\n")
        with pytest.raises(ValueError, match="cannot upload"):
            c.upload_file(tmp_path / name)
    assert c.submit(add, 1, 1).result(timeout=20) == 2


def test_a_restarted_worker_gets_the_uploads(tmp_path):
    mod = tmp_path / "uploaded_mod_b.py"
    mod.write_text("def f():\n    return 'b'\n")
    with LocalCluster(n_workers=1) as cluster, Client(cluster, set_as_default=False) as c:
        c.upload_file(mod)
        old = cluster.workers[0].pid
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: cluster.workers[0].pid != old and c.nthreads(), timeout=30,
                 message="the worker restarted and registered")
        assert list(c.run(use, "uploaded_mod_b").values()) == ["b"]
        assert c.submit(use, "uploaded_mod_b", pure=False).result(timeout=20) == "b"
