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

from .report import DELIVERED, RecipientStatus, build_report
from .session import Envelope, Recipient, folder_for

NOTICE_HELO = "localhost"  # the notice's Received header names the server itself


def local_sender_folder(
    sender: str, domains: frozenset[str], mailbox_refusal: Callable[[str], object | None]
) -> str | None:
    """The folder of a sender who is a mailbox here, or None (the null sender, elsewhere, no such box)."""
    local, at, domain = sender.rpartition("@")
    if not at or domain.lower() not in domains:
        return None
    folder = folder_for(local)
    if folder is None or mailbox_refusal(folder) is not None:
        return None
    return folder


def success_notice(
    envelope: Envelope,
    queue_id: str,
    hostname: str,
    domains: frozenset[str],
    mailbox_refusal: Callable[[str], object | None],
    now: float | None = None,
) -> Envelope | None:
    """The "delivered" DSN for the recipients that asked for one, or None."""
    # Outside recipients are not delivered yet: the queue runner reports on them.
    asking = [r for r in envelope.recipients if not r.outside and r.dsn is not None and r.dsn.wants("SUCCESS")]
    if not asking or not envelope.sender:
        return None  # RFC 3461 6.1: nothing ever goes to the null sender
    folder = local_sender_folder(envelope.sender, domains, mailbox_refusal)
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
    )
    return Envelope(
        helo=NOTICE_HELO, sender="", recipients=[Recipient(address=envelope.sender, folder=folder)],
        chunks=[content], size=len(content),
    )
