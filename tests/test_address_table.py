"""The shared per-address connection tables (stats.AddressTables), without a server."""

from __future__ import annotations

import collections
import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork_smtpd.stats import IPV4, IPV6_64, UNKNOWN, AddressTables, SharedStats, address_key

TABLE = AddressTables


def test_one_ipv6_64_is_one_client_and_the_next_64_another():
    stats = SharedStats()
    table = stats.addresses
    rng = random.Random(1)
    for _ in range(2000):  # 2000 addresses a host can pick inside its own /64
        host = str(ipaddress.IPv6Address((0x2001_0DB8_0000_0001 << 64) | rng.getrandbits(64)))
        table.open(1, address_key(host))
    assert table.connections(address_key("2001:db8:0:1::")) == 2000
    assert table.entries(1) == 1
    assert table.connections(address_key("2001:db8:0:2::1")) == 0
    assert table.connections(address_key("2001:db8:0:1:ffff:ffff:ffff:ffff%eth0")) == 2000


class PlacedTables(AddressTables):
    """16 slots, and each key says where its probe run starts: key // 100.

    The collisions, wrap-arounds and shifts a test needs are then written
    out, not searched for under a random secret.
    """

    SLOTS = 16
    MAX_ENTRIES = 12
    REGION_WORDS = AddressTables.HEADER_WORDS + SLOTS * AddressTables.ENTRY_WORDS

    def home(self, kind, key):
        return key // 100 % self.SLOTS


def placed_tables() -> PlacedTables:
    import mmap

    from prefork_smtpd.stats import MAX_WORKERS

    return PlacedTables(memoryview(mmap.mmap(-1, MAX_WORKERS * PlacedTables.REGION_WORDS * 8)).cast("q"), 0)


def check_table(table: AddressTables, index: int, model: dict[int, int]) -> None:
    """Worker ``index``'s raw table holds exactly ``model`` (IPv4 key -> count), each entry findable.

    Findable: no empty slot between an entry's home and its slot, since a
    lookup stops at the first empty one. An empty slot is all zeros, and the
    header counts the entries in use.
    """
    words, width = table.words, table.ENTRY_WORDS
    start = table._region(index)
    entries = start + table.HEADER_WORDS
    slots = [tuple(words[entries + s * width : entries + (s + 1) * width]) for s in range(table.SLOTS)]
    live = {key: count for kind, key, count in slots if kind}
    assert live == model and len([s for s in slots if s[0]]) == len(model)  # no key twice
    assert all(s == (0, 0, 0) for s in slots if not s[0])
    assert all(kind == IPV4 for kind, _, _ in slots if kind)
    assert list(words[start : entries]) == [len(model)] + [0] * (table.HEADER_WORDS - 1)
    for slot, (kind, key, _) in enumerate(slots):
        if kind:
            run = range(table.home(kind, key), table.home(kind, key) + (slot - table.home(kind, key)) % table.SLOTS)
            assert all(slots[s % table.SLOTS][0] for s in run), (key, slot)
    for key, count in model.items():
        assert table.connections((IPV4, key)) == count


# Homes 14, 14, 14, 15, 0, 0, 2 fill slots 14, 15, 0, 1, 2, 3, 4: one run
# across the end of the table, where every entry but the first is out of its
# home, and two kinds of entries behind a hole: those whose run passes it
# (they move back) and those whose home is after it (they stay).
CROWD = [1400, 1401, 1402, 1500, 0, 1, 200]


@pytest.mark.parametrize("gone", CROWD)
def test_closing_one_of_a_crowded_run_shifts_the_rest_back_and_keeps_them_findable(gone):
    table = placed_tables()
    model = {}
    for n, key in enumerate(CROWD):
        for _ in range(1 + n % 2):  # some with two connections
            assert table.open(7, (IPV4, key))
        model[key] = 1 + n % 2
    assert [table._find(7, IPV4, key, table.home(IPV4, key))[0] for key in CROWD] == [
        table.HEADER_WORDS + s * table.ENTRY_WORDS + table._region(7) for s in (14, 15, 0, 1, 2, 3, 4)
    ]
    check_table(table, 7, model)
    while model[gone]:
        table.close(7, (IPV4, gone))
        model[gone] -= 1
    del model[gone]
    check_table(table, 7, model)
    assert table.open(7, (IPV4, gone))  # and it comes back
    model[gone] = 1
    check_table(table, 7, model)
    for key in CROWD:  # closing all leaves the table as it was made: zeros
        while model.get(key):
            table.close(7, (IPV4, key))
            model[key] -= 1
    table.close(7, (IPV4, 9999))  # one it never counted: ignored
    assert not any(table.words)


def test_address_kinds():
    assert address_key("127.0.0.1") == (IPV4, 0x7F000001)
    assert address_key("::ffff:127.0.0.1") == address_key("127.0.0.1")  # v4 on a dual-stack socket
    assert address_key("::ffff:7f00:1") == address_key("127.0.0.1")
    assert address_key("::1") == (IPV6_64, 0)
    assert address_key("ffff:ffff:ffff:ffff::1") == (IPV6_64, -1)  # the /64 as a signed word
    assert address_key("8000::") == (IPV6_64, -(1 << 63))  # the edges of a signed word
    assert address_key("7fff:ffff:ffff:ffff:ffff::") == (IPV6_64, (1 << 63) - 1)
    assert address_key("::fffe:7f00:1") == (IPV6_64, 0)  # only ::ffff:0:0/96 is IPv4
    assert address_key("unknown") == (UNKNOWN, 0)
    # An IPv4 address and an IPv6 /64 with the same number are different clients.
    assert address_key("0.0.0.1")[1] == address_key("0:0:0:1::")[1]
    assert address_key("0.0.0.1") != address_key("0:0:0:1::")


