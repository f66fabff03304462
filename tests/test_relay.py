"""Relay end to end: who may relay, the durable queue, the queue runner, its
retries, bounces and crash safety, against real receiving MTAs on free
ports (a second prefork-smtpd, or a scripted aiosmtpd where a test needs
the next hop to answer 4xx or 5xx on cue), and MX lookups against a tiny
DNS server speaking the real wire protocol (dnspython)."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import os
import signal
import smtplib
import subprocess
import sys
import threading
import urllib.request

import psutil
import pytest
from harness import free_port, wait_until
from relay_peers import Receiver, Script, TinyDNS

from prefork_smtpd import dsn
from prefork_smtpd.queue import Queue
from prefork_smtpd.runner import PermanentFailure, TemporaryFailure, host_addresses, make_resolver, mx_levels
from prefork_smtpd.users import hash_password

MESSAGE = b"From: alice@smtpd.com\r\nSubject: going out\r\n\r\nhello out there\r\n.a dotted line\r\n"
FAST_RETRIES = ("--queue-retry-min", "1", "--queue-retry-max", "2")


@pytest.fixture
def receiver():
    receivers: list[Receiver] = []

    def start(script: Script | None = None, **options) -> Receiver:
        r = Receiver(script, **options)
        receivers.append(r)
        return r

    yield start
    for r in receivers:
        r.stop()


def queue_of(server) -> Queue:
    return Queue(str(server.root / "queue"))


def runner_pid(server) -> int | None:
    for pid in server.worker_pids():
        try:
            if "queue runner" in " ".join(psutil.Process(pid).cmdline()):
                return pid
        except psutil.NoSuchProcess:
            pass
    return None


def config(server, line: str) -> list[str]:
    import socket

    with socket.create_connection(("127.0.0.1", server.config_port), timeout=30) as s:
        f = s.makefile("rb")
        s.sendall(line.encode() + b"\r\n")
        lines = []
        while True:
            text = f.readline().decode().rstrip("\r\n")
            lines.append(text)
            if text == "OK" or text.startswith("ERR"):
                return lines


def send(server, recipients, rcpt_options=(), mail_options=(), sender="alice@smtpd.com") -> dict:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        return client.sendmail(sender, recipients, MESSAGE, mail_options=list(mail_options),
                               rcpt_options=list(rcpt_options))


def parse_stored(path) -> email.message.EmailMessage:
    return email.message_from_bytes(path.read_bytes(), policy=email.policy.default)


# ---------------------------------------------------------------- who may relay
def test_no_open_relay_for_an_untrusted_address(start_server):
    """Neither a default server nor one trusting another network relays for 127.0.0.1."""
    for flags in ((), ("--relay-networks", "10.0.0.0/8,2001:db8::/32")):
        server = start_server(*flags)
        c = server.client()
        c.cmd("EHLO client.example")
        assert c.cmd("MAIL FROM:<alice@smtpd.com>")[0] == 250
        assert c.cmd("RCPT TO:<bob@example.org>") == (550, "5.7.1 Error: relay access denied; recipient domain not served here")
        assert c.cmd("RCPT TO:<bob@smtpd.com>")[0] == 250
        c.close()
        assert not queue_of(server).ids()


def test_a_trusted_network_relays_an_address_literal_never(start_server):
    server = start_server("--relay-networks", "127.0.0.0/8")
    c = server.client()
    c.cmd("EHLO client.example")
    c.cmd("MAIL FROM:<alice@smtpd.com>")
    # Not our address: refused as a relay attempt; the queue never aims at a host the client picks.
    assert c.cmd("RCPT TO:<bob@[192.0.2.1]>") == (550, "5.7.1 Error: mail to an address literal is never relayed")
    assert c.cmd("RCPT TO:<bob@example.org>")[0] == 250
    c.close()


def test_an_authenticated_user_may_relay_and_an_anonymous_one_may_not(start_server, receiver, tmp_path):
    hop = receiver()
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('secret words')}\n")
    server = start_server("--users", str(users), "--relay-host", f"127.0.0.1:{hop.port}", *FAST_RETRIES)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("alice@smtpd.com", ["bob@example.org"], MESSAGE)
        client.login("alice", "secret words")
        assert client.sendmail("alice@smtpd.com", ["bob@example.org"], MESSAGE) == {}
    wait_until(lambda: hop.handler.copies_for("bob@example.org") == 1, what="the relayed mail")


# ------------------------------------------------- through a real prefork-smtpd
def test_mixed_recipients_local_once_and_relayed_once_with_dsn_passed_on(start_server):
    """A second prefork-smtpd is the next hop: it offers DSN, so NOTIFY, ORCPT and ENVID go on."""
    hop = start_server("--domain", "example.org", "--domain", "smtpd.com")
    server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{hop.port}", *FAST_RETRIES)
    refused = send(
        server, ["bob@smtpd.com", "carol@example.org"], mail_options=["RET=HDRS", "ENVID=trip+2042"],
        rcpt_options=["NOTIFY=FAILURE", "ORCPT=rfc822;" + dsn.xtext_encode("Carol+x@Example.org")],
    )
    assert refused == {}
    (local,) = server.stored("bob")
    wait_until(lambda: hop.stored("carol"), what="the relayed copy at the next hop")
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
    (relayed,) = hop.stored("carol")
    msg = parse_stored(relayed)
    assert msg["Subject"] == "going out" and ".a dotted line" in msg.get_content()
    assert msg["Original-Envelope-Id"] == "trip 42"  # ENVID passed on, decoded there
    assert msg["Original-Recipient"] == "rfc822;Carol+x@Example.org"  # ORCPT passed on
    assert msg["Return-Path"] == "<alice@smtpd.com>"
    received = msg.get_all("Received")
    assert any("by mx.test (prefork-smtpd)" in r for r in received) and len(received) == 2  # our hop's trace too
    assert not hop.stored("bob") and len(server.stored("bob")) == 1
    assert parse_stored(local)["Subject"] == "going out"
    wait_until(lambda: server.log_count("sent via 127.0.0.1") == 1, what="the runner's log line")
    wait_until(lambda: "queued for carol@example.org" in server.log_text(), what="the worker's log line")


# --------------------------------------------- scripted next hop: 4xx, 5xx, DSN
def test_4xx_is_retried_with_backoff_then_delivered_once(start_server, receiver):
    hop = receiver(Script(rcpt={"slow@example.org": ["451 4.7.1 greylisted", "451 4.7.1 greylisted", "250 ok"]}))
    server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{hop.port}", *FAST_RETRIES)
    assert send(server, ["slow@example.org"]) == {}
    wait_until(lambda: hop.handler.copies_for("slow@example.org") == 1, what="delivery after the retries")
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
    assert hop.handler.rcpt_calls["slow@example.org"] == 3
    wait_until(lambda: server.log_count("deferred, retry in 2 s: 451 4.7.1 greylisted") == 1, what="log")  # doubled
    assert server.log_count("deferred, retry in 1 s: 451 4.7.1 greylisted") == 1
    assert not server.stored("alice")  # no bounce, no delay notice


def test_5xx_bounces_to_the_local_sender_as_a_parseable_dsn(start_server, receiver):
    hop = receiver(Script(rcpt={"nobody@example.org": ["550 5.1.1 no such user here"]}))
    server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{hop.port}", *FAST_RETRIES)
    assert send(server, ["nobody@example.org", "fine@example.org"], mail_options=["ENVID=b1", "RET=FULL"],
                rcpt_options=["ORCPT=rfc822;nobody@example.org"]) == {}
    (bounce,) = wait_until(lambda: server.stored("alice"), what="the bounce in the sender's mailbox")
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
    assert hop.handler.copies_for("fine@example.org") == 1 and hop.handler.copies_for("nobody@example.org") == 0
    msg = parse_stored(bounce)
    assert msg["Return-Path"] == "<>" and msg.get_content_type() == "multipart/report"
    text, status, original = msg.get_payload()
    per_message, (rcpt,) = status.get_payload()[0], status.get_payload()[1:]
    assert per_message["Original-Envelope-Id"] == "b1"
    assert rcpt["Final-Recipient"] == "rfc822; nobody@example.org" and rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1" and rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user here"
    assert rcpt["Remote-MTA"] == "dns; 127.0.0.1"
    assert original.get_content_type() == "message/rfc822"  # RET=FULL
    assert original.get_payload()[0]["Subject"] == "going out"


def test_a_mail_relayed_back_to_this_server_stops_at_max_hops_and_bounces(start_server, tmp_path):
    """A next hop that leads back here (a domain's MX pointing at us): each pass adds a
    Received field, and the pass over --max-hops is refused with 554 5.4.6 and bounced.
    Without the count the mail went round without end, one fsynced copy per pass."""
    conf = tmp_path / "loop.toml"
    conf.write_text('relay_networks = "127.0.0.0/8"\nmax_hops = 4\n')
    server = start_server("--config", str(conf), *FAST_RETRIES)
    # Our own port is known only now: point the relay at ourselves and reload.
    conf.write_text(conf.read_text() + f'relay_host = "127.0.0.1:{server.port}"\n')
    assert config(server, "reload=1")[-1] == "OK"
    assert send(server, ["round@example.org"]) == {}
    (bounce,) = wait_until(lambda: server.stored("alice"), what="the bounce of the looping mail")
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
    rcpt = parse_stored(bounce).get_payload()[1].get_payload()[1]
    assert rcpt["Status"] == "5.4.6" and "too many hops (more than 4 Received" in rcpt["Diagnostic-Code"]
    # Four passes were taken (the mail arrived with 0 to 3 Received fields, then 4 as its
    # fifth), the fifth refused once; the bounce itself is stored here, not relayed.
    wait_until(lambda: server.log_count("<round@example.org> bounced: 554 5.4.6") == 1, what="the bounce logged")
    wait_until(lambda: server.log_count("<round@example.org> sent via") == 4, what="four passes logged")
    assert server.log_count("refused message from <alice@smtpd.com> to round@example.org: 554 5.4.6") == 1


BINARY = b"From: alice@smtpd.com\r\nSubject: raw\r\n\r\nNUL \x00, bare CR \r, bare LF \n, high \xff\r\n.dot\r\n"


def send_binary(server, recipient: str, body: bytes = BINARY, options: str = "BODY=BINARYMIME") -> None:
    """A mail sent as BDAT (smtplib has no BDAT)."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        f = s.makefile("rb")

        def reply() -> bytes:
            while (line := f.readline())[3:4] == b"-":
                pass
            return line

        reply()
        for command in (b"EHLO client.example", f"MAIL FROM:<alice@smtpd.com> {options}".encode(),
                        f"RCPT TO:<{recipient}>".encode()):
            s.sendall(command + b"\r\n")
            assert reply()[:1] == b"2", command
        s.sendall(b"BDAT %d LAST\r\n" % len(body) + body)
        assert reply()[:3] == b"250"


def test_a_binary_mail_is_relayed_with_bdat_octet_for_octet(start_server):
    """BODY=BINARYMIME goes on only as BDAT (RFC 3030): as DATA its bare CR and LF
    became CRLF, its leading dots doubled, and no BODY= told the next hop what it was."""
    hop = start_server("--domain", "example.org", "--domain", "smtpd.com")
    server = start_server(*relay_to(hop.port))
    send_binary(server, "bin@example.org")
    (stored,) = wait_until(lambda: hop.stored("bin"), what="the binary mail at the next hop")
    data = stored.read_bytes()
    assert data.endswith(BINARY) and data.count(b"Received: ") == 2, data
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")


def test_a_binary_mail_to_a_next_hop_without_binarymime_bounces_5_6_3(start_server, receiver):
    hop = receiver()  # aiosmtpd: no CHUNKING, no BINARYMIME
    server = start_server(*relay_to(hop.port))
    send_binary(server, "bin@example.org", options="BODY=BINARYMIME RET=FULL")
    (bounce,) = wait_until(lambda: server.stored("alice"), what="the bounce")
    assert hop.handler.copies_for("bin@example.org") == 0 and b"BINARYMIME" not in hop.wire()
    raw = bounce.read_bytes()
    notice = parse_stored(bounce)
    rcpt = notice.get_payload()[1].get_payload()[1]
    assert rcpt["Status"] == "5.6.3" and "offers no BINARYMIME" in rcpt["Diagnostic-Code"]
    # The original, quoted whole, is labelled for what it is (RFC 2045: NUL and bare CR/LF are no 8bit).
    assert b"Content-Transfer-Encoding: binary\r\n" in raw and BINARY in raw


def test_8bit_mail_is_labelled_body_8bitmime_to_a_next_hop_that_offers_it(start_server, receiver):
    hop = receiver()
    server = start_server(*relay_to(hop.port))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        body = "From: alice@smtpd.com\r\nSubject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()
        assert client.sendmail("alice@smtpd.com", ["eight@example.org"], body, mail_options=["BODY=8BITMIME"]) == {}
        assert client.sendmail("alice@smtpd.com", ["seven@example.org"], MESSAGE) == {}
    wait_until(lambda: hop.handler.copies_for("seven@example.org") == 1, what="both mails at the next hop")
    wait_until(lambda: hop.handler.copies_for("eight@example.org") == 1, what="both mails at the next hop")
    wire = hop.wire()
    assert b"MAIL FROM:<alice@smtpd.com> BODY=8BITMIME" in wire and wire.count(b"BODY=") == 1


def test_a_recipient_named_twice_is_relayed_once(start_server, receiver):
    hop = receiver()
    server = start_server(*relay_to(hop.port))
    send(server, ["dup@example.org", "dup@EXAMPLE.org", "Dup@example.org", "dup@example.org"])
    # One domain in U-labels, A-labels and decomposed: one recipient.
    send(server, ["bob@b\u00fccher.example", "bob@xn--bcher-kva.example", "bob@bu\u0308cher.example"],
         mail_options=["SMTPUTF8"])
    wait_until(lambda: not queue_of(server).ids() and len(hop.handler.received) == 2, what="the queue to empty")
    first, second = hop.handler.received
    assert first.recipients == ["dup@example.org", "Dup@example.org"]  # the local part is the next hop's to fold
    assert len(second.recipients) == 1


def test_8bit_mail_to_a_next_hop_without_8bitmime_goes_in_7_bits_or_bounces_5_6_3(start_server, receiver):
    """RFC 6152 3: no 8-bit octets to a next hop that does not offer 8BITMIME.
    8-bit text goes quoted-printable; 8-bit octets in a header have no 7-bit
    form here (their charset is unknown): that mail is returned, 5.6.3."""
    hop = receiver(enable_SMTPUTF8=False, decode_data=True)  # aiosmtpd then offers no 8BITMIME
    server = start_server(*relay_to(hop.port))
    text = "From: alice@smtpd.com\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n" \
           "Content-Transfer-Encoding: 8bit\r\nSubject: plain\r\n\r\nna\u00efve caf\u00e9\r\n"
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        assert client.sendmail("alice@smtpd.com", ["eight@example.org"], text.encode(), mail_options=["BODY=8BITMIME"]) == {}
        raw_subject = "From: alice@smtpd.com\r\nSubject: caf\u00e9\r\n\r\nhi\r\n".encode()
        assert client.sendmail("alice@smtpd.com", ["raw@example.org"], raw_subject, mail_options=["BODY=8BITMIME"]) == {}
    wait_until(lambda: hop.handler.copies_for("eight@example.org") == 1, what="the converted mail at the next hop")
    (bounce,) = wait_until(lambda: server.stored("alice"), what="the bounce of the other")
    wire = hop.wire()
    assert wire.isascii() and b"BODY=" not in wire and hop.handler.copies_for("raw@example.org") == 0
    relayed = email.message_from_bytes(hop.handler.received[0].data, policy=email.policy.default)
    assert relayed["Content-Transfer-Encoding"] == "quoted-printable" and relayed["Subject"] == "plain"
    assert relayed.get_payload(decode=True) == "na\u00efve caf\u00e9\r\n".encode()
    rcpt = parse_stored(bounce).get_payload()[1].get_payload()[1]
    assert rcpt["Status"] == "5.6.3" and "offers no 8BITMIME" in rcpt["Diagnostic-Code"]
    assert "8-bit octets in a header" in rcpt["Diagnostic-Code"]


def test_notify_never_and_the_null_sender_get_no_bounce(start_server, receiver):
    hop = receiver(Script(rcpt={"nobody@example.org": ["550 5.1.1 no such user"]}))
    server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{hop.port}", *FAST_RETRIES)
    send(server, ["nobody@example.org"], rcpt_options=["NOTIFY=NEVER"])
    send(server, ["nobody@example.org"], sender="")
    wait_until(lambda: server.log_count("bounced: 550 5.1.1") == 2, what="both bounced")
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
    assert not server.stored("alice") and not server.stored("mailer-daemon")


def test_lifetime_over_bounces_with_4_4_7(start_server, receiver):
    hop = receiver(Script(rcpt={"later@example.org": ["452 4.2.2 mailbox full"]}))
    server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{hop.port}",
                          "--queue-lifetime", "2", *FAST_RETRIES)
    send(server, ["later@example.org"])
    (bounce,) = wait_until(lambda: server.stored("alice"), what="the expiry bounce")
    _, (rcpt,) = parse_stored(bounce).get_payload()[1].get_payload()[0], parse_stored(bounce).get_payload()[1].get_payload()[1:]
    assert rcpt["Status"] == "4.4.7" and "452 4.2.2 mailbox full" in rcpt["Diagnostic-Code"]
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")


