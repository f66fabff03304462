"""STARTTLS, implicit TLS and AUTH on a real server, driven by real clients:
openssl s_client, Python's smtplib, swaks, curl and msmtp, with certificates
from a test CA (trustme) and a users file hashed as Dovecot would."""

from __future__ import annotations

import base64
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import trustme
from harness import free_port, wait_until

from prefork_smtpd.users import hash_password

HOST = "mx.test"
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(ca: trustme.CA, folder: Path, name: str = "cert") -> tuple[Path, Path]:
    issued = ca.issue_cert(HOST, "127.0.0.1")
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    cert.write_bytes(b"".join(p.bytes() for p in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    key.chmod(0o600)
    return cert, key


@pytest.fixture
def files(tmp_path, ca):
    cert, key = write_pair(ca, tmp_path)
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password(PASSWORD)}\nbob@smtpd.com:{hash_password('bobs password')}\n")
    return {"cert": cert, "key": key, "ca": cafile, "users": users}


def client_context(files) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(files["ca"]))


@pytest.fixture
def tls_server(start_server, files):
    """Factory: a server with TLS and AUTH on all three ports."""

    def start(*extra: str, **kw):
        submission, smtps = free_port(), free_port()
        server = start_server(
            "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]), "--users", str(files["users"]),
            "--submission-port", str(submission), "--smtps-port", str(smtps), *extra, **kw,
        )
        server.submission_port, server.smtps_port = submission, smtps
        return server

    return start


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def read_reply(f) -> tuple[int, str]:
    lines = []
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError("closed")
        lines.append(line[4:].decode().rstrip("\r\n"))
        if line[3:4] == b" ":
            return int(line[:3]), "\n".join(lines)


class TLSClient:
    """A raw client that can turn TLS on after STARTTLS."""

    def __init__(self, port: int, files) -> None:
        self.files = files
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.f = self.sock.makefile("rb")
        self.greeting = read_reply(self.f)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.send(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        return read_reply(self.f)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def start_tls(self) -> None:
        self.f.close()
        self.sock = client_context(self.files).wrap_socket(self.sock, server_hostname=HOST)
        self.f = self.sock.makefile("rb")

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def stored(server, folder: str) -> list[bytes]:
    return [p.read_bytes() for p in server.stored(folder)]


def wait_log(server, needle: str) -> None:
    wait_until(lambda: needle in server.log_text(), what=f"{needle!r} in the log")


# ------------------------------------------------------ openssl s_client
def test_openssl_s_client_starttls_and_a_mail_with_esmtps(tls_server, files):
    server = tls_server()
    script = "EHLO client.example\nMAIL FROM:<a@smtpd.com>\nRCPT TO:<b@smtpd.com>\nDATA\nhello\n.\nQUIT\n"
    run = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{server.port}", "-CAfile",
         str(files["ca"]), "-verify_return_error", "-servername", HOST, "-crlf", "-quiet"],
        input=script.encode(), capture_output=True, timeout=60,
    )
    out = run.stdout.decode()
    assert "250 2.0.0 Ok: queued as" in out, out + run.stderr.decode()
    assert "STARTTLS" not in out  # the EHLO after TLS offers it no more
    (message,) = stored(server, "b")
    assert b"with ESMTPS id" in message and b"(using TLSv1.3 with cipher " in message
    wait_log(server, "tls=TLSv1.3")
    assert "mail " in server.log_text() and "tls=TLSv1.3 cipher=" in server.log_text()


