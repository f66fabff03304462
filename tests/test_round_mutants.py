"""What the hand-planted mutants of the relay and fair-read round found
unchecked: the queue runner's connection pool, its batched removals and
the settling of a transaction's outcomes, the wake-up pipe, and the
worker's fair read. The pool, the removals and the pipe are driven
directly (fake transports, a fake queue, a real pipe); the rest through
real servers and a real next hop.

Mutants planted by hand, one at a time, in a scratch copy; each run
against the fast tests of its module (runner, queue: test_relay.py and
test_relay_smtputf8.py; worker: test_worker_events.py,
test_worker_mutants.py, test_bdat_server.py, test_resources.py,
test_framing_server.py, test_server.py; session: test_session*.py,
test_chunking.py, test_resources.py). 59 mutants: 31 killed by the tests
before this module, 20 survivors killed by the tests here ("new:"), 8
equivalent (why).

runner.py, ReplyReader
  R1  send() counts 1 reply, not ``replies``      killed: test_mixed_recipients_local_once_and_relayed_once_...
  R2  reply() never lowers ``awaited``            killed: test_a_next_hop_sending_replies_nobody_asked_for_is_cut_off
  R3  unasked check ``>=`` as ``>``                 killed: the same
  R4  parse on after a refused reply             equivalent: every later reply is refused too; only that read's parsing
runner.py, ConnectionPool
  P1  per destination ``<`` as ``<=``               killed: test_mails_to_one_next_hop_share_kept_connections
  P2  total ``>`` as ``>=``                         killed: test_the_pool_bounds_each_next_hop_and_the_total_...
  P3  no eviction over the total                 killed: the same
  P4  evict the idle one used last, not longest  new: test_room_for_another_next_hop_is_made_by_closing_...
  P5  mails per connection ``<`` as ``<=``          killed: test_the_pool_bounds_...
  P6  release() wakes no waiter                  killed: test_the_pool_bounds_... (by its timeout)
  P7  idle expiry does not close                 killed: test_an_unused_connection_is_kept_for_relay_idle_time_...
  P8  acquire() leaves the idle timer running    new: test_a_connection_taken_again_is_closed_idle_time_after_...
  P9  a cancelled waiter keeps its turn          new: test_a_delivery_cancelled_as_its_turn_came_passes_the_turn_on
  P10 a dead idle connection handed out          new: test_an_idle_connection_the_next_hop_closed_is_never_handed_out
  P11 release wakes every waiter                 equivalent: the others find no connection and wait again, in order
  P12 forget a destination that has waiters      killed: test_relay_mails_per_connection_bounds_each_session
runner.py, BatchedRemovals and Settler
  B1  a drainer per removal                      new: test_mails_finishing_during_a_removal_go_together_...
  B2  a failed removal reported done             new: test_a_failed_removal_fails_every_mail_of_its_batch
  B3  ``while self.pending`` as ``if``             killed: test_notify_never_and_the_null_sender_get_no_bounce
  S1  remove after any group, not the last       new: test_a_mail_to_two_domains_leaves_the_queue_only_once_...
  S2  remove though a recipient failed           killed: test_5xx_bounces_to_the_local_sender_as_a_parseable_dsn
  S3  remove though a relayed notice is due      killed: test_relayed_notice_when_the_next_hop_offers_no_dsn
  S4  a notice the next hop owes counted ours    new: test_a_success_notice_passed_on_leaves_the_mail_nothing_...
runner.py, SMTPUTF8
  U1  the sender always counted ASCII            killed: test_smtputf8_terms[utf8-sender]
  U2  the whole message, not the headers, ASCII  killed: test_smtputf8_terms[ascii-headers]
  U3  8BITMIME test inverted                     killed: test_smtputf8_terms[8bitmime]
  U4  _a_label_form without its ASCII shortcut   new: test_the_null_sender_is_no_obstacle_to_a_next_hop_...
  U5  U-label domain kept                        killed: test_a_label_form
  U6  UTF-8 and A-label encoders swapped         killed: test_utf8_addresses_go_with_smtputf8_in_one_attempt
  U7  no early return when all are refused       equivalent: what follows returns no sendable recipient either
  U8  ``utf8_options is None`` as ``not ...``      killed: test_utf8_headers_only_go_as_8bitmime_without_smtputf8
queue.py and runner.py, the wake-up pipe
  Q1  wake_runner() test inverted                killed: test_an_authenticated_user_may_relay_and_an_anonymous_...
  Q2  the pipe blocking                          killed: the same (the runner's first drain blocks)
  Q3  drain() reads once                         new: test_wake_ups_nobody_reads_never_block_nor_fail_a_worker_...
  Q4  wake() lets a full pipe's error out        new: the same
  Q5  the runner woken does not drain            new: test_the_runner_woken_empties_the_pipe_and_looks_for_new_mail
  Q6  no drain when the runner starts            equivalent: the bytes left wake it once more, one look for nothing
worker.py, the fair read and the wake-up (W2, W3, W7, W9 and W10 were planted in a
  version that also fed a read above FAIR_READ a piece per turn; that was
  taken out again: 1.2 MB more per never-reading client flooding BDAT lines)
  W1  step aside at ``> FAIR_READ``               killed: test_a_large_read_steps_aside_until_the_loops_next_turn
  W2  split at ``>= FAIR_READ``                   equivalent: the rest of an exact read is empty, nothing held
  W3  _step_back_in resumes with pieces held     killed: test_a_read_bigger_than_the_fair_share_reaches_the_...
  W4  stepped_aside never cleared                killed: test_transactions_pipelined_in_one_write_with_big_chunks_...
                                                 (and new: test_every_large_read_steps_aside_not_only_the_first)
  W5  _step_back_in reads again while paused     new: test_a_client_not_reading_its_replies_keeps_reading_stopped_...
  W6  _pause_reading pauses only when aside      new: test_replies_backing_up_stop_reading_at_once (the
                                                 backpressure tests of test_resources.py are slow-marked)
  W7  the rest of a large read held past STARTTLS  new: test_a_large_read_with_starttls_inside_keeps_nothing_...
  W8  wake only if every recipient is outside    killed: test_mixed_recipients_... (by its wait's timeout);
                                                 new: test_mail_with_a_local_recipient_too_wakes_the_runner_...
  W9  _step_back_in feeds while paused           equivalent: _feed holds it all again, in order, while it waits
  W10 _take steps aside again when aside         killed: test_a_read_bigger_than_the_fair_share_reaches_the_...
session.py, the DATA scan and the shared empty values
  X1  ``stuffed`` left True with no "\r\n."     equivalent: the flag only spares a search
  X2  ``stuffed`` starts False                    killed: test_message_size_counts_octets_after_dot_unstuffing
  X3  "\r\n." searched from pos + 1              killed: test_bare_lf_then_dot_crlf_in_the_next_read_does_not_...
  X4  the end searched from dot + 1              killed: test_smuggling_attempt_unsplit_is_one_refused_message
  X5  last LF searched from pos + 1              new: test_a_bare_lf_opening_a_read_is_judged_even_when_...
  X6  the empty buffer kept after a command      new: test_an_idle_session_holds_no_container_of_its_own
  X7  the replies kept after a feed              killed: test_an_idle_session_holds_few_bytes
  X8  _chunks not reset at the end of data       equivalent: the verdict resets them; held_bytes reads _size
  X9  no __slots__                               killed: test_an_idle_session_holds_few_bytes
  X10 take_unread() leaves a new bytearray       new: test_an_idle_session_holds_no_container_of_its_own
  X11 _add_input appends to the shared b""       new: test_input_fed_while_the_message_is_stored_is_answered_...
  X12 _reset_transaction makes a new list        new: test_an_idle_session_holds_no_container_of_its_own

P9 failed once in test_relay_max_connections_bounds_deliveries_at_once,
a test with no delivery waiting in the pool: its 3-second linger window
was timing-bound under load (it now holds each DATA until the test has
counted); run again, P9 survived the old tests.
"""

