"""Delivery Status Notification parameters (RFC 3461), sans-IO.

MAIL may carry ``RET=FULL|HDRS`` (how much of the message a bounce returns)
and ``ENVID=<xtext>`` (the sender's own name for the transaction); RCPT may
carry ``NOTIFY=NEVER`` or ``NOTIFY=`` a list of SUCCESS, FAILURE, DELAY,
and ``ORCPT=<addr-type>;<xtext>`` (the recipient as first given). The
session hands each such parameter here and gets back either None (taken)
or the precise reply to refuse it with; the parsed values ride on the
envelope (``MailDSN``) and on each recipient (``RecipientDSN``) for the
store, which records them, and for relay, which passes them on.

xtext (RFC 3461 4): printable ASCII but ``+`` and ``=`` stand for
themselves; any other octet is ``+`` and two upper-case hex digits. The
decoded ENVID and ORCPT address must be printable ASCII (RFC 3461 4.2,
4.4): they end up in header fields, where a CR or LF would forge headers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .events import Reply
from .replies import reply, syntax_error

EHLO_KEYWORD = "DSN"
MAIL_PARAMETERS = frozenset({"RET", "ENVID"})
RCPT_PARAMETERS = frozenset({"NOTIFY", "ORCPT"})
NOTIFY_VALUES = ("SUCCESS", "FAILURE", "DELAY")
MAX_ENVID = 100  # characters of the decoded ENVID (RFC 3461 4.4)
MAX_ORCPT = 500  # characters of the ORCPT parameter value (RFC 3461 4.2)
RCPT_LINE_EXTENSION = 500  # NOTIFY and ORCPT may lengthen a RCPT line by this much (RFC 3461 4)

# xtext: "+" HEX HEX (upper case) or any of "!" to "~" but "+" and "=".
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+\Z")  # an RFC 5322 atom
_PRINTABLE = re.compile(r"[\x20-\x7e]*\Z")

RET_SYNTAX = syntax_error("RET=FULL|HDRS")
ENVID_SYNTAX = syntax_error(f"ENVID=<xtext of at most {MAX_ENVID} printable characters>")
NOTIFY_SYNTAX = syntax_error("NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY (any of them, once each)")
ORCPT_SYNTAX = syntax_error("ORCPT=<address type>;<xtext of a printable address>")


def duplicate(key: str) -> Reply:
    return reply(501, "5.5.4", f"Syntax: {key} given twice")


# ---------------------------------------------------------------- xtext
def xtext_decode(text: str) -> str | None:
    """The string an xtext stands for, or None if ``text`` is not xtext."""
    if not _XTEXT.match(text):
        return None
    return _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), text)


def xtext_encode(text: str) -> str:
    """``text`` (octets as latin-1 characters) as xtext."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in text)


# --------------------------------------------------------------- values
@dataclass
class MailDSN:
    """The DSN parameters of MAIL: None where the client gave none."""

    ret: str | None = None  # "FULL" or "HDRS"
    envid: str | None = None  # decoded

    def take(self, key: str, value: str | None) -> Reply | None:
        """One MAIL parameter (key in MAIL_PARAMETERS, upper case): None, or the reply refusing it."""
        if key == "RET":
            if self.ret is not None:
                return duplicate(key)
            if value is None or value.upper() not in ("FULL", "HDRS"):
                return RET_SYNTAX
            self.ret = value.upper()
            return None
        assert key == "ENVID"
        if self.envid is not None:
            return duplicate(key)
        decoded = xtext_decode(value) if value is not None else None
        if decoded is None or not decoded or len(decoded) > MAX_ENVID or not _PRINTABLE.match(decoded):
            return ENVID_SYNTAX
        self.envid = decoded
        return None

    @property
    def given(self) -> bool:
        return self.ret is not None or self.envid is not None


@dataclass
class RecipientDSN:
    """The DSN parameters of one RCPT."""

    notify: frozenset[str] | None = None  # None: not given; empty: NEVER
    orcpt: tuple[str, str] | None = None  # (address type, decoded address)

    def take(self, key: str, value: str | None) -> Reply | None:
        if key == "NOTIFY":
            if self.notify is not None:
                return duplicate(key)
            notify = parse_notify(value)
            if notify is None:
                return NOTIFY_SYNTAX
            self.notify = notify
            return None
        assert key == "ORCPT"
        if self.orcpt is not None:
            return duplicate(key)
        orcpt = parse_orcpt(value)
        if orcpt is None:
            return ORCPT_SYNTAX
        self.orcpt = orcpt
        return None

    def wants(self, what: str) -> bool:
        """Whether a DSN of type ``what`` (SUCCESS, FAILURE, DELAY) is asked for.

        Without NOTIFY, RFC 3461 4.1: FAILURE (and DELAY at the server's
        choice, which this server makes).
        """
        if self.notify is None:
            return what in ("FAILURE", "DELAY")
        return what in self.notify

    @property
    def notify_text(self) -> str | None:
        """NOTIFY as it is passed on to the next hop."""
        if self.notify is None:
            return None
        return ",".join(v for v in NOTIFY_VALUES if v in self.notify) or "NEVER"

    @property
    def orcpt_text(self) -> str | None:
        """ORCPT as it is passed on to the next hop (xtext again)."""
        if self.orcpt is None:
            return None
        return f"{self.orcpt[0]};{xtext_encode(self.orcpt[1])}"


def parse_notify(value: str | None) -> frozenset[str] | None:
    """NEVER -> empty set; a list of SUCCESS/FAILURE/DELAY, each once; else None."""
    if not value:
        return None
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return frozenset()
    if len(set(words)) != len(words) or not all(w in NOTIFY_VALUES for w in words):
        return None  # NEVER with others, an empty item, an unknown word or a repeat
    return frozenset(words)


def parse_orcpt(value: str | None) -> tuple[str, str] | None:
    """``rfc822;bob@example.org`` -> ("rfc822", "bob@example.org"), or None."""
    if not value or len(value) > MAX_ORCPT:
        return None
    addr_type, semicolon, xtext = value.partition(";")
    if not semicolon or not _ADDR_TYPE.match(addr_type):
        return None
    address = xtext_decode(xtext)
    if not address or not _PRINTABLE.match(address):
        return None
    return addr_type.lower(), address


def recorded_headers(mail: MailDSN | None, recipient: RecipientDSN | None) -> str:
    """The header lines the stored copy carries (LF line ends, as the store writes)."""
    lines = ""
    if mail is not None and mail.envid is not None:
        lines += f"Original-Envelope-Id: {mail.envid}\n"
    if recipient is not None and recipient.orcpt is not None:
        lines += f"Original-Recipient: {recipient.orcpt[0]};{recipient.orcpt[1]}\n"
    return lines