# --------------------------------------------------------------- smtplib
def test_smtplib_starttls_login_on_submission_and_smtps(tls_server, files):
    server = tls_server()
    with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=30) as s:
        s.ehlo()
        assert s.has_extn("starttls")
        code, _ = s.mail("alice@smtpd.com")
        assert code == 530  # the submission port: STARTTLS first
        s.rset()
        s.starttls(context=client_context(files))
        s.ehlo()
        assert not s.has_extn("starttls") and s.has_extn("auth")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            s.sendmail("alice@smtpd.com", ["b@smtpd.com"], b"Subject: x\r\n\r\nbefore login\r\n")
        assert refused.value.smtp_code == 530
        s.login("alice", PASSWORD)
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            s.sendmail("bob@smtpd.com", ["b@smtpd.com"], b"Subject: x\r\n\r\nnot mine\r\n")
        assert refused.value.smtp_code == 553
        s.sendmail("alice@smtpd.com", ["b@smtpd.com"], b"Subject: x\r\n\r\nsubmitted\r\n")
    with smtplib.SMTP_SSL("127.0.0.1", server.smtps_port, context=client_context(files), timeout=30) as s:
        assert not s.has_extn("starttls")
        s.ehlo()
        assert not s.has_extn("starttls")
        s.login("bob@smtpd.com", "bobs password")
        s.sendmail("bob@smtpd.com", ["b@smtpd.com"], b"Subject: y\r\n\r\nimplicit\r\n")
    messages = stored(server, "b")
    assert len(messages) == 2 and all(b"with ESMTPSA id" in m for m in messages)
    wait_log(server, "login='bob@smtpd.com'")
    log = server.log_text()
    assert "login='alice'" in log and "authenticated as 'alice'" in log
    assert PASSWORD not in log and "bobs password" not in log
    assert plain("alice", PASSWORD) not in log


# ----------------------------------------------------------------- swaks
@pytest.mark.parametrize("auth", [None, "PLAIN", "LOGIN"])
def test_swaks_tls_and_auth(tls_server, files, auth):
    if shutil.which("swaks") is None:
        pytest.fail("swaks is not installed")
    server = tls_server()
    port = server.port if auth is None else server.submission_port
    sender = "a@smtpd.com" if auth is None else "alice@smtpd.com"
    cmd = ["swaks", "--server", f"127.0.0.1:{port}", "--from", sender, "--to", "b@smtpd.com", "--tls",
           "--tls-verify", "--tls-ca-path", str(files["ca"]), "--tls-sni", HOST, "--body", "via swaks"]
    if auth:
        cmd += ["--auth", auth, "--auth-user", "alice", "--auth-password", PASSWORD]
    run = subprocess.run(cmd, capture_output=True, timeout=60)
    out = run.stdout.decode()
    assert run.returncode == 0, out + run.stderr.decode()
    assert "<~  250 2.0.0 Ok: queued as" in out
    (message,) = stored(server, "b")
    assert (b"with ESMTPS id" if auth is None else b"with ESMTPSA id") in message


