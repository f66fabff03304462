"""PROXY protocol header parser (versions 1 and 2), sans-IO.

A load balancer such as HAProxy (``send-proxy``, ``send-proxy-v2``) puts one
header before the SMTP bytes to tell the server who the client really is.
``ProxyParser.feed()`` takes bytes as they arrive and answers ``None`` (need
more), a ``ProxyResult`` (the header and the bytes after it, which belong to
SMTP) or a ``ProxyError`` (drop the connection). Which version is spoken is
told by the first byte: ``P`` starts the text line of version 1, ``\\r`` the
binary signature of version 2; any other byte fails at once.

The parser decides as early as the bytes allow: a byte that no valid header
can have at its place fails on arrival, so a client that speaks SMTP (or
anything else) to a PROXY listener is refused without waiting for more. It
never holds more than ``max(V1_MAX_LINE, max_v2_header)`` bytes of header.

Whom to believe is not this module's business beyond ``trusted()``: the
spec (doc/proxy-protocol.txt, section 5) requires the header only from
configured proxies, never guessed from the bytes.
"""

from __future__ import annotations

import ipaddress
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Version 1: "PROXY TCP4|TCP6|UNKNOWN ...\r\n". The spec's worst case is
# "PROXY UNKNOWN <39-char IPv6> <39-char IPv6> 65535 65535\r\n": 107 bytes.
V1_PREFIX = b"PROXY "
V1_MAX_LINE = 107

# Version 2: a 12-byte signature, version/command, family/protocol, a 16-bit
# big-endian length, then that many bytes of addresses and TLVs.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
V2_UNIX_ADDRESSES = 2 * 108  # the largest address block the spec defines

# The whole v2 header (16 + length) is refused beyond this. The 16-bit length
# would allow 65,551 bytes; what real senders put there is far less: the
# largest address block (AF_UNIX, 216 bytes) plus every TLV HAProxy can emit,
# each at its practical maximum (ALPN and AUTHORITY 255, UNIQUE_ID 128, NETNS
# 255, CRC32C 4, the SSL TLV with version, CN, cipher and algorithm names,
# the cloud providers' custom TLVs of a few dozen bytes): about 2,400 bytes
# with 3 bytes of type and length each. 4096, one page, leaves room above
# that and bounds what a client can make the server hold before SMTP starts.
MAX_V2_HEADER = 4096

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30

_LOCAL, _PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_UNSPEC, _STREAM, _DGRAM = 0x0, 0x1, 0x2
_ADDRESS_BLOCK = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: V2_UNIX_ADDRESSES}
_FAMILY_NAME = {_AF_INET: "TCP4", _AF_INET6: "TCP6", _AF_UNIX: "UNIX"}


class Reason(StrEnum):
    """Why a header was refused: a stable phrase to log and to test."""

    BAD_SIGNATURE = "bad signature"  # neither "PROXY " nor the v2 signature
    TRUNCATED = "truncated"  # the connection ended inside the header
    V1_LINE_TOO_LONG = "v1 line too long"
    V1_MISSING_CRLF = "v1 missing CRLF"  # a lone CR or LF
    V1_BAD_SPACING = "v1 bad spacing"  # fields not separated by exactly one space
    V1_FIELD_COUNT = "v1 wrong field count"
    BAD_FAMILY = "bad family"
    INVALID_IP = "invalid IP"
    INVALID_PORT = "invalid port"  # sign, leading zero, not digits
    PORT_OUT_OF_RANGE = "port out of range"
    BAD_VERSION = "bad version"
    BAD_COMMAND = "bad command"
    BAD_PROTOCOL = "bad protocol"
    HEADER_TOO_LONG = "header too long"
    ADDRESS_LENGTH_MISMATCH = "address length mismatch"
    TRUNCATED_TLV = "truncated TLV"
    DUPLICATE_TLV = "duplicate TLV"
    BAD_CHECKSUM = "bad checksum"


