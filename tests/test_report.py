"""RFC 3464 reports (report.py), read back with the email package, and the
"delivered" notice a NOTIFY=SUCCESS local delivery sends its local sender."""

from __future__ import annotations

import email
import email.policy
import smtplib

import pytest
from harness import wait_until

from prefork_smtpd import dsn, report
from prefork_smtpd.notices import success_notice
from prefork_smtpd.session import Envelope, Recipient

ORIGINAL = b"From: a@smtpd.com\r\nSubject: the original\r\nTo: b@x.org\r\n\r\nbody line\r\n.dot line\r\n"


def parse(data: bytes) -> email.message.EmailMessage:
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF lines only
    return email.message_from_bytes(data, policy=email.policy.default)


def statuses_of(msg) -> tuple[email.message.Message, list]:
    """The delivery-status part: (per-message fields, [per-recipient fields])."""
    part = msg.get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    return blocks[0], blocks[1:]


@pytest.mark.parametrize("action, status", [("failed", "5.1.1"), ("delayed", "4.4.1"), ("delivered", "2.0.0")])
def test_report_parses_as_a_delivery_status_notification(action, status):
    data = report.build_report(
        reporting_mta="mx.test", recipient="a@smtpd.com", original=ORIGINAL, envid="env 1", arrival=1e9, now=1e9 + 60,
        queue_id="Q1", statuses=[
            report.RecipientStatus(
                "b@x.org", action, status, original_recipient=("rfc822", "B@x.org"), remote_mta="mx.x.org",
                diagnostic="550 5.1.1 no\r\nsuch user" if action == "failed" else None, last_attempt=1e9 + 30,
                will_retry_until=1e9 + 86400 if action == "delayed" else None,
            ),
            report.RecipientStatus("c@x.org", action, status),
        ],
    )
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "a@smtpd.com" and msg["Auto-Submitted"] == "auto-replied"
    assert msg["Subject"] == report.SUBJECTS[action]
    text, _, returned = msg.get_payload()
    assert "<b@x.org>" in text.get_content() and "<c@x.org>" in text.get_content()
    per_message, (b, c) = statuses_of(msg)
    assert per_message["Reporting-MTA"] == "dns; mx.test"
    assert per_message["Original-Envelope-Id"] == "env 1"
    assert per_message["Arrival-Date"]
    assert b["Final-Recipient"] == "rfc822; b@x.org" and b["Original-Recipient"] == "rfc822;B@x.org"
    assert b["Action"] == action and b["Status"] == status and b["Remote-MTA"] == "dns; mx.x.org"
    assert (b["Will-Retry-Until"] is not None) == (action == "delayed")
    if action == "failed":
        assert b["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"  # one line, no forged field
    assert c["Final-Recipient"] == "rfc822; c@x.org" and c["Original-Recipient"] is None
    # No RET: the original's header only.
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Subject: the original" in returned.as_bytes() and b"body line" not in data


def test_ret_full_returns_the_whole_message_on_failure_but_never_on_success():
    failed = report.RecipientStatus("b@x.org", "failed", "5.0.0")
    msg = parse(report.build_report(reporting_mta="mx.test", recipient="a@smtpd.com", statuses=[failed],
                                    original=ORIGINAL, ret="FULL"))
    returned = msg.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload()[0]
    assert inner["Subject"] == "the original" and ".dot line" in inner.get_content()
    delivered = report.RecipientStatus("b@x.org", "delivered", "2.0.0")
    data = report.build_report(reporting_mta="mx.test", recipient="a@smtpd.com", statuses=[delivered],
                               original=ORIGINAL, ret="FULL")
    assert parse(data).get_payload()[2].get_content_type() == "text/rfc822-headers" and b"body line" not in data


def test_a_report_needs_a_recipient_and_a_known_action():
    with pytest.raises(ValueError):
        report.build_report(reporting_mta="m", recipient="a@b", statuses=[], original=ORIGINAL)
    with pytest.raises(ValueError):
        report.build_report(reporting_mta="m", recipient="a@b", original=ORIGINAL,
                            statuses=[report.RecipientStatus("b@x", "lost", "5.0.0")])


def envelope(sender: str, *recipients: Recipient) -> Envelope:
    return Envelope(helo="c", sender=sender, recipients=list(recipients), chunks=[ORIGINAL], size=len(ORIGINAL))


def test_success_notice_only_when_asked_and_only_to_a_local_sender():
    asked = Recipient("b@smtpd.com", "b", dsn=dsn.RecipientDSN(notify=frozenset({"SUCCESS"}), orcpt=("rfc822", "B@x")))
    quiet = Recipient("c@smtpd.com", "c", dsn=dsn.RecipientDSN(notify=frozenset({"FAILURE"})))
    domains = frozenset({"smtpd.com"})
    allow = lambda folder: None  # noqa: E731
    notice = success_notice(envelope("Alice@smtpd.com", asked, quiet), "Q9", "mx.test", domains, allow, now=1e9)
    assert notice.sender == "" and [(r.address, r.folder) for r in notice.recipients] == [("Alice@smtpd.com", "alice")]
    per_message, blocks = statuses_of(parse(notice.content))
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; b@smtpd.com"]
    assert blocks[0]["Original-Recipient"] == "rfc822;B@x" and blocks[0]["Action"] == "delivered"
    assert success_notice(envelope("a@smtpd.com", quiet), "Q", "mx.test", domains, allow) is None
    outside = Recipient("d@x.org", "", dsn=dsn.RecipientDSN(notify=frozenset({"SUCCESS"})), outside=True)
    assert success_notice(envelope("a@smtpd.com", outside), "Q", "mx.test", domains, allow) is None  # not yet delivered
    assert success_notice(envelope("", asked), "Q", "mx.test", domains, allow) is None  # never to <>
    assert success_notice(envelope("a@elsewhere.org", asked), "Q", "mx.test", domains, allow) is None
    assert success_notice(envelope("a@smtpd.com", asked), "Q", "mx.test", domains, lambda f: "550") is None


def test_notify_success_puts_a_delivered_dsn_into_the_local_senders_mailbox(server):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.sendmail("alice@smtpd.com", ["bob@smtpd.com", "carol@smtpd.com"], ORIGINAL,
                        mail_options=["ENVID=trip+2042"], rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
        client.sendmail("alice@smtpd.com", ["dave@smtpd.com"], ORIGINAL)  # no NOTIFY: no notice
    (notice_path,) = wait_until(lambda: server.stored("alice"), what="the delivery notice")
    msg = parse(notice_path.read_bytes().replace(b"\n", b"\r\n"))
    assert msg["Return-Path"] == "<>" and msg["Subject"] == report.SUBJECTS["delivered"]
    per_message, blocks = statuses_of(msg)
    assert per_message["Original-Envelope-Id"] == "trip 42"
    assert sorted(b["Final-Recipient"] for b in blocks) == ["rfc822; bob@smtpd.com", "rfc822; carol@smtpd.com"]
    assert all(b["Action"] == "delivered" and b["Status"] == "2.0.0" for b in blocks)
    assert len(server.stored("bob")) == len(server.stored("dave")) == 1
    wait_until(lambda: server.log_count("delivery notice") == 1, what="the notice's log line")
    assert len(server.stored("alice")) == 1


def test_the_delivered_notice_goes_to_the_senders_folder_as_mail_to_the_sender_would(start_server):
    """Under --folders address and a recipient delimiter, mail to
    alice+trips@smtpd.com lands in smtpd.com/alice: so does the notice the
    server owes that sender, not a folder alice+trips beside the domains."""
    server = start_server("--folders", "address", "--recipient-delimiter", "+")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.sendmail("alice+trips@smtpd.com", ["bob@smtpd.com"], ORIGINAL, rcpt_options=["NOTIFY=SUCCESS"])
    wait_until(lambda: server.log_count("delivery notice") == 1, what="the notice's log line")
    (notice_path,) = server.stored("smtpd.com/alice")
    assert parse(notice_path.read_bytes().replace(b"\n", b"\r\n"))["Subject"] == report.SUBJECTS["delivered"]
    assert len(server.stored("smtpd.com/bob")) == 1
    assert sorted(p.name for p in server.mail_dir.iterdir() if not p.name.startswith(".")) == ["smtpd.com"]


def test_the_notice_of_an_smtputf8_mail_carries_its_utf8_addresses(start_server):
    """RFC 6533: the "delivered" notice of an SMTPUTF8 mail names its UTF-8
    sender and recipient as they are (no "?" in their place), in a
    message/global-delivery-status part, and is itself an SMTPUTF8 mail."""
    server = start_server()
    sender, recipient = "J\u00f6rg@smtpd.com", "\u7528\u6237@smtpd.com"  # Jörg, 用户
    original = f"From: {sender}\r\nTo: {recipient}\r\nSubject: Gr\u00fc\u00dfe\r\n\r\nHall\u00f6\r\n".encode()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo()
        client.sendmail(sender, [recipient], original, mail_options=["SMTPUTF8"], rcpt_options=["NOTIFY=SUCCESS"])
    wait_until(lambda: server.log_count("delivery notice") == 1, what="the notice's log line")
    (notice_path,) = server.stored("j\u00f6rg")
    data = notice_path.read_bytes()
    notice = email.message_from_bytes(data.replace(b"\n", b"\r\n"), policy=email.policy.SMTPUTF8)
    assert notice["To"] == sender and f"To: <{sender}>\n".encode() in data
    assert " with UTF8SMTP id " in notice["Received"]
    text, status, headers = notice.get_payload()
    assert f"<{recipient}>: delivered (2.0.0)".encode() in text.get_payload(decode=True)
    assert status.get_content_type() == "message/global-delivery-status"
    assert f"Final-Recipient: utf-8; {recipient}".encode() in data
    assert headers.get_content_type() == "message/global-headers"
    assert "Subject: Gr\u00fc\u00dfe".encode() in data
    assert b"?" not in data.replace(b"Subject: Gr\xc3\xbc\xc3\x9fe", b"")  # nothing replaced by "?"


def test_only_the_header_is_quoted_when_a_binary_message_ends_it_in_a_bare_lf():
    from prefork_smtpd.report import FAILED, RecipientStatus, build_report

    original = b"From: a@smtpd.com\nSubject: raw\n\nbody \x00\xff secret\r\n"
    report = build_report(
        reporting_mta="mx.test", recipient="a@smtpd.com", original=original, ret="HDRS", queue_id="q1",
        statuses=[RecipientStatus(final_recipient="b@example.org", action=FAILED, status="5.0.0")],
    )
    assert b"secret" not in report and b"\x00" not in report
    assert b"From: a@smtpd.com\r\nSubject: raw\r\n" in report  # the header's lines end in CRLF, as a text part's must


def test_transfer_encoding_names_what_the_octets_are():
    from prefork_smtpd.report import transfer_encoding

    assert transfer_encoding(b"Subject: x\r\n\r\nplain\r\n") == "7bit"
    assert transfer_encoding("Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()) == "8bit"
    for binary in (b"a\x00b\r\n", b"bare\nLF\r\n", b"bare\rCR\r\n", b"x" * 999 + b"\r\n"):
        assert transfer_encoding(binary) == "binary", binary[:20]
    assert transfer_encoding(b"x" * 998 + b"\r\n") == "7bit"  # RFC 5322's limit, CRLF aside
