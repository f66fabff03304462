"""Durable Maildir delivery. Knows nothing of SMTP beyond the envelope.

A message is stored for every recipient folder, all or nothing:

1. each copy is written into the spool ``<mail_dir>/.tmp/`` and fsynced;
2. every copy is renamed into ``<folder>/new/``;
3. every ``new/`` directory touched is fsynced, so the renames survive a
   crash.

Only after step 3 does the caller acknowledge the mail. If any step fails,
the copies already in ``new/`` are removed again and the temporary files are
unlinked, so the client's retry cannot produce duplicates and nothing
half-written is ever visible to a mail reader.

Why one spool instead of each folder's own ``tmp/``: a worker that dies
leaves its unacknowledged files in one small directory, which the master
lists and cleans in time independent of the number of folders (scanning
every ``tmp/`` took 1.66 s per dead worker at 120,000 folders). A rename
from the spool into ``new/`` is as atomic as one from ``tmp/``, readers
(Dovecot, mutt, Python's ``mailbox``) only ever look at ``new/`` and
``cur/``, and no folder can be called ``.tmp``: the session refuses local
parts that start with a dot. Every folder still gets its ``tmp/``, ``new/``
and ``cur/``, as Maildir requires. The spool and every folder must be on
one file system (a rename cannot cross file systems); a folder that is a
mount point of its own is refused.

Symbolic links: ``mail_dir`` itself may be one (the administrator chose
it), but nothing below it is followed: a folder or its ``tmp/``, ``new/``
or ``cur/`` that is a symbolic link fails the delivery (451) with a reason
naming it. The store opens ``mail_dir``, then the spool and each folder's
``new/`` relative to it with ``O_NOFOLLOW``, and renames by those
directory descriptors, so a link planted later is not followed either.

Modes: folders are made 0700, files 0600, whatever the umask; the reader
(Dovecot's ``mail_uid``, mutt) runs as the same user, so no group needs
access. A new folder's entry is fsynced into ``mail_dir`` before any mail
is put in it.

Group commit: the steps run for a *batch* of messages at once (all writes,
then making all of them durable, then all renames, then making the renames
durable). For a batch of several files, "durable" is one ``syncfs()`` of the
file system instead of an fsync per file: it writes every dirty page and
the journal of that file system, flushes the device cache, and (Linux 5.8
and later) reports any writeback error, which fails the whole batch. On
this kind of disk that is two flushes per batch instead of two per mail
(measured: 9,200 against 4,000 small mails/s for batches of 32). A lone
file still gets a plain fsync, which is cheaper. No message is
acknowledged before its batch's step 3.

The journal (``journal_size``, see journal.py; off unless the
administrator sets it) replaces steps 1b and 3 for a batch of small mails
with no copy for the queue: the mail is acknowledged once it is durable in
the journal, as Postfix answers once its queue file is, and its copy in
``new/`` becomes durable later. Step 1 writes the
copies into the spool as above, then appends the whole batch (every copy's
folder, name and content) to the delivery thread's journal file and
flushes that file alone (``fdatasync``: its data and its size, one device
flush); step 2 renames the copies into ``new/``, and the mails are
acknowledged. Which call makes what durable: the fdatasync makes the
record durable, so the mail survives a crash from then on; the copies'
data and names become durable at the journal's retirement, one ``syncfs``
for many batches (when the file reaches ``journal_size``, its oldest
record JOURNAL_MAX_AGE seconds, or mail stops for JOURNAL_IDLE), and only
after that syncfs is the journal unlinked. The renames come after the
flush, so every name in ``new/`` that a crash may leave without its data
has its record on disk: ``replay_journals`` (the master, for a worker that
died, and at start) writes such copies again, and any copy missing from
``new/`` unless a reader has moved it whole into ``cur/`` (there, one
not whole is rewritten under its ``cur/`` name). What a replay cannot
tell: a copy a reader deleted in the seconds before the crash comes back.
A rename that fails after the flush answers 451 but leaves a record: after
a crash in that moment the mail may be stored as well as retried.

Folders: a recipient's folder is one name (``bob``) or a domain and a
name (``a.example/bob``, ``--folders address``), each part checked by the
session's policy; a plus-address may add a Maildir++ subfolder
(``bob/.invoices``), used when it exists or the store is told to make
such folders (``plus_folders``); one made gets the ``maildirfolder`` file
Maildir++ readers (Dovecot) expect. The store makes none in a mailbox that
holds ``max_plus_folders`` Maildir++ subfolders already: a sender could
otherwise spend inodes one made-up tag at a time. The mail goes to the
mailbox itself then. The count is taken only when a folder would be
made, and the folder made, under a lock on the mailbox, so that
deliveries in other threads and workers cannot pass the limit together;
a mailbox found full is taken as full for PLUS_FULL_RECHECK seconds
without a new count. Every part is opened with O_NOFOLLOW.

Files use LF line endings, as Maildir readers (mutt, Dovecot, Python's
``mailbox``) expect; the SMTP session already refused bare CR and LF, so the
conversion from CRLF loses nothing. A BINARYMIME message (BDAT, RFC 3030)
may hold any octets, bare CR and LF included: it is stored as received,
with CRLF trace headers (Dovecot and ``mailbox`` read CRLF files too).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import itertools
import os
import queue
import re
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Callable

from .dsn import recorded_headers
from .journal import FILE_ID_SIZE, encode_record, iter_records
from .queue import MSG, queue_file_header
from .session import Envelope, Recipient

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
IOV_BATCH = 512  # pieces per writev (the system allows 1024)
MAX_BATCH = 64  # messages per group commit
# A batch waits for the clients the last one answered (BatchCommitter) at most
# this share of the time the last batch took, and at most GATHER_MAX seconds.
GATHER_SHARE = 0.5
GATHER_MAX = 0.010
SYNCFS_FROM = 3  # files (or directories) in a batch from which syncfs beats fsyncs
SPOOL = ".tmp"  # under mail_dir: where every copy is written before its rename into new/
JOURNAL_DIR = ".journal"  # under mail_dir: the delivery threads' journals (journal.py)
# Mails larger than this skip the journal: written twice, they would cost
# more than the flush saved (S3's 1 MiB mails).
JOURNAL_MAX_MAIL = 256 * 1024
JOURNAL_MAX_AGE = 10.0  # seconds a record waits at most for its copies to be made durable
JOURNAL_IDLE = 0.5  # seconds without mail after which a delivery thread retires its journal
UNSYNCED = ".unsynced"  # added to a journal whose retirement's syncfs failed: its replay rewrites every copy
FOLDER_MODE = 0o700
FILE_MODE = 0o600
MAILDIR_SUBFOLDERS = ("tmp", "new", "cur")
MAILDIRFOLDER = "maildirfolder"  # marks a Maildir++ subfolder (Dovecot, Courier)
PLUS_FULL_RECHECK = 60.0  # seconds a mailbox at max_plus_folders stays full without a new count
MAX_FULL_MAILBOXES = 1024  # mailboxes a store remembers as full (MaildirStore.note_full)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# A unique name (see MaildirStore.unique_name) and the writer's pid in it.
_WRITER_PID = re.compile(r"\d+\.M\d+P(\d+)Q\d+\.")

_libc = ctypes.CDLL(None, use_errno=True)
_libc_syncfs = getattr(_libc, "syncfs", None)  # Linux only; elsewhere, fsyncs


class _process:
    """This process's pid, for the name of every file; a getpid() per mail
    was one syscall of the few per mail. Set again in a forked child."""

    pid = os.getpid()


def _note_new_pid() -> None:
    _process.pid = os.getpid()


os.register_at_fork(after_in_child=_note_new_pid)


def syncfs(fd: int) -> None:
    """Make every change to the file system holding ``fd`` durable."""
    assert _libc_syncfs is not None  # called only where the C library has it
    if _libc_syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "syncfs")


# The store's durable steps go through these module names, never ``os.x``
# directly: a test puts recorders in their place to check the order of
# writes, flushes and renames. (A global lookup: cheaper than ``os.fsync``.)
fsync = os.fsync
fdatasync = os.fdatasync
rename = os.rename
writev = os.writev
mkdir = os.mkdir


class DeliveryError(Exception):
    """Storing failed; ``no_space`` picks 452 over 451."""

    def __init__(self, reason: str, no_space: bool, errno_: int = 0) -> None:
        super().__init__(reason)
        self.no_space = no_space
        self.errno = errno_

    @classmethod
    def from_os_error(cls, exc: OSError) -> "DeliveryError":
        where = f": {exc.filename}" if exc.filename else ""
        return cls(f"{exc.strerror}{where}", exc.errno in _NO_SPACE, exc.errno or 0)


@dataclass
class _Copy:
    tmp_name: str  # in the spool
    spool_fd: int
    new_fd: int  # the folder's new/, owned by the batch
    fd: int = -1
    placed: bool = False  # renamed into new/
    folder: str | None = None  # relative to mail_dir; None for the queue's copy
    header: bytes = b""  # the copy's own trace header, before the mail's body


@dataclass
class _Job:
    """One message of a batch, followed through the four steps."""

    envelope: Envelope
    peer_address: str
    queue_id: str
    copies: list[_Copy] = field(default_factory=list)
    error: DeliveryError | None = None
    body: list[bytes | bytearray] = field(default_factory=list)  # as written after each folder copy's header

    def fail(self, exc: OSError) -> None:
        if self.error is None:
            self.error = DeliveryError.from_os_error(exc)
        for copy in self.copies:
            if copy.fd >= 0:
                os.close(copy.fd)
                copy.fd = -1
            if copy.placed:
                _unlink_quietly(self.queue_id, copy.new_fd)
                copy.placed = False
            else:
                _unlink_quietly(copy.tmp_name, copy.spool_fd)


class MaildirStore:
    def __init__(
        self, root: str, hostname: str, queue_dir: str | None = None, plus_folders: bool = False,
        max_plus_folders: int = 100, note: Callable[[str], object] | None = None, journal_size: int = 0,
    ) -> None:
        self.root = os.path.abspath(root)
        self.hostname = hostname
        # Where the copy for outside recipients goes (queue.py), in the same
        # batch as the local copies: all of one mail is durable, or none.
        self.queue_dir = queue_dir
        self.plus_folders = plus_folders  # make a plus-address's Maildir++ subfolder if missing
        self.max_plus_folders = max_plus_folders  # ... unless its mailbox holds this many
        self.full_mailboxes: dict[str, float] = {}  # mailbox -> when it was counted at max_plus_folders
        # What the store has to say (a folder not made): called from its thread.
        self.note = note if note is not None else _say_nothing
        # Maildir forbids "/" and ":" in the host part of a file name.
        self._host_part = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        self._sequence = itertools.count()
        self._checked: set[str] = set()  # folders whose tmp/new/cur were checked once
        self._date_second = -1
        self._date = ""
        # A umask that takes the owner's bits needs a chmod after each create;
        # any usual umask (022, 027, 077, even 000) leaves 0600 as it is.
        self._chmod_files = bool(_current_umask() & FILE_MODE)
        # Octets of journal (see journal.py) a delivery thread appends before
        # it makes their copies durable and starts a new one; 0: no journal,
        # every batch flushes its copies and their names before its answer.
        self.journal_size = journal_size if _libc_syncfs is not None else 0
        self._journals = threading.local()  # .file: the thread's _JournalFile
        self._journal_numbers = itertools.count()

    def note_full(self, mailbox: str, now: float) -> None:
        """Remember that ``mailbox`` was counted at max_plus_folders at ``now``.

        Kept to MAX_FULL_MAILBOXES entries: a sender can fill one mailbox
        after another, and each entry stays for as long as the server runs.
        Entries past PLUS_FULL_RECHECK go first (they mean nothing any more),
        then the oldest: forgetting one costs one more listing, never a folder
        past the limit, since the count is taken again.
        """
        full = self.full_mailboxes
        full.pop(mailbox, None)  # to the end: the dict stays in the order of the times
        full[mailbox] = now
        if len(full) > MAX_FULL_MAILBOXES:
            for name in [name for name, since in full.items() if now - since >= PLUS_FULL_RECHECK]:
                del full[name]
            while len(full) > MAX_FULL_MAILBOXES:
                del full[next(iter(full))]

    def unique_name(self) -> str:
        """A Maildir file name unique across processes and time."""
        now = time.time()
        seconds = int(now)
        micros = int((now - seconds) * 1_000_000)
        return f"{seconds}.M{micros}P{_process.pid}Q{next(self._sequence)}.{self._host_part}"

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
        try:
            # Opened per batch, by path: a mail_dir moved or made anew is seen.
            dirs = _BatchDirs(self)
        except OSError as exc:
            error = DeliveryError.from_os_error(exc)
            return [error] * len(jobs)
        try:
            for job in jobs:  # 1a. write every copy
                self._write(job, dirs)
            if self._journal_takes(jobs):
                self._journal_batch(jobs, dirs)
            else:
                self._make_data_durable(jobs, dirs.spool)  # 1b.
                _place(jobs)  # 2.
                self._make_renames_durable(jobs, dirs.spool)  # 3.
        finally:
            dirs.close()
        if any(job.error and job.error.errno in (errno.ENOENT, errno.ENOTDIR) for job in jobs):
            self._checked.clear()  # folders were removed under us: check them again
        return [job.error if job.error else job.queue_id for job in jobs]

    def _journal_takes(self, jobs: list[_Job]) -> bool:
        """Whether this batch goes through the journal: it is on, and every
        mail is small and has no copy for the queue.

        A big mail would be written twice for a flush it hardly notices; the
        queue's copies stay out so that a replay never sends a mail twice
        (the queue runner may have sent and removed it already).
        """
        if self.journal_size <= 0:
            return False
        for job in jobs:
            # The body as written, not the envelope's size: the replay
            # refuses a body over JOURNAL_MAX_MAIL (journal.iter_records).
            if job.error is None and (
                sum(len(piece) for piece in job.body) > JOURNAL_MAX_MAIL
                or any(copy.folder is None for copy in job.copies)
            ):
                return False
        return True

    def _journal_batch(self, jobs: list[_Job], dirs: "_BatchDirs") -> None:
        """The batch's copies into the journal, one flush, then into new/.

        The renames come only after the flush: a name in new/ that a crash
        makes durable before its data always has its record on disk, and
        the replay writes that copy again.
        """
        live = [job for job in jobs if job.error is None]
        for job in live:
            for copy in job.copies:
                os.close(copy.fd)  # no fsync: the journal holds the content
                copy.fd = -1
        if not live:
            return
        try:
            journal = self._journal(dirs)
            record = encode_record(
                journal.file_id,
                [job.body for job in live],
                (
                    (copy.folder or "", job.queue_id, copy.header, number)
                    for number, job in enumerate(live)
                    for copy in job.copies
                ),
            )
            journal.append(record)
        except OSError as exc:
            for job in live:
                job.fail(exc)
            return
        _place(live)

    def _journal(self, dirs: "_BatchDirs") -> "_JournalFile":
        """This thread's journal file; made at its first batch (or the first
        after a quiet spell), its name flushed before any record counts on it."""
        journal: _JournalFile | None = getattr(self._journals, "file", None)
        if journal is not None and journal.torn:
            # Left as it is, unlocked, for the replay (its whole records
            # come first); its copies are made durable by the next file's
            # retirement, one syncfs for the whole file system.
            self.note(f"journal {journal.name}: a refused record could not be cut off; kept for the replay")
            os.close(journal.fd)
            os.close(journal.dir_fd)
            journal = self._journals.file = None
        if journal is not None and journal.moved(dirs.root):
            # mail_dir was moved or made anew: the replay reads the new one's
            # journals only. The old journal's copies are made durable where
            # they are, and the records go to a journal of the new mail_dir.
            self.retire_journal()  # leaves no journal file open, whatever happens
            journal = None
        if journal is None:
            journal = _JournalFile.create(dirs.root, self.root, next(self._journal_numbers))
            try:
                fsync(journal.dir_fd)
            except OSError:
                _unlink_quietly(journal.name, journal.dir_fd)
                os.close(journal.fd)
                os.close(journal.dir_fd)
                raise
            self._journals.file = journal
        return journal

    def journal_pending(self) -> bool:
        """Whether this thread's journal holds records not yet retired."""
        journal: _JournalFile | None = getattr(self._journals, "file", None)
        return journal is not None and journal.size > 0

    def retire_journal_if_due(self) -> None:
        """Retire this thread's journal once it holds journal_size octets or
        its oldest record is JOURNAL_MAX_AGE seconds old."""
        journal: _JournalFile | None = getattr(self._journals, "file", None)
        if journal is not None and journal.size > 0 and (
            journal.size >= self.journal_size or time.monotonic() - journal.first_record >= JOURNAL_MAX_AGE
        ):
            self.retire_journal(next_file=True)

    def retire_journal(self, next_file: bool = False) -> None:
        """Make every copy this thread's journal covers durable, then drop it.

        ``next_file``: mail keeps coming; the next journal file is made
        first, so the same syncfs makes its name durable. Else (mail stopped,
        or the thread ends) the thread keeps no journal file open until its
        next batch: nothing of the store holds the file system busy while
        it is quiet (a ``mount -o remount,ro`` needs that).

        A syncfs that fails lost some write for good, and Linux tells each
        descriptor of it only once: a later syncfs would succeed and drop
        records whose copies never reached the disk. So that journal is
        never retired here: it is left on disk, unlocked, for the master's
        replay (when the worker is gone, or at the next start), and this
        store stops journalling (every later batch flushes its copies and
        their names itself, and is refused if that fails): the kept files
        cannot pile up.
        """
        journal: _JournalFile | None = getattr(self._journals, "file", None)
        if journal is None:
            return
        successor = None
        if next_file:
            try:
                successor = _JournalFile.create(journal.dir_fd, "", next(self._journal_numbers))
            except OSError:
                pass  # retired all the same (else it grows past journal_size); the next batch makes one
        try:
            if journal.size:
                syncfs(journal.fd)
        except OSError as exc:
            if successor is not None:
                _unlink_quietly(successor.name, successor.dir_fd)
                os.close(successor.fd)
            self.journal_size = 0
            self._journals.file = None
            try:
                # The page cache may still hold the copies whole while the
                # disk does not: a replay in this boot must not trust what it
                # reads back, and writes every copy again.
                os.rename(journal.name, journal.name + UNSYNCED, src_dir_fd=journal.dir_fd, dst_dir_fd=journal.dir_fd)
            except OSError:
                pass  # replayed as a journal left by a crash: every copy read back first
            os.close(journal.fd)  # its lock goes with it: the replay at start takes it
            os.close(journal.dir_fd)
            self.note(f"journal {journal.name}: cannot make its copies durable: {exc.strerror};"
                      " kept for the replay, journal off")
            return
        try:
            journal.remove()
        except OSError as exc:
            # Its copies are durable: a journal that stays (or comes back
            # after a crash) only puts back what is whole already.
            self.note(f"journal {journal.name}: copies durable, but not removed: {exc.strerror}")
        self._journals.file = successor
        if successor is None:
            os.close(journal.dir_fd)

    @staticmethod
    def _make_data_durable(jobs: list[_Job], spool_fd: int) -> None:
        copies = [(job, copy) for job in jobs if job.error is None for copy in job.copies]
        if _libc_syncfs is not None and len(copies) >= SYNCFS_FROM:
            # Every copy is in the spool: one file system, one syncfs.
            _sync_file_system(jobs, spool_fd)
        else:
            for job, copy in copies:
                if job.error is None:
                    try:
                        fsync(copy.fd)
                    except OSError as exc:
                        job.fail(exc)
        for job, copy in copies:
            if copy.fd >= 0:
                os.close(copy.fd)
                copy.fd = -1

    @staticmethod
    def _make_renames_durable(jobs: list[_Job], spool_fd: int) -> None:
        directories = {c.new_fd for job in jobs if job.error is None for c in job.copies}
        if _libc_syncfs is not None and len(directories) >= SYNCFS_FROM:
            # A rename cannot cross file systems: every new/ is on the spool's.
            _sync_file_system(jobs, spool_fd)
            return
        for new_fd in directories:
            try:
                fsync(new_fd)
            except OSError as exc:
                for job in jobs:
                    if job.error is None and any(c.new_fd == new_fd for c in job.copies):
                        job.fail(exc)

    def _write(self, job: _Job, dirs: "_BatchDirs") -> None:
        """Write one copy per distinct folder into the spool (not yet fsynced)."""
        envelope = job.envelope
        if envelope.binary:
            # BINARYMIME (RFC 3030): any octets, where a CRLF turned LF could
            # not be told from a bare LF. Stored as received, CRLF lines, the
            # trace headers too, so the file is one line convention.
            body = envelope.chunks
        else:
            # Piece by piece: each replace holds the GIL for one received piece
            # (at most a read's worth), not for the whole message.
            body = [chunk.replace(b"\r\n", b"\n") for chunk in envelope.chunks]
        job.body = body
        folders: dict[str, Recipient] = {}
        try:
            for rcpt in envelope.recipients:
                if not rcpt.outside:  # the queue copy (below) carries the outside recipients
                    folders.setdefault(self._target(rcpt, dirs), rcpt)
            for i, (folder, rcpt) in enumerate(folders.items()):
                new_fd = dirs.new_dir(folder)
                # The name in new/ is the queue id, the same in every folder,
                # so a message can be found in each; in the spool, the copy's
                # number keeps the names apart.
                copy = _Copy(f"{job.queue_id}.{i}", dirs.spool, new_fd, folder=folder)
                copy.fd = os.open(copy.tmp_name, _NEW_FILE_FLAGS, FILE_MODE, dir_fd=dirs.spool)
                job.copies.append(copy)
                if self._chmod_files:
                    os.fchmod(copy.fd, FILE_MODE)
                trace = self._trace_header(envelope, rcpt, job.peer_address, job.queue_id)
                if envelope.binary:
                    trace = trace.replace(b"\n", b"\r\n")
                copy.header = trace
                _write_all(copy.fd, trace, body)
            if any(r.outside for r in envelope.recipients):
                self._write_queue_copy(job, dirs, len(folders))
        except OSError as exc:
            job.fail(exc)

    def _target(self, rcpt: Recipient, dirs: "_BatchDirs") -> str:
        """The folder a copy goes into: the recipient's, or its Maildir++ subfolder
        when that exists (or plus_folders makes it)."""
        if not rcpt.subfolder:
            return rcpt.folder
        path = f"{rcpt.folder}/{rcpt.subfolder}"
        if dirs.is_folder(path) or (self.plus_folders and dirs.may_make_plus_folder(rcpt.folder, rcpt.subfolder)):
            return path
        return rcpt.folder

    def _write_queue_copy(self, job: _Job, dirs: "_BatchDirs", number: int) -> None:
        """The queue file (queue.py): its envelope line, a Received header, the message as received."""
        if self.queue_dir is None:
            raise OSError(errno.EROFS, "no queue for outside recipients", "queue")
        envelope = job.envelope
        copy = _Copy(f"{job.queue_id}.{number}", dirs.spool, dirs.queue_msg_dir())
        copy.fd = os.open(copy.tmp_name, _NEW_FILE_FLAGS, FILE_MODE, dir_fd=dirs.spool)
        job.copies.append(copy)
        if self._chmod_files:
            os.fchmod(copy.fd, FILE_MODE)
        received = self._received(envelope, job.peer_address, job.queue_id, "").replace(b"\n", b"\r\n")
        header = queue_file_header(envelope, job.queue_id, time.time()) + received
        _write_all(copy.fd, header, [chunk for chunk in envelope.chunks])

    def _received(self, envelope: Envelope, peer_address: str, queue_id: str, address: str) -> bytes:
        """The Received header (RFC 5321 4.4), LF line ends; ``for <address>`` when one."""
        date = self._now_date()
        tls = f"\t({envelope.tls.received_comment()})\n" if envelope.tls is not None else ""
        for_clause = f"\n\tfor <{address}>" if address else ""
        return (
            f"Received: from {envelope.helo} ({peer_address})\n{tls}"
            f"\tby {self.hostname} (prefork-smtpd) with {envelope.protocol} id {queue_id}{for_clause}; {date}\n"
        ).encode("utf-8", "surrogateescape")

    def _now_date(self) -> str:
        second = int(time.time())
        if second != self._date_second:  # one RFC 5322 date per second, not per copy
            self._date = format_datetime(datetime.fromtimestamp(second, timezone.utc).astimezone())
            self._date_second = second
        return self._date

    def _trace_header(self, envelope: Envelope, rcpt: Recipient, peer_address: str, queue_id: str) -> bytes:
        """Return-Path, Delivered-To and Received (RFC 5321 4.4); the DSN
        parameters ENVID and ORCPT as Original-Envelope-Id and
        Original-Recipient (RFC 3461), when the client gave them."""
        address = rcpt.address
        second = int(time.time())
        if second != self._date_second:  # one RFC 5322 date per second, not per copy
            self._date = format_datetime(datetime.fromtimestamp(second, timezone.utc).astimezone())
            self._date_second = second
        date = self._date
        # RFC 3848: ESMTPS over TLS, ESMTPA after AUTH; the TLS parameters
        # in a comment, as Postfix writes them. The login stays in the log.
        tls = f"\t({envelope.tls.received_comment()})\n" if envelope.tls is not None else ""
        return (
            f"Return-Path: <{envelope.sender}>\n"
            f"Delivered-To: {address}\n"
            f"{recorded_headers(envelope.dsn, rcpt.dsn) if envelope.dsn or rcpt.dsn else ''}"
            f"Received: from {envelope.helo} ({peer_address})\n{tls}"
            f"\tby {self.hostname} (prefork-smtpd) with {envelope.protocol} id {queue_id}\n"
            f"\tfor <{address}>; {date}\n"
        ).encode("utf-8", "surrogateescape")


