"""Which verb may run in which state: the tables, checked both ways.

``EXPECTED_503`` below is RFC 5321's order of commands (sections 3.3 and
4.1.4), written out independently of the session's tables: a wrong entry
in ``ALLOWED`` or ``SEQUENCE_ERRORS``, in either direction, fails here, and
so does a session that does not do what its tables say.
"""

from __future__ import annotations

import itertools

import pytest
from sansio import Wired

from prefork_smtpd.listeners import TLS_STARTTLS, ConnectionContext
from prefork_smtpd.session import CHUNK_SEQUENCE_ERRORS, COMMANDS, SEQUENCE_ERRORS, Limits, Session, State

COMMAND_STATES = [State.CONNECTED, State.READY, State.MAIL, State.RCPT, State.CHUNKS]
# The session's verb/state table, as its command registry holds it.
ALLOWED = {verb: command.states for verb, command in COMMANDS.items()}
NOT_IMPLEMENTED = {verb for verb, command in COMMANDS.items() if command.handler is None}

# Every verb is allowed in every command state but these, which get 503 5.5.1.
EXPECTED_503 = {
    ("MAIL", State.CONNECTED): "send HELO/EHLO first",
    ("MAIL", State.MAIL): "nested MAIL command",
    ("MAIL", State.RCPT): "nested MAIL command",
    ("RCPT", State.CONNECTED): "send HELO/EHLO first",
    ("RCPT", State.READY): "need MAIL command",
    ("DATA", State.CONNECTED): "send HELO/EHLO first",
    ("DATA", State.READY): "need MAIL command",
    ("DATA", State.MAIL): "need RCPT command",
    # RFC 3207 4 and RFC 4954 4: after EHLO, never inside a transaction.
    ("STARTTLS", State.CONNECTED): "send HELO/EHLO first",
    ("STARTTLS", State.MAIL): "MAIL transaction in progress",
    ("STARTTLS", State.RCPT): "MAIL transaction in progress",
    ("AUTH", State.CONNECTED): "send HELO/EHLO first",
    ("AUTH", State.MAIL): "AUTH not allowed during a mail transaction",
    ("AUTH", State.RCPT): "AUTH not allowed during a mail transaction",
    # RFC 3030 2: between BDAT chunks the transaction is under way, and
    # DATA may not follow BDAT in it.
    ("MAIL", State.CHUNKS): "nested MAIL command",
    ("RCPT", State.CHUNKS): "BDAT transfer in progress",
    ("DATA", State.CHUNKS): "DATA after BDAT in one transaction",
    ("STARTTLS", State.CHUNKS): "MAIL transaction in progress",
    ("AUTH", State.CHUNKS): "AUTH not allowed during a mail transaction",
}
# BDAT runs in every state (its chunk must be read, RFC 3030 2), and its
# chunk gets these 503s once read.
EXPECTED_CHUNK_503 = {
    State.CONNECTED: "send HELO/EHLO first",
    State.READY: "need MAIL command",
    State.MAIL: "need RCPT command",
}
KNOWN_VERBS = {
    "EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "HELP", "VRFY", "XSTAT",
    "EXPN", "TURN", "ETRN", "SEND", "SOML", "SAML", "BDAT", "AUTH", "STARTTLS",
}
# An argument that is right for each verb, so that only the state decides.
GOOD_ARGUMENT = {
    "EHLO": " client.example", "HELO": " client.example", "MAIL": " FROM:<a@smtpd.com>", "RCPT": " TO:<b@smtpd.com>",
    "VRFY": " b", "XSTAT": " TOTAL", "AUTH": " PLAIN", "BDAT": " 0",
}
ON_THE_WAY_TO = {
    State.CONNECTED: b"",
    State.READY: b"EHLO client.example\r\n",
    State.MAIL: b"EHLO client.example\r\nMAIL FROM:<a@smtpd.com>\r\n",
    State.RCPT: b"EHLO client.example\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\n",
    State.CHUNKS: b"EHLO client.example\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nBDAT 4\r\nhi\r\n",
}


def session_in(state: State) -> Wired:
    # With TLS and AUTH offered, so that every verb the server has runs.
    s = Wired(Session(
        "mx.test", frozenset({"smtpd.com"}), Limits(), lambda key: 0,
        context=ConnectionContext(tls=TLS_STARTTLS), auth=True, auth_without_tls=True,
    ))
    s.feed(ON_THE_WAY_TO[state])
    assert s.state is state
    return s