@dataclass(frozen=True)
class ProxyHeader:
    """What the proxy said. ``source``/``destination`` are ``(ip, port)`` for
    TCP4/TCP6, ``(path, None)`` for UNIX, None when the header carries no
    address (v1 UNKNOWN, v2 LOCAL, v2 UNSPEC): then the connection's own
    endpoints stand."""

    version: int
    command: str  # "PROXY" or "LOCAL" (v2 health checks)
    family: str  # "TCP4", "TCP6", "UNIX", "UNKNOWN" (v1) or "UNSPEC" (v2)
    source: tuple[str, int | None] | None = None
    destination: tuple[str, int | None] | None = None
    tlvs: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class ProxyResult:
    header: ProxyHeader
    rest: bytes  # the bytes after the header: the start of the SMTP stream


@dataclass(frozen=True)
class ProxyError:
    reason: Reason
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else str(self.reason)


class ProxyParser:
    """Feed it the connection's first bytes until it answers."""

    def __init__(self, max_v2_header: int = MAX_V2_HEADER) -> None:
        if max_v2_header < V2_FIXED + V2_UNIX_ADDRESSES:
            raise ValueError(f"max_v2_header must hold an AF_UNIX header ({V2_FIXED + V2_UNIX_ADDRESSES} bytes)")
        self.max_v2_header = max_v2_header
        self._buffer = bytearray()
        self._v2_total = 0  # the v2 header's full size, once its length field arrived
        self._done = False

    def feed(self, data: bytes) -> ProxyResult | ProxyError | None:
        if self._done:
            raise RuntimeError("the PROXY header was already decided; later bytes belong to SMTP")
        self._buffer += data
        if len(self._buffer) < self._v2_total:
            return None  # the common wait for the rest of a v2 header: no rescan
        outcome = self._decide(bytes(self._buffer))
        if outcome is not None:
            self._done = True
            self._buffer = bytearray()
        return outcome

    def eof(self) -> ProxyError:
        """The connection ended before the header did."""
        if self._done:
            raise RuntimeError("the PROXY header was already decided")
        self._done = True
        return ProxyError(Reason.TRUNCATED, f"connection closed after {len(self._buffer)} bytes of header")

    def _decide(self, data: bytes) -> ProxyResult | ProxyError | None:
        if not data:
            return None
        if data[0] == V2_SIGNATURE[0]:
            return self._decide_v2(data)
        if data[0] == V1_PREFIX[0]:
            return _decide_v1(data)
        return ProxyError(Reason.BAD_SIGNATURE, f"first byte {data[:1]!r}")

    def _decide_v2(self, data: bytes) -> ProxyResult | ProxyError | None:
        signature = data[:12]
        if not V2_SIGNATURE.startswith(signature):
            return ProxyError(Reason.BAD_SIGNATURE, "not the v2 signature")
        # Check each fixed byte as soon as it is here.
        if len(data) > 12 and (error := _check_version_command(data[12])):
            return error
        if len(data) > 13 and (error := _check_family_protocol(data[13])):
            return error
        if len(data) < V2_FIXED:
            return None
        total = V2_FIXED + int.from_bytes(data[14:16], "big")
        if total > self.max_v2_header:
            return ProxyError(Reason.HEADER_TOO_LONG, f"{total} bytes, at most {self.max_v2_header}")
        self._v2_total = total
        if len(data) < total:
            return None
        header = _decode_v2(data[:total])
        if isinstance(header, ProxyError):
            return header
        return ProxyResult(header, data[total:])


# ---------------------------------------------------------------- version 2


def _check_version_command(byte: int) -> ProxyError | None:
    if byte >> 4 != 2:
        return ProxyError(Reason.BAD_VERSION, f"version {byte >> 4}, only 2 exists")
    if byte & 0xF not in (_LOCAL, _PROXY):
        return ProxyError(Reason.BAD_COMMAND, f"command {byte & 0xF:#x}")
    return None


