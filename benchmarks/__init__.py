"""Benchmarks: minidist side by side with ProcessPoolExecutor, multiprocessing.Pool
and dask.distributed, plus a raw loopback-socket floor.

Run ``python -m benchmarks --help`` from the project root; see ``benchmarks/README.md``.
"""
