"""Reading a server's reply lines in the command-line tools, bounded.

The tools may be pointed at anything (a wrong port, a stalled or hostile
peer): each line is at most ``max_line`` octets and arrives before a
deadline the caller sets, however slowly its bytes trickle in (a socket
timeout alone counts per read).
"""

from __future__ import annotations

import socket
import time


class LineReader:
    def __init__(self, sock: socket.socket, max_line: int) -> None:
        self.sock = sock
        self.max_line = max_line
        self.unread = b""

    def line(self, deadline: float) -> bytes:
        """The next line, without its LF; TimeoutError past ``deadline``
        (time.monotonic), ValueError for a longer line, ConnectionError at
        the end of the stream."""
        while b"\n" not in self.unread:
            if len(self.unread) > self.max_line:
                raise ValueError(f"a reply line longer than {self.max_line} octets")
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                self.sock.settimeout(remaining)
                chunk = self.sock.recv(self.max_line)
            except TimeoutError:
                raise TimeoutError("no complete reply in time") from None
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.unread += chunk
        line, _, self.unread = self.unread.partition(b"\n")
        return line
