"""The worker's loop over the session's events: one write, counts, close."""

from __future__ import annotations

import asyncio
import urllib.request
from types import SimpleNamespace

import pytest
from harness import free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

from prefork_smtpd import replies
from prefork_smtpd.events import Close, LogEvent
from prefork_smtpd.listeners import SMTP_CONTEXT
from prefork_smtpd.session import Limits, Session
from prefork_smtpd.settings import Settings
from prefork_smtpd.stats import CONTROL, FIELD, SharedStats
from prefork_smtpd.worker import COMMAND_SLICE, FAIR_READ, WRITE_HIGH, SMTPConnection, Worker


class Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.added: dict[int, int] = {}
        self.lines: list[str] = []

    # transport
    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    # worker and its slot
    def add(self, field: int, n: int = 1) -> None:
        self.added[field] = self.added.get(field, 0) + n

    def log(self, line: str) -> None:
        self.lines.append(line)


def act_on(data: bytes, max_errors: int = 20) -> Recorder:
    """Feed a session and carry out its events with the worker's own loop."""
    rec = Recorder()
    session = Session("mx.test", frozenset({"smtpd.com"}), Limits(max_errors=max_errors), lambda key: 0)
    worker = SimpleNamespace(slot=rec, log=rec.log, closing_idle=False)
    conn = SimpleNamespace(session=session, transport=rec, worker=worker, peer="[192.0.2.1]:25")
    SMTPConnection._act(conn, session.feed(data))
    return rec


def test_replies_to_pipelined_commands_leave_in_one_write():
    rec = act_on(b"EHLO c.example\r\n" + b"NOOP\r\nRCPT TO:<b>\r\nVRFY\r\n" * 100, max_errors=1000)
    assert len(rec.writes) == 1
    assert rec.writes[0].count(b"\r\n250 2.0.0 Ok\r\n503 5.5.1 ") == 100
    assert rec.added == {FIELD["replies_4xx"]: 0, FIELD["replies_5xx"]: 200}
    assert not rec.closed
    assert rec.lines[0] == "[192.0.2.1]:25 EHLO c.example"
    assert len(rec.lines) == 201  # EHLO and every refusal


def test_a_close_writes_its_last_words_with_the_replies_before_it_and_closes():
    rec = act_on(b"NOOP\r\nQUIT\r\n")
    assert rec.writes == [replies.OK + replies.bye("mx.test")] and rec.closed
    assert rec.added == {}  # nothing refused


def test_the_421_of_too_many_errors_is_a_notice_not_a_refusal():
    rec = act_on(b"FROB\r\nFROB\r\n", max_errors=2)
    assert rec.writes == [replies.UNKNOWN_COMMAND * 2 + replies.too_many_errors("mx.test")] and rec.closed
    assert rec.added == {FIELD["replies_4xx"]: 0, FIELD["replies_5xx"]: 2}


def test_an_event_the_worker_does_not_know_is_an_error_not_silence():
    rec = Recorder()
    conn = SimpleNamespace(
        session=SimpleNamespace(state=None),
        transport=rec,
        peer="p",
        worker=SimpleNamespace(slot=rec, log=rec.log, closing_idle=False),
    )
    with pytest.raises(TypeError):
        SMTPConnection._act(conn, [LogEvent("x"), object()])
    SMTPConnection._act(conn, [Close(b"")])
    assert rec.closed


