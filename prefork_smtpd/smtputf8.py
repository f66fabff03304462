"""SMTPUTF8 (RFC 6531, 6532): UTF-8 addresses, and the folders they map to.

The session reads command lines as latin-1 (one character per octet), so a
path holding octets above 0x7F is the client's UTF-8, still encoded. It is
allowed only in a transaction whose MAIL carried ``SMTPUTF8``
(``553 5.6.7`` otherwise, RFC 6531 3.7.4.2), and must be valid UTF-8.

A UTF-8 local part maps to its folder in one way (``folder_for``):

1. it must be a dot-atom of RFC 5322 atext and non-ASCII characters
   (RFC 6532 3.2), at most 64 octets of UTF-8 in its composed form (NFC;
   RFC 5321 4.5.3.1.1 counts octets, RFC 6531 3.3); characters that are controls, format characters
   (bidirectional overrides...) other than ZWNJ/ZWJ, surrogates, private
   use, unassigned, or spaces or separators of any kind are refused;
2. its folder is its canonical caseless form (Unicode D145): NFD,
   case folding, then NFC, so ``Ünïcödé`` typed on any system, composed
   or decomposed, lands in one folder ``ünïcödé``;
3. the folder is checked again: the same dot-atom (so no ``/``, no leading
   dot, no ``..``, no control character), at most 255 octets (a file
   name's limit; folding can lengthen a name), and stable (mapping it again
   gives itself), else the address is refused.

An ASCII local part never comes here: its folder stays its lowercase form
(session.folder_for), which is what step 2 gives for ASCII as well.
"""

from __future__ import annotations

import re
import unicodedata

import idna

MAX_LOCAL_PART = 64  # octets, RFC 5321 4.5.3.1.1
MAX_FOLDER = 255  # octets: a file name (NAME_MAX)
MAX_DOMAIN = 255  # octets, RFC 5321 4.5.3.1.2

# RFC 5322 atext without "/" (as session._ATEXT), plus any non-ASCII
# character (RFC 6532 3.2's UTF8-non-ascii); which of those are allowed is
# decided by category below.
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-=?^_`{|}~\u0080-\U0010ffff]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ASCII_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
# Unicode general categories never allowed in a local part: controls (Cc),
# format characters (Cf: bidirectional overrides that disguise a name),
# surrogates (Cs), private use (Co), unassigned (Cn), spaces and
# separators (Zs, Zl, Zp).
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})
# ZERO WIDTH NON-JOINER and JOINER: format characters that some scripts
# (Persian, Indic, emoji sequences) need in words (RFC 5892 CONTEXTJ).
_JOINERS = frozenset({"\u200c", "\u200d"})


def decode_path(raw: str) -> str | None:
    """The path as the client wrote it: its latin-1 characters are UTF-8 octets."""
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return None


def valid_local_part(local: str) -> bool:
    """A UTF-8 dot-atom of allowed characters, at most 64 octets once composed (NFC).

    Composed, so that a name typed decomposed (``o`` + U+0308) is held to
    the same length as the same name composed: one mailbox, one verdict.
    """
    if len(unicodedata.normalize("NFC", local).encode("utf-8")) > MAX_LOCAL_PART or not _DOT_ATOM.match(local):
        return False
    return all(
        c < "\x80" or c in _JOINERS or unicodedata.category(c) not in _REFUSED_CATEGORIES for c in local
    )


def canonical_caseless(text: str) -> str:
    """Unicode's canonical caseless form (D145), composed: NFC(casefold(NFD(text)))."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())


def folder_for(local: str) -> str | None:
    """The folder of a non-ASCII local part, or None if it is refused."""
    if not valid_local_part(local):
        return None
    folder = canonical_caseless(local)
    if (
        len(folder.encode("utf-8")) > MAX_FOLDER
        or not _DOT_ATOM.match(folder)
        or not all(c < "\x80" or c in _JOINERS or unicodedata.category(c) not in _REFUSED_CATEGORIES for c in folder)
        or canonical_caseless(folder) != folder
    ):
        return None
    return folder


def ascii_domain(domain: str) -> str | None:
    """A domain with U-labels as its A-labels (IDNA), for the served-domain check.

    At most 255 octets as written, too (RFC 6531 3.3: RFC 5321's limits
    count octets of UTF-8): IDNA maps characters such as U+200B to nothing,
    so a short A-label form may stand for a domain of any length, which
    would be relayed and quoted in notices as written.
    """
    if len(domain.encode("utf-8", "surrogatepass")) > MAX_DOMAIN:
        return None
    try:
        # IDNA 2008 (RFC 5890-5893), as RFC 6531 3.3 asks, not Python's
        # "idna" codec (IDNA 2003): that one maps ß to "ss" and drops soft
        # hyphens, so straße.de would be taken for strasse.de, another
        # domain. UTS 46 mapping is allowed to change case and composition
        # only; a domain it would change in any other way (a character
        # mapped to another or to nothing, an ideographic full stop) names
        # something else than was written, and is refused.
        mapped = idna.uts46_remap(domain, std3_rules=True, transitional=False)
        if mapped != unicodedata.normalize("NFC", domain.lower()):
            return None
        ace = idna.encode(mapped).decode("ascii")
    except (UnicodeError, ValueError):  # idna.IDNAError is a UnicodeError
        return None
    if len(ace) > MAX_DOMAIN or not _ASCII_DOMAIN.match(ace):
        return None
    return ace.lower()


def served_form(domain: str) -> str:
    """A domain as the served ones are held and compared: lowercase ASCII,
    a U-label domain in its A-labels; "" for one IDNA 2008 refuses."""
    return domain.lower() if domain.isascii() else ascii_domain(domain) or ""


def parse_mailbox(path: str) -> tuple[str, str] | None:
    """``local@domain`` with UTF-8 in it -> (local part, ASCII domain), or None.

    Quoted local parts and address literals stay ASCII-only.
    """
    local, at, domain = path.rpartition("@")
    if not at or not local or not domain or not valid_local_part(local):
        return None
    ace = ascii_domain(domain)
    if ace is None:
        return None
    return local, ace
