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
    {**GOOD, "sender": "a@smtpd.com\r\nRCPT TO:<x@y>"},  # a line break: a command of the runner's, forged
    {**GOOD, "rcpts": [{"a": "x@example.org>\r\nRSET"}]},
    {**GOOD, "rcpts": [{"a": "x@example.org", "orcpt": ["rfc822", "x\n@example.org"]}]},
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


def test_a_header_nested_past_the_parsers_depth_is_skipped_and_the_others_load(tmp_path):
    queue = queue_with(tmp_path, GOOD)
    (tmp_path / "queue" / "msg" / "q0").write_bytes(b"[" * 100_000 + b"\nSubject: x\r\n\r\nhi\r\n")
    (tmp_path / "queue" / "state" / "q1").write_bytes(b"[" * 100_000 + b"\n" + b'{"r":0,"result":"sent"}\n')
    assert queue.load("q0") is None  # was: RecursionError out of json.loads, the runner dead at every start
    mail = queue.load("q1")
    assert mail is not None and mail.results[0]["result"] == "sent"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["msg", "state"])
def test_a_fifo_or_a_link_in_the_queue_is_no_queued_mail_and_never_blocks(tmp_path, where):
    import os

    queue = queue_with(tmp_path, GOOD)
    path = tmp_path / "queue" / where / "q1"
    if where == "msg":
        path.unlink()
    os.mkfifo(path)  # nobody writes: open() without O_NONBLOCK waits for ever
    assert queue.load("q1") is None
    if where == "state":
        with pytest.raises(OSError):  # not held in open() either
            queue.record("q1", [{"r": 0, "result": "sent"}])
    path.unlink()
    outside = tmp_path / "outside"
    outside.write_bytes(json.dumps(GOOD).encode() + b"\nhi\r\n")
    path.symlink_to(outside)
    if where == "msg":
        assert queue.load("q1") is None


def test_a_progress_line_for_a_mail_deleted_meanwhile_leaves_no_orphan_log(tmp_path):
    queue = queue_with(tmp_path, GOOD)
    assert queue.remove("q1")
    queue.record("q1", [{"r": 0, "result": "deferred", "attempts": 1, "next": 9.0, "reply": "451 later"}])
    assert not (tmp_path / "queue" / "state" / "q1").exists()
    queue = queue_with(tmp_path, GOOD)
    queue.record("q1", [{"r": 0, "result": "deferred", "attempts": 1, "next": 9.0, "reply": "451 later"}])
    assert queue.load("q1").attempts == 1


def test_the_queue_command_shows_a_hostile_reply_escaped_and_lists_json_either_way(tmp_path):
    import os

    queue_with(tmp_path, GOOD, b'{"r":0,"result":"deferred","attempts":1,"next":9.0,"reply":"451 4.7.1 \\u001b[2J\\u001b[31mpwned \\udcff"}\n')
    tool = [sys.executable, "-P", "-m", "prefork_smtpd.cli.queue", "--queue-dir", str(tmp_path / "queue")]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    listed = subprocess.run([*tool, "list"], capture_output=True, text=True, env=env)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert "\x1b" not in listed.stdout and "451 4.7.1 \\x1b[2J\\x1b[31mpwned \\udcff" in listed.stdout
    for args in (["--json", "list"], ["list", "--json"]):
        done = subprocess.run([*tool[:-2], *args[:1], "--queue-dir", str(tmp_path / "queue"), *args[1:]]
                              if args[0] == "--json" else [*tool, *args], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[0])["id"] == "q1"
    # A file name in msg/ is shown escaped by delete too (it names it as it goes).
    (tmp_path / "queue" / "msg" / "q\x1b[2J").write_bytes(b"")
    deleted = subprocess.run([*tool, "delete", "--all"], capture_output=True, text=True, env=env)
    assert "\x1b" not in deleted.stdout + deleted.stderr and "deleted q\\x1b[2J" in deleted.stdout
