"""A deterministic simulator of a whole cluster around the real ``scheduler.py``.

``python -m minidist.sim --seeds N [--seed S] [--verbose]`` runs seeds S..S+N-1.
Each seed builds one small cluster on virtual time and drives the real
``Scheduler`` through it::

  heapq of (time, seq, action)          random.Random(seed): sizes, delays, faults
        |
        v
  SimClient --update_graph, release--> Link (FIFO, random delay) --> Scheduler
  SimWorker --task_finished, ...-----> Link ----------------------> (this module plays
            <--compute, steal, delete-- Link <-- messages returned    the center's I/O part:
                                                  by each event        heartbeat timeouts,
  SimWorker <--fetch inputs from peers (delay; fails if the peer     timer ticks, routing)
              is gone, hung or partitioned)

Task ``i`` of a graph has a spec ``(base, fails, dep_keys)``: a worker computes
its value as a fixed function of ``base`` and the values of its inputs, so
every client knows the value its lineage defines.  Faults drawn from the
seed: worker crash (a nanny restarts it under the same name), worker hang then
recovery, partition then heal, slow worker, client that vanishes, late
messages from a removed worker (anything still in flight on its old stream is
delivered), a worker that gives a task back on ``steal`` but runs it anyway
(duplicate finishes), a worker that drops a key it holds and says so with
``lost_data`` (a damaged spill file), and duplicate ``task_finished``
messages; and, from a
generator of its own, a worker paused for memory for a while (it starts
nothing, and says so with a ``memory`` message).

After every event the scheduler's tables are checked (``check_invariants``:
also that a waiting task waits only on tasks that will run, and that the
placement indexes find every worker with a free slot, a backlog or prefetch);
at the end, every key a client waited for must have been delivered once, with
its lineage's value or a defined error (the task's own, ``KilledWorker``,
``NoWorkerError``), and once every client has released everything no task,
key or worker record may remain, on the scheduler or on any worker.  A
failure raises ``SimFailure`` naming its seed and the command that replays
it; the same seed always takes the same path.

``--scale`` times the scheduler alone (no invariant checks) at 1,000 workers
and 10,000 to 1,000,000 tasks: CPU per task and memory per task.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import logging
import random
import sys
import time
import tracemalloc
from collections import deque
from typing import Any, NoReturn
from collections.abc import Callable

from . import scheduler as scheduler_module
from .scheduler import InvariantError, Scheduler
from .serialize import Serialized, deserialize

HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 2.0
CHECK_EVERY = 0.5
SETTLE = 8.0
"""Virtual seconds run after the last client finished and every fault healed."""
DEADLINE = 600.0
"""Virtual seconds: a client still waiting by then is a liveness failure."""
MISSING = object()

logger = logging.getLogger("minidist.sim")


class SimFailure(AssertionError):
    """A seed broke an invariant or an end-of-run expectation."""

    def __init__(self, seed: int, when: float, message: str) -> None:
        self.seed, self.when, self.message = seed, when, message
        super().__init__(f"seed {seed} failed at t={when:.6f}: {message}\n"
                         f"  replay: python -m minidist.sim --seed {seed} --verbose")


class _Bug(Exception):
    """Raised inside the simulation; turned into a SimFailure with the seed."""


def task_value(base: int, inputs: list[int]) -> int:
    """The value a task computes from its ``base`` and its inputs' values."""
    v = base * 7919
    for x in inputs:
        v = (v * 31 + x) % 1_000_000_007
    return v


class Link:
    """One registration's stream between the center and a peer: two FIFO directions."""

    __slots__ = ("peer", "up_last", "down_last", "closed_by_center", "closed_by_peer", "n")

    def __init__(self, peer: Any, n: int) -> None:
        self.peer = peer
        self.up_last = 0.0     # last delivery time, peer -> center
        self.down_last = 0.0   # last delivery time, center -> peer
        self.closed_by_center = False
        self.closed_by_peer = False
        self.n = n

    def __repr__(self) -> str:
        return f"<Link {self.n} {getattr(self.peer, 'address', None) or self.peer.cid}>"


class _Item:
    __slots__ = ("key", "spec", "missing", "cancelled")

    def __init__(self, key: str, spec: tuple) -> None:
        self.key, self.spec, self.missing, self.cancelled = key, spec, 0, False


