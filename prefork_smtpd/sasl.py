"""SMTP AUTH (RFC 4954) with the PLAIN (RFC 4616) and LOGIN mechanisms, sans-IO.

Theory of operation
-------------------
One ``SaslExchange`` runs one ``AUTH`` command from its argument to a verdict.
The session hands it what follows ``AUTH `` on the command line (``start``),
then every continuation line the client sends (``feed``), each without its
CRLF. Each call returns one step:

- ``Challenge``: a ``334`` line to send; the next client line goes to ``feed``.
- ``CheckCredentials``: the client has said who it is. The exchange is over;
  the caller checks the password (slowly, off the event loop: see
  ``prefork_smtpd.users``) and answers ``AUTH_SUCCEEDED`` or ``AUTH_FAILED``.
- ``Failure``: the exchange is over; send ``reply`` and stay unauthenticated.

Nothing here touches sockets, clocks or the users file, so every byte a
client can send is covered by plain unit and property tests, and a password
check never blocks the event loop by accident.

What is refused, and how (RFC 4954 section 6 codes):
- a line longer than ``MAX_AUTH_LINE`` octets: ``500 5.5.6``;
- a response that is not strict base64: ``501 5.5.2``;
- ``*`` as a response: the client cancels, ``501 5.7.0``;
- credentials that are not UTF-8, hold a NUL or a control character in the
  user name, or leave the user name or password empty: ``501 5.5.2``;
- PLAIN with an authorization identity other than the user name (this server
  has no proxy users): ``535 5.7.8``;
- a mechanism not offered: ``504 5.5.4``.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

# RFC 4954 section 4: "the maximum line length of [the AUTH command and
# continuation lines] is 12288 octets", the CRLF included. The session must
# accept AUTH lines of this length although other commands stop at 512.
MAX_AUTH_LINE = 12288

MECHANISMS = ("PLAIN", "LOGIN")

AUTH_SUCCEEDED = b"235 2.7.0 Authentication successful\r\n"
AUTH_FAILED = b"535 5.7.8 Authentication credentials invalid\r\n"
# For the session: AUTH before TLS where the policy requires TLS, and AUTH
# twice (RFC 4954 section 4: "after a successful AUTH ... no more AUTH").
AUTH_NEEDS_TLS = b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
ALREADY_AUTHENTICATED = b"503 5.5.1 Error: already authenticated\r\n"
AUTH_NOT_IN_MAIL = b"503 5.5.1 Error: AUTH not allowed during a mail transaction\r\n"

LINE_TOO_LONG = b"500 5.5.6 Error: authentication line too long\r\n"
BAD_BASE64 = b"501 5.5.2 Error: invalid base64 data\r\n"
CANCELLED = b"501 5.7.0 Authentication cancelled\r\n"
MALFORMED = b"501 5.5.2 Error: malformed credentials\r\n"
AUTHZID_REFUSED = b"535 5.7.8 Error: authorization identity must be empty or equal the user name\r\n"
UNKNOWN_MECHANISM = b"504 5.5.4 Error: unrecognized authentication mechanism\r\n"
SYNTAX = b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"

# The LOGIN mechanism (draft-murchison-sasl-login) prompts with these texts,
# base64 of "Username:" and "Password:"; clients match them literally.
_USERNAME_PROMPT = b"334 VXNlcm5hbWU6\r\n"
_PASSWORD_PROMPT = b"334 UGFzc3dvcmQ6\r\n"
_EMPTY_CHALLENGE = b"334 \r\n"

# Control characters in a user name would let a client forge log lines.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MECHANISM_NAME = re.compile(rb"[A-Za-z0-9_-]{1,20}\Z")  # RFC 4422 section 3.1


@dataclass(frozen=True)
class Challenge:
    """Send ``reply`` (a 334 line) and feed the client's next line back."""

    reply: bytes


@dataclass(frozen=True)
class CheckCredentials:
    """The client claims to be ``username`` with ``password``: check it."""

    mechanism: str
    username: str
    password: str = ""

    def __repr__(self) -> str:  # never let a password reach a log or a traceback
        return f"CheckCredentials(mechanism={self.mechanism!r}, username={self.username!r}, password=<hidden>)"


@dataclass(frozen=True)
class Failure:
    """The exchange is over without authentication: send ``reply``."""

    reply: bytes


Step = Challenge | CheckCredentials | Failure


