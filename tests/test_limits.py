"""Limits a client must not get around: connections per address, disk space, mailboxes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from harness import Server, tmpfs, wait_until
from test_operations import ConfigLine

MiB = 1024 * 1024
needs_root = pytest.mark.root("mounts a small tmpfs")


def connect_from(source: str, port: int) -> socket.socket:
    """A connection to the server from ``source`` (any of 127/8 is loopback)."""
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(20)
    s.connect(("127.0.0.1", port))
    return s


def first_reply(s: socket.socket) -> bytes:
    return s.recv(200)


# ------------------------------------------------- connections per address
def test_addresses_whose_old_buckets_collided_are_counted_apart(start_server):
    # crc32("127.0.17.12") % 4096 == crc32("127.0.0.1") % 4096: with shared
    # buckets, one client's connections locked the other out.
    server = start_server("--max-connections-per-ip", "4")
    crowd = [connect_from("127.0.17.12", server.port) for _ in range(4)]
    assert all(first_reply(s).startswith(b"220") for s in crowd)
    fifth = connect_from("127.0.17.12", server.port)
    assert first_reply(fifth).startswith(b"421 4.7.0")
    other = connect_from("127.0.0.1", server.port)
    assert first_reply(other).startswith(b"220")
    wait_until(lambda: server.log_count("refused: too many connections from your address") == 1, what="refusal log")
    for s in crowd + [fifth, other]:
        s.close()


def test_per_address_count_is_exact_across_workers_and_frees_on_close(start_server):
    server = start_server("--max-connections-per-ip", "3", workers=2)
    held = [connect_from("127.1.2.3", server.port) for _ in range(3)]
    assert all(first_reply(s).startswith(b"220") for s in held)
    assert first_reply(connect_from("127.1.2.3", server.port)).startswith(b"421 4.7.0")
    # Many other addresses, each below its own limit, are all served.
    others = [connect_from(f"127.9.{i}.{j}", server.port) for i in range(3) for j in range(1, 21)]
    assert all(first_reply(s).startswith(b"220") for s in others)
    held.pop().close()

    def one_more_gets_in() -> bool:
        s = connect_from("127.1.2.3", server.port)
        ok = first_reply(s).startswith(b"220")
        if ok:
            held.append(s)
        else:
            s.close()
        return ok

    wait_until(one_more_gets_in, what="the closed connection to free its place")
    for s in held + others:
        s.close()


def test_ipv6_loopback_and_ipv4_clients_of_a_dual_stack_port_are_counted_apart(start_server):
    # On the dual-stack socket 127.0.0.1 arrives as ::ffff:127.0.0.1, inside
    # ::/64 like ::1: it must count as its IPv4 address, not as that /64.
    server = start_server("--max-connections-per-ip", "2", listen=None)
    six = [socket.create_connection(("::1", server.port), timeout=20) for _ in range(2)]
    assert all(first_reply(s).startswith(b"220") for s in six)
    over = socket.create_connection(("::1", server.port), timeout=20)
    assert first_reply(over).startswith(b"421 4.7.0")
    four = [socket.create_connection(("127.0.0.1", server.port), timeout=20) for _ in range(2)]
    assert all(first_reply(s).startswith(b"220") for s in four)
    for s in six + four + [over]:
        s.close()


# ------------------------------------------------------------- disk space
def free_space(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def message(size: int) -> bytes:
    line = b"x" * 998 + b"\r\n"
    return line * (size // len(line))


def stored_files(server: Server) -> list:
    return [p for p in server.mail_dir.rglob("*") if p.is_file()] if server.mail_dir.exists() else []


def test_a_reserve_above_the_free_space_refuses_mail_with_452_until_lowered(start_server, tmp_path):
    # Runs on any file system: ask for more reserve than it has free.
    reserve = free_space(tmp_path) + 1024 * MiB
    server = start_server("--min-free-space", str(reserve))
    c = server.client()
    c.cmd("EHLO x")
    assert c.cmd("MAIL FROM:<a@smtpd.com>") == (452, "4.3.1 Error: insufficient system storage")
    assert c.cmd("MAIL FROM:<>")[0] == 452
    wait_until(lambda: server.log_count('refused "MAIL FROM:<a@smtpd.com>": 452 4.3.1') == 1, what="refusal log")
    assert not stored_files(server)
    cfg = ConfigLine(server.config_port)
    assert cfg.show()["min_free_space"] == reserve
    assert cfg.send("min_free_space=0") == ["OK"]  # 0 turns the check off, live
    assert c.mail("a@smtpd.com", ["u"], b"hi")[0] == 250
    assert c.cmd("QUIT")[0] == 221


def test_the_reserve_is_checked_again_for_every_copy_before_anything_is_written(start_server, tmp_path):
    # 100 copies of 4 MiB need 400 MiB, one copy 4 MiB: with 150 MiB above
    # the reserve, the first is refused at the end of DATA and the second
    # stored, whatever else the machine writes meanwhile (within 140 MiB).
    reserve = free_space(tmp_path) - 150 * MiB
    assert reserve > 0, "the test needs a file system with more than 150 MiB free"
    server = start_server("--min-free-space", str(reserve))
    c = server.client()
    c.cmd("EHLO x")
    body = message(4 * MiB)
    assert c.mail("a@smtpd.com", [f"r{i}" for i in range(100)], body) == (
        452, "4.3.1 Error: insufficient system storage"
    )
    assert not stored_files(server)  # not one copy written
    wait_until(lambda: "delivery failed: insufficient free space" in server.log_text(), what="log")
    assert c.mail("a@smtpd.com", ["r0"], body)[0] == 250
    assert len(server.stored("r0")) == 1
    assert c.cmd("QUIT")[0] == 221


@needs_root
def test_the_reserve_on_a_small_tmpfs(start_server, tmp_path):
    with tmpfs(tmp_path / "small", "64m") as small:
        # The default reserve (100 MiB) is more than this disk has: no mail at all.
        server = start_server("--mail-dir", str(small))
        c = server.client()
        c.cmd("EHLO x")
        assert c.cmd("MAIL FROM:<a@smtpd.com>")[0] == 452
        server.stop()
        server = start_server(
            "--mail-dir", str(small), "--min-free-space", str(16 * MiB), "--max-message-size", str(64 * MiB)
        )
        c = server.client()
        c.cmd("EHLO x")
        # SIZE= counts at MAIL: 60 MB announced would leave less than 16 MiB of 64.
        assert c.cmd("MAIL FROM:<a@smtpd.com> SIZE=60000000")[0] == 452
        assert c.cmd("MAIL FROM:<a@smtpd.com> SIZE=1000")[0] == 250
        assert c.cmd("RSET")[0] == 250
        body = message(1 * MiB)
        assert c.mail("a@smtpd.com", [f"r{i}" for i in range(10)], body)[0] == 250  # 10 MiB: fits
        assert c.mail("a@smtpd.com", [f"s{i}" for i in range(60)], body)[0] == 452  # 60 MiB: would not
        assert len([p for p in small.rglob("*") if p.is_file()]) == 10
        assert free_space(small) > 16 * MiB
        assert c.cmd("QUIT")[0] == 221
        server.stop()


# -------------------------------------------------------------- mailboxes
def rcpt_codes(server: Server, recipients: list[str]) -> list[int]:
    c = server.client()
    c.cmd("EHLO x")
    assert c.cmd("MAIL FROM:<a@smtpd.com>")[0] == 250
    codes = [c.cmd(f"RCPT TO:<{r}>")[0] for r in recipients]
    c.cmd("QUIT")
    c.close()
    return codes


def test_mailboxes_auto_gives_any_valid_local_part_a_folder(start_server):
    server = start_server("--mailboxes", "auto")
    c = server.client()
    c.cmd("EHLO x")
    assert c.mail("a@smtpd.com", ["anyone", "Someone.Else@smtpd.com"], b"hi")[0] == 250
    assert len(server.stored("anyone")) == len(server.stored("someone.else")) == 1


def test_mailboxes_existing_accepts_only_folders_already_there(start_server):
    server = start_server("--mailboxes", "existing")
    (server.mail_dir / "alice").mkdir(parents=True)
    (server.mail_dir / "alias").symlink_to(server.mail_dir / "alice")  # not a folder of its own
    (server.mail_dir / "note").write_text("a file, not a folder")
    c = server.client()
    c.cmd("EHLO x")
    assert c.cmd("MAIL FROM:<a@smtpd.com>")[0] == 250
    assert c.cmd("RCPT TO:<bob@smtpd.com>") == (550, "5.1.1 Error: mailbox unavailable")
    assert c.cmd("RCPT TO:<alias>")[0] == 550
    assert c.cmd("RCPT TO:<note>")[0] == 550
    assert c.cmd("RCPT TO:<Alice@smtpd.com>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"hi\r\n.\r\n")
    assert c.reply()[0] == 250
    assert len(server.stored("alice")) == 1
    folders = sorted(p.name for p in server.mail_dir.iterdir() if p.name not in (".tmp", ".journal"))  # the store's spool and journals
    assert folders == ["alias", "alice", "note"]  # no new folder
    wait_until(lambda: server.log_count('refused "RCPT TO:<bob@smtpd.com>": 550 5.1.1') == 1, what="log")
    (server.mail_dir / "bob").mkdir()  # looked up at each RCPT: a new folder counts at once
    assert rcpt_codes(server, ["bob"]) == [250]


def test_mailboxes_file_lists_the_local_parts_and_is_read_again_on_reload(start_server, tmp_path):
    listing = tmp_path / "mailboxes.txt"
    listing.write_text("# the team\nAlice\n\n  carol  \n")
    server = start_server("--mailboxes", str(listing))
    assert rcpt_codes(server, ["alice", "ALICE@smtpd.com", "carol", "bob", "dave"]) == [250, 250, 250, 550, 550]
    assert not server.mail_dir.exists() or not (server.mail_dir / "bob").exists()
    listing.write_text("alice\nbob\n")
    assert ConfigLine(server.config_port).send("reload=1") == ["OK"]
    assert rcpt_codes(server, ["alice", "bob", "carol"]) == [250, 250, 550]


@pytest.mark.parametrize(
    "content, reason",
    [(None, "No such file or directory"), ("alice\nbad/name\n", ":2: not a valid local part: 'bad/name'")],
)
def test_an_unusable_mailboxes_file_is_refused_at_start(tmp_path, content, reason):
    listing = tmp_path / "list.txt"
    if content is not None:
        listing.write_text(content)
    run = subprocess.run(
        [sys.executable, "-m", "prefork_smtpd", "--mailboxes", str(listing), "-P", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 2 and reason in run.stderr, run.stderr
