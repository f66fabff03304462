"""Operator files are read only when they are regular files, and bounded."""

from __future__ import annotations

import os
import signal

import pytest

from prefork_smtpd.textfile import read_regular_file


@pytest.fixture
def no_blocking():
    """A read that blocks fails the test in 10 s rather than hanging it."""

    def blocked(signum, frame):
        raise AssertionError("the read blocked")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_fifo_without_a_writer_is_refused_without_blocking(tmp_path, no_blocking):
    fifo = tmp_path / "settings.toml"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        read_regular_file(str(fifo))


def test_a_device_is_refused_unread(no_blocking):
    with pytest.raises(OSError, match="not a regular file"):
        read_regular_file("/dev/zero")


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(OSError) as caught:
        read_regular_file(str(tmp_path))
    assert caught.value.strerror == "Is a directory"


def test_a_file_over_the_limit_is_refused_and_one_at_it_is_read(tmp_path):
    path = tmp_path / "users"
    path.write_bytes(b"x" * 100)
    assert read_regular_file(str(path), limit=100) == b"x" * 100
    with pytest.raises(OSError, match="larger than 99 bytes"):
        read_regular_file(str(path), limit=99)
    path.write_bytes(b"")
    assert read_regular_file(str(path)) == b""
