"""What a client can make a worker hold stays bounded.

Each test drives a real server with a single worker (so its memory can be
watched with psutil) through raw sockets that behave badly: never reading,
flooding, holding messages open, pipelining behind a message that cannot be
stored yet.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from harness import DOMAIN, Client, raise_fd_limit, wait_until
from sansio import Wired

from prefork_smtpd import replies
from prefork_smtpd.session import Limits, Session, State

MB = 1000 * 1000
MiB = 1024 * 1024
TCP_ESTABLISHED = 1  # tcpi_state in struct tcp_info (linux/tcp.h)


def worker_rss(server) -> int:
    (pid,) = server.worker_pids()
    return psutil.Process(pid).memory_info().rss


# glibc keeps freed memory for reuse: after a burst of 256 KB reads, RSS
# stays up by what the allocator's heap kept (5 to 50 MB after the same
# flood), not by what the worker holds. With a fixed mmap threshold (which
# also turns off glibc's rising one) and a low trim threshold, big buffers
# go back to the system when freed, and RSS follows what is live.
RETURNING_ALLOCATOR = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=131072"}


def worker_anonymous(server) -> int:
    """The worker's private anonymous memory (heap and mmaps): what it
    allocated, without the pages of code and libraries it touched since
    (a compiled module's code counts in RSS, not here)."""
    (pid,) = server.worker_pids()
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no Anonymous line in /proc/{pid}/smaps_rollup")


def worker_rests_with_input_waiting(server, settle: float = 1.0, timeout: float = 180) -> int:
    """Wait until the worker uses no CPU while bytes wait unread in its
    sockets: it stopped reading on its own, not for want of a turn (a
    flood's sender also stalls when the worker is merely slow). Returns
    the unread bytes."""
    (pid,) = server.worker_pids()
    process = psutil.Process(pid)

    def resting() -> int:
        before = sum(process.cpu_times()[:2])
        time.sleep(settle)
        busy = sum(process.cpu_times()[:2]) - before
        unread = unread_bytes_at(server.port)
        return unread if busy < settle / 10 and unread else 0

    return wait_until(resting, timeout=timeout, interval=0, what="the worker to rest with input unread")


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of our end: ESTABLISHED until the peer closes or resets."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def raw_client(port: int) -> socket.socket:
    """A client with the smallest receive buffer: our replies pile up on the server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: sets the window
    sock.connect(("127.0.0.1", port))
    return sock


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes still in our send queue: not yet taken by the server's kernel."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def unread_bytes_at(port: int) -> int:
    """Bytes waiting in the receive queues of the server's sockets on ``port``."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # ESTABLISHED
            total += int(fields[4].split(":")[1], 16)
    return total


class Flood(threading.Thread):
    """Send ``total`` bytes made of ``unit`` on ``sock``, never reading.

    Gives up once the server has taken nothing for ``stall`` seconds (it has
    stopped reading: ``stalled`` is set), when ``stop`` is set, or when the
    server drops the connection (``error``).
    """

    def __init__(self, sock: socket.socket, unit: bytes, total: int, stall: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.chunk = unit * (65536 // len(unit))
        self.total = total
        self.stall = stall
        self.sent = 0
        self.stalled = False
        self.error: OSError | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        self.sock.settimeout(0.2)
        last_progress = time.monotonic()
        while self.sent < self.total and not self.stop.is_set():
            try:
                self.sent += self.sock.send(self.chunk)
                last_progress = time.monotonic()
            except TimeoutError:
                if time.monotonic() - last_progress > self.stall:
                    self.stalled = True
                    return
            except OSError as exc:
                self.error = exc
                return


def flood_and_watch(server, flood: Flood, bound: int) -> int:
    """Run ``flood``; return the worker's RSS growth, cutting the flood short past ``bound``."""
    return floods_and_watch(server, [flood], bound, timeout=120)


def floods_and_watch(
    server, floods: list[Flood], bound: int, timeout: float = 180, measure: Callable[[object], int] = worker_rss,
) -> int:
    """Run ``floods`` at once; return the worker's peak growth by ``measure``
    (RSS unless told), cutting them short past ``bound``."""
    before = measure(server)
    peak = 0

    def over_or_done() -> bool:
        nonlocal peak
        peak = max(peak, measure(server) - before)
        return peak > bound or not any(f.is_alive() for f in floods)

    for flood in floods:
        flood.start()
    try:
        wait_until(over_or_done, timeout=timeout, interval=0.05, what="the floods to end")
    finally:
        for flood in floods:
            flood.stop.set()
        for flood in floods:
            flood.join(10)
    return max(peak, measure(server) - before)


# ---------------------------------------------------------------- backpressure
@pytest.mark.slow
def test_client_that_never_reads_cannot_grow_the_worker(start_server):
    """30 MB of pipelined HELP, replies never read: the worker stops reading.

    Each HELP earns a 330-byte reply; before backpressure the worker took
    all 30 MB and queued 1.6 GB of replies. Now the replies fill a small
    buffer, the worker stops reading, and the rest stays in the kernel
    until the sender blocks.
    """
    server = start_server(workers=1)
    bound = 30 * MB
    sock = raw_client(server.port)
    flood = Flood(sock, b"HELP\r\n", total=30 * MB)
    growth = flood_and_watch(server, flood, bound)
    print(f"worker RSS growth: {growth / MB:.1f} MB after {flood.sent / MB:.1f} MB of HELP sent")
    assert growth < bound, f"worker grew by {growth / MB:.0f} MB"
    assert flood.stalled and flood.sent < flood.total, "the server kept reading from a client that never reads"
    # The worker still serves others meanwhile.
    other = server.client()
    assert other.cmd("NOOP")[0] == 250
    sock.close()


@pytest.mark.slow
def test_many_clients_that_never_read_cost_little_each(start_server):
    """24 clients flood HELP at once: each costs the worker under half a MB.

    Stopping to read is not enough on its own: a single read of pipelined
    HELPs (64 KiB or more) answered in one go makes 3.5 MB of replies. The
    worker feeds commands to the session in small slices and looks at its
    output buffer between them.
    """
    server = start_server(workers=1)
    clients = 24
    bound = clients * MB // 2
    socks = [raw_client(server.port) for _ in range(clients)]
    floods = [Flood(sock, b"HELP\r\n", total=20 * MB) for sock in socks]
    peak = floods_and_watch(server, floods, bound)
    print(f"worker RSS growth: {peak / MB:.1f} MB for {clients} clients that never read")
    assert peak < bound, f"worker grew by {peak / MB:.0f} MB"
    assert all(f.stalled for f in floods)
    for sock in socks:
        sock.close()


@pytest.mark.slow
def test_client_that_never_reads_is_cut_by_the_timeout(start_server):
    """Replies the client never reads do not keep it alive.

    With its replies unread the worker stops reading, so the client
    completes no more commands and its --timeout runs out. A close would
    wait for the unread replies forever: the worker aborts the connection.
    """
    server = start_server("--timeout", "2", workers=1)
    sock = raw_client(server.port)
    flood = Flood(sock, b"HELP\r\n", total=4 * MB, stall=60)
    flood.start()
    wait_until(
        lambda: tcp_state(sock) != TCP_ESTABLISHED, timeout=60, interval=0.1, what="the server to drop the client"
    )
    flood.stop.set()
    flood.join(10)
    wait_until(lambda: "; not reading, dropped" in server.log_text(), what="the timeout in the log")
    c = server.client()
    assert c.xstat("CURRENT") == 1
    sock.close()


# ------------------------------------------------------- message data in memory
def before_data(server) -> Client:
    c = server.client()
    assert c.cmd("EHLO x")[0] == 250
    assert c.cmd(f"MAIL FROM:<a@{DOMAIN}>")[0] == 250
    assert c.cmd("RCPT TO:<r>")[0] == 250
    return c


def open_message(server) -> Client:
    c = before_data(server)
    assert c.cmd("DATA")[0] == 354
    return c


def test_message_data_a_worker_holds_is_bounded(start_server):
    """Many unfinished large messages: the worker keeps at most --max-data-memory.

    24 clients are admitted (the worker holds nothing yet), then each sends
    3.5 MB without the final dot: 84 MB in all against a 16 MiB budget.
    The messages that would pass the budget are refused (their data read
    and thrown away, 452 at the dot); a new DATA is refused at once while
    no message of the maximum size would fit; once the load is gone, the
    refused clients send their mail on the same connection.
    """
    budget = 16 * MiB
    server = start_server("--max-message-size", str(4 * MiB), "--max-data-memory", str(budget), workers=1)
    clients = [open_message(server) for _ in range(24)]
    before = worker_rss(server)
    body = (b"x" * 998 + b"\r\n") * 3500  # 3.5 MB
    for c in clients:
        c.send(body)
    wait_until(
        lambda: not any(unsent_bytes(c.sock) for c in clients) and not unread_bytes_at(server.port),
        timeout=120,
        what="the worker to read every body",
    )
    growth = worker_rss(server) - before
    print(f"worker RSS growth: {growth / MB:.1f} MB with 84 MB of unfinished messages, budget {budget / MB:.1f} MB")
    assert growth < budget + 20 * MB, f"worker grew by {growth / MB:.0f} MB"

    late = before_data(server)
    code, text = late.cmd("DATA")
    assert (code, text) == (452, "4.3.1 Error: insufficient system storage")

    replies = []
    for c in clients:
        c.send(b".\r\n")
        replies.append(c.reply())
    stored = [r for r in replies if r[0] == 250]
    refused = [r for r in replies if r[0] != 250]
    assert 1 <= len(stored) <= budget // len(body)
    assert refused and all(r == (452, "4.3.1 Error: insufficient system storage") for r in refused)

    # The load is gone: the refused sessions go on, and so does the late one.
    for c, reply in zip(clients, replies):
        if reply[0] != 250:
            assert c.mail(f"a@{DOMAIN}", ["r"], b"retry")[0] == 250
    assert late.cmd("DATA")[0] == 354
    late.send(b"late\r\n.\r\n")
    assert late.reply()[0] == 250
    assert len(server.stored("r")) == len(clients) + 1
    wait_until(lambda: "message refused: the worker holds" in server.log_text(), what="refusals in the log")


def test_max_data_memory_is_live_on_the_config_port(start_server):
    server = start_server("--max-message-size", str(1 * MiB), workers=1)
    c = open_message(server)
    c.send((b"y" * 998 + b"\r\n") * 600)  # 600 KB held
    with socket.create_connection(("127.0.0.1", server.config_port), timeout=20) as cfg:
        cfg.sendall(b"max_data_memory=1048576\r\n")
        assert cfg.recv(100) == b"OK\r\n"
    # Another max-size message no longer fits next to the 600 KB held.
    other = before_data(server)
    assert other.cmd("DATA")[0] == 452
    c.send(b".\r\n")
    assert c.reply()[0] == 250
    assert other.cmd("DATA")[0] == 354


# ------------------------------------------------- pipelining behind a message
@contextlib.contextmanager
def stallable_disk(path: Path):
    """A small ext4 file system on a loop device, that ``freeze`` stalls (needs root).

    While frozen, every write to it (creating a file, writing one) blocks
    in the kernel until it is thawed: a disk that does not answer.
    """
    image = path.with_suffix(".img")
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    path.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True)
    disk = StallableDisk(path)
    try:
        yield disk
    finally:
        disk.thaw()  # a frozen file system would leave the server unkillable
        subprocess.run(["umount", "-l", str(path)], check=True)


class StallableDisk:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.frozen = False

    def freeze(self) -> None:
        subprocess.run(["fsfreeze", "-f", str(self.path)], check=True)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            subprocess.run(["fsfreeze", "-u", str(self.path)], check=True)
            self.frozen = False


@pytest.mark.slow
@pytest.mark.root("mounts a loop device and freezes it")
def test_bytes_pipelined_behind_a_message_wait_in_the_kernel(start_server, tmp_path):
    """While a message is stored, the worker reads nothing more from its client.

    The mail folder is on a file system we freeze, so storing the message
    blocks for as long as the test likes. The client sends the message and,
    behind its final dot, 40 MB of NOOPs. A worker that kept reading would
    hold all of them; this one stops reading at the dot, so the bytes stay
    in the kernel's socket buffers (a few MB), the sender blocks, and the
    worker's memory does not grow. Thawed, the mail is stored and answered.
    """
    with stallable_disk(tmp_path / "disk") as disk:
        # 64 MiB: below the default free-space reserve, which is not under test here.
        server = start_server("--mail-dir", str(disk.path), "--min-free-space", "0", workers=1)
        c = server.client()
        c.cmd("EHLO x")
        assert c.mail(f"a@{DOMAIN}", ["r"], b"first")[0] == 250  # folder made while the disk answers
        assert c.cmd(f"MAIL FROM:<a@{DOMAIN}>")[0] == 250
        assert c.cmd("RCPT TO:<r>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        disk.freeze()
        c.send(b"second\r\n.\r\n")
        bound = 20 * MB
        flood = Flood(c.sock, b"NOOP\r\n", total=40 * MB)
        growth = flood_and_watch(server, flood, bound)
        print(f"worker RSS growth: {growth / MB:.1f} MB after {flood.sent / MB:.1f} MB sent behind the dot")
        assert growth < bound, f"worker grew by {growth / MB:.0f} MB while storing"
        assert flood.stalled and flood.sent < flood.total, "the worker kept reading while it stored"
        assert unread_bytes_at(server.port) > 0  # what the client sent waits in the kernel

        def stored() -> list[Path]:
            return list((disk.path / "r" / "new").iterdir())

        assert len(stored()) == 1
        disk.thaw()
        c.sock.settimeout(60)
        code, text = c.reply()
        assert code == 250 and text.startswith("2.0.0 Ok: queued as"), text
        assert len(stored()) == 2
        c.reset()
        server.stop()


# ------------------------------------------ the session's hooks, without a network
FULL = replies.INSUFFICIENT_STORAGE  # 452 4.3.1


def in_rcpt() -> Wired:
    s = Wired(Session("mx.test", frozenset({DOMAIN}), Limits(max_errors=2), lambda key: 0))
    s.feed(b"EHLO x\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<r>\r\n")
    assert s.state is State.RCPT
    return s


def test_session_refuses_data_when_the_worker_says_so_without_counting_an_error():
    s = in_rcpt()
    s.admit_message = lambda: FULL
    for _ in range(3):  # more than max_errors: the session stays open
        assert s.feed(b"DATA\r\n") == FULL
    assert s.state is State.RCPT and not s.closing and s.replies_4xx == 3
    s.admit_message = lambda: None
    assert s.feed(b"DATA\r\n").startswith(b"354")


def test_session_refused_message_discards_the_rest_and_answers_at_the_dot():
    s = in_rcpt()
    s.feed(b"DATA\r\n")
    assert s.feed(b"line one\r\nline two\r\n") == b""
    assert s.held_bytes == len(b"line one\r\nline two\r\n")
    s.refuse_message(FULL)
    assert s.held_bytes == 0
    assert s.feed(b"more\r\n" * 1000) == b"" and s.held_bytes == 0
    for _ in range(3):  # more than max_errors, all answered, none closes the session
        assert s.feed(b".\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<r>\r\nDATA\r\n") == (
            FULL + b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        )
        s.refuse_message(FULL)
    assert s.errors == 0 and not s.closing
    assert s.feed(b".\r\n") == FULL


def test_session_hands_back_what_was_pipelined_behind_a_message():
    s = in_rcpt()
    assert s.feed(b"DATA\r\nhello\r\n.\r\nNOOP\r\nNOO") == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert s.state is State.WAITING and s.held_bytes == 0 and s.pending.size == 7
    assert s.take_unread() == b"NOOP\r\nNOO"
    assert s.message_stored("Q1") == b"250 2.0.0 Ok: queued as Q1\r\n"  # nothing else answered
    assert s.feed(b"NOOP\r\nNOOP\r\n") == b"250 2.0.0 Ok\r\n" * 2


# ----------------------------------------------------------- idle sessions
# What one idle session costs: bench S4 holds 20,000 greeted sessions on
# four workers (issue 13: at most 2.3 KiB each). A worker measures about
# 1.6 KB per session; with a dict per Session object it was 3.4 KB.
IDLE_SESSIONS = 3000
IDLE_SESSION_RSS = 2560  # bytes of worker RSS per idle, greeted session


def greeted_client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    greeting = b""
    while not greeting.endswith(b"\r\n"):
        piece = sock.recv(1024)
        assert piece, "closed before the greeting"
        greeting += piece
    assert greeting.startswith(b"220"), greeting
    return sock


@pytest.mark.slow
def test_idle_greeted_sessions_cost_the_worker_little_each(start_server):
    """3,000 greeted sessions that say nothing grow the worker by under 2.5 KiB each."""
    raise_fd_limit(IDLE_SESSIONS + 512)
    server = start_server(workers=1)
    probe = server.client()
    # The first sessions load code and fill caches that every later one shares.
    for sock in [greeted_client(server.port) for _ in range(50)]:
        sock.close()
    wait_until(lambda: probe.xstat("CURRENT") == 1, what="the warm-up sessions to end")
    before = worker_rss(server)
    socks = [greeted_client(server.port) for _ in range(IDLE_SESSIONS)]
    try:
        wait_until(lambda: probe.xstat("CURRENT") == IDLE_SESSIONS + 1, timeout=60, what="every session counted")
        per_session = (worker_rss(server) - before) / IDLE_SESSIONS
    finally:
        for sock in socks:
            sock.close()
        probe.close()
    print(f"worker RSS growth: {per_session:.0f} bytes per idle session")
    assert per_session < IDLE_SESSION_RSS, f"{per_session:.0f} bytes per idle session"


def retained_per_object(make: Callable[[], object], count: int = 1000) -> float:
    """Bytes of Python memory each of ``count`` objects made by ``make`` keeps."""
    gc.collect()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [make() for _ in range(count)]
        after = tracemalloc.get_traced_memory()[0]
    finally:
        if started:
            tracemalloc.stop()
    assert len(kept) == count
    return (after - before - sys.getsizeof(kept)) / count


IDLE_SESSION_OBJECTS = 512  # bytes: about 330 greeted, 450 after EHLO; with a dict per Session, 2,000 and more


@pytest.mark.parametrize("said", [
    b"", b"EHLO client.example\r\n", b"EHLO c\r\nMAIL FROM:<a@smtpd.com>\r\nRSET\r\nNOOP\r\n",
    # a chunked transaction ended by RSET inside a line of its chunk
    b"EHLO c\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<m>\r\nBDAT 900\r\n" + b"x" * 900 + b"RSET\r\n",
])
def test_an_idle_session_holds_few_bytes(said):
    """A greeted session (or one between transactions) keeps no dict, empty buffer or last replies of its own."""
    domains, limits = frozenset({DOMAIN}), Limits()  # the worker's, shared by its sessions

    def read_stat(key: str) -> int:
        return 0

    def idle_session() -> Session:
        session = Session("mx.test", domains, limits, read_stat)
        session.greeting()
        if said:
            assert session.feed(said)
        return session

    per_session = retained_per_object(idle_session)
    assert per_session < IDLE_SESSION_OBJECTS, f"{per_session:.0f} bytes per idle session"
