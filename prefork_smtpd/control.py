"""The config protocol (port 2526), as a pure state machine.

One message per line, ``<param>=<integer>``, case-insensitive, ended by LF
or CR LF. Every message gets one reply line: ``OK``, or ``ERR <reason>``
with nothing changed. ``QUIT`` answers ``OK`` and ends the connection.
``show=1`` answers one ``param=value`` line per parameter, then ``OK``.
``reload=1`` reloads the server (as SIGHUP does) and answers only once the
new workers accept, or with ``ERR`` if the config file is refused: a
synchronous reload for systemd's ``ExecReload``. Lines sent meanwhile wait.

With a secret configured, the first message must be ``token=<integer>``
matching it; until then every other message is refused.

The session only parses and checks; applying a value is the job of the
``apply`` callable the master gives it.
"""

from __future__ import annotations

import re
from typing import Callable

from .settings import RANGES

MAX_LINE = 256

# The parameters the port accepts, in ``show`` order, with their ranges.
PARAMETERS = (
    "logging",
    "workers",
    "max_connections",
    "max_connections_per_ip",
    "min_free_space",
    "max_message_size",
    "max_recipients",
    "timeout",
    "data_timeout",
    "max_errors",
)
ALIASES = {"logger": "logging"}  # the seed report's name for it
HELP = {
    "logging": "0 turns logging off, any other integer on",
    "workers": "worker processes; leaving workers finish their sessions",
    "max_connections": "open SMTP connections; past it new clients get 421",
    "max_connections_per_ip": "open connections from one address (0: no limit)",
    "min_free_space": "bytes kept free on the mail store; below it mail gets 452 (0: no check)",
    "max_message_size": "bytes per message (SIZE)",
    "max_recipients": "recipients per message",
    "timeout": "seconds a client may take to send one command",
    "data_timeout": "seconds a client may take to send one message",
    "max_errors": "bad commands before a session is closed",
}
_MESSAGE = re.compile(r"\s*([A-Za-z_]+)\s*=\s*(\S*)\s*\Z")
_INTEGER = re.compile(r"[+-]?[0-9]{1,19}\Z")


class ConfigSession:
    def __init__(
        self,
        apply: Callable[[str, int], None],
        current: Callable[[], dict[str, int]],
        secret: int | None = None,
        reload: Callable[["ConfigSession"], None] | None = None,
    ) -> None:
        self.apply = apply
        self.current = current
        self.secret = secret
        self.reload = reload
        self.waiting = False  # a reload is under way; its reply comes first
        self.authenticated = secret is None
        self.closing = False
        self.rejected: list[str] = []  # reasons for ERR, for the master's log
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> bytes:
        if self.closing:
            return b""
        self._buf += data
        return self._run()

    def reload_done(self, error: str | None) -> bytes:
        """The reload this session asked for has ended: reply, then go on."""
        self.waiting = False
        reply = self._err(f"reload failed: {error}") if error else b"OK\r\n"
        return reply + self._run()

    def _run(self) -> bytes:
        out = []
        while not self.closing and not self.waiting:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_LINE:
                    self._skipping = True
                    self._buf.clear()
                break
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if self._skipping or len(line) > MAX_LINE:
                self._skipping = False
                out.append(self._err("line too long"))
                continue
            out.append(self._message(line.removesuffix(b"\r")))
        return b"".join(out)

    def _err(self, reason: str) -> bytes:
        self.rejected.append(reason)
        return f"ERR {reason}\r\n".encode()

    def _message(self, line: bytes) -> bytes:
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            return self._err("not ASCII text")
        if text.strip().upper() == "QUIT":
            self.closing = True
            return b"OK\r\n"
        m = _MESSAGE.match(text)
        if not m:
            return self._err("expected <param>=<integer>")
        name, value_text = m.group(1).lower(), m.group(2)
        name = ALIASES.get(name, name)
        if not _INTEGER.match(value_text):
            return self._err(f"{name}: value must be an integer")
        value = int(value_text)
        if name == "token":
            if self.secret is not None and value == self.secret:
                self.authenticated = True
                return b"OK\r\n"
            return self._err("bad token")
        if not self.authenticated:
            return self._err("authentication required: send token=<integer> first")
        if name == "reload":
            if self.reload is None:
                return self._err("reload is not available")
            self.waiting = True
            self.reload(self)
            return b""
        if name == "show":
            values = self.current()
            return "".join(f"{p}={values[p]}\r\n" for p in PARAMETERS).encode() + b"OK\r\n"
        if name not in PARAMETERS:
            return self._err(f"unknown parameter {name}")
        low, high = RANGES[name]
        if not low <= value <= high:
            return self._err(f"{name} must be between {low} and {high}")
        self.apply(name, value)
        return b"OK\r\n"


def load_secret(path: str) -> int:
    """The config port's token: one integer, alone in its file."""
    with open(path, encoding="ascii") as f:
        text = f.read().strip()
    if not _INTEGER.match(text):
        raise ValueError(f"{path}: the config secret must be one integer")
    return int(text)
