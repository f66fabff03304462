"""What the SMTP session hands its worker."""

from __future__ import annotations


class Reply(bytes):
    """One complete reply, CRLF included: the very bytes to write.

    A ``bytes`` subclass, so that a catalogue of constant replies costs no
    allocation per command and a run of them joins with ``b"".join``.
    """

    __slots__ = ()

    @property
    def code(self) -> int:
        return int(self[:3])

    def __repr__(self) -> str:
        return f"Reply({bytes(self)!r})"
