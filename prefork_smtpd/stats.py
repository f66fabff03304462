"""Counters and live settings shared by the master and its workers.

One anonymous shared mapping, made by the master before it forks, so every
worker inherits it without a name to register or unlink. It holds 64-bit
words, in three parts:

* the control block: live settings that the config port changes and every
  worker reads (logging switch, limits, ...);
* one slot per worker, written only by the worker that owns it (a single
  writer needs no lock: an aligned 8-byte store is atomic on every platform
  CPython runs prefork servers on);
* the retired slot, written only by the master: when a worker dies, its
  totals are folded in there and its current connections dropped, so the
  sums stay true after a crash;
* one table of client addresses per worker (again single-writer), for the
  per-address connection limit: see ``AddressTables``.

Readers add up the retired slot and every worker slot.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import mmap
import secrets
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .sasl import MECHANISMS as AUTH_MECHANISMS
from .settings import SHARED

WORD = 8
MAX_WORKERS = 257  # slots 1..256 (workers are numbered from 1): two generations of 128 for a reload

# Control block: index -> name: the shared settings of settings.REGISTRY.
# The values are integers, like the config protocol's `<param>=<integer>`
# messages. The layout is fixed when the master starts and the same in every
# worker it forks (a reload keeps the master, so the layout too).
CONTROL = SHARED
CONTROL_INDEX = {name: i for i, name in enumerate(CONTROL)}
CONTROL_WORDS = 32
assert len(CONTROL) <= CONTROL_WORDS, "the control block is full: make CONTROL_WORDS larger"

# TLS sessions: handshakes completed (STARTTLS or implicit TLS), one counter
# per protocol version the server's context allows (tls.py).
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
# AUTH exchanges of a mechanism the server offers, by how they ended:
# success and failure are the password check's verdict; unavailable is a
# 454 (too many checks in progress); cancelled, the client's "*"; malformed,
# what the client sent could not be taken (bad base64, broken credentials,
# a line too long, an authorization identity other than the user).
AUTH_RESULTS = ("success", "failure", "unavailable", "cancelled", "malformed")


def _tls_field(version: str) -> str:
    return "tls_sessions_" + version.removeprefix("TLSv").replace(".", "_")  # tls_sessions_1_3


def _auth_field(mechanism: str, result: str) -> str:
    return f"auth_{mechanism.lower()}_{result}"  # auth_plain_success


# The counters kept per label (TLS version; AUTH mechanism and result).
LABELLED_FIELDS = (
    *(_tls_field(version) for version in TLS_VERSIONS),
    *(_auth_field(mechanism, result) for mechanism in AUTH_MECHANISMS for result in AUTH_RESULTS),
)

# A worker slot: index -> name.
SLOT_FIELDS = (
    "pid",
    "total",  # connections accepted
    "current",  # connections open now
    "bytes",  # message bytes accepted
    "mails",  # messages accepted (once per message)
    "replies_4xx",
    "replies_5xx",
    "rejected_connections",  # closed at once with 421 (over a connection limit)
    "restarts",  # master-owned: how often this slot's worker was replaced
    "accepting",  # 1 once the worker serves its listening sockets
    "recycle",  # 1 once the worker served its quota: the master replaces it, then retires it
    "tls_handshake_failures",  # STARTTLS or implicit-TLS handshakes that failed or timed out
    "auth_failures",  # AUTH attempts with a wrong name or password
    "proxied",  # connections open now that came through a trusted proxy (their socket's peer is the proxy)
    "proxy_failures",  # PROXY listener connections closed before a session: untrusted, bad or late header
    # The queue runner's (slot 0): the queue now, and its deliveries by result.
    "queue_messages",  # mails in the queue
    "queue_oldest_seconds",  # age of the oldest queued mail, as of the runner's last look; 0 when empty
    "deliveries_sent",  # recipients the next hop accepted
    "deliveries_deferred",  # recipient attempts that failed for now (4xx, no connection)
    "deliveries_bounced",  # recipients given up on (5xx, lifetime over)
    "log_lines_dropped",  # log lines dropped because the log could not be written fast enough (log.py)
    *LABELLED_FIELDS,
)
FIELD = {name: i for i, name in enumerate(SLOT_FIELDS)}
SLOT_WORDS = 40
assert len(SLOT_FIELDS) <= SLOT_WORDS, "a worker slot is full: make SLOT_WORDS larger"
RETIRED = MAX_WORKERS  # slot number of the retired totals
TLS_SESSION_FIELDS = {version: FIELD[_tls_field(version)] for version in TLS_VERSIONS}
AUTH_FIELDS = {
    (mechanism, result): FIELD[_auth_field(mechanism, result)]
    for mechanism in AUTH_MECHANISMS
    for result in AUTH_RESULTS
}

# The counters summed for XSTAT, by XSTAT argument: each the sum of these fields.
XSTAT_FIELDS = {
    "TOTAL": (FIELD["total"],), "CURRENT": (FIELD["current"],), "BYTES": (FIELD["bytes"],),
    "MAILS": (FIELD["mails"],), "PROXIED": (FIELD["proxied"],),
    # Written by the queue runner alone (slot 0): the sum is its figure.
    "QUEUE": (FIELD["queue_messages"],), "QUEUEAGE": (FIELD["queue_oldest_seconds"],),
    "TLS": tuple(TLS_SESSION_FIELDS.values()),  # sessions that completed a TLS handshake
}
_SUMMED = (
    "total", "current", "bytes", "mails", "replies_4xx", "replies_5xx", "rejected_connections",
    "tls_handshake_failures", "auth_failures", "proxied", "proxy_failures",
    "deliveries_sent", "deliveries_deferred", "deliveries_bounced", "log_lines_dropped",
)
_OPEN_NOW = ("current", "proxied")  # gauges: a dead worker's connections are gone
# What a dead worker's slot hands to the retired slot: every count but
# the gauges of what is open now, which died with it.
_FOLDED = (*(name for name in _SUMMED if name not in _OPEN_NOW), *LABELLED_FIELDS)


@dataclass
class Totals:
    total: int = 0
    current: int = 0
    bytes: int = 0
    mails: int = 0
    replies_4xx: int = 0
    replies_5xx: int = 0
    rejected_connections: int = 0
    tls_handshake_failures: int = 0
    auth_failures: int = 0
    proxied: int = 0
    proxy_failures: int = 0
    deliveries_sent: int = 0
    deliveries_deferred: int = 0
    deliveries_bounced: int = 0
    log_lines_dropped: int = 0


class SharedStats:
    """The shared block. Build it in the master, before any fork."""

    def __init__(self) -> None:
        address_base = CONTROL_WORDS + (MAX_WORKERS + 1) * SLOT_WORDS
        words = address_base + MAX_WORKERS * AddressTables.REGION_WORDS
        self._map = mmap.mmap(-1, words * WORD)
        self.words = memoryview(self._map).cast("q")
        self.addresses = AddressTables(self.words, address_base)

    # ------------------------------------------------------------ control
    def get(self, name: str) -> int:
        return self.words[CONTROL_INDEX[name]]

    def set(self, name: str, value: int) -> None:
        self.words[CONTROL_INDEX[name]] = value

    # -------------------------------------------------------------- slots
    def slot(self, index: int) -> "Slot":
        return Slot(self.words, CONTROL_WORDS + index * SLOT_WORDS)

    def read(self, field: int) -> int:
        """Sum one field over the retired slot and every worker slot."""
        words = self.words
        return sum(words[CONTROL_WORDS + field : CONTROL_WORDS + (MAX_WORKERS + 1) * SLOT_WORDS : SLOT_WORDS])

    def xstat(self, key: str) -> int:
        return sum(map(self.read, XSTAT_FIELDS[key]))

    def totals(self) -> Totals:
        return Totals(**{name: self.read(FIELD[name]) for name in _SUMMED})

    def tls_sessions(self) -> dict[str, int]:
        """TLS handshakes completed, by protocol version."""
        return {version: self.read(field) for version, field in TLS_SESSION_FIELDS.items()}

    def auth_attempts(self) -> dict[tuple[str, str], int]:
        """AUTH exchanges, by (mechanism, result)."""
        return {key: self.read(field) for key, field in AUTH_FIELDS.items()}

    def retire(self, index: int) -> None:
        """Fold a dead worker's totals into the retired slot (master only)."""
        dead = self.slot(index)
        retired = self.slot(RETIRED)
        for name in _FOLDED:
            retired.add(FIELD[name], dead.get(FIELD[name]))
        restarts = dead.get(FIELD["restarts"])
        dead.clear()
        dead.set(FIELD["restarts"], restarts)
        self.addresses.clear(index)


