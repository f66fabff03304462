"""Worker behaviour the mutation run of worker.py found unchecked: stopping,
timeouts, admission. Real servers, real sockets."""

from __future__ import annotations

import asyncio
import signal
import socket

import psutil
import pytest
import uvloop

from harness import wait_until
from test_resources import unread_bytes_at, unsent_bytes
from prefork_smtpd.settings import Settings
from prefork_smtpd.stats import CONTROL, FIELD, SharedStats
from prefork_smtpd.listeners import SMTP_CONTEXT
from prefork_smtpd.worker import DEFER_ACCEPT, SMTPConnection, Worker


def unstarted_worker(tmp_path, **settings) -> Worker:
    """Worker 1 of a server, built in this process and never run: its
    decisions read the shared block, as in a forked worker."""
    chosen = Settings(mail_dir=str(tmp_path), log_file=str(tmp_path / "log.txt"), **settings)
    stats = SharedStats()
    for name in CONTROL:  # as the master publishes them
        stats.set(name, getattr(chosen, name))
    return Worker(1, [], chosen, stats)


# ------------------------------------------------------------------ stopping
def test_a_transaction_open_past_the_graceful_timeout_gets_421_from_its_worker(start_server):
    # README: on TERM sessions finish their current transaction within
    # --graceful-timeout, then get 421 4.3.2. The worker itself must end
    # the session at its deadline; the master's kill (some seconds later)
    # would drop it without a word.
    server = start_server("--graceful-timeout", "3", workers=1)
    c = server.client()
    assert c.cmd("EHLO x")[0] == 250
    assert c.cmd("MAIL FROM:<a@smtpd.com>")[0] == 250
    server.proc.send_signal(signal.SIGTERM)
    # The worker logs its stop, and flushes the log after its next look at
    # its sessions: past that look, the transaction still goes on.
    wait_until(lambda: "stopping: no new connections" in server.log_text(), what="the worker to stop")
    assert c.cmd("RCPT TO:<r>")[0] == 250
    # and nobody listens any more: the worker closed its copy of the socket
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=10).close()
    code, text = c.reply()  # nothing more sent: the deadline ends it
    assert (code, text.split()[0]) == (421, "4.3.2"), text
    assert c.closed_by_server()
    assert server.proc.wait(timeout=30) == 0
    assert "did not stop in time" not in server.log_text()




def test_a_worker_told_to_leave_first_makes_the_connection_it_accepted(tmp_path):
    # The accept and the connection's setup are apart: the setup is a task
    # the loop runs later. A HUP (retire) between the two once stopped the
    # worker at once, as it held no connection yet, and the client it had
    # accepted was dropped without a greeting.
    worker = unstarted_worker(tmp_path)
    loop = uvloop.new_event_loop()
    worker.loop = loop
    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)
    client = socket.create_connection(listening.getsockname(), timeout=10)

    async def accept_then_retire() -> bytes:
        worker.now = loop.time()
        worker.finished = loop.create_future()
        worker.accept_one(listening, lambda: SMTPConnection(worker, SMTP_CONTEXT))
        worker.retire()  # in the same loop step: the setup has not run
        assert not worker.finished.done(), "the worker left with a connection on its way"
        return await loop.run_in_executor(None, client.recv, 100)

    try:
        assert loop.run_until_complete(asyncio.wait_for(accept_then_retire(), 30)).startswith(b"220 ")
        assert len(worker.connections) == 1 and not worker.finished.done()
    finally:
        client.close()
        listening.close()
        for conn in list(worker.connections):
            conn.transport.abort()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


# ------------------------------------------------------------------ timeouts
def test_an_idle_client_gets_421_at_its_timeout(start_server):
    server = start_server("--timeout", "2", workers=1)
    silent = server.client()  # never sends a command
    after_one = server.client()
    assert after_one.cmd("EHLO x")[0] == 250
    for c in (silent, after_one):
        code, text = c.reply()  # nothing more sent: the timeout ends the session
        assert (code, text.split()[0]) == (421, "4.4.2"), text
        assert c.closed_by_server()


