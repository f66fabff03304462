"""8-bit MIME to 7 bits, for a next hop that does not offer 8BITMIME.

RFC 6152 3: 8-bit octets go only to a server that offers 8BITMIME; to
another, a relay converts the message to 7 bits (RFC 2045) or returns it.
``seven_bit_form`` converts what can be converted and says why when it
cannot, so the runner sends the converted copy or bounces with ``5.6.3``.

What it does, part by part (sans-IO: bytes in, bytes out, nothing else):

* a part whose content is ASCII stays octet for octet;
* a leaf part with 8-bit content labelled ``7bit``, ``8bit`` or not
  labelled gets ``quoted-printable`` (text) or ``base64`` (anything else),
  and its ``Content-Transfer-Encoding`` field says so; a mail without
  ``MIME-Version`` is made a MIME text/plain one (``unknown-8bit``, RFC
  1428: the charset of unlabelled 8-bit text is unknown);
* a ``multipart/*`` body keeps its boundaries, preamble and epilogue; each
  part is converted in turn;
* a ``message/rfc822`` part is converted as a message of its own (its
  encoding must stay identity, RFC 2046 5.2.1), and labelled ``7bit``.

What it refuses, with the reason: 8-bit octets in any header (no charset is
known to encode them with RFC 2047), in a preamble or epilogue, in a part
already labelled base64 or quoted-printable (malformed), labelled
``binary``, or in ``message/partial`` or ``message/external-body`` (which
must be 7bit). Nesting deeper than ``MAX_DEPTH`` is refused too, so a
hostile message costs bounded recursion.
"""

from __future__ import annotations

import base64
import binascii
import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

MAX_DEPTH = 50  # nested multiparts and messages

_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")
_NON_ASCII = re.compile(rb"[\x80-\xff]")
_CTE_FIELD = re.compile(rb"^content-transfer-encoding[ \t]*:.*\r\n(?:[ \t].*\r\n)*", re.IGNORECASE | re.MULTILINE)
_MIME_VERSION = re.compile(rb"^mime-version[ \t]*:", re.IGNORECASE | re.MULTILINE)
_CONTENT_TYPE = re.compile(rb"^content-type[ \t]*:", re.IGNORECASE | re.MULTILINE)
_IDENTITY = frozenset({"", "7bit", "8bit"})
_MUST_BE_7BIT = frozenset({"message/partial", "message/external-body"})


class NotConvertible(Exception):
    """Why a message has no 7-bit form here."""


def seven_bit_form(message: bytes) -> bytes:
    """``message`` with every 8-bit octet encoded away; raises NotConvertible.

    Lines end in CRLF in the result, as DATA sends them anyway. The parts
    are found by their offsets in one copy of the message, never sliced out
    level by level: a message nested deep costs its size once, not once a
    level.
    """
    data = _LINE_ENDINGS.sub(b"\r\n", message)
    if data.isascii():
        return data
    out: list[bytes] = []
    _entity(data, 0, len(data), "text/plain", 0, out)
    header = out[0]  # 8-bit somewhere: the header block came first, converted
    if not _MIME_VERSION.search(header):
        # A mail that was no MIME mail becomes one, to say how its text is encoded.
        added = b"MIME-Version: 1.0\r\n"
        if not _CONTENT_TYPE.search(header):
            added += b"Content-Type: text/plain; charset=unknown-8bit\r\n"
        out[0] = header[:-2] + added + b"\r\n"
    return b"".join(out)


def _split(data: bytes, start: int, end: int) -> tuple[bytes, int]:
    """The header block of data[start:end] with its blank line, and where the
    body begins; an entity without a blank line is all header."""
    if end - start >= 2 and data.startswith(b"\r\n", start):
        return b"\r\n", start + 2  # no header fields: the body only
    found = data.find(b"\r\n\r\n", start, end)
    if found < 0:
        header = data[start:end]
        return header + (b"" if header.endswith(b"\r\n") else b"\r\n") + b"\r\n", end
    return data[start : found + 4], found + 4


