"""The master's decisions without forking: a clock the test sets, a process
table filled by hand, kills and log lines recorded. What a mutation run of
master.py found unchecked: the stop deadlines, when the loop pauses, when
it looks again, what it logs for a young death and for a reload."""

from __future__ import annotations

import dataclasses
import logging
import signal

import pytest

from harness import wait_until

from prefork_smtpd import master as master_module
from prefork_smtpd.control import TokenGate
from prefork_smtpd.master import LONGEST_ERROR_PAUSE, Master
from prefork_smtpd.pool import CRASH_WINDOW, WorkerPool
from prefork_smtpd.sdnotify import Notifier
from prefork_smtpd.settings import Settings
from prefork_smtpd.stats import FIELD, SharedStats

START = 1000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class Recorded(Master):
    """A master that never forks, signals or writes a log: it records."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        super().__init__(settings, lambda: dataclasses.replace(settings), clock=clock)
        self.gate = TokenGate(None, settings.config_login_failures_per_minute)
        self.stats = SharedStats()
        self.control.attach(self.stats)
        self.logger = logging.getLogger("test-master")
        self.services = []
        self.listeners = []
        self.lines: list[str] = []
        self.kills: list[tuple[int, int]] = []

    def log(self, message: str) -> None:
        self.lines.append(message)

    def kill(self, pid: int, signum: int) -> None:
        self.kills.append((pid, signum))


@pytest.fixture
def clock() -> Clock:
    return Clock()


def a_master(clock: Clock, tmp_path, workers: int = 2, **settings) -> Recorded:
    m = Recorded(Settings(workers=workers, hostname="h", mail_dir=str(tmp_path), **settings), clock)
    for index, pid in enumerate(range(4001, 4001 + workers), start=1):
        m.pool.added(index, pid, START)
    return m


# ------------------------------------------------------------------ stopping
def test_a_graceful_stop_kills_only_workers_still_there_5s_after_the_graceful_timeout(clock, tmp_path):
    m = a_master(clock, tmp_path, graceful_timeout=30)
    m.stop(graceful=True)
    assert m.kills == [(4001, signal.SIGTERM), (4002, signal.SIGTERM)]
    clock.now = START + 34.9  # sessions had 30 s, the workers 5 more to exit
    m.check_stop()
    assert m.kills[2:] == [] and m.running
    clock.now = START + 35
    m.check_stop()
    assert m.kills[2:] == [(4001, signal.SIGKILL), (4002, signal.SIGKILL)]
    assert "worker 1 (pid 4001) did not stop in time; killing it" in m.lines
    assert m.running  # until they are reaped
    assert m.stop_deadline == START + 40  # and again 5 s later if they are not


def test_a_fast_stop_gives_the_workers_5s(clock, tmp_path):
    m = a_master(clock, tmp_path, graceful_timeout=30)
    m.stop(graceful=False)
    assert m.kills == [(4001, signal.SIGQUIT), (4002, signal.SIGQUIT)]
    clock.now = START + 4.9
    m.check_stop()
    assert len(m.kills) == 2
    clock.now = START + 5
    m.check_stop()
    assert m.kills[2:] == [(4001, signal.SIGKILL), (4002, signal.SIGKILL)]


def test_the_master_runs_until_its_last_worker_is_gone(clock, tmp_path):
    m = a_master(clock, tmp_path)
    m.check_stop()
    assert m.running  # not stopping
    m.stop(graceful=True)
    m.check_stop()
    assert m.running  # both workers still there
    m.pool.removed(4001, True, clock(), stopping=True)
    m.check_stop()
    assert m.running
    m.pool.removed(4002, True, clock(), stopping=True)
    m.check_stop()
    assert not m.running


# ------------------------------------------------------- errors in the loop
def test_only_a_paused_wait_for_events_sleeps_the_others_are_skipped(clock, tmp_path, monkeypatch):
    m = a_master(clock, tmp_path)
    ran: list[str] = []
    for step in Master.LOOP_STEPS:
        setattr(m, step, lambda step=step: ran.append(step))
    slept: list[float] = []
    monkeypatch.setattr(master_module.time, "sleep", slept.append)
    m.step_failures["manage_workers"] = (1, START + 3, "")  # paused for 3 s more
    m.run_steps()
    assert slept == [] and "manage_workers" not in ran
    assert ran == [s for s in Master.LOOP_STEPS if s != "manage_workers"]
    ran.clear()
    m.step_failures["wait_for_events"] = (1, START + 30, "")
    m.run_steps()
    assert slept == [LONGEST_ERROR_PAUSE]  # pauses here, never spins, at most the longest pause
    assert "wait_for_events" not in ran


def test_a_failing_step_pauses_0_1s_then_doubling_up_to_5s(clock, tmp_path):
    # README: "tried again after a pause (0.1 s, doubling up to 5 s)"
    m = a_master(clock, tmp_path)
    pauses = []
    for _ in range(8):
        try:
            raise RuntimeError("injected")
        except RuntimeError:
            m.step_failed("manage_workers")
        pauses.append(round(m.step_failures["manage_workers"][1] - clock(), 6))
    assert pauses == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


# --------------------------------------------------------------- waiting
def test_the_master_looks_again_soon_while_new_workers_start(clock, tmp_path):
    m = a_master(clock, tmp_path)
    assert m.wait_time() <= 0.05  # the first workers start
    m.ready_generation = m.generation  # they accept
    assert m.wait_time() == 1.0  # nothing to watch: the idle tick
    m.generation = 1  # a reload forked a new generation that does not accept yet
    for index, pid in ((3, 5001), (4, 5002)):
        m.pool.added(index, pid, START)
    assert m.wait_time() <= 0.05


def test_a_stopping_master_wakes_at_its_kill_deadline(clock, tmp_path):
    m = a_master(clock, tmp_path)
    m.ready_generation = m.generation
    m.stop(graceful=False)
    clock.now = START + 4.7
    assert m.wait_time() == pytest.approx(0.3)  # not a whole idle tick past the deadline
    clock.now = START + 6
    assert m.wait_time() == 0.0


def test_a_master_waiting_out_a_crash_backoff_wakes_when_it_may_fork(clock, tmp_path):
    m = a_master(clock, tmp_path, workers=2)
    m.ready_generation = m.generation
    m.pool.removed(4002, False, clock())  # died at once: a crash, the next fork waits
    assert m.pool.backoff.next_spawn > clock()
    clock.now = m.pool.backoff.next_spawn - 0.4
    assert m.wait_time() == pytest.approx(0.4)


class Statuses(Notifier):
    """systemd's notify socket, recorded."""

    enabled = True

    def __init__(self) -> None:
        super().__init__({})
        self.sent: list[dict] = []

    def send(self, **fields) -> None:
        self.sent.append(fields)


