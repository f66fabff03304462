"""The store's durability protocol, made visible by recording its durable steps.

The store calls its writes, flushes, renames and mkdirs through module
names (``delivery.writev``, ``fsync``, ``syncfs``, ``rename``, ``mkdir``);
here a recorder takes their place, does the real call and notes what it
touched (file path and device, read from /proc/self/fd at call time). The
rules checked for every batch shape:

- a copy's data is durable before its rename: after its last write there
  is an fsync of that file, or a syncfs of its device, before the rename;
- every rename is durable before deliver_batch returns: an fsync of the
  new/ directory it went into, or a syncfs of its device, after it;
- every directory made is durable before deliver_batch returns: an fsync
  of its parent, or a syncfs of its device, after the mkdir.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from prefork_smtpd import delivery
from prefork_smtpd.delivery import MaildirStore
from prefork_smtpd.session import Envelope, Recipient


def envelope(*folders: str) -> Envelope:
    body = b"Subject: t\r\n\r\nhello\r\n"
    return Envelope(helo="client", sender="a@smtpd.com", recipients=[Recipient(f"{f}@smtpd.com", f) for f in folders],
                    chunks=[body[:12], body[12:]], size=len(body))


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _at(dir_fd: int | None, name: str) -> str:
    return name if dir_fd is None else os.path.join(_fd_path(dir_fd), name)


@dataclass
class Recorder:
    """Stands in for the store's durable steps; keeps (kind, path, device) in order."""

    events: list[tuple] = field(default_factory=list)

    def install(self, monkeypatch) -> None:
        real = {name: getattr(delivery, name) for name in ("writev", "fsync", "syncfs", "rename", "mkdir")}

        def writev(fd, parts):
            self.events.append(("write", _fd_path(fd), os.fstat(fd).st_dev))
            return real["writev"](fd, parts)

        def fsync(fd):
            real["fsync"](fd)
            self.events.append(("fsync", _fd_path(fd), os.fstat(fd).st_dev))

        def syncfs(fd):
            real["syncfs"](fd)
            self.events.append(("syncfs", None, os.fstat(fd).st_dev))

        def rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            src_path, dst_path = _at(src_dir_fd, src), _at(dst_dir_fd, dst)
            real["rename"](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
            self.events.append(("rename", (src_path, dst_path), os.stat(dst_path).st_dev))

        def mkdir(name, mode=0o777, *, dir_fd=None):
            path = _at(dir_fd, name)
            real["mkdir"](name, mode, dir_fd=dir_fd)
            self.events.append(("mkdir", path, os.stat(path).st_dev))

        for name, fake in (("writev", writev), ("fsync", fsync), ("syncfs", syncfs), ("rename", rename),
                           ("mkdir", mkdir)):
            monkeypatch.setattr(delivery, name, fake)

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.events]


def _made_durable(events: list[tuple], after: int, before: int, path: str, device: int) -> bool:
    """Is there an fsync of ``path`` or a syncfs of ``device`` in events(after, before)?"""
    return any(
        (kind == "fsync" and where == path) or (kind == "syncfs" and dev == device)
        for kind, where, dev in events[after + 1 : before]
    )


def violations(events: list[tuple]) -> list[str]:
    """Every breach of the three rules in one batch's events; [] if none."""
    found = []
    end = len(events)  # deliver_batch has returned: nothing later counts
    for r, (kind, paths, device) in enumerate(events):
        if kind == "rename":
            src, dst = paths
            writes = [i for i, (k, p, _) in enumerate(events[:r]) if k == "write" and p == src]
            if not writes:
                found.append(f"{dst} renamed from {src}, which was never written")
            elif not _made_durable(events, writes[-1], r, src, device):
                found.append(f"data of {src} not durable before its rename to {dst}")
            if os.path.basename(os.path.dirname(dst)) != "new":
                found.append(f"{dst} is not in a new/ directory")
            if not _made_durable(events, r, end, os.path.dirname(dst), device):
                found.append(f"rename into {os.path.dirname(dst)} not durable before the return")
        elif kind == "mkdir":
            if not _made_durable(events, r, end, os.path.dirname(paths), device):
                found.append(f"new directory {paths} not durable in its parent before the return")
    return found


# Batch shapes: (folders of each message). SYNCFS_FROM is 3: fewer files or
# directories than that take fsyncs, more take one syncfs.
SHAPES = {
    "one copy": [("u",)],
    "one message, two folders": [("u", "v")],
    "one folder, many copies": [("u",)] * 10,
    "many folders, one message": [("a", "b", "c", "d")],
    "three folders": [("a", "b", "c")],  # SYNCFS_FROM copies and directories: the first batch to take syncfs
    "many folders, many messages": [(f"f{i}",) for i in range(8)],
    "mixed": [("u",), ("u", "v"), ("w",), ("x", "y", "z"), ("u",)],
    "two messages, one folder": [("u",), ("u",)],
}


