"""Delivery status notifications as RFC 3464 messages (multipart/report).

One job: given what happened to each recipient of a message, build the
notice to its sender. No I/O; the caller stores or queues the result as a
message from the null sender ``<>`` (RFC 3461 6.1: a DSN never triggers
another), so a notice can never bounce back and forth.

The message has three parts (RFC 3462, RFC 3464 2):

1. ``text/plain``: what happened, for a person;
2. ``message/delivery-status``: the per-message fields (Reporting-MTA,
   Original-Envelope-Id, Arrival-Date), then a block per recipient
   (Original-Recipient, Final-Recipient, Action, Status, Remote-MTA,
   Diagnostic-Code, Last-Attempt-Date, Will-Retry-Until);
3. the original message: ``message/rfc822`` whole with ``RET=FULL`` on a
   failure or delay notice, else its header only as ``text/rfc822-headers``
   (``RET=HDRS``, no RET: this server's choice, and always for a success
   notice, RFC 3461 4.3).

The notice of an SMTPUTF8 mail (``utf8``) is itself one, as RFC 6533
has it: its header and text in UTF-8, ``message/global-delivery-status``
with a UTF-8 address as ``utf-8;`` (unitext), and the original as
``message/global`` or ``message/global-headers``. Any other notice is
ASCII: nothing in it can be other than ASCII.

Lines end with CRLF, as the session hands messages to the store.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime, formatdate, make_msgid

from .downgrade import crlf_lines

DELIVERED = "delivered"
FAILED = "failed"
DELAYED = "delayed"
RELAYED = "relayed"  # passed to a next hop that does not offer DSN (RFC 3464 2.3.3)
ACTIONS = (DELIVERED, FAILED, DELAYED, RELAYED)
# Characters of a remote reply quoted in a notice: its line (with an
# address of at most 320 octets) stays within 998 octets.
DIAGNOSTIC_MAX = 500

SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    DELIVERED: "Successful Mail Delivery Report",
    RELAYED: "Mail Relayed to a Server Without Delivery Reports",
}
EXPLANATIONS = {
    FAILED: "could not be delivered to the recipients below. This is a permanent error;\r\nthe server gave up.",
    DELAYED: "has not yet been delivered to the recipients below. The server keeps\r\ntrying; no action is needed.",
    DELIVERED: "was delivered to the recipients below.",
    RELAYED: "was passed on to a server that sends no delivery reports; no further\r\nnotice will come for the recipients below.",
}


@dataclass(frozen=True)
class RecipientStatus:
    """What happened to one recipient."""

    final_recipient: str  # the address as this server delivered or tried it
    action: str  # one of ACTIONS
    status: str  # an RFC 3463 code: 2.0.0, 4.4.1, 5.1.1 ...
    original_recipient: tuple[str, str] | None = None  # ORCPT (type, address)
    remote_mta: str | None = None  # the next hop's name, when one answered
    diagnostic: str | None = None  # the next hop's reply, as it came ("550 5.1.1 no such user")
    last_attempt: float | None = None  # a Unix time
    will_retry_until: float | None = None  # for "delayed": when the server gives up


def build_report(
    *,
    reporting_mta: str,
    recipient: str,
    statuses: list[RecipientStatus],
    original: bytes,
    ret: str | None = None,
    envid: str | None = None,
    arrival: float | None = None,
    queue_id: str = "",
    now: float | None = None,
    utf8: bool = False,
) -> bytes:
    """The notice to ``recipient`` (the original sender), CRLF lines.

    ``original`` is the message as received (CRLF lines); the action of the
    notice's subject is that of the first status (a caller builds one notice
    per kind of action). ``utf8``: the original was an SMTPUTF8 mail.
    """
    if not statuses:
        raise ValueError("a report needs at least one recipient")
    unknown = [s.action for s in statuses if s.action not in ACTIONS]
    if unknown:
        raise ValueError(f"unknown action {unknown[0]!r}")
    now = time.time() if now is None else now
    action = statuses[0].action
    boundary = f"{queue_id or 'report'}/{secrets.token_hex(8)}.{reporting_mta}"
    whole = ret == "FULL" and action in (FAILED, DELAYED)
    header, _ = _split_header(original)
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{recipient}>",
        f"Subject: {SUBJECTS[action]}",
        f"Date: {formatdate(now, localtime=True)}",
        f"Message-ID: {make_msgid(domain=reporting_mta)}",
        "Auto-Submitted: auto-replied",  # RFC 3834: no vacation reply to this
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        f"Content-Type: text/plain; charset={'utf-8' if utf8 else 'us-ascii'}",
        "",
        f"This is the mail system at host {reporting_mta}.",
        "",
        f"Your message{f' {queue_id}' if queue_id else ''} {EXPLANATIONS[action]}",
        "",
    ]
    for status in statuses:
        reply = f": {_one_line(status.diagnostic)}" if status.diagnostic else ""
        lines.append(f"<{status.final_recipient}>: {status.action} ({status.status}){reply}")
    kind = "global-delivery-status" if utf8 else "delivery-status"
    lines += ["", f"--{boundary}", f"Content-Type: message/{kind}", ""]
    lines += _per_message_fields(reporting_mta, envid, arrival, queue_id)
    for status in statuses:
        lines.append("")
        lines += _per_recipient_fields(status)
    lines += ["", f"--{boundary}"]
    if whole:
        kind = "message/global" if utf8 else "message/rfc822"
        lines += [f"Content-Type: {kind}", f"Content-Transfer-Encoding: {transfer_encoding(original)}", ""]
        tail = original if original.endswith(b"\r\n") or not original else original + b"\r\n"
    else:
        kind = "message/global-headers" if utf8 else "text/rfc822-headers"
        lines += [f"Content-Type: {kind}", f"Content-Transfer-Encoding: {transfer_encoding(header)}", ""]
        tail = header
    head = ("\r\n".join(lines) + "\r\n").encode("utf-8" if utf8 else "ascii", "replace")
    return head + tail + f"\r\n--{boundary}--\r\n".encode("ascii")


def _per_message_fields(reporting_mta: str, envid: str | None, arrival: float | None, queue_id: str) -> list[str]:
    fields = [f"Reporting-MTA: dns; {reporting_mta}"]
    if queue_id:
        fields.append(f"X-Queue-ID: {queue_id}")
    if envid is not None:
        fields.append(f"Original-Envelope-Id: {envid}")
    if arrival is not None:
        fields.append(f"Arrival-Date: {_date(arrival)}")
    return fields


def _per_recipient_fields(status: RecipientStatus) -> list[str]:
    if status.action not in ACTIONS:
        raise ValueError(f"unknown action {status.action!r}")
    fields = []
    if status.original_recipient is not None:
        fields.append(f"Original-Recipient: {status.original_recipient[0]};{status.original_recipient[1]}")
    fields += [
        f"Final-Recipient: {_address_type(status.final_recipient)}; {status.final_recipient}",
        f"Action: {status.action}",
        f"Status: {status.status}",
    ]
    if status.remote_mta:
        fields.append(f"Remote-MTA: dns; {status.remote_mta}")
    if status.diagnostic:
        fields.append(f"Diagnostic-Code: smtp; {_one_line(status.diagnostic)}")
    if status.last_attempt is not None:
        fields.append(f"Last-Attempt-Date: {_date(status.last_attempt)}")
    if status.will_retry_until is not None:
        fields.append(f"Will-Retry-Until: {_date(status.will_retry_until)}")
    return fields


def _address_type(address: str) -> str:
    """RFC 6533 3: a UTF-8 address is of type utf-8 (only an SMTPUTF8 mail has one)."""
    return "rfc822" if address.isascii() else "utf-8"


def _split_header(message: bytes) -> tuple[bytes, bytes]:
    """The header block (its lines, CRLF-ended) and the body.

    The header ends at the first empty line, CRLF or a bare LF: a
    BINARYMIME message is kept as received, and one whose header ends in
    LF LF would otherwise be quoted whole where only its header is asked
    for (RET=HDRS, success notices), its body with it.
    """
    if message.startswith(b"\r\n"):
        return b"", message[2:]
    if message.startswith(b"\n"):
        return b"", message[1:]
    found = _EMPTY_LINE.search(message)
    if found is None:
        header = crlf_lines(message)
        return (header if header.endswith(b"\r\n") or not header else header + b"\r\n"), b""
    return crlf_lines(message[: found.start() + 1]), message[found.end():]


_EMPTY_LINE = re.compile(rb"\n\r?\n")  # a line break, then an empty line
_LONG_LINE = re.compile(rb"[^\r\n]{999}")


def transfer_encoding(data: bytes) -> str:
    """The encoding RFC 2045 2.7-2.9 gives ``data`` as it is: ``7bit`` and
    ``8bit`` are lines (CRLF only, at most 998 octets, no NUL); anything
    else (a BINARYMIME message's bare CR or LF, a NUL) is ``binary``."""
    crlf = data.count(b"\r\n")
    if b"\0" in data or data.count(b"\r") != crlf or data.count(b"\n") != crlf or _LONG_LINE.search(data):
        return "binary"
    return "7bit" if data.isascii() else "8bit"


def _one_line(text: str) -> str:
    """A remote reply folded onto one printable line: it is quoted in a header field.

    Cut at DIAGNOSTIC_MAX characters: a reply may be 64 KiB, and no line
    of a message may be over 998 octets (RFC 5322 2.1.1).
    """
    line = " ".join("".join(c if " " <= c <= "~" else " " for c in text).split())
    return line if len(line) <= DIAGNOSTIC_MAX else line[: DIAGNOSTIC_MAX - 3] + "..."


def _date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, timezone.utc))
