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
* one table of open connections per client-address bucket for each worker
  (again single-writer), for the per-address connection limit. Addresses
  share a bucket when their hashes collide, which can only over-count.

Readers add up the retired slot and every worker slot.
"""

from __future__ import annotations

import mmap
import zlib
from dataclasses import dataclass

WORD = 8
MAX_WORKERS = 257  # slots 1..256 (workers are numbered from 1): two generations of 128 for a reload

# Control block: index -> name. The values are integers, like the config
# protocol's `<param>=<integer>` messages.
CONTROL = (
    "logging",
    "max_connections",
    "max_message_size",
    "max_recipients",
    "timeout",
    "data_timeout",
    "max_errors",
    "max_command_line",
    "max_text_line",
    "workers",
    "max_connections_per_ip",
)
CONTROL_INDEX = {name: i for i, name in enumerate(CONTROL)}
CONTROL_WORDS = 32

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
)
FIELD = {name: i for i, name in enumerate(SLOT_FIELDS)}
SLOT_WORDS = 16
RETIRED = MAX_WORKERS  # slot number of the retired totals
ADDRESS_BUCKETS = 4096  # per worker, for max_connections_per_ip

# The counters summed for XSTAT, by XSTAT argument.
XSTAT_FIELDS = {"TOTAL": FIELD["total"], "CURRENT": FIELD["current"], "BYTES": FIELD["bytes"], "MAILS": FIELD["mails"]}
_SUMMED = ("total", "current", "bytes", "mails", "replies_4xx", "replies_5xx", "rejected_connections")


@dataclass
class Totals:
    total: int = 0
    current: int = 0
    bytes: int = 0
    mails: int = 0
    replies_4xx: int = 0
    replies_5xx: int = 0
    rejected_connections: int = 0


class SharedStats:
    """The shared block. Build it in the master, before any fork."""

    def __init__(self) -> None:
        self._address_base = CONTROL_WORDS + (MAX_WORKERS + 1) * SLOT_WORDS
        words = self._address_base + MAX_WORKERS * ADDRESS_BUCKETS
        self._map = mmap.mmap(-1, words * WORD)
        self.words = memoryview(self._map).cast("q")

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
        return self.read(XSTAT_FIELDS[key])

    def totals(self) -> Totals:
        return Totals(**{name: self.read(FIELD[name]) for name in _SUMMED})

    # ---------------------------------------------------- per client address
    @staticmethod
    def address_bucket(address: str) -> int:
        return zlib.crc32(address.encode()) % ADDRESS_BUCKETS

    def address_add(self, index: int, bucket: int, amount: int) -> None:
        """Count a connection opened (+1) or closed (-1) by worker ``index``."""
        self.words[self._address_base + index * ADDRESS_BUCKETS + bucket] += amount

    def address_connections(self, bucket: int) -> int:
        """Open connections in this address bucket, all workers together."""
        start = self._address_base + bucket
        return sum(self.words[start : start + MAX_WORKERS * ADDRESS_BUCKETS : ADDRESS_BUCKETS])

    def retire(self, index: int) -> None:
        """Fold a dead worker's totals into the retired slot (master only)."""
        dead = self.slot(index)
        retired = self.slot(RETIRED)
        for name in _SUMMED:
            if name != "current":
                retired.add(FIELD[name], dead.get(FIELD[name]))
        restarts = dead.get(FIELD["restarts"])
        dead.clear()
        dead.set(FIELD["restarts"], restarts)
        start = self._address_base + index * ADDRESS_BUCKETS
        self.words[start : start + ADDRESS_BUCKETS] = memoryview(bytes(ADDRESS_BUCKETS * WORD)).cast("q")


class LiveSettings:
    """The control block seen as attributes, read at each use.

    A session reads its limits through this, so a value set on the config
    port applies to the very next command, in every worker, with no copy to
    refresh. Each read is one index into shared memory.
    """

    __slots__ = ("_words",)

    def __init__(self, stats: SharedStats) -> None:
        self._words = stats.words


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