def _check_family_protocol(byte: int) -> ProxyError | None:
    # Checked for LOCAL too, whose family is otherwise ignored: the spec has
    # receivers reject unassigned values, and senders put 0x00 there.
    if byte >> 4 not in (_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX):
        return ProxyError(Reason.BAD_FAMILY, f"address family {byte >> 4:#x}")
    if byte & 0xF not in (_UNSPEC, _STREAM, _DGRAM):
        return ProxyError(Reason.BAD_PROTOCOL, f"transport protocol {byte & 0xF:#x}")
    return None


def _decode_v2(header: bytes) -> ProxyHeader | ProxyError:
    """The complete header, its fixed bytes already checked."""
    if header[12] & 0xF == _LOCAL:
        # A health check from the proxy itself: the spec says to discard
        # the block, family included, and use the connection's endpoints.
        return ProxyHeader(2, "LOCAL", "UNSPEC")
    family, protocol = header[13] >> 4, header[13] & 0xF
    if family == _AF_UNSPEC or protocol != _STREAM:
        # Unspecified, or datagrams (nothing an SMTP server serves): the spec
        # lets a receiver fall back to UNSPEC, i.e. the real endpoints. The
        # address size is then unknown, so no TLV can be located either.
        return ProxyHeader(2, "PROXY", "UNSPEC")
    block = header[V2_FIXED:]
    size = _ADDRESS_BLOCK[family]
    if len(block) < size:
        return ProxyError(
            Reason.ADDRESS_LENGTH_MISMATCH, f"{_FAMILY_NAME[family]} needs {size} bytes, got {len(block)}"
        )
    source, destination = _v2_addresses(family, block[:size])
    tlvs = _decode_tlvs(header, V2_FIXED + size)
    if isinstance(tlvs, ProxyError):
        return tlvs
    return ProxyHeader(2, "PROXY", _FAMILY_NAME[family], source, destination, tlvs)


def _v2_addresses(family: int, block: bytes) -> tuple[tuple[str, int | None], tuple[str, int | None]]:
    if family == _AF_UNIX:
        return (_unix_path(block[:108]), None), (_unix_path(block[108:]), None)
    width = 4 if family == _AF_INET else 16
    source = ipaddress.ip_address(block[:width])
    destination = ipaddress.ip_address(block[width : 2 * width])
    source_port, destination_port = struct.unpack("!HH", block[2 * width :])
    return (str(source), source_port), (str(destination), destination_port)


def _unix_path(raw: bytes) -> str:
    """A sun_path of 108 bytes: a path ends at its first NUL; an abstract
    name starts with NUL and its padding NULs are dropped."""
    if raw[:1] == b"\0":
        return os.fsdecode(raw.rstrip(b"\0") or b"")
    return os.fsdecode(raw.split(b"\0", 1)[0])


def _decode_tlvs(header: bytes, start: int) -> dict[int, bytes] | ProxyError:
    tlvs: dict[int, bytes] = {}
    checksum_at = 0
    at = start
    while at < len(header):
        if len(header) - at < 3:
            return ProxyError(Reason.TRUNCATED_TLV, f"{len(header) - at} bytes left for a 3-byte TLV head")
        kind, length = header[at], int.from_bytes(header[at + 1 : at + 3], "big")
        value_at = at + 3
        if value_at + length > len(header):
            return ProxyError(
                Reason.TRUNCATED_TLV, f"type {kind:#x} says {length} bytes, {len(header) - value_at} left"
            )
        at = value_at + length
        if kind == PP2_TYPE_NOOP:
            continue  # padding, may repeat
        if kind in tlvs:
            # Two AUTHORITY values, say: which one to believe is ambiguous.
            return ProxyError(Reason.DUPLICATE_TLV, f"type {kind:#x} twice")
        tlvs[kind] = header[value_at:at]
        if kind == PP2_TYPE_CRC32C:
            checksum_at = value_at
    if PP2_TYPE_CRC32C in tlvs and (error := _verify_checksum(header, checksum_at, tlvs[PP2_TYPE_CRC32C])):
        return error
    return tlvs