def test_thousands_of_addresses_each_counted_exactly_across_workers():
    stats = SharedStats()
    table = stats.addresses
    rng = random.Random(2)
    hosts = {str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(5000)}
    hosts |= {str(ipaddress.IPv6Address(rng.getrandbits(64) << 64)) for _ in range(3000)}
    expected = collections.Counter()
    for host in hosts:
        for worker in range(1, 1 + rng.randint(1, 3)):
            times = rng.randint(1, 3)
            for _ in range(times):
                assert table.open(worker, address_key(host))
            expected[host] += times
    for host in hosts:
        assert table.connections(address_key(host)) == expected[host], host
    absent = next(f"10.0.{i >> 8}.{i & 255}" for i in range(70000) if f"10.0.{i >> 8}.{i & 255}" not in hosts)
    assert table.connections(address_key(absent)) == 0


@pytest.mark.slow
def test_collisions_in_the_probe_start_never_merge_counts():
    stats = SharedStats()
    table = stats.addresses
    # Find addresses that share a probe start under this table's secret.
    by_home: dict[int, list[str]] = collections.defaultdict(list)
    i = 0
    while not any(len(v) >= 5 for v in by_home.values()):
        host = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        by_home[table.home(*address_key(host))].append(host)
        i += 1
    crowd = next(v for v in by_home.values() if len(v) >= 5)
    for n, host in enumerate(crowd, start=1):
        for _ in range(n):
            table.open(3, address_key(host))
    assert [table.connections(address_key(h)) for h in crowd] == list(range(1, len(crowd) + 1))
    # Close the first ones: the run shifts back and the rest stay exact.
    table.close(3, address_key(crowd[0]))
    table.close(3, address_key(crowd[1]))
    table.close(3, address_key(crowd[1]))
    assert [table.connections(address_key(h)) for h in crowd] == [0, 0] + list(range(3, len(crowd) + 1))
    assert table.entries(3) == len(crowd) - 2


def test_the_probe_start_is_keyed_by_a_secret_drawn_per_server():
    a, b = SharedStats().addresses, SharedStats().addresses
    homes = [address_key(f"192.0.2.{i}") for i in range(64)]
    assert [a.home(*k) for k in homes] != [b.home(*k) for k in homes]


def test_probe_starts_spread_over_the_whole_table():
    table = SharedStats().addresses
    homes = [table.home(IPV4, n) for n in range(4096)]
    assert all(0 <= h < TABLE.SLOTS for h in homes)
    # 4096 keys thrown into 16384 slots land in about 3,600 distinct ones;
    # a hash that used only some of its bits would crowd far fewer.
    assert len(set(homes)) > 3000
    assert max(homes) >= TABLE.SLOTS * 3 // 4 and min(homes) < TABLE.SLOTS // 4


class SmallTables(AddressTables):
    """16 slots per table: every probe run wraps, collides and shifts."""

    SLOTS = 16
    MAX_ENTRIES = 12
    REGION_WORDS = AddressTables.HEADER_WORDS + SLOTS * AddressTables.ENTRY_WORDS


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 11), st.booleans()), max_size=300))
def test_random_opens_and_closes_match_a_plain_counter(steps):
    import mmap

    from prefork_smtpd.stats import MAX_WORKERS

    words = memoryview(mmap.mmap(-1, MAX_WORKERS * SmallTables.REGION_WORDS * 8)).cast("q")
    table = SmallTables(words, 0)
    model = collections.Counter()
    for worker, n, opening in steps:
        key = (IPV4, n)
        if opening:
            assert table.open(worker, key)
            model[(worker, n)] += 1
        elif model[(worker, n)]:
            table.close(worker, key)
            model[(worker, n)] -= 1
    for n in range(12):
        assert table.connections((IPV4, n)) == sum(model[(w, n)] for w in (1, 2, 3))
    for worker in (1, 2, 3):
        assert table.entries(worker) == sum(1 for (w, _), c in model.items() if w == worker and c)


# What README promises: "a worker holds up to 12,288 distinct addresses at
# once" (three quarters of the table's slots: probe runs stay short).
CAPACITY = 12_288


def test_a_full_table_refuses_and_recovers_and_retire_empties_it():
    stats = SharedStats()
    table = stats.addresses
    for n in range(CAPACITY):
        assert table.open(5, (IPV4, n))
    assert not table.open(5, (IPV4, CAPACITY))  # a new address: refused, not counted
    assert table.connections((IPV4, CAPACITY)) == 0
    assert table.open(5, (IPV4, 7))  # an address already in it still counts
    assert table.connections((IPV4, 7)) == 2
    assert table.open(6, (IPV4, CAPACITY))  # other workers have their own table
    table.close(5, (IPV4, 0))
    assert table.open(5, (IPV4, CAPACITY))
    stats.retire(5)
    assert table.entries(5) == 0
    assert table.connections((IPV4, 7)) == 0
    assert table.connections((IPV4, CAPACITY)) == 1  # worker 6's
