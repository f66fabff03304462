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


def test_address_kinds():
    assert address_key("127.0.0.1") == (IPV4, 0x7F000001)
    assert address_key("::ffff:127.0.0.1") == address_key("127.0.0.1")  # v4 on a dual-stack socket
    assert address_key("::ffff:7f00:1") == address_key("127.0.0.1")
    assert address_key("::1") == (IPV6_64, 0)
    assert address_key("ffff:ffff:ffff:ffff::1") == (IPV6_64, -1)  # the /64 as a signed word
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


def test_a_full_table_refuses_and_recovers_and_retire_empties_it():
    stats = SharedStats()
    table = stats.addresses
    for n in range(TABLE.MAX_ENTRIES):
        assert table.open(5, (IPV4, n))
    assert not table.open(5, (IPV4, TABLE.MAX_ENTRIES))  # a new address: refused, not counted
    assert table.connections((IPV4, TABLE.MAX_ENTRIES)) == 0
    assert table.open(5, (IPV4, 7))  # an address already in it still counts
    assert table.connections((IPV4, 7)) == 2
    assert table.open(6, (IPV4, TABLE.MAX_ENTRIES))  # other workers have their own table
    table.close(5, (IPV4, 0))
    assert table.open(5, (IPV4, TABLE.MAX_ENTRIES))
    stats.retire(5)
    assert table.entries(5) == 0
    assert table.connections((IPV4, 7)) == 0
    assert table.connections((IPV4, TABLE.MAX_ENTRIES)) == 1  # worker 6's
