"""The SMTP session as a pure state machine (no sockets, clocks or files).

Theory of operation
-------------------
A worker owns one ``Session`` per TCP connection. It writes ``greeting()``
when the client connects, then hands every chunk that arrives to
``feed(data)`` and carries out the events it returns, in order (events.py):
``Reply`` bytes to write, one per command (PIPELINING falls out of this:
any number of commands may arrive in one read, and the worker writes
their replies at once), ``LogEvent`` lines, a last ``Close``.

When the session needs something only the outside world can do (store a
message; later a TLS handshake or a password check) it emits a ``Wait``
event (``Deliver(envelope)``) and enters the one waiting state,
``State.WAITING``; ``awaiting`` says what for. It reads no command until
the worker brings the verdict to ``resume(verdict)`` (for the store:
``message_stored(queue_id)``, ``message_failed(reply)``). Only then does it
answer and go on with whatever the client pipelined behind, which it kept
buffered meanwhile (or handed back to the worker with ``take_unread()``).

Which command is allowed in which state is data, not code: each handler's
entry in ``COMMANDS`` (commands.py) lists the states it may run in, with its
syntax, its EHLO keyword and when it is enabled; ``SEQUENCE_ERRORS`` gives
the 503 reply for each verb used too early or too late. Every transition is
made by one of the ``smtp_*`` handlers (or by a verdict); nothing outside
this module changes ``state``.

Every line gets exactly one reply. Limits come from a ``Limits`` object read
at the moment of use, so a live change applies to the next command. Every
refusal (4xx/5xx) also comes with a ``LogEvent`` naming the command,
secrets hidden, so the log says why a mail bounced.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Protocol, TypeVar

from . import chunking, dsn, replies, sasl, smtputf8
from .commands import CommandTable
from .events import (
    AuthAborted,
    Authenticated,
    AuthFailed,
    AuthUnavailable,
    CheckCredentials,
    Close,
    Deliver,
    Event,
    LogEvent,
    Reply,
    StartTLS,
    Stored,
    StoreFailed,
    TLSStarted,
    Verdict,
    Wait,
)
from .hops import received_fields
from .listeners import SMTP_CONTEXT, TLS_STARTTLS, ConnectionContext
from .tls import TLSSessionInfo

_T = TypeVar("_T")
try:  # read by mypyc when it compiles this module (hatch_build.py); a no-op at run time
    from mypy_extensions import mypyc_attr
except ImportError:  # not installed: a plain install needs nothing of mypy

    def mypyc_attr(*attrs: str, **kwattrs: object) -> Callable[[_T], _T]:
        return lambda cls: cls


class State(enum.Enum):
    CONNECTED = "connected"  # greeted; waiting for HELO/EHLO
    READY = "ready"  # HELO/EHLO done; no mail transaction
    MAIL = "mail"  # MAIL accepted; waiting for RCPT
    RCPT = "rcpt"  # at least one RCPT accepted
    DATA = "data"  # reading message content: after DATA's 354, or a BDAT chunk's octets
    CHUNKS = "chunks"  # between the chunks of a BDAT transaction (RFC 3030): BDAT goes on
    AUTH = "auth"  # an AUTH exchange waits for the client's next line (a 334 is out)
    WAITING = "waiting"  # an outside verdict is awaited (Session.awaiting)
    CLOSED = "closed"  # QUIT or a fatal error: nothing more is read

    # Members compare by identity, so they may hash by it: Enum.__hash__ is
    # a Python call (140 ns), made at every command's check of its states.
    __hash__ = object.__hash__


# The states as module constants, which the code below names. In Python
# 3.11 every ``State.X`` goes through EnumType.__getattr__'s slot (130 ns,
# ten times a global's), and a mail names states some fifty times.
CONNECTED = State.CONNECTED
READY = State.READY
MAIL = State.MAIL
RCPT = State.RCPT
DATA = State.DATA
CHUNKS = State.CHUNKS
AUTH = State.AUTH
WAITING = State.WAITING
CLOSED = State.CLOSED


# Every verb, with its handler, the states it may run in, its syntax and
# its EHLO keyword: one table (commands.py). The handlers register below, in
# Session; a verb the table does not know is unknown (500).
COMMAND_STATES = frozenset({CONNECTED, READY, MAIL, RCPT, CHUNKS})
COMMANDS = CommandTable()
# Known verbs this server does not implement: 502, in any state.
COMMANDS.not_implemented("EXPN", "TURN", "ETRN", "SEND", "SOML", "SAML", states=COMMAND_STATES)
# EHLO keywords that come with no verb of their own; a verb's follow, in the
# order the verbs register.
COMMANDS.extension("PIPELINING")
COMMANDS.extension(lambda session: f"SIZE {session.limits.max_message_size}")  # MAIL's SIZE=
COMMANDS.extension("8BITMIME")  # MAIL's BODY=
COMMANDS.extension("BINARYMIME")  # MAIL's BODY=BINARYMIME, with BDAT (RFC 3030 3)
COMMANDS.extension("CHUNKING")  # the BDAT verb (RFC 3030 2), which runs in every command state
COMMANDS.extension("SMTPUTF8")  # MAIL's SMTPUTF8: UTF-8 addresses and headers (RFC 6531)
COMMANDS.extension("ENHANCEDSTATUSCODES")
COMMANDS.extension(dsn.EHLO_KEYWORD)  # MAIL's RET=/ENVID=, RCPT's NOTIFY=/ORCPT= (dsn.py)
# STARTTLS is advertised only while it would start TLS; the verb itself runs
# wherever TLS is configured, so a second STARTTLS gets 503, not 502.
COMMANDS.extension("STARTTLS", lambda session: session.starttls_offered and session.tls is None)
# AUTH likewise: advertised only where a password may be sent (over TLS, or
# from loopback); elsewhere the verb answers 538.
COMMANDS.extension(lambda session: sasl.ehlo_keyword(), lambda session: session.auth_offered and session._auth_allowed_now())

# The 503 reply for a verb used in a state that does not allow it (any pair
# missing here gets BAD_SEQUENCE).
SEQUENCE_ERRORS: dict[tuple[str, State], Reply] = {
    ("MAIL", CONNECTED): replies.NEED_HELO,
    ("MAIL", MAIL): replies.NESTED_MAIL,
    ("MAIL", RCPT): replies.NESTED_MAIL,
    ("RCPT", CONNECTED): replies.NEED_HELO,
    ("RCPT", READY): replies.NEED_MAIL,
    ("DATA", CONNECTED): replies.NEED_HELO,
    ("DATA", READY): replies.NEED_MAIL,
    ("DATA", MAIL): replies.NEED_RCPT,
    ("STARTTLS", CONNECTED): replies.NEED_HELO,
    ("STARTTLS", MAIL): replies.IN_TRANSACTION,
    ("STARTTLS", RCPT): replies.IN_TRANSACTION,
    ("AUTH", CONNECTED): replies.NEED_HELO,
    ("AUTH", MAIL): Reply(sasl.AUTH_NOT_IN_MAIL),
    ("AUTH", RCPT): Reply(sasl.AUTH_NOT_IN_MAIL),
    # Between BDAT chunks only BDAT goes on (or RSET, EHLO, QUIT... end it).
    ("MAIL", CHUNKS): replies.NESTED_MAIL,
    ("RCPT", CHUNKS): replies.CHUNKS_UNDER_WAY,
    ("DATA", CHUNKS): replies.DATA_AFTER_BDAT,  # RFC 3030 2: never both in one transaction
    ("STARTTLS", CHUNKS): replies.IN_TRANSACTION,
    ("AUTH", CHUNKS): Reply(sasl.AUTH_NOT_IN_MAIL),
}

# BDAT runs in every command state, since its chunk must be read whatever
# happens (chunking.py); out of sequence, its chunk is read, discarded and
# answered with the 503 given here for the state.
CHUNK_SEQUENCE_ERRORS: dict[State, Reply] = {
    CONNECTED: replies.NEED_HELO,
    READY: replies.NEED_MAIL,
    MAIL: replies.NEED_RCPT,
}

# SASL's replies (sasl.py), as the session sends them.
AUTH_SUCCEEDED = Reply(sasl.AUTH_SUCCEEDED)
AUTH_FAILED = Reply(sasl.AUTH_FAILED)
AUTH_NEEDS_TLS = Reply(sasl.AUTH_NEEDS_TLS)
ALREADY_AUTHENTICATED = Reply(sasl.ALREADY_AUTHENTICATED)

XSTAT_TEXT = {
    "TOTAL": "total connections",
    "CURRENT": "current connections",
    "BYTES": "total bytes of data transferred",
    "MAILS": "total mails sent",
    "PROXIED": "current connections through a trusted proxy",
    "QUEUE": "mails in the outbound queue",  # prefork-smtpd-metrics shows these two
    "QUEUEAGE": "seconds the oldest queued mail has waited",
    "TLS": "total TLS sessions",
}

# RFC 5322 atext without "/" (a folder separator): a local part made of these
# joined by single dots can never name "..", a hidden file or a subfolder.
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-=?^_`{|}~]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z|\[[\x21-\x5a\x5e-\x7e]+\]\Z")
# A HELO name: like _LABEL, but with "_", which real hosts use in their names.
_HELO_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HELO_DOMAIN = re.compile(rf"{_HELO_LABEL}(?:\.{_HELO_LABEL})*\.?\Z")
_LITERAL_TAG = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]\Z")  # Standardized-tag (Ldh-str)
# No "%": ipaddress would take a zone id ("fe80::1%anything") as valid.
_ADDRESS_LITERAL = re.compile(r"\[(IPv6:)?([0-9A-Fa-f:.]+)\]\Z", re.IGNORECASE)
# RFC 5321 4.1.2 A-d-l: "@one.example,@two.example:" before a mailbox; an
# address literal may sit in it, colons and all.
_AT_DOMAIN = rf"@(?:{_LABEL}(?:\.{_LABEL})*|\[[\x21-\x5a\x5e-\x7e]+\])"
_SOURCE_ROUTE = re.compile(rf"{_AT_DOMAIN}(?:,{_AT_DOMAIN})*:")
CATCH_ALL = "*"  # --domain '*': every domain is served (nothing is relayed anyway)
_SIZE_VALUE = re.compile(r"[0-9]{1,20}\Z")  # RFC 1870 size-value: 1*20DIGIT
# esmtp-keyword ["=" esmtp-value] (RFC 5321 4.1.2). The value is matched
# loosely and checked apart (_esmtp_value): a known parameter with a bad
# value (empty, "=", non-ASCII) gets its own syntax reply, not MAIL's.
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=(.*))?\Z", re.DOTALL)
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")


def _esmtp_value(value: str | None) -> str | None:
    """The value as given, or "" (which every parameter refuses) if it is no esmtp-value."""
    return value if value is None or _ESMTP_VALUE.match(value) else ""
# Why a message is refused, worst first: a bare CR or LF is a framing error
# (the message may not even end where the client thinks), the others limits.
# Any other reason (the worker's refuse_message: its own shortage) ranks 0.
_DATA_ERROR_RANK = {replies.BARE_LINE_END_IN_DATA: 3, replies.TEXT_LINE_TOO_LONG: 2, replies.MESSAGE_TOO_BIG: 1}

LOG_LINE_MAX = 100  # octets of a refused command shown in the log
MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2


@dataclass
class Limits:
    """The limits a session obeys; the worker may change them live."""

    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 100
    max_command_line: int = 512  # octets, CRLF included (RFC 5321 4.5.3.1.4)
    max_text_line: int = 1000  # octets, CRLF included (RFC 5321 4.5.3.1.6)
    max_errors: int = 20  # bad commands before 421 (Postfix's hard limit)
    max_auth_failures: int = 3  # failed AUTH attempts before 421
    max_hops: int = 100  # Received fields a message may carry (RFC 5321 6.3)


class LimitSource(Protocol):
    """Where a session reads its limits: a ``Limits``, or the worker's live view
    of shared memory (``stats.LiveSettings``), read at each use."""

    @property
    def max_message_size(self) -> int: ...
    @property
    def max_recipients(self) -> int: ...
    @property
    def max_command_line(self) -> int: ...
    @property
    def max_text_line(self) -> int: ...
    @property
    def max_errors(self) -> int: ...
    @property
    def max_auth_failures(self) -> int: ...
    @property
    def max_hops(self) -> int: ...


@dataclass
class Recipient:
    address: str  # as the client gave it (any source route dropped), for Delivered-To
    folder: str  # the mail_dir subfolder it is stored in
    subfolder: str = ""  # its Maildir++ subfolder (".invoices" for bob+invoices), if the store has one
    dsn: dsn.RecipientDSN | None = None  # NOTIFY=, ORCPT= (None: neither given)
    outside: bool = False  # in a domain not served here: queued for relay (folder "")


@dataclass
class Envelope:
    helo: str
    sender: str  # "" for the null reverse-path
    recipients: list[Recipient] = field(default_factory=list)
    # The message as received: CRLF lines, dot-stuffing undone, in the
    # pieces it arrived in. Each piece holds whole lines, so the store can
    # convert and write it piece by piece, never holding the GIL long
    # enough to stall the event loop on a 50 MiB message.
    chunks: list[bytes | bytearray] = field(default_factory=list)  # small pieces gathered in bytearrays
    size: int = 0
    tls: TLSSessionInfo | None = None  # the session was encrypted (Received: ESMTPS)
    login: str = ""  # the user who authenticated (Received: ESMTPA)
    dsn: dsn.MailDSN | None = None  # RET=, ENVID= (None: neither given)
    # Two flags MAIL sets on the rare envelope that needs them: class
    # attributes, not fields (unannotated, so dataclass leaves them out and
    # an instance may set its own), so the usual envelope is built no slower.
    # SMTPUTF8 (RFC 6531): addresses and headers may be UTF-8.
    smtputf8 = False
    # BODY=BINARYMIME (RFC 3030 3), sent with BDAT: the chunks are the
    # message octet for octet, any bytes, not CRLF lines; stored as they came.
    binary = False

    @property
    def protocol(self) -> str:
        """The ``with`` of the Received header: ESMTP, ESMTPS, ESMTPA, ESMTPSA
        (RFC 3848), or UTF8SMTP, UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA (RFC 6531 3.7.3)."""
        return (
            ("UTF8SMTP" if self.smtputf8 else "ESMTP")
            + ("S" if self.tls is not None else "")
            + ("A" if self.login else "")
        )

    @property
    def content(self) -> bytes:
        """The whole message in one piece (for tests and small uses)."""
        return b"".join(self.chunks)


# Subclassed by code that may stay interpreted (tests): allowed when compiled.
@mypyc_attr(allow_interpreted_subclasses=True)
class Policy:
    """Questions the session asks its server about a transaction.

    The server supplies its answers (``policy.ServerPolicy``); this base
    allows everything. An answer is None to go on, or the reply to refuse
    with. Answers must be quick: they run on the worker's event loop.
    """

    def mail_refusal(self, size: int) -> Reply | None:
        """At MAIL, with the ``SIZE=`` the client announced (0 if none)."""
        return None

    def recipient_refusal(self, folder: str) -> Reply | None:
        """At RCPT, for a recipient whose address passed every syntax check."""
        return None

    def mailbox(self, local_part: str, domain: str) -> Mailbox | None:
        """Where mail for ``local_part@domain`` goes, or None if it cannot go
        anywhere safe (553). ``domain`` is lowercase and served, or "" for
        this host itself (a bare local part, an address literal of ours)."""
        folder = folder_for(local_part)
        return None if folder is None else (folder, "")

    def owns_address(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether an address literal (``postmaster@[192.0.2.1]``) names this server."""
        return False


