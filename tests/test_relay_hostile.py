"""The queue runner against a hostile next hop: replies of any size and
shape, written raw on a real socket, and what they may do to the runner's
memory, its notices and its log."""

from __future__ import annotations

import email
import email.policy
import signal
import smtplib
import socket
import threading
import time
from collections.abc import Callable

import pytest
from harness import wait_until
from test_relay import queue_of, relay_to

MESSAGE = b"From: alice@smtpd.com\r\nSubject: going out\r\n\r\nhello out there\r\n"
LINE_LIMIT = 998  # octets of a line of a message, CRLF aside (RFC 5322 2.1.1)


class HostileHop:
    """A next hop that answers every command from a script of raw bytes:
    whatever a test gives it is written as it is, however long or odd."""

    def __init__(
        self, *, rcpt: bytes | Callable[[socket.socket], None] = b"250 2.1.5 ok\r\n", data: bytes = b"354 go on\r\n",
        end_of_data: bytes = b"250 2.0.0 queued\r\n",
        ehlo: bytes = b"250-hop.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n",
    ) -> None:
        self.rcpt_for: dict[bytes, bytes] = {}  # a recipient's own reply to RCPT, by its address
        self.replies = {
            b"EHLO": ehlo,
            b"MAIL": b"250 2.1.0 ok\r\n",
            b"RCPT": rcpt,
            b"DATA": data,
            b"QUIT": b"221 2.0.0 bye\r\n",
        }
        self.end_of_data = end_of_data
        self.messages: list[tuple[bytes, bytes]] = []  # (DATA or BDAT, the octets as sent, DATA's dot-stuffed)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.connections += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            try:
                conn.sendall(b"220 hop.example ESMTP\r\n")
                in_data, data = False, b""
                for line in lines:
                    if in_data:
                        if line == b".\r\n":
                            in_data = False
                            self.messages.append((b"DATA", data))
                            conn.sendall(self.end_of_data)
                        data += line
                        continue
                    verb = line[:4].upper()
                    if verb == b"BDAT":  # BDAT <size> LAST only, as the runner sends it
                        self.messages.append((b"BDAT", lines.read(int(line.split()[1]))))
                        conn.sendall(self.end_of_data)
                        continue
                    reply = self.replies.get(verb, b"250 2.0.0 ok\r\n")
                    if verb == b"RCPT":
                        reply = self.rcpt_for.get(line[8:].split(b">")[0].lstrip(b" <"), reply)
                    if callable(reply):
                        reply(conn)  # a reply that takes its time
                    else:
                        conn.sendall(reply)
                    in_data, data = verb == b"DATA" and self.replies[b"DATA"].startswith(b"354"), b""
                    if verb == b"QUIT":
                        return
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def hostile_hop():
    hops: list[HostileHop] = []

    def start(**replies: bytes) -> HostileHop:
        hop = HostileHop(**replies)
        hops.append(hop)
        return hop

    yield start
    for hop in hops:
        hop.close()


def send(server, recipient: str = "bob@example.org") -> None:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        assert client.sendmail("alice@smtpd.com", [recipient], MESSAGE) == {}


def multi_line(code: bytes, lines: int, width: int) -> bytes:
    """A reply of ``lines`` lines of ``width`` octets of text each, then a last line."""
    text = b"5.1.1 " + b"x" * (width - 6)
    return b"".join(code + b"-" + text + b"\r\n" for _ in range(lines)) + code + b" 5.1.1 the end\r\n"


def test_a_reply_bigger_than_max_reply_in_all_is_cut_off_and_the_mail_deferred(start_server, hostile_hop):
    """Every line of this reply is short, yet the reply is 1 MB: more than
    any SMTP server's reply (MAX_REPLY counts the whole of it). The runner
    cuts the next hop off and tries again later; it never quotes a
    megabyte in a bounce, the queue file and the log."""
    hop = hostile_hop(rcpt=multi_line(b"550", 200, 5000))
    server = start_server(*relay_to(hop.port))
    send(server)
    wait_until(lambda: server.log_count("reply too long") >= 1, what="the reply cut off")
    wait_until(lambda: server.log_count("deferred, retry in") >= 1, what="the mail deferred")
    assert server.log_count("bounced") == 0 and not server.stored("alice")  # no bounce quoting it
    assert queue_of(server).ids()  # still queued, for a next hop that behaves
    assert max(len(line) for line in server.log_text().splitlines()) < 2000