from __future__ import annotations

import asyncio
import os
import threading
from types import SimpleNamespace

import pytest
from harness import wait_until
from relay_peers import Receiver, TinyDNS
from test_relay import FAST_RETRIES, queue_of, relay_to, send
from test_relay import FakeNextHop
from test_worker_events import built_connection

from prefork_smtpd.listeners import TLS_STARTTLS, ConnectionContext
from prefork_smtpd.queue import Wakeup
from prefork_smtpd.runner import BatchedRemovals, Connection, ConnectionPool, ReplyReader, Runner
from prefork_smtpd.worker import FAIR_READ, SMTPConnection


# ------------------------------------------------------------ the pool
def pool_of(per_destination: int, total: int, idle_time: float = 60, mails: int = 100):
    """A pool whose connections are fake, and the list of keys it opened connections to."""
    opened: list[tuple[str, int]] = []

    async def open_client(key):
        opened.append(key)
        transport = FakeNextHop()
        transport.reader = ReplyReader(transport)
        return Connection(key, transport.reader, pipelining=True, dsn=False)

    return ConnectionPool(open_client, per_destination, total, mails, idle_time), opened


A, B, C = ("192.0.2.1", 25), ("192.0.2.2", 25), ("192.0.2.3", 25)


def test_room_for_another_next_hop_is_made_by_closing_the_idle_connection_unused_longest():
    async def scenario() -> None:
        pool, _ = pool_of(per_destination=2, total=3)
        older, newer = await pool.acquire(A), await pool.acquire(A)
        pool.release(older, reusable=True)
        pool.release(newer, reusable=True)  # A: two idle, ``older`` unused longest
        await pool.acquire(B)  # three in all: nothing closed yet
        assert pool.destinations[A].idle == [older, newer]
        await pool.acquire(C)  # a fourth: one idle connection goes
        assert pool.destinations[A].idle == [newer]
        await asyncio.sleep(0.05)  # QUIT, its reply, the close
        assert older.reader.transport.closed and not newer.reader.transport.closed
        assert pool.count == 3

    asyncio.run(scenario())