def test_a_failure_notice_that_cannot_be_stored_is_given_up_at_the_lifetime(start_server, receiver):
    """The next hop refuses for good; the sender's mailbox is a file, so its
    failure notice cannot be stored. The mail is tried again within its
    lifetime, then the notice is given up with a line saying so and the
    mail leaves the queue (it stayed there, retried, for ever)."""
    hop = receiver(Script(rcpt={"nobody@example.org": ["550 5.1.1 no such user"]}))
    server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{hop.port}",
                          "--queue-lifetime", "2", *FAST_RETRIES)
    server.mail_dir.mkdir(exist_ok=True)
    (server.mail_dir / "alice").write_text("not a mailbox\n")
    send(server, ["nobody@example.org"])
    wait_until(lambda: server.log_count("the failed notice could not be stored") >= 1, what="the first try")
    wait_until(lambda: server.log_count("given up after 2 s in the queue"), timeout=60, what="the notice given up")
    wait_until(lambda: not queue_of(server).ids(), timeout=60, what="the queue to empty")
    assert server.log_count("<nobody@example.org> bounced: 550 5.1.1 no such user") == 1
    assert (server.mail_dir / "alice").read_text() == "not a mailbox\n"
    assert "Traceback" not in server.log_text()


def test_delayed_notice_sent_once_per_recipient_even_across_a_runner_restart(start_server, receiver):
    """The next hop answers 4xx forever. Past --delay-warning-time the sender gets one "delayed"
    report for the recipients that asked for it (NOTIFY=DELAY, or no NOTIFY: RFC 3461 lets the
    server choose; we warn), none for NOTIFY=FAILURE; more deferrals and a killed runner send no second one."""
    later = ["451 4.2.0 try later"]
    hop = receiver(Script(rcpt={"d@example.org": later, "f@example.org": later, "p@example.org": later}))
    server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{hop.port}",
                          "--delay-warning-time", "1", *FAST_RETRIES)
    assert send(server, ["d@example.org"], mail_options=["ENVID=slow1"], rcpt_options=["NOTIFY=DELAY,FAILURE"]) == {}
    assert send(server, ["f@example.org"], rcpt_options=["NOTIFY=FAILURE"]) == {}
    assert send(server, ["p@example.org"]) == {}
    notices = wait_until(lambda: len(server.stored("alice")) == 2 and server.stored("alice"), timeout=60,
                         what="the two delayed notices")
    recipients = set()
    for path in notices:
        msg = parse_stored(path)
        assert msg["Return-Path"] == "<>" and msg.get_content_type() == "multipart/report"
        per_message, rcpt = msg.get_payload()[1].get_payload()
        assert rcpt["Action"] == "delayed" and rcpt["Status"] == "4.2.0"
        assert rcpt["Diagnostic-Code"] == "smtp; 451 4.2.0 try later"
        recipients.add(rcpt["Final-Recipient"])
        if rcpt["Final-Recipient"] == "rfc822; d@example.org":
            assert per_message["Original-Envelope-Id"] == "slow1"
    assert recipients == {"rfc822; d@example.org", "rfc822; p@example.org"}
    # Kill the runner: its successor must find the notices recorded, not send them again.
    old = runner_pid(server)
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: runner_pid(server) not in (None, old), timeout=60, what="the runner's restart")
    calls = hop.handler.rcpt_calls["p@example.org"]
    wait_until(lambda: hop.handler.rcpt_calls["p@example.org"] >= calls + 2, timeout=60, what="two more deferrals")
    assert len(server.stored("alice")) == 2
    assert len(queue_of(server).ids()) == 3  # still queued, still retried


