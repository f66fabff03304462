"""The ports the server listens on: one ``Listener`` per port, bound by the master.

The master builds the listeners from the settings (``configured``), binds
each before it forks (``bind_all``: the workers inherit the sockets) and
hands the list to every worker. A worker accepts on every socket of every
listener and makes each connection through the listener's kind (see
``worker.PROTOCOLS``); the session learns which listener it is on from a
``ConnectionContext``, a small read-only record, and never sees the socket.

Kinds (``KINDS``):

    smtp        the SMTP port (-P): mail from anyone to the served domains
    submission  the submission port (RFC 6409, --submission-port): like
                smtp, but MAIL needs AUTH (RFC 4954), and STARTTLS first
                when TLS is configured
    smtps       implicit TLS (RFC 8314, --smtps-port): the TLS handshake
                comes before the greeting; for submission, so MAIL needs AUTH

With --tls-cert, the smtp and submission ports offer STARTTLS (RFC 3207).

With --proxy-protocol, the listeners it names (``proxy_listeners``) take
connections only from --trusted-proxies, each beginning with a PROXY header
(v1 or v2) that says who the client is; the worker reads it before the
connection is made (before the greeting, before the TLS handshake on
smtps), see ``proxy_reader.py``.

How to add a kind (smtps, say):

1. ``KINDS``: its name and what its connections are (TLS mode, AUTH needed).
2. ``configured``: the setting that turns it on (a port, off by default).
3. ``worker.PROTOCOLS``: the factory that makes a connection on it (for
   smtps: the TLS handshake before the greeting).
4. The session reads the ``ConnectionContext`` for what differs in the
   protocol itself (the submission port's MAIL check, say).
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field, replace

from .proxy import parse_networks
from .settings import Settings

SMTP = "smtp"
SUBMISSION = "submission"
SMTPS = "smtps"

# TLS modes: none, STARTTLS offered after EHLO, or implicit (smtps: the
# connection is TLS from its first byte, RFC 8314).
TLS_NONE = "none"
TLS_STARTTLS = "starttls"
TLS_IMPLICIT = "implicit"


@dataclass(frozen=True)
class ConnectionContext:
    """What a session knows of the listener it was accepted on (read-only)."""

    listener: str = SMTP  # the listener's name, for logs
    kind: str = SMTP
    tls: str = TLS_NONE
    require_auth: bool = False  # MAIL is refused until the client has authenticated
    require_tls: bool = False  # MAIL is refused until the client has started TLS


@dataclass(frozen=True)
class Kind:
    """A kind's defaults for its listeners."""

    name: str
    tls: str
    require_auth: bool


KINDS: dict[str, Kind] = {
    SMTP: Kind(SMTP, TLS_NONE, require_auth=False),
    SUBMISSION: Kind(SUBMISSION, TLS_NONE, require_auth=True),
    SMTPS: Kind(SMTPS, TLS_IMPLICIT, require_auth=True),
}

# The plain SMTP port's context: a session made without one is on it.
SMTP_CONTEXT = ConnectionContext()


class ListenError(Exception):
    """A listener's socket cannot be bound; the message names the listener."""