def _verify_checksum(header: bytes, value_at: int, received: bytes) -> ProxyError | None:
    """PP2_TYPE_CRC32C: the CRC32c of the whole header with the value zeroed."""
    if len(received) != 4:
        return ProxyError(Reason.BAD_CHECKSUM, f"CRC32C value of {len(received)} bytes, 4 expected")
    zeroed = header[:value_at] + b"\0\0\0\0" + header[value_at + 4 :]
    if crc32c(zeroed) != int.from_bytes(received, "big"):
        return ProxyError(Reason.BAD_CHECKSUM, "CRC32C does not match the header")
    return None


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli, RFC 4960 appendix B). Only headers that carry the
    checksum TLV pay for this, and they are at most a few kilobytes."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------- version 1

_OCTET = re.compile(rb"0|[1-9][0-9]{0,2}")  # no leading zero: no octal doubt
_PORT = re.compile(rb"0|[1-9][0-9]*")  # no sign, no leading zero
_IPV6_CHARS = re.compile(rb"[0-9A-Fa-f:.]*")  # no zone index, no spaces
_IPV6_MAX_TEXT = 45  # "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
_V1_FAMILIES = (b"TCP4", b"TCP6", b"UNKNOWN")
_V1_FIELDS = 5  # family, source, destination, source port, destination port


def _decide_v1(data: bytes) -> ProxyResult | ProxyError | None:
    if not data.startswith(V1_PREFIX[: len(data)]):
        return ProxyError(Reason.BAD_SIGNATURE, "starts with P but not with 'PROXY '")
    end = _find_line_end(data)
    if isinstance(end, ProxyError):
        return end
    if end is None:
        # Not complete: fail now if no ending of these bytes can be valid.
        # (A CR can only be the last byte here, waiting for its LF.)
        return _check_partial_line(data[len(V1_PREFIX) :].removesuffix(b"\r"))
    header = _parse_line(data[len(V1_PREFIX) : end])
    if isinstance(header, ProxyError):
        return header
    return ProxyResult(header, data[end + 2 :])


def _find_line_end(data: bytes) -> int | ProxyError | None:
    """Where the CRLF starts; None while it may still come in time."""
    window = data[:V1_MAX_LINE]
    cr, lf = window.find(b"\r"), window.find(b"\n")
    if lf >= 0 and (cr < 0 or lf < cr):
        return ProxyError(Reason.V1_MISSING_CRLF, f"LF without CR at byte {lf}")
    if cr >= 0:
        if cr + 2 > V1_MAX_LINE:
            return ProxyError(Reason.V1_LINE_TOO_LONG, f"no CRLF in the first {V1_MAX_LINE} bytes")
        if cr + 1 == len(data):
            return None
        if data[cr + 1] != 0x0A:
            return ProxyError(Reason.V1_MISSING_CRLF, f"CR without LF at byte {cr}")
        return cr
    if len(data) > V1_MAX_LINE - 2:
        return ProxyError(Reason.V1_LINE_TOO_LONG, f"no CRLF in the first {V1_MAX_LINE} bytes")
    return None


def _parse_line(line: bytes) -> ProxyHeader | ProxyError:
    """The line after "PROXY ", without its CRLF."""
    fields = line.split(b" ")
    family = fields[0]
    if family == b"UNKNOWN":
        # The spec: the rest of an UNKNOWN line is to be ignored.
        return ProxyHeader(1, "PROXY", "UNKNOWN")
    if error := _check_fields(fields, complete=len(fields)):
        return error
    if len(fields) != _V1_FIELDS:
        return ProxyError(Reason.V1_FIELD_COUNT, f"{len(fields)} fields after PROXY, {_V1_FIELDS} expected")
    source_ip, destination_ip, source_port, destination_port = (f.decode("ascii") for f in fields[1:])
    return ProxyHeader(
        1,
        "PROXY",
        family.decode(),
        (_canonical_ip(source_ip), int(source_port)),
        (_canonical_ip(destination_ip), int(destination_port)),
    )


