"""What a client can make a worker hold stays bounded."""

from __future__ import annotations

from harness import DOMAIN
from prefork_smtpd.session import Limits, Session, State


# ------------------------------------------ the session's hooks, without a network
FULL = b"452 4.3.1 Error: insufficient system storage\r\n"


def in_rcpt() -> Session:
    s = Session("mx.test", frozenset({DOMAIN}), Limits(max_errors=2), lambda key: 0)
    s.feed(b"EHLO x\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<r>\r\n")
    assert s.state is State.RCPT
    return s


def test_session_refuses_data_when_the_worker_says_so_without_counting_an_error():
    s = in_rcpt()
    s.admit_message = lambda: FULL
    for _ in range(3):  # more than max_errors: the session stays open
        assert s.feed(b"DATA\r\n") == FULL
    assert s.state is State.RCPT and not s.closing and s.replies_4xx == 3
    s.admit_message = lambda: None
    assert s.feed(b"DATA\r\n").startswith(b"354")


def test_session_refused_message_discards_the_rest_and_answers_at_the_dot():
    s = in_rcpt()
    s.feed(b"DATA\r\n")
    assert s.feed(b"line one\r\nline two\r\n") == b""
    assert s.held_bytes == len(b"line one\r\nline two\r\n")
    s.refuse_message(FULL)
    assert s.held_bytes == 0
    assert s.feed(b"more\r\n" * 1000) == b"" and s.held_bytes == 0
    for _ in range(3):  # more than max_errors, all answered, none closes the session
        assert s.feed(b".\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<r>\r\nDATA\r\n") == (
            FULL + b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        )
        s.refuse_message(FULL)
    assert s.errors == 0 and not s.closing
    assert s.feed(b".\r\n") == FULL


def test_session_hands_back_what_was_pipelined_behind_a_message():
    s = in_rcpt()
    assert s.feed(b"DATA\r\nhello\r\n.\r\nNOOP\r\nNOO") == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert s.state is State.DELIVERING and s.held_bytes == 0 and s.pending.size == 7
    assert s.take_unread() == b"NOOP\r\nNOO"
    assert s.message_stored("Q1") == b"250 2.0.0 Ok: queued as Q1\r\n"  # nothing else answered
    assert s.feed(b"NOOP\r\nNOOP\r\n") == b"250 2.0.0 Ok\r\n" * 2
