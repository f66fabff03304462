"""The server's answers to the session's policy questions (``session.Policy``).

Where a recipient's mail goes (``--folders``, ``--recipient-delimiter``),
which mailboxes exist (``--mailboxes``), which address literals name this
server, and whether there is room for a mail (``--min-free-space``). The
session stays sans-IO: it parses, asks, and this module answers, looking
at the file system or the network interfaces where it must.

Folder names (``MailboxNames``), relative to mail_dir:

* ``--folders local`` (the default): ``<local part>``, the domain ignored
  (``bob@a.example`` and ``bob@b.example`` share ``bob``);
* ``--folders address``: ``<domain>/<local part>``, Dovecot's ``%d/%n``.
  A bare local part and an address literal of ours name this host: their
  domain is the first ``--domain`` that is not ``*``, else ``--hostname``.

Each part is lowercased; a local part is a dot-atom of ASCII atext (no
"/", no leading or doubled dot, no control character, at most 64
octets), a domain a dot-separated list of letters, digits and hyphens (at
most 255 octets), so no name leaves mail_dir, starts with a dot (the spool
``.tmp``, Maildir++ subfolders) or is ``..``; "/" separates the two parts
and appears in neither, so two different mailboxes never share a folder.

With ``--recipient-delimiter +``, ``bob+invoices`` is bob's: its folder is
bob's, and its Maildir++ subfolder ``.invoices`` (the detail, lowercased;
a detail that is no dot-atom is dropped) is used by the store when it
exists or ``--plus-folders`` asks for it.

``--mailboxes``:

* ``auto``: every valid local part gets a folder on its first mail (a
  catch-all; the default, right for catching an application's mail);
* ``existing``: only folders already in mail_dir (real directories, not
  symbolic links), looked up at each RCPT (a cached dentry lookup);
* a file: one mailbox per line (``#`` starts a comment line), read at
  start and again on reload, mapped to folders as recipients are: a local
  part under ``--folders local``, ``local@domain`` (or a bare local part,
  for the host's own domain) under ``--folders address``.

``postmaster`` is always accepted, whatever ``--mailboxes`` says (the
session asks no mailbox question for it, RFC 5321 4.5.1).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import socket
import stat
from typing import Callable, Iterable

from .diskspace import SpaceGuard
from .events import Reply
from .replies import INSUFFICIENT_STORAGE, UNKNOWN_MAILBOX
from .session import CATCH_ALL, MAX_DOMAIN, Mailbox, Policy, folder_for
from .smtputf8 import served_form
from .textfile import read_regular_file

MODES = ("auto", "existing")  # anything else names a file
LAYOUTS = ("local", "address")  # --folders
# The characters --recipient-delimiter may name: atext but the dot (which
# separates a dot-atom's parts) and "/" (none in atext anyway).
DELIMITER_CHARS = frozenset("!#$%&'*+-=?^_`{|}~")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN_FOLDER = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def domain_folder(domain: str) -> str | None:
    """A domain's folder under ``--folders address``: lowercased; None if no plain domain."""
    name = domain.lower()
    if len(name) > MAX_DOMAIN or not name.isascii() or not _DOMAIN_FOLDER.match(name):
        return None
    return name


# Folders Dovecot would not show: INBOX is its own (in any case, and a
# folder under it, ".inbox.x", is listed but cannot be opened), and a name
# part beginning with "~" is refused as a home directory.
_NOT_A_DOVECOT_FOLDER = re.compile(r"\Ainbox(?:\.|\Z)|(?:\A|\.)~")


def subfolder_for(detail: str) -> str:
    """The Maildir++ subfolder of a plus-address detail, or "" if it makes none.

    ``invoices`` -> ``.invoices``; dots inside stay (Maildir++'s hierarchy:
    ``lists.python`` is the folder python under lists). A detail that is
    not a dot-atom (empty, a leading dot) makes none: the mail goes to the
    mailbox itself, as does one Dovecot would not show (``inbox``, in any
    case, or under it; a part beginning with "~"). The name on disk is in
    modified UTF-7, as Dovecot reads Maildir++ folder names: ``a&b`` is
    ``.a&-b``, ``märz`` is ``.m&AOQ-rz``.
    """
    name = folder_for(detail)
    if name is None or _NOT_A_DOVECOT_FOLDER.search(name):
        return ""
    return "." + modified_utf7(name)


