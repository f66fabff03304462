"""The journal against failures and hostile input: no acknowledged mail lost,
the replay bounded by what a store could have written.

Each test stands for an order of events found to lose mail or to let a
journal's bytes make the master do unbounded work.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

from prefork_smtpd import delivery
from prefork_smtpd.delivery import MaildirStore, replay_journals
from prefork_smtpd.journal import decode_records, encode_record
from test_journal import ID, dead_pid, envelope, journals, read_journal


def plant_record(root: Path, pid: int, bodies: list[bytes], copies: list[tuple[str, str, bytes, int]]) -> Path:
    (root / delivery.JOURNAL_DIR).mkdir(parents=True, exist_ok=True)
    path = root / delivery.JOURNAL_DIR / f"{pid}.0.{ID.hex()}"
    path.write_bytes(b"".join(encode_record(ID, [[body] for body in bodies], copies)))
    return path


def maildir(root: Path, folder: str) -> Path:
    for sub in ("new", "cur", "tmp"):
        (root / folder / sub).mkdir(parents=True, exist_ok=True)
    return root / folder


def test_a_journal_whose_pid_a_live_process_has_since_taken_is_replayed_at_start(tmp_path):
    # After a reboot the dead worker's pid may belong to any process: a
    # journal no writer holds is replayed whatever its pid.
    maildir(tmp_path, "u")
    journal = plant_record(tmp_path, 1, [b"acknowledged\n"], [("u", "1.M1P1Q1.h", b"H\n", 0)])
    replay_journals(str(tmp_path))
    assert (tmp_path / "u" / "new" / "1.M1P1Q1.h").read_bytes() == b"H\nacknowledged\n"
    assert not journal.exists()


def test_the_journal_of_a_live_writer_is_left_at_start(tmp_path):
    store = MaildirStore(str(tmp_path), "mx.test", journal_size=1 << 20)
    store.deliver_batch([(envelope("u"), "[::1]")])
    (journal,) = journals(tmp_path)
    (name,) = os.listdir(tmp_path / "u" / "new")
    (tmp_path / "u" / "new" / name).unlink()
    assert replay_journals(str(tmp_path)) == [] and journal.exists()  # its writer holds it
    store.retire_journal()


def test_a_copy_a_reader_took_into_cur_but_whose_data_was_lost_is_put_back(tmp_path):
    store = MaildirStore(str(tmp_path), "mx.test", journal_size=1 << 20)
    (name,) = store.deliver_batch([(envelope("u"), "[::1]")])
    (journal,) = journals(tmp_path)
    (copy,) = read_journal(journal)
    taken = tmp_path / "u" / "cur" / f"{name}:2,S"
    (tmp_path / "u" / "new" / name).rename(taken)
    taken.write_bytes(b"")  # the reader's rename reached the disk, the data did not
    dead = dead_pid()
    store._journals.file.fd = os.close(store._journals.file.fd) or -1  # the worker died
    journal.rename(journal.with_name(f"{dead}.0.{journal.name.split('.')[2]}"))
    replay_journals(str(tmp_path), dead)
    assert taken.read_bytes() == copy.content and os.listdir(tmp_path / "u" / "new") == []


def test_a_replay_over_more_folders_than_descriptors_puts_back_every_copy(tmp_path):
    # A mail to many mailboxes: the replay must not hold a descriptor per
    # folder, and a folder it could not open must keep the journal.
    folders = [f"m{i}" for i in range(150)]
    for folder in folders:
        maildir(tmp_path, folder)
    dead = dead_pid()
    journal = plant_record(tmp_path, dead, [b"to all\n"], [(f, "1.M1P1Q1.h", b"", 0) for f in folders])
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        from prefork_smtpd.delivery import replay_journals
        replay_journals({str(tmp_path)!r}, {dead})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    restored = [f for f in folders if (tmp_path / f / "new" / "1.M1P1Q1.h").exists()]
    assert restored == folders or journal.exists()
    assert restored == folders


def test_a_replay_error_other_than_a_missing_folder_keeps_the_journal(tmp_path, monkeypatch):
    maildir(tmp_path, "u")
    dead = dead_pid()
    journal = plant_record(tmp_path, dead, [b"x\n"], [("u", "1.M1P1Q1.h", b"", 0)])
    real = delivery._open_dir

    def failing(parent_fd, name, parent_path, make=False):
        if name == "new":
            raise OSError(errno.EIO, "Input/output error", name)
        return real(parent_fd, name, parent_path, make)

    monkeypatch.setattr(delivery, "_open_dir", failing)
    replay_journals(str(tmp_path), dead)
    assert journal.exists()


def test_a_failed_retirement_never_lets_a_later_one_drop_its_records(tmp_path, monkeypatch):
    # Linux reports a writeback error to each descriptor once: a syncfs
    # that failed and is tried again succeeds, though the data is lost.
    said = []
    store = MaildirStore(str(tmp_path), "mx.test", journal_size=1, note=said.append)
    (first,) = store.deliver_batch([(envelope("u"), "[::1]")])
    (journal,) = journals(tmp_path)
    real = delivery.syncfs
    calls = []

    def once_broken(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(delivery, "syncfs", once_broken)
    store.retire_journal_if_due()
    store.deliver_batch([(envelope("u"), "[::1]")])
    store.retire_journal_if_due()
    store.retire_journal()
    kept = journal.with_name(journal.name + delivery.UNSYNCED)  # marked: its replay rewrites every copy
    assert kept.exists() and any(copy.name == first for copy in read_journal(kept))


def test_the_replay_never_builds_every_copy_of_a_shared_body_in_memory(tmp_path):
    maildir(tmp_path, "u")
    body = b"x" * delivery.JOURNAL_MAX_MAIL
    folders = [f"u/.f{i}" for i in range(200)]
    for folder in folders:
        maildir(tmp_path, folder)
    dead = dead_pid()
    plant_record(tmp_path, dead, [body], [(f, "1.M1P1Q1.h", b"H\n", 0) for f in folders])
    tracemalloc.start()
    try:
        replay_journals(str(tmp_path), dead)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all((tmp_path / f / "new" / "1.M1P1Q1.h").stat().st_size == len(body) + 2 for f in folders)
    assert peak < 8 * len(body)  # 200 copies of it would be 50 MiB


def test_a_crafted_journal_cannot_make_the_replay_write_one_copy_over_and_over(tmp_path):
    maildir(tmp_path, "u")
    dead = dead_pid()
    plant_record(tmp_path, dead, [b"y" * 1000], [("u", "1.M1P1Q1.h", b"", 0)] * 500)
    written = []
    real = delivery._write_all

    def counting(fd, header, body):
        written.append(1)
        real(fd, header, body)

    delivery._write_all = counting
    try:
        replay_journals(str(tmp_path), dead)
    finally:
        delivery._write_all = real
    assert len(written) == 1 and os.listdir(tmp_path / "u" / "new") == ["1.M1P1Q1.h"]


def test_a_crafted_record_with_a_body_no_store_journals_is_not_replayed(tmp_path):
    maildir(tmp_path, "u")
    dead = dead_pid()
    journal = plant_record(tmp_path, dead, [b"z" * (delivery.JOURNAL_MAX_MAIL * 2 + 1)], [("u", "1.M1P1Q1.h", b"", 0)])
    lines = replay_journals(str(tmp_path), dead)
    assert os.listdir(tmp_path / "u" / "new") == []
    assert any("ignored" in line for line in lines) and journal.exists() is False


def test_a_record_cut_short_that_could_not_be_cut_off_hides_no_later_record(tmp_path, monkeypatch):
    # The disk fills in the middle of a record and the cut fails too: the
    # torn record would end every later reading, acknowledged records too.
    store = MaildirStore(str(tmp_path), "mx.test", journal_size=1 << 20)
    (first,) = store.deliver_batch([(envelope("u"), "[::1]")])
    real_writev, real_truncate = delivery.writev, os.ftruncate

    def half(fd, parts):
        if delivery.JOURNAL_DIR not in os.readlink(f"/proc/self/fd/{fd}"):
            return real_writev(fd, parts)
        real_writev(fd, [bytes(parts[0])[:10]])
        raise OSError(errno.ENOSPC, "No space left on device")

    def stuck(fd, size):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(delivery, "writev", half)
    monkeypatch.setattr(os, "ftruncate", stuck)
    assert all(isinstance(r, delivery.DeliveryError) for r in store.deliver_batch([(envelope("u"), "[::1]")]))
    monkeypatch.setattr(delivery, "writev", real_writev)
    monkeypatch.setattr(os, "ftruncate", real_truncate)
    (third,) = store.deliver_batch([(envelope("u"), "[::1]")])
    readable = set()
    for journal in journals(tmp_path):
        records, _ = decode_records(journal.read_bytes(), bytes.fromhex(journal.name.split(".")[2]))
        readable |= {copy.name for record in records for copy in record}
    assert {first, third} <= readable


def test_after_the_mail_dir_is_moved_away_records_go_where_the_replay_looks(tmp_path):
    # The store sees a mail_dir moved or made anew at its next batch; a
    # journal left open in the old one would take records no replay of the
    # mail dir ever reads.
    root = tmp_path / "mail"
    store = MaildirStore(str(root), "mx.test", journal_size=1 << 20)
    (first,) = store.deliver_batch([(envelope("u"), "[::1]")])
    root.rename(tmp_path / "moved")
    store.deliver_batch([(envelope("u"), "[::1]")])  # 451: its folder, checked once, is gone; checked again
    (second,) = store.deliver_batch([(envelope("u"), "[::1]")])
    assert (root / "u" / "new" / second).exists()
    assert second in {copy.name for journal in journals(root) for copy in read_journal(journal)}
    assert journals(tmp_path / "moved") == []  # retired: its copies made durable where they are
    store.retire_journal()


def test_a_journal_is_retired_even_when_its_successor_cannot_be_made(tmp_path, monkeypatch):
    # Else each batch appends to it again: it grows for as long as the
    # directory refuses a new file (inodes used up), far past journal_size.
    store = MaildirStore(str(tmp_path), "mx.test", journal_size=1)
    store.deliver_batch([(envelope("u"), "[::1]")])
    (old,) = journals(tmp_path)
    real = delivery._JournalFile.create

    def no_inodes(root_fd, root, number):
        if not root:  # the successor, in the journal directory
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(root_fd, root, number)

    monkeypatch.setattr(delivery._JournalFile, "create", staticmethod(no_inodes))
    store.retire_journal_if_due()
    assert not old.exists() and not store.journal_pending()
    store.deliver_batch([(envelope("u"), "[::1]")])  # a new file, made by the batch
    assert len(journals(tmp_path)) == 1 and store.journal_pending()
    store.retire_journal()


def test_a_journal_whose_removal_failed_is_not_written_to_again(tmp_path, monkeypatch):
    # Its descriptor was closed before the failing fsync: appending to it
    # again wrote to a closed (or reused) descriptor.
    store = MaildirStore(str(tmp_path), "mx.test", journal_size=1)
    store.deliver_batch([(envelope("u"), "[::1]")])
    real = delivery.fsync

    def dir_broken(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(delivery.JOURNAL_DIR):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(delivery, "fsync", dir_broken)
    try:
        store.retire_journal_if_due()
    except OSError:
        pass  # the delivery thread says it and goes on
    monkeypatch.setattr(delivery, "fsync", real)
    (second,) = store.deliver_batch([(envelope("u"), "[::1]")])
    assert isinstance(second, str), second
    assert second in {copy.name for journal in journals(tmp_path) for copy in read_journal(journal)}
    store.retire_journal()


def test_a_body_larger_than_the_replay_takes_is_never_journalled_whatever_its_envelope_says(tmp_path):
    # The replay ends its reading at a body over JOURNAL_MAX_MAIL: the
    # store must measure what it journals, not trust the envelope's size.
    store = MaildirStore(str(tmp_path), "mx.test", journal_size=1 << 20)
    big = envelope("u", body=b"Subject: big\r\n\r\n" + b"x" * delivery.JOURNAL_MAX_MAIL + b"\r\n")
    big.size = 0  # as an envelope made by the server itself may leave it
    assert isinstance(store.deliver(big, "[::1]"), str)
    assert not (tmp_path / delivery.JOURNAL_DIR).exists() or all(p.stat().st_size == 0 for p in journals(tmp_path))