# A recipient's place in the store (``policy.MailboxNames``): its folder,
# relative to mail_dir ("bob", "a.example/bob"), and a Maildir++ subfolder
# of it (".invoices") or "". A plain tuple: made at every RCPT.
Mailbox = tuple[str, str]


ALLOW_ALL = Policy()


LOGGED_NAME = 254  # characters of a user name the log shows: no user's name is longer (users.MAX_NAME)


def logged_name(name: str) -> str:
    """A user name as the log shows it: quoted, cut after LOGGED_NAME
    characters (such a name cannot log in), with its length then."""
    if len(name) <= LOGGED_NAME:
        return repr(name)
    return f"{name[:LOGGED_NAME]!r}... ({len(name)} characters)"


def folder_for(local_part: str) -> str | None:
    """The mail_dir subfolder for a local part, or None if it is unsafe.

    One documented mapping: the local part, lowercased. Only a dot-atom of
    ASCII atext without "/" qualifies, so no folder name can escape mail_dir.
    A UTF-8 local part (SMTPUTF8) maps to its canonical caseless form, under
    the same rules (smtputf8.folder_for).
    """
    if len(local_part) > MAX_LOCAL_PART or not _DOT_ATOM.match(local_part):
        if not local_part.isascii():
            return smtputf8.folder_for(local_part)
        return None
    return local_part.lower()


