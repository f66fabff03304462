"""The master's own small servers (config port, Prometheus), on its selector.

The master has no event loop, so these are plain non-blocking sockets in
its ``selectors`` loop. A ``Service`` accepts clients; each client gets a
handler with the sans-IO shape ``feed(bytes) -> bytes``.

Everything a client can make the master hold is bounded:

- input: at most ``READ_SIZE`` bytes wait per client, fed to the handler a
  slice at a time; the handler bounds its own line;
- output: past ``HIGH_WATER`` unsent bytes the client is no longer read
  (backpressure): a client that does not read its replies stops being
  served, and its idle timer runs;
- time: a client must log in (or send its request) within the login
  timeout and may stay silent at most the idle timeout;
- connections: when ``max_clients`` are held, a newcomer is never refused:
  the held connection that is worth least is closed for it (one not logged
  in, silent longest; then a logged-in one silent longest), so junk
  connections cannot lock an operator out, and an attacker without the
  token can only push out other connections without it.
"""

from __future__ import annotations

import re
import selectors
import socket
import time
from dataclasses import dataclass
from typing import Callable, Protocol

READ_SIZE = 4096
FEED_SLICE = 512  # bytes fed per call: bounds the replies one call can make
HIGH_WATER = 64 * 1024  # unsent bytes past which a client is not read
SUMMARY_EVERY = 10.0  # seconds between log lines about closed connections
EXPIRE_EVERY = 0.25  # seconds between looks for expired clients (the loop may turn far more often)


class Handler(Protocol):
    closing: bool
    authenticated: bool  # past the token (or nothing to pass)
    waiting: bool  # the server owes it a reply (a reload): not idle

    @property
    def wants_input(self) -> bool: ...

    def feed(self, data: bytes) -> bytes: ...


@dataclass
class ServiceLimits:
    max_clients: int
    login_timeout: float  # seconds to log in or send the request
    idle_timeout: float  # seconds a logged-in client may stay silent


class Service:
    def __init__(
        self,
        name: str,
        selector: selectors.BaseSelector,
        sock: socket.socket,
        make_handler: Callable[[str], Handler],
        limits: Callable[[], ServiceLimits],
        farewell: Callable[[str], bytes] | None = None,
        log: Callable[[str], None] = lambda message: None,
        clock: Callable[[], float] = time.monotonic,
        not_logged_in: str = "not logged in",
        before_reply: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self.not_logged_in = not_logged_in  # how the log and farewell name a late login
        self.selector = selector
        self.sock = sock
        self.make_handler = make_handler  # peer "host:port" -> handler
        self.limits = limits
        self.farewell = farewell  # reason -> a parting word to a client closed by a limit
        self.log = log
        self.before_reply = before_reply  # run before any reply goes out (the master: its log written)
        self.clock = clock
        self.clients: set[ServiceClient] = set()
        self.closed_counts: dict[str, int] = {}  # reason -> connections, since the last summary
        self.next_summary = 0.0
        self.next_expiry = 0.0
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self.on_accept)

    def on_accept(self, mask: int) -> None:
        for _ in range(64):  # a bounded batch: the master's loop stays responsive
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. out of file descriptors: try again next time
            conn.setblocking(False)
            while len(self.clients) >= max(self.limits().max_clients, 1):
                self.evict()
            self.clients.add(ServiceClient(self, conn, self.make_handler(format_peer(peer))))

    def evict(self) -> None:
        """Close the held connection worth least, for a newcomer."""
        victim = min(self.clients, key=lambda c: (c.handler.authenticated, c.handler.waiting, c.last_active))
        self.close_for(victim, "closed for a newcomer (port full)")

    def close_for(self, client: "ServiceClient", reason: str) -> None:
        if self.farewell is not None:
            try:
                client.sock.send(self.farewell(reason))  # best effort; never waits
            except OSError:
                pass
        client.close()
        self.closed_counts[reason] = self.closed_counts.get(reason, 0) + 1

    def expire(self) -> None:
        """Close clients past their login or idle time; log what was closed.

        Called by the master's loop at least once a second. The log gets one
        summary line per reason every few seconds, not one per connection:
        a flood of connections must not become a flood of log lines.
        """
        now = self.clock()
        if now < self.next_expiry:
            return
        self.next_expiry = now + EXPIRE_EVERY
        limits = self.limits()
        for client in list(self.clients):
            handler = client.handler
            if handler.waiting:
                continue
            if not handler.authenticated and now - client.opened > limits.login_timeout:
                self.close_for(client, f"{self.not_logged_in} within {limits.login_timeout:g} s")
            elif now - client.last_active > limits.idle_timeout:
                self.close_for(client, f"silent for {limits.idle_timeout:g} s")
        if self.closed_counts and now >= self.next_summary:
            for reason, count in sorted(self.closed_counts.items()):
                self.log(f"{self.name}: {count} connection{'s' if count != 1 else ''} {reason}")
            self.closed_counts.clear()
            self.next_summary = now + SUMMARY_EVERY

    def close(self) -> None:
        for client in list(self.clients):
            client.close()
        try:
            self.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()


def format_peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


