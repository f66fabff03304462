"""DSN parameters (RFC 3461): xtext, MAIL's RET/ENVID, RCPT's NOTIFY/ORCPT,
kept on the envelope and recorded in the stored mail."""

from __future__ import annotations

import email
import email.policy
import smtplib

import pytest
from harness import wait_until
from hypothesis import given
from hypothesis import strategies as st
from test_session import ready, replies, talk

from prefork_smtpd import dsn


# ------------------------------------------------------------------ xtext
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255)))
def test_xtext_round_trip(text):
    encoded = dsn.xtext_encode(text)
    assert all("!" <= c <= "~" and c != "=" for c in encoded)
    assert dsn.xtext_decode(encoded) == text


@given(st.binary())
def test_random_bytes_never_crash_the_parsers(data):
    text = data.decode("latin-1")
    dsn.xtext_decode(text)
    dsn.parse_notify(text)
    dsn.parse_orcpt(text)
    for key in ("RET", "ENVID"):
        reply = dsn.MailDSN().take(key, text)
        assert reply is None or reply.code == 501
    for key in ("NOTIFY", "ORCPT"):
        reply = dsn.RecipientDSN().take(key, text)
        assert reply is None or reply.code == 501


@given(st.binary())
def test_a_decoded_value_is_never_a_header_breaker(data):
    """Whatever is accepted stays printable ASCII: no CR/LF reaches a header."""
    text = data.decode("latin-1")
    mail = dsn.MailDSN()
    if mail.take("ENVID", text) is None:
        assert all(" " <= c <= "~" for c in mail.envid)
    rcpt = dsn.RecipientDSN()
    if rcpt.take("ORCPT", "rfc822;" + text) is None:
        assert all(" " <= c <= "~" for c in rcpt.orcpt[1])


@pytest.mark.parametrize(
    "text, decoded",
    [("abc", "abc"), ("a+2Bb", "a+b"), ("+3D", "="), ("a+20b", "a b"), ("", ""),
     ("a+2b", None), ("a+2", None), ("a=b", None), ("a b", None), ("+GG", None), ("caf\xe9", None)],
)
def test_xtext_decode(text, decoded):
    assert dsn.xtext_decode(text) == decoded


@pytest.mark.parametrize(
    "value, parsed",
    [("NEVER", frozenset()), ("never", frozenset()), ("SUCCESS", {"SUCCESS"}),
     ("SUCCESS,FAILURE,DELAY", {"SUCCESS", "FAILURE", "DELAY"}), ("delay,failure", {"DELAY", "FAILURE"}),
     ("NEVER,SUCCESS", None), ("SUCCESS,NEVER", None), ("SUCCESS,SUCCESS", None), ("SUCCESS,", None),
     (",SUCCESS", None), ("", None), (None, None), ("SOMETIMES", None)],
)
def test_notify_values(value, parsed):
    assert dsn.parse_notify(value) == (None if parsed is None else frozenset(parsed))


@pytest.mark.parametrize(
    "value, parsed",
    [("rfc822;bob@example.org", ("rfc822", "bob@example.org")), ("RFC822;a+2Bb@x.org", ("rfc822", "a+b@x.org")),
     ("rfc822;", None), ("rfc822", None), (";bob@x.org", None), ("rfc822;a+0D+0Ab@x", None),
     ("rfc 822;a@x", None), ("rfc822;" + "a" * 500, None)],
)
def test_orcpt_values(value, parsed):
    assert dsn.parse_orcpt(value) == parsed


# ---------------------------------------------------------- in the session
def test_ehlo_advertises_dsn():
    s = ready()
    assert "250-DSN" in replies(s.feed(b"EHLO client.example\r\n"))


@pytest.mark.parametrize(
    "params, reply",
    [
        ("RET=FULL", "250 2.1.0"),
        ("ret=hdrs ENVID=QQ314159", "250 2.1.0"),
        ("RET=FULL RET=HDRS", "501 5.5.4 Syntax: RET given twice"),
        ("ENVID=a ENVID=b", "501 5.5.4 Syntax: ENVID given twice"),
        ("RET=ALL", "501 5.5.4 Syntax: RET=FULL|HDRS"),
        ("RET", "501 5.5.4 Syntax: RET=FULL|HDRS"),
        ("ENVID", "501 5.5.4 Syntax: ENVID="),
        ("ENVID=a+0D+0Ab", "501 5.5.4 Syntax: ENVID="),  # a CR LF would forge a header
        ("ENVID=a+2g", "501 5.5.4 Syntax: ENVID="),
        ("ENVID=" + "x" * 101, "501 5.5.4 Syntax: ENVID="),
        ("ENVID=" + "x" * 100, "250 2.1.0"),
        # a value that is no esmtp-value (empty, with "=", not ASCII): the parameter's syntax, not MAIL's
        ("ENVID=", "501 5.5.4 Syntax: ENVID="),
        ("ENVID=a=b", "501 5.5.4 Syntax: ENVID="),
        ("ENVID=\u00e9", "501 5.5.4 Syntax: ENVID="),
        ("RET=", "501 5.5.4 Syntax: RET="),
        ("SIZE=", "501 5.5.4 Syntax: SIZE="),
        ("BODY=8BIT=MIME", "501 5.5.4 Syntax: BODY="),
        ("AUTH=", "501 5.5.4 Syntax: AUTH="),
        ("SMTPUTF8=", "501 5.5.4 Syntax: SMTPUTF8"),
        ("FOO=a=b", "555 5.5.4"),
    ],
)
def test_mail_dsn_parameters(params, reply):
    s = ready()
    assert replies(s.feed(f"MAIL FROM:<a@smtpd.com> {params}\r\n".encode()))[0].startswith(reply)


