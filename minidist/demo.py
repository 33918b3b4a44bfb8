"""``python -m minidist.demo``: a real multi-step computation on a fresh local cluster.

Starts a LocalCluster (a center and two workers as separate processes),
scatters data, computes on it with futures that depend on futures, gathers
the answers, checks them against a local computation, prints the results
and the time taken, and shuts everything down.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from .cluster import LocalCluster
from .executor import Client


def word_lengths(text: str) -> list[int]:
    return [len(word) for word in text.split()]


def histogram(lengths: list[int]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for n in lengths:
        counts[n] = counts.get(n, 0) + 1
    return counts


def merge(histograms: list[dict[int, int]]) -> dict[int, int]:
    total: dict[int, int] = {}
    for h in histograms:
        for n, count in h.items():
            total[n] = total.get(n, 0) + count
    return dict(sorted(total.items()))


def collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n = 3 * n + 1 if n % 2 else n // 2
        steps += 1
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minidist.demo")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    text = open(__file__, encoding="utf-8").read()
    documents = [text[i:i + 400] for i in range(0, len(text), 400)]

    started = time.perf_counter()
    with LocalCluster(n_workers=args.workers) as cluster:
        up = time.perf_counter() - started
        with Client(cluster) as client:
            # 1. scatter local data; 2. map over it remotely; 3. map over those futures;
            # 4. reduce on the cluster; 5. gather only the small answer.
            docs = client.scatter(documents)
            lengths = client.map(word_lengths, docs)
            hists = client.map(histogram, lengths)
            total = client.submit(merge, hists)
            steps = client.map(collatz_steps, range(1, 20001))
            longest = client.submit(max, steps)
            result = total.result()
            longest_chain = longest.result()
            mean_steps = statistics.mean(client.gather(steps))
            workers = sorted(client.nthreads())
        elapsed = time.perf_counter() - started

    expected = merge([histogram(word_lengths(d)) for d in documents])
    ok = result == expected and longest_chain == max(map(collatz_steps, range(1, 20001)))
    print(f"cluster: center + {len(workers)} workers ({', '.join(workers)}), up in {up:.2f}s")
    print(f"word-length histogram of {len(documents)} scattered chunks: {result}")
    print(f"longest Collatz chain below 20001: {longest_chain} steps "
          f"(mean {mean_steps:.1f}) over 20,000 tasks")
    print(f"checked against a local computation: {'OK' if ok else 'MISMATCH'}")
    print(f"total time: {elapsed:.2f}s (pid {os.getpid()}, all cluster processes stopped)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
