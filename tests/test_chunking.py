"""BDAT (RFC 3030) in the sans-IO session: framing, limits, sequence.

A chunk is exactly the octets its BDAT line announces, whatever they
hold, however the client's bytes are cut into reads: every split point of
chunk headers and data is tried, and random splits by hypothesis.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sansio import Wired

from prefork_smtpd import replies
from prefork_smtpd.chunking import Chunk, parse_bdat
from prefork_smtpd.session import Limits, Session, State

HEAD = b"EHLO c\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\n"
BINARY_HEAD = b"EHLO c\r\nMAIL FROM:<a@smtpd.com> BODY=BINARYMIME\r\nRCPT TO:<b@smtpd.com>\r\n"


def new_session(**limits) -> Wired:
    limits.setdefault("max_errors", 1000)
    return Wired(Session("mx.test", frozenset({"smtpd.com"}), Limits(**limits), lambda key: 0))


def bdat(*chunks: bytes, last: bool = True) -> bytes:
    """The chunks as a client pipelines them, the last one with LAST."""
    out = b""
    for i, chunk in enumerate(chunks):
        marker = b" LAST" if last and i == len(chunks) - 1 else b""
        out += b"BDAT %d%s\r\n" % (len(chunk), marker) + chunk
    return out


def drive(pieces, **limits) -> tuple[bytes, list]:
    """Feed the pieces in turn; store every complete message at once."""
    s = new_session(**limits)
    out, stored = b"", []
    for piece in pieces:
        out += s.feed(piece)
        while s.pending is not None:
            stored.append(s.pending)
            out += s.message_stored("Q")
    return out, stored


def codes(out: bytes) -> list[bytes]:
    return [line[:9] for line in out.split(b"\r\n") if line[3:4] == b" "]


def split(data: bytes, cuts) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# ------------------------------------------------------------ the parser
@pytest.mark.parametrize("arg, parsed", [
    ("0", (0, False)), ("10", (10, False)), ("10 LAST", (10, True)), ("10 last", (10, True)),
    ("0 LAST", (0, True)), ("9" * 20, (int("9" * 20), False)),
    ("10  LAST", (10, True)), ("10\tLAST", (10, True)), ("10 \t LAST", (10, True)),  # as "BDAT  10" is taken
])
def test_bdat_arguments_that_parse(arg, parsed):
    assert parse_bdat(arg) == parsed


@pytest.mark.parametrize("arg", ["", "LAST", "-1", "1.5", "10 LASTX", "10 LAST x", "10LAST", "x10", "9" * 21, "10 FIRST"])
def test_bdat_arguments_that_do_not(arg):
    assert parse_bdat(arg) is None


def test_a_chunk_takes_exactly_its_size_across_reads():
    chunk = Chunk(5, last=False)
    assert chunk.take(b"abc", 1) == 3 and chunk.left == 3 and not chunk.complete
    assert chunk.take(b"defghi", 0) == 3 and chunk.complete
    assert Chunk(0, last=True).complete


# --------------------------------------------------------- the transaction
def test_no_dot_stuffing_and_no_end_of_data_line():
    """A body with CRLF . CRLF inside (and a line of two dots) is the message, octet for octet."""
    body = b"Subject: t\r\n\r\nline\r\n.\r\n..two\r\nQUIT\r\n.\r\n"
    out, stored = drive([HEAD + bdat(body[:17], body[17:]) + b"NOOP\r\n"])
    assert codes(out) == [b"250 HELP", b"250 2.1.0", b"250 2.1.5", b"250 2.0.0", b"250 2.0.0", b"250 2.0.0"]
    assert out.endswith(b"250 2.0.0 Ok: queued as Q\r\n250 2.0.0 Ok\r\n")
    assert stored[0].content == body and stored[0].size == len(body)


def test_a_chunk_may_hold_what_looks_like_commands_and_a_crlf_may_straddle_chunks():
    body = b"a\r\nRSET\r\nQUIT\r\nb\r\n"
    out, stored = drive([HEAD + bdat(b"a\r", b"\nRSET\r\nQUIT", b"\r", b"\nb\r\n") + b"QUIT\r\n"])
    assert b"221 2.0.0" in out and out.count(b"221") == 1
    assert stored[0].content == body


def test_blanks_between_the_bdat_arguments_are_taken_as_around_them():
    # "BDAT  7" was taken and "BDAT 7  LAST" closed the connection: both are one chunk now.
    out, stored = drive([HEAD + b"BDAT  7\r\nhello\r\nBDAT 2 \t LAST\r\nhi"])
    assert [m.content for m in stored] == [b"hello\r\nhi"]
    assert codes(out)[-2:] == [b"250 2.0.0", b"250 2.0.0"] and b"421" not in out


def test_bdat_0_last_ends_the_message():
    out, stored = drive([HEAD + b"BDAT 7\r\nhello\r\nBDAT 0 LAST\r\n"])
    assert stored[0].content == b"hello\r\n"
    assert out.endswith(b"250 2.0.0 Ok: 7 octets received\r\n250 2.0.0 Ok: queued as Q\r\n")


def test_a_message_need_not_end_with_crlf():
    out, stored = drive([HEAD + bdat(b"Subject: x\r\n\r\nno newline")])
    assert stored[0].content == b"Subject: x\r\n\r\nno newline"


def test_many_chunks_as_exchange_sends_them():
    body = b"".join(b"line %d\r\n" % i for i in range(500))
    chunks = [body[i : i + 97] for i in range(0, len(body), 97)]
    out, stored = drive([HEAD + bdat(*chunks)])
    assert out.count(b"octets received") == len(chunks) - 1
    assert stored[0].content == body


def test_text_messages_keep_the_crlf_rule_and_the_line_limit():
    out, stored = drive([HEAD + bdat(b"bare\nlf\r\n") + b"RSET\r\n"])
    assert stored == [] and b"550 5.6.0" in out and out.endswith(b"250 2.0.0 Ok\r\n")
    out, stored = drive([HEAD + bdat(b"x" * 1001 + b"\r\n") + b"RSET\r\n"])
    assert stored == [] and b"500 5.5.6" in out
    out, stored = drive([HEAD + bdat(b"ends in a cr\r")])
    assert stored == [] and b"550 5.6.0" in out


def test_binarymime_is_any_octets_stored_as_received():
    body = bytes(range(256)) * 8 + b"\n.\n\r.\r" + b"y" * 3000
    out, stored = drive([BINARY_HEAD + bdat(body[:1000], body[1000:])])
    assert stored[0].content == body and stored[0].binary


def test_binarymime_refuses_data():
    s = new_session()
    s.feed(BINARY_HEAD)
    assert s.feed(b"DATA\r\n") == b"503 5.5.1 Error: BODY=BINARYMIME needs BDAT, not DATA\r\n"
    assert s.state is State.RCPT


def test_bdat_and_data_are_not_mixed():
    s = new_session()
    s.feed(HEAD)
    assert s.feed(b"BDAT 3\r\nab\n") == b"550 5.6.0 Error: bare CR or LF in message data; lines must end with CRLF\r\n"
    s.feed(b"RSET\r\n" + HEAD[8:])
    assert s.feed(b"BDAT 4\r\nab\r\n") == b"250 2.0.0 Ok: 4 octets received\r\n"
    assert s.feed(b"DATA\r\n") == b"503 5.5.1 Error: DATA after BDAT in one transaction\r\n"
    assert s.feed(b"RCPT TO:<c@smtpd.com>\r\n") == b"503 5.5.1 Error: BDAT transfer in progress\r\n"
    assert s.feed(b"BDAT 4 LAST\r\ncd\r\n") == b""
    assert s.pending.content == b"ab\r\ncd\r\n"


def test_size_limit_counts_every_chunk_and_answers_552_at_once():
    """The chunk that passes the limit gets 552; chunks pipelined behind are
    read and discarded (503), so the session stays in step; RSET starts over."""
    limit = 1024
    chunk = b"x" * 398 + b"\r\n"
    stream = HEAD + bdat(chunk, chunk, chunk, b"RCPT TO:<evil@smtpd.com>\r\n") + b"RSET\r\n"
    out, stored = drive([stream], max_message_size=limit)
    assert stored == []
    assert codes(out)[3:] == [b"250 2.0.0", b"250 2.0.0", b"552 5.3.4", b"503 5.5.1", b"250 2.0.0"]
    assert b"chunk discarded after a failed chunk; send RSET" in out
    # then a new transaction goes through
    out, stored = drive([stream + HEAD[8:] + bdat(chunk)], max_message_size=limit)
    assert stored and stored[0].content == chunk


def test_a_chunk_over_the_limit_is_discarded_without_being_held():
    s = new_session(max_message_size=1024)
    s.feed(HEAD + b"BDAT 100000 LAST\r\n")
    s.feed(b"x" * 98 + b"\r\n" + b"y" * 98 + b"\r\n")
    assert s.held_bytes == 200 and s.state is State.DATA
    s.feed((b"x" * 98 + b"\r\n") * 499)
    assert s.held_bytes == 0 and s.state is State.DATA  # past the limit: nothing more is kept
    assert s.feed((b"y" * 98 + b"\r\n") * 499 + b"NOOP\r\n") == replies.MESSAGE_TOO_BIG + replies.OK


def test_held_bytes_count_chunks_and_the_servers_refusal_comes_at_the_next_chunk():
    s = new_session()
    s.feed(HEAD + b"BDAT 10\r\n0123456789")
    assert s.state is State.CHUNKS and s.held_bytes == 10
    s.feed(b"BDAT 6\r\nab")
    assert s.state is State.DATA and s.held_bytes == 12
    s.refuse_message(replies.INSUFFICIENT_STORAGE)  # the worker's memory for data is full
    assert s.held_bytes == 0
    assert s.feed(b"cd\r\n") == replies.INSUFFICIENT_STORAGE
    assert s.errors == 0 and s.state is State.READY
    assert s.feed(b"BDAT 2 LAST\r\nzz") == replies.CHUNK_AFTER_FAILURE


def test_the_first_chunk_asks_for_room():
    s = new_session()
    s.admit_message = lambda: replies.INSUFFICIENT_STORAGE
    s.feed(HEAD)
    assert s.feed(b"BDAT 4 LAST\r\nab\r") == b""
    assert s.feed(b"\n") == replies.INSUFFICIENT_STORAGE
    assert s.pending is None and s.state is State.READY


@pytest.mark.parametrize("state_bytes, reply", [
    (b"", replies.NEED_HELO),
    (b"EHLO c\r\n", replies.NEED_MAIL),
    (b"EHLO c\r\nMAIL FROM:<a@smtpd.com>\r\n", replies.NEED_RCPT),
    (b"EHLO c\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<x@evil.example>\r\n", replies.NO_VALID_RECIPIENTS),
])
def test_a_chunk_out_of_sequence_is_read_and_discarded_never_run(state_bytes, reply):
    smuggled = b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nDATA\r\nx\r\n.\r\n"
    s = new_session()
    s.feed(state_bytes)
    state = s.state
    out = s.feed(b"BDAT %d LAST\r\n" % len(smuggled) + smuggled)
    assert out == reply and s.pending is None and s.state is state


def test_a_bdat_line_without_a_size_closes_the_session():
    s = new_session()
    s.feed(HEAD)
    out = s.feed(b"BDAT x\r\nMAIL FROM:<a@smtpd.com>\r\n")
    assert out == b"501 5.5.4 Syntax: BDAT size [LAST]\r\n421 4.5.0 mx.test Error: the end of the BDAT chunk is unknown; closing\r\n"
    assert s.closing


def test_rset_ehlo_and_quit_end_a_chunked_transaction():
    for end, code in ((b"RSET\r\n", b"250"), (b"EHLO c\r\n", b"250"), (b"QUIT\r\n", b"221")):
        s = new_session()
        assert s.feed(HEAD + b"BDAT 4\r\nab\r\n").endswith(b"250 2.0.0 Ok: 4 octets received\r\n")
        assert s.state is State.CHUNKS and s.held_bytes == 4
        assert s.feed(end).startswith(code)
        assert s.held_bytes == 0 and s.pending is None


# ------------------------------------------------------- every split point
STREAM = (
    HEAD + b"BDAT 12\r\nSubject: \r\n\r" + b"BDAT 9\r\n\n.\r\n..\r\nx" + b"BDAT 0\r\n" + b"BDAT 4 last\r\n\r\n.\r"
    + b"NOOP\r\n" + BINARY_HEAD[8:] + bdat(b"\n\x00\r", b".\r\n") + b"QUIT\r\n"
)


def test_every_single_split_of_headers_and_data_gives_the_same_answers():
    whole_out, whole_stored = drive([STREAM])
    assert codes(whole_out) == [
        b"250 HELP", b"250 2.1.0", b"250 2.1.5", b"250 2.0.0", b"250 2.0.0", b"250 2.0.0", b"550 5.6.0",
        b"250 2.0.0", b"250 2.1.0", b"250 2.1.5", b"250 2.0.0", b"250 2.0.0", b"221 2.0.0",
    ]
    assert [m.content for m in whole_stored] == [b"\n\x00\r.\r\n"]
    for cut in range(1, len(STREAM)):
        out, stored = drive(split(STREAM, [cut]))
        assert out == whole_out, cut
        assert [m.content for m in stored] == [b"\n\x00\r.\r\n"], cut


def test_every_pair_of_splits_around_the_chunk_headers():
    whole_out, whole_stored = drive([STREAM])
    assert whole_out.count(b"octets received") == 4 and [m.content for m in whole_stored] == [b"\n\x00\r.\r\n"]
    start = len(HEAD)
    for a in range(start, start + 40):
        for b in range(a + 1, start + 60):
            out, _ = drive(split(STREAM, [a, b]))
            assert out == whole_out, (a, b)


LINES = st.lists(st.sampled_from([b"hello", b".", b"..", b"", b"QUIT", b"BDAT 5", b"x" * 200]), max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    lines=LINES,
    chunk_cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=6),
    read_cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
    binary=st.booleans(),
)
def test_any_chunking_and_any_reads_store_the_message_octet_for_octet(lines, chunk_cuts, read_cuts, binary):
    body = b"".join(line + b"\r\n" for line in lines)
    chunks = split(body, [c for c in chunk_cuts if c < len(body)]) if body else [b""]
    stream = (BINARY_HEAD if binary else HEAD) + bdat(*chunks) + b"NOOP\r\n"
    out, stored = drive(split(stream, [c for c in read_cuts if 0 < c < len(stream)]))
    assert len(stored) == 1 and stored[0].content == body and stored[0].size == len(body)
    assert out.endswith(b"250 2.0.0 Ok: queued as Q\r\n250 2.0.0 Ok\r\n")
    assert out.count(b"octets received") == len(chunks) - 1


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=300),
    chunk_cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=5),
    read_cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_any_octets_in_any_reads_get_the_same_answers_as_in_one_read(data, chunk_cuts, read_cuts):
    """Text or not, the replies and what is stored never depend on the reads."""
    chunks = split(data, [c for c in chunk_cuts if c < len(data)]) if data else [b""]
    stream = HEAD + bdat(*chunks) + b"NOOP\r\n"
    whole_out, whole_stored = drive([stream], max_message_size=200, max_text_line=1000)
    out, stored = drive(split(stream, [c for c in read_cuts if 0 < c < len(stream)]), max_message_size=200)
    assert out == whole_out
    assert [m.content for m in stored] == [m.content for m in whole_stored]
    assert out.endswith(b"250 2.0.0 Ok\r\n")  # in step: the NOOP behind is answered as a command


def test_many_one_octet_chunks_are_held_in_few_pieces():
    """A message sent as one-octet chunks (BINARYMIME) or two-octet lines
    (text) is held in a few gathered pieces, not one object per chunk:
    each object costs some 40 bytes, so 10 MiB of one-octet chunks would
    hold 400 MiB while the data memory limit counts 10 MiB."""
    import tracemalloc

    for body_param, piece in ((" BODY=BINARYMIME", b"x"), ("", b"\r\n")):
        wired = new_session(max_message_size=10 * 1024 * 1024)
        wired.feed(b"EHLO c\r\nMAIL FROM:<a@smtpd.com>" + body_param.encode() + b"\r\nRCPT TO:<bob@smtpd.com>\r\n")
        count = 100_000
        chunks = f"BDAT {len(piece)}\r\n".encode("ascii").join([b""] + [piece] * count)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        wired.feed(chunks)
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert wired.session.held_bytes == count * len(piece)
        # The octets themselves, and the session's read buffer (as large as the read).
        assert held < 2 * len(chunks), held
        wired.feed(b"BDAT 0 LAST\r\n")
        assert wired.pending is not None
        assert wired.pending.content == piece * count
        assert len(wired.pending.chunks) <= 5