def _place(jobs: list[_Job]) -> None:
    """Rename every copy of the jobs still standing into its new/."""
    for job in jobs:
        if job.error is None:
            try:
                for copy in job.copies:
                    rename(copy.tmp_name, job.queue_id, src_dir_fd=copy.spool_fd, dst_dir_fd=copy.new_fd)
                    copy.placed = True
            except OSError as exc:
                job.fail(exc)


class _JournalFile:
    """One delivery thread's journal: ``<mail_dir>/.journal/<pid>.<n>.<id>``.

    Appended to, one record per batch, each flushed with fdatasync before
    its batch is acknowledged. A failed append is cut off again, so the
    file never holds the record of a batch that was refused.
    """

    def __init__(self, dir_fd: int, name: str, file_id: bytes, fd: int) -> None:
        self.dir_fd = dir_fd  # the journal directory, shared by one thread's files
        self.name = name
        self.file_id = file_id
        self.fd = fd
        self.size = 0
        self.first_record = 0.0  # when the oldest record not retired was appended
        self.torn = False  # ends with a refused record it could not cut off: append no more

    @classmethod
    def create(cls, root_fd: int, root: str, number: int) -> "_JournalFile":
        """A new, empty journal file. ``root`` given: open the journal directory
        under ``root_fd`` (mail_dir) first; else ``root_fd`` is that directory."""
        dir_fd = _open_dir(root_fd, JOURNAL_DIR, root, make=True) if root else root_fd
        file_id = os.urandom(FILE_ID_SIZE)
        name = f"{_process.pid}.{number}.{file_id.hex()}"
        try:
            fd = os.open(name, _NEW_FILE_FLAGS | os.O_APPEND, FILE_MODE, dir_fd=dir_fd)
            # Held while this process lives (the lock dies with it): the
            # replay at start leaves a locked journal, whatever its pid.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            if root:
                os.close(dir_fd)
            raise
        return cls(dir_fd, name, file_id, fd)

    def moved(self, root_fd: int) -> bool:
        """Whether this file is no longer in ``<mail_dir>/.journal`` (``root_fd``): moved, removed."""
        try:
            st = os.stat(JOURNAL_DIR, dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:
            return True
        here = os.fstat(self.dir_fd)
        return (st.st_dev, st.st_ino) != (here.st_dev, here.st_ino) or os.fstat(self.fd).st_nlink == 0

    def append(self, pieces: list[bytes | bytearray]) -> None:
        try:
            _write_all(self.fd, pieces[0], pieces[1:])
            fdatasync(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                # A torn record stays: any record after it would be unreadable.
                self.torn = True
            raise
        if self.size == 0:
            self.first_record = time.monotonic()
        self.size += sum(len(piece) for piece in pieces)

    def remove(self) -> None:
        """Unlink and close; the unlink made durable (else a crash would bring
        it back, and its replay mail a reader has deleted since)."""
        try:
            os.unlink(self.name, dir_fd=self.dir_fd)
        finally:
            os.close(self.fd)  # closed whatever happens: never written to again
        fsync(self.dir_fd)


class _BatchDirs:
    """The directories one batch works in, opened without following links.

    ``mail_dir`` by path, then the spool and each folder's ``new/`` relative
    to it with O_NOFOLLOW; every name the batch creates or renames is
    relative to one of these descriptors. Closed when the batch ends.
    """

    def __init__(self, store: MaildirStore) -> None:
        self.store = store
        self.new_fds: dict[str, int] = {}
        self.full: dict[str, int] = {}  # mailbox -> its Maildir++ subfolders, once found full in this batch
        self.queue_fd = -1
        self.root = _open_or_make_root(store.root)
        try:
            self.spool = _open_dir(self.root, SPOOL, store.root, make=True)
        except BaseException:
            os.close(self.root)
            raise
        self._spool_device = -1

    def new_dir(self, folder: str) -> int:
        """The folder's new/, made with tmp/ and cur/ if missing."""
        fd = self.new_fds.get(folder)
        if fd is not None:
            return fd
        store = self.store
        folder_fd = _open_path(self.root, folder, store.root, make=True)
        try:
            checked = folder in store._checked
            if not checked:
                self._check_folder(folder, folder_fd)
                store._checked.add(folder)
            try:
                fd = _open_dir(folder_fd, "new", os.path.join(store.root, folder))
            except FileNotFoundError:
                if not checked:
                    raise
                # Removed since it was checked (rm -r of the mailbox, an IMAP
                # DELETE of a folder): made again now, not refused once with 451.
                self._check_folder(folder, folder_fd)
                fd = _open_dir(folder_fd, "new", os.path.join(store.root, folder))
            self.new_fds[folder] = fd
        finally:
            os.close(folder_fd)
        return fd

    def queue_msg_dir(self) -> int:
        """The queue's msg/ folder, checked to be on the spool's file system (a rename cannot cross)."""
        if self.queue_fd < 0:
            assert self.store.queue_dir is not None
            path = os.path.join(self.store.queue_dir, MSG)
            fd = os.open(path, _DIR_FLAGS)
            if os.fstat(fd).st_dev != os.fstat(self.spool).st_dev:
                os.close(fd)
                raise OSError(errno.EXDEV, "refused, a queue on another file system than the mail dir", path)
            self.queue_fd = fd
            self.new_fds[" queue"] = fd  # closed with the others (no folder name has a space)
        return self.queue_fd
    def is_folder(self, folder: str) -> bool:
        """Whether the folder exists (a symbolic link on the way raises, as for delivery)."""
        if folder in self.new_fds or folder in self.store._checked:
            return True
        try:
            os.close(_open_path(self.root, folder, self.store.root))
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def may_make_plus_folder(self, mailbox: str, subfolder: str) -> bool:
        """Make ``subfolder`` in ``mailbox`` unless the mailbox holds
        max_plus_folders already (then False: the mail goes to the inbox).

        Counted and made under a lock on the mailbox (flock): deliveries in
        other threads and workers making folders in it at once would each
        count the same folders, see room for one more, and together pass the
        limit. The count is one listing per folder made (at most
        max_plus_folders of them), or none while the mailbox is known full.
        """
        store = self.store
        if mailbox in self.full:
            count = self.full[mailbox]
        else:
            full_since = store.full_mailboxes.get(mailbox)
            if full_since is not None and time.monotonic() - full_since < PLUS_FULL_RECHECK:
                count = store.max_plus_folders
            else:
                fd = _open_path(self.root, mailbox, store.root, make=True)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # released with the descriptor
                    if _exists(fd, subfolder):
                        return True  # made meanwhile by another delivery
                    count = _count_plus_folders(fd)
                    if count < store.max_plus_folders:
                        if mailbox not in store._checked:
                            # The mailbox's own Maildir first: its first mail may be bob+x@.
                            self._check_folder(mailbox, fd)
                            store._checked.add(mailbox)
                        _make_dir(fd, subfolder)
                        fsync(fd)  # its entry durable before mail goes in it, as _open_dir makes one
                        return True
                finally:
                    os.close(fd)
                store.note_full(mailbox, time.monotonic())
            self.full[mailbox] = count
        store.note(
            f"{mailbox}: plus-folder {subfolder} not made, {mailbox} has {count} (--max-plus-folders):"
            " stored in its inbox"
        )
        return False

    def _check_folder(self, folder: str, folder_fd: int) -> None:
        """Once per folder and process: tmp/new/cur are real, on the spool's file system."""
        path = os.path.join(self.store.root, folder)
        if self._spool_device < 0:
            self._spool_device = os.fstat(self.spool).st_dev
        if os.fstat(folder_fd).st_dev != self._spool_device:
            raise OSError(errno.EXDEV, "refused, a folder on another file system than the mail dir", path)
        made = False
        for sub in MAILDIR_SUBFOLDERS:
            try:
                st = os.stat(sub, dir_fd=folder_fd, follow_symlinks=False)
            except FileNotFoundError:
                try:
                    _make_dir(folder_fd, sub)
                except OSError as exc:
                    exc.filename = os.path.join(path, sub)
                    raise
                made = True
                continue
            if stat.S_ISLNK(st.st_mode):
                raise _symlink_refused(os.path.join(path, sub))
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), os.path.join(path, sub))
        if os.path.basename(folder).startswith("."):  # a Maildir++ subfolder
            try:
                os.stat(MAILDIRFOLDER, dir_fd=folder_fd, follow_symlinks=False)
            except FileNotFoundError:
                os.close(os.open(MAILDIRFOLDER, _NEW_FILE_FLAGS, FILE_MODE, dir_fd=folder_fd))
                made = True
        if made:
            fsync(folder_fd)  # the new subfolders' entries

    def close(self) -> None:
        for fd in self.new_fds.values():
            os.close(fd)
        os.close(self.spool)
        os.close(self.root)


