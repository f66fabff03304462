"""The master (arbiter): binds the ports, forks workers, keeps them alive.

The master runs no asyncio loop (a forked child must never inherit a live
event loop); it waits in a plain ``selectors`` loop on the signal pipe and
its own service sockets. Signal handlers only queue the signal; the main
loop acts on the queue, then reaps dead workers and forks missing ones:

    TERM, INT   graceful stop: the listening sockets close at once (new
                clients are refused); workers finish their transactions,
                then exit
    QUIT        fast stop
    HUP         reload: re-read the config file, fork a new generation of
                workers, and once they accept, retire the old ones (which
                finish their sessions); the port never stops accepting
    TTIN, TTOU  one worker more, one worker less (within 1..128)
    USR1        reopen log files (workers too)
    USR2        a worker served its --max-requests quota: fork its
                replacement, retire it once the replacement accepts
    CHLD        a worker exited: reap it, fold its counters, replace it

Which workers to fork or retire, and when, is decided in pool.py; this
module carries the decisions out. A step of the main loop that fails is
logged with its traceback and tried again after a pause: an unexpected
error never takes the server down.

The master signals its workers the same way: TERM to stop, QUIT to stop
now, HUP to retire, USR1 to reopen the log.
"""

from __future__ import annotations

import logging
import os
import resource
import selectors
import signal
import time
import traceback
from typing import Callable

from setproctitle import setproctitle

from .control import ConfigSession, TokenGate, load_secret
from .controlplane import ControlPlane
from .credentials import Credentials, CredentialsError
from .delivery import remove_temporary_files, replay_journals
from .listeners import SMTP, Listener, ListenError, bind_all, close_all, configured
from .log import close_log, flush_log, open_log, reopen_log, wait_written
from .pool import (
    CRASH_WINDOW, DIED, MAX_BACKOFF, RECYCLED, STOPPED, CrashBackoff, WorkerInfo, WorkerPool, clamp_target,
)
from .queue import Queue, open_wakeup, queue_dir_of
from .relayrights import relay_possible
from .runner import RUNNER_SLOT, run_queue_runner
from .prometheus import make_renderer
from .sdnotify import Notifier
from .services import HttpMetricsRequest, Service, ServiceLimits, listening_socket
from .settings import RANGES, Settings
from .stats import FIELD, RETIRED, SharedStats
from .worker import run_worker

HANDLED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCHLD,
)
FAST_STOP_SECONDS = 5
__all__ = ["CRASH_WINDOW", "MAX_BACKOFF", "Master", "StartupError", "WorkerInfo"]


STATUS_EVERY = 2.0  # seconds between systemd STATUS= updates
HANDOVER_SECONDS = 5.0  # longest wait for old workers to stop accepting after a reload
# A loop step that keeps failing is retried after a pause that doubles up
# to the longest: logged, never a hot loop, never the end of the server.
FIRST_ERROR_PAUSE = 0.1
LONGEST_ERROR_PAUSE = 5.0


class StartupError(Exception):
    """The server cannot start as configured (a port taken, a bad address)."""


def bind_listeners(settings: Settings) -> list[Listener]:
    """Every listener the settings ask for, bound; StartupError names the one that failed."""
    try:
        return bind_all(configured(settings), settings.backlog)
    except ListenError as exc:
        raise StartupError(str(exc)) from None


def master_title(listeners: list[Listener]) -> str:
    """The master's process title: names its ports, so servers on one host differ."""
    return f"prefork-smtpd: master [{', '.join(listener.title() for listener in listeners)}]"