class LiveSettings:
    """The control block seen as attributes, read at each use.

    A session reads its limits through this, so a value set on the config
    port applies to the very next command, in every worker, with no copy to
    refresh. Each read is one index into shared memory.
    """

    __slots__ = ("_words",)

    def __init__(self, stats: SharedStats) -> None:
        self._words = stats.words

    if TYPE_CHECKING:
        # One int property per CONTROL name, made below from the registry.
        def __getattr__(self, name: str) -> int: ...


def _control_property(name: str) -> property:
    index = CONTROL_INDEX[name]
    return property(lambda self: self._words[index], doc=f"live value of {name}")


for _name in CONTROL:
    setattr(LiveSettings, _name, _control_property(_name))


class Slot:
    """One worker's counters: a window on the shared words."""

    __slots__ = ("words", "base")

    def __init__(self, words: memoryview, base: int) -> None:
        self.words = words
        self.base = base

    def get(self, field: int) -> int:
        return self.words[self.base + field]

    def set(self, field: int, value: int) -> None:
        self.words[self.base + field] = value

    def add(self, field: int, amount: int = 1) -> None:
        self.words[self.base + field] += amount

    def clear(self) -> None:
        for i in range(SLOT_WORDS):
            self.words[self.base + i] = 0


# ------------------------------------------------------ per client address
# What one client controls: an IPv4 address, or an IPv6 /64 (the smallest
# network a site is given, and a host picks any address inside its own /64
# at will). An IPv4-mapped IPv6 address (::ffff:a.b.c.d, a v4 client on a
# dual-stack socket) is its IPv4 address.
IPV4 = 1
IPV6_64 = 2
UNKNOWN = 3  # no usable peer address: all such connections share one entry
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_INDICES = range(MAX_WORKERS)
_KIND_AND_KEY = struct.Struct(">Bq")


