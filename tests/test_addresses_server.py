"""Folders, plus-addresses, catch-all and address literals on a real server,
with real clients (swaks, smtplib) where one speaks the form."""

from __future__ import annotations

import email
import ipaddress
import mailbox
import shutil
import smtplib
import subprocess
import threading

import psutil
import pytest

from harness import wait_until, with_sitecustomize


def swaks(server, *args: str) -> str:
    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.port}", "--helo", "client.example", *args],
        capture_output=True, text=True, timeout=60,
    ).stdout
    return out


def delivered(server, folder: str, count: int = 1) -> list[email.message.Message]:
    wait_until(lambda: len(server.stored(folder)) >= count, what=f"{count} mail in {folder}")
    return [email.message_from_bytes(p.read_bytes()) for p in server.stored(folder)]


def test_folders_address_keeps_people_of_two_domains_apart(start_server):
    server = start_server("--domain", "a.example", "--domain", "b.example", "--folders", "address")
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        s.sendmail("x@a.example", ["Bob@A.Example", "bob@b.example", "carol"], b"Subject: hi\r\n\r\nhello\r\n")
    (a,) = delivered(server, "a.example/bob")
    (b,) = delivered(server, "b.example/bob")
    (c,) = delivered(server, "a.example/carol")  # a bare local part: the first --domain's
    assert (a["Delivered-To"], b["Delivered-To"], c["Delivered-To"]) == ("Bob@A.Example", "bob@b.example", "carol")
    assert not (server.mail_dir / "bob").exists()
    # Python's Maildir reader opens each folder as a mailbox.
    assert len(mailbox.Maildir(str(server.mail_dir / "a.example" / "bob"), create=False)) == 1


def test_catch_all_accepts_every_domain_and_sorts_them(start_server):
    server = start_server("--domain", "*", "--folders", "address")
    out = swaks(server, "--from", "app@staging.example", "--to", "user@Shop.Example,user@bank.example",
                "--body", "hi")
    assert "<** " not in out, out
    delivered(server, "shop.example/user")
    delivered(server, "bank.example/user")
    # Still no relay: an address literal that is not ours is refused.
    client = server.client()
    assert client.cmd("EHLO c")[0] == 250 and client.cmd("MAIL FROM:<a@b.example>")[0] == 250
    code, text = client.cmd("RCPT TO:<user@[192.0.2.77]>")
    assert (code, text[:5]) == (550, "5.7.1")


def test_catch_all_with_folders_local_mixes_domains_by_local_part(start_server):
    server = start_server("--domain", "*")
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        s.sendmail("app@x.example", ["bob@a.example"], b"Subject: 1\r\n\r\n1\r\n")
        s.sendmail("app@x.example", ["bob@b.example"], b"Subject: 2\r\n\r\n2\r\n")
    assert sorted(m["Delivered-To"] for m in delivered(server, "bob", 2)) == ["bob@a.example", "bob@b.example"]