def listening_on(listeners: list[Listener]) -> str:
    """``port 2525 and submission port 2587``, for the start-up log line."""
    return " and ".join(
        f"port {listener.port}" if listener.kind == SMTP else f"{listener.name} port {listener.port}"
        for listener in listeners
    )


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def raise_open_file_limit() -> int:
    """Lift the soft fd limit to the hard one: each session holds a socket.

    Under a sandbox that forbids setrlimit (systemd's @resources filter) the
    limit given to us (LimitNOFILE) stands.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except OSError:
            return soft
    return hard


LOG_CLOSE_WAIT = 5.0  # seconds a stopping master gives its log writer to write what is queued
LOG_REPLY_WAIT = 0.5  # seconds a config port reply waits for the master's lines to be written


class Master:
    # The main loop's steps, in order; each is guarded on its own, so one
    # that fails does not keep the others (a stop signal, say) from running.
    LOOP_STEPS = (
        "manage_workers",
        "manage_runner",
        "flush_log",  # what the last pass logged, before the wait
        "wait_for_events",
        "expire_service_clients",
        "handle_signals",
        "handle_reload_requests",
        "reap_workers",
        "report_readiness",
        "check_stop",
    )
    services: list[Service]  # the config port and /metrics, set by open_services

    def __init__(
        self,
        settings: Settings,
        reread_settings: Callable[[], Settings] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # The settings in force, where they came from, how they change (live,
        # reload); reread_settings builds fresh ones for a reload (config
        # file, then the same flags on top), raising for a bad file.
        self.control = ControlPlane(
            settings, reread_settings, lambda message: self.log(message), {"workers": self.set_worker_count},
        )
        self.clock = clock
        self.pool = WorkerPool(settings.workers)
        self.signal_queue: list[int] = []
        self.stopping = False
        self.stop_deadline = 0.0
        self.running = True
        self.step_failures: dict[str, tuple[int, float, str]] = {}  # step -> (in a row, retry at, last error)
        # Workers waiting for a slot, as last logged. (Any start value below 1
        # is the same: the first look logs only a shortage.)
        self.slots_short = 0  # pragma: no mutate
        self.reload_requests: list[ConfigSession | None] = []  # None: from SIGHUP
        self.reload_waiters: list[ConfigSession] = []
        self.credentials = Credentials()  # the certificate and users, read in run()
        self.notifier = Notifier()
        self.next_status = 0.0
        self.handover_pending = False  # a new generation is ready; old workers are still leaving
        self.handover_deadline = 0.0
        # The queue runner (runner.py): one process in slot 0, restarted
        # like a worker; a planned exit (reload) is no crash.
        self.runner_pid: int | None = None
        self.runner_started = 0.0
        self.runner_backoff = CrashBackoff()
        self.runner_leaving = False

    @property
    def settings(self) -> Settings:
        return self.control.settings

    # The pool holds the process table; these names keep the master's
    # other parts (reload, the config port) reading as they always did.
    @property
    def target_workers(self) -> int:
        return self.pool.target

    @target_workers.setter
    def target_workers(self, count: int) -> None:
        self.pool.target = count

    @property
    def generation(self) -> int:
        return self.pool.generation

    @generation.setter
    def generation(self, value: int) -> None:
        self.pool.generation = value

    @property
    def ready_generation(self) -> int:
        return self.pool.ready_generation

    @ready_generation.setter
    def ready_generation(self, value: int) -> None:
        self.pool.ready_generation = value

    @property
    def workers(self) -> dict[int, WorkerInfo]:
        return self.pool.workers

    # ---------------------------------------------------------------- run
    def run(self) -> int:
        settings = self.settings
        raise_open_file_limit()
        try:
            self.credentials, credential_notes = Credentials.load(settings)
        except CredentialsError as exc:
            raise StartupError(str(exc)) from None
        self.listeners = bind_listeners(settings)
        self.stats = SharedStats()
        self.control.attach(self.stats)
        open_wakeup()  # before any fork: workers tell the queue runner of new mail through it
        try:
            self.logger = self.open_log()
        except OSError as exc:
            raise StartupError(f"cannot open the log file {settings.log_file}: {exc}") from None
        setproctitle(master_title(self.listeners))
        self.selector = selectors.DefaultSelector()
        self.install_signals()
        try:
            self.open_services()
        except OSError as exc:
            # open_services appends each service once it is bound: the
            # count says which one failed.
            if not getattr(self, "services", None):
                where = f"the config port {settings.config_address} port {settings.config_port}"
            else:
                where = f"the metrics port {settings.metrics_address} port {settings.metrics_port}"
            self.close_services()
            raise StartupError(f"cannot listen on {where}: {exc}") from None
        self.log("Server Initialized")
        for line in replay_journals(settings.mail_dir):  # left by a crash: put back before any new mail
            self.log(line)
        for note in credential_notes:
            self.log(note)
        self.log(
            f"listening on {listening_on(self.listeners)} with {plural(self.target_workers, 'worker')},"
            f" domains {', '.join(settings.domains)}"
        )
        # In the file before any worker is forked to serve, as when each line
        # was written at once; a log that cannot be written delays the start
        # by LOG_CLOSE_WAIT at most.
        wait_written(self.logger, LOG_CLOSE_WAIT)
        try:
            try:
                while self.running:
                    self.run_steps()
            finally:
                self.close_services()
                self.notifier.close()
            self.log("Server Shutting Down")
        finally:
            # What is still queued, written before the process ends; a log
            # that cannot be written gets LOG_CLOSE_WAIT, not the stop itself.
            close_log(self.logger, wait=LOG_CLOSE_WAIT)
        return 0

    def run_steps(self) -> None:
        """One pass of the main loop, each step guarded on its own."""
        for step in self.LOOP_STEPS:
            failure = self.step_failures.get(step)
            if failure is not None and self.clock() < failure[1]:
                if step == "wait_for_events":  # pause here rather than spin
                    time.sleep(min(failure[1] - self.clock(), LONGEST_ERROR_PAUSE))
                continue
            try:
                getattr(self, step)()
            except Exception:
                self.step_failed(step)
            else:
                if failure is not None:
                    del self.step_failures[step]
                    self.logger.critical(f"master: {step} works again after {plural(failure[0], 'failure')}")

    def step_failed(self, step: str) -> None:
        """Log a failed loop step (with its traceback) and pause it."""
        in_a_row, _, last = self.step_failures.get(step, (0, 0.0, ""))
        in_a_row += 1
        pause = min(FIRST_ERROR_PAUSE * 2 ** (in_a_row - 1), LONGEST_ERROR_PAUSE)
        error = traceback.format_exc()
        self.step_failures[step] = (in_a_row, self.clock() + pause, error)
        try:
            if error != last:  # the whole traceback once; then a short line per repeat
                self.logger.critical(
                    f"master: unexpected error in {step}; the server keeps running,"
                    f" next try in {pause:.1f}s: {error.rstrip()}"
                )
            else:
                summary = error.rstrip().rsplit("\n", 1)[-1]
                self.logger.critical(
                    f"master: {step} failed again ({in_a_row} in a row), next try in {pause:.1f}s: {summary}"
                )
        except Exception:
            pass  # a broken log must not break the loop either

    def wait_for_events(self) -> None:
        for key, mask in self.selector.select(self.wait_time()):
            key.data(mask)

    def wait_time(self) -> float:
        now = self.clock()
        wait = 1.0
        if self.stopping:
            wait = min(wait, max(self.stop_deadline - now, 0.0))
        elif len(self.active_workers()) < self.target_workers and not self.pool.lacks_slots():
            wait = min(wait, max(self.pool.backoff.next_spawn - now, 0.0))
        if self.ready_generation != self.generation or self.pool.recycling() or self.handover_pending:
            wait = min(wait, 0.05)  # new workers are starting: look again soon
        watchdog = self.notifier.watchdog_due(now)
        if watchdog is not None:
            wait = min(wait, watchdog)
        return wait

    # ------------------------------------------------------------ signals
    def install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._queue_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wakeup)

    def _queue_signal(self, signum: int, frame: object) -> None:
        # Only queue: the main loop acts, outside the handler's restrictions.
        self.signal_queue.append(signum)

    def wake(self) -> None:
        """From another thread: end the loop's wait now."""
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # the pipe is full: the loop is about to wake anyway

    def _drain_wakeup(self, mask: int) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def handle_signals(self) -> None:
        while self.signal_queue:
            signum = self.signal_queue.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stop(graceful=True)
            elif signum == signal.SIGQUIT:
                self.stop(graceful=False)
            elif signum == signal.SIGTTIN:
                self.set_worker_count(self.target_workers + 1)
            elif signum == signal.SIGTTOU:
                self.set_worker_count(self.target_workers - 1)
            elif signum == signal.SIGUSR1:
                self.reopen_logs()
            elif signum == signal.SIGHUP:
                self.reload_requests.append(None)
            # USR2 only wakes the loop: manage_workers reads the requests

    # ------------------------------------------------------------ workers
    def active_workers(self) -> list[WorkerInfo]:
        """Workers of the current generation that are staying."""
        return self.pool.active()

    def set_worker_count(self, count: int) -> None:
        allowed = clamp_target(count)
        if allowed != count:
            low, high = RANGES["workers"]
            self.log(f"workers: {count} refused, the pool stays within {low}..{high}; keeping {allowed}")
        if allowed != self.target_workers:
            self.log(f"workers: {self.target_workers} -> {allowed}")
        self.target_workers = allowed
        self.stats.set("workers", allowed)

    def accepting(self, info: WorkerInfo) -> bool:
        return bool(self.stats.slot(info.index).get(FIELD["accepting"]))

    def manage_workers(self) -> None:
        """Fork missing workers (with a crash backoff); retire extra and replaced ones."""
        if self.stopping:
            return
        self.note_recycle_requests()
        for info in self.pool.to_retire(self.accepting):
            if info.recycling:
                self.log(f"worker {info.index} (pid {info.pid}) replaced; retiring it")
            elif info.generation < self.generation:
                self.log(f"worker {info.index} (pid {info.pid}) of generation {info.generation} leaves early:"
                         " its slot is needed")
            self.retire_worker(info, signal.SIGHUP)  # it finishes its sessions
        for _ in range(self.pool.spawn_count(self.clock())):
            index = self.pool.free_index()
            assert index is not None  # spawn_count counts free slots
            self.spawn_worker(index)
        short = self.pool.lacks_slots()
        if short != self.slots_short:
            self.slots_short = short
            if short:
                self.log(f"no free worker slot for {plural(short, 'more worker')}:"
                         f" {len(self.workers)} slots in use; waiting for leaving workers to exit")

    def note_recycle_requests(self) -> None:
        """Workers that served their --max-requests quota: replace them first."""
        for info in self.pool.active():
            if self.stats.slot(info.index).get(FIELD["recycle"]):
                info.recycling = True
                self.log(f"worker {info.index} (pid {info.pid}) served its quota; forking its replacement")

    def free_index(self) -> int | None:
        return self.pool.free_index()

    def spawn_worker(self, index: int) -> None:
        slot = self.stats.slot(index)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                self.become_worker()
                status = run_worker(index, self.listeners, self.settings, self.stats, self.credentials)
            except BaseException:
                self.log_crash(f"worker {index} crashed: {traceback.format_exc()}")
            finally:
                os._exit(status)
        slot.set(FIELD["pid"], pid)
        self.pool.added(index, pid, self.clock())

    # ------------------------------------------------------- queue runner
    def runner_wanted(self) -> bool:
        """Someone may relay, or mail waits in the queue (queued before a change of settings)."""
        return relay_possible(self.settings) or bool(Queue(queue_dir_of(self.settings)).ids())

    def manage_runner(self) -> None:
        """Fork the queue runner when it is missing (after a crash, with a backoff)."""
        if self.stopping:
            return
        now = self.clock()
        if self.runner_pid is not None:
            self.runner_backoff.lived(self.runner_started, now)
            return
        if self.runner_backoff.may_spawn(now) and self.runner_wanted():
            self.spawn_runner()

    def spawn_runner(self) -> None:
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                self.become_worker()
                close_all(self.listeners)  # it serves no client: the ports close with the workers
                status = run_queue_runner(self.settings, self.stats)
            except BaseException:
                self.log_crash(f"queue runner crashed: {traceback.format_exc()}")
            finally:
                os._exit(status)
        self.stats.slot(RUNNER_SLOT).set(FIELD["pid"], pid)
        self.runner_pid = pid
        self.runner_started = self.clock()
        self.runner_leaving = False

    def runner_exited(self, pid: int, status: int) -> None:
        """Reaped: fold its counters, clean its spool files; manage_runner forks the next."""
        now = self.clock()
        self.runner_pid = None
        self.stats.retire(RUNNER_SLOT)
        for path in remove_temporary_files(self.settings.mail_dir, pid):
            self.log(f"removed unacknowledged {path} of the queue runner")
        cause = describe_exit(status)
        if self.stopping or self.runner_leaving:
            self.log(f"queue runner (pid {pid}) stopped: {cause}")
            return
        self.stats.slot(RUNNER_SLOT).add(FIELD["restarts"])
        if now - self.runner_started < CRASH_WINDOW:
            delay = self.runner_backoff.crashed(now)
            self.log(f"queue runner (pid {pid}) died: {cause}; restarting it in {delay:.1f}s")
        else:
            self.log(f"queue runner (pid {pid}) died: {cause}; restarting it")

    def flush_queue(self) -> str | None:
        """``flush=1``: the runner retries every queued mail now."""
        if self.runner_pid is None:
            return "no queue runner is running"
        self.kill(self.runner_pid, signal.SIGUSR2)
        self.log("flush: queue runner told to retry every queued mail now")
        return None

    def queue_values(self) -> dict[str, tuple[int, str]]:
        """The queue as ``show=1`` reports it (what the runner last counted)."""
        slot = self.stats.slot(RUNNER_SLOT)
        return {
            "queue_messages": (slot.get(FIELD["queue_messages"]), "queue"),
            "queue_oldest_seconds": (slot.get(FIELD["queue_oldest_seconds"]), "queue"),
        }

    def log_crash(self, line: str) -> None:
        """In a forked child about to exit on an exception: the line that says
        why, written to the log file. A worker or the queue runner closes its
        own log on its way out, which leaves the logger without a handler
        (its lines would go to stderr); one that failed before opening it
        holds the master's, which writes at once. Either way the file is
        opened again for the line, through a writer thread, so that a log
        that cannot be written delays the exit by close_log's bound only. If
        the file cannot be opened (why a new worker fails, say), the handler
        inherited from the master, still in place, takes the line."""
        try:
            if not any(getattr(handler, "buffered", False) for handler in self.logger.handlers):
                self.logger = open_log(self.settings.log_file, self.stats, "", buffered=True)
        except OSError:
            pass
        try:
            self.logger.critical(line)
            close_log(self.logger)  # at most EXIT_WAIT; os._exit skips every cleanup
        except Exception:
            pass  # a broken log must not keep the child from exiting

    def become_worker(self) -> None:
        """In the child right after fork: drop everything that is the master's."""
        signal.set_wakeup_fd(-1)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        for service in self.services:
            service.sock.close()
            for client in service.clients:
                client.sock.close()
        self.services = []
        self.notifier.close()

    def retire_worker(self, info: WorkerInfo, signum: int) -> None:
        info.retiring = True
        self.kill(info.pid, signum)

    def kill(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.runner_pid:
                self.runner_exited(pid, status)
                continue
            now = self.clock()
            clean_exit = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            left = self.pool.removed(pid, clean_exit, now, self.stopping)
            if left is None:
                continue
            info, how = left
            self.stats.retire(info.index)
            cause = describe_exit(status)
            for line in replay_journals(self.settings.mail_dir, pid):
                self.log(f"worker {info.index}: {line}")
            for path in remove_temporary_files(self.settings.mail_dir, pid):
                self.log(f"removed unacknowledged {path} of worker {info.index}")
            if how == STOPPED:
                self.log(f"worker {info.index} (pid {pid}) stopped: {cause}")
            elif how == RECYCLED:
                self.log(f"worker {info.index} (pid {pid}) recycled: {cause}")
            else:
                # DIED is the only outcome left here: any comparison that holds for it says the same.
                assert how == DIED  # pragma: no mutate
                self.stats.slot(info.index).add(FIELD["restarts"])
                self.log(f"worker {info.index} (pid {pid}) died: {cause}; replacing it")
                if now - info.started < CRASH_WINDOW:
                    self.log(f"worker died {now - info.started:.1f}s after start;"
                             f" next fork in {self.pool.backoff.delay:.1f}s")

    # --------------------------------------------------------- lifecycle
    def stop(self, graceful: bool) -> None:
        if self.stopping and graceful:
            return
        self.stopping = True
        self.notifier.stopping()
        self.answer_reload(self.reload_waiters, "server stopping")
        self.reload_waiters = []
        grace = self.settings.graceful_timeout + FAST_STOP_SECONDS if graceful else FAST_STOP_SECONDS
        self.stop_deadline = self.clock() + grace
        self.log("stopping" + (" gracefully" if graceful else " now"))
        self.close_listeners()
        for info in self.workers.values():
            self.retire_worker(info, signal.SIGTERM if graceful else signal.SIGQUIT)
        if self.runner_pid is not None:
            self.kill(self.runner_pid, signal.SIGTERM if graceful else signal.SIGQUIT)

    def close_listeners(self) -> None:
        """Stop listening: once the workers close their copies too, new
        clients are refused at once instead of queueing for a worker that
        will never greet them."""
        close_all(self.listeners)
        self.listeners = []

    def check_stop(self) -> None:
        if not self.stopping:
            return
        if not self.workers and self.runner_pid is None:
            self.running = False
        elif self.clock() >= self.stop_deadline:
            for info in self.workers.values():
                self.log(f"worker {info.index} (pid {info.pid}) did not stop in time; killing it")
                self.kill(info.pid, signal.SIGKILL)
            if self.runner_pid is not None:
                self.log(f"queue runner (pid {self.runner_pid}) did not stop in time; killing it")
                self.kill(self.runner_pid, signal.SIGKILL)
            self.stop_deadline = self.clock() + FAST_STOP_SECONDS

    def request_reload(self, requester: ConfigSession) -> None:
        """``reload=1`` on the config port; answered when the reload ends."""
        self.reload_requests.append(requester)

    def handle_reload_requests(self) -> None:
        if not self.reload_requests or self.stopping:
            return
        requests, self.reload_requests = self.reload_requests, []
        error = self.reload()
        waiters = [r for r in requests if r is not None]
        if error:
            self.answer_reload(waiters, error)
        else:
            self.reload_waiters += waiters

    def reload(self) -> str | None:
        """Re-read the settings and start a new generation; None if it began."""
        self.notifier.reloading()
        self.log("reloading")
        try:
            fresh = self.control.reread()
            secret = load_secret(fresh.config_secret_file) if fresh.config_secret_file is not None else None
        except Exception as exc:  # a bad file: keep every old setting
            self.log(f"reload refused, old settings kept: {exc}")
            self.notifier.ready(self.status_text())
            return str(exc)
        self.control.adopt(fresh)  # restart-only values and live changes stay
        for note in self.credentials.reload(self.settings):  # a bad new file keeps the old one
            self.log(note)
        self.gate.secret = secret
        self.gate.failures_per_minute = fresh.config_login_failures_per_minute
        self.target_workers = fresh.workers
        self.generation += 1  # manage_workers forks the new generation
        if self.runner_pid is not None:  # the next runner reads the new settings
            self.runner_leaving = True
            self.kill(self.runner_pid, signal.SIGTERM)
        return None

    def report_readiness(self) -> None:
        """READY=1 once the current generation accepts; then retire the old one."""
        now = self.clock()
        if self.ready_generation != self.generation and not self.stopping:
            if self.pool.generation_ready(self.accepting):
                for info in self.pool.older_generations():
                    self.retire_worker(info, signal.SIGHUP)
                self.ready_generation = self.generation
                self.handover_deadline = now + HANDOVER_SECONDS
                self.handover_pending = True
        if self.handover_pending and not self.stopping:
            self.finish_handover(now)
        if self.notifier.enabled and now >= self.next_status:
            self.notifier.status(self.status_text())
            self.next_status = now + STATUS_EVERY

    def finish_handover(self, now: float) -> None:
        """READY=1 and the reload's OK once no older worker accepts any more.

        The old workers stop accepting when they handle their HUP; until
        then a new client could still land on a worker with the old
        settings, so "reload done" would not yet be true.
        """
        older = [w for w in self.workers.values() if w.generation < self.generation and self.accepting(w)]
        if older and now < self.handover_deadline:
            return
        if older:
            self.log(f"reload: {plural(len(older), 'old worker')} still accepting after {HANDOVER_SECONDS:g}s")
        self.handover_pending = False
        if self.generation > 0:
            self.log(f"reload done: generation {self.generation} accepting")
        self.notifier.ready(self.status_text())
        self.answer_reload(self.reload_waiters, None)
        self.reload_waiters = []

    def answer_reload(self, waiters: list[ConfigSession], error: str | None) -> None:
        for session in waiters:
            for service in self.services:
                for client in list(service.clients):
                    if client.handler is session:
                        client.push(session.reload_done(error))

    def status_text(self) -> str:
        t = self.stats.totals()
        return (
            f"{plural(len(self.active_workers()), 'worker')}, {t.current} connections open,"
            f" {t.total} accepted, {t.mails} mails, {t.bytes} bytes"
        )

    def open_log(self) -> logging.Logger:
        """The master's log: its lines go to a writer thread at each pass of
        the loop (flush_log), at most --max-log-backlog of them waiting; the
        lines it drops are counted with the retired workers' totals."""
        return open_log(
            self.settings.log_file, self.stats, "", buffered=True, max_backlog=self.settings.max_log_backlog,
            slot=self.stats.slot(RETIRED),
        )

    def flush_log(self) -> None:
        flush_log(self.logger)

    def log_written(self) -> None:
        """Before a config port reply: the lines logged so far are in the
        file (a script reading the log after an answer finds its line),
        waiting at most LOG_REPLY_WAIT, once per stall of the log."""
        wait_written(self.logger, LOG_REPLY_WAIT)

    def reopen_logs(self) -> None:
        """USR1: the log file anew, here and in every worker. The master's
        is opened on a thread of its own (an open() that hangs must not
        hang the master); flush_log swaps to it once it is open, and its
        first line says so."""
        reopen_log(self.logger, announce="log file reopened", on_open=self.wake)
        for info in self.workers.values():
            self.kill(info.pid, signal.SIGUSR1)

    # ------------------------------------------------ services of the master
    def open_services(self) -> None:
        """The config port and, if asked for, the Prometheus endpoint."""
        settings = self.settings
        self.services = []
        secret = load_secret(settings.config_secret_file) if settings.config_secret_file is not None else None
        self.gate = TokenGate(secret, settings.config_login_failures_per_minute)
        config_sock = listening_socket(settings.config_address, settings.config_port)
        self.services.append(Service(
            "config port", self.selector, config_sock, self.new_config_session,
            lambda: ServiceLimits(
                self.settings.config_max_clients, self.settings.config_login_timeout,
                self.settings.config_idle_timeout,
            ),
            lambda reason: f"ERR closed: {reason}\r\n".encode(), self.log,
            before_reply=self.log_written,
        ))
        if settings.metrics_port is not None:
            render = make_renderer(self.stats, self.live_worker_indices, lambda: self.settings.mail_dir)
            metrics_sock = listening_socket(settings.metrics_address, settings.metrics_port)
            self.services.append(Service(
                "metrics", self.selector, metrics_sock, lambda peer: HttpMetricsRequest(render),
                lambda: ServiceLimits(
                    self.settings.metrics_max_clients, self.settings.metrics_timeout, self.settings.metrics_timeout,
                ),
                lambda reason: b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.log, not_logged_in="sent no request",
            ))

    def new_config_session(self, peer: str) -> ConfigSession:
        return ConfigSession(
            self.control.apply, lambda: {**self.control.live_values(), **self.queue_values()}, self.gate,
            self.request_reload, peer, self.log, self.settings.config_max_login_failures, flush=self.flush_queue,
        )

    def expire_service_clients(self) -> None:
        for service in self.services:
            service.expire()

    def close_services(self) -> None:
        for service in getattr(self, "services", []):
            service.close()
        self.services = []

    def live_worker_indices(self) -> list[int]:
        return sorted(w.index for w in self.workers.values())

    def log(self, message: str) -> None:
        if self.stats.get("logging"):
            self.logger.info(message)


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return f"killed by {signal.Signals(signum).name}"
    code = os.waitstatus_to_exitcode(status)
    return f"exit code {code}"

