"""The config protocol (port 2526), as a pure state machine.

One message per line, ``<param>=<integer>``, case-insensitive, ended by LF
or CR LF. Every message gets one reply line: ``OK``, or ``ERR <reason>``
with nothing changed. ``QUIT`` answers ``OK`` and ends the connection.
``show=1`` answers one ``param=value (source)`` line per parameter, then
``OK``; the source is ``default``, ``file``, ``flag`` or ``live``.
``flush=1`` tells the queue runner to retry every queued mail now.
``reload=1`` reloads the server (as SIGHUP does) and answers only once the
new workers accept, or with ``ERR`` if the config file is refused: a
synchronous reload for systemd's ``ExecReload``. Lines sent meanwhile wait.

With a secret configured, the first message must be ``token=<integer>``
matching it. Before that, every other message (and every wrong token) is a
failed login: it is logged, it spends the connection's few tries (then the
connection closes) and the client address's budget (then even the right
token is refused, unchecked, until the budget refills), so guessing the
token is slow from one address and from one connection alike.

The session only parses; checking and applying a value is the job of the
``apply`` callable it is given (``controlplane.ControlPlane.apply``), which
answers the reason for a refusal, or None.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections import OrderedDict
from typing import Callable

from .settings import PORT_ALIASES
from .textfile import read_regular_file

MAX_LINE = 256

SOURCES = ("default", "file", "flag", "live", "queue")  # "queue": the queue runner's figures, read-only
_MESSAGE = re.compile(r"\s*([A-Za-z_]+)\s*=\s*(\S*)\s*\Z")
# Any length: a value past a range is answered with the range (the line
# length bounds the digits, and so the cost of int()).
_INTEGER = re.compile(r"[+-]?[0-9]+\Z")
_SHOW_LINE = re.compile(r"([a-z_]+)=(-?[0-9]+) \(([a-z]+)\)\Z")


def parse_show_line(line: str) -> tuple[str, int, str]:
    """``max_recipients=7 (live)`` -> ("max_recipients", 7, "live")."""
    m = _SHOW_LINE.match(line)
    if not m:
        raise ValueError(f"not a show line: {line!r}")
    return m.group(1), int(m.group(2)), m.group(3)


def address_key(host: str) -> str:
    """Whose budget a client spends: its IPv4 address, or its IPv6 /64.

    One IPv6 host usually holds a whole /64, so per address it would have
    2^64 budgets.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class TokenGate:
    """The secret, and how many failed logins each client address has left.

    Each address may fail ``failures_per_minute`` times in a burst; its
    budget refills at that rate per minute. An address without budget is
    refused without its token being looked at. The table keeps the
    addresses that failed most recently, at most ``max_addresses`` of them,
    so its memory is bounded whatever the number of attackers.
    """

    def __init__(
        self,
        secret: int | None,
        failures_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = 4096,
    ) -> None:
        self.secret = secret
        self.failures_per_minute = failures_per_minute
        self.clock = clock
        self.max_addresses = max_addresses
        self._budgets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (left, when)
        self._logged: set[str] = set()  # keys out of budget whose refusal was logged

    @property
    def open(self) -> bool:
        return self.secret is None  # 0 is a secret like any other

    def budget_left(self, key: str) -> float:
        rate = self.failures_per_minute
        if key not in self._budgets:
            return float(rate)
        left, when = self._budgets[key]
        return min(float(rate), left + (self.clock() - when) * rate / 60.0)

    def may_try(self, key: str) -> bool:
        if self.budget_left(key) >= 1.0:
            self._logged.discard(key)
            return True
        return False

    def first_refusal(self, key: str) -> bool:
        """True once per exhaustion of ``key``'s budget: one log line, not one per try."""
        if key in self._logged:
            return False
        self._logged.add(key)
        return True

    def matches(self, value: int) -> bool:
        return self.secret is not None and value == self.secret

    def spend(self, key: str) -> None:
        """One failed login from ``key``."""
        left = self.budget_left(key) - 1.0
        self._budgets[key] = (max(left, 0.0), self.clock())
        self._budgets.move_to_end(key)
        while len(self._budgets) > self.max_addresses:
            self._logged.discard(self._budgets.popitem(last=False)[0])