def test_the_status_line_for_systemd_goes_every_2s(clock, tmp_path):
    m = a_master(clock, tmp_path)
    m.ready_generation = m.generation
    m.notifier = Statuses()
    for now in (START, START + 1, START + 1.9, START + 2, START + 3):
        clock.now = now
        m.report_readiness()
    assert [fields["STATUS"].startswith("2 workers") for fields in m.notifier.sent] == [True, True]


def test_the_open_file_limit_is_raised_to_the_hard_one_or_left_where_a_sandbox_keeps_it(monkeypatch):
    monkeypatch.setattr(master_module.resource, "getrlimit", lambda which: (1024, 65536))
    raised = []
    monkeypatch.setattr(master_module.resource, "setrlimit", lambda which, limits: raised.append(limits))
    assert master_module.raise_open_file_limit() == 65536 and raised == [(65536, 65536)]

    def forbidden(which, limits):
        raise PermissionError(1, "Operation not permitted")  # systemd's @resources filter

    monkeypatch.setattr(master_module.resource, "setrlimit", forbidden)
    assert master_module.raise_open_file_limit() == 1024


def test_an_unreadable_certificate_is_a_startup_error_naming_it(tmp_path, monkeypatch):
    # StartupError is what the front end turns into "exit 2 with the reason".
    monkeypatch.setattr(master_module, "raise_open_file_limit", lambda: 1024)
    missing = tmp_path / "missing.pem"
    m = Master(Settings(workers=1, hostname="h", mail_dir=str(tmp_path), tls_cert=str(missing)))
    with pytest.raises(master_module.StartupError, match="missing.pem"):
        m.run()


# ------------------------------------------------------------ worker slots
def test_an_old_worker_giving_its_slot_to_the_new_generation_is_logged(clock, tmp_path):
    m = a_master(clock, tmp_path)
    m.pool = WorkerPool(2, slots=3)  # room for one new worker beside the two old ones
    m.spawn_worker = lambda index: pytest.fail("no slot is free: nothing to fork")
    for index, pid in ((1, 4001), (2, 4002)):
        m.pool.added(index, pid, START)
    m.ready_generation = 0
    m.generation = 1  # a reload
    m.pool.added(3, 5001, START)  # the new generation's first worker accepts
    m.stats.slot(3).set(FIELD["accepting"], 1)
    m.manage_workers()
    assert m.kills == [(4001, signal.SIGHUP)]
    assert "worker 1 (pid 4001) of generation 0 leaves early: its slot is needed" in m.lines