def _say_nothing(text: str) -> None:
    pass


def _open_or_make_root(path: str) -> int:
    """Open mail_dir (it may itself be a link: the administrator's choice)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:  # removed under the running server: make it again
        parent, name = os.path.split(path)
        try:
            os.makedirs(parent, exist_ok=True)
        except FileExistsError as exc:  # a file on the way
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), exc.filename) from None
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _make_dir(parent_fd, name)
            fsync(parent_fd)
        except OSError as exc:
            exc.filename = path
            raise
        finally:
            os.close(parent_fd)
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _open_dir(parent_fd: int, name: str, parent_path: str, make: bool = False) -> int:
    """Open ``name`` under ``parent_fd`` as a directory, never through a link.

    With ``make``, a missing one is created (FOLDER_MODE) and its entry made
    durable first, so mail put in it survives a crash with it. Errors name
    the full path, for the log.
    """
    try:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            if not make:
                raise
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):  # O_NOFOLLOW met a link (Linux: ENOTDIR)
                _raise_if_link(parent_fd, name, parent_path)
            raise
        _make_dir(parent_fd, name)
        fsync(parent_fd)
    except OSError as exc:
        if exc.filename == name:
            exc.filename = os.path.join(parent_path, name)
        raise
    return _open_dir(parent_fd, name, parent_path)


def _open_path(root_fd: int, folder: str, root_path: str, make: bool = False) -> int:
    """Open ``folder`` ("bob", "a.example/bob/.invoices") part by part, never through a link."""
    parts = folder.split("/")
    fd = root_fd
    path = root_path
    try:
        for part in parts:
            parent = fd
            fd = _open_dir(parent, part, path, make)
            if parent != root_fd:
                os.close(parent)
            path = os.path.join(path, part)
    except BaseException:
        if fd != root_fd:
            os.close(fd)
        raise
    return fd


def _exists(parent_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _count_plus_folders(mailbox_fd: int) -> int:
    """The Maildir++ subfolders (``.name`` directories) in a mailbox: one listing."""
    with os.scandir(mailbox_fd) as entries:
        return sum(1 for e in entries if e.name[:1] == "." and e.is_dir(follow_symlinks=False))


def _make_dir(parent_fd: int, name: str) -> None:
    """mkdir with FOLDER_MODE whatever the umask; another process may win the race."""
    try:
        mkdir(name, FOLDER_MODE, dir_fd=parent_fd)
    except FileExistsError:
        return
    if _current_umask() & FOLDER_MODE:  # only a umask taking the owner's bits changes 0700
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            os.fchmod(fd, FOLDER_MODE)
        finally:
            os.close(fd)


def _raise_if_link(parent_fd: int, name: str, parent_path: str) -> None:
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise _symlink_refused(os.path.join(parent_path, name))


def _symlink_refused(path: str) -> OSError:
    return OSError(errno.ELOOP, "refused, a symbolic link in the mail dir", path)


def _current_umask() -> int:
    """The process umask, read without changing it (other threads create files)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022  # no /proc: assume the usual; the owner's bits are then left alone


