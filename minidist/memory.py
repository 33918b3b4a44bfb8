"""A worker's memory: sizes of values, the limit, spilling to disk, pausing, giving back.

Each worker holds its results in a ``SpillBuffer`` (a mapping the worker
uses as its ``data`` dict) and runs a ``MemoryManager`` beside its task
threads.  The thresholds are fractions of the worker's memory limit
(``dworker --memory-limit``), as in dask.distributed::

  managed bytes > TARGET (60%)  --> spill least-recently-used keys until below
  process RSS  > SPILL (70%)    --> spill LRU keys until RSS < TARGET (or none left)
  process RSS  > PAUSE (80%)    --> start no new task, tell the center
  process RSS  < RESUME (75%)   --> resume (paused); also below PAUSE once nothing is left
                                    to spill and it has been paused STUCK_RESUME_AFTER (1 s),
                                    and above it after STUCK_RUN_AFTER (5 s): never stuck
  process RSS  > TERMINATE (95%) --> the nanny kills the worker and starts a new one

The gap between PAUSE and RESUME keeps a worker whose RSS hovers at the
pause line from flapping (each flip is a message to the center).  A
worker whose memory between the lines is not results (a library's
caches, fragmentation: nothing it could spill) would wait there forever,
and with every worker in that state a job would hang: it resumes below
the pause line, as dask.distributed does, but not sooner than a second
after it paused, so even then it flips at most once a second.

The data flow of one key::

  task thread --put(key, value, nbytes)--> fast (dict, LRU order)
      over the target: the task thread spills before its next task (the producer pays),
      and the spill thread is woken for data that arrived otherwise (peers, scatter)
  spilling: pick LRU key -> serialize (protocol 5, buffers out of band) -> write a new file
            (0600, O_EXCL, each frame flagged bytes / bytearray / writable memory)
            -> under the lock, if the key still holds that value: move it to slow
  task thread --data[key]--> fast? value : read file -> unpickle -> back into fast
  get_data    --serialized(key)--> fast? value : the file's frames as they are (no unpickling),
              spilled keys worth at most READ_BUDGET of the limit per reply, the rest "later"
  reading a file: it must be the very file written (device, inode, size) before a byte of it
              is used; each frame comes back as it was, so a value comes back as itself
              (bytes as bytes, a bytearray as a bytearray, arrays writable or not as they were)
  a file gone, replaced or damaged: SpillError naming the key, nothing unpickled;
              the worker drops the key and reports it lost (``lost_data``) to the center

The lock guards only the two dicts; every read, write and (un)pickling
happens outside it, so spilling never blocks another thread's access to
other keys (nor to the key being spilled: it stays in ``fast`` until its
file is complete).  A key whose file cannot be written
(disk full, no fresh directory can be made) stays in memory; the error is
logged, kept in ``error`` and reported to the center, and spilling is
retried after a pause.

The files live in a ``LocalDirectory``: a directory of the worker's own,
made private (0700, an unpredictable name) inside ``--local-directory``
and held open, every file operation relative to it, so nobody else can
read a spilled value, plant a file for the worker to unpickle, or point
the worker's writes elsewhere with a link.  If it is deleted (someone
emptied tmp), the next spill makes a fresh one (once logged; keys spilled
there are lost), never trusting whatever now sits at the old path.  The
worker holds a lock on a file inside while it lives; a directory whose
lock is free belongs to a dead worker, and the next worker to start in the
same place removes it (and a nanny removes its dead worker's at once).

Sizes come from ``sizeof``, a ``functools.singledispatch`` function users
extend with ``minidist.sizeof.register(MyType)(fn)``.  The worker reports
the same number to the center as the key's ``nbytes``.

Giving memory back: freed memory often stays in glibc's arenas, so the
worker fixes glibc's mmap threshold at start (large buffers come from and
go back to the kernel directly) and calls ``malloc_trim(0)`` once it has
been idle for a moment after doing work.  The nanny's ``terminate_policy``
enforces the last threshold from outside the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import itertools
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import MutableMapping
from typing import Any, Literal
from collections.abc import Callable, Iterator

from . import wire

logger = logging.getLogger("minidist.memory")

TARGET = 0.60
"""Managed bytes above this fraction of the limit are spilled, least recently used first."""

SPILL = 0.70
"""Process RSS above this fraction of the limit spills keys until RSS is below ``TARGET``."""

PAUSE = 0.80
"""Process RSS above this fraction of the limit pauses the worker: it starts no new task."""

RESUME = 0.75
"""A paused worker resumes once its RSS is below this fraction of the limit: a few points
under ``PAUSE``, so that a worker hovering at the pause line does not flap."""

STUCK_RESUME_AFTER = 1.0
"""Seconds after which a paused worker with nothing left to spill (or whose spilling fails)
resumes below ``PAUSE`` even though it is above ``RESUME``: waiting could not free memory."""

STUCK_RUN_AFTER = 5.0
"""Seconds after which a paused worker still above ``PAUSE`` with nothing left to spill runs
tasks again: its memory is not results, so waiting could never free it, and a worker that
never starts another task would hang every job that needs it.  It pauses again only if its
RSS grows by ``STUCK_GROWTH`` of the limit (or after it dropped below ``RESUME``); the
nanny still restarts it at ``TERMINATE``."""

STUCK_GROWTH = 0.05

TERMINATE = 0.95
"""Process RSS above this fraction of the limit makes the nanny kill and restart the worker."""

READ_BUDGET = 0.10
"""One ``get_data`` reply reads back from disk spilled keys worth at most this fraction of
the limit (at least one key); it names the rest as ``later``, and the caller asks again.
Serving a gather of everything a worker spilled must not take it past its limit."""

MONITOR_INTERVAL = 0.1
"""Seconds between two looks at the process's RSS."""

