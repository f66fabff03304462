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

Group commit: the steps run for a *batch* of messages at once (all writes,
then making all of them durable, then all renames, then making the renames
durable). For a batch of several files, "durable" is one ``syncfs()`` per
file system instead of an fsync per file: it writes every dirty page and
the journal of that file system, flushes the device cache, and (Linux 5.8
and later) reports any writeback error, which fails the whole batch. On
this kind of disk that is two flushes per batch instead of two per mail
(measured: 9,200 against 4,000 small mails/s for batches of 32). A lone
file still gets a plain fsync, which is cheaper. No message is
acknowledged before its batch's step 3.

Files use LF line endings, as Maildir readers (mutt, Dovecot, Python's
``mailbox``) expect; the SMTP session already refused bare CR and LF, so the
conversion from CRLF loses nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import itertools
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Callable

from .session import Envelope

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
IOV_BATCH = 512  # pieces per writev (the system allows 1024)
MAX_BATCH = 64  # messages per group commit
SYNCFS_FROM = 3  # files (or directories) in a batch from which syncfs beats fsyncs

_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)  # Linux only; elsewhere, fsyncs


def syncfs(fd: int) -> None:
    """Make every change to the file system holding ``fd`` durable."""
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "syncfs")


class DeliveryError(Exception):
    """Storing failed; ``no_space`` picks 452 over 451."""

    def __init__(self, reason: str, no_space: bool, errno_: int = 0) -> None:
        super().__init__(reason)
        self.no_space = no_space
        self.errno = errno_

    @classmethod
    def from_os_error(cls, exc: OSError) -> "DeliveryError":
        return cls(f"{exc.strerror}: {exc.filename}", exc.errno in _NO_SPACE, exc.errno or 0)


@dataclass
class _Copy:
    tmp_path: str
    new_path: str
    new_dir: str
    device: int  # st_dev of the folder: syncfs covers one file system
    fd: int = -1


@dataclass
class _Job:
    """One message of a batch, followed through the four steps."""

    envelope: Envelope
    peer_address: str
    queue_id: str
    copies: list[_Copy] = field(default_factory=list)
    placed: list[str] = field(default_factory=list)  # copies already in new/
    error: DeliveryError | None = None

    def fail(self, exc: OSError) -> None:
        if self.error is None:
            self.error = DeliveryError.from_os_error(exc)
        for copy in self.copies:
            if copy.fd >= 0:
                os.close(copy.fd)
                copy.fd = -1
            _unlink_quietly(copy.tmp_path)
        for path in self.placed:
            _unlink_quietly(path)
        self.placed = []


