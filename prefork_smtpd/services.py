"""The master's own small servers (config port, Prometheus), on its selector.

The master has no event loop, so these are plain non-blocking sockets in
its ``selectors`` loop. A ``Service`` accepts clients; each client gets a
handler with the sans-IO shape ``feed(bytes) -> bytes`` plus ``closing``.
Replies that the peer does not read at once are kept and sent when it can
take them, so a stuck client never blocks the master or another client.
"""

from __future__ import annotations

import selectors
import socket
from typing import Callable, Protocol


class Handler(Protocol):
    closing: bool

    def feed(self, data: bytes) -> bytes: ...


class Service:
    def __init__(
        self,
        selector: selectors.BaseSelector,
        sock: socket.socket,
        make_handler: Callable[[], Handler],
        busy_reply: bytes,
        max_clients: int = 64,
    ) -> None:
        self.selector = selector
        self.sock = sock
        self.make_handler = make_handler
        self.busy_reply = busy_reply
        self.max_clients = max_clients
        self.clients: set[ServiceClient] = set()
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self.on_accept)

    def on_accept(self, mask: int) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. out of file descriptors: try again next time
            conn.setblocking(False)
            if len(self.clients) >= self.max_clients:
                try:
                    conn.send(self.busy_reply)
                except OSError:
                    pass
                conn.close()
                continue
            self.clients.add(ServiceClient(self, conn, self.make_handler()))

    def close(self) -> None:
        for client in list(self.clients):
            client.close()
        try:
            self.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()


class ServiceClient:
    def __init__(self, service: Service, sock: socket.socket, handler: Handler) -> None:
        self.service = service
        self.sock = sock
        self.handler = handler
        self.outbuf = bytearray()
        service.selector.register(sock, selectors.EVENT_READ, self.on_event)

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = self.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self.close()
                return
            if data:
                self.outbuf += self.handler.feed(data)
        self.flush()

    def push(self, data: bytes) -> None:
        """Send bytes the handler produced outside ``feed`` (a late reply)."""
        self.outbuf += data
        self.flush()

    def flush(self) -> None:
        if self.outbuf:
            try:
                sent = self.sock.send(self.outbuf)
                del self.outbuf[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self.close()
                return
        if not self.outbuf and self.handler.closing:
            self.close()
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbuf else 0)
        self.service.selector.modify(self.sock, events, self.on_event)

    def close(self) -> None:
        if self not in self.service.clients:
            return
        self.service.clients.discard(self)
        try:
            self.service.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()


class HttpMetricsRequest:
    """One HTTP/1.x request for ``GET /metrics``; the connection closes after."""

    MAX_REQUEST = 8192

    def __init__(self, render: Callable[[], tuple[bytes, str]]) -> None:
        self.render = render
        self.closing = False
        self._buf = bytearray()

    def feed(self, data: bytes) -> bytes:
        if self.closing:
            return b""
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            end = self._buf.find(b"\n\n")
        if end < 0:
            if len(self._buf) > self.MAX_REQUEST:
                return self._respond(431, b"request header too large\n", "text/plain")
            return b""
        request_line = bytes(self._buf.split(b"\n", 1)[0]).strip()
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return self._respond(400, b"bad request\n", "text/plain")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != b"/metrics":
            return self._respond(404, b"not found; try /metrics\n", "text/plain")
        if method not in (b"GET", b"HEAD"):
            return self._respond(405, b"method not allowed\n", "text/plain")
        body, content_type = self.render()
        return self._respond(200, body if method == b"GET" else b"", content_type, length=len(body))

    def _respond(self, status: int, body: bytes, content_type: str, length: int | None = None) -> bytes:
        self.closing = True
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large"}[status]
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