def test_delay_warning_time_0_sends_no_delayed_notice(start_server, receiver):
    hop = receiver(Script(rcpt={"d@example.org": ["451 4.2.0 try later"]}))
    server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{hop.port}",
                          "--delay-warning-time", "0", *FAST_RETRIES)
    assert send(server, ["d@example.org"], rcpt_options=["NOTIFY=DELAY,FAILURE"]) == {}
    wait_until(lambda: hop.handler.rcpt_calls.get("d@example.org", 0) >= 3, timeout=60, what="three deferrals")
    assert not server.stored("alice") and server.log_count("delayed notice") == 0


def test_relayed_notice_when_the_next_hop_offers_no_dsn(start_server, receiver):
    hop = receiver()  # aiosmtpd offers no DSN
    server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{hop.port}", *FAST_RETRIES)
    send(server, ["dave@example.org"], rcpt_options=["NOTIFY=SUCCESS"])
    (notice,) = wait_until(lambda: server.stored("alice"), what="the relayed notice")
    rcpt = parse_stored(notice).get_payload()[1].get_payload()[1]
    assert rcpt["Action"] == "relayed"
    assert hop.handler.received[0].rcpt_options == [[]]  # nothing it does not know was sent


# ----------------------------------------------------------------- crash safety
def test_relay_max_addresses_bounds_the_hosts_looked_up_and_addresses_tried(start_server, receiver, tmp_path):
    """A domain with many dead (or slow to resolve) MX hosts must not hold a delivery slot
    for each: at most --relay-max-addresses hosts looked up, as many addresses tried, a
    repeated address tried once."""
    hop = receiver()
    dns_server = TinyDNS({
        ("many.test", "MX"): ["10 a.many.test.", "20 b.many.test.", "30 c.many.test.", "40 d.many.test.",
                              "50 live.many.test."],
        # Nothing listens on these loopback addresses at the hop's port: refused at once.
        ("a.many.test", "A"): ["127.0.0.2"], ("b.many.test", "A"): ["127.0.0.2"],  # the same address twice
        ("c.many.test", "A"): ["127.0.0.3"], ("d.many.test", "A"): ["127.0.0.4"],
        ("live.many.test", "A"): ["127.0.0.1"],
    })
    try:
        conf = tmp_path / "relay.toml"
        conf.write_text(f'relay_networks = "127.0.0.0/8"\nrelay_nameserver = "127.0.0.1:{dns_server.port}"\n'
                        f"relay_port = {hop.port}\nrelay_max_addresses = 3\nqueue_retry_min = 1\n"
                        "queue_retry_max = 1\n")
        server = start_server("--config", str(conf))
        assert send(server, ["far@many.test"]) == {}
        wait_until(lambda: server.log_count("(stopped after 3 next hops: --relay-max-addresses)") >= 2,
                   what="two attempts stopped at the limit")
        assert hop.handler.copies_for("far@many.test") == 0  # the fifth MX is past the limit
        log = server.log_text()
        first = log[: log.index("(stopped after 3 next hops")].splitlines()[:-1]  # the tries before it
        tries = [line for line in first if "SMTPConnectError" in line]
        # a, b (the same address: not tried again) and c looked up; d never.
        assert [sum(f"[127.0.0.{n}]:{hop.port}:" in t for t in tries) for n in (2, 3, 4)] == [1, 1, 0], tries
        assert ("c.many.test.", "A") in dns_server.questions and ("d.many.test.", "A") not in dns_server.questions
        # Five hosts looked up, four addresses tried: the live MX is reached.
        conf.write_text(conf.read_text().replace("relay_max_addresses = 3", "relay_max_addresses = 5"))
        assert config(server, "reload=1")[-1] == "OK"
        wait_until(lambda: hop.handler.copies_for("far@many.test") == 1, what="delivery to the live MX")
        wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
    finally:
        dns_server.close()


