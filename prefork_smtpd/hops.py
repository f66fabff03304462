"""Mail loops: counting the Received fields of a message's header.

Every server a message passes prepends a Received field (RFC 5321 4.4), so
a message caught in a loop (a domain whose MX leads back here, two relays
pointing at each other) gains one per pass. RFC 5321 6.3: counting them
is the usual way to stop it, with a threshold of at least 100. Without
one, a single mail relayed in a loop is written, fsynced and sent again
until it reaches the size limit, some 70,000 passes.

The message is read as the session holds it: CRLF lines in a list of
pieces cut anywhere, a field name possibly split between two. Only the
header section counts (up to the first empty line); a Received line in a
body (a forwarded message) does not. Nothing is joined but a few octets
around each cut, and counting stops once past ``limit``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# A field name at the start of a line. RFC 5322's obsolete syntax allows
# blanks before the colon; more than a few of them are not worth the scan.
_RECEIVED = re.compile(rb"\nreceived[ \t]{0,8}:", re.IGNORECASE)
# The most of a line's start a match needs: "\n", "received", blanks, ":".
_LINE_START = 1 + len(b"received") + 8 + 1
# The end of the header: a line break, then an empty line, CRLF or a bare
# LF (a BINARYMIME message is kept as received). At most three octets.
_END_OF_HEADER = re.compile(rb"\n\r?\n")
_END_OF_HEADER_MAX = 3


def received_fields(pieces: Iterable[bytes | bytearray], limit: int) -> int:
    """The Received fields in the header section of a message, counted up to
    ``limit + 1`` (enough to tell whether it is over ``limit``)."""
    count = 0
    # What the next piece is read after: the end of the text before it, for
    # a match or an end of header cut in two. It starts as a CRLF before the
    # message, so the first line is a line start and an empty header (the
    # message begins with CRLF) an end of header.
    carry = b"\r\n"
    for piece in pieces:
        text = carry + piece
        end = _END_OF_HEADER.search(text)
        stop = len(text) if end is None else end.start() + 1
        for match in _RECEIVED.finditer(text, 0, stop):
            if match.end() > len(carry):  # else wholly in the carry: counted with the piece before
                count += 1
                if count > limit:
                    return count
        if end is not None:
            return count
        # Keep the last line's start if a match may still begin there, and
        # always three octets (an end of header may be cut anywhere).
        size = len(text)
        line = text.rfind(b"\n")
        keep = min(line if line >= size - _LINE_START else size, size - (_END_OF_HEADER_MAX - 1))
        carry = bytes(text[max(keep, 0):])
    return count
