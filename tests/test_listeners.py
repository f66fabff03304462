"""Listeners: the SMTP port and the submission port, from the settings to the session."""

from __future__ import annotations

import dataclasses
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from harness import Client, free_port, wait_until
from sansio import Wired

from prefork_smtpd.config_file import ConfigFileError, load_config_file
from prefork_smtpd.listeners import (
    KINDS,
    SMTP,
    SMTP_CONTEXT,
    SUBMISSION,
    TLS_NONE,
    ConnectionContext,
    Listener,
    ListenError,
    bind_all,
    configured,
)
from prefork_smtpd.session import Limits, Session, State
from prefork_smtpd.settings import Settings
from prefork_smtpd.worker import PROTOCOLS

AUTH_REQUIRED = "530 5.7.0 Authentication required"


# ------------------------------------------------------------ the Listener
def test_each_kind_has_its_defaults_and_a_read_only_context():
    smtp = Listener.of_kind(SMTP, None, 2525)
    submission = Listener.of_kind(SUBMISSION, "127.0.0.1", 2587)
    assert (smtp.name, smtp.tls, smtp.require_auth) == ("smtp", TLS_NONE, False)
    assert (submission.name, submission.tls, submission.require_auth) == ("submission", TLS_NONE, True)
    assert submission.context == ConnectionContext("submission", SUBMISSION, TLS_NONE, require_auth=True)
    assert smtp.context == SMTP_CONTEXT
    with pytest.raises(dataclasses.FrozenInstanceError):
        submission.context.require_auth = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        submission.port = 25  # type: ignore[misc]


def test_every_kind_has_a_protocol_in_the_worker():
    assert set(KINDS) == set(PROTOCOLS)


def test_the_settings_give_the_smtp_port_and_the_submission_port_on_the_same_addresses():
    assert configured(Settings(listen="192.0.2.1", port=25)) == [Listener.of_kind(SMTP, "192.0.2.1", 25)]
    both = configured(Settings(port=25, submission_port=587))
    assert [(lis.kind, lis.address, lis.port, lis.require_auth) for lis in both] == [
        (SMTP, None, 25, False), (SUBMISSION, None, 587, True),
    ]


def test_names_in_titles_and_errors():
    assert Listener.of_kind(SMTP, "127.0.0.1", 25).title() == "127.0.0.1 port 25"
    assert Listener.of_kind(SMTP, None, 25).describe() == "port 25 (every address)"
    assert Listener.of_kind(SUBMISSION, None, 587).title() == "submission port 587"
    assert Listener.of_kind(SUBMISSION, "::1", 587).describe() == "the submission port ::1 port 587"


def test_binding_fails_whole_naming_the_listener_and_closes_what_it_bound():
    first_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        wanted = [Listener.of_kind(SMTP, "127.0.0.1", first_port), Listener.of_kind(SUBMISSION, "127.0.0.1", busy)]
        reason = f"cannot listen on the submission port 127.0.0.1 port {busy}: .*in use"
        with pytest.raises(ListenError, match=reason) as error:
            bind_all(wanted, 16)
    # Closed by bind_all, not by the garbage collector: the error's traceback
    # still holds bind_all's frame, and with it what it had bound.
    assert error.tb is not None
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", first_port))
        again.listen()


def test_a_bound_listener_listens_on_each_socket():
    [listener] = bind_all([Listener.of_kind(SUBMISSION, "127.0.0.1", 0)], 16)
    try:
        [sock] = listener.sockets
        with socket.create_connection(sock.getsockname(), timeout=5):
            pass
    finally:
        listener.close()
    assert listener.sockets[0].fileno() == -1


def test_submission_port_is_a_config_file_key_with_a_range(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("submission-port = 2587\n")
    assert load_config_file(str(good)) == {"submission_port": 2587}
    bad = tmp_path / "bad.toml"
    bad.write_text("submission_port = 0\n")
    with pytest.raises(ConfigFileError, match="submission_port must be between 1 and 65535"):
        load_config_file(str(bad))


# --------------------------------------------------------------- the session
def session_on(context: ConnectionContext) -> Wired:
    s = Wired(
        Session("mx.test", frozenset({"smtpd.com"}), Limits(max_errors=3), {"TOTAL": 1}.__getitem__, context=context)
    )
    assert s.feed(b"EHLO client.example\r\n").startswith(b"250-")
    return s


@pytest.mark.parametrize("mail", [
    "MAIL FROM:<a@smtpd.com>",
    "MAIL FROM:<>",
    "MAIL FROM:<a@other.example> SIZE=10",
    "mail from:<a@smtpd.com> BODY=8BITMIME",
])
def test_a_session_on_the_submission_port_refuses_mail_until_auth(mail):
    s = session_on(Listener.of_kind(SUBMISSION, None, 587).context)
    assert s.feed(f"{mail}\r\n".encode()) == f"{AUTH_REQUIRED}\r\n".encode()
    assert s.state is State.READY and s.replies_5xx == 1 and s.errors == 1
    assert s.log[-1] == f'refused "{mail}": {AUTH_REQUIRED}'
    # Nothing else changes: the transaction never began, the session goes on.
    assert s.feed(b"RCPT TO:<b@smtpd.com>\r\n").startswith(b"503 5.5.1 Error: need MAIL command")
    assert s.feed(b"NOOP\r\nRSET\r\nXSTAT TOTAL\r\n") == (
        b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n250 2.0.0 total connections: 1\r\n"
    )


def test_a_session_on_the_smtp_port_takes_mail_as_before():
    for s in (session_on(SMTP_CONTEXT), session_on(Listener.of_kind(SMTP, None, 25).context)):
        assert s.feed(b"MAIL FROM:<a@smtpd.com>\r\n") == b"250 2.1.0 Ok\r\n"


# ------------------------------------------------------- real servers
def start_with_submission(start_server, *args: str, **kw):
    """A server with a submission port; another port if a neighbour took the one found free."""
    for attempt in range(5):
        submission_port = free_port()
        try:
            server = start_server("--submission-port", str(submission_port), *args, **kw)
        except AssertionError as exc:
            if attempt == 4 or "Address already in use" not in str(exc):
                raise
            continue
        server.submission_port = submission_port
        return server


def test_both_ports_accept_share_counters_and_survive_a_reload(start_server):
    server = start_with_submission(start_server, workers=2)
    title = " ".join(psutil.Process(server.proc.pid).cmdline()).strip()
    ports = f"127.0.0.1 port {server.port}, submission 127.0.0.1 port {server.submission_port}"
    assert title == f"prefork-smtpd: master [{ports}]"
    assert f"listening on port {server.port} and submission port {server.submission_port} with 2 workers," in (
        server.log_text()
    )

    smtp = server.client()
    submission = Client(server.submission_port)
    assert smtp.greeting[0] == submission.greeting[0] == 220
    assert smtp.cmd("EHLO x")[0] == submission.cmd("EHLO y")[0] == 250
    assert smtp.mail("a@smtpd.com", ["r"], b"hello")[0] == 250
    code, text = submission.cmd("MAIL FROM:<a@smtpd.com>")
    assert (code, text) == (530, "5.7.0 Authentication required")
    assert submission.cmd("RCPT TO:<r>")[0] == 503  # no transaction began
    # One set of counters for the whole server, whichever port asks.
    for client in (smtp, submission):
        assert client.xstat("CURRENT") == 2 and client.xstat("TOTAL") == 2
        assert client.xstat("MAILS") == 1 and client.xstat("BYTES") == len(b"hello\r\n")
    wait_until(lambda: "connected to the submission port" in server.log_text(), what="the submission log line")
    wait_until(lambda: f'refused "MAIL FROM:<a@smtpd.com>": {AUTH_REQUIRED}' in server.log_text(),
               what="the refusal in the log")
    assert len(server.stored("r")) == 1

    # A new generation of workers serves both ports too.
    old = set(server.worker_pids())
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload done" in server.log_text(), timeout=60, what="the reload")
    wait_until(lambda: not old & set(server.accepting_workers()), timeout=60, what="old workers to stop accepting")
    for _ in range(4):  # whichever new worker takes it
        again = Client(server.submission_port)
        again.cmd("EHLO z")
        assert again.cmd("MAIL FROM:<a@smtpd.com>")[0] == 530
        again.close()
    assert server.client().cmd("EHLO w")[0] == 250


def test_the_submission_port_listens_on_every_address_by_default(start_server):
    server = start_with_submission(start_server, workers=1, listen=None)
    for host in ("127.0.0.1", "::1"):
        client = Client(server.submission_port, host=host)
        client.cmd("EHLO x")
        assert client.cmd("MAIL FROM:<a@smtpd.com>")[0] == 530
        client.close()


def run_server(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "prefork_smtpd", "--workers", "1", "-c", str(free_port()), *args],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )


def test_a_busy_submission_port_exits_2_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_server(tmp_path, "-l", "127.0.0.1", "-P", str(free_port()), "--submission-port", str(port))
    assert r.returncode == 2, r.stderr
    assert f"cannot listen on the submission port 127.0.0.1 port {port}: " in r.stderr
    assert "Address already in use" in r.stderr


def test_the_submission_port_must_differ_from_the_smtp_port(tmp_path):
    port = str(free_port())
    r = run_server(tmp_path, "-l", "127.0.0.1", "-P", port, "--submission-port", port)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "prefork-smtpd: error: --submission-port must differ from --port"


def test_with_a_certificate_the_ports_offer_starttls_submission_requires_it_and_smtps_is_implicit():
    from prefork_smtpd.listeners import SMTPS, TLS_IMPLICIT, TLS_STARTTLS

    plain = configured(Settings(port=25, submission_port=587))
    assert [(lis.tls, lis.require_tls) for lis in plain] == [(TLS_NONE, False), (TLS_NONE, False)]
    tls = configured(Settings(port=25, submission_port=587, smtps_port=465, tls_cert="c.pem"))
    assert [(lis.kind, lis.tls, lis.require_auth, lis.require_tls) for lis in tls] == [
        (SMTP, TLS_STARTTLS, False, False),
        (SUBMISSION, TLS_STARTTLS, True, True),
        (SMTPS, TLS_IMPLICIT, True, False),
    ]
    required = configured(Settings(port=25, tls_cert="c.pem", require_tls=True))
    assert required[0].context.require_tls
