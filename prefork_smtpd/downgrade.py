"""8-bit MIME to 7 bits, for a next hop that does not offer 8BITMIME.

RFC 6152 3: 8-bit octets go only to a server that offers 8BITMIME; to
another, a relay converts the message to 7 bits (RFC 2045) or returns it.
``seven_bit_form`` converts what can be converted and says why when it
cannot, so the runner sends the converted copy or bounces with ``5.6.3``.

What it does, part by part (sans-IO: bytes in, bytes out, nothing else):

* a part whose content is ASCII stays octet for octet;
* a leaf part with 8-bit content labelled ``7bit``, ``8bit`` or not
  labelled gets ``quoted-printable`` (text) or ``base64`` (anything else),
  and its ``Content-Transfer-Encoding`` field says so; text with no
  ``Content-Type`` is labelled ``text/plain; charset=unknown-8bit`` (RFC
  1428: the charset of unlabelled 8-bit text is unknown), and a message
  (the mail, or one embedded) without ``MIME-Version`` gets one;
* no quoted-printable line begins with "-" (it is written ``=2D``): a
  soft line break must never make a line that reads as a boundary;
* a ``multipart/*`` body keeps its boundaries, preamble and epilogue; each
  part is converted in turn;
* a ``message/rfc822`` part is converted as a message of its own (its
  encoding must stay identity, RFC 2046 5.2.1), and labelled ``7bit``.

What it refuses, with the reason: 8-bit octets in any header (no charset is
known to encode them with RFC 2047), in a preamble or epilogue, in a part
already labelled base64 or quoted-printable (malformed), labelled
``binary``, or in a ``message/*`` part other than ``rfc822`` and the
``global`` ones (the others must be 7bit: RFC 2046 5.2, RFC 3464); a
header holding a line that is no header field (a reader ends the header
there: fields added or removed around it would change what it reads); a
MIME header the email package cannot read (an RFC 2231 value in an
unusable charset), a boundary that is no printable ASCII, a Content-Type
with more than ``MAX_PARAMETERS`` parameters (the package's parsing is
quadratic in them). Nesting deeper than ``MAX_DEPTH``,
more than ``MAX_PARTS`` parts, or a header block over ``MAX_HEADER``
octets where 8-bit content needs it read, is refused too, so a hostile message
costs bounded recursion and bounded work.
"""

from __future__ import annotations

import base64
import binascii
import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

MAX_DEPTH = 50  # nested multiparts and messages
MAX_PARTS = 10_000  # MIME parts in all: each 8-bit one costs a header parse
MAX_HEADER = 256 * 1024  # octets of one header block the email package is given to parse
MAX_PARAMETERS = 1000  # ";" in a Content-Type field
REASON_VALUE = 40  # characters of a header value a refusal quotes

_NON_ASCII = re.compile(rb"[\x80-\xff]")
_CTE_FIELD = re.compile(rb"^content-transfer-encoding[ \t]*:.*\r\n(?:[ \t].*\r\n)*", re.IGNORECASE | re.MULTILINE)
_MIME_VERSION = re.compile(rb"^mime-version[ \t]*:", re.IGNORECASE | re.MULTILINE)
_CONTENT_TYPE = re.compile(rb"^content-type[ \t]*:", re.IGNORECASE | re.MULTILINE)
# A line a reader takes as part of the header: a field ("name:") or its continuation.
# A header block of fields only, as the email package reads a header
# ("name:" with no blank before the colon, or a continuation), then its blank line.
_FIELDS_ONLY = re.compile(rb"(?:(?:[!-9;-~]*:|[ \t])[^\r\n]*\r\n)*\r\n\Z")
_CONTENT_TYPE_FIELD = re.compile(rb"^content-type[ \t]*:.*\r\n(?:[ \t].*\r\n)*", re.IGNORECASE | re.MULTILINE)
_IDENTITY = frozenset({"", "7bit", "8bit"})
# message/* types whose content may be base64 (RFC 6532 3.5, RFC 6533 6): the others are 7bit only.
_MAY_BE_ENCODED = frozenset({
    "message/global", "message/global-headers", "message/global-delivery-status",
    "message/global-disposition-notification",
})
_TOO_LONG = re.compile(rb"^[^\r\n]{77,}", re.MULTILINE)
_QP_WIDTH = 76  # characters of an encoded line, its soft break included (RFC 2045 6.7)


class NotConvertible(Exception):
    """Why a message has no 7-bit form here."""