def test_many_mx_names_for_one_address_cost_at_most_the_budget_in_lookups(start_server):
    """30 MX hosts, all one unreachable address: one address tried, and the lookups stop
    at the budget (every host was looked up before, each up to a DNS timeout)."""
    records = {("thirty.test", "MX"): [f"{i} mx{i}.thirty.test." for i in range(30)]}
    records.update({(f"mx{i}.thirty.test", "A"): ["127.0.0.9"] for i in range(30)})
    dns_server = TinyDNS(records)
    try:
        server = start_server("--relay-networks", "127.0.0.0/8", "--relay-nameserver", f"127.0.0.1:{dns_server.port}",
                              "--relay-port", str(free_port()), "--queue-retry-min", "600")
        assert send(server, ["x@thirty.test"]) == {}
        wait_until(lambda: server.log_count("<x@thirty.test> deferred") == 1, what="the attempt deferred")
        assert server.log_count("(stopped after 5 next hops: --relay-max-addresses)") == 1
        looked_up = {name for name, kind in dns_server.questions if kind == "A"}
        assert looked_up == {f"mx{i}.thirty.test." for i in range(5)}, sorted(looked_up)
        assert server.log_count("[127.0.0.9]") == 2  # one try (and the deferral quoting it)
    finally:
        dns_server.close()


@pytest.mark.parametrize("records", [
    {("self.test", "MX"): ["10 mx.self.test."], ("mx.self.test", "A"): ["127.0.0.1"]},
    # Any loopback address, or an IPv4-mapped one, reaches a listener on every address.
    {("self.test", "MX"): ["10 mx.self.test."], ("mx.self.test", "A"): ["127.0.0.2"]},
    {("self.test", "MX"): ["10 mx.self.test."], ("mx.self.test", "AAAA"): ["::ffff:127.0.0.3"]},
    {("self.test", "MX"): ["10 mx.self.test."], ("mx.self.test", "A"): ["0.0.0.0"]},
    # At the best preference beside another host, listed first or last: never tried.
    {("self.test", "MX"): ["10 other.self.test.", "10 mx.self.test."], ("mx.self.test", "A"): ["127.0.0.1"],
     ("other.self.test", "A"): ["127.0.0.9"]},
    {("self.test", "MX"): ["10 mx.self.test.", "10 other.self.test."], ("mx.self.test", "A"): ["127.0.0.1"],
     ("other.self.test", "A"): ["127.0.0.9"]},
], ids=["127.0.0.1", "127.0.0.2", "mapped", "0.0.0.0", "equal-preference-after", "equal-preference-before"])
def test_an_mx_that_is_this_server_is_never_sent_to(start_server, tmp_path, records, request):
    """RFC 5321 5.1: a domain whose best MX is this server would only bring the mail
    back; it bounces at once (5.4.6) instead of going round until --max-hops."""
    dns_server = TinyDNS(records)
    try:
        conf = tmp_path / "relay.toml"
        conf.write_text(f'relay_networks = "127.0.0.0/8"\nrelay_nameserver = "127.0.0.1:{dns_server.port}"\n')
        # 127.0.0.2 and ::ffff:127.0.0.3 reach a listener on every address, not one on 127.0.0.1 alone.
        every_address = request.node.callspec.id in ("127.0.0.2", "mapped")
        server = start_server("--config", str(conf), *FAST_RETRIES, **({"listen": None} if every_address else {}))
        conf.write_text(conf.read_text() + f"relay_port = {server.port}\n")  # our own port: known only now
        assert config(server, "reload=1")[-1] == "OK"
        assert send(server, ["bob@self.test"]) == {}
        (bounce,) = wait_until(lambda: server.stored("alice"), what="the bounce")
        rcpt = parse_stored(bounce).get_payload()[1].get_payload()[1]
        assert rcpt["Status"] == "5.4.6"
        assert "mail for self.test loops back to myself: its MX host mx.self.test is this server" in rcpt["Diagnostic-Code"]
        wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
        assert server.log_count("sent via") == 0 and server.log_count("Received header fields") == 0
        assert server.log_count("127.0.0.9") == 0  # the other host of the level never tried
    finally:
        dns_server.close()


@pytest.mark.slow
def test_runner_sigkilled_mid_delivery_retries_only_the_unacknowledged(start_server, receiver):
    """Two recipient domains, two transactions: the first acknowledged, the runner
    killed while the second's DATA is held. After the restart only the second is sent."""
    script = Script(hold_data_for={"second@b.test"})
    hop = receiver(script)
    dns_server = TinyDNS({("a.test", "MX"): ["10 mx.a.test."], ("mx.a.test", "A"): ["127.0.0.1"],
                          ("b.test", "MX"): ["10 mx.b.test."], ("mx.b.test", "A"): ["127.0.0.1"]})
    try:
        server = start_server("--relay-networks", "127.0.0.0/8", "--relay-nameserver", f"127.0.0.1:{dns_server.port}",
                              "--relay-port", str(hop.port), *FAST_RETRIES)
        send(server, ["first@a.test", "second@b.test"])
        assert script.held.wait(60), "the second DATA never came"
        assert hop.handler.copies_for("first@a.test") == 1
        (queue_id,) = queue_of(server).ids()
        wait_until(lambda: queue_of(server).load(queue_id).results.get(0, {}).get("result") == "sent",
                   what="the first recipient recorded as sent")
        old = runner_pid(server)
        os.kill(old, signal.SIGKILL)
        script.release_reply = "250 2.0.0 accepted"  # the dead runner's DATA is answered into the void
        script.hold_data_for = set()
        script.release.set()
        wait_until(lambda: runner_pid(server) not in (None, old), what="the runner's restart")
        wait_until(lambda: hop.handler.copies_for("second@b.test") == 1, what="the second recipient's delivery")
        wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
        assert hop.handler.copies_for("first@a.test") == 1  # never sent twice
        wait_until(lambda: "died: killed by SIGKILL" in server.log_text(), what="the runner's death logged")
        assert ("mx.a.test.", "A") in dns_server.questions and ("b.test.", "MX") in dns_server.questions
    finally:
        dns_server.close()