class MaildirStore:
    def __init__(self, root: str, hostname: str) -> None:
        self.root = os.path.abspath(root)
        self.hostname = hostname
        # Maildir forbids "/" and ":" in the host part of a file name.
        self._host_part = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        self._sequence = itertools.count()
        self._ready: dict[str, int] = {}  # folders known to have tmp/new/cur -> st_dev
        self._date_second = -1
        self._date = ""

    def unique_name(self) -> str:
        """A Maildir file name unique across processes and time."""
        now = time.time()
        seconds = int(now)
        micros = int((now - seconds) * 1_000_000)
        return f"{seconds}.M{micros}P{os.getpid()}Q{next(self._sequence)}.{self._host_part}"

    def deliver(self, envelope: Envelope, peer_address: str) -> str:
        """Store one message; return its queue id or raise DeliveryError."""
        (result,) = self.deliver_batch([(envelope, peer_address)])
        if isinstance(result, DeliveryError):
            raise result
        return result

    def deliver_batch(self, items: list[tuple[Envelope, str]]) -> list[str | DeliveryError]:
        """Store several messages with shared fsyncs; a result per message.

        Blocking: call it from a thread, never on the event loop.
        """
        jobs = [_Job(envelope, peer, self.unique_name()) for envelope, peer in items]
        for job in jobs:  # 1a. write every copy
            self._write(job)
        self._make_data_durable(jobs)  # 1b.
        for job in jobs:  # 2. rename into new/
            if job.error is None:
                try:
                    for copy in job.copies:
                        os.rename(copy.tmp_path, copy.new_path)
                        job.placed.append(copy.new_path)
                except OSError as exc:
                    job.fail(exc)
        self._make_renames_durable(jobs)  # 3.
        if any(job.error and job.error.errno in (errno.ENOENT, errno.ENOTDIR) for job in jobs):
            self._ready.clear()  # the mail dir was removed under us: rebuild it next time
        return [job.error if job.error else job.queue_id for job in jobs]

    def _make_data_durable(self, jobs: list[_Job]) -> None:
        copies = [(job, copy) for job in jobs if job.error is None for copy in job.copies]
        if _syncfs is not None and len(copies) >= SYNCFS_FROM:
            self._syncfs_each_device(jobs, {copy.device: copy.fd for _, copy in copies})
        else:
            for job, copy in copies:
                if job.error is None:
                    try:
                        os.fsync(copy.fd)
                    except OSError as exc:
                        job.fail(exc)
        for job, copy in copies:
            if copy.fd >= 0:
                os.close(copy.fd)
                copy.fd = -1

    def _make_renames_durable(self, jobs: list[_Job]) -> None:
        directories = {c.new_dir: c.device for job in jobs if job.error is None for c in job.copies}
        if _syncfs is not None and len(directories) >= SYNCFS_FROM:
            fds = {}
            try:
                for directory, device in directories.items():
                    if device not in fds:
                        fds[device] = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                self._syncfs_each_device(jobs, fds)
            except OSError as exc:
                for job in jobs:
                    if job.error is None:
                        job.fail(exc)
            finally:
                for fd in fds.values():
                    os.close(fd)
            return
        for directory in directories:
            try:
                _fsync_dir(directory)
            except OSError as exc:
                _fail_jobs_with(jobs, exc, lambda c: c.new_dir == directory)

    @staticmethod
    def _syncfs_each_device(jobs: list[_Job], fd_by_device: dict[int, int]) -> None:
        """syncfs once per file system; an error fails every job on it."""
        for device, fd in fd_by_device.items():
            try:
                syncfs(fd)
            except OSError as exc:
                _fail_jobs_with(jobs, exc, lambda c: c.device == device)

    def _write(self, job: _Job) -> None:
        """Write one copy per distinct folder into tmp/ (not yet fsynced)."""
        envelope = job.envelope
        # Piece by piece: each replace holds the GIL for one received piece
        # (at most a read's worth), not for the whole message.
        body = [chunk.replace(b"\r\n", b"\n") for chunk in envelope.chunks]
        folders: dict[str, str] = {}
        for rcpt in envelope.recipients:
            folders.setdefault(rcpt.folder, rcpt.address)
        try:
            for folder, address in folders.items():
                base, device = self._prepare(folder)
                # Names need only be unique within one folder: every copy of a
                # message takes the queue id, so it can be found in each.
                copy = _Copy(
                    os.path.join(base, "tmp", job.queue_id), os.path.join(base, "new", job.queue_id),
                    os.path.join(base, "new"), device,
                )
                copy.fd = os.open(copy.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
                job.copies.append(copy)
                _write_all(copy.fd, self._trace_header(envelope, address, job.peer_address, job.queue_id), body)
        except OSError as exc:
            job.fail(exc)

    def _prepare(self, folder: str) -> tuple[str, int]:
        base = os.path.join(self.root, folder)
        device = self._ready.get(folder)
        if device is None:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(base, sub), exist_ok=True)
            device = self._ready[folder] = os.stat(os.path.join(base, "tmp")).st_dev
        return base, device

    def _trace_header(self, envelope: Envelope, address: str, peer_address: str, queue_id: str) -> bytes:
        """Return-Path, Delivered-To and Received (RFC 5321 4.4)."""
        second = int(time.time())
        if second != self._date_second:  # one RFC 5322 date per second, not per copy
            self._date = format_datetime(datetime.fromtimestamp(second, timezone.utc).astimezone())
            self._date_second = second
        date = self._date
        return (
            f"Return-Path: <{envelope.sender}>\n"
            f"Delivered-To: {address}\n"
            f"Received: from {envelope.helo} ({peer_address})\n"
            f"\tby {self.hostname} (prefork-smtpd) with ESMTP id {queue_id}\n"
            f"\tfor <{address}>; {date}\n"
        ).encode("utf-8", "surrogateescape")


class BatchCommitter:
    """Feeds a worker's finished messages to the store in group commits.

    The event loop hands messages over with ``submit`` and gets a future;
    a few threads each take whatever has queued up (up to MAX_BATCH) as one
    batch, so the busier the worker, the more messages share each fsync.
    """

    def __init__(self, store: MaildirStore, loop: asyncio.AbstractEventLoop, threads: int) -> None:
        self.store = store
        self.loop = loop
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._run, name=f"delivery-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self.threads:
            thread.start()

    def submit(self, envelope: Envelope, peer_address: str) -> asyncio.Future:
        future = self.loop.create_future()
        self.queue.put((envelope, peer_address, future))
        return future

    def close(self) -> None:
        """Finish what is queued, then stop the threads."""
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)  # leave the stop mark for this thread's next turn
                    break
                batch.append(item)
            try:
                results = self.store.deliver_batch([(envelope, peer) for envelope, peer, _ in batch])
            except Exception as exc:  # a bug must fail the batch's mails, never acknowledge them
                results = [DeliveryError(f"internal error: {exc!r}", False)] * len(batch)
            for (_, _, future), result in zip(batch, results):
                self.loop.call_soon_threadsafe(_settle, future, result)


def _fail_jobs_with(jobs: list[_Job], exc: OSError, affected: Callable[[_Copy], bool]) -> None:
    """Fail every job still standing that has a copy ``affected`` by ``exc``."""
    for job in jobs:
        if job.error is None and any(affected(c) for c in job.copies):
            job.fail(exc)


def _settle(future: asyncio.Future, result: str | DeliveryError) -> None:
    if future.cancelled():
        return
    if isinstance(result, DeliveryError):
        future.set_exception(result)
    else:
        future.set_result(result)


def _write_all(fd: int, header: bytes, body: list[bytes]) -> None:
    """Write the header and the body pieces with writev, never joining them."""
    parts = [memoryview(header)] + [memoryview(b) for b in body if b]
    i = 0
    while i < len(parts):
        written = os.writev(fd, parts[i : i + IOV_BATCH])
        while i < len(parts) and written >= len(parts[i]):
            written -= len(parts[i])
            i += 1
        if written:
            parts[i] = parts[i][written:]


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