def ehlo_keyword(mechanisms: tuple[str, ...] = MECHANISMS) -> str:
    """The EHLO line that advertises AUTH (without the ``250-``)."""
    return "AUTH " + " ".join(mechanisms)


def encode_plain(username: str, password: str, authzid: str = "") -> bytes:
    """What a client sends for PLAIN: base64 of ``authzid NUL authcid NUL passwd``."""
    return base64.b64encode(f"{authzid}\0{username}\0{password}".encode())


class SaslExchange:
    """One AUTH command, from ``start`` to a final step. Not reusable."""

    def __init__(self, mechanisms: tuple[str, ...] = MECHANISMS) -> None:
        self.mechanisms = tuple(m.upper() for m in mechanisms)
        self.mechanism = ""
        self.done = False
        self._username: str | None = None  # LOGIN: the name, once given

    def start(self, argument: bytes) -> Step:
        """Begin with what followed ``AUTH `` on the command line."""
        if self.mechanism or self.done:
            raise RuntimeError("start() called twice")
        if len(argument) + len(b"AUTH \r\n") > MAX_AUTH_LINE:
            return self._finish(Failure(LINE_TOO_LONG))
        # Some clients end the line with a space; that is no initial response.
        parts = argument.rstrip(b" ").split(b" ")
        if len(parts) > 2 or not _MECHANISM_NAME.match(parts[0]):
            return self._finish(Failure(SYNTAX))
        mechanism = parts[0].decode("ascii").upper()
        if mechanism not in self.mechanisms or mechanism not in MECHANISMS:
            return self._finish(Failure(UNKNOWN_MECHANISM))
        self.mechanism = mechanism
        if len(parts) == 1:
            # No initial response: PLAIN asks with an empty challenge,
            # LOGIN with its user name prompt.
            return Challenge(_EMPTY_CHALLENGE if mechanism == "PLAIN" else _USERNAME_PROMPT)
        # RFC 4954: "=" is an initial response of zero length.
        initial = parts[1]
        if initial == b"*":
            return self._finish(Failure(CANCELLED))
        return self._respond(b"" if initial == b"=" else initial)

    def feed(self, line: bytes) -> Step:
        """Take the client's answer to the last challenge (CRLF stripped)."""
        if self.done or not self.mechanism:
            raise RuntimeError("feed() without a pending challenge")
        if len(line) + 2 > MAX_AUTH_LINE:
            return self._finish(Failure(LINE_TOO_LONG))
        if line == b"*":
            return self._finish(Failure(CANCELLED))
        return self._respond(line)

    # ------------------------------------------------------------ internals
    def _respond(self, encoded: bytes) -> Step:
        decoded = _b64decode(encoded)
        if decoded is None:
            return self._finish(Failure(BAD_BASE64))
        if self.mechanism == "PLAIN":
            return self._finish(_plain(decoded))
        return self._login(decoded)

    def _login(self, decoded: bytes) -> Step:
        text = _utf8(decoded)
        if self._username is None:
            if not text or _CONTROL.search(text):
                return self._finish(Failure(MALFORMED))
            self._username = text
            return Challenge(_PASSWORD_PROMPT)
        if not text or "\0" in text:
            return self._finish(Failure(MALFORMED))
        return self._finish(CheckCredentials("LOGIN", self._username, text))

    def _finish(self, step: Step) -> Step:
        self.done = True
        return step


def _plain(message: bytes) -> Step:
    """RFC 4616 section 2: ``[authzid] NUL authcid NUL passwd``."""
    fields = message.split(b"\0")
    if len(fields) != 3:
        return Failure(MALFORMED)
    authzid, authcid, passwd = (_utf8(f) for f in fields)
    if not authcid or not passwd or authzid is None or _CONTROL.search(authcid):
        return Failure(MALFORMED)
    # This server acts for no one but the user who logged in. Login names
    # are ASCII and matched without case (users.name_key), so "ALICE" acting
    # for "alice" is that user; no Unicode folding (K and KELVIN SIGN).
    if authzid and authzid != authcid and not (authzid.isascii() and authzid.lower() == authcid.lower()):
        return Failure(AUTHZID_REFUSED)
    return CheckCredentials("PLAIN", authcid, passwd)


def _b64decode(data: bytes) -> bytes | None:
    """Strict base64: no whitespace, no stray characters, right padding,
    nothing after the padding (RFC 4648 section 3.3 lets us refuse these)."""
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error:
        return None


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