def test_a_connection_taken_again_is_closed_idle_time_after_its_last_use_not_its_first():
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pool, opened = pool_of(per_destination=1, total=4, idle_time=1.0)
        conn = await pool.acquire(A)
        pool.release(conn, reusable=True)
        first_deadline = conn.idle_timer.when()
        assert await pool.acquire(A) is conn  # taken again before its idle time ran out
        await asyncio.sleep(0.3)
        pool.release(conn, reusable=True)  # unused from now: closed 1 s from now, not at first_deadline
        # Timers run in the order of their deadlines, however late the loop is:
        # this look comes after the first deadline and before the new one.
        seen = loop.create_future()

        def look() -> None:
            dest = pool.destinations.get(A)
            seen.set_result((dest is not None and conn in dest.idle, conn.reader.transport.closed))

        loop.call_at(first_deadline + 0.01, look)
        assert await seen == (True, False)
        assert await pool.acquire(A) is conn and opened == [A]
        pool.release(conn, reusable=False)

    asyncio.run(scenario())


def test_a_delivery_cancelled_as_its_turn_came_passes_the_turn_on():
    async def scenario() -> None:
        pool, opened = pool_of(per_destination=1, total=4)
        conn = await pool.acquire(A)
        first = asyncio.ensure_future(pool.acquire(A))
        second = asyncio.ensure_future(pool.acquire(A))
        await asyncio.sleep(0)  # both wait: A's one connection is busy
        pool.release(conn, reusable=True)  # the first waiter's turn...
        first.cancel()  # ... but it is cancelled (its mail is stopped) before it runs
        got = await asyncio.wait_for(second, 10)  # the second takes the turn instead of waiting for ever
        assert got is conn and first.cancelled() and opened == [A]

    asyncio.run(scenario())


def test_an_idle_connection_the_next_hop_closed_is_never_handed_out():
    async def scenario() -> None:
        pool, opened = pool_of(per_destination=1, total=4)
        conn = await pool.acquire(A)
        conn.mails = 1
        pool.release(conn, reusable=True)
        conn.reader.connection_lost(None)  # the next hop hung up while it was idle
        fresh = await pool.acquire(A)
        assert fresh is not conn and fresh.reader.alive and opened == [A, A]
        assert pool.count == 1 and pool.destinations[A].idle == []

    asyncio.run(scenario())


