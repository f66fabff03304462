"""Framing against the real server: smuggling across reads, replies independent of splits.

Each piece of a conversation is sent only once the server has read every
byte of the previous one (its socket's receive queue is empty), so the
server really sees the reads cut where the test cuts them.
"""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from harness import Server, wait_until
from test_session_framing import HEAD, SMUGGLING_ENDINGS, smuggling_attempt


NETLINK_SOCK_DIAG = 4  # linux/netlink.h
SOCK_DIAG_BY_FAMILY = 20  # linux/sock_diag.h
NLM_F_REQUEST = 1
NLMSG_ERROR = 2


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("framing"), workers=1)
    yield server
    server.stop()


def tcp_queues(local: tuple[str, int], remote: tuple[str, int]) -> tuple[int, int] | None:
    """(unacknowledged send queue, unread receive queue) of the IPv4 TCP socket local -> remote.

    Asked of the kernel by sock_diag (what ss uses): an exact lookup of one
    socket, however many other sockets the machine has.
    """
    sockid = struct.pack(
        "!HH4s12x4s12x", local[1], remote[1], socket.inet_aton(local[0]), socket.inet_aton(remote[0])
    ) + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)  # any interface, no cookie
    request = struct.pack("=BBBxI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
    message = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + request
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as netlink:
        netlink.send(message)
        reply = netlink.recv(65536)
    if struct.unpack_from("=IH", reply)[1] == NLMSG_ERROR:
        return None
    # nlmsghdr (16), then inet_diag_msg: 4 octets, sockid (48), expires, rqueue, wqueue
    rqueue, wqueue = struct.unpack_from("=II", reply, 16 + 4 + 48 + 4)
    return wqueue, rqueue


def server_has_read_everything(sock: socket.socket) -> bool:
    """Our bytes are acknowledged and the server process has read them all."""
    mine, theirs = sock.getsockname(), sock.getpeername()
    client_side, server_side = tcp_queues(mine, theirs), tcp_queues(theirs, mine)
    return client_side is not None and server_side is not None and client_side[0] == 0 and server_side[1] == 0


def converse(server, chunks: list[bytes]) -> bytes:
    """Send the chunks as separate reads of the server; return everything it answered."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for i, chunk in enumerate(chunks):
            if i:  # the next read starts only once the previous one is done
                wait_until(lambda: server_has_read_everything(sock), interval=0.002, what="the server to read")
            sock.sendall(chunk)
        out = b""
        while data := sock.recv(65536):  # the conversation ends with QUIT: the server closes
            out += data
        return out
    finally:
        sock.close()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


_unsplit_replies: dict[bytes, bytes] = {}


def _at_fake_ending(ending: bytes) -> int:
    """The cut the attack relies on: right before the dot of the fake ending."""
    return len(HEAD) + len(b"Subject: t\r\n\r\nhello") + ending.index(b".")


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(SMUGGLING_ENDINGS), st.lists(st.integers(0, 10_000), max_size=6))
@example(b"\n.\r\n", [_at_fake_ending(b"\n.\r\n")])  # the attack as first found
@example(b"\n.\n", [_at_fake_ending(b"\n.\n")])
@example(b"\r.\r", [_at_fake_ending(b"\r.\r")])
@example(b"\r\n.\n", [_at_fake_ending(b"\r\n.\n")])
@example(b"\r.\r\n", [_at_fake_ending(b"\r.\r\n")])
@example(b"\r\n.\r", [_at_fake_ending(b"\r\n.\r")])
def test_no_smuggled_mail_whatever_the_reads(shared_server, ending, cuts):
    data = smuggling_attempt(ending)
    if ending not in _unsplit_replies:
        _unsplit_replies[ending] = converse(shared_server, [data])
    expected = _unsplit_replies[ending]
    assert b"\r\n550 5.6.0 " in expected and expected.endswith(b"221 2.0.0 mx.test Bye\r\n")
    assert converse(shared_server, split(data, cuts)) == expected
    assert shared_server.stored("smuggled") == []
    assert shared_server.stored("b") == []  # the carrier is refused too: it has a bare CR or LF
