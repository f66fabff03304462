"""What the SMTP session asks of its worker, and the verdicts it waits for.

The session (session.py) does no I/O. ``feed(data)`` and ``resume(verdict)``
return a list of the events below, in the order they happened; the worker
carries them out one by one. As in h11, each event is a small immutable
value and the caller dispatches on its type.

Outputs (session -> worker)
---------------------------
``Reply``     one complete reply to write. Replies to pipelined commands
              follow one another: the worker gathers them into one write.
``LogEvent``  a line for the log (a refusal and why, a HELO name...).
``Close``     write its last words (``reply``), then close. Nothing follows.
``AuthAborted``  an AUTH exchange ended in the session itself, with no
              password to check (cancelled, or input it cannot take): for
              the counters. The outcomes of a check the worker counts itself.
``Wait``      the base of the events that suspend the session until the
              worker brings a verdict. Nothing follows one; the session
              reads no command until ``resume(verdict)``, keeping what the
              client pipelined meanwhile. Each names the verdicts it takes:
``Deliver``   store ``envelope``; resume with ``Stored`` or ``StoreFailed``.
``StartTLS``  the 220 to STARTTLS is out: run the TLS handshake on this
              connection, then resume with ``TLSStarted``. Whatever the
              client sent behind STARTTLS in plaintext is dropped (the
              session has dropped its part already). A failed handshake
              ends the connection: there is no verdict for it.
``CheckCredentials``  check ``username`` and ``password`` (slowly, off the
              event loop); resume with ``Authenticated``, ``AuthFailed``
              (after the worker's delay) or ``AuthUnavailable``.

Verdicts (worker -> session, through ``Session.resume``)
--------------------------------------------------------
``Stored``, ``StoreFailed``, ``TLSStarted``, ``Authenticated``,
``AuthFailed``, ``AuthUnavailable``.

A new outside step is a new ``Wait`` subclass naming its verdict types,
the verdict classes, and one branch in the worker's event loop: the
session's waiting state and its ``resume`` serve every kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .session import Envelope
    from .tls import TLSSessionInfo


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


class Event:
    """Anything but a Reply that the session asks for."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class LogEvent(Event):
    text: str


@dataclass(frozen=True, slots=True)
class Close(Event):
    """Write ``reply`` (QUIT's 221, a 421 notice), then close the connection.

    The last words are a notice, not the refusal of a command: the worker
    does not count them among the 4xx/5xx replies.
    """

    reply: bytes = b""


@dataclass(frozen=True, slots=True)
class AuthAborted(Event):
    """An AUTH exchange of ``mechanism`` that ended before a password check.

    ``result`` is ``"cancelled"`` (the client sent ``*``) or ``"malformed"``
    (bad base64, broken credentials, a line too long, an authorization
    identity other than the user). Only counted: the reply says the rest.
    """

    mechanism: str
    result: str


class Verdict:
    """The outcome of an outside step, handed to ``Session.resume``."""

    __slots__ = ()


class Wait(Event):
    """The session waits for one of ``verdicts`` before it reads on."""

    __slots__ = ()
    verdicts: ClassVar[tuple[type[Verdict], ...]] = ()


@dataclass(frozen=True, slots=True)
class Stored(Verdict):
    """The message is on disk for good."""

    queue_id: str


@dataclass(frozen=True, slots=True)
class StoreFailed(Verdict):
    """The message could not be stored: the reply says why (a 4xx)."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Deliver(Wait):
    """A complete message: store it, then resume with Stored or StoreFailed."""

    envelope: Envelope
    verdicts: ClassVar[tuple[type[Verdict], ...]] = (Stored, StoreFailed)


@dataclass(frozen=True, slots=True)
class TLSStarted(Verdict):
    """The handshake succeeded: ``info`` says what it negotiated."""

    info: TLSSessionInfo


@dataclass(frozen=True, slots=True)
class StartTLS(Wait):
    """Run the TLS handshake (RFC 3207), then resume with TLSStarted."""

    verdicts: ClassVar[tuple[type[Verdict], ...]] = (TLSStarted,)


@dataclass(frozen=True, slots=True)
class Authenticated(Verdict):
    """The password matches: the session is ``username``'s."""

    username: str


@dataclass(frozen=True, slots=True)
class AuthFailed(Verdict):
    """No such user, or a wrong password (the worker delayed this verdict)."""


@dataclass(frozen=True, slots=True)
class AuthUnavailable(Verdict):
    """The check could not run now (too many in progress): a 454, try later."""


@dataclass(frozen=True, slots=True, repr=False)
class CheckCredentials(Wait):
    """Check a password (RFC 4954): resume with Authenticated, AuthFailed or AuthUnavailable."""

    mechanism: str
    username: str
    password: str
    verdicts: ClassVar[tuple[type[Verdict], ...]] = (Authenticated, AuthFailed, AuthUnavailable)

    def __repr__(self) -> str:  # a password never reaches a log or a traceback
        return f"CheckCredentials(mechanism={self.mechanism!r}, username={self.username!r}, password=<hidden>)"