def address_key(host: str) -> tuple[int, int]:
    """(kind, key) of a peer address as the socket reports it.

    The key is the whole IPv4 address or the whole /64 prefix, so two keys
    are equal exactly when the addresses must be counted together.
    """
    try:
        return IPV4, int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")
    except OSError:
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])  # no zone index
    except OSError:
        return UNKNOWN, 0
    if packed[:12] == _MAPPED_PREFIX:
        return IPV4, int.from_bytes(packed[12:], "big")
    prefix = int.from_bytes(packed[:8], "big")
    return IPV6_64, prefix - (1 << 64) if prefix >= 1 << 63 else prefix  # as a signed 64-bit word


class AddressTables:
    """Open connections per client address: one hash table per worker.

    Worker ``i`` alone writes table ``i``; an address's count is the sum of
    its entries in every table. Each table is open addressing with linear
    probing over ``SLOTS`` entries of three words (kind, key, count), plus a
    header word holding how many entries are in use (readers skip empty
    tables). The full key is stored and compared, so two addresses are
    never counted together; the probe start is a hash keyed by a secret
    drawn when the master starts, so a client cannot pick addresses that
    crowd one probe run either.

    An entry lives only while its address has a connection open in that
    worker (a deletion shifts the run back, leaving no tombstones), so a
    table holds at most as many entries as the worker has connections,
    which max_connections caps. A table takes at most ``MAX_ENTRIES``
    (three quarters full keeps probe runs short); past that, ``open``
    answers False and the worker refuses the client: never an uncounted
    connection.

    Readers in other workers probe without a lock. A reader that meets an
    entry being moved by a deletion may miss it for that instant; like two
    workers admitting the same address at the same moment, that can let a
    client past its limit by a connection in flight, never lock one out.
    """

    SLOTS = 16384  # a power of two
    MAX_ENTRIES: ClassVar[int] = SLOTS * 3 // 4  # 12,288 distinct addresses per worker
    ENTRY_WORDS = 3
    HEADER_WORDS = 8
    REGION_WORDS: ClassVar[int] = HEADER_WORDS + SLOTS * ENTRY_WORDS  # 384 KiB per worker

    def __init__(self, words: memoryview, base: int) -> None:
        self.words = words
        self.base = base
        self._secret = secrets.token_bytes(16)  # drawn before fork: shared by every worker
        # A connection asks for its address's home three times (open, the
        # per-address count, close), and clients come back: a keyed hash is
        # 2-3 us, a remembered one 0.3. Per instance, as the secret is.
        self._homes: Callable[[int, int], int] = functools.lru_cache(maxsize=256)(self._keyed_home)

    def _region(self, index: int) -> int:
        return self.base + index * self.REGION_WORDS

    def home(self, kind: int, key: int) -> int:
        """The slot a key's probe run starts at."""
        return self._homes(kind, key)

    def _keyed_home(self, kind: int, key: int) -> int:
        digest = hashlib.blake2b(_KIND_AND_KEY.pack(kind, key), digest_size=8, key=self._secret).digest()
        return int.from_bytes(digest, "big") & (self.SLOTS - 1)

    def _find(self, index: int, kind: int, key: int, slot: int) -> tuple[int, bool]:
        """(word offset of the key's entry, True), or of the empty slot ending its run."""
        words = self.words
        entries = self._region(index) + self.HEADER_WORDS
        mask = self.SLOTS - 1
        while True:
            at = entries + slot * self.ENTRY_WORDS
            found_kind = words[at]
            if found_kind == 0:
                return at, False
            if found_kind == kind and words[at + 1] == key:
                return at, True
            slot = (slot + 1) & mask

    # ------------------------------------------------- the owning worker
    def open(self, index: int, address: tuple[int, int]) -> bool:
        """Count a connection opened; False if the table is full (not counted)."""
        kind, key = address
        at, found = self._find(index, kind, key, self.home(kind, key))
        words = self.words
        if found:
            words[at + 2] += 1
            return True
        header = self._region(index)
        if words[header] >= self.MAX_ENTRIES:
            return False
        words[at + 2] = 1
        words[at + 1] = key
        words[at] = kind  # last: readers see a whole entry or an empty slot
        words[header] += 1
        return True

    def close(self, index: int, address: tuple[int, int]) -> None:
        """Count a connection closed (one that ``open`` counted)."""
        kind, key = address
        at, found = self._find(index, kind, key, self.home(kind, key))
        if not found:
            return
        words = self.words
        words[at + 2] -= 1
        if words[at + 2] <= 0:
            self._delete(index, at)

    def _delete(self, index: int, at: int) -> None:
        """Remove the entry at ``at``, shifting later entries of its run back."""
        words = self.words
        entries = self._region(index) + self.HEADER_WORDS
        width = self.ENTRY_WORDS
        mask = self.SLOTS - 1
        hole = (at - entries) // width
        slot = hole
        while True:
            slot = (slot + 1) & mask
            src = entries + slot * width
            kind = words[src]
            if kind == 0:
                break
            home = self.home(kind, words[src + 1])
            # The entry may fill the hole only if its run passes the hole:
            # its home is not cyclically within (hole, slot].
            if (slot - home) & mask >= (slot - hole) & mask:
                dst = entries + hole * width
                words[dst + 2] = words[src + 2]
                words[dst + 1] = words[src + 1]
                words[dst] = kind
                hole = slot
        words[entries + hole * width] = 0
        words[entries + hole * width + 1] = 0
        words[entries + hole * width + 2] = 0
        words[self._region(index)] -= 1

    # ----------------------------------------------------------- readers
    def connections(self, address: tuple[int, int]) -> int:
        """Open connections from this address, all workers together."""
        kind, key = address
        home = self.home(kind, key)
        words = self.words
        in_use = words[self.base : self.base + MAX_WORKERS * self.REGION_WORDS : self.REGION_WORDS].tolist()
        total = 0
        for index in itertools.compress(_INDICES, in_use):  # tables with entries only
            at, found = self._find(index, kind, key, home)
            if found:
                total += words[at + 2]
        return total

    def entries(self, index: int) -> int:
        """Distinct addresses in worker ``index``'s table."""
        return self.words[self._region(index)]

    # ------------------------------------------------------------ master
    def clear(self, index: int) -> None:
        """Empty a dead worker's table (master only; its writer is gone)."""
        start = self._region(index)
        if self.words[start]:
            self.words[start : start + self.REGION_WORDS] = memoryview(bytes(self.REGION_WORDS * WORD)).cast("q")
