"""The PROXY protocol header parser (prefork_smtpd.proxy), sans-IO.

Properties over generated headers (every split, every truncation, random and
mangled bytes, round trips), then the spec's cases one by one, each refusal
checked at the exact byte that makes it (one byte earlier: still waiting).
"""

from __future__ import annotations

import ipaddress
import itertools
import os

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prefork_smtpd.proxy import (
    MAX_V2_HEADER,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V1_MAX_LINE,
    V2_SIGNATURE,
    ProxyError,
    ProxyHeader,
    ProxyParser,
    ProxyResult,
    Reason,
    crc32c,
    encode_v1,
    encode_v2,
    parse_networks,
    trusted,
)

SIG = V2_SIGNATURE
SPEC_EXAMPLE = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"


def parse(data: bytes, **kw):
    return ProxyParser(**kw).feed(data)


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    """A v2 header built by hand, its length field free to lie."""
    size = len(body) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + size.to_bytes(2, "big") + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def byte_by_byte(data: bytes):
    """(outcome, bytes fed when it came) feeding one byte at a time."""
    parser = ProxyParser()
    for count in range(1, len(data) + 1):
        outcome = parser.feed(data[count - 1 : count])
        if outcome is not None:
            return outcome, count
    return None, len(data)


# ---------------------------------------------------------------- strategies

ports = st.integers(0, 65535)
ipv4s = st.ip_addresses(v=4)
ipv6s = st.one_of(st.ip_addresses(v=6), ipv4s.map(lambda a: ipaddress.IPv6Address(f"::ffff:{a}")))
tails = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"EHLO client.example\r\n", b"PROXY UNKNOWN\r\n", SIG + b"\x21\x00\x00\x00", b"\r\n"]),
)
no_line_end = st.binary(max_size=V1_MAX_LINE - 16).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def ipv6_spellings(draw, address: ipaddress.IPv6Address) -> str:
    """Every way the spec allows to write an IPv6 address: 4-digit groups or
    compressed, either case, a dotted tail for a mapped IPv4 address."""
    forms = [address.compressed, address.exploded, address.compressed.upper(), address.exploded.upper()]
    if address.ipv4_mapped:
        forms.append(f"::ffff:{address.ipv4_mapped}")
    return draw(st.sampled_from(forms))


@st.composite
def v1_headers(draw) -> tuple[bytes, ProxyHeader]:
    family = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if family == "UNKNOWN":
        # The short form, or anything up to the CRLF (which the spec says to ignore).
        junk = draw(st.one_of(st.none(), no_line_end))
        line = b"PROXY UNKNOWN" + (b"" if junk is None else b" " + junk) + b"\r\n"
        return line, ProxyHeader(1, "PROXY", "UNKNOWN")
    addresses = ipv4s if family == "TCP4" else ipv6s
    source, destination = draw(addresses), draw(addresses)
    source_port, destination_port = draw(ports), draw(ports)
    spell = str if family == "TCP4" else (lambda a: draw(ipv6_spellings(a)))
    line = f"PROXY {family} {spell(source)} {spell(destination)} {source_port} {destination_port}\r\n".encode()
    return line, ProxyHeader(1, "PROXY", family, (str(source), source_port), (str(destination), destination_port))


tlv_types = st.integers(0, 255).filter(lambda t: t not in (PP2_TYPE_CRC32C, PP2_TYPE_NOOP))
unix_paths = st.one_of(
    st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",))).filter(
        lambda p: len(os.fsencode(p)) <= 108
    ),
    # Abstract socket names: a NUL, then a name.
    st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), min_size=1)
    .map(lambda p: "\0" + p)
    .filter(lambda p: len(os.fsencode(p)) <= 108),
)


