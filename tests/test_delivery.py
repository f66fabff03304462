"""The Maildir store on its own: batches, group commit, failures, names."""

from __future__ import annotations

import asyncio
import email
import errno
import mailbox
import math
import os
import threading
import time
from types import SimpleNamespace
from unittest import mock

import pytest

from harness import wait_until
from prefork_smtpd import delivery
from prefork_smtpd.delivery import BatchCommitter, DeliveryError, MaildirStore, remove_temporary_files
from prefork_smtpd.session import Envelope, Recipient


def envelope(*folders: str, body: bytes = b"Subject: t\r\n\r\nhello\r\n") -> Envelope:
    half = body.index(b"\r\n") + 2  # two pieces, as a message arrives
    return Envelope(helo="client", sender="a@smtpd.com", recipients=[Recipient(f"{f}@smtpd.com", f) for f in folders],
                    chunks=[body[:half], body[half:]], size=len(body))


def files(root, folder, sub="new"):
    path = root / folder / sub
    return sorted(os.listdir(path)) if path.exists() else []


def spool(root):
    """What is left in the spool, where every copy is written before its rename."""
    return files(root, delivery.SPOOL, "")


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


# First: a change that makes writing loop forever fails here at once (the
# stand-in writev counts its calls), never on a real file that grows.
def test_short_writes_are_continued_where_they_stopped(tmp_path, monkeypatch):
    """writev may take less than it was given: every byte still lands, in order, once."""
    iov_max = os.sysconf("SC_IOV_MAX")
    calls = []

    def short_writev(fd, parts):
        calls.append(len(parts))
        assert len(parts) <= iov_max, "more pieces than the system takes at once"
        assert len(calls) < 10_000, "writing never ends"
        return os.write(fd, b"".join(bytes(p) for p in parts)[:7])  # at most 7 bytes a call

    monkeypatch.setattr(delivery, "writev", short_writev)
    lines = [b"line %d\r\n" % n for n in range(1500)]  # many pieces: more than one writev's worth
    env = envelope("u")
    env.chunks = [b"Subject: t\r\n\r\n", b"", *lines]  # an empty piece among them
    qid = MaildirStore(str(tmp_path), "mx.test").deliver(env, "[::1]")
    raw = (tmp_path / "u" / "new" / qid).read_bytes()
    head, _, body = raw.partition(b"\nSubject: t\n\n")
    assert body == b"".join(line.replace(b"\r\n", b"\n") for line in lines)
    assert head.startswith(b"Return-Path: <a@smtpd.com>\nDelivered-To: u@smtpd.com\nReceived: from client ([::1])\n")
    assert head.count(b"\n") == 4 and b"\tfor <u@smtpd.com>; " in head
    assert max(calls) > 1 and 0 not in calls


@pytest.mark.parametrize("size", [1, 2, 10])  # 1-2 files: fsync each; more: syncfs
def test_batch_stores_every_copy_readable_by_mailbox(tmp_path, size):
    store = MaildirStore(str(tmp_path), "mx.test")
    before = open_fds()
    results = store.deliver_batch([(envelope("u", "v"), "[127.0.0.1]") for _ in range(size)])
    assert open_fds() == before  # every copy's and directory's descriptor closed
    assert all(isinstance(r, str) for r in results) and len(set(results)) == size
    for folder in ("u", "v"):
        box = mailbox.Maildir(str(tmp_path / folder), factory=None, create=False)
        messages = [box.get_message(k) for k in box.keys()]
        assert len(messages) == size
        assert all(m["Delivered-To"] == f"{folder}@smtpd.com" and m.get_payload() == "hello\n" for m in messages)
        assert not files(tmp_path, folder, "tmp")
    assert not spool(tmp_path)
    # each copy of one message has the message's queue id as its name
    assert files(tmp_path, "u") == files(tmp_path, "v") == sorted(results)