@mypyc_attr(allow_interpreted_subclasses=True)
class Session:
    # The verbs this session answers. A subclass that adds verbs registers
    # them on a copy: ``commands = COMMANDS.copy()``, then ``@commands.verb``.
    # A ClassVar, so that compiled code too reads the subclass's table.
    commands: ClassVar[CommandTable] = COMMANDS

    # One Session per open connection, and most of them idle: slots keep an
    # idle session's attributes in one small block instead of a dict (with
    # more than 30 attributes the dict is a combined one of over 1.5 KB).
    # A subclass without __slots__ still gets a __dict__ for its own.
    __slots__ = (
        "hostname", "context", "starttls_offered", "tls", "auth_offered", "auth_without_tls", "login",
        "may_relay", "auth_failures", "_sasl", "_checking", "domains", "limits", "read_stat", "policy",
        "state", "helo", "errors", "admit_message", "_out", "_buf", "_awaiting", "_on_verdict",
        "_envelope", "_rejected_rcpts", "_skipping_long_line", "_line", "_line_after_auth",
        "_after_auth", "_chunks", "_size", "_data_error", "_at_line_start", "_chunk", "_chunk_line",
        "_chunk_failed", "_state_after_refused_chunk",
    )

    def __init__(
        self,
        hostname: str,
        domains: frozenset[str],
        limits: LimitSource,
        read_stat: Callable[[str], int],
        policy: Policy = ALLOW_ALL,
        context: ConnectionContext = SMTP_CONTEXT,
        tls: TLSSessionInfo | None = None,
        auth: bool = False,
        auth_without_tls: bool = False,
        may_relay: bool = False,
    ) -> None:
        self.hostname = hostname
        self.context = context  # the listener the client came in on (read-only)
        # STARTTLS: offered on a listener with TLS configured; ``tls`` says
        # what the handshake negotiated (given at once on an implicit-TLS port).
        self.starttls_offered = context.tls == TLS_STARTTLS
        self.tls = tls
        # AUTH: offered when there are users; before TLS only if the
        # client may send a password in the clear (a loopback client).
        self.auth_offered = auth
        self.auth_without_tls = auth_without_tls
        self.login = ""  # the user who authenticated
        # The client's address is in --relay-networks: it may name recipients
        # in other domains, as an authenticated client may.
        self.may_relay = may_relay
        self.auth_failures = 0
        self._sasl: sasl.SaslExchange | None = None  # in AUTH
        self._checking = ""  # the AUTH being checked, for the log
        self.domains = domains  # lowercase
        self.limits = limits
        self.read_stat = read_stat
        self.policy = policy
        self.state = CONNECTED
        self.helo = ""
        self.errors = 0  # bad commands so far, for max_errors
        # Asked at DATA: None admits a message, a 4xx reply refuses it (the
        # worker's memory for message data is full).
        self.admit_message: Callable[[], Reply | None] = _admit_every_message
        self._out: list[Reply | Event] | tuple[()] = _NO_OUTPUT  # what the current feed or resume returns
        # Input not yet answered: a bytearray of its own only while it holds some.
        self._buf: bytearray | bytes = _NO_INPUT
        # In WAITING: the event whose verdict is awaited, and what to do with it.
        self._awaiting: Wait | None = None
        self._on_verdict: Callable[[Verdict], Reply | None] | None = None
        self._envelope: Envelope | None = None
        self._rejected_rcpts = 0  # RCPTs refused in this transaction
        self._skipping_long_line = False
        # The command being answered, for the log of a refusal (rendered only then).
        self._line = b""
        self._line_after_auth = False  # it may be an answer to an AUTH challenge
        self._after_auth = False  # no known command since the last AUTH
        # DATA phase
        self._chunks: list[bytes | bytearray] | tuple[()] = _NO_CHUNKS
        self._size = 0
        self._data_error: Reply | None = None
        self._at_line_start = True  # the data consumed so far ends with a real CRLF
        # BDAT (RFC 3030): the chunk being read (in DATA), the unfinished
        # last line of a text message between reads and chunks, and whether
        # a failed chunk ended the transaction (later chunks: discarded).
        self._chunk: chunking.Chunk | None = None
        self._chunk_line = b""
        self._chunk_failed = False
        self._state_after_refused_chunk = CONNECTED  # where a refused chunk leaves the session

    # ----------------------------------------------------------------- API
    def greeting(self) -> Reply:
        return replies.greeting(self.hostname)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Reply | Event]:
        """Take bytes from the client; return what the worker must do, in order."""
        state = self.state
        if state is WAITING:
            if type(self._awaiting) is not StartTLS:  # sent in the clear behind STARTTLS: dropped (RFC 3207 5)
                self._add_input(data)  # kept until the verdict
            return []
        if state is CLOSED:
            return []
        self._add_input(data)
        out = self._out = []
        self._run()
        self._out = _NO_OUTPUT  # the caller's now: not kept while the session idles
        return out

    @property
    def awaiting(self) -> Wait | None:
        """The event whose verdict the session waits for (in WAITING)."""
        return self._awaiting

    def resume(self, verdict: Verdict) -> list[Reply | Event]:
        """The verdict on the awaited event: answer it, then read on.

        Whatever the client pipelined meanwhile is read now, unless the
        worker took it back (``take_unread``) to feed it at its own pace.
        """
        awaited = self._awaiting
        if awaited is None or not isinstance(verdict, awaited.verdicts):
            raise ValueError(f"{verdict!r} answers nothing the session waits for ({awaited!r})")
        on_verdict = self._on_verdict
        assert on_verdict is not None
        self._awaiting = self._on_verdict = None
        out = self._out = []
        reply = on_verdict(verdict)
        if reply is not None:
            out.append(reply)
        if self._buf:
            self._run()
        self._out = _NO_OUTPUT
        return out

    def message_stored(self, queue_id: str) -> list[Reply | Event]:
        """The message of the Deliver event is on disk for good."""
        return self.resume(Stored(queue_id))

    def message_failed(self, reply: Reply) -> list[Reply | Event]:
        """The message of the Deliver event could not be stored; ``reply`` says why (4xx)."""
        return self.resume(StoreFailed(reply))

    @property
    def data_due(self) -> int:
        """Octets of input certain to be message data, in DATA: the rest of a
        BDAT chunk (commands may follow it in the same read); for DATA, as
        many as come (the session stops at its end to wait for the store)."""
        chunk = self._chunk
        return UNBOUNDED if chunk is None else chunk.left

    @property
    def held_bytes(self) -> int:
        """Message bytes this session holds in memory while it reads DATA or BDAT chunks."""
        state = self.state
        if (state is DATA or state is CHUNKS) and self._data_error is None:
            return self._size
        return 0

    def refuse_message(self, reply: Reply) -> None:
        """Drop the message being read; discard the rest, answer ``reply`` at its end.

        For the server's own shortage (a 4xx): not counted as a client error,
        and any error in the client's data found later is answered instead.
        """
        self._reject_data(reply)

    def take_unread(self) -> bytes:
        """Hand back what the client pipelined behind an awaited verdict.

        The worker feeds it again, at its own pace, once the verdict is out.
        """
        unread = bytes(self._buf)
        self._buf = _NO_INPUT
        return unread

    def timeout_reply(self) -> Reply:
        """The worker's timer ran out: the 421 to write before it closes."""
        self.state = CLOSED
        return replies.timeout(self.hostname)

    def shutdown_reply(self) -> Reply:
        """The worker stops: the 421 to write before it closes."""
        self.state = CLOSED
        return replies.shutting_down(self.hostname)

    # ------------------------------------------------------------ framing
    def _add_input(self, data: bytes | bytearray | memoryview) -> None:
        if self._buf:
            self._buf += data
        else:
            self._buf = bytearray(data)

    def _run(self) -> None:
        """Answer every complete command in the buffer, into ``self._out``."""
        out = self._out
        buf = self._buf
        assert type(out) is list and type(buf) is bytearray  # within a feed or resume, with input
        pos = 0
        while True:
            state = self.state
            if state is DATA:
                if self._chunk is None:
                    pos, reply = self._consume_data(buf, pos)
                else:
                    pos, reply = self._consume_chunk(buf, pos)  # BDAT
                if reply is None:
                    break  # the rest of the message (or chunk) is yet to come, or it is complete
                out.append(reply)
                continue
            if state is WAITING or state is CLOSED or pos == len(buf):
                break  # (nothing left: outside DATA, no command can be complete)
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos > self.limits.max_command_line and len(buf) - pos > self._line_limit(buf, pos):
                    # Drop the head of an endless line now; answer it once it ends.
                    if not self._skipping_long_line:
                        self._skipping_long_line = True
                        self._note_line(bytes(buf[pos : pos + LOG_LINE_MAX + 1]))
                    pos = len(buf)
                break
            line = bytes(buf[pos : nl + 1])
            pos = nl + 1
            if self._skipping_long_line or (
                len(line) > self.limits.max_command_line and len(line) > self._line_limit(line, 0)
            ):
                if not self._skipping_long_line:
                    self._note_line(line)
                self._skipping_long_line = False
                if state is AUTH:
                    # The answer to a challenge: refused, it ends the
                    # exchange (RFC 4954 4), or the client's next command
                    # would be read as its credentials.
                    reply = self._sasl_step(sasl.Failure(sasl.LINE_TOO_LONG))
                else:
                    reply = self._error(replies.COMMAND_TOO_LONG)
            elif state is AUTH:
                self._note_line(line)
                reply = self._auth_line(line)
            else:
                self._line = line  # _note_line, inlined: once per command
                self._line_after_auth = self._after_auth
                reply = self._command(line)
            if reply is not None:
                out.append(reply)
            if type(self._awaiting) is StartTLS:
                # RFC 3207 5 (CVE-2011-0411): what the client sent behind
                # STARTTLS was sent in the clear; it must never be read as
                # if it came over TLS.
                pos = len(buf)
                break
        del buf[:pos]
        if not buf:
            self._buf = _NO_INPUT  # an idle session keeps no buffer

    def _line_limit(self, buf: bytes | bytearray, pos: int) -> int:
        """The longest command line allowed at ``pos``: an AUTH line and its
        answers may be 12288 octets (RFC 4954 4), a RCPT line 500 more than
        the limit for its NOTIFY and ORCPT (RFC 3461 4), any other the limit."""
        verb = buf[pos : pos + 5].upper()
        if self.state is AUTH or verb in (b"AUTH ", b"AUTH\r"):
            return max(sasl.MAX_AUTH_LINE, self.limits.max_command_line)
        if verb == b"RCPT ":
            return self.limits.max_command_line + dsn.RCPT_LINE_EXTENSION
        return self.limits.max_command_line

    def _note_line(self, line: bytes) -> None:
        """Remember the line being answered, in case it is refused and logged."""
        self._line = line
        self._line_after_auth = self._after_auth

    def _command(self, line: bytes) -> Reply | None:
        """Answer one line that ends with LF."""
        cr = line.find(b"\r")
        if cr < 0 or cr != len(line) - 2:  # no CRLF at the end, or a CR before it (one scan, no slice)
            return self._error(replies.BARE_LINE_END_IN_COMMAND)
        text = line[:-2].decode("latin-1")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        arg = arg.strip()
        command = self.commands.lookup(verb)
        # A SASL exchange goes on until a known command: until then an
        # unknown line may be credentials (see describe_command).
        if command is not None:
            self._after_auth = verb == "AUTH"
        elif is_auth_line(line):  # "AUTH\tPLAIN ...": unknown, yet credentials may follow
            self._after_auth = True
        if command is None:
            if b"\x00" in line:
                return self._error(replies.NUL_IN_COMMAND)
            return self._error(replies.UNKNOWN_COMMAND)
        handler = command.handler
        if handler is None or (command.enabled is not None and not command.enabled(self)):
            return self._error(replies.NOT_IMPLEMENTED)
        if self.state not in command.states:
            if verb == "DATA" and self.state is MAIL and self._envelope and self._rejected_rcpts:
                return self._error(replies.NO_VALID_RECIPIENTS)
            return self._error(SEQUENCE_ERRORS.get((verb, self.state), replies.BAD_SEQUENCE))
        return handler(self, arg)

    def _syntax_error(self, verb: str, status: str = "5.5.4", params: bool = False) -> Reply | None:
        """501 with the verb's syntax as the registry gives it."""
        return self._error(self.commands[verb].usage(status, params))

    def _error(self, reply: Reply, what: str | None = None) -> Reply | None:
        """A refusal that counts toward max_errors; ``what`` names it in the log.

        Returns the reply, or None once the errors reach max_errors: then the
        reply, the 421 and the Close are out already.
        """
        self._log_refusal(reply, what)
        self.errors += 1
        if self.errors < self.limits.max_errors:
            return reply
        self.state = CLOSED
        out = self._out
        assert type(out) is list  # within a feed or resume
        out.append(reply)
        out.append(LogEvent(f"too many errors ({self.errors}); closing"))
        out.append(Close(replies.too_many_errors(self.hostname)))
        return None

    def _emit(self, item: Reply | Event) -> None:
        """Add to what the current feed or resume returns."""
        out = self._out
        assert type(out) is list  # only a feed or resume has an output list
        out.append(item)

    def _log_refusal(self, reply: Reply, what: str | None = None) -> None:
        if what is None:
            what = describe_command(self._line, self._line_after_auth)
        self._emit(LogEvent(f"refused {what}: {reply[:-2].decode('ascii', 'replace')}"))

    def _wait(self, event: Wait, on_verdict: Callable[[Verdict], Reply | None]) -> None:
        """Stop reading commands until ``resume`` brings a verdict on ``event``."""
        self.state = WAITING
        self._awaiting = event
        self._on_verdict = on_verdict
        out = self._out
        assert type(out) is list  # within a feed or resume (inlined _emit: once per mail)
        out.append(event)

    # ----------------------------------------------------------- commands
    def _hello(self, arg: str, verb: str) -> str | None:
        name = arg.split(" ", 1)[0]
        if not valid_helo_name(name):
            return None
        self.helo = name
        self._reset_transaction()
        self.state = READY
        self._emit(LogEvent(f"{verb} {name}"))
        return name

    @COMMANDS.verb(states=COMMAND_STATES, syntax="EHLO hostname (a domain or an address literal)")
    def smtp_EHLO(self, arg: str) -> Reply | None:
        name = self._hello(arg, "EHLO")
        if name is None:
            return self._syntax_error("EHLO")
        keywords = self.commands.ehlo_keywords(self)
        return replies.multiline(250, None, [f"{self.hostname} Hello {name}", *keywords])

    @COMMANDS.verb(states=COMMAND_STATES, syntax="HELO hostname (a domain or an address literal)")
    def smtp_HELO(self, arg: str) -> Reply | None:
        name = self._hello(arg, "HELO")
        if name is None:
            return self._syntax_error("HELO")
        return replies.hello(self.hostname, name)

    @COMMANDS.verb(
        states={READY},
        syntax="MAIL FROM:<user@domain>",
        params="[SIZE=n] [BODY=7BIT|8BITMIME|BINARYMIME] [SMTPUTF8] [RET=FULL|HDRS] [ENVID=xtext] [AUTH=xtext]",
        help="MAIL FROM:<user@domain> [SIZE=n] [BODY=7BIT|8BITMIME|BINARYMIME] [SMTPUTF8] [RET=FULL|HDRS] [ENVID=xtext] [AUTH=xtext]",
    )
    def smtp_MAIL(self, arg: str) -> Reply | None:
        if self.context.require_tls and self.tls is None:
            return self._error(replies.MUST_STARTTLS)
        if self.context.require_auth and not self.login:
            # RFC 4954 6: a port that needs AUTH refuses MAIL before it.
            return self._error(replies.AUTH_REQUIRED)
        parsed = _split_path(arg, "FROM:")
        if parsed is None:
            return self._syntax_error("MAIL")
        path, params = parsed
        size = 0
        mail_dsn: dsn.MailDSN | None = None  # made at the first RET= or ENVID=
        binary = utf8 = False
        given: dict[str, str] = {}  # parameter -> its value (DSN ones: dsn.MailDSN checks their repeats)
        for param in params:
            m = _PARAM.match(param)
            if not m:
                return self._syntax_error("MAIL", params=True)
            key, value = m.group(1).upper(), _esmtp_value(m.group(2))
            if key in given and key not in dsn.MAIL_PARAMETERS:
                # The same value again is what some clients send (smtplib adds
                # SMTPUTF8 beside the caller's own): harmless. Two different
                # ones: which was meant is a guess.
                if given[key] == (value or "").upper():
                    continue
                return self._error(dsn.duplicate(key))
            given[key] = (value or "").upper()
            # A known parameter with a bad value is a syntax error (501);
            # only a parameter this server does not know gets 555.
            if key == "SIZE":
                if value is None or not _SIZE_VALUE.match(value):
                    return self._error(replies.SIZE_SYNTAX)
                size = int(value)
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME", "BINARYMIME"):
                    return self._error(replies.BODY_SYNTAX)
                binary = value.upper() == "BINARYMIME"
            elif key == "SMTPUTF8":
                if value is not None:  # RFC 6531 3.4: a keyword without a value
                    return self._error(replies.SMTPUTF8_SYNTAX)
                utf8 = True
            elif key == "AUTH":
                # RFC 4954 5: who the message is from, as a relay saw it.
                # Accepted and not used: nothing here relays on its word.
                if not value:
                    return self._error(replies.AUTH_PARAMETER_SYNTAX)
            elif key in dsn.MAIL_PARAMETERS:
                if mail_dsn is None:
                    mail_dsn = dsn.MailDSN()
                refusal = mail_dsn.take(key, value)
                if refusal is not None:
                    return self._error(refusal)
            else:
                return self._error(replies.unsupported_mail_parameter(key))
        if size and size > self.limits.max_message_size:  # (no SIZE=: no look at the limit)
            return self._error(replies.MESSAGE_TOO_BIG)
        if not path.isascii():
            decoded = self._utf8_path(path, utf8)
            if not isinstance(decoded, str):
                return decoded  # refused
            path = decoded
        if path[:1] == "@":  # a source route: accepted and ignored (RFC 5321 4.1.2)
            stripped = strip_source_route(path)
            if stripped is None:
                return self._syntax_error("MAIL", "5.1.7")
            path = stripped
        if path != "":
            address = _parse_mailbox(path) if path.isascii() else smtputf8.parse_mailbox(path)
            if address is None:
                return self._syntax_error("MAIL", "5.1.7")
            if address[1].lower() not in self.domains and not self._serves_other_sender(address[1]):
                return self._error(replies.SENDER_DOMAIN_NOT_SERVED)
            if self.login and not self._owns(path):
                return self._error(replies.SENDER_NOT_OWNED)
        refusal = self.policy.mail_refusal(size)
        if refusal is not None:  # the server's state, not the client's fault: no error counted
            self._log_refusal(refusal)
            return refusal
        envelope = self._envelope = Envelope(
            helo=self.helo, sender=path, tls=self.tls, login=self.login,
            dsn=mail_dsn if mail_dsn is not None and mail_dsn.given else None,
        )
        if utf8 or binary:
            envelope.smtputf8 = utf8
            envelope.binary = binary
        self._rejected_rcpts = 0
        self.state = MAIL
        return replies.SENDER_OK

    @COMMANDS.verb(
        states={MAIL, RCPT},
        syntax="RCPT TO:<user@domain>",
        params="[NOTIFY=NEVER|SUCCESS,FAILURE,DELAY] [ORCPT=type;xtext]",
        help="RCPT TO:<user@domain> or RCPT TO:<user>",
    )
    def smtp_RCPT(self, arg: str) -> Reply | None:
        parsed = _split_path(arg, "TO:")
        if parsed is None or parsed[0] == "":
            return self._syntax_error("RCPT")
        path, params = parsed
        rcpt_dsn = None
        if params:
            rcpt_dsn, refusal = self._rcpt_parameters(params)
            if refusal is not None:
                self._rejected_rcpts += 1
                return self._error(refusal)
        envelope = self._envelope
        assert envelope is not None
        utf8 = not path.isascii()
        if utf8:
            decoded = self._utf8_path(path, envelope.smtputf8)
            if not isinstance(decoded, str):
                self._rejected_rcpts += 1
                return decoded  # refused
            path = decoded
        if len(envelope.recipients) >= self.limits.max_recipients:
            # Not counted as a client error: RFC 5321 4.5.3.1.10 expects
            # clients to retry the rest in another transaction.
            self._rejected_rcpts += 1
            reply = replies.TOO_MANY_RECIPIENTS
            self._log_refusal(reply)
            return reply
        if path[:1] == "@":  # a source route: accepted and ignored (RFC 5321 4.1.2)
            stripped = strip_source_route(path)
            if stripped is None:
                self._rejected_rcpts += 1
                return self._syntax_error("RCPT", "5.1.3")
            path = stripped
        local, at, domain = path.rpartition("@")
        if utf8 and not domain.isascii():
            domain = smtputf8.ascii_domain(domain) or "?"  # a U-label domain: its A-labels (IDNA)
        if not at:
            local = path  # a bare local part, as the seed allowed
        elif not valid_domain(domain):
            self._rejected_rcpts += 1
            return self._syntax_error("RCPT", "5.1.3")
        elif (domain := domain.lower()) not in self.domains and not self._serves_other_recipient(domain):
            if domain[0] == "[":
                # Not one of our addresses: a relay attempt, refused whoever
                # asks (the queue never aims at a host the client picks).
                self._rejected_rcpts += 1
                return self._error(replies.LITERAL_NOT_RELAYED)
            return self._outside_recipient(path, rcpt_dsn)
        # An address literal (ours, or it was refused above) names this host, like a bare local part.
        mailbox = self.policy.mailbox(local, domain if at and domain[0] != "[" else "")
        if mailbox is None:
            self._rejected_rcpts += 1
            return self._error(replies.MAILBOX_NAME_NOT_ALLOWED)
        folder, subfolder = mailbox
        refusal = self.policy.recipient_refusal(folder)
        if refusal is not None and is_postmaster(local):
            # RFC 5321 4.5.1: postmaster is always there, whatever --mailboxes
            # says. A domain without a postmaster folder of its own (any domain
            # under the catch-all) has the host's: naming postmaster at made-up
            # domains must not make a folder for each.
            folder, subfolder = self.policy.mailbox(local, "") or mailbox
            refusal = None
        if refusal is not None:
            self._rejected_rcpts += 1
            return self._error(refusal)
        envelope.recipients.append(Recipient(address=path, folder=folder, dsn=rcpt_dsn, subfolder=subfolder))
        self.state = RCPT
        return replies.RECIPIENT_OK

    def _outside_recipient(self, path: str, rcpt_dsn: dsn.RecipientDSN | None) -> Reply | None:
        """A recipient in a domain not served here: queued for relay, if this client may relay."""
        if not (self.login or self.may_relay):
            self._rejected_rcpts += 1
            return self._error(replies.RELAY_DENIED)
        # A UTF-8 address (only in an SMTPUTF8 transaction: checked before) is
        # queued too: the queue runner sends it on with SMTPUTF8, or bounces it.
        address = _parse_mailbox(path) if path.isascii() else smtputf8.parse_mailbox(path)
        if address is None or len(address[0]) > MAX_LOCAL_PART or address[1].startswith("["):
            # Only a domain name is relayed to: an address literal would
            # point the queue at any host the client likes.
            self._rejected_rcpts += 1
            return self._error(replies.MAILBOX_NAME_NOT_ALLOWED)
        envelope = self._envelope
        assert envelope is not None
        envelope.recipients.append(Recipient(address=path, folder="", dsn=rcpt_dsn, outside=True))
        self.state = RCPT
        return replies.RECIPIENT_OK

    def _rcpt_parameters(self, params: list[str]) -> tuple[dsn.RecipientDSN | None, Reply | None]:
        """RCPT's parameters: the DSN ones taken, anything else refused (555)."""
        rcpt_dsn = dsn.RecipientDSN()
        for param in params:
            m = _PARAM.match(param)
            if not m:
                return None, self.commands["RCPT"].usage(params=True)
            key = m.group(1).upper()
            if key not in dsn.RCPT_PARAMETERS:
                return None, replies.RCPT_PARAMETERS
            refusal = rcpt_dsn.take(key, _esmtp_value(m.group(2)))
            if refusal is not None:
                return None, refusal
        return rcpt_dsn, None

    @COMMANDS.verb(states={RCPT}, syntax="DATA")
    def smtp_DATA(self, arg: str) -> Reply | None:
        if arg:
            return self._syntax_error("DATA")
        if self._envelope is not None and self._envelope.binary:
            return self._error(replies.BINARYMIME_NEEDS_BDAT)  # RFC 3030 3: 503
        refusal = self.admit_message()
        if refusal is not None:  # the server's shortage, not the client's error
            self._log_refusal(refusal)
            return refusal
        self.state = DATA
        self._chunks = []
        self._size = 0
        self._data_error = None
        self._at_line_start = True  # the CRLF of "DATA" starts the first line
        return replies.START_DATA

    @COMMANDS.verb(states=COMMAND_STATES, syntax="RSET")
    def smtp_RSET(self, arg: str) -> Reply | None:
        if arg:
            return self._syntax_error("RSET")
        self._reset_transaction()
        if self.state is not CONNECTED:
            self.state = READY
        return replies.OK

    @COMMANDS.verb(states=COMMAND_STATES, syntax="NOOP [string]")
    def smtp_NOOP(self, arg: str) -> Reply | None:
        return replies.OK

    @COMMANDS.verb(states=COMMAND_STATES, syntax="QUIT")
    def smtp_QUIT(self, arg: str) -> None:
        self.state = CLOSED
        self._emit(Close(replies.bye(self.hostname)))

    @COMMANDS.verb(states=COMMAND_STATES, syntax="HELP", ehlo="HELP")
    def smtp_HELP(self, arg: str) -> Reply | None:
        return self.commands.help_reply(self)

    @COMMANDS.verb(
        states=COMMAND_STATES,
        syntax="VRFY address",
        help="VRFY always answers 252: mailboxes are not disclosed",
    )
    def smtp_VRFY(self, arg: str) -> Reply | None:
        if not arg:
            return self._syntax_error("VRFY")
        return replies.CANNOT_VRFY

    @COMMANDS.verb(
        states=COMMAND_STATES,
        # Spelled from XSTAT_TEXT, so HELP and the 501 name every statistic there is.
        syntax="XSTAT " + "|".join(XSTAT_TEXT),
        help="XSTAT " + "|".join(XSTAT_TEXT) + ": server-wide counters",
    )
    def smtp_XSTAT(self, arg: str) -> Reply | None:
        key = arg.upper()
        text = XSTAT_TEXT.get(key)
        if text is None:
            return self._syntax_error("XSTAT")
        return replies.statistic(text, self.read_stat(key))

    # ----------------------------------------------------- STARTTLS, AUTH
    @COMMANDS.verb(
        states={READY},
        syntax="STARTTLS",
        help="STARTTLS: encrypt the session (RFC 3207)",
        # On the smtps port it is no unknown command: TLS is already active (503).
        enabled=lambda session: session.starttls_offered or session.tls is not None,
    )
    def smtp_STARTTLS(self, arg: str) -> Reply | None:
        if arg:
            return self._syntax_error("STARTTLS")
        if self.tls is not None:
            return self._error(replies.TLS_ALREADY_ACTIVE)
        self._emit(replies.READY_FOR_TLS)
        self._wait(StartTLS(), self._tls_started)
        return None

    def _tls_started(self, verdict: Verdict) -> Reply | None:
        """RFC 3207 4.2: everything learnt before TLS is forgotten; EHLO again."""
        assert isinstance(verdict, TLSStarted)
        self.tls = verdict.info
        self.helo = ""
        self.login = ""  # a login made in the clear (from loopback) is learnt before TLS too
        self._reset_transaction()
        self.state = CONNECTED
        return None

    @COMMANDS.verb(
        states={READY},
        syntax="AUTH mechanism [initial-response]",
        help="AUTH PLAIN|LOGIN [initial-response]: log in (RFC 4954)",
        enabled=lambda session: session.auth_offered,
    )
    def smtp_AUTH(self, arg: str) -> Reply | None:
        if self.login:
            return self._error(ALREADY_AUTHENTICATED)
        if not self._auth_allowed_now():
            return self._error(AUTH_NEEDS_TLS)
        exchange = self._sasl = sasl.SaslExchange()
        return self._sasl_step(exchange.start(arg.encode("latin-1")))

    def _auth_allowed_now(self) -> bool:
        """A password may cross only an encrypted connection (or a loopback one)."""
        return self.tls is not None or self.auth_without_tls

    def _auth_line(self, line: bytes) -> Reply | None:
        """The client's answer to a 334 challenge."""
        exchange = self._sasl
        assert exchange is not None
        if not line.endswith(b"\r\n"):  # a bare LF ends no line here either, as in a command (500 5.5.2)
            return self._sasl_step(sasl.Failure(sasl.MALFORMED))
        return self._sasl_step(exchange.feed(line[:-2]))

    def _sasl_step(self, step: sasl.Step) -> Reply | None:
        if isinstance(step, sasl.Challenge):
            self.state = AUTH
            return Reply(step.reply)
        exchange, self._sasl = self._sasl, None
        self.state = READY
        if isinstance(step, sasl.Failure):
            if exchange is not None and exchange.mechanism:  # counted by mechanism (unknown ones are not)
                result = "cancelled" if step.reply == sasl.CANCELLED else "malformed"
                self._emit(AuthAborted(exchange.mechanism, result))
            return self._error(Reply(step.reply))
        self._checking = f"{step.mechanism} as {logged_name(step.username)}"  # for the log; never the password
        self._wait(CheckCredentials(step.mechanism, step.username, step.password), self._checked)
        return None

    def _checked(self, verdict: Verdict) -> Reply | None:
        """The verdict on a password: 235, 535 (and 421 past the limit) or 454."""
        self.state = READY
        awaited = self._checking
        if isinstance(verdict, Authenticated):
            self.login = verdict.username
            self._emit(LogEvent(f"authenticated as {verdict.username!r} ({awaited})"))
            return AUTH_SUCCEEDED
        if isinstance(verdict, AuthUnavailable):
            # No failure (the password was never checked), but an error: a
            # client retrying on every 454 is bounded by max_errors.
            return self._error(replies.AUTH_TEMPORARY_FAILURE, f"AUTH {awaited}")
        assert isinstance(verdict, AuthFailed)
        self.auth_failures += 1
        self._log_refusal(AUTH_FAILED, f"AUTH {awaited}")
        if self.auth_failures < self.limits.max_auth_failures:
            return AUTH_FAILED
        self.state = CLOSED
        self._emit(AUTH_FAILED)
        self._emit(LogEvent(f"too many failed authentication attempts ({self.auth_failures}); closing"))
        self._emit(Close(replies.too_many_auth_failures(self.hostname)))
        return None

    def _owns(self, sender: str) -> bool:
        """An authenticated user sends as user@a-served-domain (under the
        catch-all every domain is served), or as its login if that is an address."""
        local, _, domain = sender.lower().rpartition("@")
        domain = smtputf8.served_form(domain)  # bücher.example is xn--bcher-kva.example
        login = self.login.lower()
        if "@" in login:
            login_local, _, login_domain = login.rpartition("@")
            return local == login_local and domain == smtputf8.served_form(login_domain)
        return local == login and (domain in self.domains or CATCH_ALL in self.domains)

    # A domain not in self.domains may still be served: these answer for it.
    def _serves_other_recipient(self, domain: str) -> bool:
        """An address literal of ours, or any domain under the catch-all."""
        if domain[0] == "[":
            address = literal_address(domain)
            return address is not None and self.policy.owns_address(address)
        return CATCH_ALL in self.domains

    def _serves_other_sender(self, domain: str) -> bool:
        """Senders: one of our literals; under the catch-all, any."""
        return CATCH_ALL in self.domains or self._serves_other_recipient(domain)
    # ----------------------------------------------------------- SMTPUTF8
    def _utf8_path(self, path: str, smtputf8_transaction: bool) -> str | Reply | None:
        """A path with octets above 0x7F: the client's UTF-8, decoded, or the refusal.

        Only a transaction whose MAIL said SMTPUTF8 may carry one (RFC 6531
        3.4, 3.7.4.2); the octets must be UTF-8 (RFC 6532 3.1).
        """
        if not smtputf8_transaction:
            return self._error(replies.UTF8_NEEDS_SMTPUTF8)
        decoded = smtputf8.decode_path(path)
        if decoded is None:
            return self._error(replies.ADDRESS_NOT_UTF8)
        return decoded

    def _reset_transaction(self) -> None:
        self._envelope = None
        self._rejected_rcpts = 0
        self._chunks = _NO_CHUNKS
        self._chunk_failed = False
        # A text chunk's unfinished last line (up to max_text_line octets),
        # left by a transaction that ended without LAST (RSET, MAIL, EHLO).
        self._chunk_line = b""

    # --------------------------------------------------------------- DATA
    # The message ends at the first CR LF "." CR LF of the byte stream, the
    # CRLF of the DATA command counting as the first CR LF; nothing else ends
    # it, however the reads are cut. Between reads the session remembers only
    # whether the bytes it consumed end with a real CRLF (``_at_line_start``):
    # after a bare LF, or inside a line it cut short, a ".\r\n" opening the
    # next read is message content, not the end of data.

    def _consume_data(self, buf: bytearray, pos: int) -> tuple[int, Reply | None]:
        """Take message lines from buf[pos:]; return (new pos, reply or None).

        Works on whole runs of complete lines with bytes methods (C speed),
        never byte by byte. A CR LF pair is never split between two runs, so
        every CR and LF of the stream is judged with its neighbour.

        One search for a line starting with "." answers two questions: with
        none, the data neither ends here nor has a line to unstuff (the
        usual read of a big message, scanned once instead of twice).
        """
        end = -1
        stuffed = True
        if self._at_line_start and buf.startswith(b".", pos):
            dot = pos  # the first line starts with "."
            if buf.startswith(b".\r\n", pos):
                seg_end, end = pos, pos + 3
        else:
            dot = buf.find(b"\r\n.", pos)
            stuffed = dot >= 0
        if end < 0:
            i = buf.find(b"\r\n.\r\n", dot) if stuffed else -1
            if i >= 0:
                seg_end, end = i + 2, i + 5
            else:
                seg_end = buf.rfind(b"\n", pos) + 1
        if end < 0 and seg_end == 0:
            if len(buf) - pos > self.limits.max_text_line:
                return self._drop_endless_line(buf, pos), None
            return pos, None  # wait for the end of the line
        if seg_end > pos:
            self._absorb(buf, pos, seg_end, stuffed)
        if end < 0:
            return seg_end, None
        return end, self._end_of_data()

    def _drop_endless_line(self, buf: bytearray, pos: int) -> int:
        """A line past the limit with no LF yet: drop its head, keep its last byte.

        The kept byte may be the CR of the line's CRLF. Every CR dropped is
        bare (the byte after it is here, and is no LF), so it is judged now.
        """
        keep = len(buf) - 1
        if buf.find(b"\r", pos, keep) >= 0:
            self._reject_data(replies.BARE_LINE_END_IN_DATA)
        else:
            self._reject_data(replies.TEXT_LINE_TOO_LONG)
        self._at_line_start = False
        return keep

    def _absorb(self, buf: bytearray, start: int, stop: int, stuffed: bool) -> None:
        """Check and keep one run of lines (it ends with LF, or at a dropped head).

        ``stuffed=False``: the caller found no line starting with "." in it.
        """
        seg = bytes(memoryview(buf)[start:stop])  # one copy (a bytearray slice would make two)
        self._at_line_start = seg.endswith(b"\r\n")
        if not self._check_lines(seg):
            return
        # No error so far: every run so far ended with CRLF, so seg starts
        # a line. Undo dot-stuffing: every line that starts with "." loses it.
        if stuffed and b"\r\n." in seg:
            seg = seg.replace(b"\r\n.", b"\r\n")
        if seg[:1] == b".":
            seg = seg[1:]
        self._size += len(seg)
        if self._size > self.limits.max_message_size:
            self._reject_data(replies.MESSAGE_TOO_BIG)
            return
        self._keep(seg)

    def _keep(self, piece: bytes | memoryview) -> None:
        """Add a piece to the message. Small pieces (a BDAT chunk of one
        octet, a read of one line) are gathered into one bytearray: held one
        object each, they would cost some 40 bytes of memory per octet of
        message, far beyond what the data memory limit counts."""
        chunks = self._chunks
        assert type(chunks) is list  # a message is being read
        if len(piece) >= GATHER_BELOW:
            chunks.append(bytes(piece))  # a view of the read buffer becomes its own copy; bytes stay as they are
        elif chunks and type(chunks[-1]) is bytearray and len(chunks[-1]) < GATHER_BELOW:
            chunks[-1] += piece
        else:
            chunks.append(bytearray(piece))

    def _check_lines(self, seg: bytes) -> bool:
        """Judge a run of whole lines (CRLF, length); True if it may be kept.

        Every check runs on every run of lines until the worst error is
        found, so the reply never depends on how the reads were cut.
        """
        error = self._data_error
        if error is replies.BARE_LINE_END_IN_DATA:
            return False
        crlf = seg.count(b"\r\n")
        if seg.count(b"\n") != crlf or seg.count(b"\r") != crlf:
            self._reject_data(replies.BARE_LINE_END_IN_DATA)
            return False
        if error is replies.TEXT_LINE_TOO_LONG:
            return False
        if has_long_line(seg, self.limits.max_text_line):
            self._reject_data(replies.TEXT_LINE_TOO_LONG)
            return False
        return error is None  # else over the size limit: nothing more is kept

    def _reject_data(self, reply: Reply) -> None:
        """Note why the message will be refused; the worst reason wins."""
        current = self._data_error
        if current is None or _DATA_ERROR_RANK.get(reply, 0) > _DATA_ERROR_RANK.get(current, 0):
            self._data_error = reply
            self._chunks = []

    def _end_of_data(self) -> Reply | None:
        envelope = self._envelope
        assert envelope is not None
        chunks = self._chunks
        reply = self._data_error
        if reply is None:
            assert type(chunks) is list  # a message was read
            max_hops = self.limits.max_hops
            if received_fields(chunks, max_hops) > max_hops:
                # RFC 5321 6.3: a mail loop. Refused for good, so the server
                # that sent it bounces it instead of sending it round again.
                reply = replies.too_many_hops(max_hops)
        if reply is not None:
            self._data_error = None
            # A recipient to relay has no folder: the log names its address.
            folders = ",".join(sorted({r.folder or r.address for r in envelope.recipients}))
            what = f"message from <{envelope.sender}> to {folders}"
            self._reset_transaction()
            self.state = READY
            if reply[0] == 0x34:  # "4": the server's shortage, not the client's error
                self._log_refusal(reply, what)
                return reply
            return self._error(reply, what)
        assert type(chunks) is list
        envelope.chunks = chunks
        envelope.size = self._size
        self._chunks = _NO_CHUNKS  # the envelope's now
        self._wait(Deliver(envelope), self._delivered)
        return None

    def _delivered(self, verdict: Verdict) -> Reply:
        """The store's verdict on the message: the reply to its DATA."""
        self._reset_transaction()
        self.state = READY
        if isinstance(verdict, Stored):
            return replies.queued(verdict.queue_id)
        assert isinstance(verdict, StoreFailed)
        return verdict.reply

    # --------------------------------------------------------------- BDAT
    # RFC 3030. A BDAT line announces how many octets of message data follow
    # it; the session counts them off the stream (chunking.Chunk) whatever
    # they hold, and answers the chunk once all of them are read: 250 for a
    # chunk taken, the reason for a chunk refused, the store's verdict after
    # LAST. Nothing is dot-stuffed and no line ends the data. A text message
    # (7BIT, 8BITMIME) is judged as DATA's is (CRLF lines, their length),
    # across reads and chunks; a BINARYMIME one is any octets. The size limit
    # counts every octet of every chunk. A failed chunk ends the
    # transaction; chunks pipelined behind it are read and discarded until
    # RSET (or MAIL, EHLO).

    @COMMANDS.verb(
        states=COMMAND_STATES,
        syntax="BDAT size [LAST]",
        help="BDAT size [LAST]: message data in chunks of size octets (RFC 3030)",
    )
    def smtp_BDAT(self, arg: str) -> Reply | None:
        parsed = chunking.parse_bdat(arg)
        if parsed is None:
            self._chunk_unframed()
            return None
        size, last = parsed
        state = self.state
        refusal = None
        if state is RCPT:
            self._start_chunks()
        elif state is not CHUNKS:
            refusal = self._chunk_sequence_error(state)
            self._size = 0  # nothing of it is held
        self._chunk = chunking.Chunk(size, last, refusal)
        self._state_after_refused_chunk = state
        self.state = DATA  # the chunk's octets are message data, never commands
        return None  # answered once the chunk's data is read

    def _chunk_sequence_error(self, state: State) -> Reply:
        """The 503 a chunk out of sequence gets, once read."""
        if state is READY and self._chunk_failed:
            return replies.CHUNK_AFTER_FAILURE
        if state is MAIL and self._rejected_rcpts:
            return replies.NO_VALID_RECIPIENTS
        return CHUNK_SEQUENCE_ERRORS[state]

    def _chunk_unframed(self) -> None:
        """A BDAT line whose size does not parse: its data cannot be told
        from the commands behind it, so none of it is read; 501, then close."""
        reply = self._syntax_error("BDAT")
        if reply is not None:
            self.state = CLOSED
            self._emit(reply)
            self._emit(LogEvent("BDAT without a valid chunk size: the end of its data is unknown; closing"))
            self._emit(Close(replies.chunk_unframed(self.hostname)))
        return None

    def _start_chunks(self) -> None:
        """The first chunk of a transaction: the message starts empty."""
        self._chunks = []
        self._size = 0
        self._data_error = None
        self._chunk_line = b""
        refusal = self.admit_message()
        if refusal is not None:  # the server's shortage: the chunk is read, then refused
            self._reject_data(refusal)

    def _consume_chunk(self, buf: bytearray, pos: int) -> tuple[int, Reply | None]:
        """Take the current chunk's octets from buf[pos:]; answer it once complete."""
        chunk = self._chunk
        assert chunk is not None
        stop = chunk.take(buf, pos)
        if stop > pos and chunk.refusal is None:
            self._chunk_data(buf, pos, stop)
        if not chunk.complete:
            return stop, None
        return stop, self._end_of_chunk(chunk)

    def _chunk_data(self, buf: bytearray, start: int, stop: int) -> None:
        """Count and keep (or judge and drop) octets of a transaction's chunk."""
        self._size += stop - start
        if self._size > self.limits.max_message_size:
            self._reject_data(replies.MESSAGE_TOO_BIG)  # answered at the end of this chunk
        view = memoryview(buf)
        envelope = self._envelope
        assert envelope is not None
        if envelope.binary:
            if self._data_error is None:
                self._keep(view[start:stop])
            return
        # A text message: whole lines are judged and kept as DATA's are; the
        # unfinished last line waits for the rest (a CRLF may straddle reads
        # or chunks), bounded by the line limit.
        end = buf.rfind(b"\n", start, stop) + 1
        if end:
            seg = self._chunk_line + view[start:end]
            if self._check_lines(seg):
                self._keep(seg)
            rest = bytes(view[end:stop])
        else:
            rest = self._chunk_line + view[start:stop]
        if len(rest) > self.limits.max_text_line:
            # No LF within the limit: judge the head and drop it, keep the
            # last octet (it may be the CR of the line's CRLF). Every CR
            # dropped is bare: the octet after it is here, and is no LF.
            self._reject_data(replies.BARE_LINE_END_IN_DATA if b"\r" in rest[:-1] else replies.TEXT_LINE_TOO_LONG)
            rest = rest[-1:]
        self._chunk_line = rest

    def _end_of_chunk(self, chunk: chunking.Chunk) -> Reply | None:
        self._chunk = None
        if chunk.refusal is not None:  # out of sequence: its data is discarded
            self.state = self._state_after_refused_chunk
            if chunk.refusal is replies.CHUNK_AFTER_FAILURE:
                # RFC 3030 2: chunks pipelined behind a failed one must be
                # read and discarded; the client did nothing wrong by sending them.
                self._log_refusal(chunk.refusal)
                return chunk.refusal
            return self._error(chunk.refusal)
        if chunk.last and self._chunk_line:
            # A message need not end with CRLF; its last line is judged as it is.
            line, self._chunk_line = self._chunk_line, b""
            if self._check_lines(line):
                self._keep(line)
        if self._data_error is None and not chunk.last:
            self.state = CHUNKS
            return replies.chunk_received(chunk.size)
        # The message is complete, or refused: as at the end of DATA.
        reply = self._end_of_data()
        if self.state is READY:
            self._chunk_failed = True  # chunks already pipelined behind are discarded
        return reply