def test_a_long_reply_is_quoted_in_the_bounce_on_lines_within_the_line_limit(start_server, hostile_hop):
    """A 550 of 40 KB (within MAX_REPLY) bounces the mail; the notice quotes
    its start, and no line of the notice is over 998 octets, so it stays a
    well-formed message for any reader and any next hop."""
    hop = hostile_hop(rcpt=multi_line(b"550", 40, 1000))
    server = start_server(*relay_to(hop.port))
    send(server)
    (bounce,) = wait_until(lambda: server.stored("alice"), what="the bounce")
    data = bounce.read_bytes()
    assert max(len(line) for line in data.split(b"\n")) <= LINE_LIMIT
    notice = email.message_from_bytes(data, policy=email.policy.default)
    status = notice.get_payload()[1].get_payload()[1]
    assert status["Final-Recipient"] == "rfc822; bob@example.org" and status["Status"] == "5.1.1"
    assert status["Diagnostic-Code"].startswith("smtp; 550 5.1.1 xxxx") and status["Diagnostic-Code"].endswith("...")


def test_a_multi_line_reply_cannot_forge_a_line_of_the_log(start_server, hostile_hop):
    """The lines of a next hop's reply end up in log lines of their own
    unless escaped: a next hop could then write any line it likes into our
    log (a "sent" that never was). Escaped, the reply stays in its one line."""
    forged = b"2030-01-01 00:00:00 : queue runner: FORGED: <bob@example.org> sent via hop.example"
    hop = hostile_hop(rcpt=b"550-5.1.1 no such user\r\n550 " + forged + b"\r\n")
    server = start_server(*relay_to(hop.port))
    send(server)
    wait_until(lambda: server.log_count("bounced") == 1, what="the bounce logged")
    lines = server.log_text().splitlines()
    assert not [line for line in lines if line.startswith("2030-01-01")]
    (bounced,) = [line for line in lines if "bounced" in line]
    assert bounced.endswith("5.1.1 no such user\\n" + forged.decode())


def test_a_long_reply_is_kept_short_in_the_queue_state_and_the_log(start_server, hostile_hop):
    """A 4xx of 60 KB (within MAX_REPLY), for each of 10 recipients at each attempt, was
    stored whole in the state file (JSON escapes: six octets per control character) and
    logged whole: megabytes per attempt. Only its start is kept now."""
    reply = b"".join(b"450-4.2.0 " + b"\x01" * 230 + b"\r\n" for _ in range(250)) + b"450 4.2.0 end\r\n"
    hop = hostile_hop(rcpt=reply)
    server = start_server(*relay_to(hop.port))
    recipients = [f"r{i}@example.org" for i in range(10)]
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        assert client.sendmail("alice@smtpd.com", recipients, MESSAGE) == {}
    wait_until(lambda: server.log_count("deferred, retry in") >= 20, what="two attempts deferred", timeout=60)
    (queue_id,) = queue_of(server).ids()
    state = server.root / "queue" / "state" / queue_id
    assert state.stat().st_size < 20 * 6 * 1000, state.stat().st_size  # was 7.6 MB an attempt
    assert max(len(line) for line in server.log_text().splitlines()) < 4000
    last = queue_of(server).load(queue_id).last_reply
    assert last.startswith("450 4.2.0 \x01") and last.endswith("...") and len(last) <= 600


def test_any_2xx_to_the_end_of_the_message_is_sent_once(start_server, hostile_hop):
    """RFC 5321 4.2.1: 2yz is a positive completion. A 251 after the data was taken
    for a refusal, deferred and sent again: the next hop got the mail twice."""
    hop = hostile_hop(end_of_data=b"251 2.0.0 fine anyway\r\n")
    server = start_server(*relay_to(hop.port))
    send(server)
    wait_until(lambda: not queue_of(server).ids(), what="the queue to empty")
    wait_until(lambda: server.log_count("<bob@example.org> sent via") == 1, what="the mail logged as sent")
    assert server.log_count("deferred") == 0


