"""The sans-IO session, without a network: every command, error and limit."""

from __future__ import annotations

import pytest
from sansio import Wired

from prefork_smtpd.events import Reply
from prefork_smtpd.session import Limits, Session, State, folder_for

STATS = {"TOTAL": 7, "CURRENT": 3, "BYTES": 1234, "MAILS": 5}


def new_session(**limits) -> Wired:
    return Wired(Session("mx.test", frozenset({"smtpd.com", "example.org"}), Limits(**limits), STATS.__getitem__))


def replies(out: bytes) -> list[str]:
    assert out.endswith(b"\r\n") or out == b""
    return [line.decode() for line in out.split(b"\r\n")[:-1]]


def codes(out: bytes) -> list[int]:
    """The code of each complete reply (multi-line replies count once)."""
    return [int(line[:3]) for line in replies(out) if line[3] == " "]


def talk(session: Session, *lines: str) -> list[int]:
    return codes(session.feed("".join(line + "\r\n" for line in lines).encode()))


def ready(**limits) -> Session:
    s = new_session(**limits)
    assert talk(s, "EHLO client.example") == [250]
    return s


def send_message(s: Session, body: bytes) -> Session:
    assert talk(s, "MAIL FROM:<a@smtpd.com>", "RCPT TO:<b@smtpd.com>", "DATA") == [250, 250, 354]
    assert s.feed(body + b"\r\n.\r\n") == b""
    return s


def test_greeting_and_ehlo_advertise_extensions():
    s = new_session(max_message_size=12345)
    assert s.greeting() == b"220 mx.test ESMTP prefork-smtpd\r\n"
    lines = replies(s.feed(b"EHLO client.example\r\n"))
    assert lines[0] == "250-mx.test Hello client.example"
    assert lines[1:] == [
        "250-PIPELINING", "250-SIZE 12345", "250-8BITMIME", "250-BINARYMIME", "250-CHUNKING", "250-SMTPUTF8",
        "250-ENHANCEDSTATUSCODES", "250-DSN", "250 HELP",
    ]


def test_full_transaction_hands_envelope_to_worker():
    s = ready()
    assert talk(s, "MAIL FROM:<Alice@SMTPD.com>", "RCPT TO:<Bob@smtpd.com>", "RCPT TO:carol", "DATA") == [
        250, 250, 250, 354
    ]
    assert s.feed(b"Subject: x\r\n\r\n..leading dot\r\n.\r\n") == b""
    assert s.state is State.WAITING
    env = s.pending
    assert env.sender == "Alice@SMTPD.com" and env.helo == "client.example"
    assert [(r.address, r.folder) for r in env.recipients] == [("Bob@smtpd.com", "bob"), ("carol", "carol")]
    assert env.content == b"Subject: x\r\n\r\n.leading dot\r\n"
    out = s.message_stored("QID1")
    assert out == b"250 2.0.0 Ok: queued as QID1\r\n"
    assert s.state is State.READY and s.pending is None