class SimWorker:
    """A worker as the scheduler sees it: a stream, task slots, a data store, peer fetches."""

    def __init__(self, sim: Simulation, name: str, generation: int, nthreads: int,
                 slow: float) -> None:
        self.sim = sim
        self.name = name
        self.address = f"sim-{name}-{generation}:1"
        self.nthreads = nthreads
        self.slow = slow
        self.data: dict[str, tuple[int, int]] = {}  # key -> (value, nbytes)
        self.waiting: dict[str, _Item] = {}
        self.ready: deque[_Item] = deque()
        self.running = 0
        self.link: Link | None = None
        self.registered = False
        self.alive = True
        self.hung_until = 0.0
        self.partitioned_until = 0.0
        self.rogue = False  # gives tasks back on steal but runs them anyway
        self.lost: set = set()  # keys it dropped ("lose" fault): a task may miss them
        self.paused = False  # for memory: starts nothing, and has told the center
        self.center_id: str | None = None
        self.held_at_registration: dict[str, int] = {}

    def start(self) -> None:
        self.connect()
        self.sim.at(self.sim.now + HEARTBEAT_INTERVAL, self.heartbeat)

    def connect(self) -> None:
        if not self.alive or self.link is not None:
            return
        self.link = self.sim.new_link(self)
        self.registered = False
        self.held_at_registration = held = {k: nb for k, (_, nb) in self.data.items()}
        self.sim.send_up(self.link, ("register", held, self.center_id))

    def send(self, *msgs: dict) -> None:
        if self.link is not None and self.registered:
            self.sim.send_up(self.link, list(msgs))
        elif self.sim.verbose:
            self.sim.log("   %s drops %s (not registered)", self.address, _short(list(msgs)))

    def asleep(self, fn: Callable, *args: Any) -> bool:
        """True (and ``fn`` deferred) if this worker is dead or hung right now."""
        if not self.alive:
            return True
        if self.sim.now < self.hung_until:
            self.sim.at(self.hung_until, fn, *args)
            return True
        return False

    def heartbeat(self) -> None:
        if not self.alive:
            return
        if self.sim.now >= self.hung_until:
            self.send({"op": "heartbeat"})
        self.sim.at(self.sim.now + HEARTBEAT_INTERVAL, self.heartbeat)

    # -------------------------------------------------------------- from the center

    def deliver(self, link: Link, batch: list) -> None:
        if self.asleep(self.deliver, link, batch) or link is not self.link:
            return
        for msg in batch:
            msg = dict(msg)
            op = msg.pop("op")
            getattr(self, "on_" + op)(**msg)

    def eof(self, link: Link) -> None:
        if self.asleep(self.eof, link) or link is not self.link:
            return
        self.link = None
        self.registered = False
        for item in self.waiting.values():  # the center reschedules them
            item.cancelled = True
        self.waiting.clear()
        self.ready.clear()
        self.sim.at(self.sim.now + self.sim.rng.uniform(0.005, 0.05), self.connect)

    def on_registered(self, center: str = "", id: str | None = None) -> None:
        self.registered = True
        self.center_id = id
        late = {k: nb for k, (_, nb) in self.data.items() if k not in self.held_at_registration}
        if late:  # finished while no stream was up (as worker.py does)
            self.send({"op": "add_keys", "keys": late, "from_registration": True})
        if self.paused:
            self.send(self.memory_msg())

    def memory_msg(self) -> dict:
        return {"op": "memory", "managed": sum(nb for _, nb in self.data.values()),
                "spilled": 0, "unmanaged": 0, "paused": self.paused, "limit": 1 << 30}

    def set_paused(self, paused: bool) -> None:
        if not self.alive or self.paused == paused:
            return
        self.sim.log("%s %s", "PAUSE" if paused else "RESUME", self.address)
        self.paused = paused
        self.send(self.memory_msg())
        self.pump()

    def on_worker_left(self, address: str) -> None:
        pass

    def on_delete_data(self, keys: list) -> None:
        for key in keys:
            self.data.pop(key, None)

    def on_cancel_compute(self, key: str) -> None:
        item = self.waiting.pop(key, None)
        if item is not None:
            item.cancelled = True

    def on_steal(self, key: str) -> None:
        item = self.waiting.get(key)
        if item is not None and not self.rogue:
            del self.waiting[key]
            item.cancelled = True
        self.send({"op": "steal_response", "key": key, "ok": item is not None})

    def on_compute(self, key: str, spec: tuple, who_has: dict) -> None:
        if key in self.data:
            self.send({"op": "task_finished", "key": key, "nbytes": self.data[key][1]})
            return
        item = _Item(key, spec)
        self.waiting[key] = item
        missing = {dep: holders for dep, holders in who_has.items() if dep not in self.data}
        item.missing = len(missing)
        if not missing:
            self.ready.append(item)
            self.pump()
            return
        for dep, holders in missing.items():
            self.sim.at(self.sim.now + self.sim.delay(self), self.fetched, item, dep, holders)

    # -------------------------------------------------------------- inputs and tasks

    def fetched(self, item: _Item, dep: str, holders: list) -> None:
        if self.asleep(self.fetched, item, dep, holders):
            return
        got = None
        if dep in self.data:
            got = self.data[dep]
        elif self.sim.now >= self.partitioned_until:
            for address in self.sim.rng.sample(holders, len(holders)):
                peer = self.sim.workers.get(address)
                if peer is not None and peer.reachable() and dep in peer.data:
                    got = peer.data[dep]
                    break
        self.sim.log("   %s fetched %s for %s from %s: %s", self.address, dep, item.key, holders,
                     "ok" if got is not None else "failed")
        if got is not None:
            if dep not in self.data:
                self.data[dep] = got
                self.send({"op": "add_keys", "keys": {dep: got[1]}})
            item.missing -= 1
            if item.missing == 0:
                self.ready.append(item)
                self.pump()
        elif item.missing > 0:
            item.missing = -1
            if self.waiting.get(item.key) is item:
                del self.waiting[item.key]
            self.send({"op": "missing_data", "key": item.key, "dep": dep, "holders": holders})

    def reachable(self) -> bool:
        now = self.sim.now
        return self.alive and now >= self.hung_until and now >= self.partitioned_until

    def pump(self) -> None:
        while self.running < self.nthreads and self.ready and not self.paused:
            item = self.ready.popleft()
            if item.cancelled or self.waiting.get(item.key) is not item:
                continue
            del self.waiting[item.key]
            base, fails, deps, duration, nbytes = item.spec
            inputs: list[Any] = [self.data.get(d, (MISSING,))[0] for d in deps]
            gone = [d for d in deps if d in self.lost and d not in self.data]
            if gone:  # dropped here after the task was queued: worker.py reports it missing
                self.send({"op": "missing_data", "key": item.key, "dep": gone[0],
                           "holders": []})
                continue
            if any(x is MISSING for x in inputs):
                result: Any = ("InputMissing", item.key)  # the worker's KeyError: a bug
            elif fails:
                result = ("TaskError", item.key)
            else:
                result = task_value(base, inputs)
            self.running += 1
            self.sim.at(self.sim.now + duration * self.slow, self.finish, item, result)

    def finish(self, item: _Item, result: Any) -> None:
        if self.asleep(self.finish, item, result):
            return
        self.running -= 1
        key = item.key
        if isinstance(result, tuple):
            self.send({"op": "task_erred", "key": key, "exception": result,
                       "traceback": f"{result[0]} in {key}"})
        else:
            nbytes = item.spec[4]
            self.data[key] = (result, nbytes)
            msg = {"op": "task_finished", "key": key, "nbytes": nbytes, "duration":
                   item.spec[3] * self.slow}
            if nbytes <= 1024:
                msg["value"] = result
            if self.sim.rng.random() < self.sim.dup_rate:
                self.send(msg, dict(msg))
            else:
                self.send(msg)
        self.pump()


