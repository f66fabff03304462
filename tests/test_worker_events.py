"""The worker's loop over the session's events: one write, counts, close."""

from __future__ import annotations

import urllib.request
from types import SimpleNamespace

import pytest
from harness import free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

from prefork_smtpd import replies
from prefork_smtpd.events import Close, LogEvent
from prefork_smtpd.session import Limits, Session
from prefork_smtpd.stats import FIELD
from prefork_smtpd.worker import SMTPConnection


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
