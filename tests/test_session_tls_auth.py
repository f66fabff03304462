"""STARTTLS and AUTH in the sans-IO session: the events, the verdicts, the rules."""

from __future__ import annotations

import base64

import pytest
from sansio import Wired

from prefork_smtpd.events import (
    Authenticated,
    AuthFailed,
    AuthUnavailable,
    CheckCredentials,
    StartTLS,
    TLSStarted,
)
from prefork_smtpd.listeners import SUBMISSION, TLS_IMPLICIT, TLS_STARTTLS, ConnectionContext
from prefork_smtpd.session import Limits, Session, State
from prefork_smtpd.tls import TLSSessionInfo

TLS13 = TLSSessionInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)
STARTTLS_PORT = ConnectionContext(tls=TLS_STARTTLS)
SUBMISSION_PORT = ConnectionContext("submission", SUBMISSION, TLS_STARTTLS, require_auth=True, require_tls=True)


def new(context=STARTTLS_PORT, **kw) -> Wired:
    return Wired(Session("mx.test", frozenset({"smtpd.com"}), Limits(), lambda key: 0, context=context, **kw))


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def upgraded(context=STARTTLS_PORT, **kw) -> Wired:
    s = new(context, **kw)
    s.feed(b"EHLO c.example\r\nSTARTTLS\r\n")
    s.resume(TLSStarted(TLS13))
    s.feed(b"EHLO c.example\r\n")
    return s


# ------------------------------------------------------------ STARTTLS
def test_starttls_is_advertised_answers_220_and_waits_for_the_handshake():
    s = new()
    assert b"250-STARTTLS\r\n" in s.feed(b"EHLO c.example\r\n")
    assert s.feed(b"STARTTLS\r\n") == b"220 2.0.0 Ready to start TLS\r\n"
    assert isinstance(s.waiting_for, StartTLS) and s.state is State.WAITING


def test_plaintext_pipelined_behind_starttls_is_dropped():
    """CVE-2011-0411: commands injected in the clear must not run after TLS."""
    s = new()
    s.feed(b"EHLO c.example\r\n")
    assert s.feed(b"STARTTLS\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\n") == (
        b"220 2.0.0 Ready to start TLS\r\n"
    )
    assert s.feed(b"DATA\r\n") == b""  # a later read, still before the handshake: dropped too
    assert s.take_unread() == b""
    assert s.resume(TLSStarted(TLS13)) == b""
    # Nothing of it ran: no transaction, and the client must greet again.
    assert s.state is State.CONNECTED and s.helo == ""
    assert s.feed(b"RCPT TO:<b@smtpd.com>\r\n") == b"503 5.5.1 Error: send HELO/EHLO first\r\n"


