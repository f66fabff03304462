"""The PROXY parser against what a real HAProxy sends.

HAProxy (``mode tcp``, ``send-proxy`` or ``send-proxy-v2``) stands between a
test client and a small recording server that parses each connection's
header with ``ProxyParser``; the header must name the client's own address
and port, and the client's bytes must follow it untouched. Needs the Debian
package ``haproxy`` (``./run-tests`` installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import psutil
import pytest
from harness import free_port, wait_until

from prefork_smtpd.proxy import PP2_TYPE_CRC32C, PP2_TYPE_UNIQUE_ID, ProxyHeader, ProxyParser, ProxyResult

HAPROXY = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.access(p, os.X_OK)), None)
pytestmark = [
    pytest.mark.skipif(
        HAPROXY is None, reason="needs HAProxy: install the Debian package 'haproxy' (apt-get install haproxy)"
    ),
    pytest.mark.slow,  # starts a haproxy per test
]


def loopback_v6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class RecordingServer:
    """Accepts connections, parses each one's PROXY header and keeps the
    outcome with every byte that came after the header."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.records: list[dict] = []
        self.lock = threading.Lock()
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        parser, outcome = ProxyParser(), None
        with conn:
            try:
                while outcome is None:
                    data = conn.recv(4096)
                    outcome = parser.feed(data) if data else parser.eof()
                record = {"outcome": outcome, "after": bytearray()}
                if isinstance(outcome, ProxyResult):
                    record["after"] += outcome.rest
                with self.lock:
                    self.records.append(record)
                while isinstance(outcome, ProxyResult) and (data := conn.recv(4096)):
                    with self.lock:
                        record["after"] += data
            except OSError:
                pass

    def find(self, predicate):
        with self.lock:
            return next((r for r in self.records if predicate(r["outcome"])), None)

    def close(self) -> None:
        self.closing = True
        self.listener.close()


def haproxy_listening(pid: int, port: int) -> bool:
    try:
        connections = psutil.Process(pid).net_connections(kind="inet")
    except psutil.NoSuchProcess:
        raise AssertionError("haproxy exited") from None
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections)


@pytest.fixture
def recording_server():
    server = RecordingServer()
    yield server
    server.close()


@pytest.fixture
def start_haproxy(tmp_path: Path):
    """start_haproxy(backend_port, server_options, frontend_lines, backend_lines=, global_lines=) -> frontend port."""
    processes: list[subprocess.Popen] = []

    def start(
        backend_port: int, server_options: str, frontend_lines: str = "", *, backend_lines: str = "",
        global_lines: str = "",
    ) -> int:
        for attempt in range(3):  # a free port can be taken by someone else meanwhile
            port = free_port()
            binds = f"    bind 127.0.0.1:{port}\n" + (f"    bind [::1]:{port}\n" if loopback_v6() else "")
            config = tmp_path / f"haproxy{len(processes)}.cfg"
            config.write_text(
                f"global\n    nbthread 1\n    maxconn 64\n{global_lines}"
                "defaults\n    mode tcp\n    timeout connect 20s\n    timeout client 60s\n    timeout server 60s\n"
                f"frontend smtp_in\n{binds}{frontend_lines}    default_backend smtp_servers\n"
                f"backend smtp_servers\n{backend_lines}    server s1 127.0.0.1:{backend_port} {server_options}\n"
            )
            log_path = tmp_path / f"haproxy{len(processes)}.log"
            with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
                proc = subprocess.Popen([HAPROXY, "-f", str(config), "-db"], stdout=log, stderr=subprocess.STDOUT)
            processes.append(proc)
            try:
                wait_until(lambda p=proc, q=port: haproxy_listening(p.pid, q), timeout=30, what="haproxy to listen")
                return port
            except AssertionError:
                if attempt == 2:
                    raise AssertionError(f"haproxy did not start: {log_path.read_text()}") from None
        raise AssertionError("unreachable")

    yield start
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def connect_through(port: int, host: str, payload: bytes) -> tuple[socket.socket, tuple[str, int]]:
    client = socket.create_connection((host, port), timeout=30)
    client.sendall(payload)
    return client, client.getsockname()[:2]


def family_params():
    params = [pytest.param("127.0.0.1", "TCP4", id="ipv4")]
    if loopback_v6():
        params.append(pytest.param("::1", "TCP6", id="ipv6"))
    return params


@pytest.mark.parametrize("host, family", family_params())
@pytest.mark.parametrize("send, version", [("send-proxy", 1), ("send-proxy-v2", 2)])
def test_haproxy_header_names_the_real_client(recording_server, start_haproxy, send, version, host, family):
    port = start_haproxy(recording_server.port, send)
    payload = b"EHLO client.example\r\nMAIL FROM:<a@smtpd.com>\r\n"
    client, (client_ip, client_port) = connect_through(port, host, payload)
    with client:
        record = wait_until(
            lambda: recording_server.find(
                lambda o: isinstance(o, ProxyResult) and o.header.source == (client_ip, client_port)
            ),
            timeout=60,
            what="the proxied connection",
        )
        assert record["outcome"].header == ProxyHeader(version, "PROXY", family, (client_ip, client_port), (host, port))
        wait_until(lambda: bytes(record["after"]) == payload, timeout=60, what="the client's bytes after the header")
    assert bytes(record["after"]) == payload


def test_haproxy_v2_checksum_unique_id_and_local_health_checks(recording_server, start_haproxy):
    """HAProxy's own CRC32C passes our check, its UNIQUE_ID TLV arrives, and
    its health checks come as LOCAL headers without an address."""
    port = start_haproxy(
        recording_server.port,
        "send-proxy-v2 proxy-v2-options crc32c,unique-id check inter 200ms",
        "    unique-id-format %ci-%cp\n",
    )
    client, (client_ip, client_port) = connect_through(port, "127.0.0.1", b"QUIT\r\n")
    with client:
        record = wait_until(
            lambda: recording_server.find(
                lambda o: isinstance(o, ProxyResult) and o.header.source == (client_ip, client_port)
            ),
            timeout=60,
            what="the proxied connection",
        )
    header = record["outcome"].header
    assert header.tlvs[PP2_TYPE_UNIQUE_ID] == f"{client_ip}-{client_port}".encode()
    assert len(header.tlvs[PP2_TYPE_CRC32C]) == 4
    check = wait_until(
        lambda: recording_server.find(lambda o: isinstance(o, ProxyResult) and o.header.command == "LOCAL"),
        timeout=60,
        what="a health check",
    )
    assert check["outcome"].header == ProxyHeader(2, "LOCAL", "UNSPEC")
    with recording_server.lock:
        refused = [r["outcome"] for r in recording_server.records if not isinstance(r["outcome"], ProxyResult)]
    assert not refused