@pytest.mark.slow
def test_the_whole_server_restarted_with_mail_in_the_queue(start_server, receiver):
    """Next hop down: mail stays queued across a stop; the restarted server delivers each once."""
    dead_port = free_port()
    server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{dead_port}", *FAST_RETRIES)
    for i in range(5):
        send(server, [f"r{i}@example.org", f"local{i}@smtpd.com"])
    assert len(queue_of(server).ids()) == 5
    wait_until(lambda: server.log_count("Connection refused") + server.log_count("ConnectError") >= 1,
               what="a failed attempt")
    assert server.stop() == 0
    hop = receiver()
    args = [a if a != f"127.0.0.1:{dead_port}" else f"127.0.0.1:{hop.port}" for a in server.proc.args]
    restarted = subprocess.Popen(args, cwd=server.root, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: all(hop.handler.copies_for(f"r{i}@example.org") == 1 for i in range(5)),
                   what="every queued mail delivered", timeout=60)
        wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
        assert all(len(server.stored(f"local{i}")) == 1 for i in range(5))
        assert len(hop.handler.received) == 5
    finally:
        restarted.terminate()
        restarted.wait(60)


# -------------------------------------------------------------- operating it
def test_flush_show_metrics_and_the_queue_command(start_server, receiver):
    hop = receiver(Script(rcpt={"wait@example.org": ["451 4.3.0 later", "250 ok"]}))
    metrics_port = free_port()
    server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{hop.port}",
                          "--queue-retry-min", "3600", "--queue-retry-max", "7200", "--metrics-port", str(metrics_port))
    send(server, ["wait@example.org"])
    wait_until(lambda: server.log_count("deferred, retry in 3600 s") == 1, what="the first attempt")
    (queue_id,) = queue_of(server).ids()

    def shown() -> dict[str, int]:
        return {line.split("=")[0]: int(line.split("=")[1].split()[0]) for line in config(server, "show=1")[:-1]}

    wait_until(lambda: shown()["queue_messages"] == 1, what="the queue in show=1")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
    assert "smtpd_queue_messages 1.0" in metrics and "smtpd_queue_oldest_seconds" in metrics
    assert 'smtpd_deliveries_total{result="deferred"} 1.0' in metrics
    out = subprocess.run([sys.executable, "-P", "-m", "prefork_smtpd.cli.metrics", "-P", str(server.port), "--once",
                          "--json"], capture_output=True, text=True, timeout=60).stdout
    assert json.loads(out)["queued"] == 1
    listed = subprocess.run([sys.executable, "-P", "-m", "prefork_smtpd.cli.queue", "--queue-dir",
                             str(server.root / "queue"), "list"], capture_output=True, text=True, timeout=60).stdout
    assert queue_id in listed and "<wait@example.org> deferred: 451 4.3.0 later" in listed
    assert "1 mail in the queue" in listed
    shown_one = subprocess.run([sys.executable, "-P", "-m", "prefork_smtpd.cli.queue", "--queue-dir",
                                str(server.root / "queue"), "show", queue_id], capture_output=True, timeout=60).stdout
    assert b"Subject: going out" in shown_one
    # flush=1: retried now, not in an hour.
    assert config(server, "flush=1") == ["OK"]
    wait_until(lambda: hop.handler.copies_for("wait@example.org") == 1, what="the flushed delivery")
    wait_until(lambda: shown()["queue_messages"] == 0, what="an empty queue in show=1")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
    assert 'smtpd_deliveries_total{result="sent"} 1.0' in metrics


def connections_to(pid: int, port: int) -> int:
    """The process's TCP sockets to ``port``, whatever their state (connecting or open)."""
    return sum(1 for c in psutil.Process(pid).net_connections(kind="tcp") if c.raddr and c.raddr.port == port)


def test_relay_max_connections_bounds_deliveries_at_once(start_server, receiver):
    """Three mails found in one look: the runner starts a delivery for each at
    once, as many as --relay-max-connections lets through. The next hop holds
    every DATA until the test has counted the deliveries open at once."""
    for limit, at_once in (("1", 1), ("20", 3)):
        gate = threading.Event()
        hop = receiver(Script(gate=gate))
        server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{hop.port}",
                              "--relay-max-connections", limit, "--queue-retry-min", "3600", "--queue-retry-max", "3600")
        runner = wait_until(lambda: runner_pid(server), what="the runner")
        os.kill(runner, signal.SIGSTOP)  # three mails queue up before it looks
        try:
            for i in range(3):
                send(server, [f"m{i}@example.org"])
        finally:
            os.kill(runner, signal.SIGCONT)
        wait_until(lambda: hop.handler.active >= at_once, what=f"{at_once} transactions open", timeout=60)
        # The three deliveries begin in one turn of the runner's loop; a transaction
        # open at the next hop took round trips after that turn: every socket the
        # runner opened at once exists by now, held ones included.
        assert connections_to(runner, hop.port) == at_once, limit
        assert hop.handler.active == at_once, limit
        gate.set()
        wait_until(lambda: len(hop.handler.received) == 3, what="three deliveries", timeout=60)
        assert hop.handler.max_active == at_once, limit


# ------------------------------------------------ wake-ups and kept connections
def queue_while_paused(server, recipient_lists) -> None:
    """Queue several mails while the runner is stopped, so it finds them all at once."""
    runner = wait_until(lambda: runner_pid(server), what="the runner")
    os.kill(runner, signal.SIGSTOP)
    try:
        for recipients in recipient_lists:
            assert send(server, recipients) == {}
    finally:
        os.kill(runner, signal.SIGCONT)


def relay_to(port: int, *flags: str) -> tuple[str, ...]:
    return ("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{port}", *FAST_RETRIES, *flags)


def test_new_mail_wakes_the_idle_runner_without_waiting_for_its_scan(start_server):
    """The periodic look is an hour away: only the workers' wake-up can start these deliveries."""
    hop = start_server("--domain", "example.org", "--domain", "smtpd.com")
    server = start_server(*relay_to(hop.port, "--queue-scan-interval", "3600"))
    # Logged before the runner's first look and flushed after it: from here on it is idle.
    wait_until(lambda: "queue runner started" in server.log_text(), what="the runner's first look")
    for i in range(2):  # the second one after the runner went idle again
        assert send(server, [f"carol{i}@example.org"]) == {}
        wait_until(lambda: hop.stored(f"carol{i}"), what=f"mail {i} at the next hop", timeout=60)
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")


def test_mails_to_one_next_hop_share_kept_connections(start_server):
    """Eight mails, a real prefork-smtpd next hop: at most --relay-connections sessions carry them."""
    hop = start_server("--domain", "example.org", "--domain", "smtpd.com")
    server = start_server(*relay_to(hop.port, "--relay-connections", "2"))
    queue_while_paused(server, [[f"r{i}@example.org"] for i in range(8)])
    wait_until(lambda: all(len(hop.stored(f"r{i}")) == 1 for i in range(8)), what="eight mails at the next hop",
               timeout=60)
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
    c = hop.client()
    sessions = c.xstat("TOTAL") - 1  # this one is not the runner's
    c.close()
    assert 1 <= sessions <= 2, sessions
    wait_until(lambda: server.log_count("removed from the queue, every recipient done") == 8, what="the log")


