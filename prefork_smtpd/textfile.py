"""Reading an operator's file (config, users, mailboxes, secret) safely.

These are small text files, read at start and at every reload, by the
master among others. A name that points at a FIFO would block the open
(and the master with it: no config port, no reaping, no SIGTERM); one
that points at /dev/zero or a runaway file would be read until memory
ran out. Only a regular file is read, opened without blocking, and no
more than MAX_TEXT_FILE bytes of it.
"""

from __future__ import annotations

import errno
import os
import stat

MAX_TEXT_FILE = 64 * 1024 * 1024  # a users file of 64 MiB holds some 400,000 users


def read_regular_file(path: str, limit: int = MAX_TEXT_FILE) -> bytes:
    """The bytes of the regular file ``path``; OSError (with a strerror to
    show) for anything else, or for a file larger than ``limit``."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, a device or a socket)", path)
        chunks = []
        size = 0
        while chunk := os.read(fd, min(1024 * 1024, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        return b"".join(chunks)
    finally:
        os.close(fd)