def test_a_message_gets_the_data_timeout_not_the_command_timeout(start_server):
    server = start_server("--timeout", "60", "--data-timeout", "1", workers=1)
    c = server.client()
    c.cmd("EHLO x"); c.cmd("MAIL FROM:<a@smtpd.com>"); c.cmd("RCPT TO:<r>")
    assert c.cmd("DATA")[0] == 354
    c.send(b"the start of a message\r\n")
    code, text = c.reply()  # well before the 60 s command timeout (the client waits 20)
    assert (code, text.split()[0]) == (421, "4.4.2"), text
    assert c.closed_by_server()
    assert not server.stored("r")



# ---------------------------------------------------------------- recycling
def test_a_worker_asks_to_be_recycled_after_its_quota_not_before(start_server):
    server = start_server("--max-requests", "3", workers=1)  # no jitter below 10
    (first,) = server.worker_pids()
    for served in (1, 2, 3):
        c = server.client()
        assert c.cmd("QUIT")[0] == 221
        assert c.closed_by_server()
        # the worker logs the session's end and any recycle request together
        wait_until(lambda: server.log_count(" closed") == served, what=f"session {served} to end")
        asked = "served 3 sessions; asking to be recycled" in server.log_text()
        assert asked == (served == 3), served
    wait_until(lambda: first not in server.worker_pids(), what="the recycled worker to leave")


# ---------------------------------------------------------------- admission
def test_an_ipv4_client_of_the_dual_stack_socket_is_logged_as_ipv4(start_server):
    # Listening on every address, one IPv6 socket takes IPv4 clients too;
    # the kernel names them ::ffff:a.b.c.d, the log must say a.b.c.d.
    server = start_server(listen=None, workers=1)
    c = server.client()
    assert c.cmd("NOOP")[0] == 250
    peer = f"[127.0.0.1]:{c.sock.getsockname()[1]} connected"
    wait_until(lambda: peer in server.log_text(), what=f"{peer!r} in the log")



# ------------------------------------------------------------ fair share
@pytest.mark.parametrize("workers, mine, others, over", [
    (2, 3, 0, True),    # 3 > 3/2 + 1
    (2, 3, 1, False),   # 3 = 4/2 + 1: exactly the fair share plus one
    (2, 4, 1, True),
    (3, 3, 2, True),    # 3 > 5/3 + 1
    (3, 3, 3, False),   # 3 = 6/3 + 1
    (1, 5, 0, False),   # the only worker never defers
])
def test_a_worker_defers_accepting_only_past_the_average_plus_one(tmp_path, workers, mine, others, over):
    # worker.py: over its fair share = more open connections than the
    # server-wide average (XSTAT CURRENT / workers) plus one.
    worker = unstarted_worker(tmp_path, workers=workers)
    worker.connections = {object() for _ in range(mine)}
    worker.slot.set(FIELD["current"], mine)
    worker.stats.slot(2).set(FIELD["current"], others)
    assert worker.over_fair_share() is over