class SimClient:
    """A client that submits random graphs, checks every result and releases everything."""

    def __init__(self, sim: Simulation, cid: str, ngraphs: int) -> None:
        self.sim = sim
        self.cid = cid
        self.ngraphs = ngraphs
        self.submitted = 0
        self.link: Link | None = None
        self.held: dict[str, bool] = {}           # key -> waiting for its result
        self.expected: dict[str, tuple] = {}      # key -> ("value", v) | ("error", kind)
        self.resolved: dict[str, tuple] = {}      # key -> outcome, once
        self.fetching: set[str] = set()
        self.delivered_wants: set[str] = set()    # what the scheduler has heard we hold
        self.gone = False
        self.done = False

    def start(self) -> None:
        self.link = self.sim.new_link(self)
        self.sim.send_up(self.link, ("register",))
        self.sim.at(self.sim.now + self.sim.rng.uniform(0, 0.05), self.submit)

    def send(self, msg: dict) -> None:
        if self.link is not None and not self.gone:
            self.sim.send_up(self.link, [msg])

    def submit(self) -> None:
        if self.gone:
            return
        rng, sim = self.sim.rng, self.sim
        g = self.submitted
        self.submitted += 1
        tasks, wants = [], []
        local: list[str] = []
        pool = [k for k in self.held if self.expected[k][0] == "value"]
        for i in range(rng.randint(1, sim.max_tasks)):
            if rng.random() < 0.1:
                j = rng.randrange(4)
                key = f"shared-{j}"
                spec: tuple[int, bool, tuple[str, ...], float, int] = (j, False, (), 0.01, 64)
                deps: list[str] = []
                fails = False
            else:
                key = f"{self.cid}-g{g}-t{i}"
                choices = local + pool
                deps = sorted(set(rng.sample(choices, min(len(choices), rng.randint(0, 3)))))
                fails = rng.random() < 0.04
                nbytes = rng.choice((8, 100, 5000, 200_000, 3 << 20))
                duration = rng.choice((0.0005, 0.002, 0.01, 0.05, 0.2))
                spec = (rng.randrange(1000), fails, tuple(deps), duration, nbytes)
            opts: dict[str, Any] | None = None
            if rng.random() < 0.08 and sim.names:
                names = list(sim.names) + (["nobody"] if sim.no_workers_timeout else [])
                opts = {"workers": [rng.choice(names)]}
            if rng.random() < 0.05:
                opts = dict(opts or {}, retries=1)
            if key not in self.expected:
                bad = fails or any(self.expected[d][0] == "error" for d in deps)
                if bad:
                    self.expected[key] = ("error", "TaskError")
                else:
                    inputs = [self.expected[d][1] for d in deps]
                    self.expected[key] = ("value", task_value(spec[0], inputs))
            tasks.append((key, spec, deps, opts))
            if key not in local:
                local.append(key)
            if key not in self.held and (rng.random() < 0.6 or i == 0):
                wants.append(key)
        for key in wants:
            self.held[key] = True
        self.send({"op": "update_graph", "tasks": tasks, "wants": wants})
        for key in wants:
            if rng.random() < 0.05:  # cancel before the result arrives
                sim.at(sim.now + rng.uniform(0, 0.3), self.release, [key])
        if self.submitted < self.ngraphs:
            sim.at(sim.now + rng.uniform(0, 2.0), self.submit)
        else:
            self.maybe_done()

    def release(self, keys: list) -> None:
        keys = [k for k in keys if k in self.held]
        if self.gone or not keys:
            return
        for key in keys:
            del self.held[key]
            self.resolved.pop(key, None)
        self.send({"op": "release", "keys": keys})
        self.maybe_done()

    def maybe_done(self) -> None:
        if self.submitted >= self.ngraphs and not self.held and not self.done:
            self.done = True
            if self.sim.rng.random() < 0.5:
                self.leave()

    def leave(self) -> None:
        if self.link is not None:
            self.sim.peer_closed(self.link)
            self.link = None

    def vanish(self) -> None:
        if not self.done:
            self.gone = self.done = True
            self.held.clear()
            self.leave()

    # -------------------------------------------------------------- from the center

    def deliver(self, link: Link, batch: list) -> None:
        if self.gone or link is not self.link:
            return
        for msg in batch:
            msg = dict(msg)
            getattr(self, "on_" + msg.pop("op"))(**msg)

    def eof(self, link: Link) -> None:
        if not self.gone and link is self.link and not self.done:
            self.sim.fail(f"client {self.cid}: the center closed its stream")

    def on_registered(self, center: str = "") -> None:
        pass

    def on_worker_left(self, address: str) -> None:
        pass

    def on_memory(self, key: str, who_has: list, value: Any = None) -> None:
        if key not in self.held:
            return
        prior = self.resolved.get(key)
        if prior is not None and prior[0] == "error":
            self.sim.fail(f"client {self.cid}: {key} reported in memory after {prior}")
        if value is not None:
            self.check_value(key, value, "inline")
            self.resolve(key, ("value", value))
        elif prior is None and key not in self.fetching:
            self.fetching.add(key)
            holder = self.sim.rng.choice(who_has) if who_has else None
            self.sim.at(self.sim.now + self.sim.delay(None), self.fetch, key, holder)

    def fetch(self, key: str, holder: str | None) -> None:
        self.fetching.discard(key)
        if self.gone or key not in self.held or key in self.resolved:
            return
        peer = self.sim.workers.get(holder) if holder else None
        if peer is not None and peer.reachable() and key in peer.data:
            value = peer.data[key][0]
            self.check_value(key, value, f"fetched from {holder}")
            self.resolve(key, ("value", value))
        else:
            self.send({"op": "locate", "keys": [key]})

    def check_value(self, key: str, value: Any, how: str) -> None:
        want = self.expected.get(key)
        if want is None or want[0] != "value" or want[1] != value:
            self.sim.fail(f"client {self.cid}: {key} = {value!r} ({how}), expected {want}")

    def on_erred(self, key: str, exception: Any, traceback: str) -> None:
        if key not in self.held:
            return
        kind = type(deserialize(exception)).__name__ if isinstance(exception, Serialized) \
            else exception[0]
        allowed = {"KilledWorker"} if self.sim.nfaults else set()  # deaths come from faults
        if self.sim.no_workers_timeout:
            allowed.add("NoWorkerError")
        if self.expected[key] == ("error", kind) or kind in allowed:
            prior = self.resolved.get(key)
            if prior is None:
                self.resolve(key, ("error", kind))
            elif prior[0] == "error" and prior != ("error", kind):
                self.sim.fail(f"client {self.cid}: {key} erred twice: {prior}, then {kind}")
        else:
            self.sim.fail(f"client {self.cid}: {key} erred with {kind} ({traceback.strip()}), "
                          f"expected {self.expected[key]}")

    def on_lost(self, key: str, reason: str) -> None:
        if key in self.held:
            self.sim.fail(f"client {self.cid}: {key} lost: {reason}")

    def resolve(self, key: str, outcome: tuple) -> None:
        if key in self.resolved:
            return
        self.resolved[key] = outcome
        self.held[key] = False
        self.sim.at(self.sim.now + self.sim.rng.uniform(0, 0.5), self.release, [key])


