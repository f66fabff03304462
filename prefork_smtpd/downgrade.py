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
_HEADER_END = re.compile(rb"\r\n\r\n")
_CTE_FIELD = re.compile(rb"^content-transfer-encoding[ \t]*:.*\r\n(?:[ \t].*\r\n)*", re.IGNORECASE | re.MULTILINE)
_MIME_VERSION = re.compile(rb"^mime-version[ \t]*:", re.IGNORECASE | re.MULTILINE)
_CONTENT_TYPE = re.compile(rb"^content-type[ \t]*:", re.IGNORECASE | re.MULTILINE)
_IDENTITY = frozenset({"", "7bit", "8bit"})
_MUST_BE_7BIT = frozenset({"message/partial", "message/external-body"})


class NotConvertible(Exception):
    """Why a message has no 7-bit form here."""


def seven_bit_form(message: bytes) -> bytes:
    """``message`` with every 8-bit octet encoded away; raises NotConvertible.

    Lines end in CRLF in the result, as DATA sends them anyway.
    """
    message = _LINE_ENDINGS.sub(b"\r\n", message)
    header, body = _split(message)
    converted_header, converted_body = _entity(header, body, "text/plain", 0)
    if converted_body is not body and not _MIME_VERSION.search(header):
        # A mail that was no MIME mail becomes one, to say how its text is encoded.
        added = b"MIME-Version: 1.0\r\n"
        if not _CONTENT_TYPE.search(header):
            added += b"Content-Type: text/plain; charset=unknown-8bit\r\n"
        converted_header = converted_header[:-2] + added + b"\r\n"
    return converted_header + converted_body


def _split(entity: bytes) -> tuple[bytes, bytes]:
    """(header block with its blank line, body); a header alone has an empty body."""
    if entity.startswith(b"\r\n"):
        return b"\r\n", entity[2:]  # no header fields: the body only
    end = _HEADER_END.search(entity)
    if end is None:
        return entity + (b"" if entity.endswith(b"\r\n") else b"\r\n") + b"\r\n", b""
    return entity[: end.end()], entity[end.end():]


def _entity(header: bytes, body: bytes, default_type: str, depth: int) -> tuple[bytes, bytes]:
    """(header, body) converted; the same objects where nothing needed converting."""
    if depth > MAX_DEPTH:
        raise NotConvertible(f"MIME parts nested more than {MAX_DEPTH} deep")
    if not header.isascii():
        raise NotConvertible("8-bit octets in a header")
    if body.isascii():
        return header, body
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
        inner = "message/rfc822" if content_type == "multipart/digest" else "text/plain"
        return _seven_bit_label(header, encoding), _multipart(body, boundary.encode("ascii"), inner, depth)
    if content_type == "message/rfc822":  # its encoding stays identity (RFC 2046 5.2.1): converted inside
        inner_header, inner_body = _split(body)
        return _seven_bit_label(header, encoding), b"".join(_entity(inner_header, inner_body, "text/plain", depth + 1))
    if content_type in _MUST_BE_7BIT:
        raise NotConvertible(f"8-bit octets in a {content_type} part")
    if fields.get_content_maintype() == "text":
        return _relabelled(header, b"quoted-printable"), _quoted_printable(body)
    return _relabelled(header, b"base64"), _base64(body)  # message/global too (RFC 6532 3.5 allows it)


def _seven_bit_label(header: bytes, encoding: str) -> bytes:
    """A composite part's header once its parts are 7 bits: "8bit" said otherwise."""
    return _relabelled(header, b"7bit") if encoding == "8bit" else header


def _multipart(body: bytes, boundary: bytes, inner_type: str, depth: int) -> bytes:
    """The multipart body with each part converted; boundaries, preamble and epilogue kept."""
    delimiter = re.compile(rb"(?:\A|\r\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r\n|\Z)")
    out: list[bytes] = []
    start = 0  # where the text not yet copied begins
    in_part = False  # between a delimiter and the next one
    closed = False
    for match in delimiter.finditer(body):
        if in_part:
            header, part_body = _split(body[start : match.start()])
            out.extend(_entity(header, part_body, inner_type, depth + 1))
        elif not body[: match.start()].isascii():
            raise NotConvertible("8-bit octets in a multipart preamble")
        else:
            out.append(body[: match.start()])
        line_end = match.end() + 2 if body.startswith(b"\r\n", match.end()) else match.end()
        out.append(body[match.start() : line_end])
        start = line_end
        in_part = match.group(1) is None
        if not in_part:
            closed = True
            break
    rest = body[start:]
    if in_part:  # no closing delimiter: the last part runs to the end
        header, part_body = _split(rest)
        out.extend(_entity(header, part_body, inner_type, depth + 1))
    elif not rest.isascii():
        raise NotConvertible("8-bit octets in a multipart epilogue" if closed else "8-bit octets in a multipart without parts")
    else:
        out.append(rest)
    return b"".join(out)


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