def test_an_unused_connection_is_kept_for_relay_idle_time_then_closed(start_server):
    hop = start_server("--domain", "example.org", "--domain", "smtpd.com")
    kept = start_server(*relay_to(hop.port, "--relay-idle-time", "300"))
    assert send(kept, ["k@example.org"]) == {}
    wait_until(lambda: hop.stored("k"), what="the mail at the next hop", timeout=60)
    wait_until(lambda: not queue_of(kept).ids(), what="the queue to empty")
    c = hop.client()
    assert c.xstat("CURRENT") == 2  # ours, and the runner's, idle but open for the next mail
    c.close()
    assert kept.stop() == 0  # the runner closes what it kept when it stops
    short = start_server(*relay_to(hop.port, "--relay-idle-time", "1"))
    assert send(short, ["s@example.org"]) == {}
    wait_until(lambda: hop.stored("s"), what="the second mail at the next hop", timeout=60)

    def current() -> int:
        c = hop.client()
        try:
            return c.xstat("CURRENT")
        finally:
            c.close()

    wait_until(lambda: current() == 1, what="the idle connection closed", timeout=60)


def test_relay_mails_per_connection_bounds_each_session(start_server, receiver):
    hop = receiver()
    server = start_server(*relay_to(hop.port, "--relay-connections", "1", "--relay-mails-per-connection", "3"))
    queue_while_paused(server, [[f"m{i}@example.org"] for i in range(7)])
    wait_until(lambda: len(hop.handler.received) == 7, what="seven deliveries", timeout=60)
    assert len(hop.handler.sessions()) == 3  # 3 + 3 + 1
    assert all(hop.handler.copies_for(f"m{i}@example.org") == 1 for i in range(7))


def test_a_4xx_on_a_kept_connection_defers_only_that_mail(start_server, receiver):
    hop = receiver(Script(rcpt={"m1@example.org": ["451 4.7.1 not now", "250 ok"]}))
    server = start_server(*relay_to(hop.port, "--relay-connections", "1"))
    queue_while_paused(server, [[f"m{i}@example.org"] for i in range(4)])
    wait_until(lambda: all(hop.handler.copies_for(f"m{i}@example.org") == 1 for i in range(4)),
               what="every mail delivered", timeout=60)
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
    assert hop.handler.rcpt_calls == {"m0@example.org": 1, "m1@example.org": 2, "m2@example.org": 1,
                                      "m3@example.org": 1}
    others = {r.session for r in hop.handler.received if r.recipients != ["m1@example.org"]}
    assert len(others) == 1  # one kept connection went on after the 451
    wait_until(lambda: server.log_count("<m1@example.org> deferred, retry in 1 s: 451 4.7.1 not now") == 1,
               what="the deferral in the log")
    assert len(hop.handler.received) == 4


def test_a_5xx_in_a_pipelined_transaction_bounces_only_that_mail(start_server):
    """A real prefork-smtpd next hop offers PIPELINING: MAIL, RCPT and DATA go in one write.
    Its 550 for m1 (no such mailbox) bounces m1 alone; the kept connection goes on (RSET) for the rest."""
    hop = start_server("--domain", "example.org", "--domain", "smtpd.com", "--mailboxes", "existing")
    for name in ("m0", "m2", "m3"):
        for sub in ("cur", "new", "tmp"):
            (hop.mail_dir / name / sub).mkdir(parents=True)
    server = start_server(*relay_to(hop.port, "--relay-connections", "1"))
    queue_while_paused(server, [[f"m{i}@example.org"] for i in range(4)])
    wait_until(lambda: all(len(hop.stored(f"m{i}")) == 1 for i in (0, 2, 3)), what="three mails at the next hop",
               timeout=60)
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
    (bounce,) = wait_until(lambda: server.stored("alice"), what="the bounce for m1")
    assert "m1@example.org" in parse_stored(bounce).as_string()
    c = hop.client()
    assert c.xstat("TOTAL") - 1 == 1  # one kept connection for all four
    c.close()
    wait_until(lambda: server.log_count("<m1@example.org> bounced: 550") == 1, what="the bounce in the log")


def test_a_connection_cut_after_the_250_never_sends_that_mail_twice(start_server, receiver):
    """The next hop hangs up right after accepting m1: m1 is recorded, the others go on once each."""
    hop = receiver(Script(cut_after_data_for={"m1@example.org"}))
    server = start_server(*relay_to(hop.port, "--relay-connections", "1"))
    queue_while_paused(server, [[f"m{i}@example.org"] for i in range(4)])
    wait_until(lambda: len(hop.handler.received) == 4, what="four deliveries", timeout=60)
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
    assert all(hop.handler.copies_for(f"m{i}@example.org") == 1 for i in range(4))
    assert all(calls == 1 for calls in hop.handler.rcpt_calls.values())  # nothing begun twice
    assert len(hop.handler.sessions()) < 4  # kept connections, cut once
    assert server.log_count("deferred") == 0  # the dead kept connection was replaced at once


def test_relay_connections_bounds_parallel_connections_to_one_next_hop(start_server, receiver):
    # The next hop holds every DATA until the test has counted the transactions
    # open at once: three, and no fourth connection however long it waits.
    gate = threading.Event()
    hop = receiver(Script(gate=gate))
    server = start_server(*relay_to(hop.port, "--relay-connections", "3"))
    queue_while_paused(server, [[f"m{i}@example.org"] for i in range(7)])
    wait_until(lambda: hop.handler.active >= 3, what="three transactions open", timeout=60)
    runner = wait_until(lambda: runner_pid(server), what="the runner")
    assert connections_to(runner, hop.port) == 3
    assert hop.handler.active == 3
    gate.set()
    wait_until(lambda: len(hop.handler.received) == 7, what="seven deliveries", timeout=90)
    assert hop.handler.max_active == 3
    assert len(hop.handler.sessions()) == 3


def test_queue_dir_flag_and_a_queue_on_another_file_system(start_server, tmp_path):
    queue_dir = tmp_path / "elsewhere" / "outbound"
    server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{free_port()}",
                          "--queue-dir", str(queue_dir), "--queue-retry-min", "3600", "--queue-retry-max", "3600")
    send(server, ["x@example.org"])
    assert len(Queue(str(queue_dir)).ids()) == 1 and not (server.root / "queue").exists()