TASK_CHECK_INTERVAL = 0.005
"""A task thread reads the RSS before a task at most this often (a read costs about as much
as a no-op task), so short tasks cannot outrun the monitor by more than this."""

IDLE_TRIM_AFTER = 0.5
"""Seconds a worker must be idle, after doing work, before freed memory is trimmed."""

REPORT_INTERVAL = 0.5
"""At most this often the worker tells the center its memory figures (pausing: at once)."""

SPILL_RETRY = 5.0
"""Seconds before spilling is tried again after a file could not be written."""

MMAP_THRESHOLD = 4 << 20
"""Allocations at least this large come straight from the kernel and go straight back."""


# ---------------------------------------------------------------------- sizes


@functools.singledispatch
def sizeof(obj: Any) -> int:
    """Bytes held by ``obj``: what a worker counts as managed memory and reports as ``nbytes``.

    numpy arrays count their ``nbytes``, pandas objects their deep memory
    usage, bytes-likes their length, containers an estimate from a sample
    of up to 10 items.  Extend it for your own types::

        @minidist.sizeof.register(MyType)
        def _(obj): return obj.size_in_bytes()
    """
    if type(obj).__module__.startswith("pandas"):  # deep: object columns count their items
        try:
            total = obj.memory_usage(deep=True)
            return int(total if isinstance(total, int) else total.sum())
        except Exception:
            pass
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    try:
        return sys.getsizeof(obj)
    except Exception:
        return 64


@sizeof.register(bytes)
@sizeof.register(bytearray)
@sizeof.register(str)
def _sizeof_bytes(obj: Any) -> int:
    return len(obj)


@sizeof.register(memoryview)
def _sizeof_view(obj: memoryview) -> int:
    return obj.nbytes


_SAMPLE = 10


@sizeof.register(list)
@sizeof.register(tuple)
@sizeof.register(set)
@sizeof.register(frozenset)
def _sizeof_sequence(obj: Any) -> int:
    if not obj:
        return sys.getsizeof(obj)
    sample = obj[:_SAMPLE] if isinstance(obj, (list, tuple)) else \
        list(itertools.islice(obj, _SAMPLE))
    return sys.getsizeof(obj) + sum(sizeof(x) for x in sample) * len(obj) // len(sample)


@sizeof.register(dict)
def _sizeof_dict(obj: dict) -> int:
    if not obj:
        return sys.getsizeof(obj)
    sample = list(itertools.islice(obj.items(), _SAMPLE))
    return sys.getsizeof(obj) + sum(sizeof(k) + sizeof(v) for k, v in sample) \
        * len(obj) // len(sample)


# ---------------------------------------------------------------------- the limit


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def machine_memory() -> int:
    """Bytes of memory this process may use: MemTotal, or the cgroup's limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max",                     # cgroup v2
                 "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v1
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def parse_memory_limit(value: Any, nworkers: int = 1, total: int | None = None) -> int | None:
    """Bytes from ``4GB``, ``512MiB``, ``1e9``, ``0.25`` (of the machine) or ``auto``; None: off.

    ``auto`` is the machine's memory divided by ``nworkers``; ``0``,
    ``none`` and None turn the limit off.  Raises ``ValueError`` on
    anything else.

    Where a process's memory cannot be read (no ``/proc``: not Linux),
    pausing, spilling by resident size and the nanny's restart could never
    happen: ``auto`` then means no limit (logged), and any other limit is
    refused with ``ValueError``.
    """
    if value is None:
        return None
    limit = _parse_memory_limit(value, nworkers, total)
    if limit is not None and not rss_readable():
        if isinstance(value, str) and value.strip().lower() == "auto":
            logger.info("no memory limit: this platform has no /proc to read a process's "
                        "memory from")
            return None
        raise ValueError(f"memory limit {value!r} refused: this platform has no /proc to "
                         "read a worker's memory from, so it could not be enforced; "
                         "pass 'none'")
    return limit


def _parse_memory_limit(value: Any, nworkers: int = 1, total: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if text in ("none", "off", "0", ""):
            return None
        if text == "auto":
            return (total or machine_memory()) // max(1, nworkers)
        match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)([a-z]*)", text)
        if not match or match.group(2) not in _UNITS:
            raise ValueError(f"invalid memory limit {value!r}: expected bytes, a size like "
                             "'4GB' or '512MiB', a fraction of the machine like 0.25, "
                             "'auto' or 'none'")
        number, unit = float(match.group(1)), match.group(2)
        if not unit and number <= 1:
            return _parse_memory_limit(number, nworkers, total)
        return int(number * _UNITS[unit]) or None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"invalid memory limit {value!r}")
    if value < 0:
        raise ValueError(f"invalid memory limit {value!r}: negative")
    if value == 0:
        return None
    if value <= 1:  # a fraction of the machine
        return int((total or machine_memory()) * value)
    return int(value)


def format_bytes(n: float) -> str:
    """``123.4 MiB``, for log lines."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


_STATM = "/proc/{pid}/statm"
"""Where a process's resident size is read (Linux)."""


def rss_readable() -> bool:
    """Whether this platform lets a process's resident size be read (``/proc``)."""
    return process_rss() > 0