def test_one_failing_message_does_not_fail_the_others(tmp_path):
    (tmp_path / "blocked").write_text("a file where a folder should be")
    store = MaildirStore(str(tmp_path), "mx.test")
    ok1, bad, ok2 = store.deliver_batch([
        (envelope("a"), "[::1]"), (envelope("b", "blocked"), "[::1]"), (envelope("c"), "[::1]"),
    ])
    assert isinstance(ok1, str) and isinstance(ok2, str)
    assert isinstance(bad, DeliveryError) and not bad.no_space
    assert files(tmp_path, "a") == [ok1] and files(tmp_path, "c") == [ok2]
    assert not files(tmp_path, "b") and not spool(tmp_path)  # all or nothing


def test_a_failed_sync_fails_the_whole_batch_and_leaves_nothing(tmp_path):
    store = MaildirStore(str(tmp_path), "mx.test")
    with mock.patch.object(delivery, "syncfs", side_effect=OSError(5, "Input/output error")):
        results = store.deliver_batch([(envelope("u"), "[::1]") for _ in range(5)])
    assert all(isinstance(r, DeliveryError) for r in results)
    assert not files(tmp_path, "u") and not spool(tmp_path)


def test_a_failed_directory_sync_takes_back_the_renames(tmp_path):
    store = MaildirStore(str(tmp_path), "mx.test")
    store.deliver(envelope("u"), "[::1]")  # the folder exists: only new/ is fsynced as a directory
    real_fsync = os.fsync

    def fsync_failing_on_directories(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    with mock.patch.object(delivery, "fsync", fsync_failing_on_directories):
        with pytest.raises(DeliveryError):
            store.deliver(envelope("u"), "[::1]")
    assert len(files(tmp_path, "u")) == 1 and not spool(tmp_path)


def test_no_space_is_reported_as_such(tmp_path):
    store = MaildirStore(str(tmp_path), "mx.test")
    with mock.patch.object(delivery, "writev", side_effect=OSError(28, "No space left on device")):
        with pytest.raises(DeliveryError) as err:
            store.deliver(envelope("u"), "[::1]")
    assert err.value.no_space
    assert not spool(tmp_path)


def test_trace_headers_and_lf_line_ends(tmp_path):
    store = MaildirStore(str(tmp_path), "mx.test")
    qid = store.deliver(envelope("u", body=b"Subject: x\r\n\r\nline 1\r\nline 2\r\n"), "[192.0.2.1]")
    raw = (tmp_path / "u" / "new" / qid).read_bytes()
    assert b"\r" not in raw
    msg = email.message_from_bytes(raw)
    assert msg["Return-Path"] == "<a@smtpd.com>" and msg["Delivered-To"] == "u@smtpd.com"
    assert msg["Received"].startswith("from client ([192.0.2.1])") and f"id {qid}" in msg["Received"]
    assert msg.get_payload() == "line 1\nline 2\n"


def test_unique_names_and_cleanup_of_a_dead_writer(tmp_path):
    store = MaildirStore(str(tmp_path), "mx.test")
    names = {store.unique_name() for _ in range(10000)}
    assert len(names) == 10000 and all(f"P{os.getpid()}Q" in n and "/" not in n and ":" not in n for n in names)
    assert {delivery.writer_pid(n) for n in names} == {os.getpid()}
    (tmp_path / delivery.SPOOL).mkdir()
    mine = tmp_path / delivery.SPOOL / "1.M1P4242Q1.h.0"
    other = tmp_path / delivery.SPOOL / "1.M1P42424Q1.h.0"
    lookalike = tmp_path / delivery.SPOOL / "1.M1P1Q1.P4242Q.0"  # the pid in the host part is not the writer's
    for path in (mine, other, lookalike):
        path.write_bytes(b"x")
    assert remove_temporary_files(str(tmp_path), 4242) == [str(mine)]
    assert other.exists() and lookalike.exists()


def test_unique_name_is_the_time_the_pid_and_a_sequence(tmp_path):
    store = MaildirStore(str(tmp_path), "mx.test")
    with mock.patch.object(delivery.time, "time", return_value=1_700_000_000.25):
        first, second = store.unique_name(), store.unique_name()
    assert first.startswith(f"1700000000.M250000P{os.getpid()}Q")
    assert int(second.split("Q")[1].split(".")[0]) == int(first.split("Q")[1].split(".")[0]) + 1


def test_an_os_error_becomes_a_delivery_error_naming_its_file():
    err = DeliveryError.from_os_error(OSError(errno.EACCES, "Permission denied", "/m/u/new"))
    assert str(err) == "Permission denied: /m/u/new" and err.errno == errno.EACCES and not err.no_space
    err = DeliveryError.from_os_error(OSError(errno.EIO, "Input/output error"))
    assert str(err) == "Input/output error" and err.errno == errno.EIO
    assert DeliveryError.from_os_error(OSError(errno.ENOSPC, "No space left on device")).no_space
    assert DeliveryError.from_os_error(OSError(errno.EDQUOT, "Disk quota exceeded")).no_space


def test_a_failing_syncfs_raises():
    with pytest.raises(OSError) as err:
        delivery.syncfs(-1)
    assert err.value.errno == errno.EBADF


# ------------------------------------------------------------ failures
def fail_on(kind: str, monkeypatch) -> None:
    """Make one durable step fail with EIO."""
    eio = OSError(errno.EIO, "Input/output error")
    real = {name: getattr(delivery, name) for name in ("fsync", "rename", "writev")}

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}") == (kind == "directory fsync"):
            raise eio
        real["fsync"](fd)

    def rename(src, dst, **dir_fds):
        if src.endswith(".1"):  # the second copy of a message: the first is in new/ by then
            raise eio
        real["rename"](src, dst, **dir_fds)

    fakes = {"write": ("writev", mock.Mock(side_effect=eio)), "syncfs": ("syncfs", mock.Mock(side_effect=eio)),
             "file fsync": ("fsync", fsync), "directory fsync": ("fsync", fsync), "rename": ("rename", rename)}
    monkeypatch.setattr(delivery, *fakes[kind])


