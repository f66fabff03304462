"""Counting Received fields (mail loops, RFC 5321 6.3): the same count however the message is cut."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from prefork_smtpd.hops import received_fields


def plainly(message: bytes) -> int:
    """The count the slow way: the whole header, line by line."""
    header = message.split(b"\r\n\r\n", 1)[0] + b"\r\n" if not message.startswith(b"\r\n") else b""
    return sum(1 for line in header.split(b"\r\n") if re.match(rb"received[ \t]{0,8}:", line, re.IGNORECASE))


def cut(message: bytes, cuts: list[int]) -> list[bytes | bytearray]:
    points = sorted({c % (len(message) + 1) for c in cuts})
    bounds = [0, *points, len(message)]
    return [bytearray(message[a:b]) if i % 2 else message[a:b] for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


_lines = st.sampled_from([
    b"Received: from a by b; Thu, 1 Jan 2026 00:00:00 +0000", b"RECEIVED:x", b"received \t :x", b"Received         :x",
    b"\tReceived: folded, not a field", b"X-Received: no", b"Subject: Received: no", b"Received", b"", b"body line",
    b"Received: " + b"x" * 300,
])


@given(st.lists(_lines, max_size=40), st.lists(st.integers(min_value=0), max_size=12))
def test_any_cut_counts_as_the_whole_message(lines, cuts):
    message = b"".join(line + b"\r\n" for line in lines)
    assert received_fields(cut(message, cuts), 1000) == plainly(message)


def test_only_the_header_counts_and_counting_stops_past_the_limit():
    header = b"Received: x\r\n" * 3
    assert received_fields([header + b"\r\n" + b"Received: in the body\r\n" * 5], 100) == 3
    assert received_fields([b"\r\nReceived: no header, all body\r\n"], 100) == 0
    assert received_fields([b"Received: x\r\n" * 1000], 10) == 11
    assert received_fields([], 10) == 0
    # Cut inside the empty line that ends the header, and inside a field name.
    assert received_fields([b"Received: a\r\n\r", b"\nReceived: body\r\n"], 10) == 1
    assert received_fields([b"X: y\r\nRecei", b"ved: b\r\n\r\n"], 10) == 1
    assert received_fields([b"X: y\r\n", b"\r\n", b"Received: body\r\n"], 10) == 0
    # A field name whole at the end of one piece: counted once, not again with the next.
    assert received_fields([b"X: y\r\nReceived:", b" x\r\n\r\n"], 10) == 1
    # An empty first piece, then a message without a header.
    assert received_fields([b"", b"\r\nReceived: body\r\n"], 10) == 0


def test_a_header_ending_in_a_bare_lf_ends_there_however_cut():
    """A BINARYMIME message is kept as received: its header may end in LF LF.
    Its body was counted as header, Received lines in a forwarded part too."""
    message = b"Received: a\nReceived: b\n\nReceived: in the body\n" * 1
    for at in range(len(message) + 1):
        assert received_fields([message[:at], message[at:]], 10) == 2, at
    assert received_fields([b"Received: a\r\n\nReceived: body\r\n"], 10) == 1  # CRLF, then a bare LF
