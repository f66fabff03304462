"""Reading a PROXY header off an accepted socket, before the connection is made.

On a --proxy-protocol listener the worker accepts a connection from a
trusted proxy and calls ``read_header`` before anything else: before the
greeting, and on smtps before the TLS handshake. The reader peeks at the
socket, feeds what it sees to the sans-IO ``ProxyParser`` and takes off the
socket only the bytes of the header; whatever the client sent behind the
header in the same segment stays in the kernel's buffer, where the SMTP
transport (or the TLS handshake) reads it as if no header had been there.

Peeked bytes that leave the header unfinished are all header, so they are
taken at once: the socket is then readable again only when more arrives,
and a proxy that sends half a header and waits costs no busy loop, only its
``proxy_timeout``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

from .proxy import MAX_V2_HEADER, ProxyError, ProxyHeader, ProxyParser, ProxyResult, Reason

PEEK = MAX_V2_HEADER  # the largest header the parser accepts: one peek can decide any


@dataclass(frozen=True)
class HeaderTimeout:
    """The proxy did not finish its header within proxy_timeout."""

    seconds: float
    received: int  # header bytes that did arrive

    def __str__(self) -> str:
        return f"no complete header within {self.seconds:g} s ({self.received} bytes received)"


@dataclass(frozen=True)
class Conveyed:
    """What the header says about a connection, for the worker."""

    client: tuple[str, int] | None  # the client's address and port; None: the proxy's own stands
    note: str  # said after "connected" in the log
    # A client the header does not name (v1 UNKNOWN, v2 UNSPEC/UNIX): the
    # proxy's address stands in the log, never for the client's rights.
    unnamed: bool = False


def read_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float
) -> asyncio.Future[ProxyResult | ProxyError | HeaderTimeout]:
    """The socket's PROXY header, read without taking a byte after it."""
    future: asyncio.Future = loop.create_future()
    parser = ProxyParser()
    fd = sock.fileno()
    received = 0

    def finish(outcome: ProxyResult | ProxyError | HeaderTimeout) -> None:
        loop.remove_reader(fd)
        timer.cancel()
        if not future.done():
            future.set_result(outcome)

    def readable() -> None:
        nonlocal received
        try:
            chunk = sock.recv(PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            finish(ProxyError(Reason.TRUNCATED, f"connection failed after {received} bytes: {exc.strerror}"))
            return
        outcome = parser.feed(chunk) if chunk else parser.eof()
        if isinstance(outcome, ProxyError):
            finish(outcome)
            return
        # Unfinished, every peeked byte is header; finished, all but the rest.
        header_bytes = len(chunk) - (len(outcome.rest) if outcome is not None else 0)
        try:
            taken = sock.recv(header_bytes) if header_bytes else b""
        except OSError as exc:
            finish(ProxyError(Reason.TRUNCATED, f"connection failed after {received} bytes: {exc.strerror}"))
            return
        received += len(taken)
        if len(taken) != header_bytes:  # the kernel holds what it just showed: not expected to happen
            finish(ProxyError(Reason.TRUNCATED, f"peeked {header_bytes} header bytes, read {len(taken)}"))
        elif outcome is not None:
            finish(outcome)

    timer = loop.call_later(timeout, lambda: finish(HeaderTimeout(timeout, received)))
    loop.add_reader(fd, readable)
    return future


def conveyed(header: ProxyHeader, proxy: str) -> Conveyed:
    """The client a header names, or None where the connection's own peer stands.

    A v2 LOCAL header is the proxy speaking for itself (HAProxy's health
    checks). An address family the SMTP server cannot use (v1 UNKNOWN, v2
    UNSPEC, UNIX, datagrams) is treated like LOCAL: the spec has the
    receiver use the connection's own endpoints, and the log says so.
    """
    via = f"via proxy {proxy}, PROXY v{header.version}"
    if header.command == "LOCAL":
        return Conveyed(None, f"{via} LOCAL: the proxy itself, a health check")
    if header.family in ("TCP4", "TCP6") and header.source is not None:
        host, port = header.source
        assert port is not None
        mapped = getattr(ipaddress.ip_address(host), "ipv4_mapped", None)
        return Conveyed((str(mapped) if mapped else host, port), via)  # ::ffff:a.b.c.d is a.b.c.d
    return Conveyed(None, f"{via} {header.family}: no client address, the proxy's stands", unnamed=True)