# ------------------------------------------------------- batched removals
class GatedQueue:
    """A queue whose removals wait at a gate, so several pile up behind one."""

    def __init__(self, fail: bool = False) -> None:
        self.gate = threading.Event()
        self.batches: list[list[str]] = []
        self.active = self.most_active = 0
        self.lock = threading.Lock()
        self.fail = fail

    def remove_many(self, queue_ids: list[str]) -> None:
        with self.lock:
            self.batches.append(list(queue_ids))
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            assert self.gate.wait(30)
            if self.fail:
                raise OSError(28, "No space left on device")
        finally:
            with self.lock:
                self.active -= 1


def test_mails_finishing_during_a_removal_go_together_in_the_next_one():
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        queue = GatedQueue()
        removals = BatchedRemovals(queue, loop)
        first = asyncio.ensure_future(removals.remove("m1"))
        while not queue.batches:  # m1's removal is under way in a thread
            await asyncio.sleep(0.01)
        later = [asyncio.ensure_future(removals.remove(q)) for q in ("m2", "m3")]
        await asyncio.sleep(0.1)  # they wait for m1's flush rather than start their own
        queue.gate.set()
        await asyncio.wait_for(asyncio.gather(first, *later), 30)
        assert queue.batches == [["m1"], ["m2", "m3"]]
        assert queue.most_active == 1  # one removal at a time: one directory flush serves a batch

    asyncio.run(scenario())


def test_a_failed_removal_fails_every_mail_of_its_batch():
    async def scenario() -> None:
        queue = GatedQueue(fail=True)
        queue.gate.set()
        removals = BatchedRemovals(queue, asyncio.get_running_loop())
        results = await asyncio.gather(removals.remove("m1"), removals.remove("m2"), return_exceptions=True)
        # Not "removed": the delivery keeps the mail and tries again, never counts it done.
        assert [type(r) for r in results] == [OSError, OSError]

    asyncio.run(scenario())