def modified_utf7(name: str) -> str:
    """IMAP's modified UTF-7 (RFC 3501 5.1.3): printable ASCII stands for
    itself but "&", which is "&-"; any other run of characters is "&", its
    UTF-16 in base64 with "," for "/" and no padding, then "-"."""
    if name.isascii() and name.isprintable() and "&" not in name:
        return name  # the common case: no work
    out: list[str] = []
    run: list[str] = []  # characters waiting to be encoded

    def flush() -> None:
        if run:
            octets = "".join(run).encode("utf-16-be")
            out.append("&" + base64.b64encode(octets).decode("ascii").rstrip("=").replace("/", ",") + "-")
            run.clear()

    for char in name:
        if " " <= char <= "~":
            flush()
            out.append("&-" if char == "&" else char)
        else:
            run.append(char)
    flush()
    return "".join(out)


class MailboxNames:
    """Recipient -> folder (and Maildir++ subfolder): see the module's docstring."""

    def __init__(self, layout: str = "local", home_domain: str = "", delimiters: str = "") -> None:
        assert layout in LAYOUTS, layout
        self.by_address = layout == "address"
        self.home_domain = home_domain  # for bare local parts and our address literals
        self.delimiters = delimiters

    def split_detail(self, local_part: str) -> tuple[str, str]:
        """``bob+invoices`` -> (``bob``, ``invoices``) at the first delimiter;
        no split when the delimiter is the first character (``+bob`` is a name)."""
        delimiters = self.delimiters
        if delimiters:
            for i, char in enumerate(local_part):
                if char in delimiters:
                    if i > 0:
                        return local_part[:i], local_part[i + 1 :]
                    break
        return local_part, ""

    def folder(self, local_part: str, domain: str) -> str | None:
        """The mailbox's folder (no delimiter handling), or None if unsafe."""
        name = folder_for(local_part)
        if name is None or not self.by_address:
            return name
        home = domain_folder(domain or self.home_domain)
        return None if home is None else f"{home}/{name}"

    def mailbox(self, local_part: str, domain: str) -> Mailbox | None:
        detail = ""
        if self.delimiters:  # else no split: the common case costs no call
            local_part, detail = self.split_detail(local_part)
        # --folders local needs no domain: folder_for straight away (one call less at each RCPT).
        folder = self.folder(local_part, domain) if self.by_address else folder_for(local_part)
        if folder is None:
            return None
        return folder, subfolder_for(detail) if detail else ""


def names_from(settings) -> MailboxNames:
    """The folder naming the settings ask for."""
    home = next((d for d in settings.domains if d != CATCH_ALL), settings.hostname.lower())
    return MailboxNames(settings.folders, home, settings.recipient_delimiter or "")


def settings_problem(settings) -> str | None:
    """What is wrong with --folders, --recipient-delimiter and --domain, or None."""
    if settings.folders not in LAYOUTS:
        return f"--folders must be local or address, not {settings.folders!r}"
    delimiters = settings.recipient_delimiter
    if delimiters is not None and (not delimiters or not set(delimiters) <= DELIMITER_CHARS):
        return f"--recipient-delimiter takes characters out of {''.join(sorted(DELIMITER_CHARS))}, not {delimiters!r}"
    for domain in settings.domains:
        if not domain.isascii():  # Settings turned every U-label domain IDNA 2008 takes into its A-labels
            return f"--domain {domain!r} is not a domain name in IDNA 2008 U-labels"
        if not domain or domain.startswith(".") or ".." in domain:
            return f"--domain {domain!r} is not a domain name"
    if settings.folders == "address":
        # Each domain becomes a folder name: it must be a plain domain name.
        for domain in settings.domains:
            if domain != CATCH_ALL and domain_folder(domain) is None:
                return f"--folders address: --domain {domain!r} is not a domain name (letters, digits, hyphens, dots)"
        if domain_folder(names_from(settings).home_domain) is None:
            return "--folders address needs a --domain other than * or a --hostname that is a domain name" \
                " (the folder of bare local parts, postmaster and address literals)"
    return None


def own_addresses(bound: Iterable[str]) -> frozenset[IPAddress]:
    """The addresses this server answers on, from its listening sockets' addresses.

    A wildcard listener ("::", "0.0.0.0") answers on every address of the
    host's interfaces (psutil); IPv6 zone ids ("fe80::1%eth0") are dropped.
    """
    found: set[IPAddress] = set()
    wildcard = False
    for text in bound:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if address.is_unspecified:
            wildcard = True
        else:
            found.add(_plain(address))
    if wildcard:
        import psutil

        for entries in psutil.net_if_addrs().values():
            for entry in entries:
                if entry.family in (socket.AF_INET, socket.AF_INET6):
                    found.add(_plain(ipaddress.ip_address(entry.address.split("%", 1)[0])))
    return frozenset(found)


