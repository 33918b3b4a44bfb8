"""One workload in its own process: ``python -m benchmarks.child CONFIG.json``.

The runner starts one of these per workload, so a crash, a hang or leaked
state stays inside it.  For each repetition it goes through the systems
(the order rotates, A B, B A, ...), and for each one: start a fresh system
and warm it up (untimed, under a deadline), measure (under a deadline),
close it, and stop by PID whatever it left running.  Each result is
appended to the output file as one JSON line as soon as it exists, so a
runner that has to kill this process still keeps what was measured.

SIGTERM and SIGINT raise ``KeyboardInterrupt``, so every ``finally``
(closing systems, stopping processes) runs before the process exits.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
import traceback
from typing import Any, Iterator

from . import procs
from .floor import SocketFloor
from .systems import NotAvailable, NotSupported, make
from .workloads import FLOOR, WORKLOADS, Workload, default_warmup


class Deadline(BaseException):
    """A phase of a measurement ran past its deadline (a BaseException, so that
    ``except Exception`` in library code cannot swallow it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise Deadline()


def _on_term(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise ``TimeoutError`` in this (main) thread if the block takes over ``seconds``."""
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except Deadline:
        raise TimeoutError(f"{what} did not finish within {seconds:g}s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


class Recorder:
    """Appends one JSON line per measurement, and PIDs of started processes."""

    def __init__(self, out: str, pidfile: str) -> None:
        self.out = open(out, "a", encoding="utf-8")
        self.pidfile = open(pidfile, "a", encoding="utf-8")

    def record(self, **entry: Any) -> None:
        self.out.write(json.dumps(entry, default=str) + "\n")
        self.out.flush()

    def note_pids(self, found: dict[int, int]) -> None:
        for pid, started in found.items():
            self.pidfile.write(f"{pid} {started}\n")
        self.pidfile.flush()


def _split(metrics: dict) -> tuple[dict, dict]:
    values = {k: v for k, v in metrics.items() if not isinstance(v, BaseException)}
    skipped = {k: str(v) for k, v in metrics.items() if isinstance(v, BaseException)}
    return values, skipped


def run_one(workload: Workload, name: str, sizes: dict, rep: int, rec: Recorder,
            scale: float) -> None:
    """Start, warm up, measure and close one system once; record what happened."""
    before = procs.descendants()
    begun = time.monotonic()
    entry: dict[str, Any] = {"system": name, "rep": rep, "time": time.time()}
    system = None
    floor = None
    interrupted = False
    try:
        if name == FLOOR:
            floor = SocketFloor()
            with deadline(60 * scale, "starting the socket floor"):
                floor.start()
            rec.note_pids(procs.descendants())
            with deadline(workload.measure_deadline * scale, "the measurement"):
                values = workload.floor(floor, sizes)
        else:
            options = workload.dask_options if name == "dask" else {}
            system = make(name, **options)
            if not workload.owns_lifecycle:
                with deadline(workload.start_deadline * scale, "start and warm-up"):
                    try:
                        system.start(**workload.start_options(sizes))
                    finally:
                        rec.note_pids(procs.descendants())
                    (workload.warmup or default_warmup)(system, sizes)
            with deadline(workload.measure_deadline * scale, "the measurement"):
                values = workload.measure(system, sizes)
        entry["metrics"], entry["skipped"] = _split(values)
    except (NotSupported, NotAvailable) as e:
        entry["unavailable"] = str(e)
    except KeyboardInterrupt:
        entry["error"] = "interrupted"
        interrupted = True
        raise
    except BaseException as e:  # noqa: BLE001 - any failure is a result to report
        entry["error"] = f"{type(e).__name__}: {e}"
        entry["traceback"] = traceback.format_exc(limit=8)
        traceback.print_exc()
    finally:
        try:
            # interrupted: no patience for a graceful close, the processes are stopped below
            with deadline(5 if interrupted else 60, "closing"):
                if system is not None:
                    system.close()
                if floor is not None:
                    floor.close()
        except BaseException as e:  # noqa: BLE001
            entry.setdefault("error", f"close failed: {type(e).__name__}: {e}")
            if isinstance(e, KeyboardInterrupt):
                raise
        finally:
            leftover = {p: t for p, t in procs.descendants().items()
                        if p not in before and not procs.is_resource_tracker(p)}
            rec.note_pids(leftover)
            killed = procs.stop(leftover, grace=5)
            if leftover:
                entry["leftover_processes"] = sorted(leftover)
                entry["killed"] = killed
            entry["wall_s"] = round(time.monotonic() - begun, 2)
            rec.record(**entry)
            status = entry.get("error") or entry.get("unavailable") or "ok"
            print(f"  {workload.name:<12} {name:<11} rep {rep + 1}: {status} "
                  f"({entry['wall_s']}s with start and close)",
                  flush=True)


def preimport(systems: list[str]) -> None:
    """Import what systems and workloads need, so no timing includes an import."""
    import concurrent.futures  # noqa: F401
    import multiprocessing.pool  # noqa: F401
    import minidist  # noqa: F401
    for module in ("numpy", "dask", "dask.array", "distributed"):
        if module == "distributed" and "dask" not in systems:
            continue
        try:
            __import__(module)
        except ImportError:
            pass


def main(argv: list[str]) -> int:
    """Run the workload described by the JSON config file ``argv[0]``."""
    with open(argv[0], encoding="utf-8") as f:
        config = json.load(f)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGTERM, _on_term)
    workload = WORKLOADS[config["workload"]]
    systems = config["systems"]
    rec = Recorder(config["out"], config["pidfile"])
    preimport(systems)
    started = procs.descendants()
    t0 = time.monotonic()
    try:
        for rep in range(config["repeat"]):
            shift = rep % len(systems)
            for name in systems[shift:] + systems[:shift]:
                run_one(workload, name, config["sizes"], rep, rec, config["scale"])
    except KeyboardInterrupt:
        return 130
    finally:
        procs.stop({p: t for p, t in procs.descendants().items() if p not in started})
        print(f"  {workload.name}: {time.monotonic() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
