"""``python -m benchmarks``: run workloads in child processes, aggregate, print, save.

Each workload runs in its own child process (``benchmarks.child``) with a
deadline; the child records one JSON line per measurement.  Here the
samples become medians, ratios between systems of the same run, and
pass/fail against the targets, printed as a table and written as JSON.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from . import procs
from .systems import SYSTEMS
from .workloads import FLOOR, IDEAL, WORKLOADS, Workload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(ROOT, "benchmarks", "results", "latest.json")
SETUP = {
    "minidist": "minidist.LocalCluster(n_workers=2, threads_per_worker=1) + minidist.Client",
    "processpool": "concurrent.futures.ProcessPoolExecutor(2)",
    "mpool": "multiprocessing.Pool(2)",
    "dask": "distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, "
            "dashboard_address=None) + distributed.Client; memory: dask scheduler and "
            "--no-nanny workers as separate processes",
    FLOOR: "two processes on 127.0.0.1, sendall / recv_into, TCP_NODELAY",
}
SHORT = {"minidist": "minidist", "processpool": "processpool", "mpool": "mpool", "dask": "dask",
         FLOOR: "socket", IDEAL: "ideal"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="minidist side by side with ProcessPoolExecutor, multiprocessing.Pool "
                    "and dask.distributed (and a raw-socket floor).")
    parser.add_argument("workloads", nargs="*", metavar="workload",
                        help=f"any of: {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated, from {','.join(SYSTEMS)} (default: all)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repetitions of each measurement (default 3, 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and one repetition: a smoke run")
    parser.add_argument("--json", default=DEFAULT_JSON, metavar="PATH",
                        help="where to write the results (default benchmarks/results/latest.json)")
    parser.add_argument("--deadline-scale", type=float, default=1.0,
                        help="multiply every deadline (for slow machines)")
    args = parser.parse_args(argv)
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    args.workloads = args.workloads or list(WORKLOADS)
    chosen = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SYSTEMS]
    args.systems = [s for s in SYSTEMS if s in chosen]
    if bad or not args.systems:
        parser.error(f"unknown system(s) {bad}; choose from {', '.join(SYSTEMS)}")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


# ---------------------------------------------------------------------------- running

def _systems_for(workload: Workload, systems: list[str]) -> list[str]:
    chosen = [s for s in systems if s in workload.systems]
    if workload.floor is not None:
        chosen.append(FLOOR)
    return chosen


def _backstop(workload: Workload, n_systems: int, repeat: int, scale: float) -> float:
    per = workload.start_deadline + workload.measure_deadline + 120
    return (per * n_systems * repeat + 120) * scale


def run_workload(workload: Workload, systems: list[str], args: argparse.Namespace,
                 tmp: str, logdir: str) -> list[dict]:
    """Run one workload in a child process; return its JSON lines.

    The child's progress lines go to this process's stderr; its own stderr
    (library warnings and logs of the systems) goes to ``logdir/<workload>.log``.
    """
    out = os.path.join(tmp, f"{workload.name}.jsonl")
    pidfile = os.path.join(tmp, f"{workload.name}.pids")
    config = os.path.join(tmp, f"{workload.name}.json")
    sizes = workload.sizes(args.quick)
    with open(config, "w", encoding="utf-8") as f:
        json.dump({"workload": workload.name, "systems": systems, "repeat": args.repeat,
                   "sizes": sizes, "out": out, "pidfile": pidfile,
                   "scale": args.deadline_scale}, f)
    open(out, "w").close()
    open(pidfile, "w").close()
    os.makedirs(logdir, exist_ok=True)
    log_path = os.path.join(logdir, f"{workload.name}.log")
    with open(log_path, "wb") as log:
        child = subprocess.Popen([sys.executable, "-m", "benchmarks.child", config], cwd=ROOT,
                                 stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=log)
    child_id = {child.pid: procs.start_time(child.pid)}
    problem = None
    try:
        child.wait(_backstop(workload, len(systems), args.repeat, args.deadline_scale))
        if child.returncode == 130:
            raise KeyboardInterrupt("workload process interrupted")
        if child.returncode:
            problem = f"workload process exited with code {child.returncode}"
    except subprocess.TimeoutExpired:
        problem = "workload process ran past its deadline and was stopped"
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        procs.stop({p: t for p, t in child_id.items() if t is not None})
        procs.stop(_read_pids(pidfile), grace=5)
    entries = _read_lines(out)
    if problem:
        entries.append({"system": None, "rep": None, "error": f"{problem} (log: {log_path})"})
    for entry in entries:
        entry["workload"] = workload.name
    return entries


def _read_pids(path: str) -> dict[int, int]:
    found = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            pid, started = line.split()
            found[int(pid)] = int(started)
    return found


def _read_lines(path: str) -> list[dict]:
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut short by a kill
    return entries


# ---------------------------------------------------------------------------- aggregating

def summarize(workload: Workload, systems: list[str], entries: list[dict],
              sizes: dict) -> dict:
    """Samples, medians, ratios (minidist / each other column) and target checks."""
    samples: dict[str, dict[str, list[float]]] = {s: {} for s in systems}
    notes: dict[str, list[str]] = {}
    for e in entries:
        name = e.get("system") or "workload"
        for metric, value in (e.get("metrics") or {}).items():
            samples.setdefault(name, {}).setdefault(metric, []).append(value)
        for key in ("error", "unavailable"):
            if e.get(key):
                notes.setdefault(name, []).append(f"{key}: {e[key]}")
        for metric, why in (e.get("skipped") or {}).items():
            notes.setdefault(name, []).append(f"{metric} n/a: {why}")
        if e.get("leftover_processes"):
            notes.setdefault(name, []).append(
                f"left processes {e['leftover_processes']} (killed {e.get('killed')})")
    medians = {s: {m: statistics.median(v) for m, v in ms.items() if v}
               for s, ms in samples.items()}
    if workload.ideal is not None:
        medians[IDEAL] = workload.ideal(sizes)
    ratios: dict[str, dict[str, float]] = {}
    mine = medians.get("minidist", {})
    for metric in workload.metrics:
        if metric.name not in mine:
            continue
        for other, values in medians.items():
            if other != "minidist" and values.get(metric.name):
                ratios.setdefault(metric.name, {})[other] = \
                    mine[metric.name] / values[metric.name]
    checks = []
    for target in workload.targets:
        if target.reference is None:
            value = mine.get(target.metric)
        elif target.reference_metric:
            base = medians.get(target.reference, {}).get(target.reference_metric)
            value = mine[target.metric] / base if base and target.metric in mine else None
        else:
            value = ratios.get(target.metric, {}).get(target.reference)
        checks.append({"metric": target.metric, "target": target.text(), "value": value,
                       "pass": None if value is None else target.check(value)})
    return {"description": workload.description, "sizes": sizes, "systems": systems,
            "samples": samples, "medians": medians, "ratios": ratios, "targets": checks,
            "notes": {k: sorted(set(v)) for k, v in notes.items()}, "spread": workload.spread,
            "units": {m.name: m.unit for m in workload.metrics}}


# ---------------------------------------------------------------------------- printing

def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _spread(result: dict, column: str, metric: str) -> str:
    """`` (min-max)`` of a metric's samples, for workloads that show their spread."""
    values = result["samples"].get(column, {}).get(metric, [])
    if not result.get("spread") or len(values) < 2:
        return ""
    return f" ({_fmt(min(values))}-{_fmt(max(values))})"


