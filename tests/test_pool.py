"""The master's worker policy (pool.py), driven with a fake clock and process table."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from prefork_smtpd.pool import (
    CRASH_WINDOW, DIED, FIRST_BACKOFF, MAX_BACKOFF, MAX_TARGET, RECYCLED, STOPPED, WORKER_SLOTS, WorkerPool,
)


class FakeProcesses:
    """Plays the master against a pool: forks are table entries, accepting is a set."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.pids = itertools.count(1000)
        self.accepting: set[int] = set()
        self.now = 0.0

    def is_accepting(self, info) -> bool:
        return info.pid in self.accepting

    def step(self) -> None:
        """One pass of the master's manage_workers and report_readiness."""
        pool = self.pool
        for info in pool.to_retire(self.is_accepting):
            info.retiring = True
        for _ in range(pool.spawn_count(self.now)):
            index = pool.free_index()
            assert index is not None
            pool.added(index, next(self.pids), self.now)
        if pool.ready_generation != pool.generation and pool.generation_ready(self.is_accepting):
            for info in pool.older_generations():
                info.retiring = True
            pool.ready_generation = pool.generation

    def accept_all(self) -> None:
        self.accepting |= {pid for pid, w in self.pool.workers.items() if not w.retiring}

    def exit(self, info, clean: bool = True) -> str:
        self.accepting.discard(info.pid)
        return self.pool.removed(info.pid, clean, self.now)[1]

    def exit_leaving(self) -> None:
        for info in [w for w in self.pool.workers.values() if w.retiring]:
            self.exit(info)

    def settle(self, rounds: int = 20) -> None:
        """Workers start and accept, leaving ones finish: until nothing changes."""
        for _ in range(rounds):
            self.step()
            self.accept_all()
            self.exit_leaving()
            self.now += 0.01


# ------------------------------------------------------------ crash backoff
def crash_once(procs: FakeProcesses) -> float:
    """Let the missing worker start, then kill it young; the backoff that follows."""
    procs.now = max(procs.now, procs.pool.backoff.next_spawn)
    procs.step()
    (young,) = procs.pool.active()
    procs.now += 0.01
    assert procs.exit(young, clean=False) == DIED
    return procs.pool.backoff.delay


def test_crash_backoff_doubles_up_to_its_cap():
    procs = FakeProcesses(WorkerPool(1))
    delays = [crash_once(procs) for _ in range(10)]
    assert delays[0] == FIRST_BACKOFF
    assert all(b == min(2 * a, MAX_BACKOFF) for a, b in zip(delays, delays[1:]))
    assert delays[-1] == MAX_BACKOFF
    # and no fork before the wait is over
    assert procs.pool.spawn_count(procs.pool.backoff.next_spawn - 0.01) == 0
    assert procs.pool.spawn_count(procs.pool.backoff.next_spawn) == 1


def test_a_worker_living_past_the_crash_window_resets_the_backoff():
    procs = FakeProcesses(WorkerPool(1))
    for _ in range(8):
        crash_once(procs)
    assert procs.pool.backoff.delay == MAX_BACKOFF
    procs.now = procs.pool.backoff.next_spawn
    procs.step()  # the cause is gone: this one stays up
    (survivor,) = procs.pool.active()
    procs.now += CRASH_WINDOW
    procs.step()
    # It has lived long enough, and it still runs. Its replacement (it is
    # recycled) dying young waits the first backoff, not the cap.
    survivor.recycling = True
    assert crash_once(procs) == FIRST_BACKOFF


def test_a_long_lived_old_worker_does_not_reset_the_backoff():
    procs = FakeProcesses(WorkerPool(2))
    procs.settle()
    procs.now += 60
    procs.exit(procs.pool.active()[0], clean=False)  # an old death: no backoff
    assert procs.pool.backoff.delay == 0
    for _ in range(4):
        crash_once_of_two(procs)
    # the survivor was started before the crashes: it proves nothing
    assert procs.pool.backoff.delay == FIRST_BACKOFF * 8


def crash_once_of_two(procs: FakeProcesses) -> None:
    procs.now = max(procs.now, procs.pool.backoff.next_spawn)
    procs.step()
    young = max(procs.pool.active(), key=lambda w: w.started)
    procs.now += 0.01
    assert procs.exit(young, clean=False) == DIED


