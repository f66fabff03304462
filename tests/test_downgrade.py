"""8-bit MIME to 7 bits (RFC 6152 3, RFC 2045) for a next hop without 8BITMIME.

Property tests: whatever the message, the result is 7-bit with lines of at
most 998 octets, or the message is refused with a reason; a converted
message decodes (Python's email package) to the same content, part for
part, as the original.
"""

from __future__ import annotations

import email
import email.policy
import tracemalloc
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork_smtpd.downgrade import MAX_DEPTH, MAX_HEADER, MAX_PARTS, NotConvertible, crlf_lines, seven_bit_form

LINE_LIMIT = 998


def parsed(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def leaves(message: email.message.Message) -> list[tuple[str, bytes]]:
    """(content type, decoded content) of each leaf, in order; an embedded message's too."""
    found = []
    for part in message.walk():
        if part.is_multipart() or part.get_content_type() == "message/rfc822":
            continue
        found.append((part.get_content_type(), part.get_payload(decode=True)))
    return found


def peak_memory(convert, message: bytes) -> tuple[bytes, int]:
    """``convert(message)`` and the most memory it held at once (tracemalloc)."""
    tracemalloc.start()
    try:
        return convert(message), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def assert_seven_bit(data: bytes) -> None:
    assert data.isascii()
    assert all(len(line) <= LINE_LIMIT for line in data.split(b"\r\n"))
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")


def test_an_ascii_message_is_left_octet_for_octet():
    message = b"From: a@b.example\r\nSubject: hi\r\n\r\nplain text\r\n"
    assert seven_bit_form(message) == message


def test_8bit_text_becomes_quoted_printable_with_its_line_breaks():
    message = "From: a@b.example\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n" \
              "Content-Transfer-Encoding: 8bit\r\n\r\nna\u00efve caf\u00e9 \r\n.dot\r\n".encode()
    out = seven_bit_form(message)
    assert_seven_bit(out)
    assert out.count(b"Content-Transfer-Encoding") == 1 and b"Content-Transfer-Encoding: quoted-printable" in out
    assert b"na=C3=AFve caf=C3=A9=20\r\n.dot\r\n" in out  # a trailing space survives as =20
    assert parsed(out).get_payload(decode=True) == "na\u00efve caf\u00e9 \r\n.dot\r\n".encode()


def test_a_mail_without_mime_becomes_mime_text_of_unknown_charset():
    out = seven_bit_form("Subject: x\r\n\r\n\u00e9t\u00e9\r\n".encode())
    assert_seven_bit(out)
    message = parsed(out)
    assert message["MIME-Version"] == "1.0" and message.get_content_charset() == "unknown-8bit"
    assert message.get_payload(decode=True) == "\u00e9t\u00e9\r\n".encode()


def test_a_multipart_keeps_its_boundaries_and_converts_only_its_8bit_parts():
    message = (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
        b"preamble\r\n--b1\r\nContent-Type: text/plain\r\n\r\nascii part\r\n"
        b"--b1\r\nContent-Type: text/plain; charset=latin-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\xe9t\xe9\r\n"
        b"--b1\r\nContent-Type: application/octet-stream\r\n\r\n\x00\xff\xfe\r\n"
        b"--b1--\r\nepilogue\r\n"
    )
    out = seven_bit_form(message)
    assert_seven_bit(out)
    assert out.startswith(message[: message.index(b"--b1\r\nContent-Type: text/plain; charset=latin-1")])
    assert out.endswith(b"--b1--\r\nepilogue\r\n")
    assert leaves(parsed(out)) == [
        ("text/plain", b"ascii part"), ("text/plain", b"\xe9t\xe9"), ("application/octet-stream", b"\x00\xff\xfe"),
    ]


def test_an_embedded_message_is_converted_inside_and_labelled_7bit():
    inner = "Subject: inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGr\u00fc\u00dfe\r\n".encode()
    message = (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"r\"\r\n\r\n"
        b"--r\r\nContent-Type: text/plain\r\n\r\nnotice\r\n"
        b"--r\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + inner + b"\r\n--r--\r\n"
    )
    out = seven_bit_form(message)
    assert_seven_bit(out)
    assert b"Content-Transfer-Encoding: 7bit" in out and b"Content-Transfer-Encoding: 8bit" not in out
    (embedded,) = [p for p in parsed(out).walk() if p.get_content_type() == "message/rfc822"]
    assert embedded.get_payload(0)["Subject"] == "inner"
    assert embedded.get_payload(0).get_payload(decode=True) == "Gr\u00fc\u00dfe\r\n".encode()


@pytest.mark.parametrize("message, reason", [
    ("Subject: caf\u00e9\r\n\r\nbody\u00e9\r\n".encode(), "8-bit octets in a header"),
    (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n\xe9\r\n", "labelled base64"),
    (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: binary\r\n\r\n\xe9\r\n", "labelled binary"),
    (b"Content-Type: multipart/mixed\r\n\r\n\xe9\r\n", "multipart without a boundary"),
    (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n\xe9\r\n--b\r\n\r\nx\r\n--b--\r\n", "preamble"),
    (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n\xe9\r\n", "epilogue"),
    (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nSubject: \xe9\r\n\r\nx\r\n--b--\r\n", "in a header"),
    (b"Content-Type: message/partial; id=x\r\n\r\n\xe9\r\n", "message/partial"),
])
def test_what_has_no_7bit_form_is_refused_with_the_reason(message, reason):
    with pytest.raises(NotConvertible, match=reason):
        seven_bit_form(message)


def parts(data: bytes) -> list[tuple[str, bytes]]:
    """What a reader finds: each leaf's type and decoded content, in order."""
    return [(p.get_content_type(), p.get_payload(decode=True) or b"") for p in parsed(data).walk() if not p.is_multipart()]


@pytest.mark.parametrize("pad", range(0, 90))
def test_a_soft_line_break_never_makes_a_line_that_reads_as_a_boundary(pad):
    """Quoted-printable breaks lines at 76 characters. The text "xx--frontier"
    cut before its dashes made a delimiter line: the rest of the text became
    a part of its own (an attachment the sender smuggled past any reader of
    the original), or, with "--frontier--", the parts after it were lost."""
    for tail in (b"--frontier", b"--frontier--"):
        line = "Gr\u00fc\u00dfe ".encode() + b"x" * pad + tail
        message = (
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=frontier\r\n\r\n"
            b"--frontier\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + line + b"\r\n"
            b"Content-Type: text/html\r\n\r\n<a href=x>log in</a>\r\n--frontier\r\n"
            b"Content-Type: text/plain\r\n\r\nlast part\r\n--frontier--\r\n"
        )
        out = seven_bit_form(message)
        assert_seven_bit(out)
        assert parts(out) == parts(message)
        assert all(len(line) <= 76 for line in out.split(b"\r\n"))


@pytest.mark.parametrize("header", [
    b"Subject: x\r\nThis line is no header\r\n",
    b"Subject : x\r\n",  # a blank before the colon: the email package ends the header there
    b"Subject: x\r\nFrom x@y.example\r\n",
    b"Hello there\r\nContent-Transfer-Encoding: 8bit\r\n",
])
def test_a_header_a_reader_ends_early_is_refused(header):
    """A line that is no header field ends the header for a reader (Python's
    email, a mail client): fields added or removed on either side of it,
    and the lines after it left unencoded, changed what the reader saw."""
    with pytest.raises(NotConvertible, match="no header field"):
        seven_bit_form(header + "\r\ncaf\u00e9 Total=3D5\r\n".encode())


def test_a_transfer_encoding_field_with_many_comments_costs_one_pass():
    import time

    nested = "(" * 100_000 + ")" * 100_000
    message = f"Content-Type: text/plain\r\nContent-Transfer-Encoding: 8bit {nested}\r\n\r\nt\u00e9\r\n".encode()
    started = time.process_time()
    assert parts(seven_bit_form(message)) == [("text/plain", "t\u00e9\r\n".encode())]
    assert time.process_time() - started < 5  # a bound on a blow-up (it was minutes), not a speed claim


def test_a_content_type_with_too_many_parameters_is_refused():
    message = b'Content-Type: multipart/mixed; boundary=b; x="' + b";" * 2000 + b'"\r\n\r\n--b\r\n\r\n\xe9\r\n--b--\r\n'
    with pytest.raises(NotConvertible, match="parameters"):
        seven_bit_form(message)


@pytest.mark.parametrize("kind", ["delivery-status", "disposition-notification", "news"])
def test_8bit_in_a_message_type_that_must_be_7bit_is_refused(kind):
    message = f"Content-Type: message/{kind}\r\n\r\nReporting-MTA: dns; \u00e9\r\n".encode()
    with pytest.raises(NotConvertible, match=f"message/{kind}"):
        seven_bit_form(message)


@pytest.mark.parametrize("boundary, delimiter", [
    ("boundary*=utf-8''%C3%A9", "?"),  # what the boundary became, encoded with "replace"
    ("boundary*=us-ascii''a%0D%0Ab", "a\r\nb"),
])
def test_a_boundary_no_reader_could_match_is_refused(boundary, delimiter):
    """The body was split on lines no reader takes for delimiters."""
    message = (f"Content-Type: multipart/mixed; {boundary}\r\n\r\n--{delimiter}\r\n\r\n\u00e9\r\n"
               f"--{delimiter}--\r\n").encode()
    with pytest.raises(NotConvertible, match="boundary"):
        seven_bit_form(message)


def test_an_unclosed_multipart_inside_another_keeps_its_parts_line_breaks():
    message = (
        b"Content-Type: multipart/mixed; boundary=outer\r\n\r\n--outer\r\n"
        b"Content-Type: multipart/mixed; boundary=inner\r\n\r\n--inner\r\n"
        b"Content-Type: application/x\r\n\r\n\xff\xfe\r\n\r\n--outer--\r\n"
    )
    assert parts(seven_bit_form(message)) == parts(message)


@pytest.mark.parametrize("line", [b"\xe9\n", b"-\xe9\n", b"\r\xe9"])
def test_short_lines_cost_memory_in_proportion_to_the_message(line):
    """A regex substitution per line ending (or per line beginning with "-"),
    and a list of lines for the encoding, held some 60 to 90 times the
    message at their peak."""
    size = 1 << 20
    message = b"Content-Type: text/plain\r\n\r\n" + line * (size // len(line))  # LF as the store writes, or a mix
    out, peak = peak_memory(seven_bit_form, message)
    assert_seven_bit(out)
    assert peak < 12 * size, peak


@pytest.mark.parametrize("label", ["8bit (raw UTF-8)", "(c) 8bit", "7bit(x)", "8BIT ((nested) comment)"])
def test_a_transfer_encoding_with_comments_is_read_without_them(label):
    message = f"Content-Type: text/plain\r\nContent-Transfer-Encoding: {label}\r\n\r\nt\u00e9\r\n".encode()
    assert parts(seven_bit_form(message)) == [("text/plain", "t\u00e9\r\n".encode())]


@pytest.mark.parametrize("content_type", [
    "multipart/mixed; boundary*=idna''abc",  # RFC 2231 in a charset whose codec refuses 'replace'
    "multipart/mixed; boundary*=punycode''%FF",
    "multipart/mixed; boundary*=no-such-charset''%FFb",
])
def test_a_mime_header_the_email_package_cannot_read_is_refused_not_a_crash(content_type):
    message = f"Content-Type: {content_type}\r\n\r\n--abc\r\n\r\n\u00e9\r\n--abc--\r\n".encode()
    try:
        out = seven_bit_form(message)
    except NotConvertible:
        return
    assert_seven_bit(out)


def test_text_without_its_type_gets_one_and_an_embedded_message_its_mime_version():
    message = (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\n\r\nno header \xe9\r\n"
        b"--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nembedded \xe9\r\n--b--\r\n"
    )
    out = seven_bit_form(message)
    assert out.count(b"Content-Type: text/plain; charset=unknown-8bit\r\n") == 2
    assert b"Subject: inner\r\nMIME-Version: 1.0\r\n" in out
    assert parts(out) == parts(message)


def test_a_multipart_without_its_closing_delimiter_keeps_its_last_line_break_outside():
    message = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: application/x\r\n\r\n\xff\xfe\r\n"
    assert parts(seven_bit_form(message)) == parts(message) == [("application/x", b"\xff\xfe")]


def test_parts_and_header_blocks_are_bounded():
    many = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n\r\n\xe9\r\n" * (MAX_PARTS + 1) + b"--b--\r\n"
    with pytest.raises(NotConvertible, match=f"more than {MAX_PARTS} MIME parts"):
        seven_bit_form(many)
    big = b"Content-Type: text/plain\r\n" + (b"X-Pad: " + b"x" * 990 + b"\r\n") * (MAX_HEADER // 990 + 1)
    with pytest.raises(NotConvertible, match="header block over"):
        seven_bit_form(big + b"\r\n\xe9\r\n")


def test_nesting_is_bounded():
    def nested(depth: int) -> bytes:
        if depth == 0:
            return b"Content-Type: text/plain\r\n\r\n\xe9\r\n"
        return b"Content-Type: message/rfc822\r\n\r\n" + nested(depth - 1)

    assert_seven_bit(seven_bit_form(nested(MAX_DEPTH)))
    with pytest.raises(NotConvertible, match="nested"):
        seven_bit_form(nested(MAX_DEPTH + 1))


def test_a_message_nested_deep_costs_its_size_a_few_times_not_once_a_level():
    """Parts are found by offsets in one copy: slicing each level out of its
    parent held MAX_DEPTH copies of the message at once."""
    size = 1 << 20
    message = b"Content-Type: message/rfc822\r\n\r\n" * MAX_DEPTH
    message += b"Content-Type: text/plain\r\n\r\n" + b"x" * size + b"\xe9\r\n"
    out, peak = peak_memory(seven_bit_form, message)
    assert_seven_bit(out)
    assert peak < 10 * size, peak


# -------------------------------------------------------------- properties
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=300)
_octets = st.binary(max_size=300)


@st.composite
def mime_messages(draw) -> EmailMessage:
    """Real MIME messages: text parts in 8bit, binary attachments, nested messages."""
    msg = EmailMessage()
    msg["Subject"] = draw(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40))
    msg.set_content(draw(_text), cte="8bit")
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["text", "octets", "message"]))
        if kind == "text":
            msg.add_attachment(draw(_text).encode(), maintype="text", subtype="plain", cte="8bit")
        elif kind == "octets":
            msg.add_attachment(draw(_octets), maintype="application", subtype="octet-stream")
        else:
            inner = EmailMessage()
            inner["Subject"] = "inner"
            inner.set_content(draw(_text), cte="8bit")
            msg.add_attachment(inner, cte="8bit")
    return msg


@settings(max_examples=150, deadline=None)
@given(mime_messages())
def test_a_converted_message_is_7bit_and_decodes_to_the_same_content(msg):
    original = msg.as_bytes(policy=email.policy.SMTP)
    out = seven_bit_form(original)
    assert_seven_bit(out)
    assert leaves(parsed(out)) == leaves(parsed(original))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([
    b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: message/rfc822\r\n", b"\r\n", b"--b\r\n",
    b"--b--\r\n", b"\xe9\xff\r\n", b"text\r\n", b"Content-Transfer-Encoding: 8bit\r\n", b"\n", b"\r", b"\x00",
    b"Content-Type: text/plain\r\n", b"--b", b" \t\r\n", b"=\r\n",
]), max_size=40))
def test_any_octets_give_7bit_or_a_reason(pieces):
    try:
        out = seven_bit_form(b"".join(pieces))
    except NotConvertible:
        return
    assert_seven_bit(out)


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"\xe9"]), max_size=30))
def test_crlf_lines_ends_every_line_in_crlf_as_a_substitution_would(pieces):
    import re

    data = b"".join(pieces)
    assert crlf_lines(data) == re.sub(rb"\r\n|\n|\r(?!\n)", b"\r\n", data)


def test_a_relayed_message_of_short_lines_costs_memory_in_proportion():
    """Every relayed mail goes through _data_block (the store writes LF): a
    substitution per line ending held some 60 times the message."""
    from prefork_smtpd.runner import _data_block

    size = 1 << 20
    message = b"Subject: x\n\n" + b"a\n" * (size // 2)
    block, peak = peak_memory(_data_block, message)
    assert block.endswith(b"a\r\n.\r\n") and block.count(b"\r\n") == size // 2 + 3
    assert peak < 8 * size, peak


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(st.sampled_from(["-", "x", "\u00e9", " ", "=", "\t"]), max_size=200), min_size=1, max_size=5))
def test_quoted_printable_lines_are_short_never_begin_with_a_dash_and_read_back(lines):
    body = "\r\n".join(lines).encode()
    out = seven_bit_form(b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + body)
    encoded = out.split(b"\r\n\r\n", 1)[1]
    if body.isascii():
        return
    assert all(len(line) <= 76 and not line.startswith(b"-") for line in encoded.split(b"\r\n"))
    assert parsed(out).get_payload(decode=True) == body