# What Session.data_due says of DATA: more than any read.
UNBOUNDED = 1 << 62

# Message pieces shorter than this are gathered into one bytearray (Session._keep).
GATHER_BELOW = 64 * 1024

# Shared empty stand-ins for a session's output list and message pieces
# outside a feed and outside a message, so an idle session holds no list of
# its own. Empty tuples: appending to them fails loudly, it cannot leak
# into other sessions. Every feed and resume makes a fresh output list;
# DATA and the first BDAT chunk make a fresh list of pieces. (Typed as
# what they are: compiled code checks every value against its type.)
_NO_OUTPUT: tuple[()] = ()
_NO_CHUNKS: tuple[()] = ()
# The input buffer of a session with no input pending: empty bytes, never
# grown in place (a feed makes a bytearray of its own before adding to it).
_NO_INPUT = b""


def _admit_every_message() -> Reply | None:
    return None


def has_long_line(seg: bytes, limit: int) -> bool:
    """True if a line of ``seg`` (made of whole lines) exceeds ``limit`` octets.

    Such a line holds ``limit`` octets or more before its LF. From a line's
    start, a LF among the next ``limit`` octets ends every line that starts
    up to it within the limit, so the search jumps past the last such LF
    (memrchr, at C speed): no copy of ``seg`` is made, and any two jumps
    cover ``limit`` octets or more (a window of usual lines in one jump).
    """
    end = len(seg)
    if end <= limit:
        return False
    start = 0  # a line's start
    while end - start >= limit:
        last = seg.rfind(b"\n", start, start + limit)
        if last < 0:
            return True  # limit octets from a line's start, and no LF
        start = last + 1
    return False


