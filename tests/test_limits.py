"""Limits a client must not get around: connections per address, disk space, mailboxes."""

from __future__ import annotations

import socket

from harness import wait_until


def connect_from(source: str, port: int) -> socket.socket:
    """A connection to the server from ``source`` (any of 127/8 is loopback)."""
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(20)
    s.connect(("127.0.0.1", port))
    return s


def first_reply(s: socket.socket) -> bytes:
    return s.recv(200)


# ------------------------------------------------- connections per address
def test_addresses_whose_old_buckets_collided_are_counted_apart(start_server):
    # crc32("127.0.17.12") % 4096 == crc32("127.0.0.1") % 4096: with shared
    # buckets, one client's connections locked the other out.
    server = start_server("--max-connections-per-ip", "4")
    crowd = [connect_from("127.0.17.12", server.port) for _ in range(4)]
    assert all(first_reply(s).startswith(b"220") for s in crowd)
    fifth = connect_from("127.0.17.12", server.port)
    assert first_reply(fifth).startswith(b"421 4.7.0")
    other = connect_from("127.0.0.1", server.port)
    assert first_reply(other).startswith(b"220")
    wait_until(lambda: server.log_count("refused: too many connections from your address") == 1, what="refusal log")
    for s in crowd + [fifth, other]:
        s.close()


def test_per_address_count_is_exact_across_workers_and_frees_on_close(start_server):
    server = start_server("--max-connections-per-ip", "3", workers=2)
    held = [connect_from("127.1.2.3", server.port) for _ in range(3)]
    assert all(first_reply(s).startswith(b"220") for s in held)
    assert first_reply(connect_from("127.1.2.3", server.port)).startswith(b"421 4.7.0")
    # Many other addresses, each below its own limit, are all served.
    others = [connect_from(f"127.9.{i}.{j}", server.port) for i in range(3) for j in range(1, 21)]
    assert all(first_reply(s).startswith(b"220") for s in others)
    held.pop().close()

    def one_more_gets_in() -> bool:
        s = connect_from("127.1.2.3", server.port)
        ok = first_reply(s).startswith(b"220")
        if ok:
            held.append(s)
        else:
            s.close()
        return ok

    wait_until(one_more_gets_in, what="the closed connection to free its place")
    for s in held + others:
        s.close()


def test_ipv6_loopback_and_ipv4_clients_of_a_dual_stack_port_are_counted_apart(start_server):
    # On the dual-stack socket 127.0.0.1 arrives as ::ffff:127.0.0.1, inside
    # ::/64 like ::1: it must count as its IPv4 address, not as that /64.
    server = start_server("--max-connections-per-ip", "2", listen=None)
    six = [socket.create_connection(("::1", server.port), timeout=20) for _ in range(2)]
    assert all(first_reply(s).startswith(b"220") for s in six)
    over = socket.create_connection(("::1", server.port), timeout=20)
    assert first_reply(over).startswith(b"421 4.7.0")
    four = [socket.create_connection(("127.0.0.1", server.port), timeout=20) for _ in range(2)]
    assert all(first_reply(s).startswith(b"220") for s in four)
    for s in six + four + [over]:
        s.close()
