"""The reply catalogue: every reply is well formed, whatever its arguments."""

from __future__ import annotations

import re

import pytest

from prefork_smtpd import replies
from prefork_smtpd.events import Reply

# code SP|- [enhanced code SP] text CRLF; an enhanced code's class is its reply's (RFC 3463 3.1).
LINE = re.compile(rb"([2-5][0-9][0-9])([ -])(?:([245])\.[0-9]{1,3}\.[0-9]{1,3} )?[\x20-\x7e]*\r\n")
CONSTANTS = {name: value for name, value in vars(replies).items() if isinstance(value, Reply)}
BUILT = {
    "greeting": replies.greeting("mx.test"),
    "bye": replies.bye("mx.test"),
    "timeout": replies.timeout("mx.test"),
    "shutting_down": replies.shutting_down("mx.test"),
    "too_many_errors": replies.too_many_errors("mx.test"),
    "connection_refused": replies.connection_refused("mx.test", "too many connections"),
    "hello": replies.hello("mx.test", "client.example"),
    "queued": replies.queued("Q1"),
    "statistic": replies.statistic("total mails sent", 5),
    "unsupported_mail_parameter": replies.unsupported_mail_parameter("FOO"),
    "syntax_error": replies.syntax_error("VRFY address", "5.1.3"),
    "multiline": replies.multiline(214, "2.0.0", ["one", "two", "three"]),
    "multiline_no_status": replies.multiline(250, None, ["mx.test Hello c", "PIPELINING"]),
}


def lines_of(reply: bytes) -> list[re.Match]:
    found = list(LINE.finditer(reply))
    assert b"".join(m.group(0) for m in found) == reply, reply
    return found


@pytest.mark.parametrize("name, reply", sorted({**CONSTANTS, **BUILT}.items()))
def test_every_reply_is_well_formed(name, reply):
    assert isinstance(reply, Reply)
    found = lines_of(reply)
    codes = {m.group(1) for m in found}
    assert codes == {str(reply.code).encode()}, name  # one code on every line
    assert [m.group(2) for m in found] == [b"-"] * (len(found) - 1) + [b" "], name  # only the last has a space
    for m in found:
        if m.group(3) is not None:
            assert m.group(3) == m.group(1)[:1], name


def test_the_catalogue_has_the_replies_session_and_worker_send():
    assert len(CONSTANTS) >= 25
    assert replies.INSUFFICIENT_STORAGE == b"452 4.3.1 Error: insufficient system storage\r\n"
    assert replies.syntax_error("DATA") is replies.syntax_error("DATA")  # built once, then shared
    assert repr(replies.OK) == "Reply(b'250 2.0.0 Ok\\r\\n')"
