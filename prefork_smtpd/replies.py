"""Every SMTP reply the server sends: code, enhanced status code, text.

One catalogue for the session, the worker and the policy, so that a reply
reads the same wherever it is sent and tests can name it. Constants are
built once (a ``Reply`` is the bytes to write); replies that carry a value
(a host name, a queue id) are functions. Syntax errors (501) name the
command's syntax as its registry entry gives it (``commands.Command``).

Enhanced status codes: RFC 3463 and the IANA registry (RFC 5248).
"""

from __future__ import annotations

from functools import lru_cache

from .events import Reply


def reply(code: int, status: str | None, text: str) -> Reply:
    """``code status text`` CRLF; no ``status`` for the replies RFC 2034 exempts."""
    if status is None:
        return Reply(f"{code} {text}\r\n".encode())
    return Reply(f"{code} {status} {text}\r\n".encode())


def multiline(code: int, status: str | None, lines: list[str]) -> Reply:
    """A reply of several lines: ``code-`` on all but the last (RFC 5321 4.2.1)."""
    prefix = f"{code} {status} " if status is not None else f"{code} "
    cont = f"{code}-{status} " if status is not None else f"{code}-"
    last = len(lines) - 1
    return Reply("".join(f"{prefix if i == last else cont}{line}\r\n" for i, line in enumerate(lines)).encode())


@lru_cache(maxsize=64)
def syntax_error(usage: str, status: str = "5.5.4") -> Reply:
    """501: the command's arguments do not parse; ``usage`` says how they go."""
    return reply(501, status, f"Syntax: {usage}")


# --------------------------------------------------------- greeting, farewells
def greeting(hostname: str) -> Reply:
    return reply(220, None, f"{hostname} ESMTP prefork-smtpd")


def bye(hostname: str) -> Reply:
    return reply(221, "2.0.0", f"{hostname} Bye")


def timeout(hostname: str) -> Reply:
    return reply(421, "4.4.2", f"{hostname} Error: timeout exceeded")


def shutting_down(hostname: str) -> Reply:
    return reply(421, "4.3.2", f"{hostname} Service shutting down")


def too_many_errors(hostname: str) -> Reply:
    return reply(421, "4.7.0", f"{hostname} Error: too many errors")


def too_many_auth_failures(hostname: str) -> Reply:
    return reply(421, "4.7.0", f"{hostname} Error: too many failed authentication attempts")


def connection_refused(hostname: str, reason: str) -> Reply:
    """A client turned away at connect (a limit); ``reason`` says which."""
    return reply(421, "4.7.0", f"{hostname} Error: {reason}, try again later")


# ------------------------------------------------------------------ successes
OK = reply(250, "2.0.0", "Ok")
SENDER_OK = reply(250, "2.1.0", "Ok")
RECIPIENT_OK = reply(250, "2.1.5", "Ok")
START_DATA = reply(354, None, "End data with <CR><LF>.<CR><LF>")
READY_FOR_TLS = reply(220, "2.0.0", "Ready to start TLS")  # RFC 3207 4
CANNOT_VRFY = reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")


def hello(hostname: str, name: str) -> Reply:
    """HELO's reply (EHLO's first line is the same text)."""
    return reply(250, None, f"{hostname} Hello {name}")


def queued(queue_id: str) -> Reply:
    return reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def statistic(text: str, value: int) -> Reply:
    """XSTAT's answer: one server-wide counter."""
    return reply(250, "2.0.0", f"{text}: {value}")


# ------------------------------------------------- refusals: the command line
UNKNOWN_COMMAND = reply(500, "5.5.2", "Error: command not recognized")
NUL_IN_COMMAND = reply(500, "5.5.2", "Error: NUL byte in command")
BARE_LINE_END_IN_COMMAND = reply(500, "5.5.2", "Error: bare CR or LF in command; lines must end with CRLF")
COMMAND_TOO_LONG = reply(500, "5.5.6", "Error: command line too long")
NOT_IMPLEMENTED = reply(502, "5.5.1", "Error: command not implemented")