@pytest.mark.parametrize("fresh", [True, False], ids=["new folders", "existing folders"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_copy_is_durable_before_its_rename_and_every_rename_before_the_return(
    tmp_path, monkeypatch, shape, fresh
):
    assert delivery._libc_syncfs is not None, "syncfs is missing: the syncfs path would go unchecked"
    store = MaildirStore(str(tmp_path), "mx.test")
    batch = [(envelope(*folders), "[::1]") for folders in SHAPES[shape]]
    if not fresh:  # folders and spool made, and checked, by an earlier batch
        store.deliver_batch([(envelope(*folders), "[::1]") for folders in SHAPES[shape]])
    recorder = Recorder()
    recorder.install(monkeypatch)
    results = store.deliver_batch(batch)
    assert all(isinstance(r, str) for r in results), results
    copies = sum(len(set(folders)) for folders in SHAPES[shape])
    kinds = recorder.kinds()
    # The recorder saw the whole protocol (a step done behind its back would
    # leave these counts short and the rules unchecked).
    assert kinds.count("rename") == copies and kinds.count("write") >= copies
    assert ("mkdir" in kinds) == fresh
    assert violations(recorder.events) == []
    # The path under test is the one meant: syncfs from SYNCFS_FROM files on.
    assert ("syncfs" in kinds) == (copies >= delivery.SYNCFS_FROM)


# The flushes each shape takes once its folders exist: (fsyncs, syncfs).
# Data: an fsync per copy, or from SYNCFS_FROM copies one syncfs; renames:
# an fsync per new/ directory, or from SYNCFS_FROM directories one syncfs.
FLUSHES = {
    "one copy": (2, 0),
    "one message, two folders": (4, 0),
    "one folder, many copies": (1, 1),
    "many folders, one message": (0, 2),
    "three folders": (0, 2),
    "many folders, many messages": (0, 2),
    "mixed": (0, 2),
    "two messages, one folder": (3, 0),
}


def plus_envelope(*folders: str) -> Envelope:
    """A message to Maildir++ subfolders: "bob/.invoices" is bob+invoices."""
    message = envelope(*folders)
    message.recipients = [Recipient(f"{f}@smtpd.com", *f.split("/")) for f in folders]
    return message


# Plus-addresses whose subfolders --plus-folders makes: the new folder's entry
# in its mailbox is durable before the mail in it is acknowledged.
PLUS_SHAPES = {
    "one copy": [("bob/.a",)],
    "two subfolders": [("bob/.a", "bob/.b")],
    "many copies": [("bob/.a",), ("bob/.b",), ("ann/.c",), ("bob/.a",)],
}


@pytest.mark.parametrize("fresh", [True, False], ids=["new mailbox", "existing mailbox"])
@pytest.mark.parametrize("shape", list(PLUS_SHAPES))
def test_a_plus_folder_made_for_a_mail_is_durable_before_the_return(tmp_path, monkeypatch, shape, fresh):
    store = MaildirStore(str(tmp_path), "mx.test", plus_folders=True)
    if not fresh:  # the mailboxes exist; their subfolders do not
        store.deliver_batch([(envelope("bob", "ann"), "[::1]")])
    recorder = Recorder()
    recorder.install(monkeypatch)
    results = store.deliver_batch([(plus_envelope(*folders), "[::1]") for folders in PLUS_SHAPES[shape]])
    assert all(isinstance(r, str) for r in results), results
    subfolders = {f for folders in PLUS_SHAPES[shape] for f in folders}
    made = [path for kind, path, _ in recorder.events if kind == "mkdir"]
    assert {os.path.relpath(p, tmp_path) for p in made} >= subfolders  # the recorder saw them made
    assert violations(recorder.events) == []


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_batch_takes_the_fewest_flushes(tmp_path, monkeypatch, shape):
    """Group commit: two flushes per batch however many mails, plain fsyncs for one or two."""
    batch = [(envelope(*folders), "[::1]") for folders in SHAPES[shape]]
    MaildirStore(str(tmp_path), "mx.test").deliver_batch(batch)  # the folders exist...
    store = MaildirStore(str(tmp_path), "mx.test")  # ...and a new store checks them once, making nothing
    recorder = Recorder()
    recorder.install(monkeypatch)
    assert all(isinstance(r, str) for r in store.deliver_batch(batch))
    kinds = recorder.kinds()
    assert (kinds.count("fsync"), kinds.count("syncfs")) == FLUSHES[shape]
    assert "mkdir" not in kinds


def test_the_checker_catches_each_broken_order():
    """The rules themselves: each planted misorder is reported."""
    dev = 1
    good = [
        ("write", "/m/.tmp/q.0", dev), ("fsync", "/m/.tmp/q.0", dev),
        ("rename", ("/m/.tmp/q.0", "/m/u/new/q"), dev), ("fsync", "/m/u/new", dev),
    ]
    assert violations(good) == []
    assert violations([good[0], good[2], good[3]]) == ["data of /m/.tmp/q.0 not durable before its rename to /m/u/new/q"]
    assert violations([good[0], good[2], good[1], good[3]]) == [
        "data of /m/.tmp/q.0 not durable before its rename to /m/u/new/q"
    ]
    assert violations(good[:3]) == ["rename into /m/u/new not durable before the return"]
    assert violations([good[0], ("syncfs", None, 2), good[2], ("syncfs", None, 2)]) == [
        "data of /m/.tmp/q.0 not durable before its rename to /m/u/new/q",
        "rename into /m/u/new not durable before the return",
    ]  # a syncfs of another file system covers nothing here
    assert violations([good[0], ("fsync", "/m/.tmp/r.0", dev), good[2], good[3]]) == [
        "data of /m/.tmp/q.0 not durable before its rename to /m/u/new/q"
    ]  # another file's fsync covers nothing here
    assert violations([good[0], good[1], good[2], ("fsync", "/m/v/new", dev)]) == [
        "rename into /m/u/new not durable before the return"
    ]  # nor another directory's
    assert violations([("mkdir", "/m/u", dev)]) == ["new directory /m/u not durable in its parent before the return"]
    assert violations([("mkdir", "/m/u", dev), ("fsync", "/m", dev)]) == []
