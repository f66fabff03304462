"""The PROXY protocol on a real server, spoken by raw sockets.

The server trusts 127.0.0.1 (where these tests connect from) unless a test
says otherwise; the headers name documentation addresses (192.0.2.0/24) as
the clients, so a log line or a Received header that names one of them can
only have it from the header.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
import urllib.request

import psutil
import pytest
import trustme
from harness import Client, free_port, wait_until

from prefork_smtpd.cli.server import settings_from_args
from prefork_smtpd.proxy import encode_v1, encode_v2

TRUSTED = ("--proxy-protocol", "smtp", "--trusted-proxies", "127.0.0.0/30")
CLIENT = ("192.0.2.7", 4711)
SERVER_SIDE = ("192.0.2.1", 25)
HEADERS = {
    "v1": encode_v1(CLIENT, SERVER_SIDE),
    "v2": encode_v2(CLIENT, SERVER_SIDE),
}


def connect(server_port: int, payload: bytes = b"", timeout: float = 30) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server_port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if payload:
        sock.sendall(payload)
    return sock


def read_replies(sock: socket.socket, count: int) -> list[bytes]:
    """``count`` complete reply lines (a multi-line reply counts once)."""
    data = b""
    while True:
        lines = data.split(b"\r\n")[:-1]
        finished = [line for line in lines if line[3:4] == b" "]
        if len(finished) >= count:
            return lines
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (a reset too: the server closes
    with our bytes unread when it refuses a header)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture
def proxy_server(start_server):
    """Factory: a server whose SMTP port speaks PROXY, with /metrics."""

    def start(*extra: str, **kw):
        metrics_port = free_port()
        server = start_server(*TRUSTED, "--metrics-port", str(metrics_port), *extra, **kw)
        server.metrics_port = metrics_port
        return server

    return start


def send_mail(sock: socket.socket) -> bytes:
    sock.sendall(b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nDATA\r\n")
    read_replies(sock, 3)
    sock.sendall(b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    return read_all(sock)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_conveyed_address_is_the_peer_in_log_received_and_xstat(proxy_server, version):
    server = proxy_server()
    with connect(server.port, HEADERS[version] + b"EHLO client.example\r\nXSTAT PROXIED\r\n") as sock:
        replies = read_replies(sock, 3)
        assert replies[0].startswith(b"220 ")
        assert replies[-1] == b"250 2.0.0 current connections through a trusted proxy: 1"
        assert b"250 2.0.0 Ok: queued as" in send_mail(sock)
    (stored,) = wait_until(lambda: server.stored("b"), what="the mail")
    assert b"Received: from client.example ([192.0.2.7])" in stored.read_bytes()
    wait_until(lambda: server.log_count("[192.0.2.7]:4711 closed"), what="the session's end in the log")
    log = server.log_text()
    assert f"[192.0.2.7]:4711 connected (via proxy [127.0.0.1]:" in log
    assert f", PROXY {version})" in log
    assert "[192.0.2.7]:4711 mail " in log
    assert metric(server.metrics_port, "smtpd_connections_proxied") == 0  # the session is over
    assert metric(server.metrics_port, "smtpd_proxy_failures_total") == 0


def test_only_the_listeners_named_speak_proxy(proxy_server):
    """--proxy-protocol smtp: the SMTP port reads a header, the submission
    port beside it stays a plain port (a PROXY line there is a bad command)."""
    submission = free_port()
    server = proxy_server("--submission-port", str(submission))
    with connect(server.port, HEADERS["v2"] + b"XSTAT PROXIED\r\n") as proxied:
        assert read_replies(proxied, 2)[-1].endswith(b"trusted proxy: 1")
        plain = Client(submission)
        assert plain.greeting[0] == 220
        assert plain.cmd(HEADERS["v1"].rstrip(b"\r\n"))[0] == 500
        assert plain.xstat("PROXIED") == 1  # the proxied session only
        plain.close()


def test_an_untrusted_peer_gets_421_and_is_counted(proxy_server):
    server = proxy_server("--trusted-proxies", "127.0.0.2/32")  # these tests connect from 127.0.0.1
    with connect(server.port) as sock:
        local_port = sock.getsockname()[1]
        answer = read_all(sock)
    assert answer == b"421 4.7.0 mx.test Error: this port is for the load balancer, try again later\r\n"
    wait_until(
        lambda: server.log_count(f"[127.0.0.1]:{local_port} refused: not a trusted proxy"),
        what="the refusal in the log",
    )
    assert metric(server.metrics_port, "smtpd_proxy_failures_total") == 1
    assert metric(server.metrics_port, "smtpd_connections_total") == 0  # no session was made


MALFORMED = {
    "smtp without header": (b"EHLO client.example\r\n", "bad signature"),
    "v1 bad address": (b"PROXY TCP4 192.0.2.300 192.0.2.1 4711 25\r\n", "invalid IP"),
    "v1 lone LF": (b"PROXY TCP4 192.0.2.7 192.0.2.1 4711 25\n", "v1 missing CRLF"),
    "v1 too long": (b"PROXY UNKNOWN " + b"x" * 120, "v1 line too long"),
    "v2 bad version": (HEADERS["v2"][:12] + b"\x31" + HEADERS["v2"][13:], "bad version"),
    "v2 short address": (HEADERS["v2"][:15] + b"\x04" + bytes(4), "address length mismatch"),
    "closed inside the header": (b"PROXY TCP4 192.0.2.7", "truncated"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_header_closes_without_a_byte(proxy_server, name):
    payload, reason = MALFORMED[name]
    server = proxy_server()
    with connect(server.port, payload) as sock:
        if name == "closed inside the header":
            sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b""
    wait_until(lambda: server.log_count(f"PROXY header refused: {reason}"), what=f"'{reason}' in the log")
    assert metric(server.metrics_port, "smtpd_proxy_failures_total") == 1
    assert metric(server.metrics_port, "smtpd_connections_total") == 0


def test_a_late_header_times_out_without_a_byte(proxy_server):
    server = proxy_server("--proxy-timeout", "2")
    with connect(server.port, b"PROXY TCP4 192.0.2.7 ") as sock:
        started = time.monotonic()
        assert read_all(sock) == b""
        waited = time.monotonic() - started
    assert waited >= 1.5  # not closed before its time (the upper bound is the socket's 30 s)
    wait_until(
        lambda: server.log_count("PROXY header refused: no complete header within 2 s (21 bytes received)"),
        what="the timeout in the log",
    )
    assert metric(server.metrics_port, "smtpd_proxy_failures_total") == 1


def test_the_header_timeout_defaults_to_5_seconds(tmp_path):
    settings, _ = settings_from_args(["--mail-dir", str(tmp_path)])
    assert settings.proxy_timeout == 5


def test_a_v2_local_header_is_greeted_as_the_proxy_itself(proxy_server):
    server = proxy_server()
    with connect(server.port, encode_v2(command="LOCAL") + b"EHLO balancer\r\nXSTAT PROXIED\r\n") as sock:
        local_port = sock.getsockname()[1]
        replies = read_replies(sock, 3)
        assert replies[0].startswith(b"220 ")
        assert replies[-1].endswith(b"trusted proxy: 1")
        assert b"250 2.0.0 Ok: queued as" in send_mail(sock)
    (stored,) = wait_until(lambda: server.stored("b"), what="the mail")
    assert b"Received: from balancer ([127.0.0.1])" in stored.read_bytes()
    needle = f"[127.0.0.1]:{local_port} connected (via proxy [127.0.0.1]:{local_port}, PROXY v2 LOCAL: "
    wait_until(lambda: server.log_count(needle), what="the LOCAL session in the log")
    assert metric(server.metrics_port, "smtpd_proxy_failures_total") == 0


UNKNOWN_FAMILIES = {
    "v1 UNKNOWN": (b"PROXY UNKNOWN\r\n", "PROXY v1 UNKNOWN: no client address"),
    "v1 UNKNOWN with addresses": (b"PROXY UNKNOWN ::1 ::1 1 2\r\n", "PROXY v1 UNKNOWN: no client address"),
    "v2 UNSPEC": (encode_v2(family="UNSPEC"), "PROXY v2 UNSPEC: no client address"),
    "v2 UNIX": (encode_v2(("/run/a.sock", None), ("/run/b.sock", None), family="UNIX"), "PROXY v2 UNIX: no client"),
}


@pytest.mark.parametrize("name", UNKNOWN_FAMILIES)
def test_an_unknown_address_family_keeps_the_proxy_as_the_peer(proxy_server, name):
    header, note = UNKNOWN_FAMILIES[name]
    server = proxy_server()
    with connect(server.port, header + b"EHLO x\r\nQUIT\r\n") as sock:
        local_port = sock.getsockname()[1]
        answer = read_all(sock)
    assert answer.startswith(b"220 ") and answer.endswith(b"221 2.0.0 mx.test Bye\r\n")
    wait_until(
        lambda: server.log_count(f"[127.0.0.1]:{local_port} connected (via proxy [127.0.0.1]:{local_port}, {note}"),
        what="the session in the log",
    )


def test_pipelined_bytes_behind_the_header_reach_the_session(proxy_server):
    server = proxy_server()
    pipelined = b"EHLO a\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nDATA\r\n"
    with connect(server.port, HEADERS["v2"] + pipelined) as sock:
        replies = read_replies(sock, 5)
        assert replies[-1].startswith(b"354 ")


def _server_side_unread(server_port: int, client_port: int) -> int | None:
    """Bytes the server has not yet read from the connection (``rx_queue``
    in /proc/net/tcp), None while the client's own bytes are still unacked."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            rows += [line.split() for line in f.readlines()[1:]]
    server_row = client_row = None
    for row in rows:
        local, remote, queues = int(row[1].rsplit(":", 1)[1], 16), int(row[2].rsplit(":", 1)[1], 16), row[4]
        tx, rx = (int(q, 16) for q in queues.split(":"))
        if (local, remote) == (server_port, client_port):
            server_row = rx
        if (local, remote) == (client_port, server_port):
            client_row = tx
    if server_row is None or client_row != 0:
        return None
    return server_row


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_header_split_at_every_byte(proxy_server, version):
    """Each connection sends its header in two parts, the second only once
    the server has taken the first off the socket; each is greeted, and the
    log names the client port its own header gave. (The header timeout is
    long: on a loaded machine the first connections wait for the last.)"""
    server = proxy_server("--proxy-timeout", "600")
    header_of = {
        "v1": lambda port: encode_v1(("192.0.2.7", port), SERVER_SIDE),
        "v2": lambda port: encode_v2(("192.0.2.7", port), SERVER_SIDE),
    }
    size = len(header_of[version](1000))
    connections = []
    for split in range(1, size + 1):
        header = header_of[version](1000 + split)
        assert len(header) == size
        sock = connect(server.port, header[:split])
        connections.append((split, sock, header[split:]))
    for split, sock, _ in connections:
        wait_until(
            lambda s=sock: _server_side_unread(server.port, s.getsockname()[1]) == 0,
            timeout=60, what=f"the server to take the first {split} bytes",
        )
    for split, sock, rest in connections:
        sock.sendall(rest + b"EHLO x\r\nQUIT\r\n")
    for split, sock, _ in connections:
        with sock:
            answer = read_all(sock)
        assert answer.startswith(b"220 ") and answer.endswith(b"221 2.0.0 mx.test Bye\r\n"), (split, answer)
    for split, _, _ in connections:
        wait_until(lambda p=1000 + split: server.log_count(f"[192.0.2.7]:{p} connected (via proxy"), what=str(split))
    assert metric(server.metrics_port, "smtpd_proxy_failures_total") == 0