@pytest.mark.parametrize(
    "params, reply",
    [
        ("NOTIFY=NEVER", "250 2.1.5"),
        ("NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx@smtpd.com", "250 2.1.5"),
        ("NOTIFY=NEVER,SUCCESS", "501 5.5.4 Syntax: NOTIFY=NEVER or"),
        ("NOTIFY=SUCCESS NOTIFY=FAILURE", "501 5.5.4 Syntax: NOTIFY given twice"),
        ("ORCPT=rfc822;a@x ORCPT=rfc822;b@x", "501 5.5.4 Syntax: ORCPT given twice"),
        ("ORCPT=rfc822", "501 5.5.4 Syntax: ORCPT="),
        ("NOTIFY=SUCCESS FOO=bar", "555 5.5.4"),
        ("NOTIFY=", "501 5.5.4 Syntax: NOTIFY="),
        ("ORCPT=rfc822;a=b", "501 5.5.4 Syntax: ORCPT="),
        ("ORCPT=rfc822;\u00e9@x", "501 5.5.4 Syntax: ORCPT="),
    ],
)
def test_rcpt_dsn_parameters(params, reply):
    s = ready()
    talk(s, "MAIL FROM:<a@smtpd.com>")
    assert replies(s.feed(f"RCPT TO:<bob@smtpd.com> {params}\r\n".encode()))[0].startswith(reply)


def test_dsn_parameters_ride_on_the_envelope():
    s = ready()
    assert talk(
        s, "MAIL FROM:<a@smtpd.com> RET=HDRS ENVID=id+2B1",
        "RCPT TO:<b@smtpd.com> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;B@smtpd.com", "RCPT TO:<c@smtpd.com>", "DATA",
    ) == [250, 250, 250, 354]
    s.feed(b"hi\r\n.\r\n")
    env = s.pending
    assert env.dsn == dsn.MailDSN(ret="HDRS", envid="id+1")
    b, c = env.recipients
    assert b.dsn.notify == {"SUCCESS", "DELAY"} and b.dsn.orcpt == ("rfc822", "B@smtpd.com")
    assert b.dsn.notify_text == "SUCCESS,DELAY" and b.dsn.orcpt_text == "rfc822;B@smtpd.com"
    assert c.dsn is None
    # Without NOTIFY the server reports failures and delays (RFC 3461 4.1), never success.
    assert dsn.RecipientDSN().wants("FAILURE") and not dsn.RecipientDSN().wants("SUCCESS")
    assert not dsn.RecipientDSN(notify=frozenset()).wants("FAILURE")


def test_a_refused_dsn_parameter_leaves_the_transaction_as_it_was():
    s = ready()
    assert talk(s, "MAIL FROM:<a@smtpd.com> RET=NONE", "RCPT TO:<b@smtpd.com>") == [501, 503]
    assert talk(s, "MAIL FROM:<a@smtpd.com>", "RCPT TO:<b@smtpd.com> NOTIFY=NEVER,DELAY", "DATA") == [250, 501, 554]


# ------------------------------------------------------ the real server
def test_smtplib_dsn_parameters_recorded_in_the_stored_mail(server):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo()
        assert client.has_extn("dsn")
        refused = client.sendmail(
            "a@smtpd.com", ["dsn@smtpd.com"], b"Subject: s\r\n\r\nhi\r\n",
            mail_options=["RET=HDRS", "ENVID=" + dsn.xtext_encode("env+id 42")],
            rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;" + dsn.xtext_encode("Original@Example.org")],
        )
    assert refused == {}
    (path,) = server.stored("dsn")
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert msg["Original-Envelope-Id"] == "env+id 42"
    assert msg["Original-Recipient"] == "rfc822;Original@Example.org"


def test_raw_client_header_injection_through_envid_is_refused(server):
    c = server.client()
    c.cmd("EHLO x.example")
    assert c.cmd("MAIL FROM:<a@smtpd.com> ENVID=x+0D+0ABcc:+20evil@x")[0] == 501
    assert c.cmd("MAIL FROM:<a@smtpd.com> ENVID=ok")[0] == 250
    assert c.cmd("RCPT TO:<inj@smtpd.com> ORCPT=rfc822;a+0Ab")[0] == 501
    assert c.cmd("RCPT TO:<inj@smtpd.com>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: s\r\n\r\nhi\r\n.\r\n")
    assert c.reply()[0] == 250
    (path,) = server.stored("inj")
    data = path.read_bytes()
    assert b"Original-Envelope-Id: ok\n" in data and b"Original-Recipient" not in data


def test_notify_and_orcpt_lengthen_the_rcpt_line_by_500(server):
    """RFC 3461 4: NOTIFY and ORCPT may make RCPT 500 characters longer
    than the 512 of RFC 5321 4.5.3.1.4. A full-length recipient with a long
    ORCPT is no "line too long"; a line past even that is."""
    client = server.client()
    assert client.cmd("EHLO c.example")[0] == 250
    assert client.cmd("MAIL FROM:<a@smtpd.com> ENVID=" + "e" * 100 + " RET=FULL")[0] == 250
    recipient = "r" * 64 + "@smtpd.com"
    line = f"RCPT TO:<{recipient}> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;{'o' * 400}@{'x' * 60}.example"
    assert 512 < len(line) + 2 <= 1012
    assert client.cmd(line) == (250, "2.1.5 Ok")
    code, text = client.cmd("RCPT TO:<b@smtpd.com> ORCPT=rfc822;" + "o" * 1000)  # beyond the extension
    assert code == 500 and "too long" in text, (code, text)
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert client.reply()[0] == 250
    (stored,) = wait_until(lambda: server.stored("r" * 64), what="the mail")
    assert f"Original-Recipient: rfc822;{'o' * 400}@{'x' * 60}.example" in stored.read_text()
