"""A burst of password checks never stalls the event loop.

200 clients send AUTH PLAIN at once against a users file with a real
ARGON2ID hash (what prefork-smtpd-users writes: 64 MiB, three passes), on
one worker, while a client on another connection that was already open
sends NOOP after NOOP. The checks run in the worker's thread pool; the
loop only reads the lines and hands them over, so it keeps answering.

What the test asserts is what cannot flake on a slow, shared machine:
NOOP round trips keep completing while at least half of the AUTHs are
unanswered, and the server has read all 200 AUTH lines while most of them
are still unanswered (they are really in flight, not waiting unread in
the kernel). Checking the passwords on the loop instead holds every NOOP
behind the queued hashes: none comes back until the burst is over. The NOOP
round-trip times themselves (the issue's 50 ms at the 99th percentile) are
measured and reported, not asserted: on a loaded machine they measure the
machine.
"""

from __future__ import annotations

import base64
import math
import selectors
import socket
import threading
import time
import urllib.request

import pytest
from harness import Client, free_port
from prometheus_client.parser import text_string_to_metric_families

from prefork_smtpd.users import hash_password

BURST = 200
PACE = 0.005  # seconds between two NOOP round trips
PASSWORD = "correct horse battery"


def unread_by_server(server_port: int, client_ports: set[int]) -> int:
    """Bytes the server's sockets to these clients hold unread (the kernel's
    receive queues, /proc/net/tcp: rx_queue of ESTABLISHED sockets)."""
    unread = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for row in table:
            fields = row.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if fields[3] == "01" and local_port == server_port and remote_port in client_ports:
                unread += int(fields[4].split(":")[1], 16)
    return unread


class Replies(threading.Thread):
    """Collects the one reply each AUTH client gets, with the time it came."""

    def __init__(self, clients: list[Client]) -> None:
        super().__init__(daemon=True)
        self.selector = selectors.DefaultSelector()
        self.buffers: dict[socket.socket, bytes] = {}
        for c in clients:
            self.selector.register(c.sock, selectors.EVENT_READ)
            self.buffers[c.sock] = b""
        self.codes: list[int] = []
        self.times: list[float] = []
        self.pending = len(clients)

    def run(self) -> None:
        while self.pending:
            for key, _ in self.selector.select(timeout=1):
                sock = key.fileobj
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""  # reset: no reply (code 0)
                self.buffers[sock] += data
                if b"\r\n" in self.buffers[sock] or not data:
                    self.selector.unregister(sock)
                    self.codes.append(int(self.buffers[sock][:3] or b"0"))
                    self.times.append(time.perf_counter())
                    self.pending -= 1


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


@pytest.mark.slow
@pytest.mark.timeout(900)  # 200 argon2id checks: a minute or two of both cores on a loaded machine
def test_200_simultaneous_auths_leave_a_noop_on_another_connection_answered(start_server, tmp_path, record_property):
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password(PASSWORD)}\n")
    assert users.read_text().startswith("alice:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$")
    mport = free_port()
    server = start_server(
        "--users", str(users), "--max-auth-checks", str(BURST), "--metrics-port", str(mport), workers=1,
    )
    probe = Client(server.port, timeout=600)  # the other connection, open before the burst
    probe.cmd("EHLO probe.example")
    clients = [Client(server.port, timeout=600) for _ in range(BURST)]
    for c in clients:
        assert c.cmd("EHLO c.example")[0] == 250  # AUTH is offered in the clear to a loopback client
    assert probe.xstat("CURRENT") == BURST + 1  # the server has every connection
    client_ports = {c.sock.getsockname()[1] for c in clients}
    replies = Replies(clients)
    replies.start()
    line = b"AUTH PLAIN " + base64.b64encode(f"\0alice\0{PASSWORD}".encode()) + b"\r\n"
    for c in clients:
        c.send(line)

    # NOOP round trips on the probe from now until the last AUTH reply:
    # (start, end, AUTHs unanswered at the start, AUTHs unanswered at the end).
    samples: list[tuple[float, float, int, int]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def noops() -> None:
        try:
            while replies.pending and not stop.is_set():
                before = replies.pending
                started = time.perf_counter()
                probe.send(b"NOOP\r\n")
                code, text = probe.reply()
                assert code == 250, text
                samples.append((started, time.perf_counter(), before, replies.pending))
                # Paced like a client, not a spin: a spinning probe would take
                # a core from the very checks the burst is about.
                time.sleep(PACE)
        except BaseException as exc:  # noqa: BLE001: reported by the test
            errors.append(exc)

    # In flight: the server has read every AUTH line (nothing waits in its
    # sockets' receive queues) while most are still unanswered.
    unanswered_when_read: list[int] = []

    def watch_reads() -> None:
        while replies.pending and not stop.is_set():
            if unread_by_server(server.port, client_ports) == 0:
                unanswered_when_read.append(replies.pending)
                return
            time.sleep(0.01)

    threads = [threading.Thread(target=noops, daemon=True), threading.Thread(target=watch_reads, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        replies.join(timeout=600)
        for thread in threads:
            thread.join(timeout=60)
    finally:
        stop.set()
    during = [end - start for start, end, _, _ in samples]
    in_the_thick = [s for s in samples if s[2] >= BURST // 2 and s[3] >= BURST // 2]
    p99 = percentile(during, 99) * 1000 if during else math.inf
    report = (
        f"NOOP round trips during {BURST} AUTHs (ARGON2ID): {len(during)} samples"
        + (
            f" over {samples[-1][1] - samples[0][0]:.1f} s, p50 {percentile(during, 50) * 1000:.2f} ms,"
            f" p99 {p99:.2f} ms, max {max(during) * 1000:.2f} ms"
            if during else ""
        )
        + f"; {len(in_the_thick)} while {BURST // 2} or more AUTHs were unanswered;"
        f" {unanswered_when_read[0] if unanswered_when_read else '-'} unanswered when the server"
        f" had read every AUTH line; probe errors: {errors or 'none'}"
    )
    print(report)
    record_property("noop_p99_ms", round(p99, 2))
    assert len(in_the_thick) >= 20, report
    assert unanswered_when_read and unanswered_when_read[0] >= BURST // 2, report
    assert not errors, report
    assert not replies.is_alive(), f"{replies.pending} AUTHs unanswered"
    assert replies.codes == [235] * BURST  # every one was checked (no 454: --max-auth-checks)

    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
    attempts = {
        (s.labels["mechanism"], s.labels["result"]): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name == "smtpd_auth_attempts_total"
    }
    assert attempts[("PLAIN", "success")] == BURST
    assert sum(attempts.values()) == BURST
