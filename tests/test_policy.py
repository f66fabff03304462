"""The session's policy hook and the free-space reserve, without a server."""

from __future__ import annotations

from sansio import Wired

from prefork_smtpd.diskspace import FREE_SPACE_TTL, HEADROOM_PER_COPY, SpaceGuard, bytes_to_store
from prefork_smtpd.policy import ServerPolicy
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