def seven_bit_form(message: bytes) -> bytes:
    """``message`` with every 8-bit octet encoded away; raises NotConvertible.

    Lines end in CRLF in the result, as DATA sends them anyway. The parts
    are found by their offsets in one copy of the message, never sliced out
    level by level: a message nested deep costs its size once, not once a
    level.
    """
    data = crlf_lines(message)
    if data.isascii():
        return data
    walk = _Walk(data)
    walk.entity(0, len(data), "text/plain", 0, message=True)
    return b"".join(walk.out)


def crlf_lines(message: bytes) -> bytes:
    """``message`` with every line ending CRLF. The store writes LF: one
    replace, exact in size. A regex substitution would make a piece per line
    (10 MiB of short lines held some 600 MiB at its peak)."""
    if b"\r" not in message:
        return message.replace(b"\n", b"\r\n")
    if message.count(b"\n") == message.count(b"\r") == message.count(b"\r\n"):
        return message  # CRLF already
    # A bare CR or LF among them: every ending made LF, then CRLF (three
    # passes in C, each exact in size).
    return message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


class _Walk:
    """One conversion: the message, what is written so far, the parts met."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.out: list[bytes] = []
        self.parts = 0

    def entity(self, start: int, end: int, default_type: str, depth: int, message: bool = False) -> None:
        """data[start:end], one entity (header and body), converted onto ``out``.
        ``message``: the entity is a whole message (the mail, or one embedded)."""
        data = self.data
        if _NON_ASCII.search(data, start, end) is None:
            self.out.append(data[start:end])
            return
        if depth > MAX_DEPTH:
            raise NotConvertible(f"MIME parts nested more than {MAX_DEPTH} deep")
        header, body = _split(data, start, end)
        if not header.isascii():
            raise NotConvertible("8-bit octets in a header")
        if len(header) > MAX_HEADER:
            raise NotConvertible(f"a MIME header block over {MAX_HEADER} octets")
        if not _FIELDS_ONLY.match(header):
            # A reader ends the header at such a line and reads the rest as
            # body: where this header ends would be a guess, and fields added
            # or removed on either side of it would change what is read.
            raise NotConvertible("a header line that is no header field")
        content_field = _CONTENT_TYPE_FIELD.search(header)
        if content_field and content_field.group().count(b";") > MAX_PARAMETERS:
            # The email package's parameter parsing is quadratic in them.
            raise NotConvertible(f"a Content-Type with more than {MAX_PARAMETERS} parameters")
        try:
            fields: Message = BytesHeaderParser(policy=compat32).parsebytes(header)
            if default_type != "text/plain":
                fields.set_default_type(default_type)
            content_type = fields.get_content_type()
            boundary = fields.get_boundary() if content_type.startswith("multipart/") else None
        except Exception as exc:  # noqa: BLE001: the email package on a hostile header (RFC 2231 charsets...)
            raise NotConvertible(f"a MIME header that cannot be read ({type(exc).__name__})") from None
        encoding = _encoding(str(fields.get("content-transfer-encoding", "")))
        if encoding not in _IDENTITY:
            raise NotConvertible(f"8-bit octets in a part labelled {' '.join(encoding.split())[:REASON_VALUE]}")
        added: list[bytes] = []  # header fields to add
        if message and not _MIME_VERSION.search(header):
            added.append(b"MIME-Version: 1.0\r\n")  # RFC 2045 4: to say how the text is encoded
        if content_type.startswith("multipart/"):
            if not boundary:
                raise NotConvertible("8-bit octets in a multipart without a boundary")
            if not (boundary.isascii() and boundary.isprintable() and len(boundary) <= 200):
                raise NotConvertible("a multipart boundary that is no printable ASCII")
            inner = "message/rfc822" if content_type == "multipart/digest" else "text/plain"
            self.out.append(_with_fields(header, added, b"7bit" if encoding == "8bit" else None))
            self.multipart(body, end, boundary.encode("ascii"), inner, depth)
        elif content_type == "message/rfc822":  # its encoding stays identity (RFC 2046 5.2.1): converted inside
            self.out.append(_with_fields(header, added, b"7bit" if encoding == "8bit" else None))
            self.entity(body, end, "text/plain", depth + 1, message=True)
        elif content_type.startswith("message/") and content_type not in _MAY_BE_ENCODED:
            raise NotConvertible(f"8-bit octets in a {content_type} part")  # RFC 2046 5.2, RFC 3464: 7bit only
        elif fields.get_content_maintype() == "text":
            if not _CONTENT_TYPE.search(header):
                added.append(b"Content-Type: text/plain; charset=unknown-8bit\r\n")
            self.out += [_with_fields(header, added, b"quoted-printable"), _quoted_printable(data[body:end])]
        else:  # message/global too (RFC 6532 3.5 allows it)
            self.out += [_with_fields(header, added, b"base64"), _base64(data[body:end])]

    def multipart(self, start: int, end: int, boundary: bytes, inner_type: str, depth: int) -> None:
        """The multipart body data[start:end], each part converted onto ``out``;
        boundaries, preamble and epilogue kept as they are."""
        data, out = self.data, self.out
        # A delimiter line begins with the CRLF before it (RFC 2046 5.1.1); the
        # one opening the body borrows the CRLF that ends the header block.
        delimiter = re.compile(rb"\r\n--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r\n|\Z)")
        copied = start  # out holds the body up to here
        in_part = False  # between a delimiter and the next one
        for match in delimiter.finditer(data, start - 2, end):
            if in_part:
                self.part(copied, match.start(), inner_type, depth)
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
            # (at the end of the message, less its last line break, as a reader
            # takes it; inside another part, that part's delimiter took it).
            last = end - 2 if end == len(data) and end - copied >= 2 and data.startswith(b"\r\n", end - 2) else end
            self.part(copied, last, inner_type, depth)
            out.append(data[last:end])
        elif _NON_ASCII.search(data, copied, end):
            raise NotConvertible("8-bit octets in a multipart epilogue or with no parts")
        else:
            out.append(data[copied:end])

    def part(self, start: int, end: int, inner_type: str, depth: int) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise NotConvertible(f"more than {MAX_PARTS} MIME parts")
        self.entity(start, end, inner_type, depth + 1)


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


def _encoding(value: str) -> str:
    """A Content-Transfer-Encoding value without its comments (RFC 2045 6.1
    allows them: ``8bit (raw UTF-8)``, nested too), lowercase. One pass: a
    pass per nesting level was quadratic in a hostile field's parentheses."""
    if "(" not in value:
        return value.strip().lower()
    kept, depth = [], 0
    for char in value:
        if char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth:
            kept.append(char)
    return "".join(kept).strip().lower()


