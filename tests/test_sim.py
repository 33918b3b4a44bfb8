"""The simulator runs the real scheduler through thousands of seeds, and catches broken ones.

Each deliberate bug below is patched into ``Scheduler`` for one test; the
simulator must report it with a seed, and running that seed again must
fail the same way.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from minidist import sim
from minidist.scheduler import Scheduler, _unwant

CI_SEEDS = 2000


def first_failure(count: int = 500) -> sim.SimFailure:
    failures = sim.run_seeds(0, count, stop_after=1)
    assert failures, f"the simulator found nothing wrong in {count} seeds"
    return failures[0]


def replays(failure: sim.SimFailure) -> None:
    with pytest.raises(sim.SimFailure) as again:
        sim.run_seed(failure.seed)
    assert str(again.value) == str(failure)
    assert f"python -m minidist.sim --seed {failure.seed} --verbose" in str(failure)


@pytest.mark.timeout(120)
def test_ci_seeds_pass():
    failures = sim.run_seeds(0, CI_SEEDS)
    assert not failures, "\n".join(str(f) for f in failures)


@pytest.mark.parametrize("seed", [
    2847, 13658, 40662,  # a copy kept for the holder's own task outlived it (stolen)
    16698,               # ... or outlived it (finished)
    26361,               # an input released by an erring sibling left its dependent waiting
    93823,               # the run ended while a slow worker still ran a kept stolen task
])
def test_seeds_that_found_bugs_pass(seed):
    """Seeds that replayed a bug before it was fixed (seed 75119's, a fetched copy
    deleted under a recompute, no longer happens since the simulator pauses
    workers: tests/test_scheduler.py plays it event by event)."""
    sim.run_seed(seed)


def test_same_seed_same_run():
    a, b = sim.run_seed(7), sim.run_seed(7)
    assert (a.now, a._seq, a.nfaults) == (b.now, b._seq, b.nfaults)


def test_skipped_release_is_reported_and_replays(monkeypatch):
    def release_without_freeing(self, cs, keys):
        for key in keys:
            ts = self.tasks.get(key)
            if ts is not None:
                _unwant(ts, cs.id)
                cs.wants.pop(ts, None)   # ... but never _release_if_unneeded
    monkeypatch.setattr(Scheduler, "_on_release", release_without_freeing)
    failure = first_failure()
    assert "left" in failure.message or "still holds" in failure.message
    replays(failure)


def test_no_reschedule_on_worker_death_is_reported_and_replays(monkeypatch):
    remove = Scheduler._remove_worker

    def forget_running_tasks(self, ws, reason):
        running = dict(ws.processing)
        ws.processing.clear()
        remove(self, ws, reason)
        ws.processing.update(running)   # they stay assigned to the dead worker
    monkeypatch.setattr(Scheduler, "_remove_worker", forget_running_tasks)
    failure = first_failure()
    assert "removed worker" in failure.message or "processing" in failure.message
    replays(failure)


def test_double_assign_after_steal_is_reported_and_replays(monkeypatch):
    def steal_keeping_victim(self, ws, key, ok):
        ts = self.tasks.get(key)
        thief = self._stealing.pop(ts, None) if ts is not None else None
        if ok and ts is not None and ts.state == "processing" and ts.worker is ws and \
                thief is not None and self.workers.get(thief.address) is thief:
            self._assign(ts, thief)      # ... without taking it out of ws.processing
    monkeypatch.setattr(Scheduler, "_on_steal_response", steal_keeping_victim)
    failure = first_failure(2000)
    assert "processes" in failure.message
    replays(failure)


@pytest.mark.timeout(60)
def test_command_line_reports_and_replays():
    out = subprocess.run([sys.executable, "-m", "minidist.sim", "--seeds", "20", "--seed", "100"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "20 seeds from 100: 0 failed" in out.stdout
    out = subprocess.run([sys.executable, "-m", "minidist.sim", "--seed", "3", "--verbose"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("seed 3 passed"), out.stdout[-2000:]
    assert "update_graph" in out.stdout


def test_a_task_never_released_from_its_schedule_is_a_forbidden_transition(monkeypatch):
    """The deleted statement: ``_unschedule`` leaves the task in its scheduled state, so it
    later goes straight to erred or memory, which ``TRANSITIONS`` does not allow."""
    unschedule = Scheduler._unschedule

    def keep_state(self, ts):
        state = ts.state
        unschedule(self, ts)
        ts.state = state
    monkeypatch.setattr(Scheduler, "_unschedule", keep_state)
    failure = first_failure()
    assert "is not allowed" in failure.message or "removed worker" in failure.message
    replays(failure)


def test_every_transition_goes_through_the_table(monkeypatch):
    """Taking one allowed change out of the table fails the simulator at once."""
    from minidist import scheduler
    table = dict(scheduler.TRANSITIONS)
    table[scheduler.PROCESSING] = table[scheduler.PROCESSING] - {scheduler.MEMORY}
    monkeypatch.setattr(scheduler, "TRANSITIONS", table)
    failure = first_failure(50)
    assert "processing -> memory is not allowed" in failure.message


def test_validate_names_a_broken_table():
    from minidist.scheduler import InvariantError
    sched = Scheduler(address="center:1", id="center")
    sched.worker_added(0.0, "w0", "w0:1", 1)
    sched.client_added(0.0, "client", "c")
    sched.client_msgs(0.1, "client", "c", [{"op": "update_graph", "tasks": [
        ("x", "spec-x", (), {})], "wants": ["x"]}])
    sched.worker_msgs(0.2, "w0", "w0:1", [{"op": "task_finished", "key": "x", "nbytes": 8,
                                           "duration": 0.01}])
    sched.validate()
    sched.workers["w0:1"].nbytes += 1  # the deleted statement: a count not kept
    with pytest.raises(InvariantError, match="counts 9 bytes, holds 8"):
        sched.validate()