def test_a_3xx_to_the_end_of_the_message_defers_and_the_connection_is_never_reused(start_server, hostile_hop):
    """A 354 to the final dot: where the next hop stands is unknown (reading data still?),
    so the mail is deferred and its connection closed, not handed to the next mail."""
    hop = hostile_hop(end_of_data=b"354 keep going\r\n")
    server = start_server(*relay_to(hop.port, "--relay-idle-time", "300"))
    send(server)
    wait_until(lambda: server.log_count("deferred, retry in") >= 3, what="three attempts deferred", timeout=60)
    assert server.log_count("354 keep going") >= 3
    assert hop.connections >= 3  # one connection per attempt (before: the first one, reused with no RSET)


def test_a_relayed_bounce_of_a_binary_mail_quotes_its_headers_only(start_server, hostile_hop, tmp_path):
    """A bounce to a sender whose domain is no longer served (a reload took it out
    while the mail waited) is relayed like any mail. Quoting a binary original
    whole (RET=FULL) would make the bounce binary, and a notice is never bounced
    in turn: to a next hop without BINARYMIME it would be lost. So it quotes the
    headers only, and goes as DATA."""
    hop = hostile_hop(ehlo=b"250-hop.example\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 BINARYMIME\r\n")
    hop.rcpt_for[b"bin@example.org"] = b"451 4.3.0 not yet\r\n"
    config = tmp_path / "domains.toml"
    config.write_text('domain = ["smtpd.com", "other.example"]\n')
    server = start_server("--config", str(config), *relay_to(hop.port))
    body = b"From: carol@other.example\r\nSubject: raw\r\n\r\nNUL \x00, bare CR \r, high \xff\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s, s.makefile("rb") as f:
        def reply() -> bytes:
            while (line := f.readline())[3:4] == b"-":
                pass
            return line

        reply()
        for command in (b"EHLO client.example", b"MAIL FROM:<carol@other.example> BODY=BINARYMIME RET=FULL",
                        b"RCPT TO:<bin@example.org>"):
            s.sendall(command + b"\r\n")
            assert reply()[:1] == b"2", command
        s.sendall(b"BDAT %d LAST\r\n" % len(body) + body)
        assert reply()[:3] == b"250"
    wait_until(lambda: server.log_count("451 4.3.0 not yet") >= 1, what="the first attempt deferred")
    config.write_text('domain = ["smtpd.com"]\n')
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: server.log_count("reload done") == 1, what="the reload")
    hop.rcpt_for[b"bin@example.org"] = b"550 5.1.1 no such user\r\n"
    wait_until(lambda: hop.messages, what="the bounce at the next hop", timeout=60)
    ((verb, bounce),) = hop.messages
    assert verb == b"DATA" and b"Action: failed" in bounce and b"To: <carol@other.example>" in bounce
    assert b"Subject: raw" in bounce and b"\x00" not in bounce and b"high \xff" not in bounce
    assert b"Content-Type: text/rfc822-headers" in bounce


@pytest.mark.parametrize("excess", [0, 1])
def test_max_reply_bounds_a_whole_reply_exactly(excess):
    """A reply of exactly MAX_REPLY bytes is read; one byte more is "reply too long",
    whether it comes in one read or a line at a time."""
    import asyncio

    from test_relay import FakeNextHop

    from prefork_smtpd.runner import MAX_REPLY, ReplyReader

    last = b"550 5.1.1 end\r\n"
    body_line = b"550-" + b"y" * 996 + b"\r\n"  # 1000 bytes
    count, rest = divmod(MAX_REPLY - len(last), len(body_line))
    reply = body_line * count + b"550-" + b"z" * (rest - 6 + excess) + b"\r\n" + last
    assert len(reply) == MAX_REPLY + excess

    async def scenario(pieces: list[bytes]) -> None:
        transport = FakeNextHop()
        reader = transport.reader = ReplyReader(transport)
        reader.send(b"RCPT TO:<b@example.org>\r\n")
        for piece in pieces:
            reader.data_received(piece)
        if excess:
            with pytest.raises(Exception, match="reply too long"):
                await reader.reply(1)
            assert transport.closed and not reader.lines and not reader.buffer
        else:
            code, text = await reader.reply(1)
            assert code == 550 and text.endswith("5.1.1 end") and reader.alive

    asyncio.run(scenario([reply]))
    asyncio.run(scenario(reply.splitlines(keepends=True)))


