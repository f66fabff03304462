"""The queue runner and SMTPUTF8 (RFC 6531): a mail received with UTF-8
addresses or headers, relayed to real next hops, one that offers SMTPUTF8
and one that does not (aiosmtpd, every octet it was sent kept), and a
second prefork-smtpd."""

from __future__ import annotations

import email
import email.policy
import json
import os
import signal
import smtplib

import pytest
from harness import wait_until
from test_relay import queue_of, receiver, relay_to, runner_pid  # receiver: the next hops, a fixture

from prefork_smtpd.queue import Queue, QueuedMail, QueuedRecipient, queue_file_header
from prefork_smtpd.session import Envelope, Recipient

JOERG = "j\u00f6rg"  # jörg
USER = "\u7528\u6237"  # 用户
UTF8_HEADERS = (
    "From: J\u00f6rg <j\u00f6rg@smtpd.com>\r\nSubject: Gr\u00fc\u00dfe aus K\u00f6ln\r\n\r\nHall\u00f6chen\r\n"
).encode()
ASCII_HEADERS = b"From: alice@smtpd.com\r\nSubject: plain\r\n\r\nHall\xc3\xb6chen in the body only\r\n"
BOOKS, BOOKS_ACE = "b\u00fccher.example", "xn--bcher-kva.example"  # bücher.example, in U-labels and A-labels
NOT_OFFERED = "non-ASCII addresses not permitted by the next hop"


def send_utf8(server, sender, recipients, message=UTF8_HEADERS, mail_options=("SMTPUTF8",), rcpt_options=()):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        assert client.sendmail(sender, recipients, message, mail_options=list(mail_options),
                               rcpt_options=list(rcpt_options)) == {}


def queue_while_paused(server, mails) -> None:
    """Queue (sender, recipients, message, mail_options) mails while the runner is stopped:
    it finds them all at once, and they share its kept connection."""
    runner = wait_until(lambda: runner_pid(server), what="the runner")
    os.kill(runner, signal.SIGSTOP)
    try:
        for sender, recipients, message, options in mails:
            send_utf8(server, sender, recipients, message, options)
    finally:
        os.kill(runner, signal.SIGCONT)


def parsed(path) -> email.message.EmailMessage:
    return email.message_from_bytes(path.read_bytes(), policy=email.policy.default)


def statuses(notice) -> list:
    """The per-recipient groups of a delivery status notice.

    The notice of an SMTPUTF8 mail carries them in a message/global-delivery-status
    part (RFC 6533), which the email package reads as one message: its blocks are parsed here.
    """
    _, status = notice.get_payload()[:2]
    if status.get_content_type() == "message/delivery-status":
        return status.get_payload()[1:]
    assert status.get_content_type() == "message/global-delivery-status"
    # Parsed as if it held one message: its "headers" are the per-message
    # block, its "body" the per-recipient ones.
    (inner,) = status.get_payload()
    text = inner.as_string().replace("\r\n", "\n")
    return [email.message_from_string(block) for block in text.strip().split("\n\n")][1:]


def commands(wire: bytes) -> list[bytes]:
    """The MAIL and RCPT lines a next hop received, as sent."""
    return [line for line in wire.split(b"\r\n") if line[:5] in (b"MAIL ", b"RCPT ")]


def transactions(wire: bytes) -> list[list[bytes]]:
    """The MAIL and RCPT lines a next hop received, one list per transaction."""
    found: list[list[bytes]] = []
    for line in commands(wire):
        if line.startswith(b"MAIL "):
            found.append([])
        found[-1].append(line)
    return found


