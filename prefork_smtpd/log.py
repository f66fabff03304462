"""The log file: ``YYYY-MM-DD HH:MM:SS : message`` lines, switchable live.

Every process opens the file itself in append mode after fork; each record
is flushed in one ``write()`` to an ``O_APPEND`` file, which the kernel
keeps whole, so the master and the workers never interleave lines.
"""

from __future__ import annotations

import logging
import os

from .stats import SharedStats

LOGGER_NAME = "prefork_smtpd"


class _SwitchFilter(logging.Filter):
    """Drops records while the shared ``logging`` switch is 0."""

    def __init__(self, stats: SharedStats) -> None:
        super().__init__()
        self.stats = stats

    def filter(self, record: logging.LogRecord) -> bool:
        return self.stats.get("logging") != 0 or record.levelno >= logging.CRITICAL


def open_log(path: str, stats: SharedStats, process: str) -> logging.Logger:
    """(Re)open the log file for this process and return the logger.

    ``process`` prefixes each message (``worker 2: ...``); the master passes
    "" so its lines read exactly ``... : Server Initialized``.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8", errors="backslashreplace")
    prefix = f"{process}: " if process else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s : {prefix}%(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_SwitchFilter(stats))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger
