"""The command registry: one entry per verb drives dispatch, 501, HELP and EHLO.

The last tests add a verb that waits for an outside step (as STARTTLS does) the way a real one will be added
(a Session subclass here, so the server's own table stays as it is): its
handler, its states, its EHLO keyword and a condition for when it is
offered, and a Wait event of its own resumed by its own verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from prefork_smtpd import replies
from prefork_smtpd.commands import CommandTable
from prefork_smtpd.events import LogEvent, Reply, Verdict, Wait
from prefork_smtpd.session import COMMAND_STATES, COMMANDS, Limits, Session, State

HELP = (
    b"214-2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY XSTAT BDAT\r\n"
    b"214-2.0.0 MAIL FROM:<user@domain> [SIZE=n] [BODY=7BIT|8BITMIME|BINARYMIME] [SMTPUTF8] [RET=FULL|HDRS] [ENVID=xtext] [AUTH=xtext]\r\n"
    b"214-2.0.0 RCPT TO:<user@domain> or RCPT TO:<user>\r\n"
    b"214-2.0.0 VRFY always answers 252: mailboxes are not disclosed\r\n"
    b"214-2.0.0 XSTAT TOTAL|CURRENT|BYTES|MAILS|PROXIED|QUEUE|QUEUEAGE|TLS: server-wide counters\r\n"
    b"214-2.0.0 BDAT size [LAST]: message data in chunks of size octets (RFC 3030)\r\n"
    b"214 2.0.0 End of HELP\r\n"
)


def new(cls=Session, **limits) -> Session:
    return cls("mx.test", frozenset({"smtpd.com"}), Limits(**limits), lambda key: 0)


def replies_to(s: Session, data: bytes) -> bytes:
    return b"".join(e for e in s.feed(data) if type(e) is Reply)


def test_help_and_ehlo_are_read_from_the_registry():
    s = new(max_message_size=4096)
    assert replies_to(s, b"HELP\r\n") == HELP
    assert replies_to(s, b"EHLO c.example\r\n") == (
        b"250-mx.test Hello c.example\r\n250-PIPELINING\r\n250-SIZE 4096\r\n250-8BITMIME\r\n"
        b"250-BINARYMIME\r\n250-CHUNKING\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250 HELP\r\n"
    )


@pytest.mark.parametrize("verb", [v for v, c in COMMANDS.items() if c.handler is not None and c.syntax])
def test_each_verbs_501_names_its_registered_syntax(verb):
    assert COMMANDS[verb].usage() == f"501 5.5.4 Syntax: {COMMANDS[verb].syntax}\r\n".encode()


def test_mail_names_its_parameters_when_one_is_bad():
    s = new()
    s.feed(b"EHLO c\r\n")
    assert replies_to(s, b"MAIL FROM:<a@smtpd.com> =x\r\n") == (
        b"501 5.5.4 Syntax: MAIL FROM:<user@domain> [SIZE=n] [BODY=7BIT|8BITMIME|BINARYMIME] [SMTPUTF8] [RET=FULL|HDRS] [ENVID=xtext] [AUTH=xtext]\r\n"
    )


def test_a_handler_is_named_after_its_verb_and_registered_once():
    table = CommandTable()

    def smtp_PING(session, arg):
        return replies.OK

    table.verb(states=COMMAND_STATES)(smtp_PING)
    assert table["PING"].handler is smtp_PING and "PING" in table
    with pytest.raises(ValueError):
        table.verb(states=COMMAND_STATES)(smtp_PING)  # a second handler for PING
    with pytest.raises(ValueError):
        table.verb(states=COMMAND_STATES)(lambda session, arg: None)  # no verb in the name
    table.not_implemented("PONG", states=COMMAND_STATES)

    def smtp_PONG(session, arg):
        return replies.OK

    table.verb(states=COMMAND_STATES)(smtp_PONG)
    assert table["PONG"].handler is smtp_PONG  # a not-implemented verb may get its handler later
    assert list(table) == ["PING", "PONG"]


# --------------------------------------- a new verb that waits, added as STARTTLS was
@dataclass(frozen=True, slots=True)
class HandshakeDone(Verdict):
    ok: bool


@dataclass(frozen=True, slots=True)
class Handshake(Wait):
    """A stand-in for the StartTLS event."""

    verdicts: ClassVar[tuple[type[Verdict], ...]] = (HandshakeDone,)


class TLSSession(Session):
    commands = COMMANDS.copy()
    tls_configured = False
    tls_active = False

    @commands.verb(
        states=COMMAND_STATES,
        syntax="XWAIT",
        help="XWAIT: encrypt the session",
        ehlo="XWAIT",
        enabled=lambda s: s.tls_configured and not s.tls_active,
    )
    def smtp_XWAIT(self, arg: str) -> Reply | None:
        if arg:
            return self._syntax_error("XWAIT")
        self._out.append(Reply(b"220 2.0.0 Ready to start TLS\r\n"))
        self._wait(Handshake(), self._handshake_done)
        return None

    def _handshake_done(self, verdict: HandshakeDone) -> Reply | None:
        self.tls_active = verdict.ok
        self.state = State.CONNECTED  # RFC 3207 4.2: forget all that came before
        self.helo = ""
        return None


def test_a_verb_not_enabled_is_not_implemented_not_advertised_not_in_help():
    s = new(TLSSession)
    assert b"XWAIT" not in replies_to(s, b"EHLO c\r\n")
    assert replies_to(s, b"HELP\r\n") == HELP
    assert replies_to(s, b"XWAIT\r\n") == replies.NOT_IMPLEMENTED


def test_an_enabled_verb_is_advertised_listed_and_answered_and_can_wait():
    s = new(TLSSession)
    s.tls_configured = True
    assert replies_to(s, b"EHLO c\r\n").endswith(b"250-HELP\r\n250 XWAIT\r\n")
    assert replies_to(s, b"HELP\r\n") == (
        b"214-2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY XSTAT BDAT XWAIT\r\n"
        b"214-2.0.0 MAIL FROM:<user@domain> [SIZE=n] [BODY=7BIT|8BITMIME|BINARYMIME] [SMTPUTF8] [RET=FULL|HDRS] [ENVID=xtext] [AUTH=xtext]\r\n"
        b"214-2.0.0 RCPT TO:<user@domain> or RCPT TO:<user>\r\n"
        b"214-2.0.0 VRFY always answers 252: mailboxes are not disclosed\r\n"
        b"214-2.0.0 XSTAT TOTAL|CURRENT|BYTES|MAILS|PROXIED|QUEUE|QUEUEAGE|TLS: server-wide counters\r\n"
        b"214-2.0.0 BDAT size [LAST]: message data in chunks of size octets (RFC 3030)\r\n"
        b"214-2.0.0 XWAIT: encrypt the session\r\n"
        b"214 2.0.0 End of HELP\r\n"
    )
    assert s.feed(b"XWAIT now\r\n") == [
        LogEvent('refused "XWAIT now": 501 5.5.4 Syntax: XWAIT'),
        Reply(b"501 5.5.4 Syntax: XWAIT\r\n"),
    ]
    events = s.feed(b"XWAIT\r\n")
    assert events == [Reply(b"220 2.0.0 Ready to start TLS\r\n"), Handshake()]
    assert s.state is State.WAITING and s.awaiting is events[1]
    assert s.resume(HandshakeDone(True)) == []
    assert s.state is State.CONNECTED and s.tls_active
    assert b"XWAIT" not in replies_to(s, b"EHLO c\r\n")  # offered no more once active
    assert replies_to(s, b"XWAIT\r\n") == replies.NOT_IMPLEMENTED


def test_a_subclass_table_leaves_the_servers_own_as_it_was():
    assert "XWAIT" not in COMMANDS
    assert TLSSession.commands["XWAIT"].handler is TLSSession.smtp_XWAIT
    assert replies_to(new(), b"XWAIT\r\n") == replies.UNKNOWN_COMMAND