@st.composite
def v2_headers(draw, max_value: int = 64) -> tuple[bytes, ProxyHeader]:
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNIX", "LOCAL", "UNSPEC"]))
    tlvs = draw(st.dictionaries(tlv_types, st.binary(max_size=max_value), max_size=4))
    checksum = draw(st.booleans())
    if kind in ("TCP4", "TCP6"):
        addresses = ipv4s if kind == "TCP4" else st.ip_addresses(v=6)
        source = (str(draw(addresses)), draw(ports))
        destination = (str(draw(addresses)), draw(ports))
        data = encode_v2(source, destination, tlvs=tlvs, checksum=checksum)
    elif kind == "UNIX":
        source, destination = (draw(unix_paths), None), (draw(unix_paths), None)
        data = encode_v2(source, destination, family="UNIX", tlvs=tlvs, checksum=checksum)
    else:
        # LOCAL and UNSPEC carry TLVs here only to show the receiver skips them.
        data = encode_v2(command="PROXY" if kind == "UNSPEC" else "LOCAL", tlvs=tlvs, checksum=checksum)
        return data, ProxyHeader(2, kind if kind == "LOCAL" else "PROXY", "UNSPEC")
    if checksum:
        tlvs = {**tlvs, PP2_TYPE_CRC32C: data[-4:]}  # the encoder puts it last
    return data, ProxyHeader(2, "PROXY", kind, source, destination, tlvs)


valid_headers = st.one_of(v1_headers(), v2_headers())