def test_the_tables_follow_rfc_5321():
    assert set(ALLOWED) == KNOWN_VERBS
    for verb, state in itertools.product(sorted(KNOWN_VERBS), COMMAND_STATES):
        refused = (verb, state) in EXPECTED_503
        assert (state not in ALLOWED[verb]) == refused, (verb, state)
        assert ((verb, state) in SEQUENCE_ERRORS) == refused, (verb, state)
    for key, text in EXPECTED_503.items():
        assert SEQUENCE_ERRORS[key] == f"503 5.5.1 Error: {text}\r\n".encode(), key
    assert all(allowed <= set(COMMAND_STATES) for allowed in ALLOWED.values())
    assert ALLOWED["BDAT"] == set(COMMAND_STATES)
    assert {state: reply for state, reply in CHUNK_SEQUENCE_ERRORS.items()} == {
        state: f"503 5.5.1 Error: {text}\r\n".encode() for state, text in EXPECTED_CHUNK_503.items()
    }


@pytest.mark.parametrize("verb", sorted(ALLOWED))
@pytest.mark.parametrize("state", COMMAND_STATES, ids=lambda s: s.value)
def test_the_session_does_what_its_tables_say(verb, state):
    s = session_in(state)
    reply = s.feed(f"{verb}{GOOD_ARGUMENT.get(verb, '')}\r\n".encode())
    if verb == "BDAT" and state in EXPECTED_CHUNK_503:
        assert reply == CHUNK_SEQUENCE_ERRORS[state]
        assert s.state is state  # the chunk was read, the state is as it was
    elif state in ALLOWED[verb]:
        assert not reply.startswith(b"503"), reply
        if verb in NOT_IMPLEMENTED:
            assert reply.startswith(b"502 5.5.1"), reply
        else:
            assert reply[:1] in (b"2", b"3"), reply  # a right command in an allowed state succeeds
    else:
        assert reply == SEQUENCE_ERRORS[(verb, state)]
        assert s.state is state  # a refused command changes nothing


def test_mail_after_rcpt_is_nested_and_never_restarts_the_transaction():
    s = session_in(State.RCPT)
    assert s.feed(b"MAIL FROM:<other@smtpd.com>\r\n") == b"503 5.5.1 Error: nested MAIL command\r\n"
    assert s.feed(b"RCPT TO:<c@smtpd.com>\r\nDATA\r\nhi\r\n.\r\n").startswith(b"250 2.1.5")
    assert s.pending.sender == "a@smtpd.com"
    assert [r.folder for r in s.pending.recipients] == ["b", "c"]


def test_mail_after_mail_is_nested_too():
    s = session_in(State.MAIL)
    assert s.feed(b"MAIL FROM:<other@smtpd.com>\r\n") == b"503 5.5.1 Error: nested MAIL command\r\n"
    assert s.state is State.MAIL and s._envelope.sender == "a@smtpd.com"


def test_rset_before_helo_does_not_skip_the_greeting():
    s = session_in(State.CONNECTED)
    assert s.feed(b"RSET\r\n") == b"250 2.0.0 Ok\r\n"
    assert s.state is State.CONNECTED
    assert s.feed(b"MAIL FROM:<a@smtpd.com>\r\n") == b"503 5.5.1 Error: send HELO/EHLO first\r\n"


def test_rset_and_helo_end_a_transaction():
    for reset in (b"RSET\r\n", b"EHLO client.example\r\n", b"HELO client.example\r\n"):
        s = session_in(State.RCPT)
        assert s.feed(reset)[:1] == b"2"
        assert s.state is State.READY
        assert s.feed(b"DATA\r\n") == b"503 5.5.1 Error: need MAIL command\r\n"


def test_no_command_is_read_in_data_delivering_or_closed():
    s = session_in(State.RCPT)
    s.feed(b"DATA\r\n")
    assert s.feed(b"QUIT\r\nMAIL FROM:<x@smtpd.com>\r\n") == b""  # message content, not commands
    assert s.state is State.DATA
    s.feed(b".\r\n")
    assert s.state is State.WAITING
    assert s.feed(b"NOOP\r\n") == b""  # held until the message is stored
    assert s.message_stored("Q") == b"250 2.0.0 Ok: queued as Q\r\n250 2.0.0 Ok\r\n"
    assert s.pending is None
    s.feed(b"QUIT\r\n")
    assert s.state is State.CLOSED and s.feed(b"NOOP\r\n") == b""
