"""CHUNKING (RFC 3030): the BDAT command and the framing of its chunks.

``BDAT <size> [LAST]`` is followed by exactly ``size`` octets of message
data, then the next command. Nothing marks the end of a chunk but its
announced size: no dot-stuffing, no end-of-data line. So the one rule of
the framing is to count: once a BDAT command line parses, its ``size``
octets are message data whatever they hold (a ``QUIT``, a ``.`` line) and
whatever the session thinks of the chunk (out of sequence, over the size
limit, after a failed chunk: read and discarded, never taken for
commands). A BDAT line whose size does not parse leaves the end of its
chunk unknown: the session answers it and closes, rather than read
message data as commands.

This module is the state machine of one chunk, sans-IO: ``Chunk.take``
is given the session's buffer and says how far the chunk's data reaches
in it. What the data means (kept, checked, discarded) is the session's.
"""

from __future__ import annotations

import re

from .events import Reply

# RFC 3030 2: bdat-cmd ::= "BDAT" SP chunk-size [ SP end-marker ] CR LF;
# chunk-size ::= 1*DIGIT. At most 20 digits, as for SIZE= (RFC 1870).
# Blanks are taken as the session takes them around the arguments (any
# run of spaces or tabs): a line that cannot be parsed closes the
# connection, and "BDAT 5  LAST" is no doubt about where the chunk ends.
_BDAT_ARGUMENTS = re.compile(r"([0-9]{1,20})(?:[ \t]+(LAST))?\Z", re.IGNORECASE)


def parse_bdat(arg: str) -> tuple[int, bool] | None:
    """``"1024 LAST"`` -> (1024, True); None if the arguments do not parse."""
    m = _BDAT_ARGUMENTS.match(arg)
    if m is None:
        return None
    return int(m.group(1)), m.group(2) is not None


class Chunk:
    """The data of one BDAT chunk, as it arrives.

    ``refusal``: the reply the chunk gets once its data is read, if it was
    refused at its command line (its data is then discarded); None for a
    chunk of the transaction.
    """

    __slots__ = ("size", "left", "last", "refusal")

    def __init__(self, size: int, last: bool, refusal: Reply | None = None) -> None:
        self.size = size
        self.left = size  # octets still to come
        self.last = last
        self.refusal = refusal

    def take(self, buf: bytes | bytearray, pos: int) -> int:
        """The chunk's data in ``buf`` runs from ``pos`` to the returned index."""
        stop = min(len(buf), pos + self.left)
        self.left -= stop - pos
        return stop

    @property
    def complete(self) -> bool:
        return self.left == 0
