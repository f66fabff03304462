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

``statvfs`` is asked at most every FREE_SPACE_TTL seconds (two calls per
mail were a measurable part of the CPU per mail): in between, the bytes this
worker wrote since the last look still count as claimed, so its own mail is
never missed; what other processes wrote in that tenth of a second is what
the reserve absorbs, as it does for the other workers' batches. A refusal
is only ever given on a fresh figure.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from .session import Envelope

HEADROOM_PER_COPY = 4096  # trace headers and the last, partly used block of each file
FREE_SPACE_TTL = 0.1  # seconds a statvfs figure is trusted (see the module's docstring)


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

    def __init__(
        self, path: str, reserve: Callable[[], int], free: Callable[[str], int | None] = free_bytes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = os.path.abspath(path)
        self.reserve = reserve
        self.free = free
        self.clock = clock
        self.claimed = 0  # bytes of this worker's messages being written
        self.unseen = 0  # bytes written since the last statvfs, which it did not see
        self._free: int | None = None
        self._measured = -FREE_SPACE_TTL  # clock() of the last statvfs

    def _measure(self) -> int | None:
        self._free = self.free(self.path)
        self._measured = self.clock()
        self.unseen = 0
        return self._free

    def shortage(self, needed: int) -> str | None:
        """Why ``needed`` more bytes would eat into the reserve, or None."""
        reserve = self.reserve()
        if reserve <= 0:
            return None
        if self.clock() - self._measured < FREE_SPACE_TTL:
            free = self._free
            if free is None or free - self.unseen - self.claimed - needed >= reserve:
                return None
        # Too old, or short: a refusal is given on a fresh figure only.
        free = self._measure()
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
        """The message is written (or failed): its bytes are the next statvfs's to see."""
        self.claimed -= claimed
        self.unseen += claimed