def _check_partial_line(line: bytes) -> ProxyError | None:
    """The line so far (after "PROXY "): an error once no ending could make it valid."""
    fields = line.split(b" ")
    if fields[0] == b"UNKNOWN" and len(fields) > 1:
        return None  # anything may follow "UNKNOWN "
    return _check_fields(fields, complete=len(fields) - 1)


def _check_fields(fields: list[bytes], complete: int) -> ProxyError | None:
    """Check the v1 fields; the first ``complete`` are whole, any later one
    is a prefix that more bytes may extend."""
    family = fields[0]
    # Field by field, then the count: the first fault in the line is the
    # one reported, as it would be had the bytes come one at a time.
    for index, value in enumerate(fields[:_V1_FIELDS]):
        whole = index < complete
        if whole and not value:
            return ProxyError(Reason.V1_BAD_SPACING, "fields must be separated by exactly one space")
        if index == 0:
            error = _check_family(value, whole)
        elif index <= 2:
            error = _check_ip(family, value, whole)
        else:
            error = _check_port(value, whole)
        if error:
            return error
    if len(fields) > _V1_FIELDS:
        return ProxyError(Reason.V1_FIELD_COUNT, f"more than {_V1_FIELDS} fields after PROXY")
    return None


def _check_family(value: bytes, whole: bool) -> ProxyError | None:
    possible = value in _V1_FAMILIES if whole else any(f.startswith(value) for f in _V1_FAMILIES)
    if possible:
        return None
    return ProxyError(Reason.BAD_FAMILY, f"{value[:16]!r} is not TCP4, TCP6 or UNKNOWN")


def _check_ip(family: bytes, value: bytes, whole: bool) -> ProxyError | None:
    ok = _ipv4_ok(value, whole) if family == b"TCP4" else _ipv6_ok(value, whole)
    if ok:
        return None
    return ProxyError(Reason.INVALID_IP, f"{value[:48]!r} is no {family.decode()} address")


def _ipv4_ok(value: bytes, whole: bool) -> bool:
    """Four decimal octets 0..255 without leading zeros, dot-separated."""
    parts = value.split(b".")
    if len(parts) > 4 or (whole and len(parts) != 4):
        return False
    last = parts[-1]
    octets = parts if whole or last else parts[:-1]
    if not all(_OCTET.fullmatch(p) and int(p) <= 255 for p in octets):
        return False
    if whole:
        # The checks above are the spec's stricter rules; ipaddress agrees.
        return _valid_ip(value, ipaddress.IPv4Address)
    return True


def _ipv6_ok(value: bytes, whole: bool) -> bool:
    if not _IPV6_CHARS.fullmatch(value) or len(value) > _IPV6_MAX_TEXT:
        return False
    if whole:
        return _valid_ip(value, ipaddress.IPv6Address)
    # A prefix: one "::" at most, groups of 4 hex digits at most, and a
    # dotted IPv4 tail (::ffff:a.b.c.d) only in the last group.
    if b":::" in value or value.count(b"::") > 1:
        return False
    groups = value.split(b":")
    if any(b"." in g or len(g) > 4 for g in groups[:-1]):
        return False
    tail = groups[-1]
    return _ipv4_ok(tail, whole=False) if b"." in tail else len(tail) <= 4


def _valid_ip(value: bytes, kind: type) -> bool:
    try:
        kind(value.decode("ascii"))
    except ValueError:
        return False
    return True


def _check_port(value: bytes, whole: bool) -> ProxyError | None:
    # Every prefix of a valid port is itself a valid port, so a partial
    # field is checked as it stands (the empty one still has a chance).
    if not value and not whole:
        return None
    if not _PORT.fullmatch(value):
        return ProxyError(Reason.INVALID_PORT, f"{value[:16]!r}: decimal digits without sign or leading zero")
    if len(value) > 5 or int(value) > 65535:
        return ProxyError(Reason.PORT_OUT_OF_RANGE, f"{value[:16].decode()} > 65535")
    return None


def _canonical_ip(text: str) -> str:
    return str(ipaddress.ip_address(text))