class ServiceClient:
    def __init__(self, service: Service, sock: socket.socket, handler: Handler) -> None:
        self.service = service
        self.sock = sock
        self.handler = handler
        self.inbuf = bytearray()  # read, not yet fed: at most READ_SIZE
        self.outbuf = bytearray()  # replies not yet sent: about HIGH_WATER at most
        self.opened = self.last_active = service.clock()
        self.events = 0
        self.closed = False
        self._watch(selectors.EVENT_READ)

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_READ and not self.inbuf:
            try:
                data = self.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self.close()
                return
            if data:
                self.inbuf += data
                self.last_active = self.service.clock()
        self.pump()

    def push(self, data: bytes) -> None:
        """Send bytes the handler produced outside ``feed`` (a late reply)."""
        self.outbuf += data
        self.pump()

    def pump(self) -> None:
        """Feed what was read while the replies stay below the high water; send."""
        while True:
            while self.inbuf and self.handler.wants_input and len(self.outbuf) < HIGH_WATER:
                chunk = bytes(self.inbuf[:FEED_SLICE])
                del self.inbuf[:FEED_SLICE]
                self.outbuf += self.handler.feed(chunk)
            if not self.send():
                return
            if not (self.inbuf and self.handler.wants_input and len(self.outbuf) < HIGH_WATER):
                break
        if not self.outbuf and self.handler.closing:
            self.close()
            return
        reading = not self.inbuf and not self.handler.closing and len(self.outbuf) < HIGH_WATER
        self._watch((selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if self.outbuf else 0))

    def send(self) -> bool:
        """Send what the socket takes now; False if the client is gone."""
        if self.outbuf:
            self.service.before_reply()
            try:
                sent = self.sock.send(self.outbuf)
                del self.outbuf[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self.close()
                return False
        return True

    def _watch(self, events: int) -> None:
        """Watch the socket for ``events``; none (waiting on a reload): not at all."""
        if events == self.events:
            return
        selector = self.service.selector
        if not events:
            selector.unregister(self.sock)
        elif not self.events:
            selector.register(self.sock, events, self.on_event)
        else:
            selector.modify(self.sock, events, self.on_event)
        self.events = events

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.service.clients.discard(self)
        if self.events:
            try:
                self.service.selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
        self.sock.close()


# RFC 9112 3: method SP request-target SP HTTP-version, visible ASCII only
# (a control character or a byte past 127 is no request a scraper sends).
REQUEST_LINE = re.compile(rb"([!-~]+) +([!-~]+) +(HTTP/[0-9]\.[0-9])")
HTTP_VERSIONS = (b"HTTP/1.0", b"HTTP/1.1")
# RFC 9112 3.2.2: a server must accept the absolute form (a proxy's) too.
ABSOLUTE_FORM = re.compile(rb"https?://[^/?#]*", re.IGNORECASE)


class HttpMetricsRequest:
    """One HTTP/1.x request for ``GET /metrics``; the connection closes after."""

    MAX_REQUEST = 8192
    authenticated = False  # so the service's login timeout bounds the request's arrival
    waiting = False

    def __init__(self, render: Callable[[], tuple[bytes, str]]) -> None:
        self.render = render
        self.closing = False
        self._buf = bytearray()
        self._may_skip_empty_line = True  # before the request line: one empty line is skipped

    @property
    def wants_input(self) -> bool:
        return not self.closing

    def feed(self, data: bytes) -> bytes:
        if self.closing:
            return b""
        buf = self._buf
        buf += data
        if self._may_skip_empty_line:
            # RFC 9112 2.2: ignore at least one empty line before the request line
            # (a client's leftover CRLF); one, so a stream of them is refused.
            if buf[:2] == b"\r\n" or buf[:1] == b"\n":
                del buf[: buf.index(b"\n") + 1]
                self._may_skip_empty_line = False
            elif buf == b"\r":
                return b""  # a CR alone: the CRLF may be cut in two
            elif buf:
                self._may_skip_empty_line = False
        if buf[:2] == b"\r\n" or buf[:1] == b"\n":
            return self._respond(400, b"bad request\n", "text/plain")  # no request line
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            end = buf.find(b"\n\n")
        if end < 0:
            if len(buf) > self.MAX_REQUEST:
                return self._respond(431, b"request header too large\n", "text/plain")
            return b""
        request_line = bytes(buf.split(b"\n", 1)[0]).rstrip(b"\r")
        parsed = REQUEST_LINE.fullmatch(request_line)
        if parsed is None:
            return self._respond(400, b"bad request\n", "text/plain")
        method, target, version = parsed.groups()
        if version not in HTTP_VERSIONS:
            return self._respond(505, b"HTTP/1.0 and HTTP/1.1 only\n", "text/plain")
        target = target.split(b"?", 1)[0]
        absolute = ABSOLUTE_FORM.match(target)
        if absolute:
            target = target[absolute.end():] or b"/"
        if target != b"/metrics":
            return self._respond(404, b"not found; try /metrics\n", "text/plain")
        if method not in (b"GET", b"HEAD"):
            return self._respond(405, b"method not allowed\n", "text/plain")
        body, content_type = self.render()
        return self._respond(200, body if method == b"GET" else b"", content_type, length=len(body))

    def _respond(self, status: int, body: bytes, content_type: str, length: int | None = None) -> bytes:
        self.closing = True
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large", 505: "HTTP Version Not Supported"}[status]
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n"
        )
        return head.encode() + body


def listening_socket(address: str, port: int, backlog: int = 64) -> socket.socket:
    """Bind a TCP listening socket on ``address`` (IPv4 or IPv6)."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock
