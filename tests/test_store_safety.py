"""The mail store against its surroundings: links, umask, unusable dirs, many folders.

Real servers, real clients; the store's own unit tests are in
test_delivery.py and test_store_durability.py.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from harness import free_port, tmpfs, wait_until
from prefork_smtpd import delivery
from prefork_smtpd.delivery import SPOOL, remove_temporary_files

REFUSED = "refused, a symbolic link in the mail dir"


def maildir(path):
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def files_under(path):
    return [p for p in path.rglob("*") if p.is_file()]


# ----------------------------------------------------------------- links
def test_symbolic_links_under_the_mail_dir_are_refused_with_451_and_logged(server, tmp_path):
    elsewhere = maildir(tmp_path / "elsewhere")
    mail_dir = server.mail_dir
    mail_dir.mkdir(exist_ok=True)  # made at start
    (mail_dir / "bob").symlink_to(elsewhere)  # the folder itself
    maildir(mail_dir / "carol")
    (mail_dir / "carol" / "tmp").rmdir()
    (mail_dir / "carol" / "tmp").symlink_to(elsewhere / "tmp")  # its tmp/
    maildir(mail_dir / "dave")
    (mail_dir / "dave" / "new").rmdir()
    (mail_dir / "dave" / "new").symlink_to(elsewhere / "new")  # its new/
    c = server.client()
    c.cmd("EHLO x")
    for name, link in (("bob", "bob"), ("carol", "carol/tmp"), ("dave", "dave/new")):
        code, text = c.mail("a@smtpd.com", [name], b"Subject: for " + name.encode())
        assert code == 451 and text.startswith("4.3.0"), (name, code, text)
        wait_until(lambda: f"delivery failed: {REFUSED}: {mail_dir / link}" in server.log_text(), what=f"{link} log")
    # all or nothing: the good recipient of a mixed mail gets nothing either
    assert c.mail("a@smtpd.com", ["alice", "bob"], b"both")[0] == 451
    assert not server.stored("alice")
    assert c.mail("a@smtpd.com", ["alice"], b"fine")[0] == 250
    assert files_under(elsewhere) == [] and files_under(mail_dir / SPOOL) == []
    assert len(server.stored("alice")) == 1


def test_a_link_planted_after_the_folder_was_used_is_refused_too(server, tmp_path):
    elsewhere = maildir(tmp_path / "elsewhere")
    c = server.client()
    c.cmd("EHLO x")
    assert c.mail("a@smtpd.com", ["erin"], b"first")[0] == 250
    erin = server.mail_dir / "erin"
    (erin / "new").rename(erin / "new.old")
    (erin / "new").symlink_to(elsewhere / "new")
    assert c.mail("a@smtpd.com", ["erin"], b"second")[0] == 451
    erin.rename(server.mail_dir / "erin.old")
    erin.symlink_to(elsewhere)
    assert c.mail("a@smtpd.com", ["erin"], b"third")[0] == 451
    assert files_under(elsewhere) == []
    wait_until(lambda: f"{REFUSED}: {erin / 'new'}\n" in server.log_text(), what="the new/ link logged")
    wait_until(lambda: f"{REFUSED}: {erin}\n" in server.log_text(), what="the folder link logged")


# ----------------------------------------------------------------- modes
def test_folders_0700_and_files_0600_even_under_umask_000(start_server):
    old = os.umask(0)
    try:
        server = start_server()  # the server inherits umask 000
    finally:
        os.umask(old)
    c = server.client()
    c.cmd("EHLO x")
    assert c.mail("a@smtpd.com", ["u", "v"], b"private")[0] == 250
    mail_dir = server.mail_dir

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode) if path.exists() else None

    dirs = [mail_dir, mail_dir / SPOOL] + [mail_dir / f / s for f in ("u", "v") for s in ("", "tmp", "new", "cur")]
    assert {str(d.relative_to(server.root)): oct(mode(d) or 0) for d in dirs} == {
        str(d.relative_to(server.root)): "0o700" for d in dirs
    }
    stored = server.stored("u") + server.stored("v")
    assert len(stored) == 2 and {oct(mode(p)) for p in stored} == {"0o600"}


# ------------------------------------------------------- the start check
def start_with_mail_dir(tmp_path, mail_dir) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "prefork_smtpd", "--workers", "1", "-l", "127.0.0.1", "-P", str(free_port()),
           "-c", str(free_port()), "--mail-dir", str(mail_dir), "--log-file", str(tmp_path / "log.txt")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the server started with the unusable mail dir {mail_dir}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.root("mounts a tmpfs")
@pytest.mark.parametrize("case", ["under /proc", "a file", "under a file", "read-only", "spool is a link"])
def test_an_unusable_mail_dir_stops_the_start_with_exit_2_and_one_line(tmp_path, case):
    # Tests run as root: every case fails for root too (no permission bits).
    with tmpfs(tmp_path / "fs", "1m") as fs:
        if case == "under /proc":
            mail_dir, reason = "/proc/prefork-smtpd-mail", "No such file or directory"
        elif case == "a file":
            (fs / "plain").write_text("x")
            mail_dir, reason = fs / "plain", "is not a directory"
        elif case == "under a file":
            (fs / "plain").write_text("x")
            mail_dir, reason = fs / "plain" / "mail", "Not a directory"
        elif case == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
            mail_dir, reason = fs / "mail", "Read-only file system"
        else:
            (fs / "mail").mkdir()
            (fs / "mail" / SPOOL).symlink_to(tmp_path)
            mail_dir, reason = fs / "mail", REFUSED
        result = start_with_mail_dir(tmp_path, mail_dir)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith(f"prefork-smtpd: error: mail dir {mail_dir}") and reason in err, err


def test_a_missing_mail_dir_is_made_and_leftovers_of_dead_writers_go(start_server, tmp_path):
    mail_dir = tmp_path / "new-mail-dir"
    (mail_dir / SPOOL).mkdir(parents=True)
    gone = mail_dir / SPOOL / f"1700000000.M1P{_a_dead_pid()}Q1.host.0"
    alive = mail_dir / SPOOL / f"1700000000.M1P{os.getpid()}Q1.host.0"  # a writer still running: kept
    gone.write_bytes(b"x")
    alive.write_bytes(b"x")
    start_server("--mail-dir", str(mail_dir))  # the last --mail-dir wins
    assert not gone.exists() and alive.exists()
    fresh = tmp_path / "made" / "by" / "the-server"
    start_server("--mail-dir", str(fresh))
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700 and (fresh / SPOOL).is_dir()


def _a_dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ------------------------------------------------ dead workers, many folders
def make_folders(mail_dir, count):
    for i in range(count):
        os.makedirs(mail_dir / f"f{i}" / "tmp")


@pytest.mark.slow
def test_dead_writer_clean_up_lists_only_the_spool(tmp_path, monkeypatch):
    make_folders(tmp_path, 20_000)
    (tmp_path / SPOOL).mkdir()
    leftover = tmp_path / SPOOL / "1700000000.M1P4242Q7.host.0"
    leftover.write_bytes(b"half a message")
    listed = []
    for name in ("listdir", "scandir"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, **kw: listed.append(a) or _real(*a, **kw))
    removed = remove_temporary_files(str(tmp_path), 4242)
    assert len(listed) == 1  # the spool alone, not one listing per folder
    assert removed == [str(leftover)]


@pytest.mark.slow
def test_a_killed_workers_spool_files_go_and_the_master_stays_responsive(start_server):
    server = start_server()
    make_folders(server.mail_dir, 20_000)
    victim = server.worker_pids()[0]
    leftover = server.mail_dir / SPOOL / f"1700000000.M1P{victim}Q7.host.0"
    leftover.parent.mkdir(exist_ok=True)  # made at start
    leftover.write_bytes(b"half a message")
    master = server.proc.pid
    # strace counts the master's directory reads around the worker's death.
    trace = server.root / "master.strace"
    tracer = subprocess.Popen(["strace", "-p", str(master), "-e", "trace=getdents64", "-o", str(trace)],
                              stderr=subprocess.PIPE)
    assert b"attached" in tracer.stderr.readline()
    config = socket.create_connection(("127.0.0.1", server.config_port), timeout=30)
    config_lines = config.makefile("rb")
    try:
        os.kill(victim, signal.SIGKILL)
        # The master answers while it handles the death (a generous bound:
        # scanning 20,000 folders took a fraction of a second, millions took minutes).
        started = time.monotonic()
        config.sendall(b"show=1\r\n")
        while config_lines.readline() != b"OK\r\n":
            pass
        assert time.monotonic() - started < 10, "the config port was blocked for seconds"
        wait_until(lambda: not leftover.exists(), what="the dead worker's spool file to go")
        server.wait_ready()  # replaced
    finally:
        config.close()
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
    directory_reads = trace.read_text().count("getdents64(")
    assert directory_reads <= 10, f"the master read {directory_reads} directory blocks: it scanned the folders"
    assert f"removed unacknowledged {leftover}" in server.log_text()