@pytest.mark.parametrize("batch", [1, 5], ids=["alone", "batch of 5"])
@pytest.mark.parametrize("kind", ["write", "file fsync", "syncfs", "rename", "directory fsync"])
def test_each_failing_step_leaves_nothing_behind(tmp_path, monkeypatch, kind, batch):
    """No copy in new/, nothing in the spool, no descriptor left open (or closed twice)."""
    store = MaildirStore(str(tmp_path), "mx.test")
    store.deliver_batch([(envelope("u", "v"), "[::1]")])  # folders made and checked: only the step under test runs
    stored = {f: files(tmp_path, f) for f in ("u", "v")}
    before = open_fds()
    fail_on(kind, monkeypatch)
    results = store.deliver_batch([(envelope("u", "v"), "[::1]") for _ in range(batch)])
    if kind == "syncfs" and batch == 1:  # two copies: fsyncs, syncfs not used
        assert all(isinstance(r, str) for r in results)
        return
    if kind == "file fsync" and batch == 5:  # ten copies: one syncfs, no file fsync
        assert all(isinstance(r, str) for r in results)
        return
    assert all(isinstance(r, DeliveryError) and r.errno == errno.EIO for r in results), results
    assert {f: files(tmp_path, f) for f in ("u", "v")} == stored
    assert not spool(tmp_path)
    assert open_fds() == before


def test_a_failing_directory_sync_fails_only_the_mail_in_that_directory(tmp_path, monkeypatch):
    store = MaildirStore(str(tmp_path), "mx.test")
    store.deliver_batch([(envelope("u", "v"), "[::1]")])
    real_fsync = delivery.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path / "v" / "new"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(delivery, "fsync", fsync)
    # Two directories: each gets its own fsync (from SYNCFS_FROM on, one syncfs covers all).
    ok, bad, also_ok = store.deliver_batch([(envelope("u"), "[::1]"), (envelope("v"), "[::1]"), (envelope("u"), "[::1]")])
    assert isinstance(bad, DeliveryError) and isinstance(ok, str) and isinstance(also_ok, str)
    assert {ok, also_ok} < set(files(tmp_path, "u"))
    assert len(files(tmp_path, "v")) == 1  # the first message's only