# ------------------------------------------------------------------ curl
def test_curl_ssl_reqd_with_a_login(tls_server, files, tmp_path):
    server = tls_server()
    mail = tmp_path / "m.eml"
    mail.write_bytes(b"Subject: curl\r\n\r\nvia curl\r\n")
    run = subprocess.run(
        ["curl", "-sS", "--ssl-reqd", "--cacert", str(files["ca"]), "--user", f"alice:{PASSWORD}",
         "--url", f"smtp://127.0.0.1:{server.submission_port}/client.example", "--resolve",
         f"{HOST}:{server.submission_port}:127.0.0.1", "--mail-from", "alice@smtpd.com",
         "--mail-rcpt", "b@smtpd.com", "--upload-file", str(mail)],
        capture_output=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr.decode()
    (message,) = stored(server, "b")
    assert b"with ESMTPSA id" in message and b"via curl" in message


# ----------------------------------------------------------------- msmtp
def test_msmtp_tls_and_auth(tls_server, files, tmp_path):
    server = tls_server()
    run = subprocess.run(
        ["msmtp", "--host=127.0.0.1", f"--port={server.submission_port}", "--from=alice@smtpd.com",
         "--tls=on", "--tls-starttls=on", f"--tls-trust-file={files['ca']}", f"--tls-host-override={HOST}",
         "--auth=plain", "--user=alice", "--passwordeval=echo '" + PASSWORD + "'", "b@smtpd.com"],
        input=b"Subject: msmtp\r\n\r\nvia msmtp\r\n", capture_output=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr.decode() + run.stdout.decode()
    (message,) = stored(server, "b")
    assert b"with ESMTPSA id" in message


# --------------------------------------------- the session's own checks
def test_plaintext_pipelined_after_starttls_is_dropped(tls_server, files):
    """CVE-2011-0411: a man in the middle appends commands to STARTTLS in the clear."""
    server = tls_server()
    c = TLSClient(server.port, files)
    c.cmd("EHLO client.example")
    c.send(b"STARTTLS\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\n")
    assert read_reply(c.f) == (220, "2.0.0 Ready to start TLS")
    c.start_tls()
    # The injected MAIL never ran: RCPT needs EHLO, then MAIL, again.
    assert c.cmd("RCPT TO:<b@smtpd.com>") == (503, "5.5.1 Error: send HELO/EHLO first")
    code, text = c.cmd("EHLO client.example")
    assert code == 250 and "STARTTLS" not in text
    assert c.cmd("RCPT TO:<b@smtpd.com>") == (503, "5.5.1 Error: need MAIL command")
    assert c.cmd("STARTTLS") == (503, "5.5.1 Error: TLS already active")
    c.close()


def test_a_failed_handshake_is_logged_with_the_peer_and_counted(tls_server, files):
    metrics_port = free_port()
    server = tls_server("--tls-handshake-timeout", "2", "--metrics-port", str(metrics_port))
    c = TLSClient(server.port, files)
    c.cmd("EHLO client.example")
    assert c.cmd("STARTTLS")[0] == 220
    port = c.sock.getsockname()[1]
    c.send(b"this is not a TLS ClientHello\r\n" * 4)
    assert c.f.read() == b""  # closed
    c.close()
    wait_log(server, f"[127.0.0.1]:{port} TLS handshake failed")
    silent = socket.create_connection(("127.0.0.1", server.smtps_port))  # never says hello: timed out
    silent_port = silent.getsockname()[1]
    wait_log(server, f"[127.0.0.1]:{silent_port} TLS handshake failed")
    silent.close()

    def counted() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            return "smtpd_tls_handshake_failures_total 2.0" in response.read().decode()

    wait_until(counted, what="two failed handshakes counted")


@pytest.mark.parametrize("limit, refusal", [
    ("--max-connections-per-ip", "too many connections from your address"),
    ("--max-connections", "too many connections"),
])
def test_handshakes_under_way_on_the_smtps_port_count_toward_the_limits(tls_server, files, limit, refusal):
    # A connection on the SMTPS port is counted (and greeted) only once its
    # handshake is done; the handshakes under way held sockets and up to a
    # ClientHello's buffers each, beyond --max-connections-per-ip and
    # --max-connections, for --tls-handshake-timeout. They count now: past
    # the limit, a new one is closed at once, before any handshake.
    server = tls_server(limit, "3", "--tls-handshake-timeout", "60", workers=1)
    silent = [socket.create_connection(("127.0.0.1", server.smtps_port)) for _ in range(3)]
    # One worker takes them from the listening queue in order: the three first.
    over = socket.create_connection(("127.0.0.1", server.smtps_port), timeout=20)
    assert over.recv(100) == b""  # closed at once, not held until the handshake times out
    over.close()
    wait_log(server, f"refused before the TLS handshake: {refusal}\n")
    for sock in silent:
        sock.close()
    # Their places are free again: a client completes its handshake and is greeted.
    def greeted() -> bool:
        with socket.create_connection(("127.0.0.1", server.smtps_port), timeout=20) as raw:
            try:
                with client_context(files).wrap_socket(raw, server_hostname=HOST) as tls:
                    return tls.recv(100).startswith(b"220 ")
            except (ssl.SSLError, OSError):
                return False
    wait_until(greeted, what="a TLS client greeted once the three are gone")


def test_require_tls_on_the_smtp_port(tls_server, files):
    server = tls_server("--require-tls")
    c = TLSClient(server.port, files)
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@smtpd.com>") == (530, "5.7.0 Must issue a STARTTLS command first")
    c.cmd("STARTTLS")
    c.start_tls()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@smtpd.com>") == (250, "2.1.0 Ok")
    c.close()


def test_auth_in_the_clear_is_refused_unless_from_loopback(tls_server, files):
    server = tls_server("--no-loopback-auth-without-tls")
    c = TLSClient(server.submission_port, files)
    code, text = c.cmd("EHLO client.example")
    assert "AUTH" not in text
    assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}") == (
        538, "5.7.11 Encryption required for requested authentication mechanism",
    )
    c.close()
    server2 = tls_server()  # default: a loopback client may log in in the clear
    c = TLSClient(server2.port, files)
    assert "AUTH PLAIN LOGIN" in c.cmd("EHLO client.example")[1]
    assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}") == (235, "2.7.0 Authentication successful")
    assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}") == (503, "5.5.1 Error: already authenticated")
    assert c.cmd("MAIL FROM:<alice@smtpd.com> AUTH=<>")[0] == 250
    c.close()


