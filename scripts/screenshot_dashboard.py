"""Make docs/dashboard.png: the dashboard of a LocalCluster in the middle of a real job.

    PYTHONPATH=. python3 scripts/screenshot_dashboard.py [docs/dashboard.png]

Needs Debian's ``chromium``.  The job: a few hundred tasks of four prefixes
on 2 workers x 2 threads, one of which raises; the picture is taken while
it runs.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time

from minidist import Client, LocalCluster


def load(i):
    time.sleep(random.uniform(0.02, 0.06))
    return list(range(i % 50))


def clean(xs):
    time.sleep(random.uniform(0.01, 0.08))
    return [x * 2 for x in xs]


def total(xs):
    time.sleep(0.03)
    if len(xs) == 37:
        raise ValueError("a bad record in partition 37")
    return sum(xs)


def combine(*parts):
    time.sleep(0.2)
    return sum(parts)


def main(path: str = "docs/dashboard.png") -> None:
    with LocalCluster(n_workers=2, threads_per_worker=2, dashboard_port=0) as cluster, \
            Client(cluster, set_as_default=False) as client:
        loaded = client.map(load, range(400))
        cleaned = client.map(clean, loaded)
        totals = client.map(total, cleaned)
        groups = [client.submit(combine, *totals[i:i + 20], pure=False) for i in range(0, 400, 20)]
        time.sleep(6)  # well into the job: some prefixes done, others running
        with tempfile.TemporaryDirectory() as profile:
            cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                   "--disable-background-networking", "--disable-component-update",
                   "--disable-sync", "--no-first-run", "--disable-quic", "--hide-scrollbars",
                   f"--user-data-dir={profile}", "--window-size=1200,860",
                   "--virtual-time-budget=1500", f"--screenshot={os.path.abspath(path)}",
                   cluster.dashboard_link]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                proc.wait(60)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        client.cancel(groups)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main(*sys.argv[1:])