class Simulation:
    """One seed: a scheduler, simulated workers and clients, faults, all on virtual time."""

    def __init__(self, seed: int, *, verbose: bool = False, check: bool = True) -> None:
        self.seed = seed
        self.rng = rng = random.Random(seed)
        self.verbose = verbose
        self.check = check
        self.now = 0.0
        self._heap: list = []
        self._seq = 0
        self._links = 0
        self.no_workers_timeout = rng.choice((None, None, 1.0, 3.0))
        if check:  # a forbidden state change fails the seed, as a broken invariant does
            scheduler_module.STRICT = True
        self.sched = Scheduler(allowed_failures=3, no_workers_timeout=self.no_workers_timeout,
                               address="sim-center:1", id="sim-center")
        self.workers: dict[str, SimWorker] = {}  # address -> every worker ever started
        nworkers = rng.randint(1, 4)
        self.names = [f"w{i}" for i in range(nworkers)]
        self.generation = 0
        self.max_tasks = rng.choice((3, 6, 12))
        self.dup_rate = rng.choice((0.0, 0.0, 0.1))
        self.timer_at = float("inf")
        self.faults_until = 0.0
        self.clients = [SimClient(self, f"c{i}", rng.randint(1, 3))
                        for i in range(rng.randint(1, 2))]
        self.nfaults = 0
        for name in self.names:
            self.at(rng.uniform(0, 0.3), self.start_worker, name, rng.choice((1, 1, 2)),
                    rng.choice((1, 1, 1, 10)))
        for client in self.clients:
            self.at(rng.uniform(0, 0.2), client.start)
        for _ in range(rng.choice((0, 1, 2, 3))):
            self.at(rng.uniform(0.1, 3.0), self.fault)
        self.at(CHECK_EVERY, self.check_heartbeats)
        # Pauses for memory come from a generator of their own, so that a seed drawn
        # without any runs exactly as it did before they existed.
        prng = random.Random(f"pause-{seed}")
        for _ in range(prng.choice((0, 0, 0, 1, 2))):
            self.at(prng.uniform(0.1, 3.0), self.pause, prng.random(),
                    prng.choice((0.2, 1.0, 3.0)))

    # -------------------------------------------------------------- machinery

    def at(self, when: float, fn: Callable, *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, fn, args))

    def fail(self, message: str) -> NoReturn:
        raise _Bug(message)

    def log(self, fmt: str, *args: Any) -> None:
        if self.verbose:
            print(f"{self.now:10.6f} " + (fmt % args if args else fmt))

    def delay(self, worker: SimWorker | None) -> float:
        d = self.rng.uniform(0.0001, 0.003)
        if self.rng.random() < 0.02:
            d += self.rng.uniform(0.01, 0.2)
        if worker is not None and worker.partitioned_until > self.now:
            d = max(d, worker.partitioned_until - self.now + 0.001)
        return d

    def new_link(self, peer: Any) -> Link:
        self._links += 1
        return Link(peer, self._links)

    def send_up(self, link: Link, batch: Any) -> None:
        if link.closed_by_center or link.closed_by_peer:
            return  # written to a closed socket
        peer = link.peer if isinstance(link.peer, SimWorker) else None
        when = max(link.up_last, self.now + self.delay(peer))
        link.up_last = when
        self.at(when, self.center_receive, link, batch)

    def peer_closed(self, link: Link) -> None:
        """The peer's end closed (exit, crash): the center reads EOF after what is in flight."""
        if link.closed_by_peer:
            return
        link.closed_by_peer = True
        when = max(link.up_last, self.now + self.delay(None))
        link.up_last = when
        self.at(when, self.center_receive, link, None)

    def send_down(self, link: Link, batch: list | None) -> None:
        if self.verbose:
            self.log("   center -> %r: %s", link, "close" if batch is None else _short(batch))
        peer = link.peer if isinstance(link.peer, SimWorker) else None
        when = max(link.down_last, self.now + self.delay(peer))
        link.down_last = when
        if batch is None:
            self.at(when, link.peer.eof, link)
        else:
            self.at(when, link.peer.deliver, link, batch)

    def route(self, out: dict) -> None:
        for link, msgs in out.items():
            if link.closed_by_center:
                self.fail(f"scheduler wrote {msgs!r:.200} on {link}, which it closed")
            batch: list = []
            for msg in msgs:
                if msg is None:
                    if batch:
                        self.send_down(link, batch)
                    batch = []  # sent: nothing follows the close
                    link.closed_by_center = True
                    self.send_down(link, None)
                    break
                batch.append(msg)
            if batch:
                self.send_down(link, batch)
        when = self.sched.next_timer
        if when < self.timer_at:
            self.timer_at = when
            self.at(max(when, self.now), self.timer)

    def call(self, what: str, fn: Callable, *args: Any) -> None:
        """Run one scheduler event, route its messages and check every invariant."""
        self.log("%s", what)
        self.route(fn(self.now, *args))
        if self.check:
            check_invariants(self)

    # -------------------------------------------------------------- the center's I/O part

    def center_receive(self, link: Link, batch: Any) -> None:
        peer = link.peer
        sched = self.sched
        if isinstance(peer, SimWorker):
            if batch is None:
                self.call(f"{peer.address} stream closed", sched.worker_removed,
                          peer.address, "its connection closed", link)
            elif type(batch) is tuple:
                self.call(f"{peer.address} registers holding {sorted(batch[1])}",
                          sched.worker_added, link, peer.address, peer.nthreads, peer.name,
                          dict(batch[1]), None, batch[2])
            else:
                self.call(f"{peer.address} -> {_short(batch)}", sched.worker_msgs, link,
                          peer.address, [dict(m) for m in batch])
        else:
            if batch is None:
                self.call(f"client {peer.cid} left", sched.client_removed, link, peer.cid)
            elif type(batch) is tuple:
                self.call(f"client {peer.cid} registers", sched.client_added, link, peer.cid)
            else:
                for msg in batch:
                    if msg["op"] == "update_graph":
                        peer.delivered_wants.update(msg["wants"])
                    elif msg["op"] == "release":
                        peer.delivered_wants.difference_update(msg["keys"])
                self.call(f"client {peer.cid} -> {_short(batch)}", sched.client_msgs, link,
                          peer.cid, [dict(m) for m in batch])

    def timer(self) -> None:
        self.timer_at = float("inf")
        if self.now >= self.sched.next_timer:
            self.call("tick", self.sched.tick)
        else:
            self.route({})

    def check_heartbeats(self) -> None:
        for ws in list(self.sched.workers.values()):
            if self.now - ws.last_seen > HEARTBEAT_TIMEOUT:
                self.call(f"{ws.address}: no heartbeat", self.sched.worker_removed,
                          ws.address, "no heartbeat", None)
        self.at(self.now + CHECK_EVERY, self.check_heartbeats)

    # -------------------------------------------------------------- workers and faults

    def start_worker(self, name: str, nthreads: int, slow: float) -> None:
        self.generation += 1
        w = SimWorker(self, name, self.generation, nthreads, slow)
        self.workers[w.address] = w
        self.log("start worker %s (%d threads, slow x%g)", w.address, nthreads, slow)
        w.start()

    def pause(self, pick: float, seconds: float) -> None:
        """A worker's memory fills: it starts nothing and gets nothing new for ``seconds``."""
        live = [w for w in self.workers.values() if w.alive]
        if not live:
            return
        w = live[int(pick * len(live))]
        w.set_paused(True)
        self.faults_until = max(self.faults_until, self.now + seconds)
        self.at(self.now + seconds, w.set_paused, False)

    def fault(self) -> None:
        rng = self.rng
        live = [w for w in self.workers.values() if w.alive]
        kind = rng.choice(("crash", "hang", "partition", "slow", "vanish", "rogue", "lose"))
        self.nfaults += 1
        if kind == "vanish":
            c = rng.choice(self.clients)
            self.log("FAULT client %s vanishes", c.cid)
            c.vanish()
            return
        if not live:
            return
        w = rng.choice(live)
        self.log("FAULT %s %s", kind, w.address)
        if kind == "crash":
            w.alive = False
            if w.link is not None:
                self.peer_closed(w.link)
            back = self.now + rng.uniform(0.2, 1.5)
            self.faults_until = max(self.faults_until, back)
            self.at(back, self.start_worker, w.name, w.nthreads, w.slow)
        elif kind == "hang":
            w.hung_until = self.now + rng.choice((0.3, 1.0, 3.0, 5.0))
            self.faults_until = max(self.faults_until, w.hung_until)
        elif kind == "partition":
            w.partitioned_until = self.now + rng.choice((0.3, 1.0, 3.0, 5.0))
            self.faults_until = max(self.faults_until, w.partitioned_until)
        elif kind == "slow":
            w.slow = 20.0
        elif kind == "lose":  # a spilled key's file is damaged: the worker drops the key
            if w.data:
                key = rng.choice(sorted(w.data))
                del w.data[key]
                w.lost.add(key)
                self.log("   %s loses %s", w.address, key)
                w.send({"op": "lost_data", "keys": [key], "reason": "its spill file is damaged"})
        else:
            w.rogue = True

    # -------------------------------------------------------------- running

    def run(self) -> None:
        """Run to the end and check the outcome; raises SimFailure on any violation."""
        try:
            self._run()
        except _Bug as e:
            raise SimFailure(self.seed, self.now, str(e)) from None
        except SimFailure:
            raise
        except Exception as e:
            raise SimFailure(self.seed, self.now, f"{type(e).__name__}: {e}") from e

    def _run(self) -> None:
        heap = self._heap
        end = None
        while heap:
            when, _, fn, args = heapq.heappop(heap)
            self.now = when
            fn(*args)
            if end is None:
                if all(c.done for c in self.clients) and self.now >= self.faults_until:
                    end = self.now + SETTLE
                elif self.now > DEADLINE:
                    waiting = {c.cid: sorted(k for k, w in c.held.items() if w)
                               for c in self.clients if not c.done}
                    self.fail(f"liveness: clients still waiting at t={self.now:.1f}: {waiting}")
            elif any(w.alive and (w.running or w.waiting) for w in self.workers.values()):
                # A task still runs (a slow worker, one that kept a stolen task): settle
                # after it, so its result reaches the center and is deleted.
                if self.now > DEADLINE:
                    self.fail(f"liveness: workers still running at t={self.now:.1f}")
                end = self.now + SETTLE
            elif self.now >= end:
                break
        self.check_end()

    def check_end(self) -> None:
        sched = self.sched
        for c in self.clients:
            if not c.gone and any(c.held.values()):
                self.fail(f"client {c.cid} never got {sorted(k for k, w in c.held.items() if w)}")
        if sched.tasks:
            self.fail(f"tasks left after every client released everything: "
                      f"{sorted(sched.tasks.values(), key=repr)[:8]}")
        for cs in sched.clients.values():
            if cs.wants:
                self.fail(f"client {cs.id} still wants {list(cs.wants)[:8]}")
        for ws in sched.workers.values():
            if ws.has_what or ws.processing:
                self.fail(f"{ws.address} still holds {list(ws.has_what)[:8]}, "
                          f"runs {list(ws.processing)[:8]}")
        if sched.no_worker:
            self.fail(f"no-worker tasks left: {list(sched.no_worker)[:8]}")
        for w in self.workers.values():
            if w.alive and (w.data or w.waiting or w.running):
                self.fail(f"worker {w.address} still holds {sorted(w.data)[:8]}, waits on "
                          f"{sorted(w.waiting)[:8]}, runs {w.running}")