def test_the_per_address_limit_counts_the_conveyed_address(proxy_server):
    server = proxy_server("--max-connections-per-ip", "2")
    same = []
    for n in range(3):  # one after the other: the third is the one over the limit
        same.append(connect(server.port, encode_v1(("192.0.2.7", 5000 + n), SERVER_SIDE)))
        if n < 2:
            assert read_replies(same[-1], 1)[0].startswith(b"220 ")
    assert read_all(same[2]) == b"421 4.7.0 mx.test Error: too many connections from your address, try again later\r\n"
    with connect(server.port, encode_v1(("192.0.2.8", 5000), SERVER_SIDE)) as other:
        assert read_replies(other, 1)[0].startswith(b"220 ")  # another client, the same proxy
    for sock in same:
        sock.close()
    wait_until(lambda: server.log_count("[192.0.2.7]:5002 refused: too many connections from your address"),
               what="the refusal in the log")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def smtps_behind_a_proxy(proxy_server, ca, tmp_path, *extra: str, **kw):
    """A server whose SMTP and smtps ports read a PROXY header; (server, smtps port)."""
    issued = ca.issue_cert("mx.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(p.bytes() for p in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    smtps = free_port()
    server = proxy_server(
        "--proxy-protocol", "smtp,smtps", "--smtps-port", str(smtps), "--tls-cert", str(cert), "--tls-key", str(key),
        *extra, **kw,
    )
    return server, smtps


def test_smtps_reads_the_header_before_the_handshake(proxy_server, ca, tmp_path):
    """The header, then the ClientHello in the same segment: the handshake
    gets exactly the bytes behind the header."""
    server, smtps = smtps_behind_a_proxy(proxy_server, ca, tmp_path)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="mx.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    with connect(smtps, HEADERS["v2"] + outgoing.read()) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if data := outgoing.read():
                    sock.sendall(data)
                chunk = sock.recv(65536)
                assert chunk, "closed during the handshake"
                incoming.write(chunk)
        if data := outgoing.read():
            sock.sendall(data)
        greeting = b""
        while not greeting.endswith(b"\r\n"):
            try:
                greeting += tls.read(4096)
            except ssl.SSLWantReadError:
                incoming.write(sock.recv(65536))
        assert greeting.startswith(b"220 mx.test")
    wait_until(lambda: server.log_count("[192.0.2.7]:4711 connected to the smtps port (via proxy"),
               what="the smtps session in the log")


def test_smtps_handshakes_under_way_count_as_the_client_the_header_names(proxy_server, ca, tmp_path):
    # Behind the balancer the handshakes under way count toward
    # --max-connections-per-ip as the client each header names, not as
    # the balancer (which would lock every client out at once).
    server, smtps = smtps_behind_a_proxy(
        proxy_server, ca, tmp_path, "--max-connections-per-ip", "2", "--tls-handshake-timeout", "60", workers=1,
    )

    def header(host: str, port: int) -> bytes:
        return encode_v2((host, port), SERVER_SIDE)

    # One worker takes them in order; none sends a ClientHello.
    held = [connect(smtps, header("192.0.2.8", 4700))]
    held += [connect(smtps, header("192.0.2.7", port)) for port in (4711, 4712)]
    over = connect(smtps, header("192.0.2.7", 4713), timeout=20)
    assert over.recv(100) == b""  # closed at once, before any handshake
    over.close()
    wait_until(lambda: server.log_count("[192.0.2.7]:4713 refused before the TLS handshake:"
                                        " too many connections from your address"), what="the refusal in the log")
    assert server.log_count("refused before the TLS handshake") == 1  # the other client's and the first two went on
    for sock in held:
        sock.close()


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--proxy-protocol", "smtp"], "--proxy-protocol needs --trusted-proxies"),
        (["--proxy-protocol", "smtp,pop3", "--trusted-proxies", "10.0.0.0/8"], "unknown listener 'pop3'"),
        (["--proxy-protocol", "smtp", "--trusted-proxies", "10.0.0.1/8"], "--trusted-proxies: '10.0.0.1/8'"),
        (["--proxy-protocol", "submission", "--trusted-proxies", "10.0.0.1"], "the submission port is off"),
        (["--proxy-timeout", "0"], "proxy_timeout must be between 1 and 3600"),
    ],
)
def test_bad_proxy_settings_stop_the_start(flags, problem, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        settings_from_args(["--mail-dir", str(tmp_path), *flags])
    assert exited.value.code == 2
    assert problem in capsys.readouterr().err


def test_the_proxy_settings_from_a_config_file(tmp_path):
    conf = tmp_path / "s.toml"
    conf.write_text('proxy_protocol = "smtp"\ntrusted_proxies = "10.0.0.0/24,2001:db8::/64"\nproxy_timeout = 3\n')
    settings, _ = settings_from_args(["--config", str(conf), "--mail-dir", str(tmp_path)])
    assert (settings.proxy_protocol, settings.trusted_proxies, settings.proxy_timeout) == (
        "smtp", "10.0.0.0/24,2001:db8::/64", 3
    )


def test_a_reload_puts_the_port_behind_the_balancer(start_server, tmp_path):
    """--proxy-protocol changes on reload: the old workers finish their
    direct sessions, the new ones read a header first."""
    conf = tmp_path / "s.toml"
    conf.write_text('trusted_proxies = "127.0.0.1"\n')
    server = start_server("--config", str(conf))
    old = set(server.worker_pids())
    direct = server.client()
    assert direct.cmd("EHLO before")[0] == 250
    conf.write_text('trusted_proxies = "127.0.0.1"\nproxy_protocol = "smtp"\n')
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload done" in server.log_text(), what="the reload")
    wait_until(lambda: not (old & set(server.accepting_workers())), what="old workers to stop accepting")
    with connect(server.port, HEADERS["v1"] + b"EHLO after\r\nQUIT\r\n") as sock:
        assert read_all(sock).endswith(b"221 2.0.0 mx.test Bye\r\n")
    wait_until(lambda: server.log_count("[192.0.2.7]:4711 connected (via proxy"), what="the proxied session")
    assert direct.cmd("NOOP")[0] == 250  # the session begun before the reload goes on
    assert direct.cmd("QUIT")[0] == 221


def test_relay_rights_follow_the_conveyed_address_not_the_balancer(proxy_server):
    """The balancer (127.0.0.1) is in --relay-networks, the conveyed client
    is not: no relay for it; a client the header places inside the relay
    network may relay. An open relay behind a balancer is the classic slip."""
    server = proxy_server("--relay-networks", "127.0.0.0/8,198.51.100.0/24", "--relay-host", f"127.0.0.1:{free_port()}")
    outside = encode_v2(CLIENT, SERVER_SIDE)  # 192.0.2.7: not in the relay networks
    with connect(server.port, outside + b"EHLO client.example\r\nMAIL FROM:<a@smtpd.com>\r\n"
                 b"RCPT TO:<bob@example.org>\r\nQUIT\r\n") as sock:
        replies = read_all(sock).split(b"\r\n")
    assert b"550 5.7.1 Error: relay access denied; recipient domain not served here" in replies
    inside = encode_v2(("198.51.100.9", 4712), SERVER_SIDE)
    with connect(server.port, inside + b"EHLO client.example\r\nMAIL FROM:<a@smtpd.com>\r\n"
                 b"RCPT TO:<bob@example.org>\r\nQUIT\r\n") as sock:
        replies = read_all(sock).split(b"\r\n")
    assert any(line.startswith(b"250 2.1.5") for line in replies), replies


def test_a_retiring_worker_waits_for_a_proxy_header_it_is_reading(proxy_server):
    # On a PROXY port the connection is made only once the header is read
    # (within --proxy-timeout). A worker told to leave (HUP, as a reload
    # does) while it read one held no connection yet: it left at once and
    # the balancer's client was dropped without a greeting.
    server = proxy_server("--proxy-timeout", "120", workers=1)
    wait_until(lambda: len(server.accepting_workers()) == 1, what="a worker to accept")
    (worker,) = server.accepting_workers()
    header = HEADERS["v1"]
    with connect(server.port, header[:10]) as sock:  # half a header: the worker waits for the rest
        client_port = sock.getsockname()[1]

        def accepted() -> bool:
            return any(c.raddr and c.raddr.port == client_port for c in psutil.Process(worker).net_connections("tcp"))

        wait_until(accepted, what="the worker to accept the connection")
        os.kill(worker, signal.SIGHUP)

        def left_or_leaving() -> bool:
            try:
                return "leaving" in " ".join(psutil.Process(worker).cmdline())
            except psutil.NoSuchProcess:
                return True

        wait_until(left_or_leaving, what="the worker to take the HUP")
        sock.sendall(header[10:] + b"NOOP\r\nQUIT\r\n")
        replies = read_replies(sock, 3)
        assert replies[0].startswith(b"220 "), replies
        assert replies[1].startswith(b"250 ") and replies[2].startswith(b"221 "), replies
    wait_until(lambda: worker not in server.worker_pids(), what="the retired worker to leave")
    assert server.log_count("[192.0.2.7]:4711 connected (via proxy [127.0.0.1]:")


def test_a_header_that_names_no_client_gives_no_relay_rights(proxy_server):
    """PROXY UNKNOWN (v1) says the balancer does not know the client: the
    connection's own peer (the balancer, in --relay-networks) stands for the
    log, but its relay rights must not pass to a client nobody can name."""
    server = proxy_server("--relay-networks", "127.0.0.0/8", "--relay-host", f"127.0.0.1:{free_port()}")
    with connect(server.port, encode_v1() + b"EHLO client.example\r\nMAIL FROM:<a@smtpd.com>\r\n"
                 b"RCPT TO:<bob@example.org>\r\nQUIT\r\n") as sock:
        replies = read_all(sock).split(b"\r\n")
    assert b"550 5.7.1 Error: relay access denied; recipient domain not served here" in replies, replies
    assert not any(line.startswith(b"250 2.1.5") for line in replies), replies
