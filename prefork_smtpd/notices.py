"""The notices a local delivery owes its sender, as envelopes to store.

A recipient that asked for ``NOTIFY=SUCCESS`` gets a "delivered" DSN
(report.py) once its copy is on disk, when the sender is a mailbox of this
server: the notice is then stored like any mail, into the sender's folder,
from the null sender. A sender elsewhere (none today: MAIL refuses senders
outside the served domains) would need relay to carry the notice.
"""

from __future__ import annotations

import time
from typing import Callable

from .policy import MailboxNames
from .report import DELIVERED, RecipientStatus, build_report
from .session import CATCH_ALL, Envelope, Recipient
from .smtputf8 import served_form

NOTICE_HELO = "localhost"  # the notice's Received header names the server itself


def is_local_sender(sender: str, domains: frozenset[str]) -> bool:
    """Whether mail to the sender would stay here: a served domain, any under
    the catch-all, or an address literal (MAIL takes only ours)."""
    local, at, domain = sender.rpartition("@")
    return bool(at) and (served_form(domain) in domains or CATCH_ALL in domains or domain[:1] == "[")


def local_sender_folder(
    sender: str, domains: frozenset[str], mailbox_refusal: Callable[[str], object | None],
    names: MailboxNames | None = None,
) -> str | None:
    """The folder of a sender who is a mailbox here, or None (the null sender, elsewhere, no such box).

    The folder mail to the sender gets (``names``: --folders, the recipient
    delimiter), so a notice lands where the sender's mail does.
    """
    if not is_local_sender(sender, domains):
        return None
    local, _, domain = sender.rpartition("@")
    names = names or MailboxNames()
    mailbox = names.mailbox(local, "" if domain[:1] == "[" else served_form(domain))  # a literal of ours names this host
    if mailbox is None or mailbox_refusal(mailbox[0]) is not None:
        return None
    return mailbox[0]


def success_notice(
    envelope: Envelope,
    queue_id: str,
    hostname: str,
    domains: frozenset[str],
    mailbox_refusal: Callable[[str], object | None],
    now: float | None = None,
    names: MailboxNames | None = None,
) -> Envelope | None:
    """The "delivered" DSN for the recipients that asked for one, or None."""
    # Outside recipients are not delivered yet: the queue runner reports on them.
    asking = [r for r in envelope.recipients if not r.outside and r.dsn is not None and r.dsn.wants("SUCCESS")]
    if not asking or not envelope.sender:
        return None  # RFC 3461 6.1: nothing ever goes to the null sender
    folder = local_sender_folder(envelope.sender, domains, mailbox_refusal, names)
    if folder is None:
        return None
    now = time.time() if now is None else now
    statuses = [
        RecipientStatus(
            final_recipient=r.address, action=DELIVERED, status="2.0.0",
            original_recipient=r.dsn.orcpt if r.dsn is not None else None, last_attempt=now,
        )
        for r in asking
    ]
    mail_dsn = envelope.dsn
    content = build_report(
        reporting_mta=hostname, recipient=envelope.sender, statuses=statuses, original=envelope.content,
        ret=None, envid=mail_dsn.envid if mail_dsn is not None else None, arrival=now, queue_id=queue_id, now=now,
        utf8=envelope.smtputf8,
    )
    notice = Envelope(
        helo=NOTICE_HELO, sender="", recipients=[Recipient(address=envelope.sender, folder=folder)],
        chunks=[content], size=len(content),
    )
    notice.smtputf8 = envelope.smtputf8  # RFC 6533: the notice of an SMTPUTF8 mail is one too
    return notice
