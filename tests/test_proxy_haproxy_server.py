"""The server behind a real HAProxy speaking the PROXY protocol.

HAProxy (``mode tcp``) listens on a free port and passes each connection to
the server with ``send-proxy`` or ``send-proxy-v2``; it connects from
127.0.0.1, the one address the server trusts. The test clients bind
127.0.0.2 and 127.0.0.3 (any 127.0.0.0/8 address is the host's own on
Linux, no root needed), so an address the server logs or stores can only
have come from the header. Needs Debian's ``haproxy``.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import socket
import tempfile

import pytest
from harness import free_port, wait_until
from test_operations import tool
from test_proxy_haproxy import HAPROXY, start_haproxy  # noqa: F401 (a fixture)
from test_proxy_server import metric, read_all, read_replies

pytestmark = [
    pytest.mark.skipif(HAPROXY is None, reason="needs HAProxy: install the Debian package 'haproxy'"),
    pytest.mark.slow,
]

PROXY_FLAGS = ("--proxy-protocol", "smtp", "--trusted-proxies", "127.0.0.1")


def client_from(source: str, port: int) -> socket.socket:
    """A connection to ``port`` from the loopback address ``source``."""
    return socket.create_connection(("127.0.0.1", port), timeout=60, source_address=(source, 0))


@pytest.fixture
def behind_haproxy(start_server, start_haproxy):  # noqa: F811
    """Factory: (server, haproxy port) for HAProxy server options and server flags."""

    def start(server_options: str, *flags: str, **haproxy_kw):
        metrics_port = free_port()
        server = start_server(*PROXY_FLAGS, "--metrics-port", str(metrics_port), *flags)
        server.metrics_port = metrics_port
        return server, start_haproxy(server.port, server_options, **haproxy_kw)

    return start


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_a_mail_through_haproxy_names_the_client(behind_haproxy, send):
    server, port = behind_haproxy(send)
    with client_from("127.0.0.2", port) as sock:
        client_port = sock.getsockname()[1]
        assert read_replies(sock, 1)[0].startswith(b"220 mx.test")
        sock.sendall(b"EHLO client.example\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nDATA\r\n")
        assert read_replies(sock, 4)[-1].startswith(b"354 ")
        sock.sendall(b"Subject: through the balancer\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        assert b"250 2.0.0 Ok: queued as" in read_all(sock)
    (stored,) = wait_until(lambda: server.stored("b"), timeout=60, what="the mail")
    assert b"Received: from client.example ([127.0.0.2])" in stored.read_bytes()
    version = "v2" if send.endswith("v2") else "v1"
    wait_until(
        lambda: server.log_count(f"[127.0.0.2]:{client_port} connected (via proxy [127.0.0.1]:"), timeout=60,
        what="the client's address in the log",
    )
    assert f"[127.0.0.2]:{client_port} mail " in server.log_text()
    assert f", PROXY {version})" in server.log_text()
    assert metric(server.metrics_port, "smtpd_proxy_failures_total") == 0


def haproxy_server_row(stats_socket: str) -> dict[str, str]:
    """Our server's row of HAProxy's ``show stat`` (CSV)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(stats_socket)
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
    return next(row for row in rows if row["pxname"] == "smtp_servers" and row["svname"] == "s1")


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_smtpchk_health_checks_keep_the_server_up_and_refuse_nothing(behind_haproxy, send):
    folder = tempfile.mkdtemp(prefix="hap")  # a short path: a UNIX socket's name has 108 bytes at most
    stats_socket = f"{folder}/stats.sock"
    try:
        server, port = behind_haproxy(
            f"{send} check inter 300ms fall 1 rise 1",
            backend_lines="    option smtpchk HELO balancer.example\n",
            global_lines=f"    stats socket {stats_socket} mode 600 level admin\n",
        )
        # Several checks, each greeted and answered: L7OK is a passed SMTP check.
        wait_until(lambda: server.log_count("HELO balancer.example") >= 3, timeout=60, what="three health checks")
        row = haproxy_server_row(stats_socket)
        # HAProxy writes "* L7OK" while the next check is in progress: the last result is what counts.
        last_check = row["check_status"].removeprefix("* ")
        assert (row["status"], last_check, row["chkfail"]) == ("UP", "L7OK", "0"), row
        # Through the balancer all the while: a client still gets in.
        with client_from("127.0.0.2", port) as sock:
            assert read_replies(sock, 1)[0].startswith(b"220 ")
        assert metric(server.metrics_port, "smtpd_proxy_failures_total") == 0
        assert metric(server.metrics_port, "smtpd_connections_refused_total") == 0
        if send.endswith("v2"):
            assert server.log_count("PROXY v2 LOCAL: the proxy itself, a health check") >= 3
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_per_address_limit_applies_to_the_client_behind_haproxy(behind_haproxy):
    server, port = behind_haproxy("send-proxy-v2", "--max-connections-per-ip", "2")
    held = []
    try:
        for _ in range(2):
            sock = client_from("127.0.0.2", port)
            held.append(sock)
            assert read_replies(sock, 1)[0].startswith(b"220 ")
        with client_from("127.0.0.2", port) as third:
            third_port = third.getsockname()[1]
            assert read_all(third) == (
                b"421 4.7.0 mx.test Error: too many connections from your address, try again later\r\n"
            )
        with client_from("127.0.0.3", port) as other:  # another client through the same balancer
            assert read_replies(other, 1)[0].startswith(b"220 ")
    finally:
        for sock in held:
            sock.close()
    wait_until(
        lambda: server.log_count(f"[127.0.0.2]:{third_port} refused: too many connections from your address"),
        timeout=60, what="the refusal in the log",
    )
    assert metric(server.metrics_port, "smtpd_connections_refused_total") == 1


def test_the_monitor_counts_sessions_behind_the_balancer(behind_haproxy):
    """prefork-smtpd-metrics -n on a PROXY port: every socket's peer is the
    balancer, every session came through it, and the figures still agree."""
    server, port = behind_haproxy("send-proxy-v2")
    held = [client_from("127.0.0.2", port) for _ in range(3)]
    try:
        for sock in held:
            assert read_replies(sock, 1)[0].startswith(b"220 ")
        wait_until(lambda: server.log_count("connected (via proxy") == 3, timeout=60, what="three sessions")

        def agreeing_sample():
            r = tool(
                "metrics", "-P", str(server.port), "-n", "--send-proxy", "--trusted-proxies", "127.0.0.1",
                "--once", "--json",
            )
            assert r.returncode == 0, r.stdout + r.stderr
            sample = json.loads(r.stdout)
            # The socket table and XSTAT are read one after the other: a
            # connection opening or closing between the two (the balancer's
            # own) shows in one only. A second look settles it.
            return sample if sample["os_established"] == sample["current"] else None

        sample = wait_until(agreeing_sample, timeout=30, interval=0.5, what="the socket table and XSTAT agreeing")
        # 3 clients + the monitor's own LOCAL session, each one socket from 127.0.0.1
        assert sample["current"] == sample["os_established"] == 4
        assert sample["proxied"] == sample["os_from_proxies"] == 4
        assert sample["difference"] == 0 and sample["clients"] == 3
    finally:
        for sock in held:
            sock.close()
