"""A session driven as the worker drives it, for tests that speak in wire bytes.

``Wired(session)`` feeds bytes and returns the bytes a worker would write
for the events that came back: the replies in order, a Close's last
words. It keeps what else the worker keeps: the log lines (``log``), the
4xx/5xx replies counted as refusals, the AUTH exchanges counted
(``auth_counted``, from AuthAborted), the envelope of a Deliver as
``pending`` until its verdict, and any other Wait (StartTLS,
CheckCredentials) as ``waiting_for`` until ``resume``. Everything else (``state``, ``errors``,
``refuse_message``...) is the session's own.

It also checks the rules of the events on every call: only Reply and
Event objects, nothing after a Close or a Wait, a Close exactly when the
session closes, a Deliver exactly when it waits for the store.
"""

from __future__ import annotations

from prefork_smtpd.events import AuthAborted, Close, Deliver, Event, LogEvent, Reply, Wait
from prefork_smtpd.session import Session, State

_OWN = frozenset({"session", "log", "pending", "waiting_for", "replies_4xx", "replies_5xx", "auth_counted"})


class Wired:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.log: list[str] = []
        self.pending = None
        self.waiting_for = None
        self.replies_4xx = 0
        self.replies_5xx = 0
        self.auth_counted: list[tuple[str, str]] = []  # (mechanism, result)

    def __getattr__(self, name):
        return getattr(self.session, name)

    def __setattr__(self, name, value):
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.session, name, value)  # e.g. admit_message

    @property
    def closing(self) -> bool:
        return self.session.state is State.CLOSED

    def feed(self, data: bytes) -> bytes:
        return self._carry_out(lambda: self.session.feed(data))

    def message_stored(self, queue_id: str) -> bytes:
        self.pending = None
        return self._carry_out(lambda: self.session.message_stored(queue_id))

    def message_failed(self, reply: Reply) -> bytes:
        self.pending = None
        return self._carry_out(lambda: self.session.message_failed(reply))

    def resume(self, verdict) -> bytes:
        self.waiting_for = None
        return self._carry_out(lambda: self.session.resume(verdict))

    def _carry_out(self, call) -> bytes:
        was_open = self.session.state is not State.CLOSED
        events = call()
        out = []
        closed = False
        for event in events:
            assert isinstance(event, (Reply, Event)), event
            assert not closed and self.pending is None and self.waiting_for is None, f"{event!r} follows a Close or a Wait"
            if type(event) is Reply:
                out.append(event)
                if event.code // 100 == 4:
                    self.replies_4xx += 1
                elif event.code // 100 == 5:
                    self.replies_5xx += 1
            elif type(event) is LogEvent:
                self.log.append(event.text)
            elif type(event) is AuthAborted:
                self.auth_counted.append((event.mechanism, event.result))
            elif type(event) is Close:
                out.append(event.reply)
                closed = True
            elif type(event) is Deliver:
                self.pending = event.envelope
            elif isinstance(event, Wait):
                self.waiting_for = event
            else:
                raise AssertionError(f"unknown event {event!r}")
        assert closed == (was_open and self.session.state is State.CLOSED), (events, self.session.state)
        if self.pending is not None:
            assert self.session.state is State.WAITING and self.session.awaiting.envelope is self.pending
        elif self.waiting_for is not None:
            assert self.session.state is State.WAITING and self.session.awaiting is self.waiting_for
        else:
            assert self.session.state is not State.WAITING
        return b"".join(out)