# ------------------------------------------------------------ log lines
def test_each_reload_starts_the_next_generation(clock, tmp_path):
    m = a_master(clock, tmp_path)
    for generation in (1, 2, 3):  # "reload done: generation N" counts the reloads
        assert m.reload() is None
        assert m.generation == generation
        m.ready_generation = generation


def test_reload_done_is_logged_for_a_reload_not_for_the_start(clock, tmp_path):
    m = a_master(clock, tmp_path)
    m.handover_pending = True  # generation 0 accepts: the start
    m.finish_handover(clock())
    assert not [line for line in m.lines if "reload done" in line]
    m.generation = 1
    m.handover_pending = True
    m.finish_handover(clock())
    assert "reload done: generation 1 accepting" in m.lines


def test_reload_done_waits_for_the_old_workers_to_stop_accepting_or_the_handover_deadline(clock, tmp_path):
    m = a_master(clock, tmp_path)  # workers 1 and 2, generation 0
    m.stats.slot(1).set(FIELD["accepting"], 1)  # worker 1 has not handled its HUP yet
    m.generation = 1
    m.handover_pending = True
    m.handover_deadline = START + 5
    m.finish_handover(clock())
    assert m.handover_pending and not [line for line in m.lines if "reload" in line]
    clock.now = START + 5
    m.finish_handover(clock())
    assert m.lines == ["reload: 1 old worker still accepting after 5s", "reload done: generation 1 accepting"]
    assert not m.handover_pending


def test_a_worker_count_out_of_range_is_refused_and_logged_one_in_range_is_not(clock, tmp_path):
    m = a_master(clock, tmp_path)
    m.set_worker_count(3)
    assert m.lines == ["workers: 2 -> 3"] and m.target_workers == 3
    m.set_worker_count(200)
    assert m.lines[1:] == ["workers: 200 refused, the pool stays within 1..128; keeping 128", "workers: 3 -> 128"]
    assert m.target_workers == 128 and m.stats.get("workers") == 128


@pytest.mark.parametrize("lived, young", [(1.5, True), (CRASH_WINDOW - 0.1, True), (CRASH_WINDOW, False), (60, False)])
def test_a_worker_dying_young_is_logged_with_the_next_fork(clock, tmp_path, monkeypatch, lived, young):
    m = a_master(clock, tmp_path, workers=1)
    exits = [(4001, signal.SIGKILL)]  # a wait status: killed by signal 9

    def waitpid(pid: int, options: int) -> tuple[int, int]:
        if not exits:
            raise ChildProcessError
        return exits.pop()

    monkeypatch.setattr(master_module.os, "waitpid", waitpid)
    clock.now = START + lived
    m.reap_workers()
    assert f"worker 1 (pid 4001) died: killed by SIGKILL; replacing it" in m.lines, m.lines
    crash = [line for line in m.lines if line.startswith("worker died")]
    if young:
        assert crash == [f"worker died {lived:.1f}s after start; next fork in {m.pool.backoff.delay:.1f}s"]
    else:
        assert crash == []
    assert m.stats.slot(1).get(master_module.FIELD["restarts"]) == 1


# -------------------------------------------------------------- the child
def caught_signals(pid: int) -> set[int]:
    """The signals a process has handlers for (/proc: SigCgt)."""
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    return {signum for signum in range(1, 65) if mask >> (signum - 1) & 1}


MASTER_ONLY = {signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2, signal.SIGINT}


def test_a_worker_keeps_none_of_the_masters_signal_handlers(start_server):
    # TTIN/TTOU/USR2 address the master; a worker that kept the master's
    # handlers would queue them in its copy of the master, for nobody.
    server = start_server(workers=1)
    wait_until(lambda: len(server.accepting_workers()) == 1, what="the worker to accept")
    (worker,) = server.worker_pids()
    assert MASTER_ONLY <= caught_signals(server.proc.pid)
    caught = caught_signals(worker)
    assert {signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1} <= caught  # its own
    assert not caught & MASTER_ONLY, caught & MASTER_ONLY