def test_planned_exits_never_feed_the_backoff():
    procs = FakeProcesses(WorkerPool(2))
    procs.settle()
    told, quota = procs.pool.active()
    told.retiring = True
    assert procs.exit(told) == STOPPED
    quota.recycling = True
    procs.settle()
    assert procs.pool.backoff.delay == 0
    assert procs.pool.spawn_count(procs.now) == 0
    assert len(procs.pool.active()) == 2


def test_a_death_after_the_crash_window_is_replaced_at_once():
    procs = FakeProcesses(WorkerPool(1))
    procs.settle()
    procs.now += CRASH_WINDOW
    assert procs.exit(procs.pool.active()[0], clean=False) == DIED
    assert procs.pool.spawn_count(procs.now) == 1


# ------------------------------------------------------------------ recycling
def test_a_recycled_worker_leaves_only_once_its_replacement_accepts():
    procs = FakeProcesses(WorkerPool(1))
    procs.settle()
    (old,) = procs.pool.active()
    old.recycling = True
    procs.step()
    assert not old.retiring  # it keeps serving
    (new,) = procs.pool.active()
    assert new is not old
    procs.step()
    assert not old.retiring  # the replacement does not accept yet
    procs.accepting.add(new.pid)
    procs.step()
    assert old.retiring
    assert procs.exit(old) == RECYCLED
    assert procs.pool.backoff.delay == 0


# ------------------------------------------------------------ generations
def test_a_generation_is_ready_only_when_every_worker_accepts():
    procs = FakeProcesses(WorkerPool(3))
    procs.settle()
    old = set(procs.pool.workers)
    procs.pool.generation += 1  # a reload
    procs.step()
    new = set(procs.pool.workers) - old
    assert len(new) == 3
    for pid in sorted(new)[:2]:
        procs.accepting.add(pid)
        procs.step()
        assert procs.pool.ready_generation == 0
        assert not any(procs.pool.workers[p].retiring for p in old)
    procs.accepting.add(max(new))
    procs.step()
    assert procs.pool.ready_generation == 1
    assert all(procs.pool.workers[p].retiring for p in old)


def test_a_reload_at_the_largest_pool_fits_two_generations():
    procs = FakeProcesses(WorkerPool(MAX_TARGET))
    procs.settle()
    procs.pool.generation += 1
    procs.step()
    assert len(procs.pool.active()) == MAX_TARGET
    assert len(procs.pool.workers) == 2 * MAX_TARGET <= WORKER_SLOTS


def test_the_target_stays_within_the_documented_range():
    pool = WorkerPool(500)
    assert pool.target == MAX_TARGET
    pool.target += 1
    assert pool.target == MAX_TARGET
    pool.target = 0
    assert pool.target == 1


def test_when_slots_run_short_older_generations_give_way():
    # Two reloads in a row at the largest pool, the second before the first
    # one's workers accept: every slot is taken, and the generation in the
    # middle will never be ready. Forking must wait, not fail, and that
    # generation must give its slots to the newest.
    procs = FakeProcesses(WorkerPool(MAX_TARGET))
    procs.settle()
    procs.pool.generation += 1
    procs.step()
    procs.pool.generation += 1
    procs.step()
    assert procs.pool.free_index() is None
    assert procs.pool.lacks_slots() == MAX_TARGET
    superseded = [w for w in procs.pool.workers.values() if w.generation == 1]
    assert superseded and all(w.retiring for w in superseded)
    assert not any(w.retiring for w in procs.pool.workers.values() if w.generation == 0)  # still serving
    procs.settle()
    assert len(procs.pool.active()) == MAX_TARGET
    assert procs.pool.ready_generation == procs.pool.generation


def test_slots_held_by_leaving_workers_make_forking_wait():
    procs = FakeProcesses(WorkerPool(MAX_TARGET))
    procs.settle()
    procs.pool.generation += 1
    procs.step()
    procs.accept_all()
    procs.step()  # generation 1 ready, generation 0 leaving (still running)
    procs.pool.generation += 1
    procs.step()
    assert len(procs.pool.workers) == WORKER_SLOTS
    assert procs.pool.spawn_count(procs.now) == 0
    procs.settle()
    assert len(procs.pool.active()) == MAX_TARGET
    assert procs.pool.ready_generation == procs.pool.generation