def process_rss(pid: int | str = "self") -> int:
    """Resident bytes of a process (``/proc/PID/statm``); 0 if it is gone or unknown."""
    try:
        with open(_STATM.format(pid=pid), "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def terminate_policy(limit: int, fraction: float = TERMINATE) -> Callable[[Any], Any]:
    """A nanny policy: kill (SIGKILL) a worker whose RSS is above ``fraction`` of ``limit``.

    SIGKILL, not SIGTERM: a worker this full may not manage a clean stop,
    and its death must count against the task it was running.
    """
    threshold = int(limit * fraction)

    def check(child: Any) -> tuple[str, int] | None:
        rss = process_rss(child.pid)
        if rss > threshold:
            return (f"memory use {format_bytes(rss)} is above {fraction:.0%} of its "
                    f"memory limit {format_bytes(limit)}", signal.SIGKILL)
        return None
    check.__qualname__ = f"terminate_policy({limit})"
    return check


# ---------------------------------------------------------------------- the allocator


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _ = libc.malloc_trim, libc.mallopt  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold, so freed large buffers go back to the kernel at once.

    glibc raises its threshold each time such a buffer is freed, after which
    same-sized buffers come from arenas that rarely shrink.  True if set.
    """
    if _LIBC is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(_LIBC.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD


def trim_memory() -> bool:
    """Give memory that glibc keeps in its arenas back to the kernel; True if some was."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))


# ---------------------------------------------------------------------- the buffer


_COUNT = struct.Struct("!Q")
_WRITABLE = 1 << 63   # length flag: the frame was writable memory (a numpy array's)
_BYTEARRAY = 1 << 62  # length flag: and a bytearray's, so it comes back as one
_FLAGS = _WRITABLE | _BYTEARRAY
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO never blocks


class _Spilled:
    """A key on disk: its file (a name in a directory held open), the size it had in
    memory, and what the file was when written (bytes, device and inode)."""

    __slots__ = ("dir_fd", "name", "nbytes", "disk_bytes", "dev", "ino")

    def __init__(self, dir_fd: int, name: str, nbytes: int, disk_bytes: int, dev: int,
                 ino: int) -> None:
        self.dir_fd, self.name, self.nbytes = dir_fd, name, nbytes
        self.disk_bytes, self.dev, self.ino = disk_bytes, dev, ino


class SpillError(OSError):
    """A key could not be written to (or read back from) the local directory.

    ``key`` is the key whose file could not be read back (None for a write).
    """

    def __init__(self, message: str, key: Any = None) -> None:
        super().__init__(message)
        self.key = key


def _frame_flags(view: memoryview) -> int:
    """The flags that bring a frame back as what it was: bytes, bytearray or writable memory."""
    if view.readonly:
        return 0
    return _WRITABLE | (_BYTEARRAY if wire._exporter(view) is bytearray else 0)


def _write_frames(dir_fd: int, name: str, value: wire.Serialized) -> tuple[int, int, int]:
    """Write a serialized value's frames to a new file ``name`` (0600, never through a link,
    never over an existing file) without copying them; (bytes written, device, inode)."""
    views = [memoryview(f).cast("B") for f in (value.header, *value.buffers)]
    head = _COUNT.pack(len(views)) + struct.pack(
        f"!{len(views)}Q", *(v.nbytes | (_frame_flags(v) if i else 0)
                             for i, v in enumerate(views)))
    fd = os.open(name, _CREATE, 0o600, dir_fd=dir_fd)
    with open(fd, "wb") as f:  # big writes bypass the buffer: no copy
        f.write(head)
        for view in views:
            f.write(view)
        f.flush()
        st = os.fstat(fd)
    return len(head) + sum(v.nbytes for v in views), st.st_dev, st.st_ino


def _read_frames(spilled: _Spilled) -> wire.Serialized:
    """Read back a file written by ``_write_frames``, if it is still the very file written.

    The file must be the same inode on the same device, with the size written:
    anything else (replaced, truncated, grown, a link) raises ``SpillError``
    before a byte of it is used.  Each frame comes back as it was: ``bytes``,
    a ``bytearray``, or fresh writable memory (a large one in a mapping the
    kernel populates in one go) for arrays.
    """
    with open(os.open(spilled.name, _OPEN, dir_fd=spilled.dir_fd), "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (spilled.dev, spilled.ino) \
                or st.st_size != spilled.disk_bytes:
            raise SpillError(f"spill file {spilled.name} is not the file this worker wrote "
                             f"(replaced or changed: {st.st_size} bytes, expected "
                             f"{spilled.disk_bytes}); not reading it")
        size = st.st_size
        count = _COUNT.unpack(_read_exactly(f, _COUNT.size))[0]
        if not 0 < count <= wire.MAX_FRAMES or _COUNT.size + 8 * count > size:
            raise SpillError(f"spill file {spilled.name} is damaged: bad frame count {count}")
        lengths = struct.unpack(f"!{count}Q", _read_exactly(f, 8 * count))
        sizes = [n & ~_FLAGS for n in lengths]
        if _COUNT.size + 8 * count + sum(sizes) != size:
            raise SpillError(f"spill file {spilled.name} is damaged: {size} bytes, expected "
                             f"{_COUNT.size + 8 * count + sum(sizes)}")
        frames = [_read_frame(f, n, flags) for n, flags in
                  zip(sizes, (length & _FLAGS for length in lengths), strict=True)]
    return wire.Serialized(frames[0], frames[1:])


def _read_frame(f: Any, n: int, flags: int) -> Any:
    if not flags & _WRITABLE:
        return _read_exactly(f, n)
    frame = bytearray(n) if flags & _BYTEARRAY else wire.fresh_buffer(n)
    view, done = memoryview(frame), 0
    while done < n:
        got = f.readinto(view[done:])
        if not got:
            raise SpillError(f"spill file {f.name} is truncated")
        done += got
    return frame


def _read_exactly(f: Any, n: int) -> bytes:
    data = f.read(n)
    while len(data) < n:  # a single read returns at most about 2 GiB
        more = f.read(n - len(data))
        if not more:
            raise SpillError(f"spill file {f.name} is truncated")
        data += more
    return data


class SpillBuffer(MutableMapping):
    """A worker's data: keys in memory (LRU order) and keys spilled to files in ``directory``.

    It is a mapping: ``buf[key]`` returns the value, reading it back from
    disk if it was spilled.  ``put`` stores with a known size,
    ``serialized`` gives what ``get_data`` sends without unpickling a
    spilled key, and ``spill_one`` (called by the manager's spill thread
    only) moves the least recently used key to disk.  ``on_over_target``
    is called when managed bytes pass ``target``.
    """

    def __init__(self, directory: LocalDirectory | None = None,
                 target: int | None = None) -> None:
        self.directory = directory
        self.target = target
        self.fast: OrderedDict[Any, Any] = OrderedDict()
        self.sizes: dict[Any, int] = {}
        self.slow: dict[Any, _Spilled] = {}
        self.kept: dict[Any, _Spilled] = {}  # keys read back into fast whose file stays valid
        self.managed = 0  # bytes of the keys in memory
        self.spilled = 0  # in-memory bytes of the keys on disk
        self.error: str | None = None  # the last spill failure, until a spill succeeds
        self.on_over_target: Callable[[], None] | None = None
        self.released = 0  # keys deleted so far (the manager trims after releases)
        self.spill_count = self.spill_bytes = self.unspill_count = 0
        self.spill_seconds = 0.0  # time spent pickling and writing
        self._pinned: set = set()  # keys that cannot be pickled: never spilled
        self._spilling: set = set()  # keys some thread is writing now
        self._names = itertools.count()
        self._lock = threading.Lock()

    # -- mapping

    def __getitem__(self, key: Any) -> Any:
        """The value of ``key``; a spilled key is read back into memory.

        Its file is kept, so evicting it again costs no write (values are
        not to be changed in place), and it goes in as the least recently
        used key: it is the cheapest to evict, and a key read back is
        usually needed by one task, unlike the results not spilled yet.
        """
        spilled: _Spilled | None  # None if the key changed while its file was read
        with self._lock:
            if key in self.fast:
                self.fast.move_to_end(key)
                return self.fast[key]
            spilled = self.slow[key]
        frames = self._read(key, spilled)
        try:
            value = wire.deserialize(frames)
        except Exception as e:  # this worker pickled it: the file was damaged
            raise self._unreadable(key, spilled, e) from e
        del frames
        with self._lock:
            if self.slow.get(key) is spilled:  # back into memory; its file is kept
                del self.slow[key]
                self.spilled -= spilled.nbytes
                self._insert(key, value, spilled.nbytes)
                self.fast.move_to_end(key, last=False)  # cold: evicting it again is free
                self.kept[key] = spilled
                self.unspill_count += 1
            else:
                spilled = None  # deleted or stored again meanwhile
        if spilled is not None:
            self._check_target()
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        self.put(key, value, sizeof(value))

    def __delitem__(self, key: Any) -> None:
        with self._lock:
            spilled = self._remove(key)
            if spilled is False:
                raise KeyError(key)
            self.released += 1
        if spilled is not None:
            _unlink(spilled)

    def __contains__(self, key: object) -> bool:
        return key in self.fast or key in self.slow

    def __iter__(self) -> Iterator:
        with self._lock:
            return iter([*self.fast, *self.slow])

    def __len__(self) -> int:
        return len(self.fast) + len(self.slow)

    def discard(self, key: Any) -> None:
        """Delete ``key`` if held, without reading it back from disk."""
        try:
            del self[key]
        except KeyError:
            pass

    # -- the worker's entry points

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        """Store ``value`` (of ``nbytes``) in memory, replacing any copy in memory or on disk."""
        with self._lock:
            spilled = self._remove(key)
            self._insert(key, value, nbytes)
        if spilled:
            _unlink(spilled)
        self._check_target()

    def serialized(self, key: Any) -> tuple[bool, Any]:
        """``(True, value)`` for a key in memory, ``(False, Serialized)`` read from its file.

        Raises KeyError for a key this buffer does not hold.
        """
        with self._lock:
            if key in self.fast:
                self.fast.move_to_end(key)
                return True, self.fast[key]
            spilled = self.slow[key]
        return False, self._read(key, spilled)

    def on_disk(self, key: Any) -> int:
        """In-memory bytes of ``key`` if it is spilled (reading it costs that much), else 0."""
        spilled = self.slow.get(key)
        return spilled.nbytes if spilled is not None else 0

    def spillable(self) -> bool:
        """Whether some key in memory could be spilled (not pinned, not being written)."""
        with self._lock:
            return any(k not in self._pinned and k not in self._spilling for k in self.fast)

    def spill_kept(self) -> int:
        """Drop from memory a key read back whose file is still valid; bytes freed (0: none).

        It costs no write, so it works when the disk does not (full, gone).
        """
        with self._lock:
            key = next((k for k in self.kept if k not in self._spilling), _NOTHING)
            if key is _NOTHING:
                return 0
            return self._evict_kept(key)

    def _evict_kept(self, key: Any) -> int:
        nbytes = self.sizes.pop(key)
        del self.fast[key]
        self.managed -= nbytes
        self.slow[key] = self.kept.pop(key)
        self.spilled += nbytes
        return nbytes

    def spill_one(self) -> int:
        """Write the least recently used key to disk; bytes freed (0: nothing to spill).

        Raises ``SpillError`` when the file cannot be written; the key stays in memory.
        """
        with self._lock:
            key = next((k for k in self.fast if k not in self._pinned
                        and k not in self._spilling), _NOTHING)
            if key is _NOTHING:
                return 0
            if key in self.kept:  # read back earlier and its file kept: nothing to write
                return self._evict_kept(key)
            value, nbytes = self.fast[key], self.sizes[key]
            self._spilling.add(key)
        try:
            return self._spill(key, value, nbytes)
        finally:
            with self._lock:
                self._spilling.discard(key)

    def _spill(self, key: Any, value: Any, nbytes: int) -> int:
        start = time.perf_counter()
        try:
            frames = wire.serialize(value)
        except BaseException as e:  # noqa: B036 - an odd __reduce__ must not stop the thread
            logger.warning("cannot spill %r (%s): %s; keeping it in memory",
                           key, type(value).__qualname__, e)
            with self._lock:
                self._pinned.add(key)
            return -1
        spilled: _Spilled | None  # None once the file is on record in ``slow``
        try:
            spilled = self._write(nbytes, frames)
        finally:
            del frames
        written = spilled.disk_bytes
        with self._lock:
            if self.fast.get(key, _NOTHING) is value:
                del self.fast[key]
                del self.sizes[key]
                self.managed -= nbytes
                self.slow[key] = spilled
                self.spilled += nbytes
                spilled = None
        if spilled is not None:  # deleted or replaced while it was written
            _unlink(spilled)
            return -1
        self.error = None
        self.spill_count += 1
        self.spill_bytes += written
        self.spill_seconds += time.perf_counter() - start
        return nbytes

    def _write(self, nbytes: int, frames: wire.Serialized) -> _Spilled:
        """Write ``frames`` to a new file in the directory, made afresh if it vanished."""
        directory = self.directory
        if directory is None:
            raise SpillError("cannot spill: no local directory")
        dir_fd = directory.fd
        name = f"{next(self._names)}.spill"
        try:
            try:
                written, dev, ino = _write_frames(dir_fd, name, frames)
            except FileNotFoundError:  # the directory was deleted under us
                if not directory.renew(dir_fd):
                    raise
                self._forget_kept_files(directory.fd)
                dir_fd = directory.fd
                written, dev, ino = _write_frames(dir_fd, name, frames)
        except OSError as e:
            _unlink_name(dir_fd, name)
            self.error = f"cannot spill to {directory.path}: {e}"
            raise SpillError(self.error) from e
        return _Spilled(dir_fd, name, nbytes, written, dev, ino)

    def _forget_kept_files(self, dir_fd: int) -> None:
        """Keys read back from a directory that is gone keep no file: evicting them writes."""
        with self._lock:
            for key in [k for k, s in self.kept.items() if s.dir_fd != dir_fd]:
                del self.kept[key]

    # -- internals (the _lock held)

    def _insert(self, key: Any, value: Any, nbytes: int) -> None:
        self.fast[key] = value
        self.sizes[key] = nbytes
        self.managed += nbytes

    def _remove(self, key: Any) -> _Spilled | None | Literal[False]:
        """Drop ``key``: its _Spilled record if it has a file, None if not, False if not held."""
        if key in self.fast:
            del self.fast[key]
            self.managed -= self.sizes.pop(key)
            self._pinned.discard(key)
            return self.kept.pop(key, None)
        spilled = self.slow.pop(key, None)
        if spilled is None:
            return False
        self.spilled -= spilled.nbytes
        return spilled

    def over_target(self) -> bool:
        """Whether the bytes in memory are above ``target`` (never without a target)."""
        return self.target is not None and self.managed > self.target

    def _check_target(self) -> None:
        if self.over_target() and self.on_over_target:
            self.on_over_target()

    def _read(self, key: Any, spilled: _Spilled) -> wire.Serialized:
        try:
            return _read_frames(spilled)
        except OSError as e:
            if key not in self:
                raise KeyError(key) from None  # deleted while we read
            raise self._unreadable(key, spilled, e) from e

    def _unreadable(self, key: Any, spilled: _Spilled, error: Exception) -> SpillError:
        path = self._path(spilled)
        logger.error("cannot read spilled key %r back from %s: %s", key, path, error)
        return SpillError(f"cannot read spilled key {key!r} back from {path}: "
                          f"{error}", key)

    def _path(self, spilled: _Spilled) -> str:
        """The file's path, for messages."""
        directory = self.directory
        where = directory.path_of(spilled.dir_fd) if directory is not None else "?"
        return os.path.join(where, spilled.name)

    def clear_files(self) -> None:
        """Forget every spilled key (the directory is going away)."""
        with self._lock:
            self.slow.clear()
            self.kept.clear()
            self.spilled = 0


_NOTHING = object()


def _unlink(spilled: _Spilled) -> None:
    _unlink_name(spilled.dir_fd, spilled.name)


def _unlink_name(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


# ---------------------------------------------------------------------- the manager


_EXACT = ("managed", "spilled", "paused", "spill_error", "limit")


class MemoryManager:
    """Watches a worker's memory: spills, pauses, trims and reports to the center.

    Two threads: ``memory-monitor`` looks at the RSS every
    ``MONITOR_INTERVAL`` (pause, wake the spill thread, trim when idle,
    report), and ``spill`` writes keys to disk when woken, so a slow disk
    never delays a pause.  ``unpaused`` is set while tasks may start.
    ``is_idle()`` tells whether no task runs or waits; ``activity()``
    changes whenever the worker did work; ``report(msg)`` sends a memory
    message to the center.
    """

    def __init__(self, data: SpillBuffer, limit: int | None, *,
                 is_idle: Callable[[], bool], activity: Callable[[], int],
                 report: Callable[[dict], None]) -> None:
        self.data = data
        self.limit = limit
        self.is_idle = is_idle
        self.activity = activity
        self.report = report
        self.paused = False
        self.unpaused = threading.Event()
        self.unpaused.set()
        self.trims = 0
        self.trimmed = 0  # bytes of RSS the trims gave back
        self._wake_spill = threading.Event()
        self._stopping = threading.Event()
        self._last_report: dict | None = None
        self._last_report_at = 0.0
        self._spill_retry_at = 0.0
        self._task_check_at = 0.0  # when a task thread last read the RSS
        self._paused_at = 0.0
        self._pause_floor = 0  # RSS above which a worker that ran on while stuck pauses again
        self._pause_lock = threading.Lock()
        if limit:
            data.target = int(limit * TARGET)
            data.on_over_target = self._wake_spill.set

    def start(self) -> None:
        """Start the monitor and spill threads."""
        threading.Thread(target=self._monitor_loop, name="memory-monitor", daemon=True).start()
        if self.limit:
            threading.Thread(target=self._spill_loop, name="spill", daemon=True).start()

    def stop(self) -> None:
        """Stop both threads (they are daemons: a thread in a write finishes on its own)."""
        self._stopping.set()
        self._wake_spill.set()
        self.unpaused.set()

    def figures(self, rss: int | None = None) -> dict:
        """Managed bytes in memory, spilled bytes on disk, unmanaged (RSS - managed), paused."""
        rss = process_rss() if rss is None else rss
        data = self.data
        return {"managed": data.managed, "spilled": data.spilled,
                "unmanaged": max(0, rss - data.managed), "paused": self.paused,
                "limit": self.limit, "spill_error": data.error}

    def read_budget(self) -> int | None:
        """Bytes of spilled keys one ``get_data`` reply may read back (None: no limit)."""
        return int(self.limit * READ_BUDGET) if self.limit else None

    def resend(self) -> None:
        """Report the figures at the next look (after registering with a center again)."""
        self._last_report = None

    # -- the monitor

    def _monitor_loop(self) -> None:
        idle_since: float | None = None
        trimmed_at = self.activity()
        while not self._stopping.wait(MONITOR_INTERVAL):
            try:
                rss = process_rss()
                now = time.monotonic()
                if self.limit:
                    self._check_pause(rss)
                    if rss > SPILL * self.limit or self.data.over_target():
                        self._wake_spill.set()
                if self.is_idle():
                    idle_since = now if idle_since is None else idle_since
                    activity = self.activity() + self.data.released
                    if activity != trimmed_at and (now - idle_since >= IDLE_TRIM_AFTER
                                                   or self.paused):
                        trimmed_at = activity
                        rss = self._trim(rss)
                else:
                    idle_since = None
                self._maybe_report(rss, now)
            except Exception:
                logger.exception("memory monitor failed")

    def _check_pause(self, rss: int) -> None:
        paused = self._wants_pause(rss)
        if paused == self.paused:
            return
        with self._pause_lock:
            if paused == self.paused:
                return
            self._set_paused(paused, rss)

    def _wants_pause(self, rss: int) -> bool:
        """Pause above ``PAUSE``; once paused, stay so down to ``RESUME`` unless stuck."""
        limit = self.limit
        assert limit is not None  # pausing is managed only under a memory limit
        if not self.paused:
            if rss < RESUME * limit:
                self._pause_floor = 0
            return rss > max(PAUSE * limit, self._pause_floor)
        if rss < RESUME * limit:
            return False
        if rss < PAUSE * limit:
            return not self._stuck()
        if self._stuck(STUCK_RUN_AFTER):
            self._pause_floor = int(rss + STUCK_GROWTH * limit)
            return False
        return True

    def _stuck(self, after: float = STUCK_RESUME_AFTER) -> bool:
        """Paused for ``after`` seconds with nothing that spilling could free."""
        now = time.monotonic()
        if now - self._paused_at < after:
            return False
        return now < self._spill_retry_at or not self.data.spillable()

    def _set_paused(self, paused: bool, rss: int) -> None:
        limit = self.limit
        assert limit is not None  # pausing is managed only under a memory limit
        self.paused = paused
        if paused:
            self._paused_at = time.monotonic()
            self.unpaused.clear()
            logger.warning("paused: memory use %s is above %.0f%% of the memory limit %s; "
                           "starting no new task until it drops below %.0f%% (managed %s, "
                           "spilled %s)", format_bytes(rss), PAUSE * 100,
                           format_bytes(limit), RESUME * 100,
                           format_bytes(self.data.managed), format_bytes(self.data.spilled))
        else:
            self.unpaused.set()
            if rss < RESUME * limit:
                logger.warning("resumed: memory use %s is below %.0f%% of the memory limit %s",
                               format_bytes(rss), RESUME * 100, format_bytes(limit))
            elif rss < PAUSE * limit:
                logger.warning("resumed: memory use %s is below %.0f%% of the memory limit %s "
                               "and nothing is left to spill (managed %s)", format_bytes(rss),
                               PAUSE * 100, format_bytes(limit),
                               format_bytes(self.data.managed))
            else:
                logger.warning("running tasks again with memory use %s above %.0f%% of the "
                               "memory limit %s: for %.0f s nothing was left to spill "
                               "(managed %s), so waiting cannot free it; most of it is not "
                               "results (a library's caches, a task's globals?)",
                               format_bytes(rss), PAUSE * 100, format_bytes(limit),
                               STUCK_RUN_AFTER, format_bytes(self.data.managed))
        self._last_report_at = 0.0  # say so at once

    def _trim(self, rss: int) -> int:
        if not trim_memory():
            return rss
        after = process_rss()
        self.trims += 1
        self.trimmed += max(0, rss - after)
        logger.debug("idle: trimmed freed memory, RSS %s -> %s", format_bytes(rss),
                     format_bytes(after))
        return after

    def _maybe_report(self, rss: int, now: float) -> None:
        if now - self._last_report_at < REPORT_INTERVAL:
            return
        figures = self.figures(rss)
        last = self._last_report
        if last is not None and all(last[k] == figures[k] for k in _EXACT) and \
                abs(figures["unmanaged"] - last["unmanaged"]) < (1 << 20):
            return  # nothing new but RSS noise
        self._last_report, self._last_report_at = figures, now
        self.report({"op": "memory", **figures})

    # -- the spill thread

    def _spill_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake_spill.wait()
            self._wake_spill.clear()
            if not self._stopping.is_set():
                self.spill()

    def spill(self) -> None:
        """Spill LRU keys while managed bytes are over the target, or RSS over ``SPILL``.

        By RSS it goes on until RSS is below ``TARGET`` or nothing is left
        in memory.  Any thread may call it (two never write the same key);
        after a failed write nobody tries again for ``SPILL_RETRY`` seconds.
        """
        data, limit = self.data, self.limit
        if not limit:
            return
        if time.monotonic() < self._spill_retry_at:  # the disk failed: evict only what is there
            while (data.over_target() or process_rss() > SPILL * limit) and \
                    data.spill_kept():
                pass
            return
        try:
            while data.over_target() and data.spill_one():
                pass
            if process_rss() > SPILL * limit:  # memory outside the dict: spill by RSS
                while process_rss() > TARGET * limit and data.spill_one():
                    pass
        except SpillError as e:
            if time.monotonic() >= self._spill_retry_at:
                self._spill_retry_at = time.monotonic() + SPILL_RETRY
                logger.error("%s; keeping %d keys (%s) in memory, retrying in %.0fs", e,
                             len(data.fast), format_bytes(data.managed), SPILL_RETRY)
        except Exception:
            logger.exception("spilling failed")
            self._spill_retry_at = time.monotonic() + SPILL_RETRY

    def before_task(self) -> None:
        """On a task thread, before it starts a task: spill by RSS, pause if still too full.

        Checking here, not only every ``MONITOR_INTERVAL``, keeps short
        tasks from outrunning the monitor.
        """
        if not self.limit:
            return
        now = time.monotonic()
        if now < self._task_check_at + TASK_CHECK_INTERVAL and not self.paused:
            return
        self._task_check_at = now
        rss = process_rss()
        if rss > SPILL * self.limit:
            self.spill()
            rss = process_rss()
        self._check_pause(rss)

    def after_put(self) -> None:
        """On the thread that stored a result: spill what is over the target, right now.

        The producer pays for its own spilling, so a fast task cannot fill
        memory faster than the disk takes it.
        """
        if self.limit and self.data.over_target():
            self.spill()


# ---------------------------------------------------------------------- the directory


DIRECTORY_PREFIX = "minidist-worker-"
"""Names of workers' directories: this, the worker's PID, ``-`` and a random part."""

_DIRECTORY_NAME = re.compile(r"minidist-worker-([0-9]+)-[A-Za-z0-9_]{8,32}")
"""What ``purge_stale_directories`` may remove (with the 8 characters of ``mkdtemp``
that older versions used, so their leftovers go too)."""

LOCK_NAME = "lock"
"""The file in a worker's directory that the worker holds locked (``flock``) while it lives."""

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_private(st: os.stat_result, path: str) -> None:
    """Raise ``PermissionError`` unless ``st`` is a directory of this user that nobody
    else may enter, read or write (no group or other permission bits)."""
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(errno.EPERM, "not a directory", path)
    if st.st_uid != os.geteuid():
        raise PermissionError(errno.EPERM, f"owned by uid {st.st_uid}, not by this user "
                              f"({os.geteuid()})", path)
    if st.st_mode & 0o077:
        raise PermissionError(errno.EPERM, f"mode {stat.S_IMODE(st.st_mode):04o}: others "
                              "have access (expected 0700)", path)


class LocalDirectory:
    """A worker's private directory for its spill files, inside ``parent`` (default: tmp).

    Made with ``mkdir`` (so never one someone else made) under an
    unpredictable name, mode 0700; then opened without following links,
    checked (a directory, ours, mode 0700) and held open: every file
    operation goes through ``fd`` (``dir_fd=``), so what happens to the path
    afterwards (renamed, replaced by a link or by another directory) never
    redirects a read or a write.  The worker holds ``LOCK_NAME`` locked
    (``flock``) while it lives: a directory whose lock can be taken is a dead
    worker's, and ``purge_stale_directories`` removes it.

    ``renew`` makes a fresh directory when this one was deleted (a cleaner
    emptied tmp); the old descriptors stay open until ``remove`` (files of the
    old directory then fail to open, so nothing is confused with them), and
    ``on_renew(path)`` is called with the new path.
    """

    def __init__(self, parent: str | None = None) -> None:
        self.parent = parent or tempfile.gettempdir()
        self.path = ""
        self.fd = -1
        self.on_renew: Callable[[str], None] | None = None
        self._name = ""
        self._lock_fd = -1
        self._parent_fd = -1
        self._old: dict[int, str] = {}  # descriptors of directories that vanished: their paths
        self._renew_lock = threading.Lock()
        self._open_parent()
        try:
            self._make()
        except BaseException:
            os.close(self._parent_fd)
            raise

    def path_of(self, fd: int) -> str:
        """The path that directory descriptor ``fd`` had (for messages)."""
        return self.path if fd == self.fd else self._old.get(fd, "(a removed directory)")

    def _open_parent(self) -> None:
        os.makedirs(self.parent, mode=0o700, exist_ok=True)
        fd = os.open(self.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if self._parent_fd >= 0:
            os.close(self._parent_fd)
        self._parent_fd = fd

    def _make(self) -> None:
        """Make, open, check and lock a fresh directory; a few tries if raced."""
        for _ in range(10):
            name = f"{DIRECTORY_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
            try:
                os.mkdir(name, 0o700, dir_fd=self._parent_fd)
            except FileExistsError:
                continue
            except FileNotFoundError:  # the parent itself was deleted: make it again
                self._open_parent()
                continue
            made = self._open_made(name)
            if made is not None:
                self._name, (self.fd, self._lock_fd) = name, made
                self.path = os.path.join(self.parent, name)
                return
        raise OSError(errno.EEXIST, f"cannot make a private directory in {self.parent}")

    def _open_made(self, name: str) -> tuple[int, int] | None:
        """(directory fd, lock fd) for the directory just made, or None if it was raced away.

        Raises ``PermissionError`` if what is there now is not ours and private.
        """
        try:
            fd = os.open(name, _DIRECTORY, dir_fd=self._parent_fd)
        except OSError:  # removed, or swapped for a link, since it was made
            return None
        try:
            st = os.fstat(fd)
            check_private(st, os.path.join(self.parent, name))
            if stat.S_IMODE(st.st_mode) != 0o700:  # a umask took the owner's bits away
                os.fchmod(fd, 0o700)
            lock_fd = os.open(LOCK_NAME, _CREATE, 0o600, dir_fd=fd)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_nlink == 0:  # taken for stale and removed meanwhile
                    raise FileNotFoundError(name)
            except BaseException:
                os.close(lock_fd)
                raise
        except (FileNotFoundError, BlockingIOError):
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd, lock_fd

    def renew(self, seen_fd: int) -> bool:
        """Make a fresh directory if the one behind ``seen_fd`` was deleted; True if there
        is a fresh one to use now (made here, or by another thread just before)."""
        with self._renew_lock:
            if self.fd != seen_fd:
                return self.fd >= 0
            if self.fd < 0 or os.fstat(self.fd).st_nlink > 0:
                return False  # still there: the error was something else
            old_path = self.path
            self._old[self.fd] = old_path
            os.close(self._lock_fd)
            try:
                self._make()
            except OSError as e:
                logger.error("spill directory %s vanished and no fresh one can be made: %s",
                             old_path, e)
                self.fd = self._lock_fd = -1
                return False
        logger.error("spill directory %s vanished (keys spilled there are lost); spilling to "
                     "a fresh directory %s", old_path, self.path)
        if self.on_renew is not None:
            self.on_renew(self.path)
        return True

    def remove(self) -> None:
        """Remove the directory and every file in it, then close it (done already: fine)."""
        with self._renew_lock:
            if self.fd >= 0:
                _empty(self.fd)
                _rmdir_if_same(self._parent_fd, self._name, self.fd)
            for fd in [self.fd, self._lock_fd, self._parent_fd, *self._old]:
                if fd >= 0:
                    os.close(fd)
            self.fd = self._lock_fd = self._parent_fd = -1
            self._old.clear()

    def __repr__(self) -> str:
        return f"<LocalDirectory {self.path}>"


def make_local_directory(parent: str | None) -> LocalDirectory:
    """A fresh private directory for one worker's spill files, inside ``parent`` (default:
    tmp), after removing the directories that dead workers left there."""
    try:
        purge_stale_directories(parent or tempfile.gettempdir())
    except OSError as e:
        logger.warning("cannot look for directories of dead workers in %s: %s", parent, e)
    return LocalDirectory(parent)


def purge_stale_directories(parent: str) -> list[str]:
    """Remove the directories of dead workers inside ``parent``; the names removed.

    Only directories named like a worker's (``DIRECTORY_PREFIX``), owned by
    this user and whose lock can be taken (or, without a lock file, whose PID
    is not running) are removed; links are never followed.
    """
    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    removed = []
    try:
        for name in os.listdir(parent_fd):
            if _DIRECTORY_NAME.fullmatch(name) and _remove_if_stale(parent_fd, name):
                removed.append(name)
    finally:
        os.close(parent_fd)
    if removed:
        logger.info("removed %d directories of dead workers in %s", len(removed), parent)
    return removed


def remove_dead_worker_directory(path: str) -> bool:
    """Remove the directory ``path`` of a worker that has exited, if it is still there,
    named and owned as a worker's, and unlocked; True if removed."""
    parent, name = os.path.split(path)
    if not _DIRECTORY_NAME.fullmatch(name):
        return False
    try:
        parent_fd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return _remove_if_stale(parent_fd, name)
    finally:
        os.close(parent_fd)


def _remove_if_stale(parent_fd: int, name: str) -> bool:
    try:
        fd = os.open(name, _DIRECTORY, dir_fd=parent_fd)
    except OSError:  # gone, not a directory, or a link: not ours to touch
        return False
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            return False
        lock_fd = _take_lock(fd)
        if lock_fd is None or (lock_fd < 0 and _pid_alive(_pid_in(name))):
            return False
        try:
            _empty(fd)
            return _rmdir_if_same(parent_fd, name, fd)
        finally:
            if lock_fd >= 0:
                os.close(lock_fd)
    except OSError as e:
        logger.warning("cannot remove stale directory %s: %s", name, e)
        return False
    finally:
        os.close(fd)


def _take_lock(dir_fd: int) -> int | None:
    """The directory's lock, taken: its fd; -1 if it has no lock file; None if held."""
    try:
        lock_fd = os.open(LOCK_NAME, _OPEN, dir_fd=dir_fd)
    except FileNotFoundError:
        return -1
    except OSError:  # not a regular file we can open: leave the directory alone
        return None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock_fd)
        return None
    return lock_fd


def _pid_in(name: str) -> int:
    match = _DIRECTORY_NAME.fullmatch(name)
    return int(match.group(1)) if match else 0


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _empty(dir_fd: int) -> None:
    """Remove everything inside the open directory ``dir_fd``, never following a link."""
    for entry in os.listdir(dir_fd):
        try:
            os.unlink(entry, dir_fd=dir_fd)
        except IsADirectoryError:
            shutil.rmtree(entry, dir_fd=dir_fd, ignore_errors=True)  # fd-based: no links
        except OSError:
            pass


def _rmdir_if_same(parent_fd: int, name: str, fd: int) -> bool:
    """Remove ``name`` from ``parent_fd`` if it still is the directory open as ``fd``."""
    try:
        if not os.path.samestat(os.stat(name, dir_fd=parent_fd, follow_symlinks=False),
                                os.fstat(fd)):
            return False
        os.rmdir(name, dir_fd=parent_fd)
    except OSError:
        return False
    return True