@pytest.mark.parametrize("reply, status", [
    (b"550 5.1.1 no such user\r\n", "5.1.1"),  # as it should be
    (b"550 5.\x1b[31m.1 colours\r\n", "5.0.0"),  # not digits: a control sequence in the notice
    (b"550 5.1234.1 too many digits\r\n", "5.0.0"),  # RFC 3463: 1*3 digits each
    (b"550 2.1.5 all is well\r\n", "5.0.0"),  # a refusal cannot have a success's code
])
def test_a_bounce_takes_the_enhanced_code_of_a_reply_only_when_it_is_one(start_server, hostile_hop, reply, status):
    """The Status field of a notice is an RFC 3463 code whose class is the
    reply's (RFC 2034 4); anything else a next hop puts there gives way to
    the reply's class with .0.0."""
    hop = hostile_hop(rcpt=reply)
    server = start_server(*relay_to(hop.port))
    send(server)
    (bounce,) = wait_until(lambda: server.stored("alice"), what="the bounce")
    data = bounce.read_bytes()
    assert data.isascii() and b"\x1b" not in data
    notice = email.message_from_bytes(data, policy=email.policy.default)
    assert notice.get_payload()[1].get_payload()[1]["Status"] == status


def test_a_delay_notice_never_takes_a_success_code_for_its_status(start_server, hostile_hop):
    """A next hop answering DATA with 250 instead of 354 sent nothing: the mail
    is deferred, and the "delayed" notice says 4.0.0, not the reply's 2.0.0."""
    hop = hostile_hop(data=b"250 2.0.0 sure\r\n")
    server = start_server(*relay_to(hop.port, "--delay-warning-time", "1"))
    send(server)
    (notice,) = wait_until(lambda: server.stored("alice"), timeout=60, what="the delayed notice")
    status = email.message_from_bytes(notice.read_bytes(), policy=email.policy.default).get_payload()[1]
    rcpt = status.get_payload()[1]
    assert rcpt["Action"] == "delayed" and rcpt["Status"] == "4.0.0"
    assert rcpt["Diagnostic-Code"] == "smtp; 250 2.0.0 sure"


def test_a_reply_that_trickles_in_gets_relay_timeout_in_all(start_server, hostile_hop):
    """--relay-timeout is the time for each step of a delivery. A next hop
    sending its reply an octet at a time, each well within the timeout,
    must not make a step last for ever: the reply is given up on
    --relay-timeout after it was awaited, and the mail deferred."""
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        conn.sendall(b"550-5.1.1 ")
        while not stop.wait(0.2):  # an octet every 0.2 s, for as long as the runner listens
            conn.sendall(b"x")

    hop = hostile_hop(rcpt=trickle)
    server = start_server(*relay_to(hop.port, "--relay-timeout", "2"))
    try:
        send(server)
        started = time.monotonic()
        wait_until(lambda: server.log_count("SMTPReadTimeoutError") >= 1, timeout=30, what="the step given up")
        wait_until(lambda: server.log_count("deferred, retry in") >= 1, what="the mail deferred")
        print(f"given up after {time.monotonic() - started:.1f} s")
    finally:
        stop.set()


@pytest.mark.parametrize("line, code", [
    (b"250 2.0.0 ok\r\n", 250),
    (b"250-first line\r\n250 last line\r\n", 250),
    (b"250\r\n", 250),  # a code alone (RFC 5321 4.2: the text is optional)
    (b"554 no\n", 554),
    (b" 25 ok\r\n", None),  # what int() took as 25
    (b"+25 ok\r\n", None),
    (b"-25 ok\r\n", None),
    (b"2_5 ok\r\n", None),
    (b"199 too low\r\n", None),
    (b"600 too high\r\n", None),
    (b"2500 four digits\r\n", None),
    (b"25\r\n", None),
    (b"\xd9\xa2\xd9\xa5\xd9\xa0 arabic-indic digits\r\n", None),
])
def test_a_reply_code_is_three_digits_from_2xx_to_5xx_or_the_reply_is_malformed(line, code):
    import asyncio

    from test_relay import FakeNextHop

    from prefork_smtpd.runner import ReplyReader, reply_code

    assert reply_code(line) == code

    async def scenario() -> None:
        transport = FakeNextHop()
        reader = transport.reader = ReplyReader(transport)
        reader.send(b"NOOP\r\n")
        reader.data_received(line if line.endswith(b"\n") else line + b"\r\n")
        if code is None:
            with pytest.raises(Exception, match="malformed reply"):
                await reader.reply(1)
            assert transport.closed
        else:
            assert (await reader.reply(1))[0] == code

    asyncio.run(scenario())
