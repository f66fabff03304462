"""The server's answers to the session's policy questions (``session.Policy``).

Which mailboxes exist (``--mailboxes``) and whether there is room for a
mail (``--min-free-space``). The session stays sans-IO: it asks, this
module looks at the file system.

``--mailboxes``:

* ``auto``: every valid local part gets a folder on its first mail (a
  catch-all; the default, right for catching an application's mail);
* ``existing``: only folders already in mail_dir (real directories, not
  symbolic links), looked up at each RCPT (a cached dentry lookup);
* a file: one local part per line (``#`` starts a comment line), read at
  start and again on reload, lowercased like folder names.
"""

from __future__ import annotations

import os
import stat
from typing import Callable

from .diskspace import SpaceGuard
from .events import Reply
from .replies import INSUFFICIENT_STORAGE, UNKNOWN_MAILBOX
from .session import Policy, folder_for

MODES = ("auto", "existing")  # anything else names a file


class MailboxListError(ValueError):
    pass


def load_mailbox_list(path: str) -> frozenset[str]:
    """The folders a ``--mailboxes FILE`` names; MailboxListError if unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise MailboxListError(f"mailboxes file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise MailboxListError(f"mailboxes file {path}: not UTF-8 text ({exc.reason})") from None
    folders = set()
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        folder = folder_for(name)
        if folder is None:
            raise MailboxListError(f"mailboxes file {path}:{number}: not a valid local part: {name!r}")
        folders.add(folder)
    return frozenset(folders)


def existing_folder(root: str) -> Callable[[str], bool]:
    """Whether ``root/<folder>`` is a directory already (a symlink is not)."""

    def exists(folder: str) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(os.path.join(root, folder)).st_mode)
        except OSError:
            return False

    return exists


def mailbox_check(mode: str, mail_dir: str, listed: frozenset[str] | None) -> Callable[[str], bool] | None:
    """The test a recipient folder must pass under ``--mailboxes mode``; None for all."""
    if mode == "auto":
        return None
    if mode == "existing":
        return existing_folder(os.path.abspath(mail_dir))
    if listed is None:
        listed = load_mailbox_list(mode)
    return listed.__contains__


class ServerPolicy(Policy):
    def __init__(self, mailbox_exists: Callable[[str], bool] | None, space: SpaceGuard) -> None:
        self.mailbox_exists = mailbox_exists
        self.space = space

    def mail_refusal(self, size: int) -> Reply | None:
        return INSUFFICIENT_STORAGE if self.space.shortage(size) is not None else None

    def recipient_refusal(self, folder: str) -> Reply | None:
        if self.mailbox_exists is not None and not self.mailbox_exists(folder):
            return UNKNOWN_MAILBOX
        return None
