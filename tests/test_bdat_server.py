"""BDAT (RFC 3030) against the real server: raw clients and one that speaks
as Exchange does (MAIL, RCPT and ``BDAT n LAST`` with the message, pipelined
in one write; or the message in many chunks).

swaks (20201014, the version Debian ships) has no BDAT and no CHUNKING
support at all, and smtplib has none either: the client here is our own.
"""

from __future__ import annotations

import email
import email.policy
import socket
import time

import pytest
from harness import DOMAIN, Client, raise_fd_limit, wait_until
from test_resources import (
    RETURNING_ALLOCATOR, Flood, flood_and_watch, floods_and_watch, raw_client, stallable_disk, unread_bytes_at,
    worker_anonymous, worker_rests_with_input_waiting, worker_rss,
)

from prefork_smtpd.worker import WRITE_HIGH

MB = 1000 * 1000
MiB = 1024 * 1024
KiB = 1024


class ExchangeLikeClient(Client):
    """Pipelines each transaction the way Exchange's SMTP send connector does:
    MAIL, every RCPT and the chunks in one write, then reads the replies."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        code, text = self.cmd("EHLO exchange.example")
        assert code == 250 and "CHUNKING" in text.split("\n") and "PIPELINING" in text.split("\n"), text

    def send_message(self, sender: str, recipients: list[str], body: bytes, chunk: int | None = None,
                     params: str = "") -> list[tuple[int, str]]:
        """The replies to MAIL, each RCPT and each chunk, in order."""
        chunks = [body] if chunk is None else [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
        out = f"MAIL FROM:<{sender}>{params}\r\n".encode() + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in recipients)
        for i, data in enumerate(chunks):
            out += b"BDAT %d%s\r\n" % (len(data), b" LAST" if i == len(chunks) - 1 else b"") + data
        self.send(out)
        return [self.reply() for _ in range(1 + len(recipients) + len(chunks))]


def body_of(path) -> bytes:
    """The stored message without our trace headers (the first three lines, one folded)."""
    data = path.read_bytes()
    nl = b"\r\n" if data.split(b"\n", 1)[0].endswith(b"\r") else b"\n"
    lines = data.split(nl)
    i = 2
    while lines[i + 1][:1] == b"\t":  # the Received header's folded lines
        i += 1
    return nl.join(lines[i + 1 :])


def test_ehlo_offers_chunking_and_binarymime(server):
    c = server.client()
    code, text = c.cmd("EHLO c.example")
    assert code == 250 and {"CHUNKING", "BINARYMIME", "8BITMIME", "PIPELINING"} <= set(text.split("\n"))


def test_a_body_with_crlf_dot_crlf_inside_is_stored_octet_for_octet(server):
    body = b"Subject: dots\r\n\r\nfirst\r\n.\r\n..two dots stay two\r\n.\r\nQUIT\r\nlast\r\n"
    c = ExchangeLikeClient(server.port)
    before = c.xstat("BYTES")
    answers = c.send_message(f"a@{DOMAIN}", ["dots"], body)
    assert [code for code, _ in answers] == [250, 250, 250] and "queued as" in answers[-1][1]
    assert c.cmd("NOOP")[0] == 250  # in step: QUIT inside the body was data
    (path,) = server.stored("dots")
    # Text messages are stored with LF line ends, as DATA's are: the same octets otherwise.
    assert body_of(path) == body.replace(b"\r\n", b"\n")
    assert c.xstat("BYTES") == before + len(body)  # XSTAT BYTES counts the BDAT octets


def test_exchange_style_one_bdat_last_per_message_and_many_chunks(server):
    c = ExchangeLikeClient(server.port)
    messages = []
    for i in range(5):
        msg = email.message.EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = f"a@{DOMAIN}", f"ex@{DOMAIN}", f"message {i}"
        msg.set_content("Hello\n.\n" * (i * 300 + 1))
        body = msg.as_bytes(policy=email.policy.SMTP)
        messages.append(body)
        chunk = None if i % 2 == 0 else 1000  # one BDAT n LAST, or many chunks
        answers = c.send_message(f"a@{DOMAIN}", [f"ex@{DOMAIN}", "ex2"], body, chunk=chunk)
        assert all(code == 250 for code, _ in answers), answers
        if chunk:
            assert sum("octets received" in text for _, text in answers) == -(-len(body) // chunk) - 1
    assert c.cmd("QUIT")[0] == 221
    for folder in ("ex", "ex2"):
        stored = sorted(body_of(p) for p in server.stored(folder))
        assert stored == sorted(m.replace(b"\r\n", b"\n") for m in messages)
        parsed = [email.message_from_bytes(p.read_bytes(), policy=email.policy.default) for p in server.stored(folder)]
        assert sorted(m["Subject"] for m in parsed) == [f"message {i}" for i in range(5)]


def test_transactions_pipelined_in_one_write_with_big_chunks_keep_their_order(server):
    # Reads far above the worker's fair share reach the session a piece per
    # turn of the loop; pieces end anywhere (inside a chunk, across a BDAT
    # line, behind a BDAT LAST whose message is being stored) and every
    # octet must still land in its own message, in order.
    c = ExchangeLikeClient(server.port)
    bodies, out = [], b""
    for i in range(3):
        lines = b"".join(b"line %d of message %d: BDAT 5 LAST / MAIL FROM:<x@y>\r\n" % (n, i) for n in range(9000))
        body = b"Subject: big %d\r\n\r\n" % i + lines
        bodies.append(body)
        cut = 300_001 + 7 * i
        out += f"MAIL FROM:<a@{DOMAIN}>\r\nRCPT TO:<big@{DOMAIN}>\r\n".encode()
        out += b"BDAT %d\r\n" % cut + body[:cut] + b"BDAT %d LAST\r\n" % (len(body) - cut) + body[cut:]
    c.send(out)
    c.sock.settimeout(60)
    for i in range(3):
        answers = [c.reply() for _ in range(4)]
        assert [code for code, _ in answers] == [250] * 4, answers
        assert "queued as" in answers[-1][1]
    assert c.cmd("QUIT")[0] == 221
    stored = sorted(body_of(p) for p in server.stored("big"))
    assert stored == sorted(b.replace(b"\r\n", b"\n") for b in bodies)


def test_binarymime_is_stored_as_received(server):
    payload = bytes(range(256)) * 20 + b"\r\n.\r\n\n.\n\x00"
    body = b"Subject: bin\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n" + payload
    c = ExchangeLikeClient(server.port)
    answers = c.send_message(f"a@{DOMAIN}", ["bin"], body, chunk=777, params=" BODY=BINARYMIME")
    assert all(code == 250 for code, _ in answers), answers
    (path,) = server.stored("bin")
    data = path.read_bytes()
    assert data.startswith(b"Return-Path: <a@smtpd.com>\r\nDelivered-To: bin\r\nReceived: ")
    assert body_of(path) == body
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["Subject"] == "bin"
    # and DATA is refused after BODY=BINARYMIME
    assert c.cmd(f"MAIL FROM:<a@{DOMAIN}> BODY=BINARYMIME")[0] == 250
    assert c.cmd("RCPT TO:<bin>")[0] == 250
    assert c.cmd("DATA") == (503, "5.5.1 Error: BODY=BINARYMIME needs BDAT, not DATA")


def test_size_limit_across_chunks_and_the_session_stays_in_step(start_server):
    server = start_server("--max-message-size", "2048")
    c = ExchangeLikeClient(server.port)
    chunk = b"x" * 998 + b"\r\n"
    smuggled = b"RSET\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<evil>\r\nDATA\r\nsmuggled\r\n.\r\n"
    c.send(
        b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<big>\r\n"
        + b"BDAT 1000\r\n" + chunk + b"BDAT 1000\r\n" + chunk + b"BDAT 1000\r\n" + chunk
        + b"BDAT %d LAST\r\n" % len(smuggled) + smuggled + b"RSET\r\n"
    )
    answers = [c.reply() for _ in range(7)]
    assert [code for code, _ in answers] == [250, 250, 250, 250, 552, 503, 250], answers
    assert answers[4] == (552, "5.3.4 Error: message size exceeds fixed maximum message size")
    assert answers[5] == (503, "5.5.1 Error: chunk discarded after a failed chunk; send RSET")
    assert [code for code, _ in c.send_message(f"a@{DOMAIN}", ["big"], chunk)] == [250, 250, 250]
    assert len(server.stored("big")) == 1 and server.stored("evil") == []


def test_bdat_and_data_are_not_mixed_and_rset_clears_a_failed_chunk(server):
    c = server.client()
    c.cmd("EHLO c")
    assert c.cmd(f"MAIL FROM:<a@{DOMAIN}>")[0] == 250
    assert c.cmd("RCPT TO:<mix>")[0] == 250
    c.send(b"BDAT 4\r\nab\r\n")
    assert c.reply() == (250, "2.0.0 Ok: 4 octets received")
    assert c.cmd("DATA") == (503, "5.5.1 Error: DATA after BDAT in one transaction")
    c.send(b"BDAT 3\r\nab\n")  # a bare LF fails the chunk, and the transaction
    assert c.reply()[0] == 550
    c.send(b"BDAT 4 LAST\r\ncd\r\n")
    assert c.reply()[0] == 503
    assert c.cmd("RSET")[0] == 250
    assert c.mail(f"a@{DOMAIN}", ["mix"], b"by DATA")[0] == 250
    assert len(server.stored("mix")) == 1


@pytest.mark.slow
def test_a_chunk_bigger_than_what_arrives_is_cut_by_the_timeout(start_server):
    server = start_server("--data-timeout", "2", "--timeout", "30")
    c = server.client()
    c.cmd("EHLO c")
    c.send(b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<slow>\r\nBDAT 100 LAST\r\nonly ten\r\n")
    assert c.reply()[0] == 250 and c.reply()[0] == 250
    started = time.monotonic()
    assert c.reply() == (421, "4.4.2 mx.test Error: timeout exceeded")
    assert c.closed_by_server()
    assert time.monotonic() - started < 25  # the data timeout, not the command timeout
    assert server.stored("slow") == []


def test_a_bdat_line_without_a_size_is_answered_and_the_connection_closed(server):
    c = server.client()
    c.cmd("EHLO c")
    c.send(b"BDAT ten LAST\r\nRSET\r\n")
    assert c.reply() == (501, "5.5.4 Syntax: BDAT size [LAST]")
    assert c.reply()[0] == 421
    assert c.closed_by_server()


def test_chunks_count_against_the_workers_memory_for_message_data(start_server):
    """A chunked message held between chunks counts like an unfinished DATA."""
    server = start_server("--max-message-size", str(1 * MiB), "--max-data-memory", str(1 * MiB), workers=1)
    held = ExchangeLikeClient(server.port)
    held.send(b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<m>\r\nBDAT 600000\r\n" + (b"y" * 998 + b"\r\n") * 600)
    assert [held.reply()[0] for _ in range(3)] == [250, 250, 250]  # 600 KB held between chunks
    other = ExchangeLikeClient(server.port)
    answers = other.send_message(f"a@{DOMAIN}", ["m"], b"small\r\n")
    assert answers[-1] == (452, "4.3.1 Error: insufficient system storage")  # no room for a max-size message
    held.send(b"BDAT 0 LAST\r\n")
    assert held.reply()[0] == 250
    assert other.cmd("RSET")[0] == 250
    assert all(code == 250 for code, _ in other.send_message(f"a@{DOMAIN}", ["m"], b"small\r\n"))
    assert len(server.stored("m")) == 2


def test_a_chunked_transaction_ended_without_last_leaves_no_line_behind(start_server):
    """A text chunk that ends inside a line leaves that line waiting for its
    end (up to --max-text-line octets). A transaction ended by RSET (or QUIT,
    MAIL, EHLO) must drop it: kept, every idle connection could park a
    line of 1 MiB that no limit counts (max_data_memory counts messages)."""
    raise_fd_limit(CONNECTIONS + 256)
    server = start_server("--max-text-line", str(MiB), "--max-message-size", str(2 * MiB), workers=1)
    probe = ExchangeLikeClient(server.port)
    line = b"x" * (MiB - 2)  # no LF: the unfinished line, within --max-text-line

    def park() -> ExchangeLikeClient:
        client = ExchangeLikeClient(server.port)
        client.send(b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<m>\r\nBDAT %d\r\n" % len(line) + line + b"RSET\r\n")
        assert [client.reply()[0] for _ in range(4)] == [250, 250, 250, 250]
        return client

    for client in [park() for _ in range(10)]:  # code loaded, caches filled
        client.close()
    wait_until(lambda: probe.xstat("CURRENT") == 1, what="the warm-up sessions to end")
    before = worker_rss(server)
    clients = [park() for _ in range(CONNECTIONS)]
    grown = worker_rss(server) - before
    for client in clients:
        client.close()
    probe.close()
    print(f"worker RSS growth: {grown / MiB:.1f} MiB for {CONNECTIONS} idle sessions")
    assert grown < CONNECTIONS * MiB / 4, f"{grown / MiB:.1f} MiB for {CONNECTIONS} idle sessions"


CONNECTIONS = 200


@pytest.mark.slow
@pytest.mark.root("mounts a loop device and freezes it")
def test_bytes_pipelined_behind_a_bdat_last_wait_in_the_kernel(start_server, tmp_path):
    """While a BDAT message is stored the worker reads nothing more from its client."""
    with stallable_disk(tmp_path / "disk") as disk:
        server = start_server("--mail-dir", str(disk.path), "--min-free-space", "0", workers=1)
        c = ExchangeLikeClient(server.port)
        assert all(code == 250 for code, _ in c.send_message(f"a@{DOMAIN}", ["r"], b"first\r\n"))
        assert c.cmd(f"MAIL FROM:<a@{DOMAIN}>")[0] == 250
        assert c.cmd("RCPT TO:<r>")[0] == 250
        disk.freeze()
        c.send(b"BDAT 8 LAST\r\nsecond\r\n")
        bound = 20 * MB
        flood = Flood(c.sock, b"NOOP\r\n", total=40 * MB)
        growth = flood_and_watch(server, flood, bound)
        assert growth < bound, f"worker grew by {growth / MB:.0f} MB while storing"
        assert flood.stalled and flood.sent < flood.total, "the worker kept reading while it stored"
        assert unread_bytes_at(server.port) > 0
        disk.thaw()
        c.sock.settimeout(60)
        code, text = c.reply()
        assert code == 250 and text.startswith("2.0.0 Ok: queued as"), text
        assert len(list((disk.path / "r" / "new").iterdir())) == 2
        c.reset()
        server.stop()


@pytest.mark.parametrize("seed", range(3))
def test_a_raw_client_cutting_headers_and_data_anywhere(server, seed):
    """The same conversation, sent in pieces cut at random places with pauses."""
    import random

    rng = random.Random(seed)
    body = b"Subject: cut\r\n\r\n" + b"".join(b"line %d\r\n.\r\n" % i for i in range(200))
    chunks = [body[:700], body[700:701], body[701:2000], body[2000:]]
    stream = b"EHLO c\r\nMAIL FROM:<a@smtpd.com>\r\nRCPT TO:<cut>\r\n"
    for i, data in enumerate(chunks):
        stream += b"BDAT %d%s\r\n" % (len(data), b" LAST" if i == len(chunks) - 1 else b"") + data
    stream += b"QUIT\r\n"
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cuts = sorted(rng.sample(range(1, len(stream)), 40))
    for a, b in zip([0, *cuts], [*cuts, len(stream)]):
        sock.sendall(stream[a:b])
        time.sleep(0.002)
    received = b""
    while not received.endswith(b"221 2.0.0 mx.test Bye\r\n"):
        data = sock.recv(65536)
        assert data, received
        received += data
    sock.close()
    codes = [line[:3] for line in received.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [b"220", b"250", b"250", b"250", b"250", b"250", b"250", b"250", b"221"]
    (path,) = server.stored("cut")
    assert body_of(path) == body.replace(b"\r\n", b"\n")


def chunking_client(port: int) -> socket.socket:
    """A raw client with the smallest receive buffer, in a transaction: BDAT chunks go into a message."""
    sock = raw_client(port)
    sock.settimeout(20)
    sock.sendall(f"EHLO x\r\nMAIL FROM:<a@{DOMAIN}>\r\nRCPT TO:<r>\r\n".encode())
    file = sock.makefile("rb")
    codes = []
    while len(codes) < 4:  # the greeting, EHLO's, MAIL's and RCPT's (the last lines of each)
        line = file.readline()
        if line[3:4] == b" ":
            codes.append(int(line[:3]))
    file.close()
    assert codes == [220, 250, 250, 250], codes
    return sock


@pytest.mark.slow
def test_pipelined_small_chunks_never_read_cost_little_each(start_server):
    """24 clients pipeline one-octet BDAT chunks and never read: the worker stops reading them.

    Each 9-octet ``BDAT 1`` and its octet earn a 34-octet reply, and once a
    chunk's octets straddle the end of a command slice the session is in
    DATA; the rest of the read went to the session whole, chunk lines and
    all, and was answered in one go: 256 KB read, a MB of replies. Only
    the chunk's own octets go whole now; the commands behind it go in
    slices, as any others, and the worker stops reading as it does for them.
    The message is cut at 64 KiB (what it holds is bounded apart, by
    --max-data-memory); the chunks after it are discarded with a 503.
    """
    # Logging off: every discarded chunk is a refusal log line, and the lines
    # waiting for the log's writer thread are not what this test bounds.
    server = start_server("--max-message-size", str(64 * 1024), "--logging", "0", workers=1,
                          env=RETURNING_ALLOCATOR)
    clients = 24
    # What each client may make the worker hold, by the documented limits:
    # replies up to the write limit, plus what the slices around the
    # crossing add (2 slices of 114 chunk lines, 503s of 66 octets); the
    # rest of one read (the event loop reads 256 KiB at most); its message
    # until it is cut at 64 KiB. The worker itself gets 2 MB of slack
    # (the read being fed, the loop's own). Measured: 3.5 to 4.8 MB for the
    # 24, pure and compiled alike (bench/RESULTS.md, "Compiled ahead of
    # time"). A worker reading on would take 20 MB from each, earning some
    # 75 MB of replies.
    per_client = WRITE_HIGH + 2 * 16 * KiB + 256 * KiB + 64 * KiB
    bound = clients * per_client + 2 * MB
    socks = [chunking_client(server.port) for _ in range(clients)]
    floods = [Flood(sock, b"BDAT 1\r\nx", total=20 * MB) for sock in socks]
    before = worker_anonymous(server)
    peak = floods_and_watch(server, floods, bound, measure=worker_anonymous)
    assert peak < bound, f"worker grew by {peak / MB:.1f} MB (bound {bound / MB:.1f})"
    assert all(f.stalled and f.sent < f.total for f in floods), "the worker kept reading from clients that never read"
    # A sender also stalls when the worker is merely slow to get to it: wait
    # until the worker rests with their bytes unread, then measure again.
    unread = worker_rests_with_input_waiting(server)
    resting = worker_anonymous(server) - before
    print(f"worker memory growth: {max(peak, resting) / MB:.1f} MB for {clients} clients pipelining chunks, "
          f"never reading; {unread / MB:.0f} MB wait unread in its sockets")
    assert resting < bound, f"worker holds {resting / MB:.1f} MB more (bound {bound / MB:.1f})"
    other = server.client()
    assert other.cmd("NOOP")[0] == 250  # the worker still serves others
    for sock in socks:
        sock.close()