def rejected(port: int, cls: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "smtpd_rejected_replies_total" and sample.labels == {"class": cls}:
                return sample.value
    raise AssertionError("no smtpd_rejected_replies_total")


def test_a_server_counts_refusals_from_replies_but_not_closing_notices(start_server):
    mport = free_port()
    server = start_server("--metrics-port", str(mport), "--max-errors", "2", workers=1)
    c = server.client()
    c.cmd("EHLO x")
    assert c.cmd("MAIL FROM:<a@elsewhere.org>")[0] == 550
    assert c.cmd("BOGUS")[0] == 500
    assert c.reply()[0] == 421  # too many errors: the session ends
    assert c.closed_by_server()
    wait_until(lambda: rejected(mport, "5xx") == 2, what="two 5xx counted")
    assert rejected(mport, "4xx") == 0


def test_a_refusal_that_comes_alone_is_counted_too():
    # The store's 451 comes back from the session as the only event (the
    # worker logs the failure itself): a lone reply, counted all the same.
    rec = Recorder()
    session = Session("mx.test", frozenset({"smtpd.com"}), Limits(), lambda key: 0)
    worker = SimpleNamespace(slot=rec, log=rec.log, closing_idle=False)
    conn = SimpleNamespace(session=session, transport=rec, worker=worker, peer="[192.0.2.1]:25")
    session.feed(b"EHLO c.example\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b>\r\nDATA\r\nhello\r\n.\r\n")
    events = session.message_failed(replies.LOCAL_ERROR)
    assert events == [replies.LOCAL_ERROR]
    SMTPConnection._act(conn, events)
    assert rec.writes == [replies.LOCAL_ERROR]
    assert rec.added == {FIELD["replies_4xx"]: 1, FIELD["replies_5xx"]: 0}


def local_worker(tmp_path) -> Worker:
    """A worker built in this process: no fork, no listener, no loop yet."""
    settings = Settings(mail_dir=str(tmp_path), log_file=str(tmp_path / "log.txt"))
    stats = SharedStats()
    for name in CONTROL:
        stats.set(name, getattr(settings, name))
    return Worker(1, [], settings, stats)


class SliceCountingTransport(asyncio.Transport):
    """A peer at 192.0.2.1 whose every write is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def get_extra_info(self, name, default=None):
        return ("192.0.2.1", 4711) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("size", [COMMAND_SLICE - 6, COMMAND_SLICE, COMMAND_SLICE + 6, 8 * COMMAND_SLICE])
def test_a_read_of_pipelined_commands_is_answered_a_slice_at_a_time(tmp_path, size):
    # A reply can be 50 times its command (HELP): a read goes to the session
    # in slices of COMMAND_SLICE octets, the replies to each written before
    # the next is read; a read that fits in one slice goes whole.
    conn = SMTPConnection(local_worker(tmp_path), SMTP_CONTEXT)
    transport = SliceCountingTransport()
    conn.connection_made(transport)
    conn.data_received(b"EHLO c.example\r\n")
    del transport.writes[:]
    commands = b"HELP\r\n" * (size // 6)
    conn.data_received(commands)
    assert b"".join(transport.writes).count(b"214 2.0.0 End of HELP\r\n") == size // 6
    assert len(transport.writes) == -(-size // COMMAND_SLICE)  # one write per slice


class PauseRecordingTransport(SliceCountingTransport):
    """Keeps the order of pause_reading / resume_reading calls."""

    def __init__(self) -> None:
        super().__init__()
        self.reading: list[str] = []

    def pause_reading(self) -> None:
        self.reading.append("pause")

    def resume_reading(self) -> None:
        self.reading.append("resume")


def built_connection(tmp_path, context=SMTP_CONTEXT, in_data=True, conn_class=SMTPConnection):
    """A worker's connection, built in this process, its transport recording
    pauses and resumes; and a function that runs one turn of its loop."""
    worker = local_worker(tmp_path)
    loop = asyncio.new_event_loop()
    worker.loop = loop
    conn = conn_class(worker, context)
    transport = PauseRecordingTransport()
    conn.connection_made(transport)
    if in_data:
        conn.data_received(b"EHLO c.example\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nDATA\r\n")

    def next_turn() -> None:
        loop.call_soon(loop.stop)
        loop.run_forever()

    return conn, transport, next_turn, loop


def test_a_large_read_steps_aside_until_the_loops_next_turn(tmp_path):
    # The event loop reads one socket up to 32 times in a row while reads fill
    # its buffer: one upload would keep every other connection of the worker
    # (a NOOP, a greeting) waiting for hundreds of ms. A read of FAIR_READ
    # octets or more stops reading until the loop's next turn.
    conn, transport, next_turn, loop = built_connection(tmp_path)
    try:
        conn.data_received(b"x" * (FAIR_READ - 2) + b"\r\n")
        assert transport.reading == ["pause"]  # not another read before the others' turn
        next_turn()
        assert transport.reading == ["pause", "resume"]
        conn.data_received(b"small\r\n")  # a small read leaves reading on
        assert transport.reading == ["pause", "resume"]
    finally:
        loop.close()


class NeverReadingPeer(PauseRecordingTransport):
    """A client that reads nothing: the worker is told to stop writing once
    ``high`` octets of replies wait, as uvloop tells it (pause_writing)."""

    def __init__(self, high: int) -> None:
        super().__init__()
        self.high = high
        self.waiting = 0
        self.protocol: SMTPConnection | None = None

    def write(self, data) -> None:
        super().write(data)
        self.waiting += len(data)
        if self.waiting > self.high and self.protocol is not None and not self.protocol.write_paused:
            self.protocol.pause_writing()


def test_replies_to_chunk_lines_pipelined_in_one_read_stop_at_the_write_limit(tmp_path):
    # One-octet BDAT chunks earn a 34-octet reply for 9 octets sent. Once a
    # chunk's octet lay past the end of a command slice, the rest of the
    # read went to the session whole and every chunk line in it was answered
    # at once: 242 KB of replies for a 64 KiB piece, to a client that reads
    # none. The chunk lines go in command slices now, and the worker stops
    # at the write limit as it does for other commands.
    worker = local_worker(tmp_path)
    loop = asyncio.new_event_loop()
    worker.loop = loop
    try:
        conn = SMTPConnection(worker, SMTP_CONTEXT)
        high = WRITE_HIGH
        transport = NeverReadingPeer(high)
        conn.connection_made(transport)
        transport.protocol = conn
        conn.data_received(b"EHLO c.example\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\n")
        transport.waiting = 0
        conn.data_received(b"BDAT 1\r\nx" * (256 * 1024 // 9))
        assert conn.write_paused and conn.reading_paused
        one_slice = -(-COMMAND_SLICE // 9) * len(b"250 2.0.0 Ok: 1 octets received\r\n")  # at most, per slice
        # The limit, and what the slices around the crossing added (a slice
        # that ends inside a chunk's octets is followed by one that starts
        # with them): 69 KB at most, against 447 KB when the rest of the
        # piece went whole.
        assert transport.waiting <= high + 2 * one_slice, transport.waiting
    finally:
        loop.close()