# -------------------------------------------- refusals: the order of commands
NEED_HELO = reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_MAIL = reply(503, "5.5.1", "Error: need MAIL command")
NESTED_MAIL = reply(503, "5.5.1", "Error: nested MAIL command")
NEED_RCPT = reply(503, "5.5.1", "Error: need RCPT command")
BAD_SEQUENCE = reply(503, "5.5.1", "Error: bad sequence of commands")  # no more precise 503 known
NO_VALID_RECIPIENTS = reply(554, "5.5.1", "Error: no valid recipients")
AUTH_REQUIRED = reply(530, "5.7.0", "Authentication required")  # RFC 4954 6: MAIL before AUTH
MUST_STARTTLS = reply(530, "5.7.0", "Must issue a STARTTLS command first")  # RFC 3207 4
TLS_ALREADY_ACTIVE = reply(503, "5.5.1", "Error: TLS already active")
IN_TRANSACTION = reply(503, "5.5.1", "Error: MAIL transaction in progress")  # STARTTLS, AUTH inside one

# -------------------------------------------------- refusals: the transaction
SIZE_SYNTAX = syntax_error("SIZE=<number of octets, at most 20 digits>")
BODY_SYNTAX = syntax_error("BODY=7BIT|8BITMIME|BINARYMIME")
RCPT_PARAMETERS = reply(555, "5.5.4", "Error: RCPT parameters are not supported")
SENDER_DOMAIN_NOT_SERVED = reply(550, "5.7.1", "Error: sender domain not served here")
RELAY_DENIED = reply(550, "5.7.1", "Error: relay access denied; recipient domain not served here")
# An address literal not of this server: the queue never aims at a host the client picks.
LITERAL_NOT_RELAYED = reply(550, "5.7.1", "Error: mail to an address literal is never relayed")
MAILBOX_NAME_NOT_ALLOWED = reply(553, "5.1.3", "Error: mailbox name not allowed")
UNKNOWN_MAILBOX = reply(550, "5.1.1", "Error: mailbox unavailable")
TOO_MANY_RECIPIENTS = reply(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_BIG = reply(552, "5.3.4", "Error: message size exceeds fixed maximum message size")
BARE_LINE_END_IN_DATA = reply(550, "5.6.0", "Error: bare CR or LF in message data; lines must end with CRLF")
TEXT_LINE_TOO_LONG = reply(500, "5.5.6", "Error: message line too long")


def too_many_hops(limit: int) -> Reply:
    """RFC 5321 6.3 and RFC 3463's 5.4.6 (routing loop detected)."""
    return reply(554, "5.4.6", f"Error: too many hops (more than {limit} Received header fields); a mail loop?")


AUTH_PARAMETER_SYNTAX = syntax_error("AUTH=<mailbox>|<>")
SENDER_NOT_OWNED = reply(553, "5.7.1", "Error: sender address not owned by the authenticated user")
AUTH_TEMPORARY_FAILURE = reply(454, "4.7.0", "Temporary authentication failure, try again later")  # RFC 4954 6


def unsupported_mail_parameter(key: str) -> Reply:
    return reply(555, "5.5.4", f"Error: unsupported MAIL parameter {key}")


# ------------------------------------------------------------- SMTPUTF8
SMTPUTF8_SYNTAX = syntax_error("SMTPUTF8 (a keyword, without a value)")
# RFC 6531 3.7.4.2 (and RFC 5248's 5.6.7): a UTF-8 address outside an SMTPUTF8 transaction.
UTF8_NEEDS_SMTPUTF8 = reply(553, "5.6.7", "Error: a UTF-8 address needs MAIL FROM:<...> SMTPUTF8")
ADDRESS_NOT_UTF8 = reply(553, "5.6.7", "Error: address is not valid UTF-8")

# ---------------------------------------------------- BDAT (RFC 3030)
DATA_AFTER_BDAT = reply(503, "5.5.1", "Error: DATA after BDAT in one transaction")
CHUNKS_UNDER_WAY = reply(503, "5.5.1", "Error: BDAT transfer in progress")
BINARYMIME_NEEDS_BDAT = reply(503, "5.5.1", "Error: BODY=BINARYMIME needs BDAT, not DATA")  # RFC 3030 3
CHUNK_AFTER_FAILURE = reply(503, "5.5.1", "Error: chunk discarded after a failed chunk; send RSET")


@lru_cache(maxsize=256)
def chunk_received(size: int) -> Reply:
    """250 to a BDAT chunk (not the last) taken into the message."""
    return reply(250, "2.0.0", f"Ok: {size} octets received")


def chunk_unframed(hostname: str) -> Reply:
    """A BDAT line without a chunk size: where its data ends is unknown."""
    return reply(421, "4.5.0", f"{hostname} Error: the end of the BDAT chunk is unknown; closing")


# ------------------------------------------------- the server's own shortages
INSUFFICIENT_STORAGE = reply(452, "4.3.1", "Error: insufficient system storage")
LOCAL_ERROR = reply(451, "4.3.0", "Error: local error in processing")
