"""The users who may log in (SMTP AUTH), in Dovecot's passwd-file format.

One file can serve both this server and Dovecot (IMAP/POP3), so a user has
one password for sending and reading mail. Each line is

    name:{SCHEME}hash[:uid:gid:gecos:home:shell:extra_fields]

with ``#`` comments and blank lines, as Dovecot's ``passwd-file`` driver
reads it. Only slow, salted hashes are accepted: ``{ARGON2ID}`` (argon2id,
written by ``doveadm pw -s ARGON2ID``: ``$argon2id$v=19$m=65536,t=3,p=1$...``)
and ``{BLF-CRYPT}`` (bcrypt, ``$2y$...``). Plaintext (``{PLAIN}``,
``{CLEAR}``...), fast hashes and unknown schemes are refused when the file
is loaded, with the line number, so a bad file never half-works.

Names are compared in lowercase, as Dovecot does by default
(``auth_username_format = %Lu``); two lines for the same lowercased name are
refused.

Verification is deliberately slow (tens to hundreds of milliseconds of CPU
and, for argon2id, 64 MiB of memory) and blocking: a caller on an event loop
must run ``UsersTable.verify`` in a thread pool (``loop.run_in_executor``),
never on the loop itself. A name that is not in the table is checked
against a dummy hash all the same, so the reply time does not tell an
attacker which names exist.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import argon2
import bcrypt

from .textfile import read_regular_file

SCHEMES = ("ARGON2ID", "BLF-CRYPT")
DEFAULT_SCHEME = "ARGON2ID"

# Dovecot's own ARGON2ID parameters (doveadm pw -s ARGON2ID, libsodium's
# crypto_pwhash_str): 64 MiB, 3 passes, one lane. Writing exactly what
# doveadm writes keeps the file uniform whoever added a user.
ARGON2_TIME_COST = 3
ARGON2_MEMORY_KIB = 65536
ARGON2_PARALLELISM = 1
# bcrypt cost 12 (~0.25 s): Dovecot writes a cost of 5, too cheap today.
BCRYPT_ROUNDS = 12
# bcrypt reads only the first 72 octets of a password; Dovecot's
# crypt_blowfish cuts there silently, so verification cuts there too.
BCRYPT_MAX_PASSWORD = 72

_PLAINTEXT_SCHEMES = frozenset({"PLAIN", "CLEAR", "CLEARTEXT", "PLAIN-TRUNC", "PLAIN-MD5", "PLAIN-MD4"})
_SCHEME = re.compile(r"\{([A-Za-z0-9._-]+)\}(.*)\Z", re.DOTALL)
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}\Z")
_ARGON2 = argon2.PasswordHasher(
    time_cost=ARGON2_TIME_COST,
    memory_cost=ARGON2_MEMORY_KIB,
    parallelism=ARGON2_PARALLELISM,
    hash_len=32,
    salt_len=16,
    type=argon2.Type.ID,
)

# A name is a mailbox local part (RFC 5321 dot-atom) or local@domain: what
# a mail client is configured with, and what Dovecot's %n/%d can split.
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-=?^_`{|}~]"
_LOCAL = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_NAME = re.compile(rf"{_LOCAL}(?:@{_LABEL}(?:\.{_LABEL})*)?\Z")
MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_NAME = 254  # RFC 5321 4.5.3.1.3 path, less the angle brackets


class UsersFileError(Exception):
    """A users file that cannot be used; the message names file and line."""


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a user name, or None if it can."""
    if not name:
        return "empty name"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "control character in name"
    if ":" in name:
        return "':' in name (it separates the fields)"
    if name.startswith("#"):
        return "'#' at the start of a name (the line would be a comment)"
    if len(name) > MAX_NAME or len(name.partition("@")[0]) > MAX_LOCAL_PART:
        return "name too long (local part at most 64, whole name at most 254 octets)"
    if not _NAME.match(name):
        return f"not a mailbox name (local or local@domain): {name!r}"
    return None


@dataclass(frozen=True)
class UserEntry:
    """One user line. ``rest`` is everything after the password field,
    its leading ``:`` included, kept verbatim so a rewrite keeps Dovecot's
    uid, home and extra fields."""

    name: str
    scheme: str
    hashed: str
    rest: str = ""

    @property
    def password_field(self) -> str:
        return f"{{{self.scheme}}}{self.hashed}"

    def line(self) -> str:
        return f"{self.name}:{self.password_field}{self.rest}"

    def __repr__(self) -> str:
        return f"UserEntry(name={self.name!r}, scheme={self.scheme!r})"


def parse_line(line: str, where: str) -> UserEntry | None:
    """One line of a users file: an entry, or None for a comment or blank.

    Raises UsersFileError naming ``where`` (``file:line``) and the reason.
    """
    text = line.rstrip("\r\n")
    if not text.strip() or text.startswith("#"):
        return None
    name, sep, after = text.partition(":")
    problem = name_problem(name)
    if problem:
        raise UsersFileError(f"{where}: {problem}")
    if not sep:
        raise UsersFileError(f"{where}: no password field for {name!r} (want name:{{SCHEME}}hash)")
    password, colon, rest = after.partition(":")
    entry = parse_password_field(password, where, name)
    return UserEntry(name, entry[0], entry[1], colon + rest)