class BatchCommitter:
    """Feeds a worker's finished messages to the store in group commits.

    The event loop hands messages over with ``submit`` and gets a future;
    a few threads each take whatever has queued up (up to MAX_BATCH) as one
    batch, so the busier the worker, the more messages share each fsync.

    The messages of one turn of the loop are queued together at its end,
    not one by one: a thread woken by the first would start a batch of one
    (and take the GIL from the loop) while the loop still had the others in
    hand. Gathered, they form one batch and cost one wake-up.

    A batch also waits, briefly, for the clients the last batch answered.
    Without that, when flushes are slow (a neighbour keeps the disk busy),
    the sessions split into two groups that take turns: the mails that came
    in during batch k make batch k+1 at once, and the clients that batch k
    answered send their next mail a moment later, only to wait for all of
    batch k+1 before their own batch. So after a batch, the next one
    gathers until as many mails are in hand as the last batch held plus
    those already queued (each answered client is expected back), for at
    most GATHER_SHARE of the time the last batch took (GATHER_MAX at the
    most) from the end of the last batch: one longer batch instead of two
    in turn. A lone client is never kept waiting (its own mail makes the
    count), and the wait is bounded by the flush it saves.
    """

    def __init__(self, store: MaildirStore, loop: asyncio.AbstractEventLoop, threads: int) -> None:
        self.store = store
        self.loop = loop
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.gathered: list[tuple[Envelope, str, asyncio.Future]] = []  # this turn's, not queued yet
        self.threads = [
            threading.Thread(target=self._run, name=f"delivery-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self.threads:
            thread.start()

    def submit(self, envelope: Envelope, peer_address: str) -> asyncio.Future:
        future = self.loop.create_future()
        if not self.gathered:
            self.loop.call_soon(self._hand_over)  # after the callbacks ready in this turn
        self.gathered.append((envelope, peer_address, future))
        return future

    def _hand_over(self) -> None:
        gathered, self.gathered = self.gathered, []
        for item in gathered:
            self.queue.put(item)

    def close(self) -> None:
        """Finish what is queued, then stop the threads."""
        self._hand_over()  # gathered in a turn the loop did not finish
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()

    def _run(self) -> None:
        expected = 0  # mails the last batch's clients and the queue should bring (see the class's text)
        gather_until = 0.0  # when the answered clients are no longer waited for
        store = self.store
        while True:
            try:
                # A journal with records is retired once mail stops coming.
                first = self.queue.get(timeout=JOURNAL_IDLE) if store.journal_pending() else self.queue.get()
            except queue.Empty:
                self._look_after_journal(store.retire_journal)
                continue
            if first is None:
                self._look_after_journal(store.retire_journal)
                return
            batch = [first]
            if self._take(batch, 0.0) and expected > len(batch):
                # Counted from the last batch's end: a first mail after a
                # quiet spell does not wait for clients that did not come back.
                self._take(batch, gather_until - time.monotonic(), want=expected)
            started = time.monotonic()
            try:
                results = self.store.deliver_batch([(envelope, peer) for envelope, peer, _ in batch])
            except Exception as exc:  # a bug must fail the batch's mails, never acknowledge them
                results = [DeliveryError(f"internal error: {exc!r}", False)] * len(batch)
            ended = time.monotonic()
            gather_until = ended + min(GATHER_MAX, (ended - started) * GATHER_SHARE)
            expected = min(MAX_BATCH, len(batch) + self.queue.qsize())
            # One hand-over to the loop per batch, not per message: each one
            # takes the GIL back from the loop and may wake it.
            self.loop.call_soon_threadsafe(_settle_batch, [future for _, _, future in batch], results)
            self._look_after_journal(store.retire_journal_if_due)  # after the answer: its syncfs is no mail's wait

    def _look_after_journal(self, step: Callable[[], None]) -> None:
        """Run a step of the journal's upkeep; a bug in it is said, and must
        not end the thread every later mail of the worker waits for."""
        try:
            step()
        except Exception as exc:
            self.store.note(f"journal upkeep failed: {exc!r}")

    def _take(self, batch: list, wait: float, want: int = MAX_BATCH) -> bool:
        """Add queued mails to ``batch`` until it holds ``want``, waiting up to
        ``wait`` seconds for more; False if the stop mark came (left queued for
        this thread's next turn)."""
        deadline = time.monotonic() + wait
        while len(batch) < want:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True
                try:
                    item = self.queue.get(timeout=remaining)
                except queue.Empty:
                    return True
            if item is None:
                self.queue.put(None)  # leave the stop mark for this thread's next turn
                return False
            batch.append(item)
        return True


def _sync_file_system(jobs: list[_Job], fd: int) -> None:
    """syncfs the file system of ``fd``; an error fails every job still standing."""
    try:
        syncfs(fd)
    except OSError as exc:
        for job in jobs:
            if job.error is None and job.copies:
                job.fail(exc)


def _settle_batch(futures: list[asyncio.Future], results: list[str | DeliveryError]) -> None:
    for future, result in zip(futures, results):
        if future.cancelled():
            continue
        if isinstance(result, DeliveryError):
            future.set_exception(result)
        else:
            future.set_result(result)


def _write_all(fd: int, header: bytes | bytearray, body: list[bytes | bytearray]) -> None:
    """Write the header and the body pieces with writev, never joining them."""
    parts = [memoryview(header)] + [memoryview(b) for b in body if b]
    i = 0
    while i < len(parts):
        written = writev(fd, parts[i : i + IOV_BATCH])
        while i < len(parts) and written >= len(parts[i]):
            written -= len(parts[i])
            i += 1
        if written:
            parts[i] = parts[i][written:]


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def writer_pid(name: str) -> int | None:
    """The pid in a spool file's name, or None for a name not of ours."""
    match = _WRITER_PID.match(name)
    return int(match.group(1)) if match else None


def remove_temporary_files(root: str, pid: int) -> list[str]:
    """Unlink the spool files a dead worker left: its mail was never acknowledged.

    Maildir names carry the writer's pid (``...P<pid>Q...``), so only that
    worker's files are touched, never those another worker is writing now.
    One small directory is listed: the time does not grow with the folders.
    """
    return _remove_spool_files(root, lambda writer: writer == pid)


def remove_stale_spool_files(root: str) -> list[str]:
    """At start: unlink spool files whose writer is gone (left by a crash)."""
    return _remove_spool_files(root, lambda writer: writer is None or not _process_exists(writer))


def _remove_spool_files(root: str, doomed) -> list[str]:
    spool = os.path.join(root, SPOOL)
    try:
        fd = os.open(spool, _DIR_FLAGS)
    except OSError:
        return []
    removed = []
    try:
        for name in os.listdir(fd):
            if doomed(writer_pid(name)):
                _unlink_quietly(name, fd)
                removed.append(os.path.join(spool, name))
    finally:
        os.close(fd)
    return removed


def replay_journals(root: str, pid: int | None = None) -> list[str]:
    """Put back every copy the journals of a gone writer cover; what was done, for the log.

    ``pid``: that worker's journals (it has died); None: every journal no
    writer holds (at start, after a crash). A writer holds its journal
    with a lock (flock), which dies with it: a pid tells nothing after a
    reboot, where any process may have the dead worker's. A copy is
    written again when its folder's new/ lacks it or holds other content,
    unless a reader has taken it whole into cur/. Rewritten copies are
    made durable (one syncfs, renames, another) before the journal is
    removed; any error but a folder gone keeps the journal.
    """
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return []
    lines: list[str] = []
    try:
        try:
            journal_fd = _open_dir(root_fd, JOURNAL_DIR, root)
        except OSError:
            return []
        try:
            for name in sorted(os.listdir(journal_fd)):
                writer = _journal_writer(name)
                if writer is None or (pid is not None and writer != pid):
                    continue
                lines += _replay_journal(root_fd, root, journal_fd, name, check_lock=pid is None)
        finally:
            os.close(journal_fd)
    finally:
        os.close(root_fd)
    return lines


_JOURNAL_NAME = re.compile(r"(\d+)\.\d+\.([0-9a-f]{%d})(%s)?\Z" % (2 * FILE_ID_SIZE, re.escape(UNSYNCED)))
# What a journal may name: a folder as the session's policy makes them (no
# part is empty, ".." or starts with a dot, but a last Maildir++ ".name"),
# and a unique name.
_JOURNAL_FOLDER = re.compile(r"[^/.][^/]*(/[^/.][^/]*)?(/\.[^/.][^/]*)?\Z")
_MAILDIR_NAME = re.compile(r"\d+\.M\d+P\d+Q\d+\.[^/]+\Z")
# A folder the replay cannot reach for these is gone (or a link): its copy is dropped, said.
_FOLDER_GONE = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP}


def _journal_writer(name: str) -> int | None:
    match = _JOURNAL_NAME.match(name)
    return int(match.group(1)) if match else None


def _replay_journal(root_fd: int, root: str, journal_fd: int, name: str, check_lock: bool) -> list[str]:
    where = os.path.join(root, JOURNAL_DIR, name)
    match = _JOURNAL_NAME.match(name)
    assert match is not None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=journal_fd)
    except OSError as exc:
        return [f"journal {where}: cannot read it: {exc.strerror}; left in place"]
    lines: list[str] = []
    with os.fdopen(fd, "rb") as file:
        if check_lock:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return []  # its writer lives and holds it
        restorer = None
        try:
            restorer = _Restorer(root_fd, root, rewrite=match.group(3) is not None)
            end = 0
            # One record in memory at a time; a body larger than any the
            # store journals ends the reading, as a damaged record does.
            for copies, end in iter_records(file.read, bytes.fromhex(match.group(2)), JOURNAL_MAX_MAIL):
                for folder, copy_name, header, body in copies:
                    line = restorer.restore(folder, copy_name, header, body)
                    if line:
                        lines.append(line)
            size = os.fstat(file.fileno()).st_size
            if end < size:
                lines.append(
                    f"journal {where}: {size - end} octets after its last whole record ignored (never acknowledged)"
                )
            restorer.make_durable()
            os.unlink(name, dir_fd=journal_fd)
            fsync(journal_fd)
        except OSError as exc:
            lines.append(f"journal {where}: cannot replay it: {exc.strerror}; left in place")
        finally:
            if restorer is not None:
                restorer.close()
    return lines


