"""progress() in a pseudo-terminal and on pipes, get_task_stream(), performance_report()."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from minidist import performance_report, progress

from browser import dump_dom


def slow_inc(x, delay=0.05):
    time.sleep(delay)
    return x + 1


def boom(x):
    raise ValueError(f"boom {x}")


def read_all(fd: int, into: list) -> None:
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the terminal's other side is closed
            return
        if not chunk:
            return
        into.append(chunk)


LINE = re.compile(r" *(\d+)%\|([# ]+)\| (\d+)/(\d+) \[(\d\d:\d\d)<(\d\d:\d\d|\?), "
                  r"([\d.]+(it/s|s/it)|\?it/s)(, errors=(\d+))?\]")


@pytest.mark.timeout(60)
def test_progress_redraws_in_place_on_a_terminal(c):
    master, slave = pty.openpty()
    out: list[bytes] = []
    reader = threading.Thread(target=read_all, args=(master, out))
    reader.start()
    try:
        with os.fdopen(slave, "w", closefd=False) as terminal:
            futures = c.map(slow_inc, range(12)) + [c.submit(boom, 1)]
            bar = progress(futures, file=terminal, interval=0.05)
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    text = b"".join(out).decode().replace("\r\n", "\n")  # the terminal's own line ends
    assert bar.done == 13 and bar.errors == 1 and bar.total == 13
    frames = text.split("\r")
    assert len(frames) >= 3, text  # drawn more than once, in place
    assert "\n" not in "".join(frames[:-1]).rstrip("\n"), text  # no new line until the end
    last = LINE.search(frames[-1])
    assert last and last.group(1) == "100" and last.group(3) == last.group(4) == "13", text
    assert last.group(10) == "1", text
    assert text.endswith("\n")


@pytest.mark.timeout(60)
def test_progress_on_a_pipe_prints_a_few_plain_lines(c):
    read_fd, write_fd = os.pipe()
    out: list[bytes] = []
    reader = threading.Thread(target=read_all, args=(read_fd, out))
    reader.start()
    try:
        with os.fdopen(write_fd, "w") as pipe:
            bar = progress(c.map(slow_inc, range(40), delay=0.02), file=pipe)
    finally:
        reader.join(10)
        os.close(read_fd)
    lines = b"".join(out).decode().splitlines()
    assert "\r" not in "".join(lines)
    assert 2 <= len(lines) <= 6, lines
    assert all(LINE.fullmatch(line) for line in lines), lines
    assert lines[-1].startswith("100%|#########################| 40/40 [")
    assert bar.errors == 0


@pytest.mark.timeout(60)
def test_progress_writes_to_stderr_and_complete_false_erases_the_bar(cluster, tmp_path):
    script = textwrap.dedent(f"""
        import time
        from minidist import Client, progress
        def f(x):
            time.sleep(0.01)
            return x
        with Client({cluster.address!r}, set_as_default=False) as c:
            progress(c.map(f, range(20)))
            print("done", flush=True)
    """)
    env = {**os.environ, "MINIDIST_AUTH_KEY": cluster.auth_key.decode()}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done\n"
    assert "100%|#########################| 20/20" in proc.stderr.splitlines()[-1]

    master, slave = pty.openpty()
    out: list[bytes] = []
    reader = threading.Thread(target=read_all, args=(master, out))
    reader.start()
    try:
        from minidist import Client
        with Client(cluster, set_as_default=False) as c, \
                os.fdopen(slave, "w", closefd=False) as terminal:
            progress(c.map(slow_inc, range(4)), file=terminal, complete=False)
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    text = b"".join(out).decode().replace("\r\n", "\n")
    assert "\n" not in text
    assert text.endswith("\r") and text.split("\r")[-2].strip() == "", repr(text)


@pytest.mark.timeout(60)
def test_progress_without_waiting_returns_at_once(c):
    futures = c.map(slow_inc, range(6), delay=0.3)
    t0 = time.monotonic()
    bar = progress(futures, wait=False, file=open(os.devnull, "w"))
    assert time.monotonic() - t0 < 0.25
    assert bar.done < bar.total == 6
    assert bar.join(30)
    assert bar.done == 6 and bar.errors == 0
    assert all(f.done() for f in futures)


@pytest.mark.timeout(60)
def test_progress_of_a_persisted_dask_collection(c):
    da = pytest.importorskip("dask.array")
    x = da.ones((40, 40), chunks=10).persist()
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "w") as pipe:
        bar = progress(x, {"more": [c.submit(slow_inc, 1)]}, file=pipe)
    with os.fdopen(read_fd) as f:
        assert f.read().splitlines()[-1].startswith("100%|")
    assert bar.total == 17 and bar.done == 17
    assert float(x.sum().compute()) == 1600.0


@pytest.mark.timeout(60)
def test_get_task_stream_collects_every_run_in_the_block(c):
    c.submit(slow_inc, -1).result()  # a run before the block is not collected
    with c.get_task_stream() as ts:
        futures = c.map(slow_inc, range(10))
        bad = c.submit(boom, 7)
        c.gather(futures)
        with pytest.raises(ValueError):
            bad.result()
    records = {r["key"]: r for r in ts.data}
    assert set(records) == {f.key for f in futures} | {bad.key}
    assert records[bad.key]["status"] == "error"
    threads = c.nthreads()
    for key, r in records.items():
        assert r["worker"] in threads and 0 <= r["thread"] < threads[r["worker"]]
        assert r["start"] <= r["stop"]
        if key != bad.key:
            assert r["status"] == "OK" and r["stop"] - r["start"] >= 0.04
    assert ts.dropped == 0


@pytest.mark.timeout(90)
def test_performance_report_opens_offline_in_a_browser(c, tmp_path):
    path = tmp_path / "report.html"
    with performance_report(path, client=c):
        futures = c.map(slow_inc, range(20), delay=0.01)
        c.gather(futures)
        with pytest.raises(ValueError):
            c.submit(boom, 3).result()
    text = path.read_text()
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', text)
    dom = dump_dom(path.as_uri(), budget_ms=2000)
    assert re.search(r'<span id="stream-summary" class="muted">21 task runs on 2 threads', dom)
    assert "<td>task runs</td><td>21</td>" in dom and "<td>erred</td><td>1</td>" in dom
    assert re.search(r"<td>slow_inc</td><td>20</td><td>0</td>", dom)
    assert re.search(r"<td>boom</td><td>1</td><td>1</td>", dom)
    assert "boom-" in dom  # the erred task is listed


def test_performance_report_needs_a_client_when_none_or_several_are_open():
    with pytest.raises(ValueError, match="client="):
        with performance_report("never-written.html"):
            pass
    assert not os.path.exists("never-written.html")