# ------------------------------------------------------- the wake-up pipe
def test_wake_ups_nobody_reads_never_block_nor_fail_a_worker_and_one_drain_reads_them_all():
    wakeup = Wakeup()
    failures: list[BaseException] = []

    def worker_wakes() -> None:
        try:
            for _ in range(70_000):  # more than a pipe holds (64 KiB)
                wakeup.wake()
        except BaseException as exc:  # noqa: BLE001: reported below
            failures.append(exc)

    try:
        thread = threading.Thread(target=worker_wakes, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "a worker blocked on a full wake-up pipe"
        assert failures == []
        wakeup.drain()
        with pytest.raises(BlockingIOError):  # empty: the drain took every byte
            os.read(wakeup.read_fd, 1)
    finally:
        os.close(wakeup.read_fd)
        os.close(wakeup.write_fd)


def test_the_runner_woken_empties_the_pipe_and_looks_for_new_mail():
    # A byte left in the pipe would wake the runner's loop again at once, and
    # again, a look at the queue directory at every turn for nothing.
    wakeup = Wakeup()
    try:
        for _ in range(3):
            wakeup.wake()
        runner = SimpleNamespace(new_mail=False, wake=asyncio.Event())
        Runner._woken(runner, wakeup)
        assert runner.new_mail and runner.wake.is_set()
        with pytest.raises(BlockingIOError):
            os.read(wakeup.read_fd, 1)
    finally:
        os.close(wakeup.read_fd)
        os.close(wakeup.write_fd)


def test_mail_with_a_local_recipient_too_wakes_the_runner_for_its_outside_one(start_server):
    """The periodic look is an hour away: the worker must wake the runner for
    a mail with any outside recipient, not only for one with no local one."""
    hop = start_server("--domain", "example.org", "--domain", "smtpd.com")
    server = start_server(*relay_to(hop.port, "--queue-scan-interval", "3600"))
    wait_until(lambda: "queue runner started" in server.log_text(), what="the runner's first look")
    assert send(server, ["bob@smtpd.com", "carol@example.org"]) == {}
    wait_until(lambda: hop.stored("carol"), what="the outside copy at the next hop", timeout=60)
    assert len(server.stored("bob")) == 1


# ------------------------------------------------ settling a transaction
def test_a_mail_to_two_domains_leaves_the_queue_only_once_both_are_sent(start_server):
    """Two outside domains, one transaction each (MX delivery, both MX hosts
    at one next hop): the first transaction, all its recipients sent, must
    not take the mail out of the queue before the second domain has it."""
    hop = Receiver()
    dns = TinyDNS({
        ("one.test", "MX"): ["10 mx.one.test."], ("mx.one.test", "A"): ["127.0.0.1"],
        ("two.test", "MX"): ["10 mx.two.test."], ("mx.two.test", "A"): ["127.0.0.1"],
    })
    try:
        server = start_server("--relay-networks", "127.0.0.0/8", "--relay-nameserver", f"127.0.0.1:{dns.port}",
                              "--relay-port", str(hop.port), *FAST_RETRIES)
        assert send(server, ["a@one.test", "b@two.test"]) == {}
        wait_until(lambda: not queue_of(server).ids(), what="the queue to empty", timeout=60)
        assert hop.handler.copies_for("a@one.test") == 1
        assert hop.handler.copies_for("b@two.test") == 1
        assert len(hop.handler.received) == 2  # one transaction per domain
        wait_until(lambda: server.log_count("removed from the queue, every recipient done") == 1, what="the log")
    finally:
        dns.close()
        hop.stop()


def test_a_success_notice_passed_on_leaves_the_mail_nothing_to_record(start_server):
    """NOTIFY=SUCCESS to a next hop that offers DSN: the next hop owes the
    notice, not us, so the mail sent whole leaves the queue at once (its
    unlinked file the record), with no progress line written first."""
    hop = start_server("--domain", "example.org", "--domain", "smtpd.com")
    server = start_server(*relay_to(hop.port))
    assert send(server, ["carol@example.org"], rcpt_options=["NOTIFY=SUCCESS"]) == {}
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty", timeout=60)
    assert len(hop.stored("carol")) == 1
    wait_until(lambda: server.log_count("sent via 127.0.0.1") == 1, what="the runner's log line")
    assert server.log_count("; removed from the queue, every recipient done") == 1  # in the same step
    assert not server.stored("alice")  # no relayed notice of ours


# ------------------------------------------------------- the fair read
class NoHandshake(SMTPConnection):
    """A connection whose STARTTLS hands the transport to nobody (no TLS here)."""

    async def _upgrade(self) -> None:
        pass


@pytest.fixture
def connection(tmp_path):
    conn, transport, next_turn, loop = built_connection(tmp_path, conn_class=NoHandshake)
    try:
        yield conn, transport, next_turn
    finally:
        loop.close()


def test_every_large_read_steps_aside_not_only_the_first(connection):
    conn, transport, next_turn = connection
    for turn in range(1, 4):
        conn.data_received(b"x" * (FAIR_READ - 2) + b"\r\n")
        assert transport.reading == ["pause", "resume"] * (turn - 1) + ["pause"]
        next_turn()
        assert transport.reading == ["pause", "resume"] * turn


def test_a_client_not_reading_its_replies_keeps_reading_stopped_after_the_step_aside(connection):
    # Stepped aside, then the replies back up (pause_writing): the loop's
    # next turn must not read again; the end of the back-up does.
    conn, transport, next_turn = connection
    conn.data_received(b"y" * (FAIR_READ - 2) + b"\r\n")
    assert transport.reading == ["pause"]
    conn.pause_writing()
    for _ in range(3):
        next_turn()
        assert transport.reading == ["pause"]
    conn.resume_writing()
    assert transport.reading == ["pause", "resume"]


def test_replies_backing_up_stop_reading_at_once(connection):
    conn, transport, _ = connection
    conn.pause_writing()  # no step aside under way: the transport itself must stop reading
    assert transport.reading == ["pause"]
    conn.resume_writing()
    assert transport.reading == ["pause", "resume"]


def test_a_large_read_with_starttls_inside_keeps_nothing_of_what_follows_it(tmp_path):
    # RFC 3207 5 (CVE-2011-0411): what follows STARTTLS in the same read was
    # sent in the clear; none of it may wait to be fed once TLS is up, not
    # even in a read large enough to make the connection step aside.
    conn, transport, next_turn, loop = built_connection(tmp_path, ConnectionContext(tls=TLS_STARTTLS), in_data=False, conn_class=NoHandshake)
    try:
        conn.data_received(b"EHLO c.example\r\nSTARTTLS\r\n" + b"RCPT TO:<evil@example.org>\r\n" * 4000)
        assert b"".join(transport.writes).endswith(b"220 2.0.0 Ready to start TLS\r\n")
        assert conn.upgrading and not conn.held
        next_turn()
        assert not conn.held
    finally:
        loop.close()


# ------------------------------------------------- an idle session's objects
def idle_after(said: bytes, stored: bool = False):
    from prefork_smtpd.session import Limits, Session

    session = Session("mx.test", frozenset({"smtpd.com"}), Limits(), lambda key: 0)
    session.greeting()
    if said:
        session.feed(said)
    if stored:  # the worker's way with a message: take what was pipelined behind it, store, answer
        session.take_unread()
        assert session.message_stored("q1")[0].startswith(b"250 ")
    return session


@pytest.mark.parametrize("said, stored", [
    (b"", False),
    (b"EHLO c.example\r\n", False),
    (b"EHLO c.example\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nRSET\r\n", False),
    (b"EHLO c.example\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nDATA\r\nhi\r\n.\r\n", True),
    (b"EHLO c.example\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nDATA\r\nhi\r\n.\r\nNOOP\r\n", True),
])
def test_an_idle_session_holds_no_container_of_its_own(said, stored):
    """Between commands a session keeps shared empty values for its input,
    output and message pieces, and not the replies it last gave: 20,000
    idle sessions, 20,000 lists and bytearrays fewer (the byte budget of
    test_resources leaves room for a few)."""
    import gc

    session = idle_after(said, stored)
    own = [(type(o).__name__, o) for o in gc.get_referents(session) if type(o) in (list, bytearray, dict, set)]
    assert own == []


# ------------------------------------------------------------ the DATA scan
@pytest.mark.parametrize("cut", [None, 5, 6])
def test_a_bare_lf_opening_a_read_is_judged_even_when_an_endless_line_follows(cut):
    # A read that opens with a bare LF, then a line longer than the limit
    # with no end yet: the LF is a line of its own, judged now, and the worst
    # reason (the bare line ending) is the reply, however the reads are cut.
    from sansio import Wired

    from prefork_smtpd import replies
    from prefork_smtpd.session import Limits, Session

    s = Wired(Session("mx.test", frozenset({"smtpd.com"}), Limits(), lambda key: 0))
    s.feed(b"EHLO c.example\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nDATA\r\n")
    body = b"abc\r\n\n" + b"x" * 1200
    pieces = [body] if cut is None else [body[:cut], body[cut:]]
    for piece in pieces:
        assert s.feed(piece) == b""
    assert s.feed(b"\r\n.\r\n") == replies.BARE_LINE_END_IN_DATA


def test_input_fed_while_the_message_is_stored_is_answered_after_the_verdict():
    # The read ended exactly at the final dot: nothing is left in the session's
    # input, which is then the shared empty value. What comes while the store
    # works is kept in a buffer of its own and answered after the 250.
    from sansio import Wired

    from prefork_smtpd.session import Limits, Session, State

    s = Wired(Session("mx.test", frozenset({"smtpd.com"}), Limits(), lambda key: 0))
    s.feed(b"EHLO c.example\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nDATA\r\nhi\r\n.\r\n")
    assert s.state is State.WAITING
    assert s.feed(b"NOOP\r\n") == b"" and s.feed(b"RSET\r\n") == b""
    out = s.session.message_stored("q1")
    assert [r[:4] for r in out] == [b"250 ", b"250 ", b"250 "] and b"q1" in out[0]
    assert s.state is State.READY


# ------------------------------------------------------------ SMTPUTF8 terms
def test_the_null_sender_is_no_obstacle_to_a_next_hop_without_smtputf8():
    # A notice or bounce (MAIL FROM:<>) with UTF-8 headers, to an ASCII
    # address: "" has no local part to downgrade, so it goes as 8BITMIME.
    from test_relay_smtputf8 import UTF8_HEADERS, _mail

    from prefork_smtpd.runner import _a_label_form, smtputf8_terms

    assert _a_label_form("") == ""
    assert smtputf8_terms(_mail("", "b@y.org"), UTF8_HEADERS, [0], False, True) == ([0], [], ["BODY=8BITMIME"])
