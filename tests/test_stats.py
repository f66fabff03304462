"""The shared counters and live settings (stats.SharedStats), without a server.

Every part of the block is filled with values that tell apart which word
each came from, so a window that slides onto its neighbour, a sum that
takes one slot too many or too few, or a fold that drops a field shows up
as a wrong number.
"""

from __future__ import annotations

import pytest

from prefork_smtpd.stats import (
    CONTROL,
    FIELD,
    IPV4,
    MAX_WORKERS,
    RETIRED,
    SLOT_FIELDS,
    SLOT_WORDS,
    LiveSettings,
    SharedStats,
    Totals,
)

SUMMED = (
    "total", "current", "bytes", "mails", "replies_4xx", "replies_5xx", "rejected_connections",
    "tls_handshake_failures", "auth_failures", "proxied", "proxy_failures",
    "deliveries_sent", "deliveries_deferred", "deliveries_bounced", "log_lines_dropped",
)
WORKERS = range(0, MAX_WORKERS)  # slot 0 (the queue runner's) and worker slots 1..256; RETIRED is the master's


def value(slot: int, field: int) -> int:
    """A number that names its slot and field."""
    return slot * 1000 + field + 1


def fill_every_slot(stats: SharedStats) -> None:
    for index in (*WORKERS, RETIRED):
        for field in range(len(SLOT_FIELDS)):
            stats.slot(index).set(field, value(index, field))


def test_every_control_value_has_its_own_word_and_live_settings_read_it():
    stats = SharedStats()
    live = LiveSettings(stats)
    for i, name in enumerate(CONTROL):
        stats.set(name, 100 + i)
    fill_every_slot(stats)  # the slots start after the control block
    assert [stats.get(name) for name in CONTROL] == [100 + i for i in range(len(CONTROL))]
    assert [getattr(live, name) for name in CONTROL] == [100 + i for i in range(len(CONTROL))]
    stats.set("max_recipients", 7)  # read at each use: no copy to refresh
    assert live.max_recipients == 7


def test_sums_take_every_worker_slot_and_the_retired_one_and_nothing_else():
    stats = SharedStats()
    for name in CONTROL:
        stats.set(name, 10**9)  # the control block is not a slot
    fill_every_slot(stats)
    for index in range(MAX_WORKERS):  # nor are the address tables, which lie past the slots
        assert stats.addresses.open(index, (IPV4, index))
    assert [stats.addresses.entries(index) for index in range(MAX_WORKERS)] == [1] * MAX_WORKERS
    assert [stats.addresses.connections((IPV4, index)) for index in range(MAX_WORKERS)] == [1] * MAX_WORKERS
    slots = (*WORKERS, RETIRED)
    expected = {name: sum(value(i, FIELD[name]) for i in slots) for name in SUMMED}
    assert stats.totals() == Totals(**expected)
    assert stats.xstat("TOTAL") == expected["total"] and stats.xstat("CURRENT") == expected["current"]
    assert stats.xstat("BYTES") == expected["bytes"] and stats.xstat("MAILS") == expected["mails"]
    assert stats.xstat("PROXIED") == expected["proxied"]
    assert stats.read(FIELD["pid"]) == sum(value(i, FIELD["pid"]) for i in slots)


def test_a_slot_is_a_window_of_its_own_words():
    stats = SharedStats()
    fill_every_slot(stats)
    middle, last = stats.slot(5), stats.slot(RETIRED)
    middle.add(FIELD["mails"])  # one by default
    middle.add(FIELD["bytes"], 300)
    assert middle.get(FIELD["mails"]) == value(5, FIELD["mails"]) + 1
    assert middle.get(FIELD["bytes"]) == value(5, FIELD["bytes"]) + 300
    for field in range(SLOT_WORDS):  # every word of the window, spare ones too
        last.set(field, -1)
        middle.set(field, -1)
    middle.clear()
    last.clear()
    assert [middle.get(f) for f in range(SLOT_WORDS)] == [0] * SLOT_WORDS
    assert [last.get(f) for f in range(SLOT_WORDS)] == [0] * SLOT_WORDS
    # The neighbours keep theirs.
    for index in (4, 6, RETIRED - 1):
        assert [stats.slot(index).get(f) for f in range(len(SLOT_FIELDS))] == [
            value(index, f) for f in range(len(SLOT_FIELDS))
        ]


@pytest.mark.parametrize("index", [1, 128, MAX_WORKERS - 1])
def test_retire_folds_a_dead_workers_totals_but_not_its_open_connections(index):
    stats = SharedStats()
    fill_every_slot(stats)
    for n in range(3):
        assert stats.addresses.open(index, (IPV4, n))
    assert stats.addresses.open(index + 1 if index + 1 < MAX_WORKERS else index - 1, (IPV4, 0))
    before = stats.totals()
    dead = stats.slot(index)
    restarts = dead.get(FIELD["restarts"])
    stats.retire(index)
    after = stats.totals()
    # Its counts stay in the sums (now in the retired slot); its connections are gone.
    for name in SUMMED:
        lost = value(index, FIELD[name]) if name in ("current", "proxied") else 0  # open now: gone with it
        assert getattr(after, name) == getattr(before, name) - lost, name
    assert stats.slot(RETIRED).get(FIELD["total"]) == value(RETIRED, FIELD["total"]) + value(index, FIELD["total"])
    # The slot is empty for its next worker, but keeps how often it was restarted.
    assert [dead.get(f) for f in range(SLOT_WORDS) if f != FIELD["restarts"]] == [0] * (SLOT_WORDS - 1)
    assert dead.get(FIELD["restarts"]) == restarts
    # Its address table is empty; the neighbour's stays.
    assert stats.addresses.entries(index) == 0
    assert stats.addresses.connections((IPV4, 1)) == 0
    assert stats.addresses.connections((IPV4, 0)) == 1


def test_the_highest_worker_has_a_whole_address_table():
    stats = SharedStats()
    top = MAX_WORKERS - 1
    table = stats.addresses
    capacity = 12_288  # README: "a worker holds up to 12,288 distinct addresses at once"
    for n in range(capacity):  # three quarters of its slots: the last words of the block among them
        assert table.open(top, (IPV4, n))
    assert not table.open(top, (IPV4, capacity))
    assert table.connections((IPV4, 0)) == 1 and table.connections((IPV4, capacity - 1)) == 1
    assert stats.totals() == Totals(**{name: 0 for name in SUMMED})  # the tables lie past the counters
    for n in range(capacity):
        table.close(top, (IPV4, n))
    assert table.entries(top) == 0 and table.connections((IPV4, 0)) == 0
