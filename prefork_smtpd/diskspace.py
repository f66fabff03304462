"""Free space on the mail store's file system, and the reserve kept there.

Like Postfix's queue_minfree: mail is refused with ``452 4.3.1`` while
accepting it would leave less than ``min_free_space`` bytes free, so a
client cannot fill the disk that the log, the system and the mail already
accepted depend on. The store's own ENOSPC handling stays as the last line.

A worker checks twice: at MAIL (the reserve plus the ``SIZE=`` the client
announced) and at the end of DATA, before anything is written (the reserve
plus every copy of the message). Messages of this worker still being
written are claimed against the free space, since ``statvfs`` does not see
them yet. (Workers do not see each other's claims: at most one batch per
worker can overshoot together, which the reserve absorbs.)
"""

from __future__ import annotations

import os
from typing import Callable

from .session import Envelope

HEADROOM_PER_COPY = 4096  # trace headers and the last, partly used block of each file


def free_bytes(path: str) -> int | None:
    """Bytes an unprivileged writer may still use where ``path`` is (or would be).

    mail_dir may not exist yet (it is made on the first delivery): then its
    nearest existing parent tells. None if that cannot be found out.
    """
    while True:
        try:
            st = os.statvfs(path)
        except FileNotFoundError:
            parent = os.path.dirname(path)
            if parent == path:
                return None
            path = parent
        except OSError:
            return None
        else:
            return st.f_bavail * st.f_frsize


def bytes_to_store(envelope: Envelope) -> int:
    """What storing this message takes: one file per distinct folder."""
    copies = len({(r.folder, r.subfolder) for r in envelope.recipients})
    return copies * (envelope.size + HEADROOM_PER_COPY)


class SpaceGuard:
    """Keeps ``reserve()`` bytes free on the file system of ``path``.

    ``reserve`` is read at each check, so a live change applies at once;
    0 turns the checks off.
    """

    def __init__(self, path: str, reserve: Callable[[], int], free: Callable[[str], int | None] = free_bytes):
        self.path = os.path.abspath(path)
        self.reserve = reserve
        self.free = free
        self.claimed = 0  # bytes of this worker's messages being written

    def shortage(self, needed: int) -> str | None:
        """Why ``needed`` more bytes would eat into the reserve, or None."""
        reserve = self.reserve()
        if reserve <= 0:
            return None
        free = self.free(self.path)
        if free is None:
            return None  # cannot tell: the store's own ENOSPC handling decides
        if free - self.claimed - needed < reserve:
            return (
                f"insufficient free space: {free} bytes free, {self.claimed} being written,"
                f" {needed} needed, {reserve} kept in reserve"
            )
        return None

    def claim(self, needed: int) -> str | None:
        """Set ``needed`` bytes aside for a message, or say why not."""
        reason = self.shortage(needed)
        if reason is None:
            self.claimed += needed
        return reason

    def release(self, claimed: int) -> None:
        """The message is written (or failed): its bytes are statvfs's to see now."""
        self.claimed -= claimed