EVENTS = st.sampled_from(["ttin", "ttou", "reload", "accept", "crash", "recycle", "leave", "tick", "settle"])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, MAX_TARGET), st.lists(st.tuples(EVENTS, st.integers(0, 10**6)), max_size=60))
def test_any_sequence_keeps_the_slots_and_ends_ready(target, events):
    """Whatever happens, slots are never over-used or shared, and once the
    workers start and the leaving ones exit, the pool has its target ready."""
    procs = FakeProcesses(WorkerPool(target))
    pool = procs.pool
    for event, pick in events:
        workers = list(pool.workers.values())
        chosen = workers[pick % len(workers)] if workers else None
        if event == "ttin":
            pool.target += 1
        elif event == "ttou":
            pool.target -= 1
        elif event == "reload":
            pool.generation += 1
        elif event == "accept":
            procs.accept_all()
        elif event == "crash" and chosen:
            procs.exit(chosen, clean=False)
        elif event == "recycle" and chosen and chosen in pool.active():
            chosen.recycling = True
        elif event == "leave":
            procs.exit_leaving()
        elif event == "tick":
            procs.now += pick / 1e5
        elif event == "settle":
            procs.settle(3)
        procs.step()
        indices = [w.index for w in pool.workers.values()]
        assert len(indices) == len(set(indices)) <= WORKER_SLOTS
        assert all(1 <= i <= WORKER_SLOTS for i in indices)
        # counts, never negative: what is missing has a slot, or lacks one
        assert 0 <= pool.spawn_count(procs.now) <= WORKER_SLOTS - len(indices)
        assert pool.lacks_slots() >= 0
    procs.now += MAX_BACKOFF
    procs.settle(40)
    assert len(pool.active()) == pool.target
    assert pool.ready_generation == pool.generation
    assert not pool.recycling()
    assert all(w.generation == pool.generation for w in pool.workers.values())


# ------------------------------------------------ the documented figures
def test_the_backoff_is_the_documented_series():
    # README: respawns back off, doubling up to 10 s (from 0.1 s).
    procs = FakeProcesses(WorkerPool(1))
    delays = [crash_once(procs) for _ in range(9)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]


def test_dying_within_5_s_of_the_start_is_a_crash_and_later_is_not():
    # README: "if workers keep dying young (within 5 s of their start)".
    for lifetime, crash in ((4.9, True), (5.0, False)):
        procs = FakeProcesses(WorkerPool(1))
        procs.step()
        (worker,) = procs.pool.active()
        procs.now += lifetime
        assert procs.exit(worker, clean=False) == DIED
        assert procs.pool.spawn_count(procs.now) == (0 if crash else 1), lifetime


@pytest.mark.parametrize("seen_at", [5.0, 7.0])
def test_the_backoff_holds_until_a_new_worker_stays_up_5_s(seen_at):
    # README: "until a new worker stays up for 5 s": a younger one proves
    # nothing yet; one seen alive at 5 s or any time later does.
    procs = FakeProcesses(WorkerPool(1))
    for _ in range(3):
        crash_once(procs)
    procs.now = procs.pool.backoff.next_spawn
    procs.step()
    (survivor,) = procs.pool.active()
    for age in (0.5, 4.9):
        procs.now = survivor.started + age
        procs.step()
        assert procs.pool.backoff.delay == 0.4, age
    procs.now = survivor.started + seen_at
    procs.step()
    assert procs.pool.backoff.delay == 0


# ------------------------------------------------------ counts and slots
def test_a_pool_above_its_target_forks_nothing_and_lacks_no_slot():
    procs = FakeProcesses(WorkerPool(3, slots=8))
    procs.settle()
    assert procs.pool.lacks_slots() == 0  # five slots free: none lacking, never less
    procs.pool.target = 1  # two TTOUs, before the extra workers are told to leave
    assert procs.pool.spawn_count(procs.now) == 0
    assert procs.pool.lacks_slots() == 0
    procs.settle()
    assert len(procs.pool.workers) == 1


def test_a_never_ready_generation_gives_its_slots_at_once():
    # Generation 0 never accepts; a reload that also grows the pool finds
    # too few slots. Generation 0 serves nobody, so it gives way without
    # waiting for a new worker to accept.
    procs = FakeProcesses(WorkerPool(2, slots=4))
    procs.step()
    assert procs.pool.ready_generation != procs.pool.generation
    procs.pool.target = 3
    procs.pool.generation += 1
    procs.step()
    assert procs.pool.lacks_slots() == 1
    assert [w.generation for w in procs.pool.workers.values() if w.retiring] == [0]