def _entity(data: bytes, start: int, end: int, default_type: str, depth: int, out: list[bytes]) -> None:
    """data[start:end], one entity (header and body), converted onto ``out``."""
    if _NON_ASCII.search(data, start, end) is None:
        out.append(data[start:end])
        return
    if depth > MAX_DEPTH:
        raise NotConvertible(f"MIME parts nested more than {MAX_DEPTH} deep")
    header, body = _split(data, start, end)
    if not header.isascii():
        raise NotConvertible("8-bit octets in a header")
    fields: Message = BytesHeaderParser(policy=compat32).parsebytes(header)
    if default_type != "text/plain":
        fields.set_default_type(default_type)
    content_type = fields.get_content_type()
    encoding = str(fields.get("content-transfer-encoding", "")).strip().lower()
    if encoding not in _IDENTITY:
        raise NotConvertible(f"8-bit octets in a part labelled {encoding}")
    if content_type.startswith("multipart/"):
        boundary = fields.get_boundary()
        if not boundary:
            raise NotConvertible("8-bit octets in a multipart without a boundary")
        out.append(_seven_bit_label(header, encoding))
        inner = "message/rfc822" if content_type == "multipart/digest" else "text/plain"
        _multipart(data, body, end, boundary.encode("ascii", "replace"), inner, depth, out)
    elif content_type == "message/rfc822":  # its encoding stays identity (RFC 2046 5.2.1): converted inside
        out.append(_seven_bit_label(header, encoding))
        _entity(data, body, end, "text/plain", depth + 1, out)
    elif content_type in _MUST_BE_7BIT:
        raise NotConvertible(f"8-bit octets in a {content_type} part")
    elif fields.get_content_maintype() == "text":
        out += [_relabelled(header, b"quoted-printable"), _quoted_printable(data[body:end])]
    else:  # message/global too (RFC 6532 3.5 allows it)
        out += [_relabelled(header, b"base64"), _base64(data[body:end])]


def _seven_bit_label(header: bytes, encoding: str) -> bytes:
    """A composite part's header once its parts are 7 bits: "8bit" said otherwise."""
    return _relabelled(header, b"7bit") if encoding == "8bit" else header


def _multipart(data: bytes, start: int, end: int, boundary: bytes, inner_type: str, depth: int, out: list[bytes]) -> None:
    """The multipart body data[start:end], each part converted onto ``out``;
    boundaries, preamble and epilogue kept as they are."""
    # A delimiter line begins with the CRLF before it (RFC 2046 5.1.1); the
    # one opening the body borrows the CRLF that ends the header block.
    delimiter = re.compile(rb"\r\n--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r\n|\Z)")
    copied = start  # out holds the body up to here
    in_part = False  # between a delimiter and the next one
    for match in delimiter.finditer(data, start - 2, end):
        if in_part:
            _entity(data, copied, match.start(), inner_type, depth + 1, out)
        elif _NON_ASCII.search(data, copied, match.start()):
            raise NotConvertible("8-bit octets in a multipart preamble")
        else:
            out.append(data[copied : match.start()])
        line_end = match.end() + 2 if data.startswith(b"\r\n", match.end()) and match.end() + 2 <= end else match.end()
        out.append(data[max(match.start(), copied) : line_end])
        copied = line_end
        in_part = match.group(1) is None
        if not in_part:
            break
    if in_part:  # no closing delimiter: the last part runs to the end
        _entity(data, copied, end, inner_type, depth + 1, out)
    elif _NON_ASCII.search(data, copied, end):
        raise NotConvertible("8-bit octets in a multipart epilogue or with no parts")
    else:
        out.append(data[copied:end])


def _relabelled(header: bytes, encoding: bytes) -> bytes:
    """The header block with one Content-Transfer-Encoding field, saying ``encoding``."""
    kept = _CTE_FIELD.sub(b"", header)
    return kept[:-2] + b"Content-Transfer-Encoding: " + encoding + b"\r\n\r\n"


def _quoted_printable(body: bytes) -> bytes:
    """Quoted-printable (RFC 2045 6.7), line by line: CRLF stays the line break."""
    lines = body.split(b"\r\n")
    encoded = [binascii.b2a_qp(line, quotetabs=False, istext=False).replace(b"\n", b"\r\n") for line in lines]
    return b"\r\n".join(encoded)


def _base64(body: bytes) -> bytes:
    return base64.encodebytes(body).replace(b"\n", b"\r\n")