def valid_helo_name(name: str) -> bool:
    """A domain or an address literal: all HELO/EHLO may name (RFC 5321 4.1.1.1).

    The name goes into the Received header as it is, so anything else
    (``mx.google.com(209.85.220.41)``) would forge trace data.
    """
    if name.startswith("["):
        return is_address_literal(name)
    return len(name) <= MAX_DOMAIN and _HELO_DOMAIN.match(name) is not None


def valid_domain(domain: str) -> bool:
    """A domain name or a well-formed address literal (RFC 5321 4.1.2, 4.1.3)."""
    if len(domain) > MAX_DOMAIN or not _DOMAIN.match(domain):
        return False
    return domain[0] != "[" or well_formed_literal(domain)


def well_formed_literal(text: str) -> bool:
    """``[IPv4]``, ``[IPv6:address]`` or a General-address-literal ``[tag:content]``.

    ``text`` has passed _DOMAIN (brackets, dcontent). Without a tag the
    content must be an IPv4 address; with IPv6: an IPv6 address. Any other
    tag is well formed (and names no host of ours: a relay attempt).
    """
    tag, colon, content = text[1:-1].partition(":")
    if colon and tag.lower() != "ipv6":
        return content != "" and _LITERAL_TAG.match(tag) is not None
    return literal_address(text) is not None


