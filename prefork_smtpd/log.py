"""The log file: ``YYYY-MM-DD HH:MM:SS : message`` lines, switchable live.

Every process opens the file itself, ``O_APPEND``, after fork. Lines are
gathered in memory and written whole in one ``write()``, which the kernel
appends as one piece, so the master and the workers never interleave
inside a line. A FIFO (a log reader such as ``logger`` or s6-log behind
it) takes a write whole only up to ``PIPE_BUF`` bytes, so there the
lines go in pieces of at most that, each ending at a line's end. Lines
that cannot be written (a full disk, a reader gone) are counted with the
dropped ones. A worker flushes every housekeeping tick (half a second) and
whenever its buffer passes 32 KiB, and the write itself happens on a
background thread: on a journalling file system an append can wait behind
another process's big flush, and that wait must not stall the event loop.
The master hands its lines to a writer thread too, at every pass of its
loop: a log that cannot be written must not stop it reaping and replacing
workers or answering the config port. Before the master answers a config
port client, it waits for the lines it has logged to be written (at most
a moment, see ``wait_written``), so an answer is never ahead of the line
that records its change. In a forked child, such a handler drops the
lines it gathered (the parent writes them) and writes the child's own at
once until the child opens its log.

What waits for the writer is bounded (``max_backlog`` bytes, queued and
gathered together): clients make the lines, so a log that cannot be
written (a stalled disk or network file system, a full pipe) must not let
them grow a worker without limit. Past the bound, lines are dropped and
counted, never waited for (that would stall the event loop); once the
writer has worked the backlog down to half the bound, one line says how
many were dropped since when, and lines flow again. Critical lines (a
crash) always go out: they are few, no client can make them at will, and
they are the ones that say why a process died.

open() itself can block for ever (a stalled disk or network file system, a
FIFO nobody reads), so a buffered log's file is opened by its writer
thread, never by the loop. At start a process waits a moment
(``OPEN_WAIT``) to learn whether the file opens, so that a wrong path
fails at once; past that, lines gather (bounded) until the open returns.
A reopen (logrotate's USR1, ``reopen_log``) waits for nothing: the old
file takes the lines until the new one is open, and the swap is made at
the next flush (the loop's tick). The old file is left to its writer,
which finishes it on its own. One reopen at a time, and none while the
file left by the last one is still being written: whatever the signals,
a process holds at most three log files (old, current, opening) and what
waits for them stays within three times the bound.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable

from .settings import BY_NAME
from .stats import FIELD, SharedStats, Slot

LOGGER_NAME = "prefork_smtpd"
FLUSH_AT = 32 * 1024
DEFAULT_MAX_BACKLOG: int = BY_NAME["max_log_backlog"].default
# Seconds a process about to exit gives its log writer: a log that cannot
# be written must not keep a worker that stops or crashes from exiting (the
# master could neither reap nor replace it).
EXIT_WAIT = 5.0
# Seconds a process opening its log at start waits to learn whether the
# file opens: a wrong path (a directory, a read-only disk) then fails at
# once; a file that has not opened by then (a stalled disk) gathers lines
# until it does.
OPEN_WAIT = 1.0
LOG_LINES_DROPPED = FIELD["log_lines_dropped"]


class AppendLineHandler(logging.Handler):
    """Formats records into lines and appends them with one write per flush."""

    def __init__(
        self, path: str, prefix: str, stats: SharedStats, buffered: bool,
        max_backlog: int = DEFAULT_MAX_BACKLOG, slot: Slot | None = None, open_wait: float = OPEN_WAIT,
        on_open: Callable[[], object] | None = None, fd: int = -1,
    ) -> None:
        """Raises the OSError of the file's open if it fails within
        ``open_wait`` seconds (at once, for an unbuffered log). A buffered
        log's writer calls ``on_open``, from its thread, once the open has
        returned. ``fd``: a file already open to write to (the handler
        owns it), in place of opening ``path``."""
        super().__init__()
        self.path = path
        self.prefix = prefix
        self.stats = stats
        self.buffered = buffered
        self.pending: list[str] = []
        self.pending_size = 0
        # The backlog: gathered lines (pending_size, in characters) plus the
        # bytes handed to the writer and not yet written. The two running
        # totals each have one writer (this thread; the writer thread), so
        # their difference needs no lock.
        self.max_backlog = max_backlog
        self.queued_bytes = 0
        self.written_bytes = 0
        self.lost_lines = 0  # lines a write failed to put in the file: the writer's own count
        self._lost_counted = 0  # of them, those already added to the slot
        self._pipe: bool | None = None  # whether the file is a FIFO: known at the first write
        # pending_size may grow to ``room`` before add_line looks again: the
        # bound less what was queued when it last looked (the writer only
        # makes more room since). -1 while dropping: every line looks.
        self.room = max_backlog if buffered else sys.maxsize
        self.dropped = 0  # lines dropped since dropped_since (0: none)
        self.dropped_since = 0.0
        self.slot = slot  # where the dropped lines are counted for XSTAT and /metrics
        self._second = -1
        self._stamp = ""
        self.fd = fd
        self.open_error: OSError | None = None  # why the writer could not open the file
        self.successor: AppendLineHandler | None = None  # a reopen's file, until it has opened
        self.successor_asked = 0.0
        self.announce = ""  # the line the successor starts with
        self.on_open = on_open
        self._writes: queue.SimpleQueue | None = None
        self._writer_owns_fd = buffered  # the writer thread closes the file once it is done
        self._opened = threading.Event()  # the open has returned, either way
        if not buffered:
            if fd < 0:
                self.fd = open_log_file(path)
            self._opened.set()
            return
        self._writes = queue.SimpleQueue()
        self._progress = threading.Condition()  # notified by the writer after each write
        self._stalled_below = 0  # wait_written timed out at this mark: no waits until it is written
        self._writer = threading.Thread(target=self._write_loop, name="log-writer", daemon=True)
        self._writer.start()
        if self._opened.wait(open_wait) and self.open_error is not None:
            self._writes.put(None)  # the writer stops
            raise self.open_error
        _buffered_handlers.add(self)

    @property
    def opened(self) -> bool:
        """Whether the open has returned (``open_error`` says how)."""
        return self._opened.is_set()

    def writing(self) -> bool:
        """Whether its writer thread is still at work (a retired log's)."""
        return self._writes is not None or (self.buffered and self._writer.is_alive())

    def _forked(self) -> None:
        """In a forked child: the writer thread stayed in the parent, and the
        lines gathered are the parent's to write (it still holds them).
        Drop them, and write this process's own lines at once, as an
        unbuffered handler does, until the process opens its own log."""
        self.pending.clear()
        self.pending_size = 0
        self._writes = None
        self._writer_owns_fd = False
        self.buffered = False
        self.room = sys.maxsize
        self.dropped = 0
        self.successor = None  # its open, if any, runs in the parent

    def emit(self, record: logging.LogRecord) -> None:
        critical = record.levelno >= logging.CRITICAL
        if self.stats.get("logging") == 0 and not critical:
            return  # the live switch; critical lines (crashes) always go out
        self.add_line(record.getMessage(), record.created, critical)

    def add_line(self, message: str, created: float | None = None, critical: bool = False) -> None:
        """Append one line. Workers call this directly for per-session events:
        a Logger call costs about 10 us a line, this about 1 us."""
        second = int(time.time() if created is None else created)
        if second != self._second:  # format the time once per second, not per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        line = f"{self._stamp} : {self.prefix}{message}\n"
        size = len(line)
        if self.pending_size + size > self.room and not critical and not self._admits(size):
            return
        self.pending.append(line)
        self.pending_size += size
        if not self.buffered or self.pending_size >= FLUSH_AT:
            self.flush()

    def backlog(self) -> int:
        """Bytes waiting for the writer: gathered and queued."""
        return self.pending_size + self.queued_bytes - self.written_bytes

    def _admits(self, size: int) -> bool:
        """The slow path of add_line, past ``room``: take the line if the
        backlog has room for it now, else count it dropped."""
        if self.dropped and not self._resume():
            self._drop()
            return False
        self.room = self.max_backlog - (self.queued_bytes - self.written_bytes)
        if self.pending_size + size <= self.room:
            return True
        self.dropped_since = time.time()
        self._drop()
        return False

    def _drop(self) -> None:
        self.dropped += 1
        self.room = -1
        if self.slot is not None:
            self.slot.add(LOG_LINES_DROPPED)

    def _resume(self, closing: bool = False) -> bool:
        """Once the writer has worked the backlog down to half the bound
        (not merely to room for one more line, which would make a log of
        holes), say what was lost and take lines again; when closing, say
        it regardless, as the last line."""
        if self.backlog() > self.max_backlog // 2 and not closing:
            return False
        since = time.strftime("%H:%M:%S", time.localtime(self.dropped_since))
        count, self.dropped = self.dropped, 0
        self.room = self.max_backlog - (self.queued_bytes - self.written_bytes)
        self.add_line(f"{count} log lines dropped since {since}: the log could not be written fast enough", critical=True)
        return True

    def flush(self) -> None:
        if self.lost_lines != self._lost_counted:
            self._count_lost()
        if self.dropped:
            self._resume()  # every tick, so the notice comes even when no more lines do
        if not self.pending:
            return
        data = "".join(self.pending).encode("utf-8", "backslashreplace")
        self.pending.clear()
        self.pending_size = 0
        if self._writes is not None:
            self.queued_bytes += len(data)
            self._writes.put(data)
            if not self.dropped:  # while dropping, every line looks (room -1)
                self.room = self.max_backlog - (self.queued_bytes - self.written_bytes)
        else:
            self._write(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        pos, end = 0, len(data)
        try:
            if self._pipe is None:
                self._pipe = stat.S_ISFIFO(os.fstat(self.fd).st_mode)
            while pos < end:
                stop = end
                if self._pipe and end - pos > select.PIPE_BUF:
                    # Whole lines of at most PIPE_BUF: the pipe takes each
                    # as one piece, never interleaved with another process's.
                    # (A longer line goes alone, whole.)
                    cut = data.rfind(b"\n", pos, pos + select.PIPE_BUF)
                    stop = cut + 1 if cut >= 0 else (data.find(b"\n", pos) + 1 or end)
                pos += os.write(self.fd, view[pos:stop])
        except OSError:
            # A full or vanished log disk, a FIFO's reader gone: the mail
            # service goes on; the lines are counted (flush adds them to
            # the dropped ones; only the loop's thread writes the slot).
            self.lost_lines += data.count(b"\n", pos)  # each line whose end is not in the file

    def _count_lost(self) -> None:
        lost = self.lost_lines  # once: the writer may be adding to it
        if self.slot is not None:
            self.slot.add(LOG_LINES_DROPPED, lost - self._lost_counted)
        self._lost_counted = lost

    def wait_written(self, timeout: float) -> bool:
        """Hand what is gathered to the writer and wait, at most ``timeout``
        seconds, until everything so far is in the file; whether it is.

        A log that made one such wait time out is not waited for again
        until its writer has got past that point: a stalled log costs one
        timeout, not one per call.
        """
        self.flush()
        if self._writes is None:
            return True  # unbuffered: each line was written when it came
        mark = self.queued_bytes
        if self.written_bytes >= mark:
            return True
        if self.written_bytes < self._stalled_below:
            return False
        with self._progress:
            written = self._progress.wait_for(lambda: self.written_bytes >= mark, timeout)
        if not written:
            self._stalled_below = mark
        return written

    def _write_loop(self) -> None:
        writes = self._writes  # its own reference: close() lets go of the handler's
        assert writes is not None
        if self.fd < 0:
            try:
                self.fd = open_log_file(self.path)
            except OSError as error:
                self.open_error = error  # what is queued is then lost, as on a write error
        self._opened.set()
        if self.on_open is not None:
            try:
                self.on_open()
            except Exception:
                pass  # a wake-up that cannot be given: the owner's next tick looks anyway
        while (data := writes.get()) is not None:
            self._write(data)
            with self._progress:
                self.written_bytes += len(data)  # this thread's own total: no other thread writes it
                self._progress.notify_all()
        if self.fd >= 0:
            os.close(self.fd)  # the writer owns the file: it may outlive close()
            self.fd = -1

    def close(self, wait: bool | float = True) -> None:
        """Write out what is left and close the file. ``wait``: until it is
        written (a process about to exit), or at most that many seconds.
        Otherwise (a reopen after logrotate) the writer finishes on its own
        and closes the file itself: a log that cannot be written must not
        stall the event loop that reopens it."""
        if self.successor is not None:  # a reopen still opening its file: given up
            self.successor.close(wait=False)
            self.successor = None
        if self.dropped:
            self._resume(closing=True)
        self.flush()
        if self._writes is not None:
            self._writes.put(None)  # the writer empties the queue, closes the file, then stops
            if wait is not False:
                self._writer.join(None if wait is True else wait)
            self._writes = None
        elif not self._writer_owns_fd and self.fd >= 0:  # else the file is its writer's to close
            os.close(self.fd)
            self.fd = -1
        super().close()

    def reopen(self, announce: str = "", on_open: Callable[[], object] | None = None) -> None:
        """Begin opening the file anew (after logrotate moved it) on a
        writer thread of its own; ``finish_reopen`` swaps to it once it is
        open. Refused, with a line saying why, while an earlier reopen is
        still opening its file or the file it left is still being written:
        that is what bounds the files, threads and lines a stalled log
        disk can make a process hold, however many signals come. Its
        lines are ordinary ones, within the backlog's bound (a signal sent
        in a loop must not grow memory past it), dropped and counted like
        any other once the bound is reached.
        ``on_open`` (called from the opening thread) wakes the owner to
        swap at once, rather than at its next tick."""
        if self.successor is not None:
            asked = time.strftime("%H:%M:%S", time.localtime(self.successor_asked))
            self.add_line(f"log file not reopened: the reopen asked at {asked} is still opening {self.path}")
            return
        _retired[:] = [handler for handler in _retired if handler.writing()]
        if _retired:
            self.add_line("log file not reopened: the file left at the last reopen is still being written")
            return
        try:
            self.successor = AppendLineHandler(
                self.path, self.prefix, self.stats, True, self.max_backlog, self.slot, open_wait=0, on_open=on_open,
            )
        except OSError as error:
            self._cannot_reopen(error)
            return
        self.successor_asked = time.time()
        self.announce = announce

    def _cannot_reopen(self, error: OSError) -> None:
        self.add_line(f"log file {self.path} could not be reopened ({error}); still writing to the one open before")

    def finish_reopen(self, logger: logging.Logger) -> AppendLineHandler:
        """If a reopen's file has opened, put it in this handler's place on
        ``logger`` and retire this one; if its open failed, say so here.
        Returns the handler now in place."""
        fresh = self.successor
        if fresh is None or not fresh.opened:
            return self
        self.successor = None
        if fresh.open_error is not None:
            fresh.close(wait=False)
            self._cannot_reopen(fresh.open_error)
            return self
        logger.removeHandler(self)
        logger.addHandler(fresh)
        self.close(wait=False)  # its writer finishes the old file on its own
        if self.writing():
            _retired.append(self)
        if self.announce:
            fresh.add_line(self.announce)
        return fresh


def open_log_file(path: str) -> int:
    """Open (create) the log file for appending; its folder too."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)


_buffered_handlers: "weakref.WeakSet[AppendLineHandler]" = weakref.WeakSet()
# Retired by a reopen, their writers possibly still at the old file.
_retired: list[AppendLineHandler] = []


def _after_fork_in_child() -> None:
    for handler in list(_buffered_handlers):
        successor = handler.successor
        handler._forked()
        if successor is not None and successor.fd >= 0:
            os.close(successor.fd)  # the parent's copy is its own; nothing writes this one
            successor.fd = -1
    _buffered_handlers.clear()
    _retired.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def open_log(
    path: str, stats: SharedStats, process: str, buffered: bool = False,
    max_backlog: int = DEFAULT_MAX_BACKLOG, slot: Slot | None = None,
) -> logging.Logger:
    """(Re)open the log file for this process and return the logger.

    ``process`` prefixes each message (``worker 2: ...``); the master passes
    "" so its lines read exactly ``... : Server Initialized``. A buffered
    log holds at most ``max_backlog`` bytes for its writer and counts the
    lines it drops in ``slot``.
    """
    # Our lines use none of the caller, thread or process fields; not
    # gathering them (the logging HOWTO's "Optimization") takes a record
    # from 17 to 11 us.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logger = logging.getLogger(LOGGER_NAME)
    prefix = f"{process}: " if process else ""
    # The new file first: if it cannot be opened, the old one still takes
    # the lines that say why.
    try:
        fresh = AppendLineHandler(path, prefix, stats, buffered, max_backlog, slot)
    except OSError as error:
        fresh = _keep_inherited_file(logger, path, prefix, stats, buffered, max_backlog, slot, error)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        if isinstance(handler, AppendLineHandler):
            handler.close(wait=False)  # its writer finishes the old file on its own
        else:
            handler.close()
    logger.addHandler(fresh)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def _keep_inherited_file(
    logger: logging.Logger, path: str, prefix: str, stats: SharedStats, buffered: bool, max_backlog: int,
    slot: Slot | None, error: OSError,
) -> AppendLineHandler:
    """A forked process whose log path cannot be opened (a reopen after
    logrotate failed: the name is now a folder, the disk read-only) goes on
    with the file the master still writes to, as the master itself does,
    rather than crash at every start. Re-raises ``error`` where there is
    no such file (the master's own start)."""
    inherited = next((h for h in logger.handlers if isinstance(h, AppendLineHandler) and h.fd >= 0), None)
    if inherited is None:
        raise error
    fresh = AppendLineHandler(path, prefix, stats, buffered, max_backlog, slot, fd=os.dup(inherited.fd))
    fresh.add_line(f"log file {path} could not be opened ({error}); writing to the one the master has open")
    return fresh


def reopen_log(
    logger: logging.Logger | None, announce: str = "", on_open: Callable[[], object] | None = None,
) -> None:
    """logrotate's USR1: begin opening the log file anew, without waiting
    (``AppendLineHandler.reopen``); the next ``flush_log`` swaps to it once
    it is open and writes ``announce`` there first."""
    if logger is not None:
        for handler in logger.handlers:
            if isinstance(handler, AppendLineHandler):
                handler.reopen(announce, on_open)


def line_writer(logger: logging.Logger) -> AppendLineHandler:
    """The handler behind ``logger``, for direct per-line appends."""
    return next(h for h in logger.handlers if isinstance(h, AppendLineHandler))


def close_log(logger: logging.Logger | None, wait: bool | float = EXIT_WAIT) -> None:
    """Write out everything pending and close the file (before a process
    exits); ``wait``: at most that many seconds for a buffered log's writer."""
    if logger is None:
        return
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        if isinstance(handler, AppendLineHandler):
            handler.close(wait)
        else:
            handler.close()


def wait_written(logger: logging.Logger | None, timeout: float) -> None:
    """Write out what ``logger`` has gathered, waiting at most ``timeout``
    seconds for a buffered log's writer (``AppendLineHandler.wait_written``)."""
    if logger is not None:
        for handler in logger.handlers:
            if isinstance(handler, AppendLineHandler):
                handler.wait_written(timeout)


def flush_log(logger: logging.Logger | None) -> AppendLineHandler | None:
    """Each tick: hand what is gathered to the writer, and finish a reopen
    whose file has opened. Returns the line handler now in place."""
    current = None
    if logger is not None:
        for handler in list(logger.handlers):
            handler.flush()
            if isinstance(handler, AppendLineHandler):
                current = handler.finish_reopen(logger)
    return current
