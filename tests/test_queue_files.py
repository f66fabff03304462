"""Queue files that are not as the server writes them: skipped, never a crash."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prefork_smtpd.queue import Queue

GOOD = {"v": 1, "id": "q1", "sender": "a@smtpd.com", "arrival": 1.0, "rcpts": [{"a": "x@example.org"}]}


def queue_with(tmp_path, header: object, progress: bytes | None = None) -> Queue:
    queue = Queue(str(tmp_path / "queue"))
    queue.make()
    (tmp_path / "queue" / "msg" / "q1").write_bytes(json.dumps(header).encode() + b"\nSubject: x\r\n\r\nhi\r\n")
    if progress is not None:
        (tmp_path / "queue" / "state" / "q1").write_bytes(progress)
    return queue


@pytest.mark.parametrize("header", [
    {**GOOD, "sender": 5},
    {**GOOD, "rcpts": [1]},
    {**GOOD, "rcpts": [{"a": 7}]},
    {**GOOD, "rcpts": "x@example.org"},
    {**GOOD, "rcpts": [{"a": "x@example.org", "notify": 3}]},
    {**GOOD, "rcpts": [{"a": "x@example.org", "orcpt": ["rfc822"]}]},
    {**GOOD, "arrival": "nan"},
    {**GOOD, "arrival": 1e400},
    {**GOOD, "ret": 1},
    {**GOOD, "size": "big"},
    [GOOD],
])
def test_a_header_not_as_written_is_not_a_queued_mail(tmp_path, header):
    assert queue_with(tmp_path, header).load("q1") is None


@pytest.mark.parametrize("progress", [
    b'{"result":"deferred","attempts":"x"}\n',
    b'{"result":"deferred","next":"soon"}\n',
    b'{"result":"deferred","reply":5}\n',
    b'{"delay_warned":["a"]}\n{"r":0,"result":"sent"}\n',
])
def test_a_progress_line_not_as_written_is_skipped(tmp_path, progress):
    mail = queue_with(tmp_path, GOOD, progress).load("q1")
    assert mail is not None and mail.attempts == 0 and mail.last_reply == ""


def test_a_state_entry_that_is_a_directory_is_no_crash(tmp_path):
    queue = queue_with(tmp_path, GOOD)
    (tmp_path / "queue" / "state" / "q1").mkdir()
    assert queue.load("q1") is None


@pytest.mark.parametrize("queue_id", ["", ".", "..", "../msg/q1", "q1/..", "../../victim", "{victim}"])
def test_an_id_that_is_no_file_name_names_no_queued_mail(tmp_path, queue_id):
    # "prefork-smtpd-queue delete /etc/passwd" unlinked /etc/passwd: an id
    # was joined to the queue's folders as it was given.
    queue = queue_with(tmp_path, GOOD)
    victim = tmp_path / "victim"
    victim.write_text("not a queue file\n")
    queue_id = queue_id.format(victim=victim)
    assert queue.load(queue_id) is None
    assert queue.remove(queue_id) is False
    assert victim.exists() and queue.load("q1") is not None  # both still there


def test_the_queue_command_says_what_is_wrong_without_a_traceback(tmp_path):
    queue_with(tmp_path, {**GOOD, "sender": 5})
    tool = [sys.executable, "-P", "-m", "prefork_smtpd.cli.queue"]
    listed = subprocess.run([*tool, "--queue-dir", str(tmp_path / "queue"), "list"], capture_output=True, text=True)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for args in (["--queue-dir", str(a_file), "list"], ["--queue-dir", str(tmp_path / "queue"), "delete", ""]):
        done = subprocess.run([*tool, *args], capture_output=True, text=True)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("prefork-smtpd-queue: "), done.stderr