# ------------------------------------------------------ a next hop that offers SMTPUTF8
def test_utf8_addresses_go_with_smtputf8_in_one_attempt(start_server, receiver):
    hop = receiver()  # aiosmtpd: SMTPUTF8 offered, no PIPELINING (one command at a time)
    server = start_server(*relay_to(hop.port, "--relay-connections", "1"))
    queue_while_paused(server, [
        (f"{JOERG}@smtpd.com", [f"{USER}@example.org", "bob@example.org"], UTF8_HEADERS, ["SMTPUTF8"]),
        # ASCII addresses, UTF-8 headers: flagged all the same, and it goes with SMTPUTF8 too.
        ("alice@smtpd.com", ["carol@example.org"], UTF8_HEADERS, ["SMTPUTF8"]),
    ])
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty", timeout=60)
    # The runner takes the two mails in the order of their queue ids, which the test does not choose.
    assert sorted(transactions(hop.wire())) == sorted([
        # 8-bit octets in the message (its UTF-8 headers): labelled BODY=8BITMIME as well (RFC 6152).
        [f"MAIL FROM:<{JOERG}@smtpd.com> BODY=8BITMIME SMTPUTF8".encode(), f"RCPT TO:<{USER}@example.org>".encode(),
         b"RCPT TO:<bob@example.org>"],
        [b"MAIL FROM:<alice@smtpd.com> BODY=8BITMIME SMTPUTF8", b"RCPT TO:<carol@example.org>"],
    ])
    second, first = sorted(hop.handler.received, key=lambda r: r.sender)  # alice@, then jörg@
    assert first.sender == f"{JOERG}@smtpd.com" and first.recipients == [f"{USER}@example.org", "bob@example.org"]
    assert first.mail_options == ["BODY=8BITMIME", "SMTPUTF8"] and UTF8_HEADERS in first.data
    assert second.recipients == ["carol@example.org"] and second.mail_options == ["BODY=8BITMIME", "SMTPUTF8"]
    assert hop.handler.rcpt_calls == {f"{USER}@example.org": 1, "bob@example.org": 1, "carol@example.org": 1}
    wait_until(lambda: server.log_count("removed from the queue, every recipient done") == 2, what="the log")
    assert server.log_count("deferred") == 0 and server.log_count("bounced") == 0
    assert not server.stored(JOERG) and not server.stored("alice")  # no notice of any kind


def test_utf8_through_a_real_prefork_smtpd_next_hop_with_dsn_passed_on(start_server):
    """The second prefork-smtpd offers SMTPUTF8, DSN and PIPELINING: one write carries
    MAIL ... SMTPUTF8 RET= ENVID=, the UTF-8 RCPT with NOTIFY and DATA."""
    hop = start_server("--domain", "example.org", "--domain", "smtpd.com")
    server = start_server(*relay_to(hop.port))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        assert client.sendmail(f"{JOERG}@smtpd.com", [f"{USER}@example.org"], UTF8_HEADERS,
                               mail_options=["SMTPUTF8", "RET=HDRS", "ENVID=trip"],
                               rcpt_options=["NOTIFY=FAILURE"]) == {}
    (relayed,) = wait_until(lambda: hop.stored(USER), what="the mail at the next hop", timeout=60)
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
    stored = email.message_from_bytes(relayed.read_bytes(), policy=email.policy.SMTPUTF8)
    assert stored["Return-Path"] == f"<{JOERG}@smtpd.com>" and stored["Delivered-To"] == f"{USER}@example.org"
    assert stored["Subject"] == "Gr\u00fc\u00dfe aus K\u00f6ln"
    assert stored["Original-Envelope-Id"] == "trip"  # the DSN parameters went along
    assert " with UTF8SMTP id " in stored.get_all("Received")[0]  # the next hop saw SMTPUTF8 on MAIL
    wait_until(lambda: server.log_count("sent via") == 1, what="the log")
    assert server.log_count("deferred") == 0


# ------------------------------------------------ a next hop that does not offer SMTPUTF8
def test_without_smtputf8_a_utf8_recipient_bounces_once_with_5_6_7_and_nothing_else_is_hurt(start_server, receiver):
    hop = receiver(enable_SMTPUTF8=False)  # offers 8BITMIME
    server = start_server(*relay_to(hop.port, "--relay-connections", "1"))
    queue_while_paused(server, [
        ("alice@smtpd.com", ["a@example.org"], ASCII_HEADERS, []),
        ("alice@smtpd.com", [f"{JOERG}@example.org", "bob@example.org", f"dora@{BOOKS}"], UTF8_HEADERS, ["SMTPUTF8"]),
        ("alice@smtpd.com", ["c@example.org"], ASCII_HEADERS, []),
    ])
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty", timeout=60)
    # jörg never reached the next hop; bob and dora (her domain in A-labels) did, the UTF-8
    # headers as 8BITMIME; the other mails too, for the 8-bit octets in their bodies (RFC 6152).
    assert commands(hop.wire()) == [
        b"MAIL FROM:<alice@smtpd.com> BODY=8BITMIME", b"RCPT TO:<a@example.org>",
        b"MAIL FROM:<alice@smtpd.com> BODY=8BITMIME", b"RCPT TO:<bob@example.org>", f"RCPT TO:<dora@{BOOKS_ACE}>".encode(),
        b"MAIL FROM:<alice@smtpd.com> BODY=8BITMIME", b"RCPT TO:<c@example.org>",
    ]
    assert [r.recipients for r in hop.handler.received] == [
        ["a@example.org"], ["bob@example.org", f"dora@{BOOKS_ACE}"], ["c@example.org"],
    ]
    assert len(hop.handler.sessions()) == 1  # one kept connection carried all three
    (notice,) = wait_until(lambda: server.stored("alice"), what="the bounce")
    (rcpt,) = statuses(parsed(notice))
    assert rcpt["Action"] == "failed" and rcpt["Status"] == "5.6.7"
    assert NOT_OFFERED in rcpt["Diagnostic-Code"]
    wait_until(lambda: server.log_count(f"<{JOERG}@example.org> bounced: {NOT_OFFERED}") == 1, what="the log")
    wait_until(lambda: server.log_count("bounced") == 1, what="the log")
    assert server.log_count("deferred") == 0