def test_folders_removed_under_the_store_are_made_again(tmp_path):
    import shutil

    store = MaildirStore(str(tmp_path / "mail"), "mx.test")
    store.deliver(envelope("u"), "[::1]")
    shutil.rmtree(tmp_path / "mail" / "u")
    # Its new/ is gone with it: made again with tmp/ and cur/ (this failed once, a 451).
    qid = store.deliver(envelope("u"), "[::1]")
    assert files(tmp_path / "mail", "u") == [qid]
    assert all((tmp_path / "mail" / "u" / sub).is_dir() for sub in ("tmp", "new", "cur"))
    shutil.rmtree(tmp_path / "mail")  # the whole mail dir: made again at once, with its spool
    qid = store.deliver(envelope("u"), "[::1]")
    assert files(tmp_path / "mail", "u") == [qid] and not spool(tmp_path / "mail")


def test_a_dangling_link_on_the_way_to_the_mail_dir_is_reported_as_not_a_directory(tmp_path):
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    store = MaildirStore(str(tmp_path / "gone" / "mail"), "mx.test")
    with pytest.raises(DeliveryError) as err:
        store.deliver(envelope("u"), "[::1]")
    assert err.value.errno == errno.ENOTDIR and str(err.value) == f"Not a directory: {tmp_path / 'gone'}"
    assert not (tmp_path / "nowhere").exists()


def test_links_and_files_where_folders_belong_are_refused_by_their_full_path(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mail = tmp_path / "mail"
    store = MaildirStore(str(mail), "mx.test")
    store.deliver(envelope("real"), "[::1]")
    (mail / "linked").symlink_to(elsewhere)
    (mail / "blocked").write_text("a file where a folder should be")
    (mail / "sub").mkdir()
    (mail / "sub" / "cur").symlink_to(elsewhere)
    (mail / "subfile").mkdir()
    (mail / "subfile" / "tmp").write_text("a file where tmp/ should be")
    expected = {
        "linked": (errno.ELOOP, f"refused, a symbolic link in the mail dir: {mail / 'linked'}"),
        "blocked": (errno.ENOTDIR, f"Not a directory: {mail / 'blocked'}"),
        "sub": (errno.ELOOP, f"refused, a symbolic link in the mail dir: {mail / 'sub' / 'cur'}"),
        "subfile": (errno.ENOTDIR, f"Not a directory: {mail / 'subfile' / 'tmp'}"),
    }
    for folder, (code, reason) in expected.items():
        with pytest.raises(DeliveryError) as err:
            store.deliver(envelope("real", folder), "[::1]")
        assert (err.value.errno, str(err.value)) == (code, reason)
    assert os.listdir(elsewhere) == [] and len(files(mail, "real")) == 1 and not spool(mail)


def test_a_folder_made_by_another_process_at_the_same_moment_is_used(tmp_path, monkeypatch):
    real_mkdir = delivery.mkdir

    def mkdir_losing_the_race(name, mode, *, dir_fd):
        real_mkdir(name, mode, dir_fd=dir_fd)  # the other process, first
        real_mkdir(name, mode, dir_fd=dir_fd)

    monkeypatch.setattr(delivery, "mkdir", mkdir_losing_the_race)
    qid = MaildirStore(str(tmp_path / "mail"), "mx.test").deliver(envelope("u"), "[::1]")
    assert files(tmp_path / "mail", "u") == [qid]


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o277, 0o700, 0o777])
def test_folders_are_0700_and_files_0600_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        store = MaildirStore(str(tmp_path / "mail"), "mx.test")
        qid = store.deliver(envelope("u"), "[::1]")
    finally:
        os.umask(old)
    mail = tmp_path / "mail"
    for path in (mail, mail / delivery.SPOOL, mail / "u", mail / "u" / "tmp", mail / "u" / "new", mail / "u" / "cur"):
        assert oct(path.stat().st_mode & 0o777) == oct(0o700), path
    assert oct((mail / "u" / "new" / qid).stat().st_mode & 0o777) == oct(0o600)


