"""Message framing in the sans-IO session, whatever the reads look like.

The end of data is ``CRLF . CRLF`` and nothing else; a bare CR or LF never
ends a line, however the bytes are cut into reads. Every split point of
every smuggling variant is tried here, and the reply to a refused message
must not depend on where the reads were cut.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sansio import Wired

from prefork_smtpd import replies
from prefork_smtpd.session import Limits, Session, State, has_long_line

# An end of data that is not CRLF . CRLF: each would let a second mail be
# smuggled past a server that accepts it and into one that does not.
SMUGGLING_ENDINGS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r"]

HEAD = b"EHLO c\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nDATA\r\n"
SMUGGLED = b"MAIL FROM:<admin@smtpd.com>\r\nRCPT TO:<smuggled>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n"


def smuggling_attempt(ending: bytes) -> bytes:
    return HEAD + b"Subject: t\r\n\r\nhello" + ending + SMUGGLED


def new_session(**limits) -> Wired:
    return Wired(Session("mx.test", frozenset({"smtpd.com"}), Limits(**limits), lambda key: 0))


def drive(chunks) -> tuple[bytes, list]:
    """Feed the chunks in turn; store every complete message at once."""
    s = new_session()
    out, stored = b"", []
    for chunk in chunks:
        out += s.feed(chunk)
        while s.pending is not None:
            stored.append(s.pending)
            out += s.message_stored("Q")
    return out, stored


def pieces(data: bytes, cuts) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def final_replies(out: bytes) -> list[bytes]:
    return [line[:9] for line in out.split(b"\r\n") if line[3:4] == b" "]


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS, ids=repr)
def test_smuggling_attempt_unsplit_is_one_refused_message(ending):
    out, stored = drive([smuggling_attempt(ending)])
    assert stored == []
    assert final_replies(out) == [b"250 HELP", b"250 2.1.0", b"250 2.1.5", b"354 End d", b"550 5.6.0", b"221 2.0.0"]


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS, ids=repr)
def test_smuggling_attempt_every_single_and_double_split(ending):
    data = smuggling_attempt(ending)
    expected, _ = drive([data])
    for cut in range(1, len(data)):
        out, stored = drive(pieces(data, [cut]))
        assert (out, stored) == (expected, []), cut
    # Two cuts anywhere around the fake ending (the interesting region).
    mark = len(HEAD) + len(b"Subject: t\r\n\r\nhello")
    region = range(mark - 4, mark + len(ending) + 4)
    for a, b in itertools.combinations(region, 2):
        out, stored = drive(pieces(data, [a, b]))
        assert (out, stored) == (expected, []), (a, b)
    out, stored = drive([data[i : i + 1] for i in range(len(data))])  # one byte per read
    assert (out, stored) == (expected, [])


def test_bare_lf_then_dot_crlf_in_the_next_read_does_not_end_the_message():
    """The split that broke: a bare LF ends one read, ``.\\r\\n`` opens the next."""
    s = new_session()
    s.feed(HEAD)
    assert s.feed(b"Subject: t\r\n\r\nhello\n") == b""
    assert s.feed(b".\r\nMAIL FROM:<admin@smtpd.com>\r\n") == b""
    assert s.state is State.DATA and s.pending is None
    assert s.feed(b"\r\n.\r\n").startswith(b"550 5.6.0")


def test_endless_line_cut_short_then_dot_crlf_does_not_end_the_message():
    """Over the line limit the head of a line is dropped: what follows is still mid-line."""
    s = new_session()
    s.feed(HEAD)
    assert s.feed(b"x" * 3000) == b""
    assert s.feed(b"\n") == b""  # a bare LF after the dropped head
    assert s.feed(b".\r\nMAIL FROM:<admin@smtpd.com>\r\n") == b""
    assert s.state is State.DATA
    assert s.feed(b"\r\n.\r\n").startswith(b"550 5.6.0")


def test_crlf_split_between_cr_and_lf_still_ends_the_message():
    s = new_session()
    s.feed(HEAD)
    for chunk in (b"hello\r", b"\n", b".", b"\r", b"\n"):
        assert s.feed(chunk) == b""
    assert s.pending is not None and s.pending.content == b"hello\r\n"


# A refused message has one reply whatever the split: a bare CR or LF wins
# over a long line, which wins over the size limit (the first is a framing
# error, the others are limits).
REFUSALS = [
    (b"x" * 1200 + b"\r\nbare\nlf\r\n", b"550 5.6.0"),
    (b"bare\nlf\r\n" + b"x" * 1200 + b"\r\n", b"550 5.6.0"),
    (b"x" * 1200 + b"\rbare cr inside the long line\r\n", b"550 5.6.0"),
    (b"x" * 600 + b"\r" + b"x" * 600 + b"\r\n", b"550 5.6.0"),
    (b"x" * 1200 + b"\r\n" + b"y\r\n" * 1000, b"500 5.5.6"),
    (b"y\r\n" * 1000 + b"x" * 1200 + b"\r\n", b"500 5.5.6"),
    (b"y\r\n" * 1000 + b"bare\rcr\r\n", b"550 5.6.0"),
]


@pytest.mark.parametrize("body, reply", REFUSALS, ids=lambda v: repr(v)[:30])
def test_refused_message_gets_the_same_reply_at_every_split(body, reply):
    data = HEAD + body + b".\r\nNOOP\r\n"
    limits = {"max_message_size": 2048}

    def run(chunks):
        s = new_session(**limits)
        out = b"".join(s.feed(c) for c in chunks)
        assert s.pending is None
        return out

    expected = run([data])
    assert final_replies(expected)[-2:] == [reply, b"250 2.0.0"]
    for cut in range(len(HEAD), len(data)):
        assert run(pieces(data, [cut])) == expected, cut


# A command line is refused as framed badly exactly when it does not end with
# CRLF or holds a CR before it: the straightforward reading of RFC 5321 2.3.8,
# against which the session's one-scan check is compared.
COMMAND_PIECES = st.lists(st.sampled_from([b"NOOP", b"RSET", b" ", b"x", b"\r", b"\x00"]), max_size=8)


@settings(max_examples=500, deadline=None)
@given(COMMAND_PIECES)
@example([])  # "\n": an empty line ending with a bare LF
@example([b"\r"])  # "\r\n": an empty command, framed right
@example([b"\r", b"\r"])
@example([b"NOOP", b"\r", b"x", b"\r"])
def test_a_command_line_is_refused_as_bare_exactly_when_its_crlf_is_missing_or_not_its_only_cr(pieces):
    line = b"".join(pieces) + b"\n"  # one line: _run cuts at LF
    framed_right = line.endswith(b"\r\n") and b"\r" not in line[:-2]
    s = new_session()
    s.feed(b"EHLO c\r\n")
    reply = s.feed(line)
    assert (reply == replies.BARE_LINE_END_IN_COMMAND) == (not framed_right), (line, reply)


def has_long_line_by_translation(seg: bytes, limit: int) -> bool:
    """The search has_long_line replaced: every octet but LF made "a", then a
    run of ``limit`` "a"s looked for (one copy of the whole run of lines)."""
    if len(seg) <= limit:
        return False
    return b"a" * limit in seg.translate(bytes(0x0A if i == 0x0A else 0x61 for i in range(256)))


LINE_PIECES = st.lists(st.sampled_from([b"x", b"xxxxxxx", b"\r\n", b"\n", b"\r", b"."]), max_size=40)


@settings(max_examples=1000, deadline=None)
@given(LINE_PIECES, st.integers(min_value=1, max_value=30))
@example([b"xxxxxxx", b"\n"], 7)  # a line of 8 octets, LF included
@example([b"xxxxxxx", b"\n"], 8)
@example([b"\n", b"xxxxxxx", b"x", b"\n", b"x", b"\n"], 8)
def test_a_long_line_is_found_where_the_plain_reading_finds_it(pieces, limit):
    seg = b"".join(pieces)
    assert has_long_line(seg, limit) == has_long_line_by_translation(seg, limit), (seg, limit)
    whole_lines = seg + b"\n"  # as the session passes them: each line with its LF
    plainly = any(len(line) + 1 > limit for line in whole_lines.split(b"\n")[:-1])
    assert has_long_line(whole_lines, limit) == plainly, (whole_lines, limit)
