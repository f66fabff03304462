"""Durable Maildir delivery. Knows nothing of SMTP beyond the envelope.

A message is stored for every recipient folder, all or nothing:

1. each copy is written into ``<folder>/tmp/`` and fsynced;
2. every copy is renamed into ``<folder>/new/``;
3. every ``new/`` directory touched is fsynced, so the renames survive a
   crash.

Only after step 3 does the caller acknowledge the mail. If any step fails,
the copies already in ``new/`` are removed again and the temporary files are
unlinked, so the client's retry cannot produce duplicates and nothing
half-written is ever visible to a mail reader.

Files use LF line endings, as Maildir readers (mutt, Dovecot, Python's
``mailbox``) expect; the SMTP session already refused bare CR and LF, so the
conversion from CRLF loses nothing.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from email.utils import format_datetime
from datetime import datetime, timezone

from .session import Envelope

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class DeliveryError(Exception):
    """Storing failed; ``temporary_no_space`` picks 452 over 451."""

    def __init__(self, reason: str, no_space: bool) -> None:
        super().__init__(reason)
        self.no_space = no_space


class MaildirStore:
    def __init__(self, root: str, hostname: str) -> None:
        self.root = os.path.abspath(root)
        self.hostname = hostname
        # Maildir forbids "/" and ":" in the host part of a file name.
        self._host_part = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        self._sequence = itertools.count()
        self._ready: set[str] = set()  # folders known to have tmp/new/cur

    def unique_name(self) -> str:
        """A Maildir file name unique across processes and time."""
        now = time.time()
        seconds = int(now)
        micros = int((now - seconds) * 1_000_000)
        return f"{seconds}.M{micros}P{os.getpid()}Q{next(self._sequence)}.{self._host_part}"

    def deliver(self, envelope: Envelope, peer_address: str) -> str:
        """Store one copy per distinct recipient folder; return the queue id.

        Blocking: call it from a thread, never on the event loop.
        """
        queue_id = self.unique_name()
        body = envelope.content.replace(b"\r\n", b"\n")
        folders: dict[str, str] = {}
        for rcpt in envelope.recipients:
            folders.setdefault(rcpt.folder, rcpt.address)
        written: list[tuple[str, str]] = []  # (tmp path, new path)
        placed: list[str] = []
        try:
            for folder, address in folders.items():
                base = self._prepare(folder)
                # Names need only be unique within one folder: every copy of a
                # message takes the queue id, so it can be found in each.
                tmp_path = os.path.join(base, "tmp", queue_id)
                new_path = os.path.join(base, "new", queue_id)
                header = self._trace_header(envelope, address, peer_address, queue_id)
                _write_synced(tmp_path, header + body)
                written.append((tmp_path, new_path))
            for tmp_path, new_path in written:
                os.rename(tmp_path, new_path)
                placed.append(new_path)
            for base in {os.path.dirname(os.path.dirname(p)) for p in placed}:
                _fsync_dir(os.path.join(base, "new"))
        except OSError as exc:
            for new_path in placed:
                _unlink_quietly(new_path)
            for tmp_path, _ in written:
                _unlink_quietly(tmp_path)
            if exc.errno == errno.ENOENT:
                self._ready.clear()  # the mail dir was removed under us: rebuild it next time
            raise DeliveryError(f"{exc.strerror}: {exc.filename}", exc.errno in _NO_SPACE) from exc
        return queue_id

    def _prepare(self, folder: str) -> str:
        base = os.path.join(self.root, folder)
        if folder not in self._ready:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(base, sub), exist_ok=True)
            self._ready.add(folder)
        return base

    def _trace_header(self, envelope: Envelope, address: str, peer_address: str, queue_id: str) -> bytes:
        """Return-Path, Delivered-To and Received (RFC 5321 4.4)."""
        date = format_datetime(datetime.now(timezone.utc).astimezone())
        return (
            f"Return-Path: <{envelope.sender}>\n"
            f"Delivered-To: {address}\n"
            f"Received: from {envelope.helo} ({peer_address})\n"
            f"\tby {self.hostname} (prefork-smtpd) with ESMTP id {queue_id}\n"
            f"\tfor <{address}>; {date}\n"
        ).encode("utf-8", "surrogateescape")


def _write_synced(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_temporary_files(root: str, pid: int) -> list[str]:
    """Unlink the tmp/ files a dead worker left: its mail was never acknowledged.

    Maildir names carry the writer's pid (``...P<pid>Q...``), so only that
    worker's files are touched, never those another worker is writing now.
    """
    marker = f"P{pid}Q"
    removed = []
    try:
        folders = os.scandir(root)
    except OSError:
        return removed
    with folders:
        for folder in folders:
            tmp = os.path.join(folder.path, "tmp")
            try:
                names = os.listdir(tmp)
            except OSError:
                continue
            for name in names:
                if marker in name:
                    path = os.path.join(tmp, name)
                    _unlink_quietly(path)
                    removed.append(path)
    return removed
