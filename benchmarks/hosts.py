"""Throughput, latency and transfers with the cluster on separate hosts (network namespaces) and on loopback.

    python -m benchmarks.hosts [--quick] [--repeat N]        (as root, with iproute2)

The same cluster, a center and two single-thread workers, with one Client,
runs the ``throughput``, ``latency`` and ``bandwidth`` workloads of
``workloads.py`` twice:

* ``loopback``: every process on 127.0.0.1, as ``LocalCluster`` runs them;
* ``hosts``: the center, each worker and the client in a network namespace
  of its own, joined by veth pairs to a bridge on a private /24
  (``10.201.X.0/24``), each process dialled at its host's address.  The
  difference is what separate network stacks cost (veth and bridge hops,
  no added latency or bandwidth limit), with the same two cores.

The client runs in a child process (``--client ADDRESS``) that prints one
JSON line per repetition; the table shows the median.  Beside the cluster,
a raw socket (``floor.py``) sends and receives the same 256 MB between the
client's host and one more host of its own, as the floor for the transfers.
Every process is ended by PID and every namespace, link and bridge removed
on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ("throughput", "latency", "bandwidth")
SOCKET_METRICS = ("send", "receive", "fresh_send", "fresh_receive")  # MB/s, from floor.py


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class Hosts:
    """A bridge and one namespace per host on it; ``close()`` removes them."""

    def __init__(self) -> None:
        self.prefix = "mb" + uuid.uuid4().hex[:4]
        self.bridge = self.prefix + "br"
        used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        self.subnet = "10.201.%d" % random.choice(
            [x for x in range(256) if f"10.201.{x}." not in used])
        self.names: list[str] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")

    def add(self, name: str) -> tuple[str, str]:
        """A new host: returns its namespace and address."""
        ns, addr = self.prefix + name, f"{self.subnet}.{len(self.names) + 1}"
        self.names.append(ns)
        _ip("netns", "add", ns)
        _ip("link", "add", ns + "h", "type", "veth", "peer", "name", ns + "n")
        _ip("link", "set", ns + "n", "netns", ns)
        _ip("link", "set", ns + "h", "master", self.bridge)
        _ip("link", "set", ns + "h", "up")
        _ip("-n", ns, "addr", "add", addr + "/24", "dev", ns + "n")
        _ip("-n", ns, "link", "set", ns + "n", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns, addr

    def close(self) -> None:
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def _start(prefix: list[str], role: str, *args: str) -> tuple[subprocess.Popen, str]:
    """Start a center or worker; return it and the address in its first ready line."""
    proc = subprocess.Popen([*prefix, sys.executable, "-m", f"minidist.{role}", *args],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if role == "worker":
        proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{role} did not start ({proc.wait()})")
    return proc, line.split()[-1]


def run_mode(mode: str, args: argparse.Namespace) -> list[dict]:
    """Start the cluster for ``mode``, run the client child, return its results."""
    hosts = Hosts() if mode == "hosts" else None
    procs: list[subprocess.Popen] = []
    try:
        def where(name: str) -> tuple[list[str], list[str], str]:
            """How to run a process on a new host: command prefix, bind options, address."""
            if hosts is None:
                return [], ["--host", "127.0.0.1"], "127.0.0.1"
            ns, addr = hosts.add(name)
            return ["ip", "netns", "exec", ns], [], addr
        prefix, bind, _ = where("c")
        center, address = _start(prefix, "center", "--port", "0", *bind)
        procs.append(center)
        for i in range(2):
            prefix, bind, _ = where(f"w{i}")
            procs.append(_start(prefix, "worker", address, "--nthreads", "1", *bind)[0])
        floor_prefix, _, floor_host = where("fl")  # the raw socket's peer: a host of its own
        prefix, _, _ = where("cl")
        cmd = [*prefix, sys.executable, "-m", "benchmarks.hosts", "--client", address,
               "--floor", floor_host, *(["--floor-netns", floor_prefix[-1]] if floor_prefix else []),
               "--repeat", str(args.repeat)] + (["--quick"] if args.quick else [])
        client = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        procs.append(client)
        out, _ = client.communicate(timeout=1800)
        if client.returncode:
            raise RuntimeError(f"the client failed ({client.returncode})")
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    finally:
        for p in reversed(procs):  # the client, the workers, then the center
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if hosts is not None:
            hosts.close()


def client_main(address: str, args: argparse.Namespace) -> None:
    """In the client's host: warm up, then each workload ``--repeat`` times, one JSON line each.

    Each bandwidth repetition is followed by one of the raw socket's, between
    this host and the floor's (``--floor``, in namespace ``--floor-netns``).
    """
    from benchmarks import systems, workloads
    from benchmarks.floor import SocketFloor

    class Attached(systems.Minidist):
        def start(self, n_workers: int = 2, payload_size: int | None = None) -> None:
            from minidist import Client
            self.client = Client(address, set_as_default=False)

    system = Attached()
    floor = SocketFloor(args.floor, ("ip", "netns", "exec", args.floor_netns)
                        if args.floor_netns else ())
    system.start()
    floor.start()
    try:
        for name in WORKLOADS:
            w = workloads.WORKLOADS[name]
            sizes = w.sizes(args.quick)
            (w.warmup or workloads.default_warmup)(system, sizes)
            for _ in range(args.repeat):
                system.settle()
                print(json.dumps({"workload": name, **w.measure(system, sizes)}), flush=True)
                if name == "bandwidth":
                    f = workloads.floor_bandwidth(floor, sizes)
                    f["send"], f["receive"] = f["scatter_numpy"], f["gather_numpy"]
                    print(json.dumps({"workload": "socket", **{m: f[m] for m in SOCKET_METRICS}}),
                          flush=True)
    finally:
        floor.close()
        system.client.close()


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _table(results: dict[str, list[dict]]) -> str:
    """Median of each metric per mode; transfers also with their lowest and highest."""
    from benchmarks.workloads import WORKLOADS as ALL
    metrics = [(name, m.name, m.unit) for name in WORKLOADS for m in ALL[name].metrics
               if not m.name.startswith("fresh_")]  # the floor's, shown under "socket"
    metrics += [("socket", m, "MB/s") for m in SOCKET_METRICS]
    rows = [f"{'metric':<34}" + "".join(f"{mode:>24}" for mode in results)]
    for workload, metric, unit in metrics:
        cells = []
        for entries in results.values():
            values = [e[metric] for e in entries if e["workload"] == workload]
            cell = _number(statistics.median(values)) if values else "-"
            if workload in ("bandwidth", "socket") and len(values) > 1:
                cell += f" ({_number(min(values))}-{_number(max(values))})"
            cells.append(f"{cell:>24}")
        rows.append(f"{workload + ' ' + metric + ' (' + unit + ')':<34}" + "".join(cells))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hosts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", default="loopback,hosts")
    parser.add_argument("--client", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--floor", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--floor-netns", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        client_main(args.client, args)
        return 0
    if os.geteuid() != 0:
        print("benchmarks.hosts needs root to create network namespaces", file=sys.stderr)
        return 2
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    os.environ.setdefault("MINIDIST_AUTH_KEY", secrets.token_hex(16))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # still clean up
    results: dict[str, list[dict]] = {}
    for mode in args.modes.split(","):
        t0 = time.monotonic()
        results[mode] = run_mode(mode, args)
        print(f"{mode}: {time.monotonic() - t0:.0f}s", file=sys.stderr)
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