def test_after_tls_the_session_is_greeted_again_and_starttls_is_gone():
    s = new()
    s.feed(b"EHLO c.example\r\nSTARTTLS\r\n")
    s.resume(TLSStarted(TLS13))
    assert s.tls == TLS13 and s.state is State.CONNECTED
    ehlo = s.feed(b"EHLO c.example\r\n")
    assert b"STARTTLS" not in ehlo
    assert s.feed(b"STARTTLS\r\n") == b"503 5.5.1 Error: TLS already active\r\n"
    assert s.feed(b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nDATA\r\nhi\r\n.\r\n").endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    assert s.pending.tls == TLS13 and s.pending.protocol == "ESMTPS"


def test_starttls_rules():
    s = new()
    assert s.feed(b"STARTTLS\r\n") == b"503 5.5.1 Error: send HELO/EHLO first\r\n"
    s.feed(b"EHLO c.example\r\n")
    assert s.feed(b"STARTTLS now\r\n") == b"501 5.5.4 Syntax: STARTTLS\r\n"
    s.feed(b"MAIL FROM:<a@smtpd.com>\r\n")
    assert s.feed(b"STARTTLS\r\n") == b"503 5.5.1 Error: MAIL transaction in progress\r\n"
    # Without TLS configured: not offered, 502. On an implicit-TLS port: not
    # offered either, and TLS is active already, as after STARTTLS: 503.
    s = new(ConnectionContext())
    assert b"STARTTLS" not in s.feed(b"EHLO c.example\r\n")
    assert s.feed(b"STARTTLS\r\n") == b"502 5.5.1 Error: command not implemented\r\n"
    s = new(ConnectionContext(tls=TLS_IMPLICIT), tls=TLS13)
    assert b"STARTTLS" not in s.feed(b"EHLO c.example\r\n")
    assert s.feed(b"STARTTLS\r\n") == b"503 5.5.1 Error: TLS already active\r\n"


def test_require_tls_refuses_mail_before_starttls():
    s = new(ConnectionContext(tls=TLS_STARTTLS, require_tls=True))
    s.feed(b"EHLO c.example\r\n")
    assert s.feed(b"MAIL FROM:<a@smtpd.com>\r\n") == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    s = upgraded(ConnectionContext(tls=TLS_STARTTLS, require_tls=True))
    assert s.feed(b"MAIL FROM:<a@smtpd.com>\r\n") == b"250 2.1.0 Ok\r\n"


# ---------------------------------------------------------------- AUTH
def test_auth_plain_checks_the_password_outside_and_logs_the_login_only():
    s = upgraded(auth=True)
    assert s.feed(b"AUTH PLAIN " + plain("alice", "hunter2").encode() + b"\r\n") == b""
    check = s.waiting_for
    assert check == CheckCredentials("PLAIN", "alice", "hunter2") and "hunter2" not in repr(check)
    assert s.resume(Authenticated("alice")) == b"235 2.7.0 Authentication successful\r\n"
    assert s.login == "alice"
    assert s.log[-1] == "authenticated as 'alice' (PLAIN as 'alice')"
    assert not any("hunter2" in line for line in s.log)
    assert s.feed(b"AUTH PLAIN " + plain("alice", "x").encode() + b"\r\n") == b"503 5.5.1 Error: already authenticated\r\n"


def test_auth_login_with_challenges():
    s = upgraded(auth=True)
    assert s.feed(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert s.state is State.AUTH
    assert s.feed(base64.b64encode(b"alice") + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert s.feed(base64.b64encode(b"hunter2") + b"\r\n") == b""
    assert s.waiting_for == CheckCredentials("LOGIN", "alice", "hunter2")
    assert s.resume(Authenticated("alice")).startswith(b"235")


@pytest.mark.parametrize("mechanism", [b"PLAIN", b"LOGIN"])
@pytest.mark.parametrize("split", [False, True])
def test_an_answer_to_a_challenge_too_long_to_read_ends_the_exchange(mechanism, split):
    """A line past the longest AUTH line (12288 octets, RFC 4954 4) is
    refused unread; the 500 ends the exchange, so the client's next
    command is a command again, not its credentials. ``split``: the line
    comes in reads, its head dropped before its end is seen."""
    s = upgraded(auth=True)
    assert s.feed(b"AUTH " + mechanism + b"\r\n").startswith(b"334 ")
    too_long = b"A" * 13000 + b"\r\n"
    if split:
        assert s.feed(too_long[:12500]) == b""
        reply = s.feed(too_long[12500:] + b"NOOP\r\n")
    else:
        reply = s.feed(too_long + b"NOOP\r\n")
    assert reply == b"500 5.5.6 Error: authentication line too long\r\n250 2.0.0 Ok\r\n"
    assert s.state is State.READY and s.auth_counted == [(mechanism.decode(), "malformed")]
    assert s.log[-1] == "refused [a line after AUTH, hidden]: 500 5.5.6 Error: authentication line too long"
    assert s.feed(b"AUTH PLAIN " + plain("alice", "pw").encode() + b"\r\n") == b""  # a new exchange may start
    assert s.waiting_for == CheckCredentials("PLAIN", "alice", "pw")


def test_auth_needs_tls_except_where_allowed_in_the_clear():
    s = new(auth=True)
    assert b"AUTH" not in s.feed(b"EHLO c.example\r\n")  # not advertised in the clear
    assert s.feed(b"AUTH PLAIN " + plain("a", "b").encode() + b"\r\n") == (
        b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
    )
    s = new(auth=True, auth_without_tls=True)  # a loopback client
    assert b"250-AUTH PLAIN LOGIN\r\n" in s.feed(b"EHLO c.example\r\n")
    assert s.feed(b"AUTH PLAIN " + plain("a", "b").encode() + b"\r\n") == b""
    assert isinstance(s.waiting_for, CheckCredentials)
    # Without users, AUTH is not offered at all.
    s = upgraded()
    assert s.feed(b"AUTH PLAIN " + plain("a", "b").encode() + b"\r\n") == b"502 5.5.1 Error: command not implemented\r\n"


def test_a_login_made_in_the_clear_is_forgotten_by_starttls():
    """RFC 3207 4.2: the server discards what it learnt before TLS; a
    login made in the clear (allowed from loopback) is some of it."""
    s = new(auth=True, auth_without_tls=True)
    s.feed(b"EHLO c.example\r\nAUTH PLAIN " + plain("alice", "pw").encode() + b"\r\n")
    assert s.resume(Authenticated("alice")).startswith(b"235")
    s.feed(b"STARTTLS\r\n")
    s.resume(TLSStarted(TLS13))
    assert s.login == ""
    s.feed(b"EHLO c.example\r\n")
    assert s.feed(b"AUTH PLAIN " + plain("kate", "pw").encode() + b"\r\n") == b""  # not "already authenticated"
    assert s.waiting_for == CheckCredentials("PLAIN", "kate", "pw")
    s.resume(AuthFailed())
    assert s.feed(b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@example.org>\r\n").endswith(b"550 5.7.1 Error: relay access denied; recipient domain not served here\r\n")


def test_a_huge_user_name_is_logged_by_its_start_and_length():
    # A name longer than any user's (254 octets) cannot log in; its log
    # line shows the start and the length, not 2,000 escaped characters.
    s = upgraded(auth=True)
    name = "\u202e" * 2000
    s.feed(b"AUTH PLAIN " + plain(name, "pw").encode() + b"\r\n")
    assert s.resume(AuthFailed()).startswith(b"535")
    (line,) = [line for line in s.log if "AUTH PLAIN" in line]
    assert len(line) < 2000, len(line)
    assert "2000 characters" in line


def test_failed_logins_are_counted_and_end_the_session_past_the_limit():
    s = upgraded(auth=True)
    line = b"AUTH PLAIN " + plain("alice", "guess").encode() + b"\r\n"
    for _ in range(2):
        s.feed(line)
        assert s.resume(AuthFailed()) == b"535 5.7.8 Authentication credentials invalid\r\n"
    s.feed(line)
    assert s.resume(AuthFailed()) == (
        b"535 5.7.8 Authentication credentials invalid\r\n"
        b"421 4.7.0 mx.test Error: too many failed authentication attempts\r\n"
    )
    assert s.state is State.CLOSED and s.auth_failures == 3
    assert not any("guess" in line for line in s.log)


def test_a_check_that_cannot_run_now_is_a_454_and_not_a_failure():
    s = upgraded(auth=True)
    s.feed(b"AUTH PLAIN " + plain("alice", "pw").encode() + b"\r\n")
    assert s.resume(AuthUnavailable()) == b"454 4.7.0 Temporary authentication failure, try again later\r\n"
    assert s.auth_failures == 0 and s.state is State.READY


def test_454s_count_toward_max_errors():
    """A client retrying on every 454 is closed after max_errors, as with any refusal."""
    s = Wired(Session("mx.test", frozenset({"smtpd.com"}), Limits(max_errors=3), lambda key: 0,
                      context=STARTTLS_PORT, auth=True))
    s.feed(b"EHLO c.example\r\nSTARTTLS\r\n")
    s.resume(TLSStarted(TLS13))
    s.feed(b"EHLO c.example\r\n")
    for _ in range(2):
        s.feed(b"AUTH PLAIN " + plain("alice", "pw").encode() + b"\r\n")
        assert s.resume(AuthUnavailable()).startswith(b"454 4.7.0")
    s.feed(b"AUTH PLAIN " + plain("alice", "pw").encode() + b"\r\n")
    assert s.resume(AuthUnavailable()).startswith(b"454 4.7.0 Temporary authentication failure, try again later\r\n421")
    assert s.state is State.CLOSED and s.auth_failures == 0


def test_submission_needs_tls_then_auth_then_the_users_own_address():
    s = new(SUBMISSION_PORT, auth=True)
    s.feed(b"EHLO c.example\r\n")
    assert s.feed(b"MAIL FROM:<alice@smtpd.com>\r\n") == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    s = upgraded(SUBMISSION_PORT, auth=True)
    assert s.feed(b"MAIL FROM:<alice@smtpd.com>\r\n") == b"530 5.7.0 Authentication required\r\n"
    s.feed(b"AUTH PLAIN " + plain("alice", "pw").encode() + b"\r\n")
    s.resume(Authenticated("alice"))
    assert s.feed(b"MAIL FROM:<bob@smtpd.com>\r\n") == (
        b"553 5.7.1 Error: sender address not owned by the authenticated user\r\n"
    )
    assert s.feed(b"MAIL FROM:<Alice@SMTPD.com> AUTH=<> SIZE=10\r\n") == b"250 2.1.0 Ok\r\n"
    s.feed(b"RCPT TO:<b@smtpd.com>\r\nDATA\r\nhi\r\n.\r\n")
    assert s.pending.login == "alice" and s.pending.protocol == "ESMTPSA"


@pytest.mark.parametrize(
    ("login", "sender", "owned"),
    [
        ("alice", "alice@smtpd.com", True),
        ("alice", "alice@other.example", False),  # not a served domain (refused before: 550)
        ("alice@smtpd.com", "alice@smtpd.com", True),
        ("alice@smtpd.com", "alice@smtpd.org", False),
        ("alice", "alice.x@smtpd.com", False),
    ],
)
def test_which_sender_an_authenticated_user_owns(login, sender, owned):
    s = new(auth=True)
    s.session.login = login
    assert s.session._owns(sender) is owned


@pytest.mark.parametrize(("login", "sender", "owned"), [
    ("alice", "alice@b\u00fccher.example", True),  # the U-label form of a served domain
    ("alice", "alice@B\u00dcCHER.example", True),
    ("alice", "alice@bucher.example", False),
    ("carol@xn--bcher-kva.example", "carol@b\u00fccher.example", True),
    ("carol@b\u00fccher.example", "Carol@xn--bcher-kva.example", True),
    ("carol@xn--bcher-kva.example", "carol@smtpd.com", False),
])
def test_an_authenticated_user_owns_its_address_in_either_form_of_its_domain(login, sender, owned):
    s = Wired(Session("mx.test", frozenset({"smtpd.com", "xn--bcher-kva.example"}), Limits(), lambda key: 0,
                      context=STARTTLS_PORT, auth=True))
    s.session.login = login
    assert s.session._owns(sender) is owned


@pytest.mark.parametrize(("login", "sender", "owned"), [
    ("alice", "alice@smtpd.com", True),
    ("alice", "alice@any.example", True),  # under the catch-all every domain is served
    ("alice", "bob@any.example", False),
    ("alice@smtpd.com", "alice@any.example", False),
])
def test_which_sender_an_authenticated_user_owns_under_the_catch_all(login, sender, owned):
    s = Wired(Session("mx.test", frozenset({"*"}), Limits(), lambda key: 0, context=STARTTLS_PORT, auth=True))
    s.session.login = login
    assert s.session._owns(sender) is owned


def test_an_answer_to_a_challenge_must_end_in_crlf_as_a_command_must():
    s = upgraded(auth=True)
    assert s.feed(b"AUTH PLAIN\r\n") == b"334 \r\n"
    assert s.feed(plain("alice", "pw").encode() + b"\n") == b"501 5.5.2 Error: malformed credentials\r\n"
    assert s.waiting_for is None and s.state is State.READY
    assert s.feed(b"AUTH PLAIN\r\n") == b"334 \r\n"
    assert s.feed(plain("alice", "pw").encode() + b"\r\n") == b""
    assert s.waiting_for.username == "alice"


def test_auth_lines_may_be_longer_than_commands():
    s = upgraded(auth=True)
    long_password = "p" * 3000
    assert s.feed(b"AUTH PLAIN " + plain("alice", long_password).encode() + b"\r\n") == b""
    assert s.waiting_for.password == long_password
