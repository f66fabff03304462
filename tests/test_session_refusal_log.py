"""Every refused command and message leaves a log line: what was sent and the reply.

Secrets never do: AUTH arguments and any line that may answer an AUTH
challenge are hidden.
"""

from __future__ import annotations

import pytest
from sansio import Wired

from prefork_smtpd.session import Limits, Session

SECRET = "AHVzZXIAaHVudGVyMg=="  # base64 of "\0user\0hunter2"


def session(**limits) -> Wired:
    s = Wired(Session("mx.test", frozenset({"smtpd.com"}), Limits(**limits), lambda key: 0))
    s.feed(b"EHLO client.example\r\n")
    s.log.clear()
    return s


def refusals(s: Wired, data: bytes) -> list[str]:
    s.feed(data)
    assert not any(secret in line for line in s.log for secret in (SECRET, "dXNlcg", "aHVudGVyMg"))
    lines = [line for line in s.log if line.startswith("refused")]
    s.log.clear()
    return lines


@pytest.mark.parametrize(
    "setup, line, logged",
    [
        (b"MAIL FROM:<a@smtpd.com>\r\n", b"RCPT TO:<bob@other.com>",
         'refused "RCPT TO:<bob@other.com>": 550 5.7.1 Error: relay access denied; recipient domain not served here'),
        (b"MAIL FROM:<a@smtpd.com>\r\n", b"RCPT TO:<../x>", 'refused "RCPT TO:<../x>": 553 5.1.3 '),
        (b"", b"MAIL FROM:<a@smtpd.com> SIZE=2049", 'refused "MAIL FROM:<a@smtpd.com> SIZE=2049": 552 5.3.4 '),
        (b"", b"MAIL FROM:<a@evil.com>", 'refused "MAIL FROM:<a@evil.com>": 550 5.7.1 '),
        (b"", b"RCPT TO:<b>", 'refused "RCPT TO:<b>": 503 5.5.1 Error: need MAIL command'),
        (b"", b"FROB\x00\x1b[2J", 'refused "FROB\\x00\\x1b[2J": 500 5.5.2 '),  # control characters escaped
        (b"", b"EHLO a)(b;c", 'refused "EHLO a)(b;c": 501 5.5.4 '),
        (b"", b"NOOP\n", 'refused "NOOP\\n": 500 5.5.2 '),
    ],
)
def test_refused_command_is_logged_with_the_line_and_the_reply(setup, line, logged):
    s = session(max_message_size=2048)
    s.feed(setup)
    s.log.clear()
    (entry,) = refusals(s, line if line.endswith(b"\n") else line + b"\r\n")
    assert entry.startswith(logged), entry


def test_too_many_recipients_is_logged():
    s = session(max_recipients=1)
    s.feed(b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b>\r\n")
    assert refusals(s, b"RCPT TO:<c>\r\n") == ['refused "RCPT TO:<c>": 452 4.5.3 Error: too many recipients']


def test_a_very_long_line_is_logged_cut_short():
    s = session()
    (entry,) = refusals(s, b"NOOP " + b"x" * 5000 + b"\r\n")
    assert entry.startswith('refused "NOOP xxx') and entry.endswith(": 500 5.5.6 Error: command line too long")
    assert len(entry) < 400
    # The same when the line arrives in pieces and its head is dropped.
    for _ in range(10):
        assert refusals(s, b"y" * 1000) == []
    (entry,) = refusals(s, b"\r\n")
    assert entry.startswith('refused "yyy') and len(entry) < 400


@pytest.mark.parametrize(
    "body, reply",
    [
        (b"bare\nlf\r\n", "550 5.6.0 Error: bare CR or LF in message data"),
        (b"x" * 1200 + b"\r\n", "500 5.5.6 Error: message line too long"),
        (b"y\r\n" * 1000, "552 5.3.4 Error: message size exceeds fixed maximum message size"),
    ],
)
def test_refused_message_is_logged_with_its_envelope(body, reply):
    s = session(max_message_size=2048)
    s.feed(b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<Bob@smtpd.com>\r\nRCPT TO:<carol>\r\nDATA\r\n")
    (entry,) = refusals(s, body + b".\r\n")
    assert entry.startswith(f"refused message from <a@smtpd.com> to bob,carol: {reply}"), entry


def test_auth_arguments_and_what_follows_auth_are_never_logged():
    s = session()
    log = refusals(s, f"AUTH PLAIN {SECRET}\r\n".encode())
    assert log == ['refused "AUTH [arguments hidden]": 502 5.5.1 Error: command not implemented']
    # AUTH LOGIN: the client may send its answers without waiting for a 334.
    log = refusals(s, b"AUTH LOGIN\r\ndXNlcg==\r\naHVudGVyMg==\n" + f"auth plain {SECRET}".encode() + b"\r\n")
    assert log[0].startswith('refused "AUTH [arguments hidden]": 502')
    assert log[1].startswith("refused [a line after AUTH, hidden]: 500 5.5.2")
    assert log[2].startswith("refused [a line after AUTH, hidden]: 500 5.5.2")  # with a bare LF too
    assert log[3].startswith('refused "AUTH [arguments hidden]": 502')
    # A known command ends the exchange: lines after it are shown again.
    log = refusals(s, b"*\r\nNOOP\r\nFROB\r\n")
    assert log[0].startswith("refused [a line after AUTH, hidden]") and log[1].startswith('refused "FROB"')
    log = refusals(s, f" auth\tPLAIN {SECRET}\r\n{SECRET}\r\n".encode())  # odd spacing: still hidden
    assert log[0].startswith('refused "AUTH [arguments hidden]": 500 5.5.2')
    assert log[1].startswith("refused [a line after AUTH, hidden]: 500 5.5.2")
    log = refusals(s, b"AUTH PLAIN " + b"A" * 13000 + b"\r\n")  # AUTH lines may reach 12288 (RFC 4954 4)
    assert log == ['refused "AUTH [arguments hidden]": 500 5.5.6 Error: command line too long']


def test_too_many_errors_is_still_logged_after_the_refusals():
    s = session(max_errors=2)
    s.feed(b"FROB\r\nFROB\r\n")
    assert [line.split(":")[0] for line in s.log] == ['refused "FROB"', 'refused "FROB"', "too many errors (2); closing"]