class _Restorer:
    """Writes again the journal's copies that did not reach the disk.

    Holds no descriptor per folder (a mail to thousands of mailboxes must
    not run the master out of them), and writes each (folder, name) once
    however often a journal names it.
    """

    def __init__(self, root_fd: int, root: str, rewrite: bool = False) -> None:
        self.root_fd = root_fd
        self.root = root
        self.rewrite = rewrite  # every copy, whole as it may read: the disk may not hold what the cache does
        self.spool = _open_dir(root_fd, SPOOL, root, make=True)
        self.seen: set[tuple[str, str]] = set()
        self.taken: dict[str, dict[str, str]] = {}  # folder -> {name without flags: entry in its cur/}
        self.written: list[tuple[str, str, str, str]] = []  # (spool name, folder, "new" or "cur", entry): to rename
        self.sequence = itertools.count()

    def restore(self, folder: str, name: str, header: bytes, body: bytes) -> str | None:
        if not _JOURNAL_FOLDER.match(folder) or not _MAILDIR_NAME.match(name):
            return f"journal: refused an entry for {folder!r}/{name!r}: not a folder and name the store makes"
        if (folder, name) in self.seen:
            return None
        self.seen.add((folder, name))
        try:
            new_fd = self._open_sub(folder, "new")
        except OSError as exc:
            if exc.errno not in _FOLDER_GONE:
                raise  # the journal stays: the copy may yet be put back
            return f"journal: {name} not put back into {os.path.join(self.root, folder)}: {exc.strerror}"
        try:
            in_new = _has_content(new_fd, name, header, body, self.rewrite)
        finally:
            os.close(new_fd)
        if in_new and not self.rewrite:
            return None
        sub, entry = "new", name
        taken = self._taken(folder).get(name)
        if taken is not None and not in_new:
            # A reader took it; its rename may have reached the disk without
            # the data: a copy not whole there is put back under its name.
            cur_fd = self._open_sub(folder, "cur")
            try:
                if _has_content(cur_fd, taken, header, body) and not self.rewrite:
                    return None
            finally:
                os.close(cur_fd)
            sub, entry = "cur", taken
        spool_name = f"{name}.restore{next(self.sequence)}"
        fd = os.open(spool_name, _NEW_FILE_FLAGS | os.O_TRUNC, FILE_MODE, dir_fd=self.spool)
        try:
            _write_all(fd, header, [body])
        finally:
            os.close(fd)
        self.written.append((spool_name, folder, sub, entry))
        return f"journal: put back {os.path.join(self.root, folder, sub, entry)}"

    def make_durable(self) -> None:
        if not self.written:
            return
        syncfs(self.spool)
        by_dir: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for spool_name, folder, sub, entry in self.written:
            by_dir.setdefault((folder, sub), []).append((spool_name, entry))
        for (folder, sub), renames in by_dir.items():
            dir_fd = self._open_sub(folder, sub)
            try:
                for spool_name, entry in renames:
                    rename(spool_name, entry, src_dir_fd=self.spool, dst_dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        syncfs(self.spool)

    def _open_sub(self, folder: str, sub: str) -> int:
        folder_fd = _open_path(self.root_fd, folder, self.root)
        try:
            return _open_dir(folder_fd, sub, os.path.join(self.root, folder))
        finally:
            os.close(folder_fd)

    def _taken(self, folder: str) -> dict[str, str]:
        names = self.taken.get(folder)
        if names is None:
            try:
                cur = self._open_sub(folder, "cur")
                try:
                    names = {entry.split(":", 1)[0]: entry for entry in os.listdir(cur)}
                finally:
                    os.close(cur)
            except FileNotFoundError:
                names = {}
            self.taken[folder] = names
        return names

    def close(self) -> None:
        for spool_name, _, _, _ in self.written:
            _unlink_quietly(spool_name, self.spool)  # renamed already, unless the replay failed
        os.close(self.spool)


def _has_content(dir_fd: int, name: str, header: bytes, body: bytes, present: bool = False) -> bool:
    """Whether ``name`` holds exactly header + body; ``present``: only whether it is there."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    if present:
        os.close(fd)
        return True
    try:
        with os.fdopen(os.dup(fd), "rb") as file:
            return file.read(len(header)) == header and file.read(len(body) + 1) == body
    finally:
        os.close(fd)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_mail_dir(path: str) -> str | None:
    """At start: None if mail can be stored under ``path``, else why not.

    Makes the directory and the spool if missing, then goes through what a
    delivery does with a probe file: create, write, fsync, rename, remove.
    """
    path = os.path.abspath(path)
    step = "create it"
    try:
        if os.path.lexists(path) and not os.path.isdir(path):
            return f"mail dir {path} is not a directory"
        root = _open_or_make_root(path)
        try:
            step = "open its spool"
            spool = _open_dir(root, SPOOL, path, make=True)
            try:
                step = "write a file in it"
                name = f"{int(time.time())}.M0P{os.getpid()}Q0.startup-check"
                fd = os.open(name, _NEW_FILE_FLAGS, FILE_MODE, dir_fd=spool)
                try:
                    os.write(fd, b"probe\n")
                    step = "fsync a file in it"
                    os.fsync(fd)
                finally:
                    os.close(fd)
                step = "rename a file in it"
                os.rename(name, name + ".renamed", src_dir_fd=spool, dst_dir_fd=spool)
                step = "remove a file from it"
                os.unlink(name + ".renamed", dir_fd=spool)
                step = "fsync it"
                os.fsync(spool)
            finally:
                os.close(spool)
            step = "make its journal directory"
            os.close(_open_dir(root, JOURNAL_DIR, path, make=True))
        finally:
            os.close(root)
    except OSError as exc:
        where = exc.filename if exc.filename and os.path.isabs(exc.filename) else path
        return f"mail dir {path}: cannot {step}: {exc.strerror} ({where})"
    remove_stale_spool_files(path)
    return None
