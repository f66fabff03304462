"""The log file: ``YYYY-MM-DD HH:MM:SS : message`` lines, switchable live.

Every process opens the file itself, ``O_APPEND``, after fork. Lines are
gathered in memory and written whole in one ``write()``, which the kernel
appends as one piece, so the master and the workers never interleave
inside a line. A worker flushes every housekeeping tick (half a second) and
whenever its buffer passes 32 KiB, and the write itself happens on a
background thread: on a journalling file system an append can wait behind
another process's big flush, and that wait must not stall the event loop.
The master, whose lines are few, writes each one at once.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

from .stats import SharedStats

LOGGER_NAME = "prefork_smtpd"
FLUSH_AT = 32 * 1024


class AppendLineHandler(logging.Handler):
    """Formats records into lines and appends them with one write per flush."""

    def __init__(self, path: str, prefix: str, stats: SharedStats, buffered: bool) -> None:
        super().__init__()
        self.path = path
        self.prefix = prefix
        self.stats = stats
        self.buffered = buffered
        self.pending: list[str] = []
        self.pending_size = 0
        self._second = -1
        self._stamp = ""
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._writes: queue.SimpleQueue | None = None
        if buffered:
            self._writes = queue.SimpleQueue()
            self._writer = threading.Thread(target=self._write_loop, name="log-writer", daemon=True)
            self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        if self.stats.get("logging") == 0 and record.levelno < logging.CRITICAL:
            return  # the live switch; critical lines (crashes) always go out
        self.add_line(record.getMessage(), record.created)

    def add_line(self, message: str, created: float | None = None) -> None:
        """Append one line. Workers call this directly for per-session events:
        a Logger call costs about 10 us a line, this about 1 us."""
        second = int(time.time() if created is None else created)
        if second != self._second:  # format the time once per second, not per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        line = f"{self._stamp} : {self.prefix}{message}\n"
        self.pending.append(line)
        self.pending_size += len(line)
        if not self.buffered or self.pending_size >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        data = "".join(self.pending).encode("utf-8", "backslashreplace")
        self.pending.clear()
        self.pending_size = 0
        if self._writes is not None:
            self._writes.put(data)
        else:
            self._write(data)

    def _write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:
            pass  # a full or vanished log disk must not stop the mail service

    def _write_loop(self) -> None:
        assert self._writes is not None
        while (data := self._writes.get()) is not None:
            self._write(data)

    def close(self) -> None:
        self.flush()
        if self._writes is not None:
            self._writes.put(None)  # the writer empties the queue, then stops
            self._writer.join()
            self._writes = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().close()


def open_log(path: str, stats: SharedStats, process: str, buffered: bool = False) -> logging.Logger:
    """(Re)open the log file for this process and return the logger.

    ``process`` prefixes each message (``worker 2: ...``); the master passes
    "" so its lines read exactly ``... : Server Initialized``.
    """
    # Our lines use none of the caller, thread or process fields; not
    # gathering them (the logging HOWTO's "Optimization") takes a record
    # from 17 to 11 us.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logger = logging.getLogger(LOGGER_NAME)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    prefix = f"{process}: " if process else ""
    # The new file first: if it cannot be opened, the old one still takes
    # the lines that say why (a worker that cannot start logs its crash).
    fresh = AppendLineHandler(path, prefix, stats, buffered)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.addHandler(fresh)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def line_writer(logger: logging.Logger) -> AppendLineHandler:
    """The handler behind ``logger``, for direct per-line appends."""
    return next(h for h in logger.handlers if isinstance(h, AppendLineHandler))


def close_log(logger: logging.Logger | None) -> None:
    """Write out everything pending and close the file (before a process exits)."""
    if logger is None:
        return
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def flush_log(logger: logging.Logger | None) -> None:
    if logger is not None:
        for handler in logger.handlers:
            handler.flush()