@pytest.mark.root("mounts a tmpfs")
def test_a_queue_on_another_file_system_is_refused_at_start(tmp_path):
    from harness import tmpfs

    with tmpfs(tmp_path / "other", "1m") as other:
        done = subprocess.run([sys.executable, "-m", "prefork_smtpd", "--mail-dir", str(tmp_path / "m"),
                               "--relay-networks", "10.0.0.0/8", "--queue-dir", str(other / "q")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "must be on the mail dir's file system" in done.stderr
        # A mail dir of its own (a mount point) with the default queue beside it: refused only
        # when anyone may relay; a server that never relays starts as it always did.
        mail_dir = other
        relay = subprocess.run([sys.executable, "-m", "prefork_smtpd", "--mail-dir", str(mail_dir),
                                "--relay-networks", "10.0.0.0/8"], capture_output=True, text=True, timeout=60)
        assert relay.returncode == 2 and f"--queue-dir a folder inside it, e.g. {mail_dir}/.queue" in relay.stderr


def test_queue_command_deletes(start_server):
    server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{free_port()}",
                          "--queue-retry-min", "3600", "--queue-retry-max", "7200")
    send(server, ["x@example.org"])
    (queue_id,) = queue_of(server).ids()
    tool = [sys.executable, "-P", "-m", "prefork_smtpd.cli.queue", "--queue-dir", str(server.root / "queue")]
    done = subprocess.run(tool + ["delete", queue_id], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and f"deleted {queue_id}" in done.stdout
    assert not queue_of(server).ids()
    again = subprocess.run(tool + ["delete", queue_id, "../x"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "no queued mail" in again.stderr and "not a queue id" in again.stderr


def test_bad_relay_flags_exit_2(tmp_path):
    for flags, needle in [
        (("--relay-networks", "10.0.0.0/8,bogus"), "not a network: 'bogus'"),
        (("--relay-host", "host:99999"), "port out of range"),
        (("--queue-retry-min", "10", "--queue-retry-max", "5"), "--queue-retry-min must not exceed"),
        (("--relay-auth-file", str(tmp_path / "missing")), "--relay-auth-file"),
        (("--queue-lifetime", "0"), "queue_lifetime must be between"),
        (("--delay-warning-time", "-1"), "delay_warning_time must be between"),
    ]:
        done = subprocess.run([sys.executable, "-m", "prefork_smtpd", "--mail-dir", str(tmp_path / "m"), *flags],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 2 and needle in done.stderr, (flags, done.stderr)


# ------------------------------------------------------------ MX resolution
def resolve(coro):
    return asyncio.run(coro)


def test_mx_lookup_against_a_local_dns_server():
    """dnspython's resolver pointed at TinyDNS: MX order, implicit MX, null MX, NXDOMAIN, A/AAAA."""
    server = TinyDNS({
        ("two.test", "MX"): ["20 backup.two.test.", "10 primary.two.test."],
        ("primary.two.test", "A"): ["192.0.2.1"], ("primary.two.test", "AAAA"): ["2001:db8::1"],
        ("implicit.test", "A"): ["192.0.2.7"],
        ("null.test", "MX"): ["0 ."],
        ("noaddr.test", "TXT"): ['"x"'],
    })
    try:
        resolver = make_resolver(f"127.0.0.1:{server.port}")
        resolver.lifetime = 10
        assert resolve(mx_levels("two.test", resolver, 2525)) == [[("primary.two.test", 2525)], [("backup.two.test", 2525)]]
        assert resolve(host_addresses("primary.two.test", resolver)) == ["192.0.2.1", "2001:db8::1"]
        assert resolve(host_addresses("192.0.2.9", resolver)) == ["192.0.2.9"]
        assert resolve(mx_levels("implicit.test", resolver)) == [[("implicit.test", 25)]]  # RFC 5321 5.1
        with pytest.raises(PermanentFailure) as null:
            resolve(mx_levels("null.test", resolver))
        assert null.value.status == "5.1.10"
        with pytest.raises(PermanentFailure):
            resolve(mx_levels("missing.test", resolver))
        with pytest.raises(PermanentFailure):
            resolve(mx_levels("noaddr.test", resolver))
        with pytest.raises(TemporaryFailure):
            resolve(host_addresses("backup.two.test", resolver))  # an MX host without an address: try later
    finally:
        server.close()


def test_a_dns_timeout_is_temporary():
    import socket

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        resolver = make_resolver(f"127.0.0.1:{silent.getsockname()[1]}")
        resolver.lifetime = 0.5
        with pytest.raises(TemporaryFailure):
            resolve(mx_levels("any.test", resolver))
    finally:
        silent.close()


# ------------------------------------------------- a smarthost with STARTTLS and AUTH
@pytest.fixture
def tls_files(tmp_path):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    return cert, cafile


def test_smarthost_requiring_starttls_and_auth(start_server, receiver, tls_files, tmp_path):
    import ssl

    from aiosmtpd.smtp import AuthResult, LoginPassword

    cert, cafile = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    logins: list[tuple[bytes, bool]] = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        assert isinstance(auth_data, LoginPassword)
        ok = auth_data.login == b"relayuser" and auth_data.password == b"relay pass"
        logins.append((auth_data.login, session.ssl is not None))
        return AuthResult(success=ok)

    hop = receiver(tls_context=server_context, require_starttls=True, auth_required=True, auth_require_tls=True,
                   authenticator=authenticator)
    auth_file = tmp_path / "relay-auth"
    auth_file.write_text("relayuser:wrong\n")
    flags = ("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{hop.port}", "--relay-starttls",
             "--relay-ca-file", str(cafile), "--relay-auth-file", str(auth_file), "--relay-timeout", "3", *FAST_RETRIES)
    server = start_server(*flags)
    send(server, ["tls@example.org"])
    # A wrong password is a temporary failure: retried, never lost.
    # (aiosmtpd leaves a failed AUTH LOGIN unanswered: --relay-timeout cuts the wait.)
    wait_until(lambda: server.log_count("tls@example.org> deferred") >= 1, what="the refused login", timeout=60)
    assert hop.handler.copies_for("tls@example.org") == 0 and len(queue_of(server).ids()) == 1
    auth_file.write_text("relayuser:relay pass\n")
    assert config(server, "reload=1") == ["OK"]  # the next runner reads the new file
    wait_until(lambda: hop.handler.copies_for("tls@example.org") == 1, what="delivery over TLS with AUTH")
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
    assert logins and all(over_tls for _, over_tls in logins)  # never a password in the clear


def test_a_kept_connection_to_a_starttls_and_auth_smarthost(start_server, receiver, tls_files, tmp_path):
    """Several mails over one session: STARTTLS and AUTH once, every mail over TLS."""
    import ssl

    from aiosmtpd.smtp import AuthResult, LoginPassword

    cert, cafile = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    logins: list[bool] = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        assert isinstance(auth_data, LoginPassword)
        logins.append(session.ssl is not None)
        return AuthResult(success=auth_data.login == b"relayuser" and auth_data.password == b"relay pass")

    hop = receiver(tls_context=server_context, require_starttls=True, auth_required=True, auth_require_tls=True,
                   authenticator=authenticator)
    auth_file = tmp_path / "relay-auth"
    auth_file.write_text("relayuser:relay pass\n")
    server = start_server(*relay_to(hop.port, "--relay-starttls", "--relay-ca-file", str(cafile),
                                    "--relay-auth-file", str(auth_file), "--relay-connections", "1"))
    queue_while_paused(server, [[f"t{i}@example.org"] for i in range(4)])
    wait_until(lambda: len(hop.handler.received) == 4, what="four deliveries over TLS", timeout=60)
    assert all(hop.handler.copies_for(f"t{i}@example.org") == 1 for i in range(4))
    assert len(hop.handler.sessions()) == 1 and logins == [True]


# ------------------------------------------------------ a real Postfix as next hop
def _postfix_instance_class():
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    from postfix import PostfixInstance

    return PostfixInstance


@pytest.mark.slow
@pytest.mark.root("Postfix starts as root")
@pytest.mark.skipif(not os.path.exists("/usr/sbin/postfix"), reason="Postfix is not installed (run-tests installs it)")
def test_a_real_postfix_next_hop_stores_the_mail_and_honours_the_dsn_passed_on(start_server):
    """Postfix (bench/postfix.py's throwaway instance) is the smarthost; it offers DSN, so
    NOTIFY=SUCCESS, ORCPT and ENVID go on to it, and it is Postfix, not us, that reports the
    delivery: its "delivered" notice comes back to the sender through its own relayhost, us."""
    import shutil
    import tempfile
    from pathlib import Path

    PostfixInstance = _postfix_instance_class()
    postfix_port = free_port()
    server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{postfix_port}",
                          *FAST_RETRIES)
    # Not under pytest's tmp_path: its folders are closed to Postfix's users.
    root = Path(tempfile.mkdtemp(prefix="relay-test-postfix-"))
    postfix = PostfixInstance(root, postfix_port, domain="example.org", relayhost=f"127.0.0.1:{server.port}")
    postfix.start()
    try:
        refused = send(server, ["b@example.org"], mail_options=["RET=HDRS", "ENVID=trip+2042"],
                       rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;" + dsn.xtext_encode("B+x@Example.org")])
        assert refused == {}
        wait_until(lambda: postfix.stored() == 1, timeout=300, what=f"the mail in Postfix's Maildir: {postfix.log()}")
        (stored,) = (postfix.maildir / "b" / "new").iterdir()
        msg = parse_stored(stored)
        assert msg["Subject"] == "going out" and ".a dotted line" in msg.get_content()
        assert msg["Return-Path"] == "<alice@smtpd.com>"
        assert any("by mx.test (prefork-smtpd)" in r for r in msg.get_all("Received"))
        wait_until(lambda: server.log_count("sent via 127.0.0.1") == 1, what="our runner's log line")
        wait_until(lambda: not queue_of(server).ids(), what="our queue to empty")
        # Postfix's own success report, relayed back to us: the DSN parameters reached it.
        (notice,) = wait_until(lambda: server.stored("alice"), timeout=300,
                               what=f"Postfix's delivered notice: {postfix.log()}")
        report = parse_stored(notice)
        assert report.get_content_type() == "multipart/report"
        status = report.get_payload()[1].get_payload()
        per_message, rcpt = status[0], status[1]
        assert "bench.example" in per_message["Reporting-MTA"]  # Postfix's, not ours
        assert per_message["Original-Envelope-Id"] == "trip 42"
        assert rcpt["Action"] == "delivered"
        assert rcpt["Original-Recipient"].replace(" ", "") == "rfc822;B+x@Example.org"
        assert rcpt["Final-Recipient"].replace(" ", "").lower() == "rfc822;b@example.org"
        assert server.log_count("relayed notice") == 0  # Postfix offers DSN: no notice of ours
    finally:
        postfix.stop()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------ the connection pool on its own
class FakeNextHop:
    """Answers QUIT, as a next hop would."""

    def __init__(self) -> None:
        self.closed = False
        self.reader = None

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:
        if data == b"QUIT\r\n":
            asyncio.get_running_loop().call_soon(self.reader.data_received, b"221 2.0.0 bye\r\n")


def test_the_pool_bounds_each_next_hop_and_the_total_and_forgets_unused_ones():
    from prefork_smtpd.runner import Connection, ConnectionPool, ReplyReader

    async def scenario() -> None:
        opened: list[tuple[str, int]] = []

        async def open_client(key):
            opened.append(key)
            transport = FakeNextHop()
            transport.reader = ReplyReader(transport)
            return Connection(key, transport.reader, pipelining=True, dsn=False)

        pool = ConnectionPool(open_client, per_destination=2, total=3, mails_per_connection=2, idle_time=60)
        a, b = ("a", 25), ("b", 25)
        first, second = await pool.acquire(a), await pool.acquire(a)
        third = asyncio.ensure_future(pool.acquire(a))  # a's two are busy: it waits
        await asyncio.sleep(0)
        assert not third.done() and opened == [a, a]
        first.mails = 1
        pool.release(first, reusable=True)  # handed to the waiter, not a new connection
        assert await third is first and opened == [a, a]
        pool.release(second, reusable=True)
        # A third next hop over the total of 3: a's idle connection is closed to make room.
        other = await pool.acquire(b)
        assert pool.count == 3
        last = await pool.acquire(("c", 25))
        assert pool.count == 3 and pool.destinations[a].idle == []
        await asyncio.sleep(0.05)  # QUIT, its reply, then the close
        assert second.reader.transport.closed
        first.mails = 2  # its quota: closed, not kept
        pool.release(first, reusable=True)
        assert a not in pool.destinations
        await asyncio.sleep(0.05)
        assert first.reader.transport.closed
        for conn in (other, last):
            pool.release(conn, reusable=False)
        assert pool.count == 0 and not pool.destinations
        assert other.reader.transport.closed and last.reader.transport.closed  # not reusable: closed at once

    asyncio.run(scenario())


def test_a_next_hop_sending_replies_nobody_asked_for_is_cut_off():
    """A next hop sending replies without end must not grow the runner's memory without end."""
    from prefork_smtpd.runner import ReplyReader

    async def scenario() -> None:
        transport = FakeNextHop()
        reader = ReplyReader(transport)
        transport.reader = reader
        reader.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n", replies=2)
        reader.data_received(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n")
        assert await reader.reply(1) == (250, "2.1.0 ok") and await reader.reply(1) == (250, "2.1.5 ok")
        assert reader.alive
        reader.data_received(b"250 2.0.0 unasked\r\n" * 10_000)
        assert len(reader.replies) == 0 and transport.closed and not reader.alive
        with pytest.raises(Exception, match="nobody asked for"):
            await reader.reply(1)

    asyncio.run(scenario())


# ------------------------------------------------------------------- SMTPUTF8
def send_utf8(server, sender: str, recipient: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo()
        message = f"From: {sender}\r\nSubject: Gr\u00fc\u00dfe\r\n\r\nHall\u00f6\r\n".encode()
        assert client.sendmail(sender, [recipient], message, mail_options=["SMTPUTF8"]) == {}


def test_a_utf8_sender_is_relayed_with_smtputf8_to_a_hop_that_offers_it(start_server):
    """A second prefork-smtpd offers SMTPUTF8: MAIL carries it, the address goes as UTF-8."""
    hop = start_server("--domain", "example.org", "--domain", "smtpd.com")
    server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{hop.port}", *FAST_RETRIES)
    send_utf8(server, "J\u00f6rg@smtpd.com", "bob@example.org")
    (relayed,) = wait_until(lambda: hop.stored("bob"), what="the relayed copy at the next hop")
    msg = email.message_from_bytes(relayed.read_bytes(), policy=email.policy.SMTPUTF8)
    assert msg["Return-Path"] == "<J\u00f6rg@smtpd.com>" and msg["Subject"] == "Gr\u00fc\u00dfe"
    assert " with UTF8SMTP id " in msg.get_all("Received")[1]  # the hop's trace of our relay
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")


def test_the_bounce_of_an_smtputf8_mail_names_its_utf8_sender_as_it_is(start_server, receiver):
    """A hop without SMTPUTF8 cannot take a UTF-8 address (RFC 6531 3.4): the
    mail bounces with 5.6.7, and the notice (RFC 6533) is an SMTPUTF8 mail
    with the sender as it is, no "?" for the ö."""
    hop = receiver(enable_SMTPUTF8=False)
    server = start_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{hop.port}", *FAST_RETRIES)
    sender = "J\u00f6rg@smtpd.com"
    send_utf8(server, sender, "bob@example.org")
    (bounce,) = wait_until(lambda: server.stored("j\u00f6rg"), what="the bounce in the sender's mailbox")
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
    assert hop.handler.copies_for("bob@example.org") == 0
    data = bounce.read_bytes()
    msg = email.message_from_bytes(data, policy=email.policy.SMTPUTF8)
    assert f"To: <{sender}>\n".encode() in data and msg["To"] == sender
    assert " with UTF8SMTP id " in msg["Received"]
    text, status, headers = msg.get_payload()
    assert status.get_content_type() == "message/global-delivery-status"
    assert b"Final-Recipient: rfc822; bob@example.org\nAction: failed\nStatus: 5.6.7\n" in data
    assert headers.get_content_type() == "message/global-headers"
    assert b"?" not in data