def test_pipelined_commands_all_answered_in_order_and_held_during_delivery():
    s = ready()
    out = s.feed(b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nDATA\r\nhi\r\n.\r\nNOOP\r\nQUIT\r\n")
    assert codes(out) == [250, 250, 354]
    assert s.pending is not None
    assert s.feed(b"RSET\r\n") == b""  # buffered while the store works
    assert codes(s.message_stored("Q")) == [250, 250, 221, 250][:3]  # NOOP, QUIT; RSET after QUIT is ignored
    assert s.closing


def test_every_split_of_the_input_gives_the_same_replies():
    data = b"EHLO c\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b>\r\nDATA\r\nl1\r\n.x\r\n\r\n.\r\nXSTAT mails\r\n"
    whole = new_session()
    expected = whole.feed(data)
    for cut in range(1, len(data)):
        s = new_session()
        out = s.feed(data[:cut]) + s.feed(data[cut:])
        assert out == expected, cut
        assert s.pending.content == b"l1\r\nx\r\n\r\n"


def test_seed_error_scenario_gets_rfc_replies():
    s = new_session()
    assert talk(s, "RCPT TO: rcpt@smtpd.com") == [503]
    assert talk(s, "MAIL FROM: user@smtp.com") == [503]
    assert talk(s, "DATA") == [503]
    assert talk(s, "EHLO") == [501]
    assert talk(s, "EHLO user") == [250]
    code = replies(s.feed(b"MAIL FROM: user\r\n"))[0]
    assert code == "501 5.1.7 Syntax: MAIL FROM:<user@domain>"
    assert talk(s, "RCPT TO:") == [503]
    assert talk(s, "INVALID COMMAND") == [500]
    assert replies(s.feed(b"XSTAT\r\n")) == ["501 5.5.4 Syntax: XSTAT TOTAL|CURRENT|BYTES|MAILS|PROXIED|QUEUE|QUEUEAGE|TLS"]


@pytest.mark.parametrize(
    "line, reply",
    [
        ("MAIL FROM:<a@smtpd.com.evil>", "550 5.7.1"),
        ("MAIL FROM:<a@evil.com>", "550 5.7.1"),
        ("MAIL FROM:<>", "250 2.1.0"),
        ("MAIL FROM: <a@SmTpD.CoM>", "250 2.1.0"),
        ("MAIL FROM:a@example.org", "250 2.1.0"),
        ("MAIL FROM:<a@smtpd.com> SIZE=100 BODY=8BITMIME", "250 2.1.0"),
        ("MAIL FROM:<a@smtpd.com> SIZE=2000", "552 5.3.4"),
        ("MAIL FROM:<a@smtpd.com> FOO=bar", "555 5.5.4"),
        ("MAIL FROM:<a@smtpd.com> FOO", "555 5.5.4"),
        # A known parameter with a bad value is a syntax error, not an unknown one.
        ("MAIL FROM:<a@smtpd.com> SIZE=-1", "501 5.5.4"),
        ("MAIL FROM:<a@smtpd.com> SIZE=abc", "501 5.5.4"),
        ("MAIL FROM:<a@smtpd.com> SIZE", "501 5.5.4"),
        ("MAIL FROM:<a@smtpd.com> size=", "501 5.5.4"),
        ("MAIL FROM:<a@smtpd.com> SIZE=1e3", "501 5.5.4"),
        ("MAIL FROM:<a@smtpd.com> SIZE=+5", "501 5.5.4"),
        ("MAIL FROM:<a@smtpd.com> SIZE=\u0661", "501 5.5.4"),  # a non-ASCII digit
        ("MAIL FROM:<a@smtpd.com> SIZE=" + "1" * 21, "501 5.5.4"),  # RFC 1870: at most 20 digits
        ("MAIL FROM:<a@smtpd.com> BODY=BINARYMIME", "250 2.1.0"),
        ("MAIL FROM:<a@smtpd.com> BODY=BINARY", "501 5.5.4"),
        ("MAIL FROM:<a@smtpd.com> BODY", "501 5.5.4"),
        ("MAIL FROM:<a@smtpd.com", "501 5.5.4"),
        ("MAIL TO:<a@smtpd.com>", "501 5.5.4"),
        ("MAIL FROM:<a b@smtpd.com>", "501 5.1.7"),
        # A parameter given twice with two values: which would count is a guess.
        ("MAIL FROM:<a@smtpd.com> BODY=8BITMIME BODY=7BIT", "501 5.5.4 Syntax: BODY given twice"),
        ("MAIL FROM:<a@smtpd.com> SIZE=10 size=20", "501 5.5.4 Syntax: SIZE given twice"),
        ("MAIL FROM:<a@smtpd.com> AUTH=<> AUTH=a@smtpd.com", "501 5.5.4 Syntax: AUTH given twice"),
        # The same value twice is no contradiction (smtplib repeats SMTPUTF8).
        ("MAIL FROM:<a@smtpd.com> SMTPUTF8 SMTPUTF8", "250 2.1.0"),
        ("MAIL FROM:<a@smtpd.com> BODY=8BITMIME body=8bitmime SIZE=10 SIZE=10", "250 2.1.0"),
    ],
)
def test_mail_from(line, reply):
    s = ready(max_message_size=1024)
    assert replies(s.feed(line.encode() + b"\r\n"))[0].startswith(reply)


@pytest.mark.parametrize(
    "rcpt, reply",
    [
        ("<bob@smtpd.com>", "250 2.1.5"),
        ("bob", "250 2.1.5"),
        ("<Postmaster>", "250 2.1.5"),
        ("<bob@other.com>", "550 5.7.1"),
        ("<bob@smtpd.com.evil>", "550 5.7.1"),
        ("<../x>", "553 5.1.3"),
        ("<../../etc@smtpd.com>", "553 5.1.3"),
        ("<a/b@smtpd.com>", "553 5.1.3"),
        ("<bob@bad_domain!>", "501 5.1.3"),
        ("<.hidden>", "553 5.1.3"),
        ("<" + "x" * 65 + "@smtpd.com>", "553 5.1.3"),
        ('<"a b"@smtpd.com>', "553 5.1.3"),
        ("<a\x01b>", "553 5.1.3"),
        ("<>", "501 5.5.4"),
        ("", "501 5.5.4"),
        ("<bob@smtpd.com> FOO=bar", "555 5.5.4"),  # DSN's NOTIFY/ORCPT only: tests/test_dsn.py
    ],
)
def test_rcpt_to(rcpt, reply):
    s = ready()
    talk(s, "MAIL FROM:<a@smtpd.com>")
    assert replies(s.feed(f"RCPT TO:{rcpt}\r\n".encode()))[0].startswith(reply)


def test_folder_mapping_is_lowercase_and_safe():
    assert folder_for("John.Doe") == "john.doe"
    for bad in ("..", ".", "a..b", "a/b", "", "a\x00", "\u00e9/", "x" * 65, "a.", ".a"):
        assert folder_for(bad) is None, bad


def test_data_without_valid_recipient():
    s = ready()
    assert talk(s, "MAIL FROM:<a@smtpd.com>", "RCPT TO:<x@other.com>", "DATA") == [250, 550, 554]
    s = ready()
    assert talk(s, "MAIL FROM:<a@smtpd.com>", "DATA") == [250, 503]


def test_sequence_and_repeats():
    s = ready()
    assert talk(s, "EHLO u", "MAIL FROM:<u@smtpd.com>", "MAIL FROM:<u@smtpd.com>", "RCPT TO:<r>", "RCPT TO:<r>") == [
        250, 250, 503, 250, 250
    ]
    assert talk(s, "DATA") == [354]
    s.feed(b"x\r\n.\r\n")
    assert [r.folder for r in s.pending.recipients] == ["r", "r"]  # the store dedupes by folder


def test_rset_helo_noop_help_vrfy_quit_and_not_implemented():
    s = ready()
    assert talk(s, "MAIL FROM:<a@smtpd.com>", "RSET", "RCPT TO:<b>") == [250, 250, 503]
    assert talk(s, "RSET x") == [501]
    assert talk(s, "noop", "HELO client") == [250, 250]
    assert replies(s.feed(b"HELO client\r\n")) == ["250 mx.test Hello client"]
    assert codes(s.feed(b"HELP\r\n")) == [214]
    assert replies(s.feed(b"VRFY bob\r\n"))[0].startswith("252 2.5.0")
    assert talk(s, "EXPN list", "STARTTLS") == [502, 502]
    assert talk(s, "QUIT") == [221]
    assert s.closing and s.feed(b"NOOP\r\n") == b""


def test_xstat_reads_the_counters_case_insensitively():
    s = new_session()
    assert replies(s.feed(b"XSTAT total\r\nXSTAT Current\r\nXSTAT BYTES\r\nxstat mails\r\n")) == [
        "250 2.0.0 total connections: 7",
        "250 2.0.0 current connections: 3",
        "250 2.0.0 total bytes of data transferred: 1234",
        "250 2.0.0 total mails sent: 5",
    ]
    assert talk(s, "XSTAT FOO") == [501]


def test_xstat_help_and_syntax_name_every_statistic_it_answers():
    from prefork_smtpd.session import XSTAT_TEXT

    s = Wired(Session("mx.test", frozenset({"smtpd.com"}), Limits(), lambda key: 0))
    (syntax,) = replies(s.feed(b"XSTAT\r\n"))
    help_lines = [line for line in replies(s.feed(b"HELP\r\n")) if line.startswith("214-2.0.0 XSTAT ")]
    assert len(help_lines) == 1
    for key in XSTAT_TEXT:  # QUEUE and QUEUEAGE among them
        assert talk(s, f"XSTAT {key}") == [250]
        assert key in syntax.removeprefix("501 5.5.4 Syntax: XSTAT ").split("|")
        assert key in help_lines[0].split()[2].rstrip(":").split("|")
    assert {"QUEUE", "QUEUEAGE"} <= set(XSTAT_TEXT)


def test_empty_message():
    s = send_message(ready(), b"")
    # "DATA\r\n" then ".\r\n": the body above is b"" + b"\r\n.\r\n" -> one empty line
    assert s.pending.content == b"\r\n"
    s = ready()
    talk(s, "MAIL FROM:<a@smtpd.com>", "RCPT TO:<b>", "DATA")
    s.feed(b".\r\n")
    assert s.pending.content == b""


def test_crlf_dot_crlf_ends_data_but_lf_dot_lf_does_not():
    s = ready()
    talk(s, "MAIL FROM:<a@smtpd.com>", "RCPT TO:<b>", "DATA")
    assert s.feed(b"line\n.\nMAIL FROM:<evil@smtpd.com>\r\n") == b""
    assert s.state is State.DATA  # no smuggled end of data
    out = s.feed(b".\r\n")
    assert replies(out)[0].startswith("550 5.6.0")
    assert s.state is State.READY and s.pending is None


def test_bare_cr_in_data_and_bare_lf_in_command():
    s = ready()
    talk(s, "MAIL FROM:<a@smtpd.com>", "RCPT TO:<b>", "DATA")
    assert replies(s.feed(b"a\rb\r\n.\r\n"))[0].startswith("550 5.6.0")
    assert replies(s.feed(b"NOOP\n"))[0].startswith("500 5.5.2")
    assert replies(s.feed(b"NO\rOP\r\n"))[0].startswith("500 5.5.2")


def test_command_line_limit():
    s = ready(max_command_line=600)
    assert talk(s, "NOOP " + "x" * 590) == [250]
    assert talk(s, "NOOP " + "x" * 600) == [500]
    # An endless line is not buffered: it is cut and answered once it ends.
    out = s.feed(b"A" * 5000)
    assert out == b"" and len(s._buf) == 0
    assert codes(s.feed(b"A" * 5000 + b"\r\nNOOP\r\n")) == [500, 250]


def test_text_line_limit():
    s = ready(max_text_line=1000)
    talk(s, "MAIL FROM:<a@smtpd.com>", "RCPT TO:<b>", "DATA")
    s.feed(b"x" * 998 + b"\r\n.\r\n")
    assert s.pending is not None
    s.message_stored("Q")
    talk(s, "MAIL FROM:<a@smtpd.com>", "RCPT TO:<b>", "DATA")
    assert replies(s.feed(b"x" * 999 + b"\r\n.\r\n"))[0].startswith("500 5.5.6")
    talk(s, "MAIL FROM:<a@smtpd.com>", "RCPT TO:<b>", "DATA")
    for _ in range(20):
        assert s.feed(b"y" * 4096) == b""
    assert len(s._buf) < 2
    assert replies(s.feed(b"\r\n.\r\n"))[0].startswith("500 5.5.6")


def test_message_size_limit_and_session_goes_on():
    s = ready(max_message_size=2048)
    talk(s, "MAIL FROM:<a@smtpd.com>", "RCPT TO:<b>", "DATA")
    out = b""
    for _ in range(100):
        out += s.feed(b"z" * 78 + b"\r\n")
    assert out == b"" and s._chunks == []
    assert replies(s.feed(b".\r\n"))[0].startswith("552 5.3.4")
    assert talk(s, "MAIL FROM:<a@smtpd.com>") == [250]


def test_recipient_limit():
    s = ready(max_recipients=3)
    talk(s, "MAIL FROM:<a@smtpd.com>")
    assert talk(s, *[f"RCPT TO:<u{i}>" for i in range(5)]) == [250, 250, 250, 452, 452]
    assert talk(s, "DATA") == [354]
    s.feed(b"x\r\n.\r\n")
    assert len(s.pending.recipients) == 3


def test_too_many_errors_closes_with_421():
    s = new_session(max_errors=3)
    out = s.feed(b"BAD\r\nBAD\r\nBAD\r\nNOOP\r\n")
    assert codes(out) == [500, 500, 500, 421]
    assert s.closing


def test_nul_and_non_utf8_get_a_reply():
    s = ready()
    assert talk(s, "FOO\x00BAR") == [500]
    assert codes(s.feed(b"\xff\xfe\r\n")) == [500]
    assert codes(s.feed(b"MAIL FROM:<\xc3\xa9@smtpd.com>\r\n")) == [553]  # UTF-8 without SMTPUTF8
    assert codes(s.feed(b"MAIL FROM:<\xe9@smtpd.com> SMTPUTF8\r\n")) == [553]  # not UTF-8


def test_delivery_failure_reply_and_counts():
    s = send_message(ready(), b"hello")
    out = s.message_failed(Reply(b"451 4.3.0 Error: local error in processing\r\n"))
    assert codes(out) == [451]
    assert s.replies_4xx == 1 and s.state is State.READY


def test_timeout_and_shutdown_replies_close():
    s = ready()
    assert s.timeout_reply().startswith(b"421 4.4.2")
    assert s.closing
    s = ready()
    assert s.shutdown_reply().startswith(b"421 4.3.2")


@pytest.mark.parametrize(
    "name",
    [
        "client.example", "localhost", "MX.Example.COM", "a-b.c", "xn--bcher-kva.example", "mx.example.com.",
        "host_1.corp.example",  # underscores: real hosts use them
        "192.0.2.1", "[192.0.2.1]", "[IPv6:2001:db8::1]", "[ipv6:::1]", "[IPv6:::ffff:192.0.2.1]",
        "a" * 63 + ".example", ".".join(["a" * 63] * 4),
    ],
)
def test_helo_accepts_a_domain_or_an_address_literal(name):
    for verb in ("EHLO", "HELO"):
        s = new_session()
        assert replies(s.feed(f"{verb} {name}\r\n".encode()))[0] == f"250{'-' if verb == 'EHLO' else ' '}mx.test Hello {name}"
        assert s.helo == name


@pytest.mark.parametrize(
    "name",
    [
        "a)(b;c", "mx.google.com(209.85.220.41)", "mx.example.com;", "a..b", ".a", "-a.example", "a-.example",
        "a" * 64 + ".example", ".".join(["a" * 63] * 4) + ".b", "\u00e9.example", "a@b", "a/b", "*", '"x"',
        "[192.0.2.999]", "[192.0.2.1", "192.0.2.1]", "[192.0.2]", "[foo]", "[IPv6:zz::1]", "[IPv6:192.0.2.1]",
        "[IPv6:fe80::1%eth0]", "[Tag:content]", "[]",
    ],
)
def test_helo_refuses_a_name_that_is_neither(name):
    """It would go into the Received header as it is: forged trace data."""
    for verb in ("EHLO", "HELO"):
        s = new_session()
        assert replies(s.feed(f"{verb} {name}\r\n".encode()))[0].startswith("501 5.5.4"), verb
        assert s.state is State.CONNECTED and s.helo == ""


def test_refused_helo_keeps_the_session_as_it_was():
    s = ready()
    assert talk(s, "MAIL FROM:<a@smtpd.com>", "EHLO a)(b;c", "RCPT TO:<b>", "DATA") == [250, 501, 250, 354]
    s.feed(b"x\r\n.\r\n")
    assert s.pending.helo == "client.example"
