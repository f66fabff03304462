"""The store's write-ahead journal: its records, the store's use of it, its replay.

The record format is checked without I/O (cut at every octet, damaged at
every octet); the store's use of it with the durable steps recorded (one
flush, and every rename after it); the replay by losing copies on purpose
and putting them back; the server's part (a dead worker's journal, one
left by a crash) with the real processes.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import Server, wait_until, with_sitecustomize
from prefork_smtpd import delivery
from prefork_smtpd.delivery import BatchCommitter, DeliveryError, MaildirStore, replay_journals
from prefork_smtpd.journal import HEAD, JournalCopy, decode_records, encode_record
from prefork_smtpd.session import Envelope, Recipient
from test_store_durability import Recorder

ID = b"\x01\x02\x03\x04\x05\x06\x07\x08"


def record(*copies: tuple[str, str, bytes, bytes]) -> list[bytes]:
    """A record of (folder, name, header, body) copies, each body its own."""
    bodies = [[body[:3], body[3:]] for _, _, _, body in copies]
    return encode_record(ID, bodies, ((f, n, h, i) for i, (f, n, h, _) in enumerate(copies)))


# ------------------------------------------------------------ the format
def test_a_record_gives_back_each_copy_with_its_header_and_shared_body():
    pieces = encode_record(
        ID, [[b"Subject: a\n", b"\nbody\n"], [b"", b"bin\r\n\x00"]],
        [("bob", "1.M1P2Q3.h", b"Delivered-To: bob\n", 0), ("a.example/ann/.caf\udce9", "1.M1P2Q3.h", b"T: ann\n", 0),
         ("eve", "1.M1P2Q4.h", b"", 1)],
    )
    records, end = decode_records(b"".join(pieces), ID)
    assert end == sum(map(len, pieces))
    assert records == [[
        JournalCopy("bob", "1.M1P2Q3.h", b"Delivered-To: bob\nSubject: a\n\nbody\n"),
        JournalCopy("a.example/ann/.caf\udce9", "1.M1P2Q3.h", b"T: ann\nSubject: a\n\nbody\n"),
        JournalCopy("eve", "1.M1P2Q4.h", b"bin\r\n\x00"),
    ]]


def test_a_journal_cut_at_any_octet_gives_exactly_its_whole_records():
    first = b"".join(record(("u", "1.M1P1Q1.h", b"H1\n", b"one\n")))
    second = b"".join(record(("u", "1.M1P1Q2.h", b"H2\n", b"two\n"), ("v", "1.M1P1Q2.h", b"H2v\n", b"two\n")))
    data = first + second
    for cut in range(len(data) + 1):
        records, end = decode_records(data[:cut], ID)
        whole = (cut >= len(first)) + (cut == len(data))
        assert len(records) == whole, cut
        assert end == (0, len(first), len(data))[whole]


def test_a_damaged_octet_anywhere_in_a_record_ends_the_reading_there():
    first = b"".join(record(("u", "1.M1P1Q1.h", b"H1\n", b"one\n")))
    second = b"".join(record(("u", "1.M1P1Q2.h", b"H2\n", b"two\n")))
    for at in range(len(second)):
        damaged = bytearray(second)
        damaged[at] ^= 0x40
        records, end = decode_records(first + bytes(damaged), ID)
        assert end == len(first) and len(records) == 1, at


def test_records_of_another_journal_file_are_not_taken():
    data = b"".join(record(("u", "1.M1P1Q1.h", b"", b"x\n")))
    assert decode_records(data, b"\x00" * 8) == ([], 0)


def test_a_payload_whose_crc_holds_but_whose_table_does_not_ends_the_reading():
    import struct
    import zlib

    payload = struct.pack("<H", 1) + struct.pack("<I", 2) + b"hi" + struct.pack("<I", 1)
    payload += struct.pack("<H", 1) + b"u" + struct.pack("<H", 1) + b"n" + struct.pack("<I", 0) + struct.pack("<H", 5)
    head = HEAD.pack(b"PSJ1", ID, len(payload), zlib.crc32(payload))
    assert decode_records(head + payload, ID) == ([], 0)  # body 5 of 1


# ------------------------------------------------------------ the store
def envelope(*folders: str, body: bytes = b"Subject: t\r\n\r\nhello\r\n") -> Envelope:
    return Envelope(helo="client", sender="a@smtpd.com", recipients=[Recipient(f"{f}@smtpd.com", f) for f in folders],
                    chunks=[body[:12], body[12:]], size=len(body))


def journals(root: Path) -> list[Path]:
    return sorted((root / delivery.JOURNAL_DIR).iterdir())


def read_journal(path: Path) -> list[JournalCopy]:
    records, end = decode_records(path.read_bytes(), bytes.fromhex(path.name.split(".")[2]))
    assert end == path.stat().st_size
    return [copy for copies in records for copy in copies]


class FlushRecorder(Recorder):
    """The durable steps, fdatasync too."""

    def install(self, monkeypatch) -> None:
        super().install(monkeypatch)
        real = delivery.fdatasync

        def fdatasync(fd):
            real(fd)
            self.events.append(("fdatasync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_dev))

        monkeypatch.setattr(delivery, "fdatasync", fdatasync)


def test_a_batch_is_journalled_with_one_flush_before_any_rename(tmp_path, monkeypatch):
    store = MaildirStore(str(tmp_path), "mx.test", journal_size=1 << 20)
    store.deliver_batch([(envelope("u", "v", "w"), "[::1]")])  # folders made, journal file made
    recorder = FlushRecorder()
    recorder.install(monkeypatch)
    batch = [(envelope("u"), "[::1]"), (envelope("u", "v", "w"), "[::1]"), (envelope("w"), "[::1]")]
    results = store.deliver_batch(batch)
    assert all(isinstance(r, str) for r in results), results
    kinds = recorder.kinds()
    assert [k for k in kinds if k in ("fsync", "syncfs", "fdatasync")] == ["fdatasync"]  # one flush, no other
    (journal,) = journals(tmp_path)
    flushed = kinds.index("fdatasync")
    assert recorder.events[flushed][1] == str(journal)
    assert ("write", str(journal), journal.stat().st_dev) in recorder.events[:flushed]
    assert kinds.count("rename") == 5 and kinds.index("rename") > flushed
    # The journal holds every copy exactly as it is in new/.
    copies = read_journal(journal)
    assert len(copies) == 3 + 5  # the first batch's three, then this one's five
    for copy in copies:
        assert (tmp_path / copy.folder / "new" / copy.name).read_bytes() == copy.content


def test_big_mails_and_mails_for_the_queue_skip_the_journal(tmp_path, monkeypatch):
    (tmp_path / "queue" / "msg").mkdir(parents=True)
    store = MaildirStore(str(tmp_path), "mx.test", queue_dir=str(tmp_path / "queue"), journal_size=1 << 20)
    big = envelope("u", body=b"Subject: big\r\n\r\n" + b"x" * delivery.JOURNAL_MAX_MAIL + b"\r\n")
    outside = envelope("u")
    outside.recipients.append(Recipient("far@example.org", "", outside=True))
    for mail in (big, outside):
        recorder = FlushRecorder()
        recorder.install(monkeypatch)
        assert isinstance(store.deliver(mail, "[::1]"), str)
        assert "fdatasync" not in recorder.kinds() and "fsync" in recorder.kinds()
    assert not (tmp_path / delivery.JOURNAL_DIR).exists() or all(p.stat().st_size == 0 for p in journals(tmp_path))


def test_a_failed_journal_flush_refuses_the_batch_and_leaves_the_journal_as_it_was(tmp_path, monkeypatch):
    store = MaildirStore(str(tmp_path), "mx.test", journal_size=1 << 20)
    store.deliver_batch([(envelope("u"), "[::1]")])
    (journal,) = journals(tmp_path)
    before = journal.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(delivery, "fdatasync", full)
    results = store.deliver_batch([(envelope("u", "v"), "[::1]"), (envelope("u"), "[::1]")])
    assert all(isinstance(r, DeliveryError) and r.no_space for r in results)
    assert journal.read_bytes() == before  # the refused batch's record is cut off again
    # Nothing of the refused batch in new/: u keeps the first batch's mail, v
    # (made by the refused batch's writes) holds none.
    assert len(os.listdir(tmp_path / "u" / "new")) == 1 and os.listdir(tmp_path / "v" / "new") == []
    assert os.listdir(tmp_path / delivery.SPOOL) == []


def test_a_full_journal_is_retired_after_its_copies_are_made_durable(tmp_path, monkeypatch):
    store = MaildirStore(str(tmp_path), "mx.test", journal_size=1 << 20)
    store.deliver_batch([(envelope("u"), "[::1]")])
    (old,) = journals(tmp_path)
    store.journal_size = old.stat().st_size + 1
    store.retire_journal_if_due()
    assert journals(tmp_path) == [old]  # one octet short of full
    store.journal_size -= 1
    recorder = FlushRecorder()
    recorder.install(monkeypatch)
    store.retire_journal_if_due()
    (new,) = journals(tmp_path)
    assert new != old and new.stat().st_size == 0 and not store.journal_pending()
    kinds = recorder.kinds()
    # Made durable (syncfs) before the old journal goes, whose removal is made durable too.
    assert kinds == ["syncfs", "fsync"] and recorder.events[1][1] == str(tmp_path / delivery.JOURNAL_DIR)
    store.retire_journal()  # mail stopped: no next file
    assert journals(tmp_path) == []


def test_an_old_record_retires_its_journal_whatever_its_size(tmp_path, monkeypatch):
    store = MaildirStore(str(tmp_path), "mx.test", journal_size=1 << 20)
    store.deliver_batch([(envelope("u"), "[::1]")])
    store.retire_journal_if_due()
    assert store.journal_pending()  # young and small: kept
    monkeypatch.setattr(delivery, "JOURNAL_MAX_AGE", 0.0)
    store.retire_journal_if_due()
    assert not store.journal_pending() and [p.stat().st_size for p in journals(tmp_path)] == [0]


def test_a_journal_that_cannot_be_retired_is_kept_and_said(tmp_path, monkeypatch):
    said = []
    store = MaildirStore(str(tmp_path), "mx.test", journal_size=1, note=said.append)
    store.deliver_batch([(envelope("u"), "[::1]")])
    (old,) = journals(tmp_path)

    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(delivery, "syncfs", broken)
    store.retire_journal_if_due()
    # Kept for the replay, and never retired by this store: the journal is off.
    assert journals(tmp_path) == [old.with_name(old.name + delivery.UNSYNCED)]
    assert not store.journal_pending() and store.journal_size == 0
    assert said == [
        f"journal {old.name}: cannot make its copies durable: Input/output error; kept for the replay, journal off"
    ]
    # Its copy reads back whole (from the cache), but the disk may not hold
    # it: the replay writes it again all the same.
    monkeypatch.undo()
    (copy,) = (tmp_path / "u" / "new").iterdir()
    content, inode = copy.read_bytes(), copy.stat().st_ino
    assert replay_journals(str(tmp_path)) == [f"journal: put back {copy}"]
    assert copy.read_bytes() == content and copy.stat().st_ino != inode
    assert journals(tmp_path) == []


def test_journal_upkeep_that_fails_is_said_and_the_thread_goes_on(tmp_path):
    said = []

    class Broken(MaildirStore):
        def retire_journal_if_due(self) -> None:
            raise RuntimeError("planted")

    store = Broken(str(tmp_path), "mx.test", journal_size=1 << 20, note=said.append)
    loop = asyncio.new_event_loop()
    committer = BatchCommitter(store, loop, 1)
    try:
        for _ in range(2):  # the second is stored by the same thread, after the failed upkeep
            assert isinstance(loop.run_until_complete(committer.submit(envelope("u"), "[::1]")), str)
        committer.close()
    finally:
        loop.close()
    assert said == ["journal upkeep failed: RuntimeError('planted')"] * 2
    assert len(os.listdir(tmp_path / "u" / "new")) == 2


def test_the_delivery_thread_retires_its_journal_when_mail_stops_and_at_its_end(tmp_path, monkeypatch):
    monkeypatch.setattr(delivery, "JOURNAL_IDLE", 0.05)
    store = MaildirStore(str(tmp_path), "mx.test", journal_size=1 << 20)
    loop = asyncio.new_event_loop()
    committer = BatchCommitter(store, loop, 1)
    try:
        future = committer.submit(envelope("u"), "[::1]")
        assert isinstance(loop.run_until_complete(future), str)
        wait_until(lambda: journals(tmp_path) == [], what="the idle retirement")
        future = committer.submit(envelope("u"), "[::1]")
        loop.run_until_complete(future)
        committer.close()
        assert journals(tmp_path) == []
    finally:
        loop.close()


# ------------------------------------------------------------ the replay
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def plant(root: Path, pid: int, *copies: tuple[str, str, bytes, bytes], extra: bytes = b"") -> Path:
    """A journal file as a worker ``pid`` would leave it."""
    (root / delivery.JOURNAL_DIR).mkdir(parents=True, exist_ok=True)
    path = root / delivery.JOURNAL_DIR / f"{pid}.0.{ID.hex()}"
    path.write_bytes(b"".join(b"".join(record(copy)) for copy in copies) + extra)
    return path


def test_the_replay_puts_back_what_was_lost_and_leaves_what_a_reader_took(tmp_path):
    store = MaildirStore(str(tmp_path), "mx.test", journal_size=1 << 20)
    names = store.deliver_batch([(envelope("u"), "[::1]") for _ in range(4)])
    store.deliver_batch([(envelope("v"), "[::1]")])
    (journal,) = journals(tmp_path)
    expected = {copy.name: copy.content for copy in read_journal(journal) if copy.folder == "u"}
    new = tmp_path / "u" / "new"
    lost, short, taken, kept = names
    (new / lost).unlink()  # its name never reached the disk
    (new / short).write_bytes(expected[short][:5])  # its data did not all reach it
    (new / taken).rename(tmp_path / "u" / "cur" / f"{taken}:2,S")  # a reader took it
    kept_inode = (new / kept).stat().st_ino
    dead = dead_pid()
    journal.rename(journal.with_name(f"{dead}.0.{journal.name.split('.')[2]}"))
    lines = replay_journals(str(tmp_path), dead)
    assert sorted(lines) == sorted(f"journal: put back {new / n}" for n in (lost, short))
    assert {p.name: p.read_bytes() for p in new.iterdir()} == {n: expected[n] for n in (lost, short, kept)}
    assert (new / kept).stat().st_ino == kept_inode  # whole already: not written again
    assert journals(tmp_path) == [] and os.listdir(tmp_path / delivery.SPOOL) == []


def test_the_replay_takes_only_the_whole_records_and_says_what_it_ignored(tmp_path):
    (tmp_path / "u" / "new").mkdir(parents=True)
    (tmp_path / "u" / "cur").mkdir()
    dead = dead_pid()
    torn = b"".join(record(("u", "1.M1P1Q2.h", b"H\n", b"never acknowledged\n")))[:-3]
    plant(tmp_path, dead, ("u", "1.M1P1Q1.h", b"H\n", b"acknowledged\n"), extra=torn)
    lines = replay_journals(str(tmp_path))
    assert os.listdir(tmp_path / "u" / "new") == ["1.M1P1Q1.h"]
    assert (tmp_path / "u" / "new" / "1.M1P1Q1.h").read_bytes() == b"H\nacknowledged\n"
    assert any(f"{len(torn)} octets after its last whole record ignored" in line for line in lines)


def test_the_replay_writes_nothing_outside_the_mail_dir(tmp_path):
    root = tmp_path / "mail"
    (root / "u" / "new").mkdir(parents=True)
    (tmp_path / "elsewhere" / "new").mkdir(parents=True)
    (root / "link").symlink_to(tmp_path / "elsewhere")
    dead = dead_pid()
    plant(root, dead, ("../elsewhere", "1.M1P1Q1.h", b"", b"x"), ("u", "../../elsewhere/new/x", b"", b"x"),
          ("/abs", "1.M1P1Q1.h", b"", b"x"), ("link", "1.M1P1Q1.h", b"", b"x"), ("u/..", "1.M1P1Q1.h", b"", b"x"),
          ("u/.x/..", "1.M1P1Q1.h", b"", b"x"))
    lines = replay_journals(str(root))
    assert os.listdir(tmp_path / "elsewhere" / "new") == [] and os.listdir(root / "u" / "new") == []
    assert sum("refused an entry" in line for line in lines) == 5
    assert any("not put back" in line and "link" in line for line in lines)


def test_the_replay_at_start_leaves_the_journals_of_live_writers(tmp_path):
    (tmp_path / "u" / "new").mkdir(parents=True)
    live = plant(tmp_path, os.getpid(), ("u", "1.M1P1Q1.h", b"", b"mine\n"))
    holder = os.open(live, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as its writer holds it
    try:
        assert replay_journals(str(tmp_path)) == [] and live.exists()
    finally:
        os.close(holder)
    assert replay_journals(str(tmp_path), os.getpid() + 1) == [] and live.exists()  # another worker's death
    assert replay_journals(str(tmp_path), os.getpid()) == [f"journal: put back {tmp_path / 'u' / 'new' / '1.M1P1Q1.h'}"]
    assert not live.exists()


# ------------------------------------------------------------ the server
@pytest.fixture
def request_kill():
    servers: list[Server] = []
    yield servers.append
    for server in servers:
        server.kill()


def test_a_journal_left_by_a_crash_is_replayed_before_the_server_takes_mail(tmp_path, request_kill):
    mail_dir = tmp_path / "mail_dir"  # the Server's
    (mail_dir / "u" / "new").mkdir(parents=True)
    (mail_dir / "u" / "cur").mkdir()
    plant(mail_dir, dead_pid(), ("u", "1.M1P1Q1.h", b"Return-Path: <a@smtpd.com>\n", b"before the crash\n"))
    server = Server(tmp_path)
    request_kill(server)
    assert [p.read_bytes() for p in server.stored("u")] == [b"Return-Path: <a@smtpd.com>\nbefore the crash\n"]
    assert f"journal: put back {mail_dir / 'u' / 'new' / '1.M1P1Q1.h'}" in server.log_text()
    assert os.listdir(mail_dir / delivery.JOURNAL_DIR) == []


def test_a_dead_workers_journal_is_replayed_by_the_master(start_server):
    server = start_server(workers=1)
    c = server.client()
    c.cmd("EHLO x")
    assert c.mail("a@smtpd.com", ["u"], b"acknowledged")[0] == 250
    (victim,) = server.worker_pids()
    # As if the worker died before the copy's name reached the disk.
    planted = plant(server.mail_dir, victim, ("u", "1.M1P1Q9.h", b"", b"journalled\n"))
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(server.stored("u")) == 2, what="the replay")
    assert not planted.exists()
    wait_until(lambda: "worker 1: journal: put back" in server.log_text(), what="the replay's log line")


def test_a_stopped_server_leaves_no_journal_and_no_journal_with_size_zero(start_server, tmp_path):
    # A journal kept while the server is quiet, so that it is there to see.
    env = with_sitecustomize(tmp_path / "site", "import prefork_smtpd.delivery as d\nd.JOURNAL_IDLE = 3600\n")
    for size in ("16777216", "0"):
        server = start_server("--journal-size", size, workers=1, env=env)
        c = server.client()
        c.cmd("EHLO x")
        for i in range(3):
            assert c.mail("a@smtpd.com", ["u"], b"n %d" % i)[0] == 250
        if size == "0":
            assert os.listdir(server.mail_dir / delivery.JOURNAL_DIR) == []
        else:
            assert os.listdir(server.mail_dir / delivery.JOURNAL_DIR) != []
        c.close()
        assert server.stop() == 0
        assert os.listdir(server.mail_dir / delivery.JOURNAL_DIR) == []
        assert len(server.stored("u")) == 3
