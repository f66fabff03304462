"""The Maildir store on its own: batches, group commit, failures, names."""

from __future__ import annotations

import email
import mailbox
import os
from unittest import mock

import pytest

from prefork_smtpd import delivery
from prefork_smtpd.delivery import DeliveryError, MaildirStore, remove_temporary_files
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


@pytest.mark.parametrize("size", [1, 2, 10])  # 1-2 files: fsync each; more: syncfs
def test_batch_stores_every_copy_readable_by_mailbox(tmp_path, size):
    store = MaildirStore(str(tmp_path), "mx.test")
    results = store.deliver_batch([(envelope("u", "v"), "[127.0.0.1]") for _ in range(size)])
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