def test_the_ready_generation_gives_way_only_while_a_new_worker_accepts():
    # Generation 0 serves the port; a reload grows the pool past the free
    # slots, so one worker of generation 0 must make room, but only once
    # the port is served by a new worker, and only one of them.
    procs = FakeProcesses(WorkerPool(2, slots=4))
    procs.settle()
    old = list(procs.pool.workers.values())
    procs.pool.target = 3
    procs.pool.generation += 1
    procs.step()
    new = procs.pool.active()
    assert len(new) == 2 and procs.pool.lacks_slots() == 1
    for _ in range(3):
        procs.step()
        assert not any(w.retiring for w in procs.pool.workers.values())  # nobody new accepts yet
    procs.accepting.add(new[0].pid)
    procs.step()
    assert [w.retiring for w in old].count(True) == 1
    procs.accept_all()
    procs.step()  # the leaving one still holds its slot: nobody else leaves for it
    assert [w.retiring for w in old].count(True) == 1
    assert all(not w.retiring for w in new)
    procs.settle()
    assert len(procs.pool.active()) == 3
    assert procs.pool.ready_generation == procs.pool.generation


def test_leaving_workers_count_once_toward_the_slots_needed():
    # One worker already leaves (recycled, still finishing). A reload that
    # grows the pool lacks two slots: that worker frees one, so exactly one
    # more worker of the serving generation gives way.
    procs = FakeProcesses(WorkerPool(2, slots=5))
    procs.settle()
    recycled = procs.pool.active()[0]
    recycled.recycling = True
    procs.step()
    procs.accept_all()
    procs.step()
    assert recycled.retiring
    procs.pool.target = 4
    procs.pool.generation += 1
    procs.step()
    assert procs.pool.lacks_slots() == 2
    procs.accepting.add(procs.pool.active()[0].pid)
    procs.step()
    leaving = [w for w in procs.pool.workers.values() if w.retiring]
    assert len(leaving) == 2 and recycled in leaving


def test_with_slots_to_spare_older_generations_wait_for_the_newest():
    # Two reloads in a row with free slots left, and a worker of the newest
    # generation leaving (fewer workers): nobody of an older generation
    # needs to make room, so all of them stay until the newest is ready.
    procs = FakeProcesses(WorkerPool(2, slots=8))
    procs.settle()
    for _ in range(2):
        procs.pool.generation += 1
        procs.step()
    procs.pool.target = 1
    procs.step()
    for _ in range(3):
        procs.step()
        assert [w.generation for w in procs.pool.workers.values() if w.retiring] == [2]
    procs.settle()
    assert [w.generation for w in procs.pool.workers.values()] == [2]


@pytest.mark.parametrize("grown, leaving", [(3, [1]), (4, [1, 1]), (5, [0, 1, 1])])
def test_a_never_ready_generation_gives_way_before_the_serving_one(grown, leaving):
    # Generation 0 serves, generation 1 never got ready (a second reload
    # overtook it), generation 2 accepts but lacks slots once the pool
    # grows: generation 1's workers leave, not serving ones.
    procs = FakeProcesses(WorkerPool(2, slots=6))
    procs.settle()
    for _ in range(2):
        procs.pool.generation += 1
        procs.step()
    assert len(procs.pool.workers) == 6
    procs.accepting.add(procs.pool.active()[0].pid)
    procs.pool.target = grown
    procs.step()
    assert [w.generation for w in procs.pool.workers.values() if w.retiring] == leaving


def test_recycled_workers_leave_only_once_their_replacements_cover_the_target():
    procs = FakeProcesses(WorkerPool(2))
    procs.settle()
    old = procs.pool.active()
    for info in old:
        info.recycling = True
    procs.step()
    new = procs.pool.active()
    assert len(new) == 2
    procs.accepting.add(new[0].pid)
    procs.step()
    assert not any(w.retiring for w in old)  # one replacement accepts: the port needs both old ones
    procs.accepting.add(new[1].pid)
    procs.step()
    assert all(w.retiring for w in old)