class ConfigSession:
    def __init__(
        self,
        apply: Callable[[str, int], str | None],
        current: Callable[[], dict[str, tuple[int, str]]],
        gate: TokenGate | None = None,
        reload: Callable[["ConfigSession"], None] | None = None,
        peer: str = "",
        log: Callable[[str], None] | None = None,
        max_login_failures: int = 3,
        flush: Callable[[], str | None] | None = None,
    ) -> None:
        self.apply = apply
        self.flush = flush  # flush=1: retry the queue now; answers why not, or None
        self.current = current
        self.gate = gate
        self.reload = reload
        self.peer = peer  # "host:port", for the log
        self.address = address_key(peer.rsplit(":", 1)[0].strip("[]")) if peer else ""
        self.log = log or (lambda message: None)
        self.max_login_failures = max_login_failures
        self.login_failures = 0
        self.waiting = False  # a reload is under way; its reply comes first
        self.authenticated = gate is None or gate.open
        self.closing = False
        self._buf = bytearray()
        self._skipping = False

    @property
    def wants_input(self) -> bool:
        """False while a reload is pending: then bytes wait in the socket."""
        return not self.closing and not self.waiting

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
                    self._skipping = True  # drop the rest of the line as it comes
                    self._buf.clear()
                break
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if self._skipping or len(line) > MAX_LINE:
                self._skipping = False
                out.append(self._refuse("line too long"))
                continue
            out.append(self._message(line.removesuffix(b"\r")))
        return b"".join(out)

    @staticmethod
    def _err(reason: str) -> bytes:
        return f"ERR {reason}\r\n".encode()

    def _refuse(self, reason: str) -> bytes:
        """ERR; before login it is also a failed login."""
        if self.authenticated:
            return self._err(reason)
        return self._login_failed(reason)

    def _login_failed(self, reason: str) -> bytes:
        assert self.gate is not None
        if not self.gate.may_try(self.address):
            return self._out_of_budget()
        self.login_failures += 1
        self.gate.spend(self.address)
        left = self.max_login_failures - self.login_failures
        self.log(
            f"config: failed login from {self.peer}: {reason}"
            f" ({self.login_failures} of {self.max_login_failures} on this connection)"
        )
        if left <= 0:
            self.closing = True
            return self._err(f"{reason}; too many failed logins, closing")
        return self._err(reason)

    def _message(self, line: bytes) -> bytes:
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            return self._refuse("not ASCII text")
        if text.strip().upper() == "QUIT":
            self.closing = True
            return b"OK\r\n"
        m = _MESSAGE.match(text)
        if not m:
            return self._refuse("expected <param>=<integer>")
        name, value_text = m.group(1).lower(), m.group(2)
        name = PORT_ALIASES.get(name, name)
        if not _INTEGER.match(value_text):
            return self._refuse(f"{name}: value must be an integer")
        value = int(value_text)
        if not self.authenticated:
            return self._login(name, value)
        if name == "token":
            return b"OK\r\n"  # already in: a client may always send its token
        if name in ("reload", "flush", "show") and value != 1:
            # Actions, not settings: reload=0 reading as "do not reload" must not reload.
            return self._refuse(f"{name}: an action, send {name}=1")
        if name == "reload":
            if self.reload is None:
                return self._err("reload is not available")
            self.waiting = True
            self.reload(self)
            return b""
        if name == "flush":
            if self.flush is None:
                return self._err("flush is not available")
            reason = self.flush()
            return self._err(reason) if reason else b"OK\r\n"
        if name == "show":
            values = self.current()  # in show order
            return "".join(f"{p}={v} ({source})\r\n" for p, (v, source) in values.items()).encode() + b"OK\r\n"
        reason = self.apply(name, value)
        return self._err(reason) if reason else b"OK\r\n"

    def _login(self, name: str, value: int) -> bytes:
        assert self.gate is not None
        if name != "token":
            return self._login_failed("authentication required: send token=<integer> first")
        if not self.gate.may_try(self.address):
            return self._out_of_budget()  # unchecked: past its budget a guess tells nothing
        if self.gate.matches(value):
            self.authenticated = True
            return b"OK\r\n"
        return self._login_failed("bad token")


    def _out_of_budget(self) -> bytes:
        assert self.gate is not None
        self.closing = True
        if self.gate.first_refusal(self.address):
            self.log(f"config: {self.address} is out of failed logins; refusing it until its budget refills")
        return self._err("too many failed logins from your address; try again later")


def load_secret(path: str) -> int:
    """The config port's token: one integer, alone in its file."""
    try:
        text = read_regular_file(path, 1024).decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the config secret must be one integer") from None
    if not _INTEGER.match(text) or len(text) > 100:
        raise ValueError(f"{path}: the config secret must be one integer")
    return int(text)
