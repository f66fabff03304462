"""The outbound queue on disk: one file per mail, one progress log beside it.

Layout under ``--queue-dir`` (default: ``queue`` beside mail_dir, and on
its file system: queue files are written in the mail store's spool and
renamed in, in the same group commit as the local copies)::

    msg/<id>     the queue file, never changed once written: one line of
                 JSON (sender, recipients with their DSN parameters,
                 arrival time), then the message as it will be sent (CRLF
                 lines, our Received header first)
    state/<id>   the progress log, appended to and fsynced after each
                 outcome: one JSON line per recipient result

A recipient is finished once the log says ``sent`` (the next hop's 2xx) or
``bounced`` (a failure notice is durable, or none was asked for); a mail
whose recipients are all finished is removed. A runner killed at any point
leaves the log as it was after its last fsync: on restart it retries only
the recipients not yet finished. A torn last line (a crash inside a write)
is ignored, so at worst a delivery is retried, never forgotten.

The files are read by the queue runner (runner.py) and the
``prefork-smtpd-queue`` command; only the store creates queue files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Iterator

from .dsn import RecipientDSN
from .smtputf8 import served_form

MSG = "msg"
STATE = "state"
SENT = "sent"
BOUNCED = "bounced"
DEFERRED = "deferred"
FINISHED = (SENT, BOUNCED)
DELAY_WARNED = "delay_warned"  # a log line {"delay_warned": [index, ...]}: their "delayed" notice is sent
FORMAT = 1


def default_queue_dir(mail_dir: str) -> str:
    """``queue`` beside mail_dir: on its file system in any usual layout."""
    return os.path.join(os.path.dirname(os.path.abspath(mail_dir)), "queue")


def queue_dir_of(settings) -> str:
    return os.path.abspath(settings.queue_dir) if settings.queue_dir else default_queue_dir(settings.mail_dir)


@dataclass
class QueuedRecipient:
    address: str
    dsn: RecipientDSN | None = None


@dataclass
class QueuedMail:
    id: str
    sender: str
    recipients: list[QueuedRecipient]
    arrival: float
    ret: str | None = None
    envid: str | None = None
    size: int = 0
    # SMTPUTF8 (RFC 6531): received with the parameter, or an address is
    # non-ASCII (a queue file written before the flag was recorded). The
    # runner looks at the next hop's offer before sending such a mail, and
    # its notices are SMTPUTF8 mails too (RFC 6533).
    smtputf8: bool = False
    # BODY=BINARYMIME (RFC 3030): any octets, bare CR and LF included. It goes
    # on only with BDAT to a next hop offering BINARYMIME and CHUNKING.
    binary: bool = False
    # From the progress log: recipient index -> (result, detail).
    results: dict[int, dict] = field(default_factory=dict)
    attempts: int = 0  # failed attempts so far (for the backoff)
    next_attempt: float = 0.0  # not before this time
    last_reply: str = ""
    delay_warned: set[int] = field(default_factory=set)  # recipients whose sender got a "delayed" notice

    def pending(self) -> list[int]:
        """Indices of recipients not yet finished."""
        return [i for i in range(len(self.recipients)) if self.results.get(i, {}).get("result") not in FINISHED]


def _once_each(recipients) -> list:
    """The outside recipients, each address once (its first RCPT's DSN
    parameters kept): a client naming one twice would have the next hop
    deliver it twice, as local copies are made once per folder. The domain
    compares in its A-labels, caseless (bücher.example is
    xn--bcher-kva.example); the local part as written (RFC 5321 2.4: only
    the receiving host may fold it)."""
    seen: set[str] = set()
    kept = []
    for r in recipients:
        if r.outside:
            local, _, domain = r.address.rpartition("@")
            key = f"{local}@{served_form(domain) or domain}"
            if key not in seen:
                seen.add(key)
                kept.append(r)
    return kept


def queue_file_header(envelope, queue_id: str, arrival: float) -> bytes:
    """The queue file's first line, for the envelope's outside recipients."""
    mail_dsn = envelope.dsn
    header = {
        "v": FORMAT,
        "id": queue_id,
        "sender": envelope.sender,
        "arrival": arrival,
        "ret": mail_dsn.ret if mail_dsn is not None else None,
        "envid": mail_dsn.envid if mail_dsn is not None else None,
        "size": envelope.size,
        "rcpts": [
            {
                "a": r.address,
                "notify": sorted(r.dsn.notify) if r.dsn is not None and r.dsn.notify is not None else None,
                "orcpt": list(r.dsn.orcpt) if r.dsn is not None and r.dsn.orcpt is not None else None,
            }
            for r in _once_each(envelope.recipients)
        ],
    }
    if envelope.smtputf8:  # only then: the usual header stays as it was
        header["utf8"] = True
    if envelope.binary:  # BODY=BINARYMIME: octets as received, sent on only with BDAT (RFC 3030)
        header["body"] = "BINARYMIME"
    return (json.dumps(header, separators=(",", ":")) + "\n").encode("utf-8", "surrogateescape")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _recipient(item: object) -> QueuedRecipient:
    """One of the header's recipients; ValueError if not as queue_file_header writes it."""
    if not isinstance(item, dict) or not isinstance(item.get("a"), str):
        raise ValueError("a recipient without its address")
    if _CONTROL.search(item["a"]):
        # Our sessions take no such address; one would break a command line
        # of the runner's, or a field of a notice.
        raise ValueError("a control character in a recipient")
    notify, orcpt = item.get("notify"), item.get("orcpt")
    if notify is not None and not _strings(notify):
        raise ValueError("notify")
    if orcpt is not None and not (_strings(orcpt) and len(orcpt) == 2 and not _CONTROL.search("".join(orcpt))):
        raise ValueError("orcpt")
    rcpt_dsn = None
    if notify is not None or orcpt is not None:
        rcpt_dsn = RecipientDSN(
            notify=frozenset(notify) if notify is not None else None, orcpt=tuple(orcpt) if orcpt else None
        )
    return QueuedRecipient(item["a"], rcpt_dsn)


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _mail_from_header(queue_id: str, header: object) -> QueuedMail:
    """The queued mail a queue file's first line describes; ValueError if
    the line is not as queue_file_header writes it (a damaged or foreign
    file must be skipped, never crash the runner or the queue command)."""
    if not isinstance(header, dict):
        raise ValueError("not an object")
    sender, rcpts, arrival = header.get("sender"), header.get("rcpts"), header.get("arrival")
    ret, envid, size = header.get("ret"), header.get("envid"), header.get("size", 0)
    if not isinstance(sender, str) or not isinstance(rcpts, list):
        raise ValueError("sender or recipients")
    if _CONTROL.search(sender):
        raise ValueError("a control character in the sender")
    if not isinstance(arrival, (int, float)) or not math.isfinite(arrival) or not isinstance(size, int):
        raise ValueError("arrival or size")
    if not all(v is None or isinstance(v, str) for v in (ret, envid)):
        raise ValueError("ret or envid")
    return QueuedMail(
        id=queue_id, sender=sender, recipients=[_recipient(r) for r in rcpts],
        arrival=float(arrival), ret=ret, envid=envid, size=size, binary=header.get("body") == "BINARYMIME",
    )


