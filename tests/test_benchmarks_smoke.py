"""The benchmark suite runs end to end in quick mode (its numbers are never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(240)
def test_quick_benchmark_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "throughput", "latency", "--systems", "minidist",
         "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["workload", "metric", "unit", "minidist"], proc.stdout
    rows = {tuple(line.split()[:2]) for line in lines[2:]}
    for row in [("throughput", "submit_each"), ("throughput", "bulk_map"),
                ("latency", "median"), ("latency", "p99")]:
        assert row in rows, proc.stdout
    report = json.loads(out.read_text())
    for workload, metrics in [("throughput", ["submit_each", "bulk_map"]),
                              ("latency", ["median", "p99"])]:
        medians = report["workloads"][workload]["medians"]["minidist"]
        assert sorted(medians) == sorted(metrics), report["workloads"][workload]
        assert all(value > 0 for value in medians.values())
        assert not report["workloads"][workload]["notes"].get("minidist"), \
            report["workloads"][workload]["notes"]


@pytest.mark.multihost
@pytest.mark.timeout(300)
def test_hosts_benchmark_runs_on_loopback_and_across_namespaces():
    """``benchmarks.hosts --quick`` fills every row for both modes and leaves no namespace behind."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")

    def namespaces() -> set[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return {line.split()[0] for line in out.splitlines() if line.strip()}

    before = namespaces()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.hosts", "--quick", "--repeat", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["metric", "loopback", "hosts"], proc.stdout
    rows = {" ".join(line.split()[:2]): line.split()[-2:] for line in lines[1:]}
    for kind in ("numpy", "bytes"):
        for op in ("scatter", "gather", "move"):
            assert f"bandwidth {op}_{kind}" in rows, proc.stdout
    for metric in ("send", "receive", "fresh_send", "fresh_receive"):
        assert f"socket {metric}" in rows, proc.stdout
    assert "throughput submit_each" in rows and "latency median" in rows, proc.stdout
    for name, cells in rows.items():
        for cell in cells:
            assert float(cell.replace(",", "")) > 0, f"{name}: {cell}\n{proc.stdout}"
    assert namespaces() <= before, proc.stdout
