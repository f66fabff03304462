"""The session's outputs as events: their types, their order, the one waiting state."""

from __future__ import annotations

import dataclasses

import pytest

from prefork_smtpd import replies
from prefork_smtpd.events import Close, Deliver, LogEvent, Reply, Stored, StoreFailed
from prefork_smtpd.session import Limits, Session, State

TRANSACTION = b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nDATA\r\n"


def ready(**limits) -> Session:
    s = Session("mx.test", frozenset({"smtpd.com"}), Limits(**limits), lambda key: 0)
    events = s.feed(b"EHLO client.example\r\n")
    assert [type(e) for e in events] == [LogEvent, Reply]
    return s


def test_pipelined_commands_give_one_reply_each_in_order():
    s = ready()
    events = s.feed(b"NOOP\r\nRSET\r\n" * 3 + b"XSTAT TOTAL\r\n")
    assert events == [replies.OK] * 6 + [b"250 2.0.0 total connections: 0\r\n"]
    assert all(type(e) is Reply for e in events)
    assert events[0] is replies.OK  # a constant reply is shared, not built per command


def test_a_refusal_is_logged_before_its_reply():
    s = ready()
    assert s.feed(b"RCPT TO:<b>\r\n") == [
        LogEvent('refused "RCPT TO:<b>": 503 5.5.1 Error: need MAIL command'),
        replies.NEED_MAIL,
    ]


def test_a_message_waits_for_the_store_and_resumes_with_its_verdict():
    s = ready()
    events = s.feed(TRANSACTION + b"hello\r\n.\r\nNOOP\r\n")
    assert events[:3] == [replies.SENDER_OK, replies.RECIPIENT_OK, replies.START_DATA]
    (deliver,) = events[3:]
    assert type(deliver) is Deliver and deliver.envelope.content == b"hello\r\n"
    assert s.state is State.WAITING and s.awaiting is deliver
    assert s.feed(b"NOOP\r\n") == []  # kept until the verdict
    assert s.message_stored("Q1") == [replies.queued("Q1"), replies.OK, replies.OK]
    assert s.state is State.READY and s.awaiting is None


def test_a_failed_store_answers_its_reply_and_the_session_goes_on():
    s = ready()
    s.feed(TRANSACTION + b"hello\r\n.\r\n")
    assert s.resume(StoreFailed(replies.LOCAL_ERROR)) == [replies.LOCAL_ERROR]
    assert s.state is State.READY
    assert s.feed(TRANSACTION)[-1] == replies.START_DATA  # the old transaction is gone


def test_a_verdict_nobody_waits_for_is_refused_and_changes_nothing():
    s = ready()
    with pytest.raises(ValueError):
        s.resume(Stored("Q"))
    assert s.state is State.READY
    s.feed(TRANSACTION + b"x\r\n.\r\n")
    waiting = s.awaiting
    with pytest.raises(ValueError):
        s.resume(object())  # type: ignore[arg-type]  # not a verdict Deliver names
    assert s.state is State.WAITING and s.awaiting is waiting
    assert s.resume(Stored("Q")) == [replies.queued("Q")]


def test_quit_closes_with_its_last_words_and_nothing_follows():
    s = ready()
    assert s.feed(b"NOOP\r\nQUIT\r\nNOOP\r\n") == [replies.OK, Close(replies.bye("mx.test"))]
    assert s.state is State.CLOSED
    assert s.feed(b"NOOP\r\n") == []


def test_too_many_errors_close_after_the_last_refusal():
    s = ready(max_errors=2)
    assert s.feed(b"FROB\r\nFROB\r\nNOOP\r\n") == [
        LogEvent('refused "FROB": 500 5.5.2 Error: command not recognized'),
        replies.UNKNOWN_COMMAND,
        LogEvent('refused "FROB": 500 5.5.2 Error: command not recognized'),
        replies.UNKNOWN_COMMAND,
        LogEvent("too many errors (2); closing"),
        Close(replies.too_many_errors("mx.test")),
    ]


def test_events_are_frozen_values():
    s = ready()
    (close,) = s.feed(b"QUIT\r\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        close.reply = b"250 fine\r\n"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        replies.OK.extra = 1  # type: ignore[attr-defined]
    assert Close(b"x") == Close(b"x") and LogEvent("a") != LogEvent("b")