def test_without_smtputf8_a_utf8_sender_bounces_every_recipient_and_nothing_is_sent(start_server, receiver):
    hop = receiver(enable_SMTPUTF8=False)
    server = start_server(*relay_to(hop.port))
    send_utf8(server, f"{JOERG}@smtpd.com", ["a@example.org", "b@example.org"])
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty", timeout=60)
    (notice,) = wait_until(lambda: server.stored(JOERG), what="the bounce in the UTF-8 sender's mailbox")
    failed = statuses(parsed(notice))
    assert [r["Final-Recipient"] for r in failed] == ["rfc822; a@example.org", "rfc822; b@example.org"]
    assert all(r["Status"] == "5.6.7" and NOT_OFFERED in r["Diagnostic-Code"] for r in failed)
    assert commands(hop.wire()) == [] and not hop.handler.received  # EHLO, then nothing of this mail
    wait_until(lambda: server.log_count("bounced") == 2, what="the log")
    assert server.log_count("deferred") == 0


def test_utf8_headers_only_go_as_8bitmime_without_smtputf8(start_server, receiver):
    """ASCII addresses, SMTPUTF8 on MAIL: UTF-8 headers go with BODY=8BITMIME to a next hop
    offering 8BITMIME; headers that are ASCII after all need no SMTPUTF8, and their 8-bit
    body its BODY=8BITMIME (RFC 6152)."""
    hop = receiver(enable_SMTPUTF8=False)
    server = start_server(*relay_to(hop.port, "--relay-connections", "1"))
    queue_while_paused(server, [
        ("alice@smtpd.com", ["u@example.org"], UTF8_HEADERS, ["SMTPUTF8"]),
        ("alice@smtpd.com", ["p@example.org"], ASCII_HEADERS, ["SMTPUTF8"]),
    ])
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty", timeout=60)
    assert commands(hop.wire()) == [
        b"MAIL FROM:<alice@smtpd.com> BODY=8BITMIME", b"RCPT TO:<u@example.org>",
        b"MAIL FROM:<alice@smtpd.com> BODY=8BITMIME", b"RCPT TO:<p@example.org>",
    ]
    assert [r.data for r in hop.handler.received][0].endswith(UTF8_HEADERS)
    wait_until(lambda: server.log_count("sent via") == 2, what="the log")
    assert server.log_count("bounced") == 0 and server.log_count("deferred") == 0 and not server.stored("alice")


def test_utf8_headers_to_a_next_hop_offering_neither_smtputf8_nor_8bitmime_bounce_with_5_6_9(start_server, receiver):
    hop = receiver(enable_SMTPUTF8=False, decode_data=True)  # aiosmtpd then offers no 8BITMIME
    server = start_server(*relay_to(hop.port))
    send_utf8(server, "alice@smtpd.com", ["u@example.org"])
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty", timeout=60)
    (notice,) = wait_until(lambda: server.stored("alice"), what="the bounce")
    (rcpt,) = statuses(parsed(notice))
    assert rcpt["Status"] == "5.6.9" and "UTF-8 header message not permitted" in rcpt["Diagnostic-Code"]
    assert commands(hop.wire()) == [] and not hop.handler.received
    wait_until(lambda: server.log_count("bounced") == 1, what="the log")
    assert server.log_count("deferred") == 0