# ---------------------------------------------------------------- trust


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """``--trusted-proxies``: comma-separated CIDRs (a bare address is a /32
    or /128). Host bits set (10.0.0.1/8) are refused as a likely typo."""
    if not text.strip():
        return ()
    networks = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty entry in {text!r}")
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise ValueError(f"{item!r}: {exc}") from None
    return tuple(networks)


def trusted(peer_ip: str | IPAddress, networks: Iterable[IPNetwork]) -> bool:
    """Whether the connection's real peer is one of the proxies allowed to
    send a PROXY header. A dual-stack listener reports IPv4 peers as
    ::ffff:a.b.c.d, which IPv4 networks match too (and the other way round)."""
    try:
        address = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False  # not an IP peer (a UNIX socket): no network names it
    candidates: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        candidates = (address, address.ipv4_mapped)
    elif isinstance(address, ipaddress.IPv4Address):
        candidates = (address, ipaddress.IPv6Address(f"::ffff:{address}"))
    else:
        candidates = (address,)
    return any(candidate in network for network in networks for candidate in candidates)


# ---------------------------------------------------------------- encoders


def encode_v1(source: tuple[str, int] | None = None, destination: tuple[str, int] | None = None) -> bytes:
    """A v1 line; without addresses, "PROXY UNKNOWN\\r\\n"."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    source_ip, destination_ip = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if source_ip.version != destination_ip.version:
        raise ValueError("source and destination must be of one address family")
    family = "TCP4" if source_ip.version == 4 else "TCP6"
    return f"PROXY {family} {source_ip} {destination_ip} {source[1]} {destination[1]}\r\n".encode()


def encode_v2(
    source: tuple[str, int | None] | None = None,
    destination: tuple[str, int | None] | None = None,
    *,
    command: str = "PROXY",
    family: str | None = None,
    tlvs: Mapping[int, bytes] | Iterable[tuple[int, bytes]] = (),
    checksum: bool = False,
) -> bytes:
    """A v2 header. The family follows the addresses unless given: "UNIX"
    takes ``(path, None)`` pairs, "UNSPEC" none (a LOCAL health check
    carries none unless given, to test that a receiver skips them).
    ``tlvs`` may be pairs, to write duplicates; ``checksum`` appends a
    CRC32C TLV."""
    if command not in ("PROXY", "LOCAL"):
        raise ValueError(f"command {command!r}")
    if not family:
        family = "UNSPEC" if source is None else ("TCP4" if ipaddress.ip_address(source[0]).version == 4 else "TCP6")
    addresses = _encode_v2_addresses(family, source, destination)
    pairs = list(tlvs.items() if isinstance(tlvs, Mapping) else tlvs)
    if checksum:
        pairs.append((PP2_TYPE_CRC32C, b"\0\0\0\0"))
    body = addresses + b"".join(bytes([kind]) + len(value).to_bytes(2, "big") + value for kind, value in pairs)
    family_byte = {"UNSPEC": 0x00, "TCP4": 0x11, "TCP6": 0x21, "UNIX": 0x31}[family]
    command_byte = 0x20 | (_LOCAL if command == "LOCAL" else _PROXY)
    header = V2_SIGNATURE + bytes([command_byte, family_byte]) + len(body).to_bytes(2, "big") + body
    if checksum:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header


def _encode_v2_addresses(family: str, source, destination) -> bytes:
    if family == "UNSPEC":
        return b""
    if family == "UNIX":
        paths = [os.fsencode(path) for path, _ in (source, destination)]
        if any(len(path) > 108 for path in paths):
            raise ValueError("a UNIX socket path has at most 108 bytes")
        return b"".join(path.ljust(108, b"\0") for path in paths)
    width = 4 if family == "TCP4" else 16
    ips = [ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])]
    if any(len(ip.packed) != width for ip in ips):
        raise ValueError(f"{family} needs addresses of {width} bytes")
    return b"".join(ip.packed for ip in ips) + struct.pack("!HH", source[1], destination[1])