def _short(batch: list) -> str:
    parts = []
    for m in batch:
        if m.get("op") == "update_graph":
            tasks = " ".join(f"{k}<-{list(d)}" + (f"{o}" if o else "") for k, _, d, o in m["tasks"])
            parts.append(f"update_graph(tasks: {tasks}; wants {m['wants']})")
        else:
            parts.append(f"{m.get('op')}({m.get('key', m.get('keys', ''))})")
    return ", ".join(parts)


def check_invariants(sim: Simulation) -> None:
    """Every table of the scheduler agrees with every other, and with what clients hold."""
    sched = sim.sched
    try:
        sched.validate()
    except InvariantError as e:
        sim.fail(str(e))
    clients, tasks, fail = sched.clients, sched.tasks, sim.fail
    for c in sim.clients:
        cs = clients.get(c.cid)
        wants = {ts.key for ts in cs.wants} if cs is not None else set()
        if cs is not None:
            for ts in cs.wants:
                if c.cid not in (ts.who_wants or ()) or tasks.get(ts.key) is not ts:
                    fail(f"client {c.cid} wants {ts!r}, which does not know it")
        if cs is not None and wants != c.delivered_wants:
            fail(f"client {c.cid} holds {sorted(c.delivered_wants)}, the scheduler counts "
                 f"{sorted(wants)}")


