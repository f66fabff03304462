"""The session's policy hook and the free-space reserve, without a server."""

from __future__ import annotations

import ipaddress

import pytest

from sansio import Wired

from prefork_smtpd.diskspace import FREE_SPACE_TTL, HEADROOM_PER_COPY, SpaceGuard, bytes_to_store
from prefork_smtpd.policy import ServerPolicy, listen_addresses, reaches_this_server
from prefork_smtpd.replies import INSUFFICIENT_STORAGE as NO_STORAGE
from prefork_smtpd.replies import UNKNOWN_MAILBOX
from prefork_smtpd.session import Envelope, Limits, Recipient, Session

MiB = 1024 * 1024


def session_with(policy) -> Wired:
    s = Wired(Session("mx.test", frozenset({"smtpd.com"}), Limits(max_errors=3), {}.__getitem__, policy))
    assert s.feed(b"EHLO x\r\n").startswith(b"250")
    return s


def test_unknown_mailboxes_get_550_count_as_errors_and_are_logged():
    policy = ServerPolicy({"alice"}.__contains__, SpaceGuard("/", lambda: 0))
    s = session_with(policy)
    out = s.feed(b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<Alice@smtpd.com>\r\nRCPT TO:<bob>\r\n")
    assert out.split(b"\r\n")[2] + b"\r\n" == UNKNOWN_MAILBOX
    assert s.log == ["EHLO x", 'refused "RCPT TO:<bob>": 550 5.1.1 Error: mailbox unavailable']
    assert [r.folder for r in s._envelope.recipients] == ["alice"]
    # Guessing names is a bad command like any other: max_errors ends it.
    out = s.feed(b"RCPT TO:<c1>\r\nRCPT TO:<c2>\r\n")
    assert s.closing and out.endswith(b"421 4.7.0 mx.test Error: too many errors\r\n")


def test_no_storage_at_mail_is_452_and_not_a_client_error():
    free = [10 * MiB]
    now = [0.0]
    policy = ServerPolicy(None, SpaceGuard("/", lambda: 8 * MiB, free=lambda _: free[0], clock=lambda: now[0]))
    s = session_with(policy)
    assert s.feed(b"MAIL FROM:<a@smtpd.com> SIZE=3000000\r\n") == NO_STORAGE
    assert s.feed(b"MAIL FROM:<a@smtpd.com> SIZE=1000000\r\n").startswith(b"250")
    assert s.errors == 0 and s.replies_4xx == 1
    free[0] = 7 * MiB
    now[0] += FREE_SPACE_TTL  # the figure is looked up again after that long
    assert s.feed(b"RSET\r\nMAIL FROM:<>\r\n") == b"250 2.0.0 Ok\r\n" + NO_STORAGE


def test_the_guard_counts_messages_still_being_written():
    guard = SpaceGuard("/", lambda: 100, free=lambda _: 1000)
    assert guard.claim(500) is None
    reason = guard.claim(401)  # 1000 free, 500 of them already promised
    assert reason is not None and "500 being written" in reason
    guard.release(500)
    assert guard.claim(401) is None
    assert SpaceGuard("/", lambda: 0, free=lambda _: 0).claim(10**12) is None  # 0: no check
    assert SpaceGuard("/", lambda: 1, free=lambda _: None).claim(10**12) is None  # unknown: the store decides


def test_free_space_is_looked_up_once_per_interval_and_own_writes_count_meanwhile():
    lookups = []
    now = [0.0]

    def free(_path):
        lookups.append(now[0])
        return 1000

    guard = SpaceGuard("/", lambda: 100, free=free, clock=lambda: now[0])
    assert guard.claim(300) is None and len(lookups) == 1
    guard.release(300)  # written: the next statvfs would see it, the cached figure does not
    assert guard.claim(300) is None and len(lookups) == 1  # 1000 - 300 written - 300 >= 100
    guard.release(300)
    # 1000 - 600 written - 350 < 100 on the cached figure: a refusal only on a
    # fresh one, which sees the 600 bytes itself (here: still 1000 free).
    assert guard.claim(350) is None and len(lookups) == 2
    assert guard.unseen == 0 and guard.claimed == 350
    now[0] += FREE_SPACE_TTL
    assert guard.claim(1) is None and len(lookups) == 3  # too old: looked up again
    assert guard.claim(1000) is not None and len(lookups) == 4  # refused on a fresh figure


def test_bytes_to_store_counts_one_copy_per_distinct_folder():
    env = Envelope("x", "a@smtpd.com", [Recipient("A", "a"), Recipient("a@smtpd.com", "a"), Recipient("b", "b")])
    env.size = 1000
    assert bytes_to_store(env) == 2 * (1000 + HEADROOM_PER_COPY)


def test_free_bytes_of_a_mail_dir_not_made_yet_is_that_of_its_parent(tmp_path):
    from prefork_smtpd.diskspace import free_bytes

    assert free_bytes(str(tmp_path / "not" / "yet")) == free_bytes(str(tmp_path)) > 0


@pytest.mark.parametrize("address, listen, reaches", [
    # The default: one dual-stack socket on every address.
    ("127.0.0.1", None, True), ("127.0.0.2", None, True), ("127.255.0.9", None, True), ("::1", None, True),
    ("0.0.0.0", None, True), ("::", None, True), ("::ffff:127.0.0.2", None, True), ("192.0.2.5", None, True),
    ("192.0.2.6", None, False), ("2001:db8::5", None, True), ("2001:db8::6", None, False),
    # -l 0.0.0.0: IPv4 only; -l ::: IPv6 only (bound V6ONLY).
    ("127.0.0.2", "0.0.0.0", True), ("::1", "0.0.0.0", False), ("192.0.2.5", "0.0.0.0", True),
    ("::1", "::", True), ("127.0.0.1", "::", False), ("2001:db8::5", "::", True),
    # One address: that one, and the unspecified address of its family when it is loopback.
    ("127.0.0.1", "127.0.0.1", True), ("127.0.0.2", "127.0.0.1", False), ("0.0.0.0", "127.0.0.1", True),
    ("::1", "127.0.0.1", False), ("::ffff:127.0.0.1", "127.0.0.1", True), ("192.0.2.5", "192.0.2.5", True),
    ("0.0.0.0", "192.0.2.5", False), ("192.0.2.6", "192.0.2.5", False),
])
def test_which_addresses_reach_this_servers_listener(address, listen, reaches):
    interfaces = frozenset(map(ipaddress.ip_address, ["127.0.0.1", "::1", "192.0.2.5", "2001:db8::5"]))
    bound = listen_addresses(listen)
    assert reaches_this_server(ipaddress.ip_address(address), bound, interfaces) is reaches
