"""Processes on Linux: descendants, identity across PID reuse, memory, stopping by PID."""

from __future__ import annotations

import os
import signal
import time


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (identifies it across PID reuse), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in (b"Z", b"X"):
        return None  # exited, not yet reaped
    return int(fields[19])


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def descendants(root: int | None = None) -> dict[int, int]:
    """Live descendants of ``root`` (default: this process) as ``{pid: start_time}``."""
    root = root or os.getpid()
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = _parent(int(entry))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry))
    found: dict[int, int] = {}
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            started = start_time(child)
            if started is not None and child not in found:
                found[child] = started
                stack.append(child)
    return found


def command(pid: int) -> str:
    """The command line of ``pid`` ("" if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_resource_tracker(pid: int) -> bool:
    """True for multiprocessing's resource tracker, which lives as long as its interpreter."""
    return "multiprocessing.resource_tracker" in command(pid)


def alive(pid: int, started: int) -> bool:
    """True if the process ``pid`` that started at ``started`` still runs."""
    return start_time(pid) == started


def stop(procs: dict[int, int], grace: float = 5.0) -> list[int]:
    """SIGTERM the still-running ``{pid: start_time}``, SIGKILL them after ``grace``.

    Returns the PIDs that had to be killed.
    """
    def signal_all(sig: int) -> list[int]:
        hit = []
        for pid, started in procs.items():
            if alive(pid, started):
                try:
                    os.kill(pid, sig)
                    hit.append(pid)
                except ProcessLookupError:
                    pass
        return hit

    if not signal_all(signal.SIGTERM):
        return []
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(procs)
        if not any(alive(p, s) for p, s in procs.items()):
            return []
        time.sleep(0.05)
    killed = signal_all(signal.SIGKILL)
    time.sleep(0.05)
    _reap(procs)
    return killed


def _reap(procs: dict[int, int]) -> None:
    """Collect those of ``procs`` that are exited children of this process (no zombies)."""
    for pid in procs:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def memory(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid`` in bytes, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> bool:
    """Reset ``VmHWM`` of ``pid`` to its current RSS (Linux ``clear_refs``); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