def parse_password_field(field: str, where: str, name: str = "") -> tuple[str, str]:
    """``{SCHEME}hash`` -> (SCHEME, hash), refused unless a known slow hash."""
    who = f" for {name!r}" if name else ""
    if not field:
        raise UsersFileError(f"{where}: empty password field{who}")
    match = _SCHEME.match(field)
    if not match:
        raise UsersFileError(f"{where}: password{who} has no {{SCHEME}} prefix (want {{ARGON2ID}} or {{BLF-CRYPT}})")
    scheme, hashed = match.group(1).upper(), match.group(2)
    if scheme in _PLAINTEXT_SCHEMES:
        raise UsersFileError(
            f"{where}: plaintext password{who} ({{{scheme}}}) refused; store a hash (prefork-smtpd-users passwd NAME)"
        )
    if scheme not in SCHEMES:
        raise UsersFileError(f"{where}: unsupported scheme {{{scheme}}}{who}; use ARGON2ID or BLF-CRYPT")
    reason = _hash_problem(scheme, hashed)
    if reason:
        raise UsersFileError(f"{where}: bad {{{scheme}}} hash{who}: {reason}")
    return scheme, hashed


def _hash_problem(scheme: str, hashed: str) -> str | None:
    if scheme == "BLF-CRYPT":
        if not _BCRYPT_HASH.match(hashed):
            return "want $2y$NN$ and 53 characters of salt and hash"
        return None
    try:
        params = argon2.extract_parameters(hashed)
    except (argon2.exceptions.InvalidHashError, ValueError):
        return "not an $argon2id$v=19$m=...,t=...,p=...$salt$hash string"
    if params.type is not argon2.Type.ID:
        return "not argon2id"
    return None


def hash_password(password: str, scheme: str = DEFAULT_SCHEME) -> str:
    """The password field for ``password``: ``{SCHEME}hash``, as Dovecot reads it.

    Slow on purpose (see the module docstring). Raises ValueError for an
    empty password, an unknown scheme, or a BLF-CRYPT password over 72
    octets (bcrypt would ignore the rest).
    """
    if not password:
        raise ValueError("empty password")
    data = password.encode("utf-8")
    scheme = scheme.upper()
    if scheme == "ARGON2ID":
        return "{ARGON2ID}" + _ARGON2.hash(data)
    if scheme == "BLF-CRYPT":
        if len(data) > BCRYPT_MAX_PASSWORD:
            raise ValueError(f"BLF-CRYPT uses only the first {BCRYPT_MAX_PASSWORD} octets of a password")
        hashed = bcrypt.hashpw(data, bcrypt.gensalt(rounds=BCRYPT_ROUNDS)).decode("ascii")
        # $2b$ and $2y$ are the same algorithm; $2y$ is what Dovecot writes.
        return "{BLF-CRYPT}$2y$" + hashed[4:]
    raise ValueError(f"unsupported scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def verify_password(scheme: str, hashed: str, password: str) -> bool:
    """True if ``password`` matches; False on a mismatch or a broken hash. Slow."""
    data = password.encode("utf-8")
    try:
        if scheme == "ARGON2ID":
            return _ARGON2.verify(hashed, data)
        if scheme == "BLF-CRYPT":
            # The bcrypt package spells the prefix $2b$; same algorithm.
            stored = ("$2b$" + hashed[4:]) if hashed.startswith("$2y$") else hashed
            return bcrypt.checkpw(data[:BCRYPT_MAX_PASSWORD], stored.encode("ascii"))
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError, ValueError):
        return False
    return False


@functools.lru_cache(maxsize=1)
def _dummy_entry() -> UserEntry:
    """A hash nobody's password matches, made once, costing what a real
    default-scheme check costs."""
    scheme, hashed = parse_password_field(hash_password("dummy password, never valid"), "<dummy>")
    return UserEntry("", scheme, hashed)


def warm_up() -> None:
    """Make the dummy hash now (one slow hash), so that even the first
    check of an unknown name costs one hash, not two. Call it once at start."""
    _dummy_entry()


class UsersTable:
    """The loaded users, by lowercased name. Immutable: a reload builds a
    new table and swaps it, so checks in flight finish on the old one."""

    def __init__(self, entries: dict[str, UserEntry], source: str = "<users>") -> None:
        self._entries = dict(entries)
        self.source = source

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name_key(name) in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> UserEntry | None:
        return self._entries.get(name_key(name))

    def verify(self, name: str, password: str) -> bool:
        """True if ``name`` exists and ``password`` is its password.

        Blocking and slow: run it in a thread pool. An unknown name costs
        the same as a known one with the default scheme.
        """
        entry = self._entries.get(name_key(name))
        if entry is None:
            dummy = _dummy_entry()
            verify_password(dummy.scheme, dummy.hashed, password)
            return False
        return verify_password(entry.scheme, entry.hashed, password)


def name_key(name: str) -> str:
    """The key a user is looked up by: the name lowercased. Names are ASCII
    (name_problem); a name that is not never matches, since Unicode
    lowercasing would map lookalikes onto users (U+212A KELVIN SIGN to k)."""
    return name.lower() if name.isascii() else ""


def parse_users(text: str, source: str = "<users>") -> UsersTable:
    """A table from the text of a users file; raises UsersFileError."""
    entries: dict[str, UserEntry] = {}
    first_line: dict[str, int] = {}
    # Split on LF only, as Dovecot does: str.splitlines() would also split on
    # form feeds and Unicode separators and shift the line numbers.
    for number, line in enumerate(text.split("\n"), start=1):
        entry = parse_line(line, f"{source}:{number}")
        if entry is None:
            continue
        key = entry.name.lower()
        if key in entries:
            raise UsersFileError(f"{source}:{number}: {entry.name!r} already defined on line {first_line[key]}")
        entries[key] = entry
        first_line[key] = number
    return UsersTable(entries, source)


def load_users(path: str) -> UsersTable:
    """Read and check a users file; raises UsersFileError with a one-line reason."""
    try:
        raw = read_regular_file(path)
    except OSError as exc:
        raise UsersFileError(f"{path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        number = raw.count(b"\n", 0, exc.start) + 1
        raise UsersFileError(f"{path}:{number}: not UTF-8 text") from None
    return parse_users(text, path)