# ------------------------------------------------------ message data memory
def test_two_messages_over_the_data_memory_budget_one_is_refused(start_server):
    # Both clients are admitted at DATA (the worker holds nothing yet); the
    # two bodies together pass --max-data-memory, so the one that would
    # pass it is refused (452 at its dot) and the other stored.
    size = 64 * 1024
    server = start_server("--max-message-size", str(size), "--max-data-memory", str(size * 3 // 2), workers=1)
    clients = []
    for name in ("a", "b"):
        c = server.client()
        c.cmd("EHLO x"); c.cmd("MAIL FROM:<a@smtpd.com>"); c.cmd(f"RCPT TO:<{name}>")
        assert c.cmd("DATA")[0] == 354
        clients.append(c)
    body = (b"x" * 98 + b"\r\n") * 600  # 60 KB each
    for c in clients:
        c.send(body)
    wait_until(lambda: not any(unsent_bytes(c.sock) for c in clients) and not unread_bytes_at(server.port),
               what="the worker to read both bodies")
    replies = []
    for c in clients:
        c.send(b".\r\n")
        replies.append(c.reply())
    assert sorted(code for code, _ in replies) == [250, 452], replies
    assert (452, "4.3.1 Error: insufficient system storage") in replies
    assert len(server.stored("a")) + len(server.stored("b")) == 1




class RecordingLoop:
    """The few event loop calls accept_one makes, recorded instead of run."""

    def __init__(self) -> None:
        self.readers: set[int] = set()
        self.later: list[tuple] = []
        self.accepted: list[socket.socket] = []

    def add_reader(self, fd, callback, *args) -> None:
        self.readers.add(fd)

    def remove_reader(self, fd) -> None:
        self.readers.discard(fd)

    def call_later(self, delay, callback, *args) -> None:
        self.later.append((delay, callback, args))

    def connect_accepted_socket(self, factory, sock):
        self.accepted.append(sock)

    def create_task(self, coroutine) -> "RecordingLoop.Task":
        return self.Task()

    class Task:
        """A task never run: its done callbacks are kept."""

        def __init__(self) -> None:
            self.callbacks: list = []

        def add_done_callback(self, callback) -> None:
            self.callbacks.append(callback)


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    yield sock
    sock.close()


def test_a_worker_over_its_fair_share_lets_one_wakeup_pass_then_accepts(tmp_path, listener):
    worker = unstarted_worker(tmp_path, workers=2)
    worker.loop = loop = RecordingLoop()
    loop.readers.add(listener.fileno())
    worker.connections = {object() for _ in range(3)}
    worker.slot.set(FIELD["current"], 3)  # 3 > 3/2 + 1: over its share
    client = socket.create_connection(listener.getsockname())
    worker.accept_one(listener, asyncio.Protocol)
    assert not loop.accepted  # left for another worker
    assert listener.fileno() not in loop.readers
    ((delay, resume, args),) = loop.later
    assert delay == DEFER_ACCEPT
    resume(*args)  # the short wait is over: watch the socket again
    assert listener.fileno() in loop.readers
    worker.accept_one(listener, asyncio.Protocol)  # still over its share, but this wakeup accepts
    assert len(loop.accepted) == 1
    assert len(loop.later) == 1
    another = socket.create_connection(listener.getsockname())
    worker.accept_one(listener, asyncio.Protocol)  # the next client: one wakeup passes again
    assert len(loop.accepted) == 1 and len(loop.later) == 2
    for sock in loop.accepted + [client, another]:
        sock.close()


def test_a_worker_within_its_fair_share_accepts_at_once(tmp_path, listener):
    worker = unstarted_worker(tmp_path, workers=2)
    worker.loop = loop = RecordingLoop()
    worker.connections = {object() for _ in range(2)}
    worker.slot.set(FIELD["current"], 2)
    client = socket.create_connection(listener.getsockname())
    worker.accept_one(listener, asyncio.Protocol)
    assert len(loop.accepted) == 1 and not loop.later
    for sock in loop.accepted + [client]:
        sock.close()


def test_a_stopping_worker_does_not_watch_the_socket_again(tmp_path, listener):
    worker = unstarted_worker(tmp_path, workers=2)
    worker.loop = loop = RecordingLoop()
    worker.stopping = True
    worker._resume_accepting(listener, asyncio.Protocol)
    assert not loop.readers


# ------------------------------------------------------------------- titles
def test_the_worker_title_counts_connections_down_as_well_as_up(start_server):
    server = start_server(workers=1)
    (pid,) = server.worker_pids()

    def title() -> str:
        return psutil.Process(pid).cmdline()[0]

    clients = [server.client() for _ in range(2)]
    wait_until(lambda: title() == "prefork-smtpd: worker 1 [2 connections]", what="the title to count 2")
    clients.pop().cmd("QUIT")
    wait_until(lambda: title() == "prefork-smtpd: worker 1 [1 connections]", what="the title to count 1")



# ------------------------------------------------------------------ storing
def test_the_stored_mail_names_the_client_address(server):
    c = server.client()
    c.cmd("EHLO client.example")
    assert c.mail("a@smtpd.com", ["r"], b"Subject: hi\r\n\r\nhi")[0] == 250
    (path,) = server.stored("r")
    header = path.read_bytes().split(b"\n\n", 1)[0]
    assert b"\nReceived: from client.example ([127.0.0.1])" in header, header


def test_the_stored_mail_names_an_ipv6_client_by_its_address_literal(start_server):
    # RFC 5321 4.4 and 4.1.3: the TCP-info of a Received header is an
    # address literal, [IPv6:...] for IPv6 (a bare [::1] is not one).
    server = start_server(listen="::1")
    c = server.client(host="::1")
    c.cmd("EHLO client.example")
    assert c.mail("a@smtpd.com", ["r"], b"Subject: hi\r\n\r\nhi")[0] == 250
    (path,) = server.stored("r")
    header = path.read_bytes().split(b"\n\n", 1)[0]
    assert b"\nReceived: from client.example ([IPv6:::1])" in header, header
