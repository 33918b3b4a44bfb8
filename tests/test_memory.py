"""Memory limits with real worker processes: spilling, pausing, restarting, giving memory back.

Each test starts its own LocalCluster with a small limit (200-500 MB per
worker), so that the thresholds (spill 60%/70%, pause 80%, restart 95%)
are crossed by a few hundred MB of numpy arrays.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

import gates
import minidist
from conftest import wait_for
from minidist import Executor, KilledWorker, LocalCluster
from minidist.memory import SpillBuffer, parse_memory_limit, process_rss, sizeof

MB = 10**6
CHUNK = 10 << 20  # bytes of one array


def make(i: int) -> np.ndarray:
    """A 10 MiB array filled with ``i``."""
    return np.full(CHUNK // 8, float(i))


def check(x: np.ndarray) -> tuple[float, float]:
    return float(x[0]), float(x.sum())


def first_values(*arrays: np.ndarray) -> list[float]:
    return [float(a[0]) for a in arrays]


def hog(nbytes: int) -> int:
    """Allocate ``nbytes`` in 10 MiB pieces, holding them all (a runaway task)."""
    pieces = []
    for _ in range(nbytes // CHUNK):
        pieces.append(np.ones(CHUNK, dtype=np.uint8))
        time.sleep(0.02)
    return len(pieces)


def hold(nbytes: int, path: str) -> int:
    """Hold ``nbytes`` of temporaries (unmanaged memory) until ``path`` exists."""
    block = np.ones(nbytes, dtype=np.uint8)
    gates.wait_for_file(None, path)
    return int(block[-1])


def swing(low: int, high: int, seconds: float, swung: str, gate: str) -> int:
    """Swing unmanaged memory between ``low`` and ``high`` bytes for ``seconds``, then hold
    ``low`` until ``gate`` exists (``swung`` marks the end of the swinging)."""
    block = np.ones(low, dtype=np.uint8)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        extra = np.ones(high - low, dtype=np.uint8)
        time.sleep(0.07)
        del extra
        time.sleep(0.05)
    open(swung, "w").close()
    gates.wait_for_file(None, gate)
    return int(block[-1])


def big(i: int) -> list[bytes]:
    """50 MB in 50,000 small objects: what glibc keeps in its arenas once freed."""
    return [b"%d-%d" % (i, j) + bytes(1000) for j in range(50_000)]


def inc(x: int) -> int:
    return x + 1


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


# ---------------------------------------------------------------------- pieces


def test_parse_memory_limit():
    total = 8 * 2**30
    assert parse_memory_limit("4GB", total=total) == 4 * 10**9
    assert parse_memory_limit("512MiB", total=total) == 512 * 2**20
    assert parse_memory_limit("1e9", total=total) == 10**9
    assert parse_memory_limit(200_000_000, total=total) == 200_000_000
    assert parse_memory_limit(0.25, total=total) == 2 * 2**30
    assert parse_memory_limit("0.5", total=total) == 4 * 2**30
    assert parse_memory_limit("auto", nworkers=4, total=total) == 2 * 2**30
    for off in (None, 0, "0", "none", "None"):
        assert parse_memory_limit(off, total=total) is None
    for bad in ("lots", "4 parsecs", -1, "-5GB", True):
        with pytest.raises(ValueError):
            parse_memory_limit(bad, total=total)
    assert 0 < parse_memory_limit("auto") <= os.sysconf("SC_PAGE_SIZE") * \
        os.sysconf("SC_PHYS_PAGES")


def test_sizeof_and_its_extension():
    pd = pytest.importorskip("pandas")
    assert sizeof(np.zeros(1000)) == 8000
    assert sizeof(b"x" * 5000) == 5000
    assert sizeof(bytearray(300)) == 300
    assert sizeof(memoryview(b"y" * 400)) == 400
    assert sizeof([np.zeros(1000)] * 50) >= 50 * 8000
    assert sizeof({i: b"z" * 1000 for i in range(100)}) >= 100 * 1000
    strings = pd.Series(["a long string of text %d" % i for i in range(1000)], dtype=object)
    frame = pd.DataFrame({"s": strings})
    assert sizeof(frame) > frame.memory_usage(deep=False).sum()  # deep: counts the strings
    assert sizeof(strings) == strings.memory_usage(deep=True)

    class Blob:
        pass
    minidist.sizeof.register(Blob)(lambda blob: 12345)
    assert sizeof(Blob()) == 12345 and minidist.sizeof(Blob()) == 12345


def test_spill_buffer_round_trip(tmp_path):
    from minidist.memory import LocalDirectory
    directory = LocalDirectory(str(tmp_path))

    def files() -> list[str]:
        return sorted(n for n in os.listdir(directory.path) if n.endswith(".spill"))

    buf = SpillBuffer(directory, target=25 * MB)
    arrays = {i: np.full(1 << 20, i, dtype=np.float64) for i in range(4)}  # 8 MiB each
    for key, value in arrays.items():
        buf.put(key, value, value.nbytes)
    assert buf.managed == 4 * 8 * 2**20
    assert buf.spill_one() == 8 * 2**20  # the least recently used: key 0
    assert 0 not in buf.fast and 0 in buf.slow and 0 in buf and len(buf) == 4
    assert len(files()) == 1
    in_memory, frames = buf.serialized(0)  # what get_data sends: the file's frames
    assert not in_memory and minidist.wire.deserialize(frames)[5] == 0
    back = buf[0]  # read back into memory; the file stays for the next eviction
    assert back.flags.writeable and (back == 0).all()
    assert 0 in buf.fast and buf.spilled == 0 and len(files()) == 1
    assert buf.spill_one() == 8 * 2**20 and buf.spill_count == 1  # key 0 again: no write
    assert buf.spill_one() == 8 * 2**20 and buf.spill_count == 2  # key 1: written
    assert sorted(buf.slow) == [0, 1] and len(files()) == 2
    buf.put(0, np.zeros(4), 32)  # a new value replaces the file
    del buf[1]  # spilled or not, a delete removes it
    buf.discard(2)
    assert sorted(buf, key=str) == [0, 3] and files() == []
    directory.remove()
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- with processes


@pytest.mark.timeout(90)
def test_job_twice_the_memory_spills_and_completes():
    """800 MB of live results on 2 workers of 200 MB: all correct, peak RSS bounded."""
    limit = 200 * MB
    with LocalCluster(2, memory_limit=limit) as cluster, Executor(cluster) as e:
        pids = [w.pid for w in cluster.workers]
        addresses = [w.address for w in cluster.workers]
        futures = [e.submit(make, i) for i in range(80)]  # 80 x 10 MiB, all kept alive
        checks = e.gather([e.submit(check, f) for f in futures])
        assert checks == [(float(i), float(i) * (CHUNK // 8)) for i in range(80)]
        memory = wait_for(lambda: (m := e.memory()) and
                          sum(w["managed"] + w["spilled"] for w in m.values()) >= 80 * CHUNK
                          and m, message="every result reported, in memory or spilled")
        assert set(memory) == set(addresses)
        for figures in memory.values():
            assert figures["limit"] == limit and figures["spill_error"] is None
            assert figures["managed"] <= limit and figures["unmanaged"] > 0
        assert all(w["spilled"] > 0 for w in memory.values())
        info = e._center("workers")  # the names the dashboard reads
        for w in info.values():
            assert {"memory_managed", "memory_spilled", "memory_unmanaged", "paused"} <= set(w)
        # Spilled keys come back to a client, and to a peer that needs them.
        who_has = e.who_has(futures)
        early = futures[:6]  # the least recently used: on disk by now
        assert first_values(*e.gather(early)) == [float(i) for i in range(6)]
        for target in addresses:
            theirs = [f for f in early if who_has[f.key] != [target]][:3]
            result = e.submit(first_values, *theirs, workers=[target]).result(30)
            assert result == [float(f.result()[0]) for f in theirs]
        peaks = [peak_rss(pid) for pid in pids]
        assert all(peak <= 1.3 * limit for peak in peaks), [p / MB for p in peaks]
        assert [w.restarts for w in cluster.workers] == [0, 0]
        assert [w.pid for w in cluster.workers] == pids
        del futures, early, theirs
        wait_for(lambda: all(w["managed"] == w["spilled"] == 0 for w in e.memory().values()),
                 message="released keys leave memory and disk")


@pytest.mark.timeout(90)
def test_gathering_more_spilled_data_than_the_limit_at_once():
    """A client gathers everything a worker holds, most of it on disk and more than its
    limit in all: the worker reads it back a few keys per reply and is not restarted."""
    limit = 200 * MB
    with LocalCluster(1, memory_limit=limit) as cluster, Executor(cluster) as e:
        pid = cluster.workers[0].pid
        futures = [e.submit(make, i) for i in range(30)]  # 315 MB, about 200 MB spilled
        concurrent.futures.wait(futures, timeout=30)
        wait_for(lambda: sum(w["spilled"] for w in e.memory().values()) >= 15 * CHUNK,
                 message="results spilled")
        assert first_values(*e.gather(futures)) == [float(i) for i in range(30)]
        assert peak_rss(pid) <= 0.95 * limit
        assert cluster.workers[0].restarts == 0 and cluster.workers[0].pid == pid


@pytest.mark.timeout(90)
def test_runaway_task_restarts_its_worker_and_errs_with_killed_worker():
    limit = 200 * MB
    with LocalCluster(2, memory_limit=limit, allowed_failures=2) as cluster, \
            Executor(cluster) as e:
        assert e.submit(inc, 1).result() == 2
        future = e.submit(hog, 3 * limit)
        with pytest.raises(KilledWorker):
            future.result(60)
        wait_for(lambda: sum(w.restarts for w in cluster.workers) == 2,
                 message="two restarts")
        assert e.submit(inc, 2).result(30) == 3  # the cluster keeps serving
        wait_for(lambda: len(e.nthreads()) == 2, message="both workers back")


@pytest.mark.timeout(90)
def test_memory_comes_back_after_many_computations():
    """100 results of 50 MB each, ten at a time: RSS ends within 100 MB of where it started."""
    with LocalCluster(1, 2, memory_limit="2GB") as cluster, Executor(cluster) as e:
        pid = cluster.workers[0].pid
        assert e.submit(len, [1]).result() == 1
        start = process_rss(pid)
        peak = 0
        for batch in range(10):
            futures = [e.submit(big, i) for i in range(batch * 10, batch * 10 + 10)]
            assert e.gather([e.submit(len, f) for f in futures]) == [50_000] * 10
            peak = max(peak, process_rss(pid))
            del futures
        assert peak > start + 400 * MB  # ten results were alive at once
        wait_for(lambda: process_rss(pid) < start + 100 * MB, timeout=10,
                 message=f"RSS back near {start / MB:.0f} MB (now {process_rss(pid) / MB:.0f})")
        assert cluster.workers[0].pid == pid


@pytest.mark.timeout(60)
def test_paused_worker_gets_no_new_tasks_and_still_serves_data(tmp_path):
    limit = 200 * MB
    gate = str(tmp_path / "go")
    with LocalCluster(1, memory_limit=limit) as cluster, Executor(cluster) as e:
        kept = e.scatter([b"x" * 1000])[0]
        held = e.submit(hold, int(0.85 * limit) - process_rss(cluster.workers[0].pid), gate)
        wait_for(lambda: any(w["paused"] for w in e.memory().values()), timeout=20,
                 message="the worker pauses")
        probe = e.submit(inc, 41)
        wait_for(lambda: e._center("info")["tasks"].get("queued"), message="probe queued")
        (worker,) = e._center("workers").values()
        assert worker["processing"] == 1 and not probe.done()  # only the task holding memory
        assert e.gather(kept) == b"x" * 1000  # a paused worker still serves its data
        open(gate, "w").close()
        assert held.result(30) == 1
        assert probe.result(30) == 42  # it resumed
        assert not any(w["paused"] for w in e.memory().values())
        assert cluster.workers[0].restarts == 0


@pytest.mark.timeout(60)
def test_pause_does_not_flap_and_a_stuck_worker_resumes(tmp_path, capfd):
    """RSS swinging across the pause line pauses the worker about once a second, not at
    every look; held between the lines with nothing to spill, it resumes; then it runs on."""
    limit = 300 * MB
    swung, gate = str(tmp_path / "swung"), str(tmp_path / "go")
    with LocalCluster(1, 2, memory_limit=limit) as cluster, Executor(cluster) as e:
        pid = cluster.workers[0].pid
        assert e.submit(first_values, np.zeros(4)).result() == [0.0]  # numpy loaded there
        base = process_rss(pid)
        held = e.submit(swing, int(0.77 * limit) - base, int(0.84 * limit) - base, 3.0,
                        swung, gate)
        try:
            wait_for(lambda: os.path.exists(swung) or held.done(), timeout=30,
                     message="the task swings its memory")
            assert not held.done(), held.exception()
            log = capfd.readouterr().err
            pauses = log.count("minidist.memory WARNING paused:")
            assert 1 <= pauses <= 5, log  # at every look (every 0.1 s) it would be about 25
            # Now held between the lines, with nothing to spill: it must not stay paused.
            wait_for(lambda: not any(w["paused"] for w in e.memory().values()), timeout=10,
                     message=f"the stuck worker resumes (RSS {process_rss(pid) / limit:.0%} "
                             "of its limit)")
            assert e.submit(inc, 41).result(10) == 42  # it runs tasks
        finally:
            open(gate, "w").close()
        assert held.result(30) == 1
        wait_for(lambda: process_rss(pid) < 0.5 * limit, message="memory falls well below")
        assert not any(w["paused"] for w in e.memory().values())
        assert cluster.workers[0].restarts == 0
    log += capfd.readouterr().err
    assert "nothing is left to spill" in log


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["vanished", "a symlink", "a file"])
def test_spill_directory_removed_under_the_worker_is_never_trusted_again(tmp_path, damage,
                                                                          capfd):
    """The worker's directory removed under it, and the path left empty, or made a link to
    someone else's directory, or a file: the worker spills into a fresh private directory
    of its own at its next spill, never through the path, and loses nothing it holds."""
    limit = 500 * MB  # spill above 300 MB managed; pause above 400 MB of RSS
    parent = tmp_path / "spill"
    victim = tmp_path / "victim"
    victim.mkdir()
    for i in range(100):  # where a worker writing through a link would overwrite
        (victim / f"{i}.spill").write_bytes(b"precious")
    with LocalCluster(1, memory_limit=limit, local_directory=str(parent)) as cluster, \
            Executor(cluster) as e:
        (directory,) = parent.iterdir()  # each worker makes a fresh directory in it
        assert directory.name.startswith("minidist-worker-")
        shutil.rmtree(directory)
        if damage == "a symlink":
            directory.symlink_to(victim)
        elif damage == "a file":
            directory.write_bytes(b"")
        futures = [e.submit(make, i) for i in range(32)]  # 320 MiB: over the target
        concurrent.futures.wait(futures, timeout=30)
        (figures,) = wait_for(lambda: [w for w in e.memory().values() if w["spilled"]],
                              message="spilling goes on").__iter__()
        assert figures["spill_error"] is None
        (fresh,) = [p for p in parent.iterdir() if p != directory]
        assert fresh.name.startswith("minidist-worker-") and not fresh.is_symlink()
        st = fresh.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        assert len(list(fresh.glob("*.spill"))) > 0
        checks = e.gather([e.submit(check, f) for f in futures])
        assert [c[0] for c in checks] == [float(i) for i in range(32)]  # nothing lost
        assert first_values(*e.gather(futures[:3])) == [0.0, 1.0, 2.0]
        assert cluster.workers[0].restarts == 0
    log = capfd.readouterr().err
    assert log.count(f"spill directory {directory} vanished") == 1, log
    assert sorted(p.name for p in victim.iterdir()) == sorted(f"{i}.spill" for i in range(100))
    assert all(p.read_bytes() == b"precious" for p in victim.iterdir())
    assert [p.name for p in parent.iterdir()] == ([directory.name] if damage != "vanished"
                                                  else [])  # the fresh one removed at stop


def spill_files(parent) -> list:
    return sorted(parent.glob("minidist-worker-*/*.spill"))


@pytest.mark.timeout(90)
def test_deleted_spill_file_of_a_computed_key_is_recomputed(tmp_path):
    """Spill files deleted under the worker: their keys are recomputed from their tasks,
    for the tasks that need them and for the client; the worker does not restart."""
    limit = 200 * MB  # spill above 120 MB
    with LocalCluster(1, memory_limit=limit, local_directory=str(tmp_path)) as cluster, \
            Executor(cluster) as e:
        pid = cluster.workers[0].pid
        futures = [e.submit(make, i) for i in range(24)]  # 250 MB
        concurrent.futures.wait(futures, timeout=30)
        wait_for(lambda: sum(w["spilled"] for w in e.memory().values()) >= 10 * CHUNK,
                 message="results spilled")
        files = spill_files(tmp_path)
        assert len(files) >= 10
        for path in files:
            path.unlink(missing_ok=True)
        checks = e.gather([e.submit(check, f) for f in futures])  # dependents: recompute
        assert checks == [(float(i), float(i) * (CHUNK // 8)) for i in range(24)]
        for path in spill_files(tmp_path):  # the client's own fetch: recomputed too
            path.unlink(missing_ok=True)
        assert first_values(*e.gather(futures[:4])) == [0.0, 1.0, 2.0, 3.0]
        assert cluster.workers[0].restarts == 0 and cluster.workers[0].pid == pid
        assert e.submit(inc, 1).result(30) == 2


@pytest.mark.timeout(90)
def test_damaged_spill_file_of_a_scattered_key_errs_clearly(tmp_path):
    """A scattered key has no task to recompute it from: whoever needs it errs, naming it."""
    limit = 200 * MB
    with LocalCluster(1, memory_limit=limit, local_directory=str(tmp_path)) as cluster, \
            Executor(cluster) as e:
        scattered = e.scatter([make(i) for i in range(4)])
        computed = [e.submit(make, i) for i in range(4, 20)]  # 200 MB in all
        concurrent.futures.wait(computed, timeout=30)
        wait_for(lambda: sum(w["spilled"] for w in e.memory().values()) >= 6 * CHUNK,
                 message="data spilled, the scattered keys first (least recently used)")
        for path in spill_files(tmp_path):
            path.write_bytes(b"not what was written")
        first, second = scattered[0], scattered[1]
        with pytest.raises(minidist.LostKeyError, match=repr(first.key)):
            e.submit(check, first).result(30)
        with pytest.raises(minidist.LostKeyError, match=repr(second.key)):
            second.result(30)
        assert check(e.gather(computed[-1])) == (19.0, 19.0 * (CHUNK // 8))  # in memory
        assert cluster.workers[0].restarts == 0
        assert e.submit(inc, 1).result(30) == 2


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs mounted in ``tmp_path``: a disk that fills up (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path = tmp_path / "disk"
    path.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs",
                            str(path)], capture_output=True, text=True, timeout=30)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], timeout=30)


@pytest.mark.timeout(90)
def test_full_disk_errs_clearly_and_loses_nothing(small_disk, capfd):
    """377 MB of results, 77 MB over the target, and 64 MiB of disk: what fits is spilled,
    the rest stays in memory, the worker says its disk is full and keeps serving."""
    limit = 500 * MB  # spill above 300 MB managed; pause at 400 MB of RSS, restart at 475 MB
    with LocalCluster(1, memory_limit=limit, local_directory=str(small_disk)) as cluster, \
            Executor(cluster) as e:
        pid = cluster.workers[0].pid
        futures = [e.submit(make, i) for i in range(36)]  # 377 MB, RSS below the pause line
        concurrent.futures.wait(futures, timeout=30)
        (figures,) = wait_for(lambda: [w for w in e.memory().values() if w["spill_error"]
                                       and w["managed"] + w["spilled"] >= 36 * CHUNK],
                              message="the spill error is reported").__iter__()
        assert "No space left on device" in figures["spill_error"], figures
        assert 0 < figures["spilled"] <= 64 << 20  # what fitted
        assert figures["managed"] > 0.6 * limit and not figures["paused"]  # the rest: in memory
        checks = e.gather([e.submit(check, f) for f in futures])
        assert checks == [(float(i), float(i) * (CHUNK // 8)) for i in range(36)]
        assert first_values(*e.gather(futures)) == [float(i) for i in range(36)]
        assert e.submit(inc, 1).result(30) == 2  # it keeps serving
        assert cluster.workers[0].restarts == 0 and cluster.workers[0].pid == pid
        del futures, checks
        wait_for(lambda: all(w["managed"] == w["spilled"] == 0 for w in e.memory().values()),
                 message="released keys leave memory and disk")
    assert "No space left on device" in capfd.readouterr().err


@pytest.mark.timeout(60)
def test_dworker_memory_flags(spawn, tmp_path):
    """--memory-limit reaches every worker (auto: the machine split between them), and
    --local-directory holds each worker's own spill directory while it runs."""
    center = spawn("center", "--port", "0")
    spawn("worker", center.address, "--nworkers", "2", "--local-directory", str(tmp_path))
    spawn("worker", center.address, "--memory-limit", "300MB", "--no-nanny")
    def reported() -> dict | None:
        memory = e.memory()
        return memory if len(memory) == 3 and all(w["limit"] for w in memory.values()) else None

    with Executor(center.address) as e:
        limits = sorted(w["limit"] for w in wait_for(
            reported, message="three workers report their limits").values())
    machine = parse_memory_limit("auto")
    assert limits == [300 * MB, machine // 2, machine // 2]
    assert len(list(tmp_path.glob("minidist-worker-*"))) == 2
    bad = subprocess.run([sys.executable, "-m", "minidist.worker", center.address,
                          "--memory-limit", "lots"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "invalid memory limit 'lots'" in bad.stderr


def test_scheduler_sends_a_paused_worker_nothing_until_it_resumes():
    """The state machine alone: a paused worker has no free slot; resuming fills it."""
    from minidist.scheduler import Scheduler

    def memory(paused: bool) -> list:
        return [{"op": "memory", "managed": 1, "spilled": 2, "unmanaged": 3, "paused": paused}]

    def computes(out: dict, stream: str) -> list:
        return [m["key"] for m in out.get(stream, []) if m and m.get("op") == "compute"]

    sched = Scheduler(prefetch=0)
    sched.worker_added(0.0, "A", "a:1", 1)
    sched.worker_added(0.0, "B", "b:1", 1)
    sched.client_added(0.0, "C", "client")
    sched.worker_msgs(0.1, "A", "a:1", memory(True))
    tasks = [(f"t{i}", object(), [], None) for i in range(3)]
    out = sched.client_msgs(0.2, "C", "client", [{"op": "update_graph", "tasks": tasks,
                                                   "wants": [t[0] for t in tasks]}])
    assert len(computes(out, "A")) == 0 and len(computes(out, "B")) == 1
    info = sched.worker_info(0.3)["a:1"]
    assert info["paused"] is True and (info["memory_managed"], info["memory_spilled"],
                                       info["memory_unmanaged"]) == (1, 2, 3)
    out = sched.worker_msgs(0.4, "A", "a:1", memory(False))
    assert len(computes(out, "A")) == 1


# ---------------------------------------------------------------- values come back as themselves


class Wrapped:
    """A user class that pickles itself with ``__reduce__``."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self):
        return Wrapped, (self.payload,)


def value_of(kind: str):
    """A value of about 1 MB of each kind (large enough to travel out of band)."""
    n = 1 << 20
    if kind == "bytes":
        return b"abc" + bytes(n)
    if kind == "bytearray":
        return bytearray(b"abc" + bytes(n))
    if kind == "str":
        return "abc" + "x" * n
    if kind == "memoryview":
        return memoryview(bytearray(n)).cast("i", (256, n // 1024))
    if kind == "memoryview-readonly":
        return memoryview(b"abc" + bytes(n))
    if kind == "numpy":
        return np.arange(n // 8, dtype=np.int32).reshape(64, -1)
    if kind == "numpy-readonly":
        a = np.arange(n // 8, dtype=np.float32)
        a.setflags(write=False)
        return a
    if kind == "pandas":
        import pandas as pd
        return pd.DataFrame({"i": np.arange(n // 16), "s": ["abc"] * (n // 16)})
    if kind == "user":
        return Wrapped(b"abc" + bytes(n))
    raise ValueError(kind)


KINDS = ["bytes", "bytearray", "str", "memoryview", "memoryview-readonly", "numpy",
         "numpy-readonly", "pandas", "user"]


def describe(value) -> tuple:
    """What a value is: its type, whether it can be written, and what using it gives."""
    kind = type(value).__name__
    if isinstance(value, bytes):
        return kind, value[:3] + b"!", len(value)
    if isinstance(value, bytearray):
        value[:1] = value[:1]  # mutable, as it was
        return kind, bytes(value[:3]), len(value)
    if isinstance(value, str):
        return kind, value[:3] + "!", len(value)
    if isinstance(value, memoryview):
        return kind, value.readonly, value.format, value.shape
    if isinstance(value, np.ndarray):
        return kind, value.dtype.str, value.shape, value.flags.writeable, float(value.sum())
    if isinstance(value, Wrapped):
        return kind, type(value.payload).__name__, value.payload[:3] + b"!"
    if type(value).__name__ == "DataFrame":
        return kind, tuple(map(str, value.dtypes)), value.shape, int(value["i"].sum())
    return (kind,)


@pytest.mark.timeout(90)
def test_a_spilled_value_comes_back_as_itself(tmp_path):
    """Each kind of value, spilled, comes back with its type and mutability: in a task on
    its worker, gathered by the client, and fetched by a peer; so does one that never
    left memory."""
    pytest.importorskip("pandas")
    # Spill above 240 MB managed.  A worker that imported pandas needs well over 100 MB
    # of its own: under a tighter limit it can sit above the pause line (80%) with
    # nothing left to spill, and then it never runs the test's next tasks.
    limit = 400 * MB
    expected = [describe(value_of(kind)) for kind in KINDS]
    with LocalCluster(2, memory_limit=limit, local_directory=str(tmp_path)) as cluster, \
            Executor(cluster) as e:
        a, b = [w.address for w in cluster.workers]
        values = [e.submit(value_of, kind, workers=[a]) for kind in KINDS]
        assert [describe(v) for v in e.gather(values)] == expected  # from memory
        fillers = [e.submit(make, i, workers=[a]) for i in range(32)]  # 336 MB, newer
        concurrent.futures.wait(fillers, timeout=30)
        wait_for(lambda: e.memory()[a]["spilled"] >= 12 * MB + CHUNK,  # some fillers too
                 message="the values spilled (the least recently used)")
        on_disk = spill_files(tmp_path)
        assert len(on_disk) >= len(KINDS)
        assert [describe(v) for v in e.gather(values)] == expected  # the files, as they are
        fetched = e.gather([e.submit(describe, v, workers=[b]) for v in values])
        assert fetched == expected  # a peer's fetch of the files
        used = e.gather([e.submit(describe, v, workers=[a]) for v in values])
        assert used == expected  # read back into the worker that spilled them
        for path in on_disk:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


# ---------------------------------------------------------------------- a shared machine


def planted_spill_file(size: int, marker: str) -> bytes:
    """A file in the spill format of exactly ``size`` bytes whose pickle, if loaded,
    creates ``marker`` (what another local user could plant to run code as the worker)."""
    import pickle
    import struct

    class Payload:
        def __reduce__(self):
            return open, (marker, "w")
    header = pickle.dumps(Payload(), protocol=5)
    padding = size - 8 - 16 - len(header)
    assert padding >= 0
    return struct.pack("!Q", 2) + struct.pack("!2Q", len(header), padding) + header + \
        bytes(padding)


@pytest.mark.timeout(90)
def test_a_planted_spill_file_is_never_unpickled(tmp_path):
    """Spill files replaced by planted pickles of the very same size: neither the worker
    nor the client loads them; the keys are lost, recomputed, and the cluster serves on."""
    limit = 200 * MB
    marker = str(tmp_path / "pwned")
    spill = tmp_path / "spill"
    with LocalCluster(1, memory_limit=limit, local_directory=str(spill)) as cluster, \
            Executor(cluster) as e:
        pid = cluster.workers[0].pid
        futures = [e.submit(make, i) for i in range(24)]  # 250 MB
        concurrent.futures.wait(futures, timeout=30)
        wait_for(lambda: sum(w["spilled"] for w in e.memory().values()) >= 10 * CHUNK,
                 message="results spilled")
        files = spill_files(spill)
        assert len(files) >= 10
        for path in files:
            planted = path.with_name("planted")
            planted.write_bytes(planted_spill_file(path.stat().st_size, marker))
            os.replace(planted, path)  # same name, same size: another file
        half = len(files) // 2
        assert first_values(*e.gather(futures[:half])) == [float(i) for i in range(half)]
        checks = e.gather([e.submit(check, f) for f in futures])  # the tasks read them
        assert checks == [(float(i), float(i) * (CHUNK // 8)) for i in range(24)]
        assert not os.path.exists(marker)
        assert cluster.workers[0].restarts == 0 and cluster.workers[0].pid == pid
        assert e.submit(inc, 1).result(30) == 2
    assert not os.path.exists(marker)


def test_a_directory_others_can_enter_or_not_ours_is_refused(tmp_path):
    from minidist.memory import LocalDirectory, check_private
    directory = LocalDirectory(str(tmp_path))
    try:
        st = os.stat(directory.path)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        check_private(st, directory.path)  # ours: fine
        assert len(os.path.basename(directory.path)) >= len("minidist-worker-1-") + 16
    finally:
        directory.remove()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="0777"):
        check_private(os.stat(shared), str(shared))
    shared.chmod(0o750)
    with pytest.raises(PermissionError, match="0750"):
        check_private(os.stat(shared), str(shared))
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    shared.chmod(0o700)
    os.chown(shared, 65534, 65534)
    with pytest.raises(PermissionError, match="uid 65534"):
        check_private(os.stat(shared), str(shared))


def hold_unmanaged(fraction: float, limit: int) -> None:
    """Fill this worker's RSS to ``fraction`` of ``limit`` with memory that is not a result
    (kept in the interpreter, as a library's cache would be); returns nothing to spill."""
    missing = int(fraction * limit) - process_rss()
    if missing > 0:
        sys.__dict__.setdefault("_test_held", []).append(b"\x01" * missing)


@pytest.mark.timeout(90)
def test_a_worker_paused_with_nothing_to_spill_runs_again():
    """Above the pause line with nothing left to spill, waiting cannot free memory: after
    STUCK_RUN_AFTER the worker runs tasks again instead of hanging every job."""
    limit = 300 * MB
    with LocalCluster(1, memory_limit=limit) as cluster:
        client = minidist.Client(cluster, set_as_default=False)
        try:
            address = cluster.workers[0].address
            client.submit(hold_unmanaged, 0.87, limit, pure=False).result(timeout=20)
            wait_for(lambda: client.memory()[address]["paused"], timeout=10,
                     message="the worker to pause")
            assert client.submit(inc, 1).result(timeout=30) == 2
            assert client.memory()[address]["managed"] < 1 * MB  # none of it was results
        finally:
            client.close()
