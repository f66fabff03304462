"""The master's decisions about its workers, without a single process.

The master owns the processes (fork, kill, waitpid) and this module decides:
how many workers to fork now, which ones to retire, when a new generation
is ready, how long to wait after a crash. Every decision takes the time and
the workers' readiness as arguments, so tests drive it with a clock of
their own and a fake process table.

Rules, in the order they matter:

* At most ``slots`` workers exist at once (one shared-memory slot each).
  A reload needs room for two full generations, so the pool target is at
  most half the slots; when slots still run short (workers of an older
  generation still finishing their sessions), forking waits, and older
  generations give way so a reload can never wait on itself.
* A worker that leaves because it was told to (reload, fewer workers,
  stop) or because it served its quota (recycling) is not a crash: it
  never feeds the crash backoff.
* A recycled worker keeps serving until its replacement accepts.
* A generation is ready when it has its full count of workers and every
  one of them accepts; only then are the older ones retired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .settings import RANGES
from .stats import MAX_WORKERS

MAX_BACKOFF = 10.0  # seconds between respawns of a worker that keeps crashing
FIRST_BACKOFF = 0.1  # the wait after the first young death
CRASH_WINDOW = 5.0  # a worker dying sooner than this after its start counts as a crash
MAX_TARGET = RANGES["workers"][1]  # the most workers one generation may have
WORKER_SLOTS = MAX_WORKERS - 1  # shared-memory slots 1..MAX_WORKERS-1; slot 0 is the queue runner's
assert 2 * MAX_TARGET <= WORKER_SLOTS, "a reload must fit two full generations in the slots"

# How a worker left, as reap_workers reports it.
STOPPED = "stopped"  # told to leave (reload, fewer workers, stop)
RECYCLED = "recycled"  # asked to leave after its quota, and was replaced first
DIED = "died"  # left on its own: replaced, maybe after a backoff


@dataclass
class WorkerInfo:
    index: int  # its shared-memory slot
    pid: int
    started: float
    generation: int
    retiring: bool = False  # told to leave; not to be replaced
    recycling: bool = False  # served its quota; leaves once its replacement accepts


class CrashBackoff:
    """The wait before the next fork while workers keep dying young.

    Each young death doubles the wait (from FIRST_BACKOFF, capped at
    MAX_BACKOFF); a worker started after the last crash that then lives
    past CRASH_WINDOW shows the cause is gone, and the wait drops to zero.
    """

    def __init__(self) -> None:
        self.delay = 0.0
        self.next_spawn = 0.0
        self.last_crash = -math.inf

    def crashed(self, now: float) -> float:
        """A worker died young: the seconds until the next fork."""
        self.delay = min(max(self.delay * 2, FIRST_BACKOFF), MAX_BACKOFF)
        self.next_spawn = now + self.delay
        self.last_crash = now
        return self.delay

    def lived(self, started: float, now: float) -> None:
        """A worker started at ``started`` is alive at ``now``."""
        if self.delay and started >= self.last_crash and now - started >= CRASH_WINDOW:
            self.delay = 0.0

    def may_spawn(self, now: float) -> bool:
        return now >= self.next_spawn


class WorkerPool:
    """The process table as the master sees it, and the policy over it."""

    def __init__(self, target: int, slots: int = WORKER_SLOTS) -> None:
        self.slots = slots
        self._target = clamp_target(target)
        self.workers: dict[int, WorkerInfo] = {}  # by pid
        self.generation = 0
        self.ready_generation = -1  # the last generation that was ready
        self.backoff = CrashBackoff()

    @property
    def target(self) -> int:
        return self._target

    @target.setter
    def target(self, count: int) -> None:
        self._target = clamp_target(count)

    # --------------------------------------------------------- the table
    def added(self, index: int, pid: int, now: float) -> WorkerInfo:
        info = WorkerInfo(index=index, pid=pid, started=now, generation=self.generation)
        self.workers[pid] = info
        return info

    def removed(self, pid: int, clean_exit: bool, now: float, stopping: bool = False) -> tuple[WorkerInfo, str] | None:
        """A worker exited: forget it and say how it left (None: not ours)."""
        info = self.workers.pop(pid, None)
        if info is None:
            return None
        if stopping:
            return info, STOPPED
        if info.recycling and clean_exit:
            return info, RECYCLED
        if info.retiring:
            return info, STOPPED
        if now - info.started < CRASH_WINDOW:
            self.backoff.crashed(now)
        return info, DIED

    def free_index(self) -> int | None:
        """The lowest free slot (1..slots), or None when every slot holds a worker."""
        used = {w.index for w in self.workers.values()}
        return next((i for i in range(1, self.slots + 1) if i not in used), None)

    def active(self) -> list[WorkerInfo]:
        """Workers of the current generation that are staying."""
        return [w for w in self.workers.values() if w.generation == self.generation and not (w.retiring or w.recycling)]

    def recycling(self) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.recycling and not w.retiring]

    # --------------------------------------------------------- decisions
    def spawn_count(self, now: float) -> int:
        """How many workers to fork now: the missing ones that have a slot."""
        for info in self.workers.values():
            self.backoff.lived(info.started, now)
        missing = self.target - len(self.active())
        if missing <= 0 or not self.backoff.may_spawn(now):
            return 0
        return min(missing, self.slots - len(self.workers))

    def lacks_slots(self) -> int:
        """Workers the current generation misses that no free slot can take."""
        return max(self.target - len(self.active()) - (self.slots - len(self.workers)), 0)

    def to_retire(self, accepting: Callable[[WorkerInfo], bool]) -> list[WorkerInfo]:
        """Workers to tell to leave now (they finish their sessions first)."""
        active = self.active()
        if len(active) > self.target:
            return sorted(active, key=lambda w: w.index)[self.target :]
        leaving: list[WorkerInfo] = []
        # A recycled worker leaves once the workers staying cover the target.
        if self.recycling() and sum(1 for w in active if accepting(w)) >= self.target:
            leaving += self.recycling()
        return leaving + self.make_room(accepting)

    def make_room(self, accepting: Callable[[WorkerInfo], bool]) -> list[WorkerInfo]:
        """Older workers that give their slots to the current generation.

        Only when forking waits for slots: first generations that never got
        ready (a newer reload overtook them), then, while at least one new
        worker accepts so the port stays served, the last ready generation.
        Workers already leaving free their slots soon, so they count.
        """
        short = self.lacks_slots() - sum(1 for w in self.workers.values() if w.retiring)
        if short <= 0:
            return []
        older = [w for w in self.workers.values() if not w.retiring and w.generation < self.generation]
        superseded = [w for w in older if w.generation != self.ready_generation]
        serving = [w for w in older if w.generation == self.ready_generation]
        if any(accepting(w) for w in self.active()):
            superseded += serving
        # Never-ready generations first (oldest first), the serving one last:
        # sorting by generation alone would put the serving one first.
        return sorted(superseded, key=lambda w: (w.generation == self.ready_generation, w.generation))[:short]

    def generation_ready(self, accepting: Callable[[WorkerInfo], bool]) -> bool:
        """The current generation has all its workers, and every one accepts."""
        active = self.active()
        return len(active) == self.target and all(accepting(w) for w in active)

    def older_generations(self) -> list[WorkerInfo]:
        """Workers of earlier generations not yet told to leave."""
        return [w for w in self.workers.values() if w.generation < self.generation and not w.retiring]


def clamp_target(count: int) -> int:
    low, high = RANGES["workers"]
    return max(low, min(count, high))