# ------------------------------------------------------------ at start
def test_check_mail_dir_makes_it_and_leaves_nothing(tmp_path):
    assert delivery.check_mail_dir(str(tmp_path / "mail")) is None
    assert oct((tmp_path / "mail").stat().st_mode & 0o777) == oct(0o700)
    assert sorted(os.listdir(tmp_path / "mail")) == [delivery.JOURNAL_DIR, delivery.SPOOL]
    assert not spool(tmp_path / "mail") and os.listdir(tmp_path / "mail" / delivery.JOURNAL_DIR) == []


def test_check_mail_dir_says_which_step_failed_and_where(tmp_path):
    (tmp_path / "file").write_text("x")
    assert delivery.check_mail_dir(str(tmp_path / "file")) == f"mail dir {tmp_path / 'file'} is not a directory"
    mail = tmp_path / "mail"
    (mail / delivery.SPOOL).mkdir(parents=True)
    with mock.patch.object(delivery.time, "time", return_value=1_700_000_000.5):
        (mail / delivery.SPOOL / f"1700000000.M0P{os.getpid()}Q0.startup-check").mkdir()  # the probe's name, taken
        assert delivery.check_mail_dir(str(mail)) == f"mail dir {mail}: cannot write a file in it: File exists ({mail})"
    (mail / "blocked").write_text("x")
    assert delivery.check_mail_dir(str(mail / "blocked" / "m")) == (
        f"mail dir {mail / 'blocked' / 'm'}: cannot create it: Not a directory ({mail / 'blocked' / 'm'})"
    )


def test_stale_spool_files_of_dead_writers_go_and_live_ones_stay(tmp_path):
    import subprocess
    import sys

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    (tmp_path / delivery.SPOOL).mkdir()
    live = tmp_path / delivery.SPOOL / f"1.M1P{os.getpid()}Q1.h.0"  # this process: alive, and signalled by no one
    dead = tmp_path / delivery.SPOOL / f"1.M1P{done.pid}Q1.h.0"
    foreign = tmp_path / delivery.SPOOL / "not-ours"
    for path in (live, dead, foreign):
        path.write_bytes(b"x")
    assert sorted(delivery.remove_stale_spool_files(str(tmp_path))) == sorted([str(dead), str(foreign)])
    assert live.exists() and not dead.exists() and not foreign.exists()
    assert delivery.remove_stale_spool_files(str(tmp_path / "none")) == []


# ------------------------------------------------------------ group commit
class NoJournal:
    """A stand-in store's answers about its journal: it has none."""

    def journal_pending(self) -> bool:
        return False

    def retire_journal(self, last: bool = False) -> None:
        pass

    def retire_journal_if_due(self) -> None:
        pass