@st.composite
def mangled(draw) -> bytes:
    """A valid header with a few bytes changed, dropped or added, or plain
    random bytes, or random bytes after one of the two signatures."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=300))
    if choice == 1:
        return draw(st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", SIG, SIG + b"\x21"])) + draw(
            st.binary(max_size=300)
        )
    data = bytearray(draw(valid_headers)[0])
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        operation = draw(st.sampled_from(["replace", "delete", "insert", "truncate"]))
        if operation == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif operation == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        elif operation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[at:]
    return bytes(data) + draw(tails)


# ---------------------------------------------------------------- properties


@given(valid_headers, tails)
def test_round_trip_gives_the_encoded_header_and_the_exact_rest(header_and_expected, tail):
    data, expected = header_and_expected
    assert parse(data + tail) == ProxyResult(expected, tail)


@given(valid_headers, tails)
def test_every_split_gives_what_one_feed_gives(header_and_expected, tail):
    data, expected = header_and_expected
    whole = data + tail
    for cut in range(len(whole) + 1):
        parser = ProxyParser()
        first = parser.feed(whole[:cut])
        if cut < len(data):
            assert first is None, f"decided after {cut} of {len(data)} header bytes: {first}"
            assert parser.feed(whole[cut:]) == ProxyResult(expected, tail)
        else:
            assert first == ProxyResult(expected, whole[len(data) : cut])


@given(valid_headers, tails, st.lists(st.integers(0, 400), max_size=6))
def test_any_chunking_gives_the_header_and_every_later_byte(header_and_expected, tail, cuts):
    data, expected = header_and_expected
    whole = data + tail
    bounds = sorted({0, len(whole), *(c for c in cuts if c < len(whole))})
    parser = ProxyParser()
    for index, (start, stop) in enumerate(itertools.pairwise(bounds)):
        outcome = parser.feed(whole[start:stop])
        if outcome is not None:
            later = whole[stop:]
            assert outcome.header == expected
            assert outcome.rest + later == tail
            assert stop >= len(data) and index == next(i for i, b in enumerate(bounds[1:]) if b >= len(data))
            return
    assert not whole[len(data) :] and not data, "never decided"


@given(valid_headers)
def test_every_truncation_waits_and_ends_as_truncated(header_and_expected):
    data, _ = header_and_expected
    for cut in range(len(data)):
        parser = ProxyParser()
        assert parser.feed(data[:cut]) is None
        assert parser.eof().reason is Reason.TRUNCATED


@settings(max_examples=400)
@given(mangled())
@example(SPEC_EXAMPLE)
@example(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n")
@example(SIG + b"\x21\x11\x00\x0c" + bytes(12))
def test_any_bytes_get_an_answer_that_never_reads_past_the_header(data):
    """One feed and one byte at a time agree; a header ends exactly where
    the byte-by-byte parse said yes, and what follows comes back untouched."""
    whole = parse(data)
    assert whole is None or isinstance(whole, (ProxyResult, ProxyError))
    single, count = byte_by_byte(data)
    if single is None:
        assert whole is None
    elif isinstance(single, ProxyResult):
        assert single.rest == b"", "decided with bytes beyond the header in hand"
        assert whole == ProxyResult(single.header, data[count:])
    else:
        assert isinstance(whole, ProxyError), (single, whole)
        assert parse(data[: count - 1]) is None  # and not a byte earlier


@given(st.one_of(mangled(), valid_headers.map(lambda h: h[0])), st.binary(max_size=8))
def test_the_decision_comes_within_the_bounds(data, pad):
    """No input keeps the parser waiting past the v1 line limit or the v2 cap."""
    bound = max(V1_MAX_LINE, MAX_V2_HEADER)
    assert parse(data + pad + b"\0" * bound) is not None


@pytest.mark.parametrize("first", [b for b in range(256) if b not in b"P\r"])
def test_a_first_byte_that_starts_neither_header_fails_at_once(first):
    outcome = parse(bytes([first]))
    assert outcome == ProxyError(Reason.BAD_SIGNATURE, f"first byte {bytes([first])!r}")


@given(st.integers(0, 255).filter(lambda b: b not in b"P\r"), st.binary(max_size=200))
def test_a_foreign_first_byte_fails_whatever_follows(first, tail):
    assert parse(bytes([first]) + tail).reason is Reason.BAD_SIGNATURE


# ---------------------------------------------------------------- early refusal, byte exact

EARLY = [
    # (bytes whose last byte makes the refusal, reason)
    (b"E", Reason.BAD_SIGNATURE),
    (b"\x16", Reason.BAD_SIGNATURE),  # a TLS ClientHello
    (b"PO", Reason.BAD_SIGNATURE),
    (b"p", Reason.BAD_SIGNATURE),
    (b"PROXY\r", Reason.BAD_SIGNATURE),
    (b"PROXX", Reason.BAD_SIGNATURE),
    (b"PROXY t", Reason.BAD_FAMILY),
    (b"PROXY TCP5", Reason.BAD_FAMILY),
    (b"PROXY UNKNOWNX", Reason.BAD_FAMILY),
    (b"PROXY TCP4\t", Reason.BAD_FAMILY),
    (b"PROXY  ", Reason.V1_BAD_SPACING),
    (b"PROXY TCP4  ", Reason.V1_BAD_SPACING),
    (b"PROXY TCP4 256", Reason.INVALID_IP),
    (b"PROXY TCP4 01", Reason.INVALID_IP),  # octal or decimal? neither
    (b"PROXY TCP4 1.2.3.04", Reason.INVALID_IP),
    (b"PROXY TCP4 1.2.3 ", Reason.INVALID_IP),
    (b"PROXY TCP4 1..", Reason.INVALID_IP),
    (b"PROXY TCP4 1.2.3.4.", Reason.INVALID_IP),
    (b"PROXY TCP4 :", Reason.INVALID_IP),
    (b"PROXY TCP4 1.2.3.4 -", Reason.INVALID_IP),
    (b"PROXY TCP6 1.2.3.4 ", Reason.INVALID_IP),
    (b"PROXY TCP6 fe80::1%", Reason.INVALID_IP),  # no zone index
    (b"PROXY TCP6 12345", Reason.INVALID_IP),
    (b"PROXY TCP6 1:::", Reason.INVALID_IP),
    (b"PROXY TCP6 1::2::", Reason.INVALID_IP),
    (b"PROXY TCP6 ::ffff:1.2.3.04", Reason.INVALID_IP),
    (b"PROXY TCP6 ::1 ::2 a", Reason.INVALID_PORT),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01", Reason.INVALID_PORT),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 +", Reason.INVALID_PORT),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -", Reason.INVALID_PORT),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 0x", Reason.INVALID_PORT),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536", Reason.PORT_OUT_OF_RANGE),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999", Reason.PORT_OUT_OF_RANGE),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ", Reason.V1_FIELD_COUNT),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r", Reason.V1_MISSING_CRLF),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", Reason.V1_MISSING_CRLF),
    (b"PROXY UNKNOWN\n", Reason.V1_MISSING_CRLF),
    (b"PROXY UNKNOWN x\ry", Reason.V1_MISSING_CRLF),
    (b"PROXY UNKNOWN " + b"x" * 92, Reason.V1_LINE_TOO_LONG),  # 106 bytes, no CR: CRLF would end past 107
    (SIG[:5] + b"X", Reason.BAD_SIGNATURE),
    (SIG[:11] + b"\r", Reason.BAD_SIGNATURE),
    (SIG + b"\x11", Reason.BAD_VERSION),
    (SIG + b"\x31", Reason.BAD_VERSION),
    (SIG + b"\x02", Reason.BAD_VERSION),
    (SIG + b"\x22", Reason.BAD_COMMAND),
    (SIG + b"\x2f", Reason.BAD_COMMAND),
    (SIG + b"\x21\x41", Reason.BAD_FAMILY),
    (SIG + b"\x20\xf0", Reason.BAD_FAMILY),
    (SIG + b"\x21\x13", Reason.BAD_PROTOCOL),
    (SIG + b"\x21\x1f", Reason.BAD_PROTOCOL),
    (SIG + b"\x21\x11" + (MAX_V2_HEADER - 16 + 1).to_bytes(2, "big"), Reason.HEADER_TOO_LONG),
    (SIG + b"\x20\x00\xff\xff", Reason.HEADER_TOO_LONG),  # even a LOCAL one
]


@pytest.mark.parametrize(("data", "reason"), EARLY, ids=[repr(d[-24:]) for d, _ in EARLY])
def test_refused_at_the_first_impossible_byte(data, reason):
    assert parse(data[:-1]) is None
    outcome = parse(data)
    assert isinstance(outcome, ProxyError) and outcome.reason is reason, outcome
    # Fed one byte at a time, the parser refuses at the same byte.
    assert byte_by_byte(data) == (outcome, len(data))


# ---------------------------------------------------------------- version 1, from the spec


def test_v1_spec_example_leaves_the_request_for_the_application():
    outcome = parse(SPEC_EXAMPLE)
    assert outcome.header == ProxyHeader(1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert outcome.rest == b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"


@pytest.mark.parametrize(
    ("line", "length"),
    [
        (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", 56),
        (b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n", 104),
        (b"PROXY UNKNOWN\r\n", 15),
        (b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n", 107),
    ],
)
def test_v1_the_spec_longest_lines_are_accepted(line, length):
    assert len(line) == length
    assert parse(line + b"QUIT\r\n").rest == b"QUIT\r\n"


def test_v1_a_line_one_byte_over_the_limit_is_refused():
    line = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(line) == V1_MAX_LINE and isinstance(parse(line), ProxyResult)
    longer = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert parse(longer).reason is Reason.V1_LINE_TOO_LONG
    # A CR as the 107th byte cannot be followed by its LF in time.
    assert parse(longer[:-1]).reason is Reason.V1_LINE_TOO_LONG


def test_v1_unknown_ignores_what_follows_it_on_the_line():
    for line in (
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UNKNOWN \xff garbage 01 +\r\n",
    ):
        assert parse(line + b"x") == ProxyResult(ProxyHeader(1, "PROXY", "UNKNOWN"), b"x")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", Reason.V1_FIELD_COUNT),
        (b"PROXY TCP4\r\n", Reason.V1_FIELD_COUNT),
        (b"PROXY \r\n", Reason.V1_BAD_SPACING),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", Reason.V1_FIELD_COUNT),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1  2\r\n", Reason.V1_BAD_SPACING),
        (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", Reason.INVALID_IP),
        (b"PROXY TCP6 ::1 1.2.3.4 1 2\r\n", Reason.INVALID_IP),
        (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", Reason.INVALID_IP),
        (b"PROXY TCP6 1:2 ::1 1 2\r\n", Reason.INVALID_IP),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", Reason.PORT_OUT_OF_RANGE),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", Reason.V1_BAD_SPACING),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", None),  # waits for its LF
    ],
)
def test_v1_complete_lines_that_break_a_rule(line, reason):
    outcome = parse(line)
    assert (outcome if reason is None else outcome.reason) is reason, outcome


def test_v1_ipv6_forms_are_reported_canonically():
    line = b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 ::ffff:192.0.2.1 25 587\r\n"
    header = parse(line).header
    assert header.source == ("2001:db8::1", 25)
    assert header.destination == (str(ipaddress.ip_address("::ffff:192.0.2.1")), 587)


# ---------------------------------------------------------------- version 2, from the spec


def test_v2_tcp4_as_haproxy_sends_it():
    data = v2(0x21, 0x11, bytes([172, 19, 0, 1, 172, 19, 0, 3, 0xA6, 0x52, 0x00, 0x50])) + b"EHLO x\r\n"
    assert parse(data) == ProxyResult(
        ProxyHeader(2, "PROXY", "TCP4", ("172.19.0.1", 42578), ("172.19.0.3", 80)), b"EHLO x\r\n"
    )


def test_v2_tcp6():
    source, destination = ipaddress.IPv6Address("2001:db8::1"), ipaddress.IPv6Address("2001:db8::2")
    data = v2(0x21, 0x21, source.packed + destination.packed + b"\x00\x19\xff\xff")
    assert parse(data).header == ProxyHeader(2, "PROXY", "TCP6", ("2001:db8::1", 25), ("2001:db8::2", 65535))


def test_v2_local_health_check_carries_no_address_and_skips_its_block():
    assert parse(v2(0x20, 0x00, b"") + b"rest") == ProxyResult(ProxyHeader(2, "LOCAL", "UNSPEC"), b"rest")
    # The spec: receivers must skip the length given, not assume zero for LOCAL.
    block = bytes([127, 0, 0, 1, 127, 0, 0, 1, 0, 1, 0, 2]) + tlv(PP2_TYPE_AUTHORITY, b"x")
    assert parse(v2(0x20, 0x11, block) + b"rest") == ProxyResult(ProxyHeader(2, "LOCAL", "UNSPEC"), b"rest")


def test_v2_unspec_and_datagram_fall_back_to_the_connection_endpoints():
    for fam, body in ((0x00, b""), (0x00, b"opaque"), (0x12, bytes(12)), (0x22, bytes(36)), (0x32, bytes(216))):
        assert parse(v2(0x21, fam, body) + b"r") == ProxyResult(ProxyHeader(2, "PROXY", "UNSPEC"), b"r")


def test_v2_unix_stream_paths():
    body = b"/run/client.sock".ljust(108, b"\0") + b"\0abstract-name".ljust(108, b"\0")
    header = parse(v2(0x21, 0x31, body + tlv(PP2_TYPE_AUTHORITY, b"mx.example"))).header
    assert header == ProxyHeader(
        2, "PROXY", "UNIX", ("/run/client.sock", None), ("\0abstract-name", None), {PP2_TYPE_AUTHORITY: b"mx.example"}
    )
    # A path that fills all 108 bytes has no terminating NUL.
    full = b"/" + b"p" * 107
    assert parse(v2(0x21, 0x31, full + full)).header.source == (full.decode(), None)


@pytest.mark.parametrize(("fam", "size"), [(0x11, 11), (0x11, 0), (0x21, 12), (0x21, 35), (0x31, 215), (0x31, 36)])
def test_v2_address_block_shorter_than_the_family_needs(fam, size):
    outcome = parse(v2(0x21, fam, bytes(size)))
    assert outcome.reason is Reason.ADDRESS_LENGTH_MISMATCH


def test_v2_registered_tlvs_are_returned_and_noop_is_skipped():
    ssl = bytes([0x01]) + bytes(4) + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"client.example")
    block = (
        bytes(12)
        + tlv(PP2_TYPE_NOOP, b"")
        + tlv(PP2_TYPE_ALPN, b"smtp")
        + tlv(PP2_TYPE_AUTHORITY, "mx.exämple".encode())
        + tlv(PP2_TYPE_NOOP, b"pad")
        + tlv(PP2_TYPE_UNIQUE_ID, b"\x01" * 128)
        + tlv(PP2_TYPE_SSL, ssl)
        + tlv(0xE0, b"")
    )
    assert parse(v2(0x21, 0x11, block)).header.tlvs == {
        PP2_TYPE_ALPN: b"smtp",
        PP2_TYPE_AUTHORITY: "mx.exämple".encode(),
        PP2_TYPE_UNIQUE_ID: b"\x01" * 128,
        PP2_TYPE_SSL: ssl,
        0xE0: b"",
    }


@pytest.mark.parametrize(
    ("tlvs", "reason", "detail"),
    [
        (b"\x02", Reason.TRUNCATED_TLV, "1 bytes left for a 3-byte TLV head"),
        (b"\x02\x00", Reason.TRUNCATED_TLV, "2 bytes left for a 3-byte TLV head"),
        (b"\x02\x00\x05abcd", Reason.TRUNCATED_TLV, "type 0x2 says 5 bytes, 4 left"),
        (tlv(PP2_TYPE_AUTHORITY, b"a") + b"\x02\x00\x02a", Reason.TRUNCATED_TLV, "type 0x2 says 2 bytes, 1 left"),
        (tlv(PP2_TYPE_AUTHORITY, b"a.example") + tlv(PP2_TYPE_AUTHORITY, b"b"), Reason.DUPLICATE_TLV, "type 0x2 twice"),
        (tlv(PP2_TYPE_CRC32C, b"\0\0\0"), Reason.BAD_CHECKSUM, "CRC32C value of 3 bytes, 4 expected"),
        (tlv(PP2_TYPE_CRC32C, b"\0\0\0\0\0"), Reason.BAD_CHECKSUM, "CRC32C value of 5 bytes, 4 expected"),
        (tlv(PP2_TYPE_CRC32C, b"\0\0\0\0"), Reason.BAD_CHECKSUM, "CRC32C does not match the header"),
    ],
)
def test_v2_malformed_tlvs(tlvs, reason, detail):
    assert parse(v2(0x21, 0x11, bytes(12) + tlvs)) == ProxyError(reason, detail)


def test_crc32c_known_answer():
    # The check value of CRC-32C (iSCSI, RFC 3720) over "123456789".
    assert crc32c(b"123456789") == 0xE3069283


def test_v2_checksum_is_verified_over_the_whole_header():
    data = encode_v2(("192.0.2.1", 1234), ("192.0.2.2", 25), tlvs={PP2_TYPE_AUTHORITY: b"mx"}, checksum=True)
    assert isinstance(parse(data), ProxyResult)
    crc_at = len(data) - 4  # the encoder puts the checksum TLV last
    for at in range(16, len(data)):
        flipped = bytearray(data)
        flipped[at] ^= 0x01
        outcome = parse(bytes(flipped))
        # A flipped TLV head may break the TLV chain first; the addresses,
        # ports, values and the checksum itself are covered by the CRC.
        assert isinstance(outcome, ProxyError), (at, outcome)
        if at < 28 or at >= crc_at:
            assert outcome.reason is Reason.BAD_CHECKSUM, (at, outcome)


def test_v2_checksum_may_come_before_other_tlvs():
    # HAProxy puts the checksum first; the TLVs after it must not move the
    # place that is zeroed for the check.
    block = bytes(12) + tlv(PP2_TYPE_CRC32C, bytes(4)) + tlv(PP2_TYPE_ALPN, b"smtp") + tlv(0x00, b"")
    header = bytearray(v2(0x21, 0x11, block))
    header[31:35] = crc32c(bytes(header)).to_bytes(4, "big")
    outcome = parse(bytes(header))
    assert isinstance(outcome, ProxyResult), outcome
    assert outcome.header.tlvs == {PP2_TYPE_CRC32C: bytes(header[31:35]), PP2_TYPE_ALPN: b"smtp", 0x00: b""}


def test_v2_header_cap_is_inclusive_and_adjustable():
    body = bytes(12) + tlv(0xE0, bytes(MAX_V2_HEADER - 16 - 12 - 3))
    data = v2(0x21, 0x11, body)
    assert len(data) == MAX_V2_HEADER
    assert isinstance(parse(data), ProxyResult)
    assert parse(data[:-1]) is None
    small = ProxyParser(max_v2_header=300)
    assert small.feed(data[:16]).reason is Reason.HEADER_TOO_LONG
    assert ProxyParser(max_v2_header=232).feed(encode_v2(("/a", None), ("/b", None), family="UNIX")) is not None
    with pytest.raises(ValueError, match=r"\(232 bytes\)"):
        ProxyParser(max_v2_header=231)  # could not hold an AF_UNIX header


# ---------------------------------------------------------------- the parser object


def test_nothing_fed_means_waiting_and_a_decided_parser_takes_no_more():
    parser = ProxyParser()
    assert parser.feed(b"") is None
    assert parser.feed(b"PROXY UNKNOWN\r\nEHLO") == ProxyResult(ProxyHeader(1, "PROXY", "UNKNOWN"), b"EHLO")
    with pytest.raises(RuntimeError):
        parser.feed(b" x\r\n")
    failed = ProxyParser()
    assert failed.feed(b"EHLO").reason is Reason.BAD_SIGNATURE
    with pytest.raises(RuntimeError):
        failed.feed(b"x")
    with pytest.raises(RuntimeError):
        failed.eof()


def test_a_header_inside_the_rest_is_not_parsed_again():
    inner = encode_v1(("10.0.0.1", 1), ("10.0.0.2", 2))
    outcome = parse(encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2)) + inner)
    assert outcome.header.source == ("192.0.2.1", 1) and outcome.rest == inner


def test_error_text_names_reason_and_detail():
    assert str(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 70000\r\n")) == "port out of range: 70000 > 65535"


# ---------------------------------------------------------------- encoders


def test_encoders_refuse_mixed_families_and_unknown_commands():
    with pytest.raises(ValueError):
        encode_v1(("1.2.3.4", 1), ("::1", 2))
    with pytest.raises(ValueError):
        encode_v2(("1.2.3.4", 1), ("::1", 2))
    with pytest.raises(ValueError):
        encode_v2(command="HEALTH")
    with pytest.raises(ValueError):
        encode_v2(("/" + "p" * 108, None), ("/b", None), family="UNIX")


def test_encoders_write_the_spec_bytes():
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == SPEC_EXAMPLE[: SPEC_EXAMPLE.index(b"\n") + 1]
    assert encode_v1() == b"PROXY UNKNOWN\r\n"
    assert encode_v2(command="LOCAL") == SIG + b"\x20\x00\x00\x00"
    assert encode_v2(("172.19.0.1", 42578), ("172.19.0.3", 80)) == v2(
        0x21, 0x11, bytes([172, 19, 0, 1, 172, 19, 0, 3, 0xA6, 0x52, 0x00, 0x50])
    )
    # Pairs, unlike a dict, can repeat a type: to test receivers.
    assert parse(encode_v2(("1.2.3.4", 1), ("1.2.3.4", 2), tlvs=[(2, b"a"), (2, b"b")])).reason is Reason.DUPLICATE_TLV


# ---------------------------------------------------------------- trusted proxies


def test_parse_networks_reads_cidrs_and_bare_addresses():
    networks = parse_networks(" 10.0.0.0/8, 192.0.2.7 ,2001:db8::/32,::1")
    assert [str(n) for n in networks] == ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32", "::1/128"]
    assert parse_networks("") == () and parse_networks("  ") == ()


@pytest.mark.parametrize(
    "text", ["10.0.0.1/8", "10.0.0.0/33", "10.0.0.0/8,,::1", "10.0.0.0/8,", "example.org", "1.2.3"]
)
def test_parse_networks_refuses_what_is_not_a_network(text):
    with pytest.raises(ValueError):
        parse_networks(text)


def test_trusted_matches_networks_mapped_addresses_and_nothing_else():
    networks = parse_networks("10.0.0.0/8,2001:db8::/32,::ffff:192.0.2.0/120")
    assert trusted("10.1.2.3", networks)
    assert trusted(ipaddress.ip_address("10.1.2.3"), networks)
    assert trusted("::ffff:10.1.2.3", networks)  # a dual-stack listener's IPv4 peer
    assert trusted("2001:db8::5", networks)
    assert trusted("192.0.2.9", networks)  # an IPv4 peer against a mapped network
    assert not trusted("11.0.0.1", networks)
    assert not trusted("::ffff:11.0.0.1", networks)
    assert not trusted("2001:db9::1", networks)
    assert not trusted("::a01:203", networks)  # IPv4-compatible is not mapped
    assert not trusted("", networks)  # a UNIX socket peer
    assert not trusted("10.1.2.3", ())


@given(st.ip_addresses(v=4), st.integers(0, 32), st.ip_addresses(v=4))
def test_trusted_agrees_with_membership_for_both_spellings(base, prefix, peer):
    network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    inside = peer in network
    assert trusted(str(peer), [network]) is inside
    assert trusted(f"::ffff:{peer}", [network]) is inside
