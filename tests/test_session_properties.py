"""Property tests of the sans-IO session: random commands, random byte splits."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sansio import Wired

from prefork_smtpd.session import Limits, Session, State

REPLY_LINE = re.compile(rb"\d{3}[ -][^\r\n]*\r\n")

MAX_SIZE = 3000  # small, so that a few long lines reach it
COMMAND_LINE, TEXT_LINE = Limits().max_command_line, Limits().max_text_line

# Commands, and lines one octet under, at and over each limit (CRLF included).
COMMANDS = st.sampled_from([
    b"EHLO c", b"HELO c", b"EHLO", b"EHLO a)(b", b"EHLO [127.0.0.1]", b"MAIL FROM:<a@smtpd.com>", b"MAIL FROM:<>",
    b"MAIL FROM:<a@evil.com>", b"MAIL FROM:<a@smtpd.com> SIZE=99999999", b"MAIL FROM:<a@smtpd.com> SIZE=-1",
    *[b"MAIL FROM:<a@smtpd.com> SIZE=%d" % (MAX_SIZE + d) for d in (-1, 0, 1)],
    b"RCPT TO:<b@smtpd.com>", b"RCPT TO:<b>", b"RCPT TO:<../x>", b"RCPT TO:<b@SMTPD.Com>",
    b"RCPT TO:<x@other.org>", b"RSET", b"NOOP", b"HELP", b"VRFY b", b"XSTAT TOTAL", b"XSTAT nope", b"EXPN x",
    b"AUTH PLAIN AHVzZXIAcGFzcw==", b"BOGUS", b"", b"\x00\xff", b"NOOP " + b"x" * 600, b"mail from:<a@SMTPD.COM>",
    *[b"NOOP " + b"x" * (COMMAND_LINE + d - 7) for d in (-1, 0, 1)],
])
BODY_LINES = st.lists(
    st.sampled_from([
        b"hello", b".dot", b"..two", b"", b".", b"x" * 1200, b"bare\nlf", b"cr\rhere", b"x\n.", b"\r.\r",
        *[b"x" * (TEXT_LINE + d - 2) for d in (-1, 0, 1)],
        *[b"." + b"x" * (TEXT_LINE + d - 3) for d in (-1, 0, 1)],
    ]),
    max_size=6,
)


def new_session(**kw) -> Wired:
    limits = Limits(max_recipients=3, max_errors=1000, max_message_size=MAX_SIZE, **kw)
    return Wired(Session("mx.test", frozenset({"smtpd.com"}), limits, lambda k: 1))


@st.composite
def conversations(draw):
    parts = []
    for _ in range(draw(st.integers(0, 25))):
        if draw(st.booleans()) and draw(st.integers(0, 3)) == 0:
            parts.append(b"DATA\r\n" + b"".join(line + b"\r\n" for line in draw(BODY_LINES)) + b".\r\n")
        else:
            parts.append(draw(COMMANDS) + b"\r\n")
    if draw(st.booleans()):
        parts.append(b"QUIT\r\n")
    return b"".join(parts)


def drive(session: Wired, chunks: list[bytes]) -> bytes:
    """Feed chunks, storing each complete message at once, as a worker would."""
    out = b""
    for chunk in chunks:
        out += session.feed(chunk)
        while session.pending is not None:
            check_invariants(session)
            out += session.message_stored("Q")
        check_invariants(session)
    return out


def check_invariants(s: Wired) -> None:
    assert (s.pending is not None) == (s.state is State.WAITING)
    if s.state in (State.MAIL, State.RCPT, State.DATA, State.WAITING):
        assert s._envelope is not None
    if s.state in (State.RCPT, State.DATA, State.WAITING):
        assert 1 <= len(s._envelope.recipients) <= 3
    if s.closing:
        assert s.state is State.CLOSED
    # Nothing grows without bound: at most a line under the limits is kept.
    assert len(s._buf) <= 2000 or s.state in (State.WAITING, State.CLOSED)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


# Found by hypothesis: a line over the text limit cut by a read before its
# end, then a bare LF; the reply was 500 5.5.6 or 550 5.6.0 by the split.
LONG_LINE_THEN_BARE_LF = (
    b"EHLO c\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b>\r\nNOOP " + b"x" * 600 + b"\r\nDATA\r\n"
    + b"x" * 1200 + b"\r\nbare\nlf\r\n.\r\nEHLO c\r\n"
)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(conversations(), st.lists(st.integers(0, 10_000), max_size=12))
@example(LONG_LINE_THEN_BARE_LF, [1660])
def test_any_split_gives_the_same_well_formed_replies(data, cuts):
    whole = drive(new_session(), [data])
    pieces = drive(new_session(), split(data, cuts))
    assert pieces == whole
    assert REPLY_LINE.sub(b"", whole) == b""  # only whole, well-formed reply lines


@settings(max_examples=300, deadline=None)
@given(st.lists(COMMANDS, max_size=30))
def test_every_command_line_gets_exactly_one_reply(lines):
    s = new_session()
    out = drive(s, [b"".join(line + b"\r\n" for line in lines)])
    finals = [m for m in REPLY_LINE.findall(out) if m[3:4] == b" "]
    assert len(finals) == len(lines)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=8))
def test_random_bytes_never_raise(data, cuts):
    s = new_session()
    s.feed(b"EHLO x\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b>\r\n")
    drive(s, split(data, cuts))