class GatedStore(NoJournal):
    """Stands in for the store: notes each batch's size; the first batch waits for ``go``."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.batches: list[int] = []
        self.entered = threading.Event()
        self.go = threading.Event()
        self.fail = fail

    def deliver_batch(self, items):
        self.batches.append(len(items))
        self.entered.set()
        assert self.go.wait(60)
        if self.fail:
            raise self.fail
        return [f"id-{env.sender}" for env, _ in items]


def numbered(n: int) -> Envelope:
    return Envelope(helo="client", sender=str(n), recipients=[Recipient("u@smtpd.com", "u")], chunks=[b"x\r\n"])


def run_committer(store: GatedStore, count: int, threads: int = 1, cancel: int | None = None) -> list:
    """Submit one message, then ``count`` more while the first batch is held, then close: the results."""

    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda loop, context: errors.append(context))
        committer = BatchCommitter(store, loop, threads)
        futures = [committer.submit(numbered(0), "[::1]")]
        assert await loop.run_in_executor(None, store.entered.wait, 20)
        futures += [committer.submit(numbered(n), "[::1]") for n in range(1, count + 1)]
        if cancel is not None:
            futures[cancel].cancel()  # its client went away: the others are settled all the same
        closing = threading.Thread(target=committer.close, daemon=True)
        closing.start()  # queued before the stop marks: delivered before the threads stop
        await loop.run_in_executor(None, wait_until, lambda: committer.queue.qsize() == count + threads, 20)
        store.go.set()
        await loop.run_in_executor(None, closing.join, 20)
        assert not closing.is_alive(), "close() did not return"
        assert not any(thread.is_alive() for thread in committer.threads)
        # (Checked once they ended: a failure before would leave them waiting.)
        assert all(thread.daemon for thread in committer.threads)  # a worker's exit never waits on them
        # The threads settled every future (call_soon_threadsafe) before they
        # ended, so before this task woke: nothing is left to wait for.
        assert all(future.done() for future in futures)
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert errors == []
        return results

    return asyncio.run(main())


def test_queued_mail_is_committed_in_batches_of_at_most_max_batch_and_close_finishes_it():
    store = GatedStore()
    count = delivery.MAX_BATCH + 6
    results = run_committer(store, count, cancel=3)
    assert store.batches == [1, delivery.MAX_BATCH, 6]
    assert isinstance(results[3], asyncio.CancelledError)
    assert [r for n, r in enumerate(results) if n != 3] == [f"id-{n}" for n in range(count + 1) if n != 3]


def test_a_store_bug_fails_the_batch_never_acknowledges_it():
    store = GatedStore(fail=RuntimeError("bug"))
    results = run_committer(store, 3)
    assert store.batches == [1, 3]
    assert all(isinstance(r, DeliveryError) and str(r) == "internal error: RuntimeError('bug')" for r in results)
    assert not any(r.no_space for r in results)


def test_the_messages_of_one_loop_turn_form_one_batch():
    # The loop lets go of the GIL between two messages of the same turn (here
    # a sleep; in the server a write or a log line can): the thread must not
    # start a batch with the first while the second is already in hand.
    class Recording(NoJournal):
        def __init__(self) -> None:
            self.batches: list[int] = []

        def deliver_batch(self, items):
            self.batches.append(len(items))
            return [f"id-{env.sender}" for env, _ in items]

    async def main(store):
        loop = asyncio.get_running_loop()
        committer = BatchCommitter(store, loop, 1)
        try:
            futures = [committer.submit(numbered(0), "[::1]")]
            time.sleep(0.2)  # the same turn of the loop
            futures += [committer.submit(numbered(n), "[::1]") for n in (1, 2)]
            return await asyncio.wait_for(asyncio.gather(*futures), 20)
        finally:
            committer.close()

    store = Recording()
    assert asyncio.run(main(store)) == ["id-0", "id-1", "id-2"]
    assert store.batches == [3]


async def submit_in_turns(store: GatedStore, comes_back: bool) -> list:
    """Message 0 is held in the store while message 1 queues; then 0 is
    answered, and (if ``comes_back``) its client sends message 2 at once."""
    loop = asyncio.get_running_loop()
    committer = BatchCommitter(store, loop, 1)
    try:
        futures = [committer.submit(numbered(0), "[::1]")]
        assert await loop.run_in_executor(None, store.entered.wait, 20)
        futures.append(committer.submit(numbered(1), "[::1]"))
        await loop.run_in_executor(None, wait_until, lambda: committer.queue.qsize() == 1, 20)
        answered = asyncio.Event()
        if comes_back:
            futures[0].add_done_callback(lambda _: futures.append(committer.submit(numbered(2), "[::1]")))
        futures[0].add_done_callback(lambda _: answered.set())
        store.go.set()
        await asyncio.wait_for(answered.wait(), 20)
        return await asyncio.wait_for(asyncio.gather(*futures), 20)
    finally:
        committer.close()


def test_a_batch_waits_for_the_client_the_last_batch_answered(monkeypatch):
    # Message 1 came in during batch [0]; 0's client is back at once with
    # message 2: one batch [1, 2], not [1] then [2] (sessions taking turns).
    monkeypatch.setattr(delivery, "GATHER_SHARE", math.inf)
    monkeypatch.setattr(delivery, "GATHER_MAX", 30.0)  # more than the test waits: only the count ends it
    store = GatedStore()
    assert asyncio.run(submit_in_turns(store, comes_back=True)) == ["id-0", "id-1", "id-2"]
    assert store.batches == [1, 2]


def test_the_wait_for_answered_clients_is_bounded():
    # 0's client does not come back: message 1 goes after at most GATHER_MAX.
    store = GatedStore()
    assert asyncio.run(submit_in_turns(store, comes_back=False)) == ["id-0", "id-1"]
    assert store.batches == [1, 1]


def test_a_first_mail_after_a_quiet_spell_does_not_wait_for_clients_that_did_not_come_back(monkeypatch):
    # A batch of two ends; its clients never come back. A mail long after
    # the gathering time (counted from the batch's end) goes at once, though
    # the last batch held two: it must not wait that time anew. A clock the
    # test moves stands in for the store's; the store's work takes 1 s of it.
    now = [1000.0]
    clock = SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    clock.monotonic = lambda: now[0]
    monkeypatch.setattr(delivery, "time", clock)
    monkeypatch.setattr(delivery, "GATHER_SHARE", 60.0)  # 1 s of work: 60 s of gathering...
    monkeypatch.setattr(delivery, "GATHER_MAX", 60.0)  # ...more than the test waits

    class TakesASecond(GatedStore):
        def deliver_batch(self, items):
            now[0] += 1.0
            return super().deliver_batch(items)

    store = TakesASecond()
    store.go.set()

    async def main():
        committer = BatchCommitter(store, asyncio.get_running_loop(), 1)
        try:
            two = [committer.submit(numbered(n), "[::1]") for n in (0, 1)]  # one turn: one batch
            first = await asyncio.wait_for(asyncio.gather(*two), 20)
            now[0] += 100.0  # the quiet spell, past the 60 s of gathering
            return first + [await asyncio.wait_for(committer.submit(numbered(2), "[::1]"), 20)]
        finally:
            committer.close()

    assert asyncio.run(main()) == ["id-0", "id-1", "id-2"]
    assert store.batches == [2, 1]


def test_a_lone_client_never_waits_for_a_batch(monkeypatch):
    # Its own mail is all the last batch's answer brings back: no wait at all,
    # even with a gathering time far past the test's own timeout.
    monkeypatch.setattr(delivery, "GATHER_SHARE", math.inf)
    monkeypatch.setattr(delivery, "GATHER_MAX", 60.0)
    store = GatedStore()
    store.go.set()

    async def main():
        committer = BatchCommitter(store, asyncio.get_running_loop(), 1)
        try:
            return [await asyncio.wait_for(committer.submit(numbered(n), "[::1]"), 20) for n in range(3)]
        finally:
            committer.close()

    assert asyncio.run(main()) == ["id-0", "id-1", "id-2"]
    assert store.batches == [1, 1, 1]


def test_a_store_made_before_a_fork_names_the_childs_files_with_the_childs_pid(tmp_path):
    # The pid in a file's name is how a dead worker's files are found (remove_temporary_files).
    store = MaildirStore(str(tmp_path), "mx.test")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, store.unique_name().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    name = os.read(read, 1000).decode()
    os.close(read)
    assert delivery.writer_pid(name) == pid
    assert delivery.writer_pid(store.unique_name()) == os.getpid()
