"""Session behaviour that a mutation run of session.py found unchecked.

Each test pins one decision whose opposite no other test noticed: which
refused messages count toward --max-errors, the exact 501 for a bad MAIL
parameter value, parameter names that only sort near SIZE, an empty local
part in a sender, a lone LF at the very start of the input, a refusal log
line that is shown (not masked) before any AUTH, and which reason wins when
the server's own shortage meets an oversized message.
"""

from __future__ import annotations

from sansio import Wired

from prefork_smtpd import replies
from prefork_smtpd.session import Limits, Session, State


def session(**limits) -> Wired:
    s = Wired(Session("mx.test", frozenset({"smtpd.com"}), Limits(**limits), lambda key: 0))
    s.feed(b"EHLO client.example\r\n")
    s.log.clear()
    return s


def in_data(s: Wired) -> None:
    assert s.feed(b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b>\r\nDATA\r\n").endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    assert s.state is State.DATA


def test_a_message_refused_for_the_clients_data_counts_as_an_error():
    s = session(max_message_size=1024, max_errors=2)
    in_data(s)
    out = s.feed(b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n.\r\n")
    assert out.startswith(b"552 5.3.4")
    assert s.errors == 1
    assert any(line.startswith("refused message from <a@smtpd.com> to b: 552 5.3.4") for line in s.log)


def test_a_message_refused_for_the_servers_shortage_is_no_client_error_but_is_logged():
    s = session(max_errors=1)
    in_data(s)
    s.feed(b"hello\r\n")
    s.refuse_message(replies.INSUFFICIENT_STORAGE)
    out = s.feed(b"more\r\n.\r\n")
    assert out == replies.INSUFFICIENT_STORAGE
    assert s.errors == 0 and s.state is State.READY  # max_errors=1 would have closed it
    assert any(line.startswith("refused message from <a@smtpd.com> to b: 452 4.3.1") for line in s.log)


def test_a_malformed_mail_parameter_gets_the_syntax_with_its_parameters():
    s = session()
    assert s.feed(b"MAIL FROM:<a@smtpd.com> =x\r\n") == (
        b"501 5.5.4 Syntax: MAIL FROM:<user@domain> [SIZE=n] [BODY=7BIT|8BITMIME|BINARYMIME] [SMTPUTF8] [RET=FULL|HDRS] [ENVID=xtext] [AUTH=xtext]\r\n"
    )


def test_parameters_that_sort_after_size_are_unknown_not_size():
    s = session()
    for param in (b"SOLICIT=x", b"XYZ=1", b"TRANSID=<a@b>", b"SMTPUTF9"):
        out = s.feed(b"MAIL FROM:<a@smtpd.com> " + param + b"\r\n")
        assert out.startswith(b"555 5.5.4"), (param, out)


def test_a_sender_with_an_empty_local_part_is_a_syntax_error():
    s = session()
    assert s.feed(b"MAIL FROM:<@smtpd.com>\r\n").startswith(b"501 5.1.7")


def test_a_lone_lf_first_is_answered_at_once():
    s = Wired(Session("mx.test", frozenset({"smtpd.com"}), Limits(), lambda key: 0))
    assert s.feed(b"\n").startswith(b"500 5.5.2")


def test_before_any_auth_a_refused_line_is_shown_in_the_log():
    s = session()
    s.feed(b"FROBNICATE now\r\n")
    assert s.log == ['refused "FROBNICATE now": 500 5.5.2 Error: command not recognized']
