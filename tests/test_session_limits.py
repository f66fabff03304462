"""Every limit at its exact boundary: the limit passes, one more octet does not.

Each limit is tried as a whole read and cut at every byte, since the
session applies some limits before a line is complete.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from sansio import Wired

from prefork_smtpd.session import Limits, Session

MAX = 2048


def session(**limits) -> Wired:
    s = Wired(Session("mx.test", frozenset({"smtpd.com"}), Limits(**limits), lambda key: 0))
    s.feed(b"EHLO client.example\r\n")
    return s


def every_split(data: bytes):
    yield [data]
    for cut in range(1, len(data)):
        yield [data[:cut], data[cut:]]


def feed_all(s: Wired, chunks: list[bytes]) -> bytes:
    return b"".join(s.feed(chunk) for chunk in chunks)


def command_of(octets: int) -> bytes:
    """A NOOP line of exactly ``octets`` octets, CRLF included."""
    line = b"NOOP " + b"x" * (octets - 7) + b"\r\n"
    assert len(line) == octets
    return line


def test_command_line_of_512_octets_passes_and_513_does_not():
    assert Limits().max_command_line == 512  # RFC 5321 4.5.3.1.4, CRLF included
    for octets, code in ((511, b"250 2.0.0"), (512, b"250 2.0.0"), (513, b"500 5.5.6")):
        for chunks in every_split(command_of(octets)):
            s = session()
            assert feed_all(s, chunks)[:9] == code, (octets, [len(c) for c in chunks])


def test_command_line_limit_follows_the_setting():
    for chunks in every_split(command_of(600)):
        assert feed_all(session(max_command_line=600), chunks)[:3] == b"250"
        assert feed_all(session(max_command_line=599), chunks)[:3] == b"500"


def test_size_parameter_equal_to_the_maximum_passes_and_one_more_does_not():
    s = session(max_message_size=MAX)
    assert s.feed(f"MAIL FROM:<a@smtpd.com> SIZE={MAX}\r\n".encode())[:9] == b"250 2.1.0"
    s = session(max_message_size=MAX)
    assert s.feed(f"MAIL FROM:<a@smtpd.com> SIZE={MAX + 1}\r\n".encode())[:9] == b"552 5.3.4"


def transaction(s: Wired, body: bytes, chunks_of=None) -> bytes:
    out = s.feed(b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nDATA\r\n")
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    data = body + b".\r\n"
    return feed_all(s, chunks_of(data) if chunks_of else [data])


def stuffed_message(size: int) -> tuple[bytes, bytes]:
    """(as sent, as stored): ``size`` octets once unstuffed, every line dot-stuffed."""
    line = b"." + b"." + b"x" * 76 + b"\r\n"  # sent as 80 octets, stored as 79 (".xxx")
    count, rest = divmod(size, 79)
    stored = line[1:] * count + b"y" * (rest - 2) + b"\r\n" if rest >= 2 else line[1:] * count
    sent = line * count + (b"y" * (rest - 2) + b"\r\n" if rest >= 2 else b"")
    assert len(stored) == size and len(sent) > size
    return sent, stored


def test_message_size_counts_octets_after_dot_unstuffing():
    sent, stored = stuffed_message(MAX)
    for chunks_of in (None, lambda d: [d[i : i + 7] for i in range(0, len(d), 7)]):
        s = session(max_message_size=MAX)
        assert transaction(s, sent, chunks_of) == b""
        assert s.pending.content == stored and s.pending.size == MAX
        s.message_stored("Q")
    sent, _ = stuffed_message(MAX + 1)
    s = session(max_message_size=MAX)
    assert transaction(s, sent)[:9] == b"552 5.3.4"


def unstuffed(sent: bytes) -> bytes:
    return b"".join(line[1:] if line.startswith(b".") else line for line in sent.splitlines(keepends=True))


def test_text_line_of_1000_octets_passes_and_1001_does_not():
    assert Limits().max_text_line == 1000  # RFC 5321 4.5.3.1.6, CRLF included
    for line, ok in (
        (b"x" * 998 + b"\r\n", True),
        (b"." + b"x" * 997 + b"\r\n", True),  # the limit is on the line as sent, stuffing dot included
        (b"x" * 999 + b"\r\n", False),
        (b"." + b"x" * 998 + b"\r\n", False),
    ):
        for body in (line, line + b"next\r\n", b"prev\r\n" + line):
            for chunks in every_split(body + b".\r\n"):
                s = session()
                out = transaction(s, b"", lambda data: chunks)
                if ok:
                    assert out == b"" and s.pending.content == unstuffed(body), len(chunks[0])
                else:
                    assert out[:9] == b"500 5.5.6", len(chunks[0])


def test_recipient_domain_in_mixed_case_is_served():
    s = session()
    out = s.feed(b"MAIL FROM:<a@SmTpD.cOm>\r\nRCPT TO:<b@SMTPD.Com>\r\nRCPT TO:<C@Smtpd.COM>\r\n")
    assert out == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"


# ------------------------------------------------------------- properties
# Lines as sent (a lone "." would end the message, so it is sent stuffed: "..").
LINE = st.one_of(
    st.sampled_from([b"", b"..", b"...", b".x", b"x"]),
    st.builds(lambda n, dot: (b"." if dot else b"") + b"x" * n, st.integers(1, 80), st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(LINE, min_size=1, max_size=40), st.sampled_from([-1, 0, 1]), st.lists(st.integers(0, 5000), max_size=6))
def test_size_limit_sits_exactly_on_the_unstuffed_size(lines, delta, cuts):
    sent = b"".join(line + b"\r\n" for line in lines)
    stored = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
    limit = len(stored) - delta  # delta 1: one octet over; 0: exactly; -1: one under
    data = sent + b".\r\n"
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    s = session(max_message_size=limit)
    out = transaction(s, b"", lambda _: chunks)
    if delta <= 0:
        assert out == b"" and s.pending.content == stored and s.pending.size == len(stored)
    else:
        assert out[:9] == b"552 5.3.4" and s.pending is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([1, 2, 500, 997, 998, 999, 1000, 1001]), min_size=1, max_size=6),
    st.lists(st.integers(0, 10_000), max_size=6),
)
def test_text_line_limit_sits_exactly_on_1000_octets(lengths, cuts):
    """Lines of limit - 1, limit and limit + 1 octets, CRLF included, cut anywhere."""
    sent = b"".join(b"x" * (n - 2) + b"\r\n" for n in lengths)
    data = sent + b".\r\n"
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    s = session()
    out = transaction(s, b"", lambda _: chunks)
    if max(lengths) <= 1000:
        assert out == b"" and s.pending.content == sent
    else:
        assert out[:9] == b"500 5.5.6"


def hops_message(received: int) -> bytes:
    trace = b"".join(b"Received: from hop%d.example by mx.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n" % i
                     for i in range(received))
    return trace + b"Subject: round and round\r\n\r\nReceived: a line of the body, not a hop\r\n"


def test_max_hops_received_fields_pass_and_one_more_is_a_mail_loop():
    assert Limits().max_hops == 100  # RFC 5321 6.3: "normally at least 100"
    for limit in (1, 5, 100):
        for count, expect in ((limit, b""), (limit + 1, b"554 5.4.6 ")):
            s = session(max_hops=limit)
            out = transaction(s, hops_message(count))
            assert out[:10] == expect, (limit, count, out)
            assert (s.pending is None) == bool(expect)
            if expect:
                assert b"a mail loop" in out and s.errors == 1
                assert any("refused message from <a@smtpd.com> to b: 554 5.4.6" in line for line in s.log), s.log
                assert s.feed(b"MAIL FROM:<a@smtpd.com>\r\n")[:3] == b"250"  # the session goes on


def test_max_hops_counts_a_bdat_message_too():
    s = session(max_hops=3)
    message = hops_message(4)
    out = s.feed(b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\n")
    out = s.feed(b"BDAT 10\r\n" + message[:10] + b"BDAT %d LAST\r\n" % (len(message) - 10) + message[10:])
    assert out.endswith(b"554 5.4.6 Error: too many hops (more than 3 Received header fields); a mail loop?\r\n")
    assert s.pending is None