def run_seed(seed: int, verbose: bool = False) -> Simulation:
    """Run one seed; raises ``SimFailure`` if anything is wrong."""
    sim = Simulation(seed, verbose=verbose)
    errors = _ErrorLog()
    log = logging.getLogger("minidist.center")
    log.addHandler(errors)
    try:
        sim.run()
    finally:
        log.removeHandler(errors)
    if errors.records:
        raise SimFailure(seed, sim.now, f"the scheduler logged an error: {errors.records[0]}")
    return sim


class _ErrorLog(logging.Handler):
    """Collects the scheduler's error log lines (a caught exception is still a bug)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


def run_seeds(first: int, count: int, *, stop_after: int = 10,
              progress: Callable[[int], None] | None = None) -> list[SimFailure]:
    """Run ``count`` seeds from ``first``; returns the failures (at most ``stop_after``)."""
    failures = []
    for seed in range(first, first + count):
        try:
            run_seed(seed)
        except SimFailure as e:
            failures.append(e)
            if len(failures) >= stop_after:
                break
        if progress is not None:
            progress(seed)
    return failures


# ---------------------------------------------------------------------- scale


SCALE_SIZES = (10_000, 100_000, 1_000_000)


def scale(ntasks_list: tuple[int, ...] = SCALE_SIZES, nworkers: int = 1000,
          progress: Callable[[dict], None] | None = None) -> list[dict]:
    """The scheduler alone at ``nworkers`` single-thread workers: CPU and memory per task.

    Two runs per size, without invariant checks:

    - *flow*: a client sends ``update_graph`` batches of 1,000 independent
      tasks; every ``compute`` is answered by a ``task_finished`` at once and
      the client releases each result when it hears of it.  ``cpu_us_per_task``
      is the process CPU spent inside ``Scheduler`` event calls (the harness
      that builds and routes messages is not counted) over the task count.
    - *pending*: the same tasks submitted and never finished, so each one is
      held (a few run, the rest wait in the queue); ``bytes_per_pending_task``
      is the growth of traced memory (``tracemalloc``) over the task count,
      messages to the workers included.  Keys look like real ones
      (``inc-`` and 32 hex digits).

    The garbage collector runs as it does in the center (``center.tune_gc``).
    """
    from .center import GC_THRESHOLDS
    rows = []
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        for ntasks in ntasks_list:
            row = {"tasks": ntasks, "workers": nworkers}
            row.update(_scale_flow(ntasks, nworkers))
            row.update(_scale_pending(ntasks, nworkers))
            rows.append(row)
            if progress is not None:
                progress(row)
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
    return rows


def _scale_key(i: int) -> str:
    return f"inc-{i:032x}"


def _scale_flow(ntasks: int, nworkers: int) -> dict:
    sched = Scheduler(address="scale:1")
    streams = [object() for _ in range(nworkers)]
    addresses = {stream: f"10.0.{i // 250}.{i % 250}:4000" for i, stream in enumerate(streams)}
    client = object()
    now = 0.0
    inside = 0.0
    clock = time.process_time
    spec = ("spec",)
    sched.client_added(now, client, "client")
    for stream, address in addresses.items():
        sched.worker_added(now, stream, address, 1)
    done = 0
    wall = time.perf_counter()
    for start in range(0, ntasks, 1000):
        keys = [_scale_key(i) for i in range(start, min(ntasks, start + 1000))]
        msg = {"op": "update_graph", "tasks": [(k, spec, (), None) for k in keys],
               "wants": keys}
        t = clock()
        out = sched.client_msgs(now, client, "client", [msg])
        inside += clock() - t
        while out:
            released: list = []
            finished = []
            for stream, msgs in out.items():
                if stream is client:
                    released.extend(m["key"] for m in msgs if m["op"] == "memory")
                else:
                    done_here = [{"op": "task_finished", "key": m["key"], "nbytes": 8,
                                  "duration": 0.001} for m in msgs if m["op"] == "compute"]
                    if done_here:
                        finished.append((stream, done_here))
            now += 0.001
            out = {}
            t = clock()
            for stream, msgs in finished:
                for s, m in sched.worker_msgs(now, stream, addresses[stream], msgs).items():
                    out.setdefault(s, []).extend(m)
            if released:
                for s, m in sched.client_msgs(now, client, "client",
                                              [{"op": "release", "keys": released}]).items():
                    out.setdefault(s, []).extend(m)
            inside += clock() - t
            done += sum(len(m) for _, m in finished)
    wall = time.perf_counter() - wall
    if done != ntasks or sched.tasks:
        raise AssertionError(f"scale run finished {done} of {ntasks} tasks, "
                             f"{len(sched.tasks)} left")
    return {"cpu_us_per_task": inside / ntasks * 1e6, "wall_s": wall}


def _scale_pending(ntasks: int, nworkers: int) -> dict:
    spec = ("spec",)
    client = object()
    tracemalloc.start()
    try:
        sched = Scheduler(address="scale:1")
        sched.client_added(0.0, client, "client")
        for i in range(nworkers):
            sched.worker_added(0.0, object(), f"10.0.{i // 250}.{i % 250}:4000", 1)
        keys = [_scale_key(i) for i in range(ntasks)]  # the client's, not the center's
        base = tracemalloc.get_traced_memory()[0]
        outs = []
        for start in range(0, ntasks, 1000):
            batch = keys[start:start + 1000]
            outs.append(sched.client_msgs(0.0, client, "client", [{
                "op": "update_graph", "tasks": [(k, spec, (), None) for k in batch],
                "wants": batch}]))
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    return {"bytes_per_pending_task": held / ntasks, "pending": len(sched.tasks)}


def main(argv: list[str] | None = None) -> int:
    """``python -m minidist.sim``: run seeds, or replay one, or print the scale figures."""
    parser = argparse.ArgumentParser(prog="python -m minidist.sim",
                                     description="Deterministic simulation of the scheduler.")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds to run (default 1000; 1 with --seed)")
    parser.add_argument("--seed", type=int, default=None, help="first seed (default 0)")
    parser.add_argument("--verbose", action="store_true", help="print every event")
    parser.add_argument("--scale", action="store_true",
                        help="time the scheduler at 1,000 workers, 10k to 1M tasks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL,
                        format="%(message)s", stream=sys.stdout)
    if args.scale:
        print(f"{'tasks':>10} {'workers':>8} {'cpu us/task':>12} {'bytes/pending task':>19} "
              f"{'run s':>7}", flush=True)

        def show(row: dict) -> None:
            print(f"{row['tasks']:>10,} {row['workers']:>8,} {row['cpu_us_per_task']:>12.1f} "
                  f"{row['bytes_per_pending_task']:>19,.0f} {row['wall_s']:>7.1f}", flush=True)
        scale(progress=show)
        return 0
    first = args.seed if args.seed is not None else 0
    count = args.seeds if args.seeds is not None else (1 if args.seed is not None else 1000)
    if args.verbose:
        if count != 1:
            parser.error("--verbose replays one seed: give --seed S")
        try:
            run_seed(first, verbose=True)
        except SimFailure as e:
            print(e)
            return 1
        print(f"seed {first} passed")
        return 0
    start = time.monotonic()
    failures = run_seeds(first, count)
    elapsed = time.monotonic() - start
    for f in failures:
        print(f)
    print(f"{count} seeds from {first}: {len(failures)} failed"
          f"{' (stopped at the tenth)' if len(failures) >= 10 else ''}, {elapsed:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