# ------------------------------------------------------------ the pieces on their own
def _mail(sender: str, *recipients: str, flagged: bool = True) -> QueuedMail:
    mail = QueuedMail("q", sender, [QueuedRecipient(r) for r in recipients], 0.0)
    mail.smtputf8 = flagged
    return mail


@pytest.mark.parametrize(
    ("sender", "message", "smtputf8", "eightbit", "expected"),
    [
        # offered: everyone, SMTPUTF8 on MAIL
        (f"{JOERG}@x.org", UTF8_HEADERS, True, False, ([0, 1], [], ["SMTPUTF8"])),
        # not offered: the UTF-8 recipient fails, the ASCII one goes as 8BITMIME
        ("a@x.org", UTF8_HEADERS, False, True, ([1], [(0, "5.6.7")], ["BODY=8BITMIME"])),
        # ... plain when the header block is ASCII (the body does not matter)
        ("a@x.org", ASCII_HEADERS, False, False, ([1], [(0, "5.6.7")], [])),
        # ... nothing when the next hop cannot take 8-bit headers
        ("a@x.org", UTF8_HEADERS, False, False, ([], [(0, "5.6.7"), (1, "5.6.9")], [])),
        # a UTF-8 sender: every recipient fails, whatever else is offered
        (f"{JOERG}@x.org", ASCII_HEADERS, False, True, ([], [(0, "5.6.7"), (1, "5.6.7")], [])),
    ],
    ids=["offered", "8bitmime", "ascii-headers", "neither", "utf8-sender"],
)
def test_smtputf8_terms(sender, message, smtputf8, eightbit, expected):
    from prefork_smtpd.runner import smtputf8_terms

    sendable, refusals, options = smtputf8_terms(_mail(sender, f"{USER}@y.org", "b@y.org"), message, [0, 1],
                                                 smtputf8, eightbit)
    assert (sendable, [(i, status) for i, status, _ in refusals], options) == expected


def test_a_label_form():
    from prefork_smtpd.runner import _a_label_form

    assert _a_label_form("bob@example.org") == "bob@example.org"
    assert _a_label_form(f"dora@{BOOKS}") == f"dora@{BOOKS_ACE}"
    assert _a_label_form(f"dora@B\u00dcCHER.example") == f"dora@{BOOKS_ACE}"
    assert _a_label_form(f"{JOERG}@example.org") is None and _a_label_form(f"{JOERG}@{BOOKS}") is None
    assert _a_label_form("bob@" + "\u00fc" * 70 + ".example") is None  # a label too long: no A-labels


def test_the_queue_records_the_smtputf8_flag_and_infers_it_from_addresses(tmp_path):
    queue = Queue(str(tmp_path))
    queue.make()

    def queued(queue_id: str, sender: str, rcpt: str, utf8: bool) -> QueuedMail:
        envelope = Envelope(helo="c", sender=sender, recipients=[Recipient(rcpt, "", outside=True)])
        if utf8:
            envelope.smtputf8 = True
        (tmp_path / "msg" / queue_id).write_bytes(queue_file_header(envelope, queue_id, 1.0) + b"\r\n")
        mail = queue.load(queue_id)
        assert mail is not None
        return mail

    assert not queued("plain", "a@x.org", "b@y.org", False).smtputf8
    assert b'"utf8"' not in (tmp_path / "msg" / "plain").read_bytes()  # the usual header unchanged
    assert queued("headers", "a@x.org", "b@y.org", True).smtputf8
    # A queue file from before the flag was recorded: its UTF-8 address says it.
    assert queued("old", "a@x.org", f"{USER}@y.org", False).smtputf8
    assert queued("old-sender", f"{JOERG}@x.org", "b@y.org", False).smtputf8
    header = json.loads((tmp_path / "msg" / "headers").read_bytes().split(b"\n")[0])
    assert header["utf8"] is True


def test_mail_takes_one_body_parameter_binarymime_first():
    from prefork_smtpd.runner import _with_body

    assert _with_body(["BODY=8BITMIME"], "BODY=BINARYMIME") == ["BODY=BINARYMIME"]
    assert _with_body(["SMTPUTF8", "RET=HDRS"], "BODY=8BITMIME") == ["BODY=8BITMIME", "SMTPUTF8", "RET=HDRS"]
    assert _with_body(["BODY=8BITMIME"], "BODY=8BITMIME") == ["BODY=8BITMIME"]
    assert _with_body(["SMTPUTF8"], None) == ["SMTPUTF8"]