def is_address_literal(text: str) -> bool:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` holding a valid address."""
    return literal_address(text) is not None


def literal_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``, or None.

    An IPv4-mapped IPv6 address is given as its IPv4 address: it names the
    same host.
    """
    m = _ADDRESS_LITERAL.match(text)
    if m is None:
        return None
    tag, address = m.groups()
    try:
        if tag is None:
            return ipaddress.IPv4Address(address)
        v6 = ipaddress.IPv6Address(address)
    except ValueError:
        return None
    return v6.ipv4_mapped or v6


def strip_source_route(path: str) -> str | None:
    """The mailbox of a path, its source route dropped; None if the route is malformed.

    RFC 5321 4.1.2 and appendix C: ``<@a.example,@b.example:anne@smtpd.com>``
    is a path with a source route, which servers MUST accept and SHOULD
    ignore. A path without one comes back as it is.
    """
    if path[:1] != "@":
        return path
    m = _SOURCE_ROUTE.match(path)
    if m is None or m.end() == len(path):
        return None
    return path[m.end() :]


def is_postmaster(local_part: str) -> bool:
    """RFC 5321 4.5.1: "Postmaster" in any case; always accepted."""
    return len(local_part) == 10 and local_part.lower() == "postmaster"


def is_auth_line(line: bytes) -> bool:
    """The first word is AUTH, whatever whitespace surrounds it."""
    words = line.split(None, 1)
    return bool(words) and words[0].upper() == b"AUTH"


def describe_command(line: bytes, after_auth: bool = False) -> str:
    """A command line as the log shows it: quoted, escaped, cut, secrets hidden.

    Addresses stay (they say why a mail bounced). AUTH arguments never
    appear, nor any line that may answer an AUTH challenge (``after_auth``:
    no known command since the AUTH): either may hold credentials.
    """
    body = line[:-2] if line.endswith(b"\r\n") else line
    words = body.split(None, 1)  # any whitespace: "AUTH\tPLAIN secret" is hidden too
    if is_auth_line(body):
        return '"AUTH [arguments hidden]"' if len(words) > 1 else '"AUTH"'
    if after_auth and (not words or words[0].upper().decode("latin-1") not in COMMANDS):
        return "[a line after AUTH, hidden]"
    # repr escapes CR, LF and every control byte: a client cannot forge log lines.
    shown = repr(body[:LOG_LINE_MAX])[2:-1]
    return f'"{shown}..."' if len(body) > LOG_LINE_MAX else f'"{shown}"'


def _split_path(arg: str, keyword: str) -> tuple[str, list[str]] | None:
    """Split ``FROM:<path> PARAMS`` into the path and its parameters.

    Accepts ``FROM:<a@b>``, ``FROM: <a@b>`` and the seed's ``FROM: a@b``.
    """
    if arg[: len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword) :].lstrip(" ")
    if rest.startswith("<"):
        close = rest.find(">")
        if close < 0:
            return None
        path, tail = rest[1:close], rest[close + 1 :]
        if tail and not tail.startswith(" "):
            return None
    else:
        path, _, tail = rest.partition(" ")
        if not path:
            return None
    return path, tail.split()


def _parse_mailbox(path: str) -> tuple[str, str] | None:
    """``local@domain`` -> (local, domain) if it is a valid RFC 5321 mailbox."""
    local, at, domain = path.rpartition("@")
    if not at or not local or not domain:
        return None
    if not (_DOT_ATOM.match(local) or _QUOTED.match(local)) or not valid_domain(domain):
        return None
    return local, domain