def listen_addresses(listen: str | None) -> frozenset[IPAddress] | None:
    """The addresses ``-l`` binds (a name may give several); None for the default,
    one dual-stack socket on every address. Raises OSError for a name that
    does not resolve."""
    if listen is None:
        return None
    found = socket.getaddrinfo(listen, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return frozenset(_plain(ipaddress.ip_address(str(entry[4][0]).split("%", 1)[0])) for entry in found)


def reaches_this_server(
    address: IPAddress, bound: frozenset[IPAddress] | None, interfaces: frozenset[IPAddress]
) -> bool:
    """Whether a connection to ``address`` (on our port) comes to our own listener.

    ``bound``: listen_addresses(); ``interfaces``: this host's addresses.
    Besides those, every loopback address (all of 127.0.0.0/8) and the
    unspecified ones (0.0.0.0, ::, which the kernel takes as this host)
    reach a listener on every address. An explicit ``::`` is IPv6 only
    (listeners.py binds it V6ONLY), ``0.0.0.0`` IPv4 only.
    """
    address = _plain(address)
    this_host = address.is_loopback or address.is_unspecified or address in interfaces
    if bound is None:
        return this_host
    for listener in bound:
        if listener.version != address.version:
            continue
        if listener.is_unspecified:
            if this_host:
                return True
        elif address == listener or (address.is_unspecified and listener.is_loopback):
            return True
    return False


def bound_addresses(listeners) -> list[str]:
    """The addresses the listeners' sockets are bound to ("::" for every address)."""
    return [sock.getsockname()[0] for listener in listeners for sock in listener.sockets if sock.fileno() >= 0]


def _plain(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as its IPv4 address (the session compares those)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class MailboxListError(ValueError):
    pass


def load_mailbox_list(path: str, names: MailboxNames | None = None) -> frozenset[str]:
    """The folders a ``--mailboxes FILE`` names; MailboxListError if unusable."""
    names = names or MailboxNames()
    try:
        lines = read_regular_file(path).decode("utf-8").splitlines()
    except OSError as exc:
        raise MailboxListError(f"mailboxes file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise MailboxListError(f"mailboxes file {path}: not UTF-8 text ({exc.reason})") from None
    folders = set()
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        local, _, domain = name.rpartition("@") if "@" in name else (name, "", "")
        folder = names.folder(local, served_form(domain) or domain)  # a U-label domain: its A-labels, as RCPT has it
        if folder is None:
            what = "address" if names.by_address else "local part"
            raise MailboxListError(f"mailboxes file {path}:{number}: not a valid {what}: {name!r}")
        folders.add(folder)
    return frozenset(folders)


def existing_folder(root: str) -> Callable[[str], bool]:
    """Whether ``root/<folder>`` is a directory already, with no symlink on the way."""

    def exists(folder: str) -> bool:
        path = root
        try:
            for part in folder.split("/"):  # "a.example/bob": each part a real directory
                path = os.path.join(path, part)
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    return False
        except OSError:
            return False
        return True

    return exists


def mailbox_check(
    mode: str, mail_dir: str, listed: frozenset[str] | None, names: MailboxNames | None = None
) -> Callable[[str], bool] | None:
    """The test a recipient folder must pass under ``--mailboxes mode``; None for all."""
    if mode == "auto":
        return None
    if mode == "existing":
        return existing_folder(os.path.abspath(mail_dir))
    if listed is None:
        listed = load_mailbox_list(mode, names)
    return listed.__contains__


class ServerPolicy(Policy):
    def __init__(
        self, mailbox_exists: Callable[[str], bool] | None, space: SpaceGuard,
        names: MailboxNames | None = None, addresses: Callable[[], frozenset[IPAddress]] = frozenset,
    ) -> None:
        self.mailbox_exists = mailbox_exists
        self.space = space
        self.names = names or MailboxNames()
        self._addresses = addresses  # looked up at the first address literal, then kept
        self._own: frozenset[IPAddress] | None = None

    def mailbox(self, local_part: str, domain: str) -> Mailbox | None:
        # A method, not the names' bound method set on the instance (one
        # call less per RCPT): a compiled class takes no attribute of that name.
        return self.names.mailbox(local_part, domain)

    def owns_address(self, address: IPAddress) -> bool:
        if self._own is None:
            self._own = self._addresses()
        return address in self._own

    def mail_refusal(self, size: int) -> Reply | None:
        return INSUFFICIENT_STORAGE if self.space.shortage(size) is not None else None

    def recipient_refusal(self, folder: str) -> Reply | None:
        if self.mailbox_exists is not None and not self.mailbox_exists(folder):
            return UNKNOWN_MAILBOX
        return None