@dataclass(frozen=True)
class Listener:
    """One port the server listens on: its kind, where, and its sockets once bound.

    ``of_kind`` makes one with its kind's defaults; ``bind`` returns a copy
    holding its listening sockets (one dual-stack socket for every address,
    else one per address the name resolves to).
    """

    name: str  # unique among the listeners: "smtp", "submission"
    kind: str  # a key of KINDS: which protocol factory makes its connections
    address: str | None  # None: every address (IPv6 and IPv4 on one socket)
    port: int
    tls: str = TLS_NONE
    require_auth: bool = False
    require_tls: bool = False
    sockets: tuple[socket.socket, ...] = field(default=(), compare=False)
    context: ConnectionContext = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind
        # Built once per listener: every connection on it shares this record.
        context = ConnectionContext(
            listener=self.name, kind=self.kind, tls=self.tls, require_auth=self.require_auth,
            require_tls=self.require_tls,
        )
        object.__setattr__(self, "context", context)

    @classmethod
    def of_kind(
        cls, kind: str, address: str | None, port: int, *, tls: str | None = None, require_tls: bool = False
    ) -> Listener:
        """A listener named after its kind, with the kind's TLS mode (or ``tls``) and AUTH rule."""
        defaults = KINDS[kind]
        return cls(
            kind, kind, address, port, tls=tls or defaults.tls, require_auth=defaults.require_auth,
            require_tls=require_tls,
        )

    @property
    def where(self) -> str:
        """Address and port as the title shows them: ``127.0.0.1 port 2525``, ``port 2525``."""
        return f"{self.address} port {self.port}" if self.address else f"port {self.port}"

    def describe(self) -> str:
        """The listener in an error message: the SMTP port by its address, others by name too."""
        where = self.where if self.address else f"port {self.port} (every address)"
        return where if self.kind == SMTP else f"the {self.name} port {where}"

    def title(self) -> str:
        """The listener in the master's process title."""
        return self.where if self.kind == SMTP else f"{self.name} {self.where}"

    def bind(self, backlog: int) -> Listener:
        """This listener with its sockets bound and listening; raises ListenError."""
        try:
            sockets = _bind_every_address(self.port, backlog) if self.address is None else \
                _bind_address(self.address, self.port, backlog)
        except OSError as exc:
            raise ListenError(f"cannot listen on {self.describe()}: {exc}") from None
        return replace(self, sockets=tuple(sockets))

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def configured(settings: Settings) -> list[Listener]:
    """The listeners the settings ask for, not yet bound: SMTP first.

    With a certificate, the smtp and submission ports offer STARTTLS; the
    submission port then requires it (a password never crosses in the
    clear), the smtp port only with --require-tls.
    """
    tls = settings.tls_cert is not None
    starttls = TLS_STARTTLS if tls else TLS_NONE
    listeners = [
        Listener.of_kind(SMTP, settings.listen, settings.port, tls=starttls, require_tls=tls and settings.require_tls)
    ]
    if settings.submission_port is not None:
        listeners.append(
            Listener.of_kind(SUBMISSION, settings.listen, settings.submission_port, tls=starttls, require_tls=tls)
        )
    if settings.smtps_port is not None:
        listeners.append(Listener.of_kind(SMTPS, settings.listen, settings.smtps_port))
    return listeners


def proxy_listeners(text: str | None) -> frozenset[str]:
    """--proxy-protocol's listeners, by kind: "smtp,smtps" -> {"smtp", "smtps"}; raises ValueError.

    Read by each worker from its settings (not fixed in ``Listener``), so a
    reload can put a port behind a balancer or take it out: the new
    generation of workers reads headers, the old one finishes its sessions.
    """
    if text is None or not text.strip():
        return frozenset()
    kinds = [item.strip() for item in text.split(",")]
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"--proxy-protocol: unknown listener {unknown[0]!r} (known: {', '.join(KINDS)})")
    return frozenset(kinds)


def proxy_problem(settings: Settings) -> str | None:
    """What makes --proxy-protocol and --trusted-proxies unusable together, or None."""
    try:
        kinds = proxy_listeners(settings.proxy_protocol)
    except ValueError as exc:
        return str(exc)
    try:
        networks = parse_networks(settings.trusted_proxies or "")
    except ValueError as exc:
        return f"--trusted-proxies: {exc}"
    if kinds and not networks:
        # Without a trusted proxy every connection to those listeners would be refused.
        return "--proxy-protocol needs --trusted-proxies (the load balancers' addresses)"
    ports = {SUBMISSION: settings.submission_port, SMTPS: settings.smtps_port}
    for kind in sorted(kinds):
        if kind in ports and ports[kind] is None:
            return f"--proxy-protocol names {kind}, but the {kind} port is off (--{kind}-port)"
    return None


def bind_all(listeners: list[Listener], backlog: int) -> list[Listener]:
    """Bind every listener, or none: on a failure the ones bound are closed."""
    bound: list[Listener] = []
    try:
        for listener in listeners:
            bound.append(listener.bind(backlog))
    except ListenError:
        close_all(bound)
        raise
    return bound


def close_all(listeners: list[Listener]) -> None:
    for listener in listeners:
        listener.close()


def _bind_every_address(port: int, backlog: int) -> list[socket.socket]:
    """One dual-stack socket on ``::``; IPv4 only on a host without IPv6."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too
        return [_listen(sock, ("::", port), backlog)]
    except OSError as exc:
        if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    return [_listen(sock, ("0.0.0.0", port), backlog)]


def _bind_address(address: str, port: int, backlog: int) -> list[socket.socket]:
    """One socket per address the name resolves to (a host name may give several)."""
    sockets: list[socket.socket] = []
    try:
        found = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, sockaddr in found:
            sock = socket.socket(family, kind, proto)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sockets.append(_listen(sock, sockaddr, backlog))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _listen(sock: socket.socket, address: tuple, backlog: int) -> socket.socket:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
