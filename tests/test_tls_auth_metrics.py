"""The TLS and AUTH figures: TLS sessions by version, AUTH exchanges by
mechanism and result, in /metrics, XSTAT TLS and prefork-smtpd-metrics;
counted by real clients (smtplib, SMTP_SSL) against a real server, summed
over workers and kept when a worker dies."""

from __future__ import annotations

import base64
import json
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import urllib.request

import pytest
import trustme
from harness import Client, free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families
from sansio import Wired

from prefork_smtpd.events import TLSStarted
from prefork_smtpd.listeners import TLS_STARTTLS, ConnectionContext
from prefork_smtpd.session import Limits, Session
from prefork_smtpd.stats import AUTH_FIELDS, MAX_WORKERS, RETIRED, TLS_SESSION_FIELDS, SharedStats
from prefork_smtpd.tls import TLSSessionInfo
from prefork_smtpd.users import hash_password

HOST = "mx.test"
PASSWORD = "correct horse battery"


# ------------------------------------------------------ shared counters
def test_tls_and_auth_counters_sum_over_workers_and_survive_a_retire():
    stats = SharedStats()
    fields = [*TLS_SESSION_FIELDS.values(), *AUTH_FIELDS.values()]
    assert len(set(fields)) == len(fields) == 2 + 2 * 5  # a word of its own each
    for index in (*range(1, MAX_WORKERS), RETIRED):
        for n, field in enumerate(fields):
            stats.slot(index).set(field, index * 100 + n)

    def expected(n: int) -> int:
        return sum(index * 100 + n for index in (*range(1, MAX_WORKERS), RETIRED))

    tls = {"TLSv1.2": expected(0), "TLSv1.3": expected(1)}
    auth = {key: expected(2 + n) for n, key in enumerate(AUTH_FIELDS)}
    assert stats.tls_sessions() == tls
    assert stats.auth_attempts() == auth
    assert stats.xstat("TLS") == expected(0) + expected(1)
    stats.retire(7)  # a dead worker's counts move to the retired slot: the sums keep them
    assert stats.slot(7).get(TLS_SESSION_FIELDS["TLSv1.3"]) == 0
    assert stats.tls_sessions() == tls and stats.auth_attempts() == auth


# ----------------------------------------------------- the sans-IO part
def session() -> Wired:
    s = Wired(Session(HOST, frozenset({"smtpd.com"}), Limits(), lambda key: 0,
                      context=ConnectionContext(tls=TLS_STARTTLS), auth=True))
    s.feed(b"EHLO c.example\r\nSTARTTLS\r\n")
    s.resume(TLSStarted(TLSSessionInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)))
    s.feed(b"EHLO c.example\r\n")
    return s


def test_an_exchange_that_ends_in_the_session_is_counted_by_mechanism_and_how():
    s = session()
    assert s.feed(b"AUTH PLAIN\r\n*\r\n") == b"334 \r\n501 5.7.0 Authentication cancelled\r\n"
    assert s.feed(b"AUTH LOGIN *\r\n") == b"501 5.7.0 Authentication cancelled\r\n"
    assert s.feed(b"AUTH LOGIN\r\n!!\r\n").endswith(b"501 5.5.2 Error: invalid base64 data\r\n")
    assert s.feed(b"AUTH PLAIN " + base64.b64encode(b"no nul bytes") + b"\r\n") == (
        b"501 5.5.2 Error: malformed credentials\r\n"
    )
    assert s.feed(b"AUTH PLAIN " + base64.b64encode(b"bob\0alice\0pw") + b"\r\n").startswith(b"535 ")
    assert s.auth_counted == [
        ("PLAIN", "cancelled"), ("LOGIN", "cancelled"), ("LOGIN", "malformed"), ("PLAIN", "malformed"),
        ("PLAIN", "malformed"),
    ]
    # No mechanism, no count: the mechanism is unknown, or the line is not AUTH's syntax.
    s.feed(b"AUTH CRAM-MD5\r\nAUTH PLAIN a b c\r\n")
    assert len(s.auth_counted) == 5
    # A check's outcome is the worker's to count: the session only asks for it.
    s.feed(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0pw") + b"\r\n")
    assert len(s.auth_counted) == 5 and s.waiting_for is not None


# -------------------------------------------------------- a real server
@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def files(tmp_path, ca):
    issued = ca.issue_cert(HOST, "127.0.0.1")
    cert, key, cafile = tmp_path / "cert.pem", tmp_path / "cert.key", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(p.bytes() for p in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    key.chmod(0o600)
    ca.cert_pem.write_to_path(str(cafile))
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password(PASSWORD)}\n")
    return {"cert": cert, "key": key, "ca": cafile, "users": users}


def client_context(files, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(files["ca"]))
    if version is not None:
        context.minimum_version = context.maximum_version = version
    return context


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def tls_sessions(metrics: dict) -> dict[str, float]:
    return {dict(labels)["version"]: v for (name, labels), v in metrics.items() if name == "smtpd_tls_sessions_total"}


def auth_attempts(metrics: dict) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["mechanism"], dict(labels)["result"]): v
        for (name, labels), v in metrics.items()
        if name == "smtpd_auth_attempts_total"
    }


def monitor(port: int, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "prefork_smtpd.cli.metrics", "-P", str(port), "--once", *flags],
        capture_output=True, text=True, timeout=60,
    )


def test_tls_sessions_by_version_in_metrics_xstat_and_the_monitor(start_server, files):
    mport, smtps = free_port(), free_port()
    server = start_server(
        "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]), "--smtps-port", str(smtps),
        "--metrics-port", str(mport),
    )
    # Completed handshakes: two STARTTLS in TLS 1.3, one in TLS 1.2, one implicit TLS 1.3.
    for version in (None, None, ssl.TLSVersion.TLSv1_2):
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
            s.starttls(context=client_context(files, version))
            assert s.sock.version() == ("TLSv1.2" if version else "TLSv1.3")
            s.noop()
    with smtplib.SMTP_SSL("127.0.0.1", smtps, context=client_context(files), timeout=30) as s:
        s.noop()
    # Handshakes that fail are no TLS session: garbage after STARTTLS, and on the smtps port.
    failed = Client(server.port)
    failed.cmd("EHLO c.example")
    assert failed.cmd("STARTTLS")[0] == 220
    failed.send(b"not a ClientHello\r\n" * 4)
    assert failed.closed_by_server()
    raw = socket.create_connection(("127.0.0.1", smtps), timeout=30)
    raw.sendall(b"EHLO not a ClientHello\r\n" * 4)
    assert raw.recv(100) == b""
    raw.close()
    plain = server.client()  # and one session in the clear
    wait_until(lambda: scrape(mport)[("smtpd_tls_handshake_failures_total", ())] == 2, what="2 failed handshakes")
    metrics = scrape(mport)
    assert tls_sessions(metrics) == {"TLSv1.2": 1, "TLSv1.3": 3}
    assert metrics[("smtpd_connections_total", ())] == 6  # 4 TLS, the failed STARTTLS, the plain one
    assert plain.xstat("TLS") == 4 and plain.xstat("TOTAL") == 6
    # The monitor: 4 of the 7 sessions (its own is the 7th) completed TLS.
    run = monitor(server.port, "--json")
    assert run.returncode == 0, run.stderr
    sample = json.loads(run.stdout)
    assert (sample["tls"], sample["total"], sample["encrypted_share"]) == (4, 7, round(4 / 7, 4))
    run = monitor(server.port)
    assert "  encrypted sessions   4 of 8 (50.0%)\n" in run.stdout, run.stdout
    # Workers that die leave their counts behind (in the retired totals).
    kill_every_worker(server)
    assert tls_sessions(scrape(mport)) == {"TLSv1.2": 1, "TLSv1.3": 3}
    with smtplib.SMTP_SSL("127.0.0.1", smtps, context=client_context(files), timeout=30) as s:
        s.noop()
    wait_until(lambda: tls_sessions(scrape(mport))["TLSv1.3"] == 4, what="the 5th TLS session counted")
    probe = server.client()
    assert probe.xstat("TLS") == 5


def kill_every_worker(server) -> None:
    """SIGKILL the workers; return once their replacements accept (the master
    has retired the dead ones' slots by then)."""
    dead = set(server.worker_pids())
    for pid in dead:
        os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: not dead & set(server.worker_pids()) and len(server.accepting_workers()) == server.workers,
        timeout=60, what="the workers replaced",
    )


def auth_client(port: int) -> Client:
    c = Client(port, timeout=30)
    assert c.cmd("EHLO c.example")[0] == 250
    return c


def test_auth_attempts_by_mechanism_and_result(start_server, files):
    mport = free_port()
    # One worker, one check at a time: two AUTHs sent together make one 454.
    server = start_server(
        "--users", str(files["users"]), "--metrics-port", str(mport), "--auth-failure-delay", "0",
        "--max-auth-checks", "1", "--auth-threads", "1", workers=1,
    )
    # Python's smtplib: login() takes PLAIN, its first choice, and after a
    # 535 tries LOGIN too: a wrong password there is one failure of each.
    for password, ok in ((PASSWORD, True), (PASSWORD, True), ("wrong", False)):
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
            if ok:
                assert s.login("alice", password)[0] == 235
            else:
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    s.login("alice", password)
    for password, ok in ((PASSWORD, True), ("wrong", False)):  # LOGIN, asked for by name
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
            s.ehlo()
            s.user, s.password = "alice", password
            if ok:
                assert s.auth("LOGIN", s.auth_login)[0] == 235
            else:
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    s.auth("LOGIN", s.auth_login)
    c = auth_client(server.port)
    assert c.cmd("AUTH PLAIN")[0] == 334
    assert c.cmd("*")[0] == 501  # cancelled
    assert c.cmd("AUTH LOGIN")[0] == 334
    assert c.cmd("not base64!")[0] == 501  # malformed
    assert c.cmd("AUTH CRAM-MD5")[0] == 504  # a mechanism not offered: not counted
    two = [auth_client(server.port) for _ in range(2)]
    credentials = base64.b64encode(f"\0alice\0{PASSWORD}".encode())
    for each in two:
        each.send(b"AUTH PLAIN " + credentials + b"\r\n")
    assert sorted(each.reply()[0] for each in two) == [235, 454]
    expected = {(m, r): 0 for m in ("PLAIN", "LOGIN") for r in ("success", "failure", "unavailable", "cancelled", "malformed")}
    expected.update({
        ("PLAIN", "success"): 3, ("PLAIN", "failure"): 1, ("PLAIN", "unavailable"): 1, ("PLAIN", "cancelled"): 1,
        ("LOGIN", "success"): 1, ("LOGIN", "failure"): 2, ("LOGIN", "malformed"): 1,
    })
    metrics = scrape(mport)
    assert auth_attempts(metrics) == expected
    assert metrics[("smtpd_auth_failures_total", ())] == 3  # the older total of wrong passwords agrees
    kill_every_worker(server)  # the counts stay
    assert auth_attempts(scrape(mport)) == expected