def _with_fields(header: bytes, added: list[bytes], encoding: bytes | None) -> bytes:
    """The header block (fields only: checked) with ``added`` fields and,
    given ``encoding``, one Content-Transfer-Encoding field saying it, before
    its blank line."""
    if encoding is not None:
        header = _CTE_FIELD.sub(b"", header)
        added = [*added, b"Content-Transfer-Encoding: " + encoding + b"\r\n"]
    if not added:
        return header
    return header[:-2] + b"".join(added) + b"\r\n"


def _quoted_printable(body: bytes) -> bytes:
    """Quoted-printable (RFC 2045 6.7), line by line: CRLF stays the line break.

    binascii breaks long lines at 76 characters; a line it begins with "-"
    gets that "-" as "=2D", so that no soft break makes a line reading as a
    boundary of the multipart around the part (the text "xx--frontier" cut
    before its dashes would end the part there).
    """
    # One C call: CRLF stays the line break, a blank before it is encoded.
    encoded = binascii.b2a_qp(body, quotetabs=False, istext=True)
    if b"\n" not in body:  # one line: binascii then breaks it with a bare LF
        encoded = encoded.replace(b"\n", b"\r\n")
    if b"\n-" not in encoded and not encoded.startswith(b"-"):
        return encoded
    # One pass in C for every line; only a line the "=2D" made too long
    # (it was 75 or 76 characters) is broken again, by itself.
    encoded = (b"=2D" + encoded[1:] if encoded.startswith(b"-") else encoded).replace(b"\n-", b"\n=2D")
    return _TOO_LONG.sub(lambda line: _broken_again(line.group()), encoded)


def _broken_again(line: bytes) -> bytes:
    """An encoded line over _QP_WIDTH, broken (soft) at or before it, never
    inside an =XX; a piece that would begin with "-" begins with "=2D"."""
    pieces = []
    while len(line) > _QP_WIDTH:
        cut = _QP_WIDTH - 1  # room for the soft break's "="
        while b"=" in line[cut - 2 : cut]:
            cut -= 1
        pieces.append(line[:cut] + b"=")
        line = line[cut:]
        if line.startswith(b"-"):
            line = b"=2D" + line[1:]
    pieces.append(line)
    return b"\r\n".join(pieces)


def _base64(body: bytes) -> bytes:
    return base64.encodebytes(body).replace(b"\n", b"\r\n")