def is_queue_id(queue_id: str) -> bool:
    """A file name in the queue's folders (ids come from the command line too)."""
    return bool(queue_id) and "/" not in queue_id and "\0" not in queue_id and not queue_id.startswith(".")


def _open_regular(path: str):
    """``path`` opened for reading if it is a regular file; OSError otherwise.

    A FIFO in the queue's folders would hold the runner (and the queue
    command) in open() for ever; a symbolic link would read a file elsewhere.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class Queue:
    def __init__(self, root: str) -> None:
        self.root = root
        self.msg_dir = os.path.join(root, MSG)
        self.state_dir = os.path.join(root, STATE)

    def make(self) -> None:
        for path in (self.root, self.msg_dir, self.state_dir):
            os.makedirs(path, mode=0o700, exist_ok=True)

    def ids(self) -> list[str]:
        try:
            return sorted(name for name in os.listdir(self.msg_dir) if not name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, queue_id: str) -> bool:
        """Whether the mail is still queued (prefork-smtpd-queue delete removes it)."""
        return is_queue_id(queue_id) and os.path.exists(os.path.join(self.msg_dir, queue_id))

    def load(self, queue_id: str) -> QueuedMail | None:
        """The mail's envelope and progress; None if it is gone (or not a queue file)."""
        if not is_queue_id(queue_id):
            return None
        try:
            with _open_regular(os.path.join(self.msg_dir, queue_id)) as f:
                first = f.readline()
        except OSError:  # gone, or no regular file
            return None
        try:
            header = json.loads(first)
            mail = _mail_from_header(queue_id, header)
            progress = list(self._progress(queue_id))
        except (ValueError, RecursionError, OSError):  # a damaged file (nested past the parser's depth...), or no file
            return None
        mail.smtputf8 = (
            header.get("utf8") is True
            or not mail.sender.isascii()
            or not all(r.address.isascii() for r in mail.recipients)
        )
        for entry in progress:
            index = entry.get("r")
            if entry.get("result") == DEFERRED:
                attempts, next_attempt, reply = entry.get("attempts", 0), entry.get("next", 0), entry.get("reply", "")
                if not (isinstance(attempts, int) and isinstance(next_attempt, (int, float)) and isinstance(reply, str)):
                    continue  # not as record() writes it: as if never written
                mail.attempts = max(mail.attempts, attempts)
                mail.next_attempt = max(mail.next_attempt, float(next_attempt))
                if "reply" in entry:
                    mail.last_reply = reply
            if isinstance(entry.get(DELAY_WARNED), list):
                mail.delay_warned.update(i for i in entry[DELAY_WARNED] if isinstance(i, int))
            elif isinstance(index, int):
                mail.results[index] = entry
        return mail

    def _progress(self, queue_id: str) -> Iterator[dict]:
        try:
            with _open_regular(os.path.join(self.state_dir, queue_id)) as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return
        for line in lines:
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):
                continue  # empty, or torn by a crash mid-write, or damaged: as if never written
            if isinstance(entry, dict):
                yield entry

    def message(self, queue_id: str) -> bytes:
        """The message to send (after the header line)."""
        with _open_regular(os.path.join(self.msg_dir, queue_id)) as f:
            f.readline()
            return f.read()

    def record(self, queue_id: str, entries: list[dict]) -> None:
        """Append outcomes to the progress log and make them durable."""
        data = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in entries)
        path = os.path.join(self.state_dir, queue_id)
        created = not os.path.exists(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            # A torn line left by a crash: start ours on a line of its own.
            if not created and os.fstat(fd).st_size:
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if not os.path.exists(os.path.join(self.msg_dir, queue_id)):
            # Deleted meanwhile (the queue command, or the mail was done): the
            # log just made or written to would be an orphan nothing removes.
            # remove() unlinks the mail first, so either it sees this log or
            # this check sees the mail gone.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        if created:
            _fsync_dir(self.state_dir)

    def remove(self, queue_id: str) -> bool:
        """Delete a mail and its log (durably); False if it was not there."""
        if not is_queue_id(queue_id):
            return False
        found = False
        for folder in (self.msg_dir, self.state_dir):
            try:
                os.unlink(os.path.join(folder, queue_id))
                found = True
            except FileNotFoundError:
                pass
        for folder in (self.msg_dir, self.state_dir):
            _fsync_dir(folder)
        return found

    def remove_many(self, queue_ids: list[str]) -> None:
        """Delete finished mails and their logs, one directory flush each for all of them.

        The unlinked queue file is the durable record that every recipient is
        done: no progress line is needed for a mail finished in one go.
        """
        logs = 0
        for queue_id in queue_ids:
            for folder in (self.msg_dir, self.state_dir):
                try:
                    os.unlink(os.path.join(folder, queue_id))
                    logs += folder is self.state_dir
                except FileNotFoundError:
                    pass
        _fsync_dir(self.msg_dir)
        if logs:
            _fsync_dir(self.state_dir)

    def summary(self, now: float | None = None) -> tuple[int, float]:
        """(mails queued, age of the oldest in seconds)."""
        now = time.time() if now is None else now
        oldest = now
        count = 0
        for queue_id in self.ids():
            mail = self.load(queue_id)
            if mail is not None:
                count += 1
                oldest = min(oldest, mail.arrival)
        return count, max(now - oldest, 0.0)


class Wakeup:
    """How a worker tells the queue runner "new mail" without waiting for its next scan.

    A pipe the master opens before it forks anyone, so every worker and
    every runner inherits it: a worker writes one byte after the ``250`` of
    a mail with outside recipients (one non-blocking write, no lock, no
    reply); the runner's event loop watches the read end. Nothing a client
    sends reaches the pipe, and a full pipe already means "look", so a
    failed write loses nothing.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        try:
            os.write(self.write_fd, b"!")
        except OSError:  # full (the runner will look anyway) or closed
            pass

    def drain(self) -> None:
        """Read every pending byte (one look serves them all)."""
        try:
            while os.read(self.read_fd, 4096):
                pass
        except OSError:  # empty
            pass


_wakeup: Wakeup | None = None  # the master's, inherited by its children


def open_wakeup() -> Wakeup:
    """In the master, before any fork: the pipe its workers and runner share."""
    global _wakeup
    if _wakeup is None:
        _wakeup = Wakeup()
    return _wakeup


def inherited_wakeup() -> Wakeup | None:
    return _wakeup


def wake_runner() -> None:
    """A mail was queued: the runner looks now (a no-op outside a master's children)."""
    if _wakeup is not None:
        _wakeup.wake()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_queue_dir(queue_dir: str, mail_dir: str) -> str | None:
    """At start: None if queue files can be renamed in from the mail store's spool, else why not."""
    try:
        Queue(queue_dir).make()
    except OSError as exc:
        return f"queue dir {queue_dir}: cannot create it: {exc.strerror}"
    if os.stat(queue_dir).st_dev != os.stat(os.path.abspath(mail_dir)).st_dev:
        return (
            f"queue dir {queue_dir} must be on the mail dir's file system ({mail_dir});"
            f" give --queue-dir a folder inside it, e.g. {os.path.join(os.path.abspath(mail_dir), '.queue')}"
        )
    return None