def test_wrong_passwords_are_answered_late_and_end_the_session(tls_server, files):
    server = tls_server("--auth-failure-delay", "1")
    c = TLSClient(server.submission_port, files)
    c.cmd("EHLO client.example")
    c.cmd("STARTTLS")
    c.start_tls()
    c.cmd("EHLO client.example")
    for attempt in range(3):
        started = time.monotonic()
        c.send(f"AUTH PLAIN {plain('alice', 'wrong' + str(attempt))}\r\n".encode())
        assert read_reply(c.f) == (535, "5.7.8 Authentication credentials invalid")
        assert time.monotonic() - started >= 0.95  # the delay is a floor, never a speed claim
    assert read_reply(c.f) == (421, f"4.7.0 {HOST} Error: too many failed authentication attempts")
    assert c.f.read() == b""
    c.close()
    wait_log(server, "too many failed authentication attempts (3); closing")
    log = server.log_text()
    assert "refused AUTH PLAIN as 'alice': 535 5.7.8" in log
    assert "wrong0" not in log and "wrong2" not in log


def test_too_many_checks_at_once_get_454_as_late_as_a_535(tls_server, files):
    server = tls_server("--max-auth-checks", "1", "--auth-threads", "1", "--auth-failure-delay", "1", workers=1)
    clients = [TLSClient(server.port, files) for _ in range(2)]
    for c in clients:
        c.cmd("EHLO client.example")
    # Both at once: while the first slow hash runs, the second finds no room.
    started = time.monotonic()
    for c in clients:
        c.send(f"AUTH PLAIN {plain('alice', PASSWORD)}\r\n".encode())
    replies = {read_reply(c.f)[0]: time.monotonic() - started for c in clients}
    assert sorted(replies) == [235, 454]
    # A retry after a 454 costs a guesser the delay a wrong password costs (a floor, no speed claim).
    assert replies[454] >= 0.95
    for c in clients:
        c.close()
    wait_log(server, "refused AUTH PLAIN as 'alice': 454 4.7.0")
    assert server.log_count("454 4.7.0") == 1  # one line per 454


# ------------------------------------------------------------ the files
def test_a_bad_certificate_or_users_file_stops_the_start_with_exit_2(start_server, files, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    for flags, reason in [
        (["--tls-cert", str(bad), "--tls-key", str(files["key"])], "no PEM certificate"),
        (["--tls-cert", str(files["cert"]), "--tls-key", str(bad)], "no PEM private key"),
        (["--users", str(bad)], "bad.pem:1: not a mailbox name"),
        (["--smtps-port", str(free_port())], "--smtps-port needs --tls-cert"),
        (["--require-tls"], "--require-tls needs --tls-cert"),
    ]:
        server = start_server(*flags, wait=False)
        assert server.proc.wait(timeout=60) == 2, flags
        assert reason in server.output(), server.output()


def peer_serial(port: int, files) -> int:
    c = TLSClient(port, files)
    c.cmd("EHLO client.example")
    c.cmd("STARTTLS")
    c.start_tls()
    serial = int(c.sock.getpeercert()["serialNumber"], 16)
    c.close()
    return serial


def test_reload_swaps_the_certificate_keeps_open_sessions_and_keeps_the_old_one_if_bad(tls_server, files, ca):
    server = tls_server()
    first = peer_serial(server.port, files)
    open_session = TLSClient(server.port, files)
    open_session.cmd("EHLO client.example")
    open_session.cmd("STARTTLS")
    open_session.start_tls()
    open_session.cmd("EHLO client.example")
    # A renewal: new files in place, then a reload.
    new_cert, new_key = write_pair(ca, files["cert"].parent, "renewed")
    shutil.copy(new_cert, files["cert"])
    shutil.copy(new_key, files["key"])
    old_workers = set(server.worker_pids())
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: not (set(server.accepting_workers()) & old_workers), what="the new generation")
    second = peer_serial(server.port, files)
    assert second != first
    # The session opened before the reload goes on, over its TLS.
    assert open_session.cmd("MAIL FROM:<a@smtpd.com>") == (250, "2.1.0 Ok")
    assert open_session.cmd("QUIT")[0] == 221
    open_session.close()
    # A broken renewal: the reload keeps the certificate in use.
    files["cert"].write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    old_workers = set(server.worker_pids())
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: not (set(server.accepting_workers()) & old_workers), what="the next generation")
    wait_log(server, "keeping the certificate loaded before")
    assert peer_serial(server.port, files) == second