def table(results: dict, systems: list[str]) -> str:
    """The readable table: one row per metric, medians per column, minidist's ratios, targets."""
    columns = [c for c in [*systems, FLOOR, IDEAL]
               if any(c in r["medians"] or c in r["systems"] for r in results.values())]
    others = [c for c in columns if c != "minidist"]
    header = ["workload", "metric", "unit", *[SHORT[c] for c in columns],
              *([f"md/{SHORT[c]}" for c in others] if "minidist" in columns else []),
              "target", "result"]
    rows = [header]
    for name, r in results.items():
        for metric, unit in r["units"].items():
            cells = [name, metric, unit]
            for c in columns:
                if metric in r["medians"].get(c, {}):
                    cells.append(_fmt(r["medians"][c][metric]) + _spread(r, c, metric))
                else:
                    cells.append("n/a" if c in r["systems"] else "")
            if "minidist" in columns:
                ratios = r["ratios"].get(metric, {})
                cells += [_fmt(ratios[c]) if c in ratios else "" for c in others]
            checks = [t for t in r["targets"] if t["metric"] == metric]
            cells.append("; ".join(t["target"] for t in checks))
            cells.append(" ".join("n/a" if t["pass"] is None else
                                  ("PASS" if t["pass"] else "FAIL") for t in checks))
            rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {name}/{who}: {n}" for name, r in results.items()
             for who, ns in r["notes"].items() for n in ns]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def meta(args: argparse.Namespace, started: float, load_before: tuple) -> dict:
    """What the run was: command, machine, versions, load."""
    versions = {}
    for module in ("minidist", "dask", "distributed", "numpy", "cloudpickle"):
        try:
            versions[module] = getattr(__import__(module), "__version__", "?")
        except ImportError:
            versions[module] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "repeat": args.repeat, "quick": args.quick, "commit": commit,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "versions": versions, "setup": SETUP}


# ---------------------------------------------------------------------------- main

def _on_term(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _compile_bytecode() -> None:
    """Byte-compile minidist and the task module, as installing a package does.

    pip compiled dask and distributed when it installed them.  An editable
    minidist is compiled on first import, unless ``PYTHONDONTWRITEBYTECODE``
    is set: then every process a cluster starts would compile it from source
    again (about 50 ms each), which no installed minidist does.
    """
    import minidist
    for directory in (os.path.dirname(minidist.__file__), os.path.join(ROOT, "benchmarks")):
        compileall.compile_dir(directory, quiet=1)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen workloads and systems; print the table; write the JSON."""
    args = parse_args(argv)
    _compile_bytecode()
    signal.signal(signal.SIGTERM, _on_term)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    started = time.time()
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    interrupted = False
    logdir = os.path.join(os.path.dirname(os.path.abspath(args.json)) if args.json else
                          tempfile.gettempdir(), "logs")
    with tempfile.TemporaryDirectory(prefix="minidist-bench-") as tmp:
        for name in args.workloads:
            workload = WORKLOADS[name]
            systems = _systems_for(workload, args.systems)
            print(f"{name}: {', '.join(systems)} x {args.repeat}", file=sys.stderr,
                  flush=True)
            try:
                entries = run_workload(workload, systems, args, tmp, logdir)
            except KeyboardInterrupt:
                interrupted = True
                entries = _read_lines(os.path.join(tmp, f"{name}.jsonl"))
                entries.append({"system": None, "error": "interrupted"})
            results[name] = summarize(workload, systems, entries,
                                      workload.sizes(args.quick))
            if interrupted:
                break
    report = {"meta": meta(args, started, load_before), "workloads": results}
    print(table(results, args.systems))
    print(f"\n{'quick' if args.quick else 'full'} run, {args.repeat} repetition(s), "
          f"{report['meta']['duration_s']}s, load average before/after "
          f"{load_before[0]:.2f}/{report['meta']['loadavg_after'][0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"results written to {args.json}")
    return 130 if interrupted else 0
