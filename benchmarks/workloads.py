"""The workloads: what is timed, at which sizes, with which metrics and targets.

A workload's ``measure`` gets a started, warmed-up system and returns
``{metric: value}``; only the code between its ``perf_counter`` calls is
timed.  Results are checked after the timing, and a wrong result is an
error, not a number.  ``startup`` is the one workload that starts and
closes systems itself, because that is what it times.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import os
import statistics
import tempfile
import time
from typing import Any, Callable

from . import procs, tasks
from .floor import SocketFloor
from .systems import System, NotSupported, SYSTEMS

MB = 2**20
FLOOR = "socket"
IDEAL = "ideal"

_fresh = itertools.count(1_000_000)
"""Arguments never used before in this process, so pure keys are never reused."""


def fresh(n: int) -> range:
    """``n`` integers no earlier call returned."""
    start = next(_fresh)
    for _ in range(n - 1):
        next(_fresh)
    return range(start, start + n)


@dataclasses.dataclass(frozen=True)
class Metric:
    """One measured quantity; ``better`` is ``"higher"`` or ``"lower"``."""

    name: str
    unit: str
    better: str


@dataclasses.dataclass(frozen=True)
class Target:
    """``minidist / reference`` must be ``op`` ``bound`` for ``metric`` (reference may be a
    system, the socket floor, the ideal time, or ``None`` for an absolute bound)."""

    metric: str
    reference: str | None
    op: str  # ">=" or "<="
    bound: float
    reference_metric: str | None = None
    """Compare with this metric of the reference (default: the same metric)."""

    def text(self) -> str:
        if self.reference is None:
            return f"{self.op} {self.bound:g}"
        of = f" {self.reference_metric}" if self.reference_metric else ""
        return f"{self.op} {self.bound:g}x {self.reference}{of}"

    def check(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound


@dataclasses.dataclass
class Workload:
    """A named benchmark: sizes (full and quick), metrics, targets and the timed code."""

    name: str
    description: str
    metrics: list[Metric]
    full: dict
    quick: dict
    measure: Callable[[System, dict], dict]
    systems: tuple[str, ...] = SYSTEMS
    targets: list[Target] = dataclasses.field(default_factory=list)
    floor: Callable[[SocketFloor, dict], dict] | None = None
    ideal: Callable[[dict], dict] | None = None
    owns_lifecycle: bool = False
    start_options: Callable[[dict], dict] = lambda sizes: {}
    warmup: Callable[[System, dict], None] | None = None
    measure_deadline: float = 300.0
    start_deadline: float = 120.0
    dask_options: dict = dataclasses.field(default_factory=dict)
    spread: bool = False
    """Print each figure as ``median (min-max)`` over the repetitions."""

    def sizes(self, quick: bool) -> dict:
        return dict(self.quick if quick else self.full)


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"wrong result: {what}")


def default_warmup(system: System, sizes: dict) -> None:
    """A few tasks and a small map: imports loaded, connections open, code paths warm."""
    args = fresh(20)
    _check(system.gather([system.submit(tasks.inc, i) for i in args]) == [i + 1 for i in args],
           "warm-up submit")
    args = fresh(200)
    _check(system.map(tasks.noop, args) == list(args), "warm-up map")


# ---------------------------------------------------------------------------- startup

def measure_startup(system: System, sizes: dict) -> dict:
    t0 = time.perf_counter()
    try:
        system.start(n_workers=2)
        value = system.result(system.submit(tasks.inc, 41))
        t1 = time.perf_counter()
    finally:
        t_close = time.perf_counter()
        system.close()
        t2 = time.perf_counter()
    _check(value == 42, f"inc(41) gave {value!r}")
    return {"first_result": t1 - t0, "shutdown": t2 - t_close}


# ---------------------------------------------------------------------------- throughput

def measure_throughput(system: System, sizes: dict) -> dict:
    n = sizes["tasks"]
    args = fresh(n)
    t0 = time.perf_counter()
    handles = [system.submit(tasks.noop, i) for i in args]
    results = system.gather(handles)
    t1 = time.perf_counter()
    _check(results == list(args), "submit-each results")
    del handles, results
    system.settle()
    args = fresh(n)
    t2 = time.perf_counter()
    results = system.map(tasks.noop, args)
    t3 = time.perf_counter()
    _check(results == list(args), "bulk map results")
    return {"submit_each": n / (t1 - t0), "bulk_map": n / (t3 - t2)}


# ---------------------------------------------------------------------------- latency

def _latency_metrics(samples: list[float]) -> dict:
    return {"median": statistics.median(samples) * 1e3,
            "p99": statistics.quantiles(samples, n=100, method="inclusive")[98] * 1e3}


def measure_latency(system: System, sizes: dict) -> dict:
    for i in fresh(sizes["warmup"]):
        system.result(system.submit(tasks.inc, i))
    samples = []
    for i in fresh(sizes["rounds"]):
        t0 = time.perf_counter()
        value = system.result(system.submit(tasks.inc, i))
        samples.append(time.perf_counter() - t0)
        _check(value == i + 1, f"inc({i}) gave {value!r}")
    return _latency_metrics(samples)


def floor_latency(floor: SocketFloor, sizes: dict) -> dict:
    return _latency_metrics(floor.latencies(max(sizes["rounds"], 1000)))


# ---------------------------------------------------------------------------- bandwidth

_payloads: dict = {}


def _payload(kind: str, size: int) -> Any:
    if (kind, size) not in _payloads:
        _payloads[(kind, size)] = tasks.make_payload(kind, size)
    return _payloads[(kind, size)]


def _same(a: Any, b: Any) -> bool:
    if hasattr(a, "dtype"):
        import numpy as np
        return isinstance(b, np.ndarray) and a.shape == b.shape and bool(np.array_equal(a, b))
    return a == b


def measure_bandwidth(system: System, sizes: dict) -> dict:
    size = sizes["bytes"]
    out: dict[str, Any] = {}
    for kind in ("numpy", "bytes"):
        payload = _payload(kind, size)
        try:
            workers = system.worker_addresses()
        except NotSupported:
            workers = None
        if workers is None:
            # pools: send as a task argument, receive the worker's own copy as a result
            t0 = time.perf_counter()
            n = system.result(system.submit(tasks.nbytes, payload))
            t1 = time.perf_counter()
            value = system.result(system.submit(tasks.get_payload, kind))
            t2 = time.perf_counter()
            _check(n == size and _same(payload, value), f"{kind} round trip")
            out[f"scatter_{kind}"] = size / MB / (t1 - t0)
            out[f"gather_{kind}"] = size / MB / (t2 - t1)
            out[f"move_{kind}"] = NotSupported("no worker-to-worker transfer in a pool")
            del value
            continue
        # Every system puts the same data on the same worker, so that worker B receives
        # only the move, into memory no transfer of the same run has used yet.
        a, b = workers[0], workers[-1]
        t0 = time.perf_counter()
        handle = system.scatter(payload, worker=a)
        t1 = time.perf_counter()
        value = system.fetch(handle)
        t2 = time.perf_counter()
        _check(_same(payload, value), f"{kind} gathered back")
        del value, handle
        on_a = system.scatter(payload, worker=a)
        t3 = time.perf_counter()
        n = system.result(system.submit(tasks.nbytes, on_a, workers=[b]))
        t4 = time.perf_counter()
        _check(n == size, f"{kind} moved to {b}: {n} bytes")
        del on_a
        system.settle()
        out[f"scatter_{kind}"] = size / MB / (t1 - t0)
        out[f"gather_{kind}"] = size / MB / (t2 - t1)
        out[f"move_{kind}"] = size / MB / (t4 - t3)
    return out


def floor_bandwidth(floor: SocketFloor, sizes: dict) -> dict:
    """What the bare socket does: median of 3 transfers each way, after one untimed each
    (so both sides' buffers are already in memory: the best case).  The ``fresh_*``
    rows receive into new memory each time, as any transfer of a new value must."""
    size = sizes["bytes"]
    floor.send(size)
    floor.receive(size)
    send = size / MB / statistics.median(floor.send(size) for _ in range(3))
    receive = size / MB / statistics.median(floor.receive(size) for _ in range(3))
    fresh_send = size / MB / statistics.median(floor.send(size, True) for _ in range(3))
    fresh_receive = size / MB / statistics.median(floor.receive(size, True) for _ in range(3))
    return {"scatter_numpy": send, "gather_numpy": receive, "move_numpy": send,
            "scatter_bytes": send, "gather_bytes": receive, "move_bytes": send,
            "fresh_send": fresh_send, "fresh_receive": fresh_receive}


def bandwidth_warmup(system: System, sizes: dict) -> None:
    """The default warm-up, plus a full-size array through every worker both ways.

    Workers import numpy lazily, on the first array they unpickle; without
    this, that import (about 0.1 s) would be timed as part of a transfer.
    And a process's first large receive lands in memory the machine may
    never have touched: in a virtual machine whose host backs guest memory
    lazily (and takes freed memory back), that first touch costs a fault in
    the host per page and runs at a fifth of the speed of later ones.  One
    untimed transfer of the full size each way, and between the workers,
    puts every system's processes past it alike.
    """
    import numpy as np
    default_warmup(system, sizes)
    big = np.ones(sizes["bytes"], dtype="u1")
    try:
        workers = system.worker_addresses()
    except NotSupported:
        workers = None
    if workers is None:
        _check(system.result(system.submit(tasks.nbytes, big)) == big.nbytes, "numpy warm-up")
        value = system.result(system.submit(tasks.get_payload, "numpy"))
        _check(tasks.nbytes(value) == big.nbytes, "numpy warm-up result")
        del value
        return
    for worker in workers:
        handle = system.scatter(big, worker=worker)
        _check(_same(big, system.fetch(handle)), "numpy warm-up round trip")
        for other in workers:
            n = system.result(system.submit(tasks.nbytes, handle, workers=[other]))
            _check(n == big.nbytes, "numpy warm-up move")
        del handle
        system.settle()


# ---------------------------------------------------------------------------- dask_array

_reference: dict = {}


def _dask_expression(sizes: dict) -> Any:
    import dask.array as da
    n, c = sizes["n"], sizes["chunks"]
    x = da.random.RandomState(42).random_sample((n, n), chunks=(c, c))
    return (x + x.T).mean(axis=0).sum()


def dask_array_warmup(system: System, sizes: dict) -> None:
    import dask
    default_warmup(system, sizes)
    dask.compute(_dask_expression({"n": 200, "chunks": 100}), scheduler=system.dask_scheduler())


def measure_dask_array(system: System, sizes: dict) -> dict:
    import dask
    key = (sizes["n"], sizes["chunks"])
    if key not in _reference:
        _reference[key] = dask.compute(_dask_expression(sizes), scheduler="threads")[0]
    scheduler = system.dask_scheduler()
    expr = _dask_expression(sizes)
    t0 = time.perf_counter()
    (value,) = dask.compute(expr, scheduler=scheduler)
    t1 = time.perf_counter()
    ref = _reference[key]
    _check(abs(value - ref) <= 1e-9 * abs(ref), f"{value!r} != {ref!r}")
    return {"compute": t1 - t0}


# ---------------------------------------------------------------------------- locality

def measure_locality(system: System, sizes: dict) -> dict:
    n, size = sizes["tasks"], sizes["bytes"]
    args = fresh(n)
    try:
        t0 = time.perf_counter()
        parts = system.map_futures(tasks.make_bytes, args, [size] * n)
        lens = system.map_futures(tasks.nbytes, parts)
        total = system.result(system.submit(sum, lens))
        t1 = time.perf_counter()
    except NotSupported:
        # pools: every 100 KB result comes back to this process and goes out again
        t0 = time.perf_counter()
        parts = system.map(tasks.make_bytes, args, [size] * n)
        lens = system.map(tasks.nbytes, parts)
        total = sum(lens)
        t1 = time.perf_counter()
    _check(total == n * size, f"sum of lengths {total} != {n * size}")
    return {"total": t1 - t0}


# ---------------------------------------------------------------------------- many_workers

def many_workers_warmup(system: System, sizes: dict) -> None:
    default_warmup(system, sizes)
    k = 2 * sizes["workers"]
    system.map(tasks.sleep_task, [0.01] * k, fresh(k))


def measure_many_workers(system: System, sizes: dict) -> dict:
    k = sizes["tasks"]
    args = fresh(k)
    t0 = time.perf_counter()
    results = system.map(tasks.sleep_task, [sizes["sleep"]] * k, args)
    t1 = time.perf_counter()
    _check(results == list(args), "sleep results")
    return {"elapsed": t1 - t0}


def many_workers_ideal(sizes: dict) -> dict:
    return {"elapsed": sizes["tasks"] * sizes["sleep"] / sizes["workers"]}


# ---------------------------------------------------------------------------- spill

def _disk_writes(pids: list[int]) -> dict[int, int]:
    """pid -> bytes it has caused to be written to storage (``/proc/PID/io``); gone: absent."""
    found = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io") as f:
                found[pid] = next(int(line.split()[1]) for line in f
                                  if line.startswith("write_bytes:"))
        except (OSError, StopIteration):
            continue
    return found


def measure_spill(system: System, sizes: dict) -> dict:
    """Arrays worth twice the workers' memory limits, all kept alive, then a checksum of each.

    Both systems run with the same per-worker ``memory_limit`` and their
    own spilling (minidist: its SpillBuffer; dask: zict).  Peak RSS is each
    worker's VmHWM (the warm-up, the same job once, included); spill throughput is the bytes the
    workers wrote to disk (``/proc/PID/io`` write_bytes) per second of the job.
    A worker killed for its memory (and restarted) is counted in
    ``workers_restarted``; its writes and peak are lost with it.
    """
    n, nbytes = sizes["arrays"], sizes["array_bytes"]
    workers = system.worker_pids()
    before = _disk_writes(workers)
    if len(before) != len(workers):
        raise NotSupported("cannot read /proc/PID/io of the workers")
    args = fresh(n)
    t0 = time.perf_counter()
    arrays = [system.submit(tasks.make_array, i, nbytes) for i in args]
    sums = system.gather([system.submit(tasks.first_and_sum, a) for a in arrays])
    t1 = time.perf_counter()
    after = _disk_writes(workers)
    written = sum(after[pid] - before[pid] for pid in after)
    peaks = [procs.memory(pid)["VmHWM"] for pid in after]
    _check(sums == [(float(i), float(i) * (nbytes // 8)) for i in args], "checksums")
    del arrays
    return {"total": t1 - t0, "worker_peak_MB": max(peaks) / MB,
            "spill_MBps": written / MB / (t1 - t0), "spilled_MB": written / MB,
            "workers_restarted": len(workers) - len(after)}


def spill_warmup(system: System, sizes: dict) -> None:
    """The default warm-up, then the spill job once, untimed.

    The first pass of this job after a pause costs 2-5x the next ones on
    the VMs it runs on (fresh memory and page cache: free pages went back
    to the host), and the system listed first would pay for it alone.
    """
    default_warmup(system, sizes)
    measure_spill(system, sizes)
    system.settle()


# ---------------------------------------------------------------------------- memory

def measure_memory(system: System, sizes: dict) -> dict:
    """RSS while ``tasks`` tasks wait on one blocked task.

    The pending tasks are not cancelled afterwards (cancelling 100,000 keys
    can take dask minutes): the flag is set so the blocked task ends, and the
    system is closed right away, its processes stopped by PID.
    """
    n = sizes["tasks"]
    center, workers = system.center_pid(), system.worker_pids()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        flag = os.path.join(tmp, "release")
        try:
            blocker = system.submit(tasks.wait_for_file, flag, 900.0)
            base = procs.memory(center)["VmRSS"]
            t0 = time.perf_counter()
            handles = system.map_futures(tasks.after, [blocker] * n, range(n))
            t1 = time.perf_counter()
            deadline = time.monotonic() + 600
            while (pending := system.pending()) < n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {pending} of {n} tasks reached the scheduler")
                time.sleep(0.05)
            t2 = time.perf_counter()
            mem = procs.memory(center)
            worker_mem = [procs.memory(pid) for pid in workers]
            _check(len(handles) == n and pending == n, f"{pending} pending, expected {n}")
        finally:
            open(flag, "w").close()
    return {"center_bytes_per_task": (mem["VmRSS"] - base) / n,
            "center_peak_MB": mem["VmHWM"] / MB,
            "worker_peak_MB": max(m["VmHWM"] for m in worker_mem) / MB,
            "submit_s": t1 - t0, "all_pending_s": t2 - t0}


# ---------------------------------------------------------------------------- scale

def size_tag(n: int) -> str:
    """``10k``, ``1M``: the size in a metric's name."""
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k"


SCALE_METRICS = ("tasks_per_s", "submit_us", "client_B_per_future", "center_B_per_task")


def measure_scale(system: System, sizes: dict) -> dict:
    """``Client.map(inc, range(N), pure=False)`` then ``gather``, for each N.

    Per size: tasks/s over the whole map + gather, the client's submit time
    per task, and the peak RSS of the client (this process) and of the center
    (dask: scheduler) during that size (peaks reset before each size), less
    their RSS before the first size, over N.  The sizes grow, so memory a
    process kept from a smaller size counts against the next one as well: an
    upper bound, not a flattering reuse.
    dask runs only up to ``dask_max`` tasks.  ``rate_ratio`` is tasks/s at the
    largest size over tasks/s at the smallest.
    """
    out: dict[str, Any] = {}
    center = system.center_pid()
    me = os.getpid()
    rates = []
    system.settle(timeout=300)
    gc.collect()
    client_base = procs.memory(me)["VmRSS"]
    center_base = procs.memory(center)["VmRSS"]
    for n in sizes["tasks"]:
        tag = size_tag(n)
        if system.name == "dask" and n > sizes["dask_max"]:
            why = NotSupported(f"dask is run up to {sizes['dask_max']:,} tasks")
            out.update({f"{m}_{tag}": why for m in SCALE_METRICS})
            continue
        system.settle(timeout=300)
        gc.collect()
        procs.reset_peak(me)
        procs.reset_peak(center)
        t0 = time.perf_counter()
        futures = system.client.map(tasks.inc, range(n), pure=False)
        t1 = time.perf_counter()
        results = system.client.gather(futures)
        t2 = time.perf_counter()
        client_peak = procs.memory(me)["VmHWM"]
        center_peak = procs.memory(center)["VmHWM"]
        ok = len(results) == n and results[0] == 1 and results[-1] == n and \
            all(r == i + 1 for i, r in enumerate(results))
        _check(ok, f"map(inc, range({n})) results")
        del futures, results
        rates.append(n / (t2 - t0))
        out[f"tasks_per_s_{tag}"] = rates[-1]
        out[f"submit_us_{tag}"] = (t1 - t0) / n * 1e6
        out[f"client_B_per_future_{tag}"] = (client_peak - client_base) / n
        out[f"center_B_per_task_{tag}"] = (center_peak - center_base) / n
    if len(rates) == len(sizes["tasks"]):
        out["rate_ratio"] = rates[-1] / rates[0]
    else:
        out["rate_ratio"] = NotSupported("not every size was run")
    system.settle(timeout=300)
    return out


def _scale_metrics(sizes: tuple[int, ...]) -> list[Metric]:
    units = {"tasks_per_s": ("tasks/s", "higher"), "submit_us": ("us", "lower"),
             "client_B_per_future": ("B", "lower"), "center_B_per_task": ("B", "lower")}
    return [Metric(f"{m}_{size_tag(n)}", *units[m]) for n in sizes for m in SCALE_METRICS] + \
        [Metric("rate_ratio", "x", "higher")]


SCALE_FULL = {"tasks": (10_000, 50_000, 200_000, 1_000_000), "dask_max": 50_000}
SCALE_QUICK = {"tasks": (1_000, 10_000), "dask_max": 10_000}


# ---------------------------------------------------------------------------- the table

WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload(
        "startup", "cluster/pool creation to first result, and shutdown, separately",
        [Metric("first_result", "s", "lower"), Metric("shutdown", "s", "lower")],
        full={}, quick={}, measure=measure_startup, owns_lifecycle=True,
        targets=[Target("first_result", "dask", "<=", 0.4)], measure_deadline=120),
    Workload(
        "throughput", "no-op tasks: submit each then gather; bulk map then gather",
        [Metric("submit_each", "tasks/s", "higher"), Metric("bulk_map", "tasks/s", "higher")],
        full={"tasks": 20_000}, quick={"tasks": 1_000}, measure=measure_throughput,
        targets=[Target("submit_each", "dask", ">=", 10),
                 Target("submit_each", "processpool", ">=", 3.0),
                 Target("bulk_map", "dask", ">=", 10),
                 Target("bulk_map", "processpool", ">=", 5.0)], measure_deadline=600),
    Workload(
        "latency", "sequential submit -> result of inc(i), after warm-up",
        [Metric("median", "ms", "lower"), Metric("p99", "ms", "lower")],
        full={"rounds": 300, "warmup": 30}, quick={"rounds": 50, "warmup": 10},
        measure=measure_latency, floor=floor_latency,
        targets=[Target("median", "dask", "<=", 0.1),
                 Target("median", "processpool", "<=", 1.5)], measure_deadline=180),
    Workload(
        "bandwidth", "scatter / gather of a numpy array and a bytes object, and a "
        "worker-to-worker move (MB = 2^20 bytes)",
        [*(Metric(f"{op}_{kind}", "MB/s", "higher")
           for kind in ("numpy", "bytes") for op in ("scatter", "gather", "move")),
         Metric("fresh_send", "MB/s", "higher"), Metric("fresh_receive", "MB/s", "higher")],
        full={"bytes": 256 * MB}, quick={"bytes": 16 * MB},
        measure=measure_bandwidth, floor=floor_bandwidth, warmup=bandwidth_warmup,
        start_options=lambda sizes: {"payload_size": sizes["bytes"]},
        targets=[*(Target(f"{op}_{kind}", ref, ">=", bound, of)
                   for kind in ("numpy", "bytes") for op in ("scatter", "gather")
                   for ref, bound, of in ((FLOOR, 0.8, f"fresh_{'send' if op == 'scatter' else 'receive'}"),
                                          ("dask", 2.0, None))),
                 *(Target(f"move_{kind}", "dask", ">=", 1.0) for kind in ("numpy", "bytes"))],
        measure_deadline=300, spread=True),
    Workload(
        "dask_array", "(x + x.T).mean(axis=0).sum() on a random dask.array, "
        "through each system's dask scheduler function",
        [Metric("compute", "s", "lower")],
        full={"n": 4000, "chunks": 500}, quick={"n": 1000, "chunks": 250},
        measure=measure_dask_array, systems=("minidist", "dask"), warmup=dask_array_warmup,
        targets=[Target("compute", "dask", "<=", 0.5)], measure_deadline=300),
    Workload(
        "locality", "tasks making 100 KB each, then len of each, then sum",
        [Metric("total", "s", "lower")],
        full={"tasks": 2000, "bytes": 100_000}, quick={"tasks": 200, "bytes": 100_000},
        measure=measure_locality, measure_deadline=300),
    Workload(
        "many_workers", "single-thread workers running sleep(0.1) tasks, against the ideal",
        [Metric("elapsed", "s", "lower")],
        full={"workers": 40, "tasks": 400, "sleep": 0.1},
        quick={"workers": 8, "tasks": 80, "sleep": 0.1},
        measure=measure_many_workers, systems=("minidist", "dask"),
        start_options=lambda sizes: {"n_workers": sizes["workers"]},
        warmup=many_workers_warmup, ideal=many_workers_ideal,
        targets=[Target("elapsed", IDEAL, "<=", 1.15)], measure_deadline=120,
        start_deadline=400),
    Workload(
        "memory", "RSS of the scheduling process and of a worker while tasks wait on "
        "one blocked task",
        [Metric("center_bytes_per_task", "B", "lower"), Metric("center_peak_MB", "MB", "lower"),
         Metric("worker_peak_MB", "MB", "lower"), Metric("submit_s", "s", "lower"),
         Metric("all_pending_s", "s", "lower")],
        full={"tasks": 100_000}, quick={"tasks": 5_000},
        measure=measure_memory, systems=("minidist", "dask"),
        dask_options={"separate_scheduler": True},
        targets=[Target("center_bytes_per_task", None, "<=", 2048)], measure_deadline=900),
    Workload(
        "spill", "arrays worth twice the workers' memory limits kept alive, then a checksum "
        "of each, with the same limit per worker (MB = 2^20 bytes)",
        [Metric("total", "s", "lower"), Metric("worker_peak_MB", "MB", "lower"),
         Metric("spill_MBps", "MB/s", "higher"), Metric("spilled_MB", "MB", "lower"),
         Metric("workers_restarted", "", "lower")],
        full={"memory_limit": 500 * 10**6, "arrays": 100, "array_bytes": 20 * MB},
        quick={"memory_limit": 300 * 10**6, "arrays": 120, "array_bytes": 10 * MB},
        measure=measure_spill, systems=("minidist", "dask"), warmup=spill_warmup,
        start_options=lambda sizes: {"memory_limit": sizes["memory_limit"]},
        targets=[Target("total", "dask", "<=", 0.5), Target("worker_peak_MB", "dask", "<=", 1.0)],
        measure_deadline=600),
    Workload(
        "scale", "Client.map(inc, range(N), pure=False) then gather, N from 10k to 1M "
        "(rate_ratio: tasks/s at the largest N over the smallest)",
        _scale_metrics(tuple(sorted({*SCALE_QUICK["tasks"], *SCALE_FULL["tasks"]}))),
        full=SCALE_FULL, quick=SCALE_QUICK, measure=measure_scale,
        systems=("minidist", "dask"), dask_options={"separate_scheduler": True},
        targets=[Target("rate_ratio", None, ">=", 0.9),
                 Target(f"client_B_per_future_{size_tag(SCALE_FULL['tasks'][-1])}", None,
                        "<=", 1024),
                 Target(f"center_B_per_task_{size_tag(SCALE_FULL['tasks'][-1])}", None,
                        "<=", 1024)],
        measure_deadline=1800),
]}