def test_plus_addresses_go_to_an_existing_subfolder_or_the_inbox(start_server):
    server = start_server("--recipient-delimiter", "+", "--mailboxes", "existing")
    (server.mail_dir / "bob" / ".invoices").mkdir(parents=True)
    out = swaks(server, "--from", "a@smtpd.com", "--to", "bob+invoices@smtpd.com", "--body", "invoice 1")
    assert "<** " not in out, out
    (mail,) = delivered(server, "bob/.invoices")
    assert mail["Delivered-To"] == "bob+invoices@smtpd.com"
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        s.sendmail("a@smtpd.com", ["bob+receipts@smtpd.com"], b"Subject: r\r\n\r\nr\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            s.sendmail("a@smtpd.com", ["carol+bob@smtpd.com"], b"Subject: r\r\n\r\nr\r\n")
    assert refused.value.recipients["carol+bob@smtpd.com"][0] == 550  # carol has no mailbox
    (mail,) = delivered(server, "bob")
    assert mail["Delivered-To"] == "bob+receipts@smtpd.com"
    assert not (server.mail_dir / "bob" / ".receipts").exists()


def test_plus_folders_makes_the_subfolder(start_server):
    server = start_server("--recipient-delimiter", "+", "--plus-folders", "--folders", "address")
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        s.sendmail("a@smtpd.com", ["Bob+News@smtpd.com"], b"Subject: n\r\n\r\nn\r\n")
    (mail,) = delivered(server, "smtpd.com/bob/.news")
    assert mail["Delivered-To"] == "Bob+News@smtpd.com"
    box = mailbox.Maildir(str(server.mail_dir / "smtpd.com" / "bob"), create=False)
    assert box.list_folders() == ["news"]
    # bob's first mail was for a tag: his own Maildir is made with the folder, not left for later
    assert all((server.mail_dir / "smtpd.com" / "bob" / sub).is_dir() for sub in ("tmp", "new", "cur"))


def test_a_mailbox_or_folder_removed_while_the_server_runs_is_made_again(start_server):
    """An rm -r of a mailbox, or an IMAP DELETE of its folder, after mail went
    there: the worker had it checked, and refused the next mail once with 451."""
    server = start_server("--recipient-delimiter", "+", "--plus-folders", workers=1)
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        assert s.sendmail("a@smtpd.com", ["bob@smtpd.com", "bob+news@smtpd.com"], b"Subject: 1\r\n\r\n1\r\n") == {}
        shutil.rmtree(server.mail_dir / "bob" / ".news")
        assert s.sendmail("a@smtpd.com", ["bob+news@smtpd.com"], b"Subject: 2\r\n\r\n2\r\n") == {}
        shutil.rmtree(server.mail_dir / "bob")
        assert s.sendmail("a@smtpd.com", ["bob@smtpd.com"], b"Subject: 3\r\n\r\n3\r\n") == {}
    assert [m["Subject"] for m in delivered(server, "bob")] == ["3"]


def test_plus_folders_stop_at_max_plus_folders_and_the_rest_go_to_the_inbox(start_server):
    """A sender cannot make a folder per tag without end: past --max-plus-folders
    (the mailbox's own Maildir++ folders count too) a new tag's mail is the
    mailbox's, in its inbox, and the folder not made is logged."""
    server = start_server("--recipient-delimiter", "+", "--plus-folders", "--max-plus-folders", "3")
    (server.mail_dir / "bob" / ".Sent").mkdir(parents=True)  # the user's own, made by a mail reader
    tags = ["a", "b", "c", "d", "e"]
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        for tag in tags:
            s.sendmail("a@smtpd.com", [f"bob+{tag}@smtpd.com"], f"Subject: {tag}\r\n\r\n{tag}\r\n".encode())
        s.sendmail("a@smtpd.com", ["bob+f@smtpd.com", "bob+g@smtpd.com"], b"Subject: fg\r\n\r\nfg\r\n")
        s.sendmail("a@smtpd.com", ["bob+a@smtpd.com"], b"Subject: a2\r\n\r\na2\r\n")  # its folder exists
    box = mailbox.Maildir(str(server.mail_dir / "bob"), create=False)
    assert sorted(box.list_folders()) == ["Sent", "a", "b"]
    assert sorted(m["Subject"] for m in delivered(server, "bob/.a", 2)) == ["a", "a2"]
    inbox = sorted(m["Subject"] for m in delivered(server, "bob", 4))
    assert inbox == ["c", "d", "e", "fg"]  # one copy for the two tags of one mail
    wait_until(lambda: server.log_count("not made") == 5, what="the folders not made in the log")
    assert "bob: plus-folder .c not made, bob has 3 (--max-plus-folders): stored in its inbox" in server.log_text()


# Loaded by the server's interpreter at start (PYTHONPATH): the store's
# monotonic clock reads the number in a file the test writes, so the test
# moves it past PLUS_FULL_RECHECK without waiting. Workers are forked and keep it.
FROZEN_CLOCK = """
import os, time, types
import prefork_smtpd.delivery as delivery
_clock_file = os.environ["TEST_DELIVERY_CLOCK"]
_time = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
_time.monotonic = lambda: float(open(_clock_file).read())
delivery.time = _time
"""


def test_a_full_mailbox_is_counted_again_after_plus_full_recheck(start_server, tmp_path):
    """A folder the user removes frees a slot under --max-plus-folders only once
    PLUS_FULL_RECHECK seconds have passed since the mailbox was counted full."""
    from prefork_smtpd.delivery import PLUS_FULL_RECHECK

    clock = tmp_path / "clock"
    clock.write_text("1000")

    def set_clock(value: float) -> None:  # at once: the server may read the file at any moment
        (tmp_path / "clock.next").write_text(str(value))
        (tmp_path / "clock.next").rename(clock)

    # One worker: the time a mailbox was found full is kept per worker.
    server = start_server("--recipient-delimiter", "+", "--plus-folders", "--max-plus-folders", "2", workers=1,
                          env=with_sitecustomize(tmp_path / "site", FROZEN_CLOCK, TEST_DELIVERY_CLOCK=str(clock)))
    bob = server.mail_dir / "bob"
    with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as s:
        def send(tag: str) -> None:
            s.sendmail("a@smtpd.com", [f"bob+{tag}@smtpd.com"], f"Subject: {tag}\r\n\r\n{tag}\r\n".encode())

        for tag in ("a", "b", "c"):  # c: bob holds 2, found full at 1000
            send(tag)
        shutil.rmtree(bob / ".b")  # the user deletes a folder
        set_clock(1000 + PLUS_FULL_RECHECK - 0.5)
        send("d")  # within the window: still taken as full
        set_clock(1000 + PLUS_FULL_RECHECK + 0.5)
        send("e")  # past it: counted again, one slot free
    box = mailbox.Maildir(str(bob), create=False)
    assert sorted(box.list_folders()) == ["a", "e"]
    assert [m["Subject"] for m in delivered(server, "bob/.e")] == ["e"]
    assert sorted(m["Subject"] for m in delivered(server, "bob", 2)) == ["c", "d"]
    wait_until(lambda: server.log_count("not made") == 2, what="the folders not made in the log")
    assert "bob: plus-folder .d not made, bob has 2 (--max-plus-folders): stored in its inbox" in server.log_text()


# Loaded by the server's interpreter at start (PYTHONPATH): a delivery
# thread listing a folder by descriptor (the store's count of plus-folders)
# takes its listing, notes it in a file, then waits a second before going
# on: the time another delivery has to count the same folders.
SLOW_COUNT = """
import os, threading, time
_scandir = os.scandir
_marker = os.environ["TEST_COUNT_MARKER"]

class _Listing:
    def __init__(self, entries):
        self.entries = entries
    def __enter__(self):
        return iter(self.entries)
    def __exit__(self, *exc):
        return False
    def __iter__(self):
        return iter(self.entries)

def scandir(path="."):
    if not isinstance(path, int) or not threading.current_thread().name.startswith("delivery"):
        return _scandir(path)
    with _scandir(path) as entries:
        listing = _Listing(list(entries))
    with open(_marker, "a") as f:
        f.write("counted\\n")
    time.sleep(1.0)
    return listing

os.scandir = scandir
"""


def test_max_plus_folders_holds_for_deliveries_that_count_at_once(start_server, tmp_path):
    """Two deliveries (two threads here; two workers alike) making a folder
    in one mailbox at once: each counted the folders, then made its own, so
    both saw room for one more and the mailbox passed --max-plus-folders.
    Counted and made under a lock on the mailbox, the second counts the
    first's folder: one folder, and the other mail in the inbox."""
    marker = tmp_path / "counted"
    server = start_server("--recipient-delimiter", "+", "--plus-folders", "--max-plus-folders", "1",
                          "--delivery-threads", "2", workers=1,
                          env=with_sitecustomize(tmp_path / "site", SLOW_COUNT, TEST_COUNT_MARKER=str(marker)))
    (server.mail_dir / "bob").mkdir(parents=True)  # a mailbox to count in

    def send(tag: str) -> None:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as s:
            s.sendmail("a@smtpd.com", [f"bob+{tag}@smtpd.com"], f"Subject: {tag}\r\n\r\n{tag}\r\n".encode())

    first = threading.Thread(target=send, args=("a",))
    first.start()
    wait_until(marker.exists, what="the first delivery counting bob's folders")
    send("b")  # while the first one has counted and not yet made its folder
    first.join()
    folders = sorted(p.name for p in (server.mail_dir / "bob").iterdir() if p.name.startswith("."))
    assert len(folders) == 1, folders
    assert len(server.stored(f"bob/{folders[0]}")) == 1 and len(server.stored("bob")) == 1
    wait_until(lambda: server.log_count("not made") == 1, what="the folder not made in the log")


def test_postmaster_is_delivered_whatever_mailboxes_says(start_server):
    server = start_server("--mailboxes", "existing")
    client = server.client()
    assert client.cmd("EHLO c")[0] == 250
    assert client.cmd("MAIL FROM:<>")[0] == 250
    assert client.cmd("RCPT TO:<bob@smtpd.com>")[0] == 550
    assert client.cmd("RCPT TO:<Postmaster>")[0] == 250
    assert client.cmd("RCPT TO:<POSTMASTER@smtpd.com>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: p\r\n\r\np\r\n.\r\n")
    assert client.reply()[0] == 250
    delivered(server, "postmaster")


def test_postmaster_at_made_up_domains_reaches_the_hosts_postmaster(start_server):
    """Under the catch-all with --mailboxes existing, postmaster@<any domain>
    is still accepted (RFC 5321 4.5.1), but a domain with no postmaster
    folder of its own gets the host's: a client cannot make the server
    create a folder for every domain it makes up."""
    server = start_server("--domain", "smtpd.com", "--domain", "*", "--folders", "address", "--mailboxes", "existing")
    (server.mail_dir / "b.example" / "postmaster").mkdir(parents=True)  # a domain with its own
    client = server.client()
    assert client.cmd("EHLO c")[0] == 250
    assert client.cmd("MAIL FROM:<>")[0] == 250
    for i in range(5):
        assert client.cmd(f"RCPT TO:<postmaster@made-up-{i}.example>")[0] == 250
    assert client.cmd("RCPT TO:<bob@made-up-0.example>")[0] == 550
    assert client.cmd("RCPT TO:<Postmaster@b.example>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: p\r\n\r\np\r\n.\r\n")
    assert client.reply()[0] == 250
    delivered(server, "smtpd.com/postmaster")
    delivered(server, "b.example/postmaster")
    assert sorted(p.name for p in server.mail_dir.iterdir() if not p.name.startswith(".")) == ["b.example", "smtpd.com"]


def test_address_literals_of_the_listener_are_ours(start_server):
    server = start_server()  # listens on 127.0.0.1 only
    out = swaks(server, "--from", "a@smtpd.com", "--to", "postmaster@[127.0.0.1]", "--body", "hi")
    assert "<** " not in out, out
    (mail,) = delivered(server, "postmaster")
    assert mail["Delivered-To"] == "postmaster@[127.0.0.1]"
    out = swaks(server, "--from", "a@smtpd.com", "--to", "postmaster@[127.0.0.2]", "--body", "hi")
    assert "<** 550 5.7.1" in out, out  # loopback, but not an address this listener has


def _host_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    found = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family.name in ("AF_INET", "AF_INET6"):
                found.append(ipaddress.ip_address(entry.address.split("%")[0]))
    return found


def test_a_wildcard_listener_owns_every_address_of_the_host(start_server):
    server = start_server(listen=None)
    client = server.client()
    assert client.cmd("EHLO c")[0] == 250 and client.cmd("MAIL FROM:<>")[0] == 250
    for address in _host_addresses():
        literal = f"[{address}]" if address.version == 4 else f"[IPv6:{address}]"
        assert client.cmd(f"RCPT TO:<bob@{literal}>")[0] == 250, literal
    assert client.cmd("RCPT TO:<bob@[192.0.2.77]>")[0] == 550
    assert client.cmd("RCPT TO:<bob@[IPv6:2001:db8::77]>")[0] == 550


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--folders", "domains"], "--folders must be local or address"),
        (["--recipient-delimiter", "/"], "--recipient-delimiter takes"),
        (["--folders", "address", "--domain", "bad_domain"], "is not a domain name"),
    ],
)
def test_bad_address_settings_refuse_the_start(start_server, flags, message):
    server = start_server(*flags, wait=False)
    assert server.proc.wait(timeout=60) == 2
    assert message in server.output()


def test_address_settings_from_the_config_file(start_server, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('folders = "address"\nrecipient_delimiter = "+"\nplus_folders = true\ndomain = ["*"]\n')
    server = start_server("--config", str(config))
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        s.sendmail("a@x.example", ["eve+spam@Any.example"], b"Subject: s\r\n\r\ns\r\n")
    delivered(server, "any.example/eve/.spam")
