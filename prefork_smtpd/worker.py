"""A worker process: one uvloop event loop serving SMTP sessions.

The worker accepts clients on the listeners it shares with the other
workers (listeners.py: the SMTP port, the submission port), makes each
connection with its listener's protocol (``PROTOCOLS``), glues their
transports to sans-IO sessions, enforces the timeouts and connection
limits, and hands complete messages to the batch
committer's threads so that disk work never stalls the loop. Of the other
workers it knows only the shared counters.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import os
import random
import signal
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast
from concurrent.futures import ThreadPoolExecutor

import uvloop
from setproctitle import setproctitle

from . import replies
from .delivery import BatchCommitter, DeliveryError, MaildirStore
from .diskspace import SpaceGuard, bytes_to_store
from .credentials import Credentials
from .events import (
    AuthAborted,
    Authenticated,
    AuthFailed,
    AuthUnavailable,
    CheckCredentials,
    Close,
    Deliver,
    Event,
    LogEvent,
    Reply,
    StartTLS,
    TLSStarted,
)
from .listeners import SMTP, SMTPS, SUBMISSION, TLS_IMPLICIT, ConnectionContext, Listener, proxy_listeners
from .notices import success_notice
from .queue import queue_dir_of, wake_runner
from .relayrights import in_networks, relay_networks
from .log import AppendLineHandler, close_log, flush_log, line_writer, open_log, reopen_log
from .policy import ServerPolicy, bound_addresses, mailbox_check, names_from, own_addresses
from .proxy import ProxyResult, parse_networks, trusted
from .proxy_reader import Conveyed, conveyed, read_header
from .session import CLOSED, CONNECTED, DATA, READY, WAITING, Envelope, Session
from .settings import Settings
from .stats import AUTH_FIELDS, FIELD, TLS_SESSION_FIELDS, AddressTables, LiveSettings, SharedStats, address_key
from .tls import describe_tls

TOTAL = FIELD["total"]
CURRENT = FIELD["current"]
BYTES = FIELD["bytes"]
MAILS = FIELD["mails"]
REPLIES_4XX = FIELD["replies_4xx"]
REPLIES_5XX = FIELD["replies_5xx"]
REJECTED = FIELD["rejected_connections"]
ACCEPTING = FIELD["accepting"]
RECYCLE = FIELD["recycle"]
TLS_FAILURES = FIELD["tls_handshake_failures"]
AUTH_FAILURES = FIELD["auth_failures"]
PROXIED = FIELD["proxied"]
PROXY_FAILURES = FIELD["proxy_failures"]

_IDLE_STATES = (CONNECTED, READY)
TICK = 0.5  # seconds between housekeeping passes (timeouts, titles)
# Unsent replies per connection: past WRITE_HIGH the connection stops reading
# until the client has taken all but WRITE_LOW.
WRITE_HIGH = 64 * 1024
WRITE_LOW = 16 * 1024
# Input fed to the session at once outside DATA: the replies to 1 KiB of
# pipelined commands stay under 60 KB (HELP, the worst, is 55 times its command).
COMMAND_SLICE = 1024
# A read at least this large likely left more waiting, and the event loop
# (libuv) would go on reading the same socket, up to 32 reads of 256 KB,
# before any other connection's turn: 8 MB of one upload, a few hundred ms
# of Python, while a NOOP on another connection waits. After such a read a
# connection steps aside until the loop's next turn.
FAIR_READ = 64 * 1024
# A connection keeps its address's key while open (a tuple and an int, 88
# bytes): connections from a recent address (a balancer, a busy peer) share
# one. The cache stays small (some 60 KB), since distinct clients gain nothing.
shared_address_key = functools.lru_cache(maxsize=256)(address_key)

# What a connection holds when it holds nothing: one shared empty value, not a
# bytearray per connection (20,000 idle sessions would keep 20,000 of them).
NOTHING_HELD = b""
DEFER_ACCEPT = 0.002  # seconds a worker over its fair share waits before accepting


def address_literal(peer: str) -> str:
    """The client of ``[host]:port`` as a Received header names it (RFC 5321
    4.4): an address literal, tagged when IPv6 (4.1.3); "" when unknown."""
    host = peer.rpartition(":")[0]
    return f"[IPv6:{host[1:]}" if ":" in host else host


class SMTPConnection(asyncio.Protocol):
    """One client connection: bytes to the session, replies to the socket.

    Everything a client can make the worker hold is bounded here:

    * unsent replies: the transport calls ``pause_writing`` once more than
      WRITE_HIGH bytes wait for a client that does not read; the connection
      then stops reading (and so stops answering) until ``resume_writing``.
      A read is fed to the session COMMAND_SLICE bytes at a time, so one
      read of pipelined commands cannot turn into megabytes of replies
      between two looks at the buffer;
    * input while the connection waits (replies unsent, or a verdict the
      session waits for: a message being stored, a password being checked):
      reading is paused, and the rest of the last read is ``held`` here, to
      be fed when the wait is over; during a STARTTLS handshake nothing is
      held: what the client sent in the clear behind STARTTLS is dropped;
    * message data: every byte a session holds in DATA, or hands to the
      store, counts against the worker's ``max_data_memory``.
    """

    __slots__ = (
        "worker", "context", "transport", "session", "peer", "deadline", "closed", "address",
        "write_paused", "storing", "reading_paused", "held", "data_held", "upgrading", "conveyed",
        "stepped_aside",
    )

    def __init__(self, worker: "Worker", context: ConnectionContext, conveyed: Conveyed | None = None) -> None:
        self.worker = worker
        self.context = context  # the listener it came in on
        self.conveyed = conveyed  # what a trusted proxy's PROXY header said of the client
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.peer = "unknown"
        self.deadline = math.inf
        self.closed = False
        self.address: tuple[int, int] | None = None  # counted in the shared address table
        # Reading is paused while either reason holds; it resumes when neither does.
        self.write_paused = False  # our replies wait for the client to read
        self.storing: Envelope | None = None  # a message on its way to disk
        self.reading_paused = False
        self.held: bytes | bytearray = NOTHING_HELD  # input received but not yet fed to the session
        self.data_held = 0  # message bytes this connection counts in worker.data_memory
        self.upgrading = False  # a STARTTLS handshake is under way
        self.stepped_aside = False  # reading stopped until the loop's next turn (FAIR_READ)

    # --------------------------------------------------------- lifecycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        worker = self.worker
        self.transport = transport = cast(asyncio.Transport, transport)  # a stream's: it writes
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        slot = worker.slot
        slot.add(TOTAL)
        slot.add(CURRENT)
        worker.connections.add(self)
        conveyed = self.conveyed
        if conveyed is not None:
            slot.add(PROXIED)
        # The client's address from the PROXY header, where it gave one.
        peername = conveyed.client if conveyed and conveyed.client else transport.get_extra_info("peername")
        host = "unknown"
        if peername:
            host = peername[0]
            if host.startswith("::ffff:"):  # an IPv4 client on the dual-stack socket
                host = host[7:]
            self.peer = f"[{host}]:{peername[1]}"
        refusal = worker.admit(self, shared_address_key(host))
        if refusal is not None:
            slot.add(REJECTED)
            worker.log(f"{self.peer} refused: {refusal}")
            transport.write(replies.connection_refused(worker.settings.hostname, refusal))
            transport.close()
            return
        context = self.context
        # Rights that come with an address (relay, AUTH in the clear) go
        # only to a client at that address: not to one a proxy could not name.
        own_address = conveyed is None or not conveyed.unnamed
        self.session = Session(
            worker.settings.hostname, worker.domains, worker.live, worker.read_stat, worker.policy, context=context,
            tls=describe_tls(transport.get_extra_info("ssl_object")),  # on an implicit-TLS port
            auth=worker.users is not None,
            auth_without_tls=worker.settings.loopback_auth_without_tls and _is_loopback(host) and own_address,
            may_relay=own_address and in_networks(host, worker.relay_networks),
        )
        self.session.admit_message = worker.admit_message
        self.deadline = worker.now + worker.live.timeout
        transport.write(self.session.greeting())
        via = f" ({conveyed.note})" if conveyed is not None else ""
        if context.kind == SMTP:
            worker.log(f"{self.peer} connected{via}")
        else:
            worker.log(f"{self.peer} connected to the {context.listener} port{via}")
        if self.session.tls is not None:
            worker.log(f"{self.peer} TLS {self.session.tls.log_fields()}")

    def connection_lost(self, exc: Exception | None) -> None:
        worker = self.worker
        self.closed = True
        self.held = NOTHING_HELD
        if self.storing is None:  # else the message stays in memory until the store is done with it
            worker.data_memory -= self.data_held
            self.data_held = 0
        worker.slot.add(CURRENT, -1)
        if self.conveyed is not None:
            worker.slot.add(PROXIED, -1)
        if self.address is not None:
            worker.stats.addresses.close(worker.index, self.address)
        worker.connections.discard(self)
        session = self.session
        if session is not None:
            worker.log(f"{self.peer} closed" + (f" ({exc})" if exc else ""))
        worker.session_ended()

    # ------------------------------------------------------------- input
    def data_received(self, data: bytes) -> None:
        if self.session is None:
            return
        if self.upgrading:
            # Plaintext behind STARTTLS, read before the handshake took the
            # transport over: never a command (RFC 3207 5, CVE-2011-0411).
            self.worker.log(f"{self.peer} dropped {len(data)} bytes sent in the clear after STARTTLS")
            return
        if self.held:  # a read that was under way when we paused: keep the order
            self._hold(data)
            return
        self._feed(data)
        if len(data) >= FAIR_READ and not self.reading_paused and not self.closed and not self.stepped_aside:
            self.stepped_aside = True
            assert self.transport is not None
            self.transport.pause_reading()
            self.worker.loop.call_soon(self._step_back_in)

    def _step_back_in(self) -> None:
        """The other connections had their turn: read again, unless paused for a reason of its own."""
        self.stepped_aside = False
        if not self.reading_paused and not self.closed:
            assert self.transport is not None
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close our side too

    def _hold(self, data: bytes | bytearray | memoryview) -> None:
        """Keep input to feed once the wait is over: the bytearray is made
        at the first byte held, so a connection that holds nothing has none."""
        if self.held:
            self.held += data  # a bytearray: only _hold makes held non-empty
        elif data:
            self.held = bytearray(data)

    def _feed(self, data: bytes | bytearray | memoryview) -> None:
        """Feed the session until the data ends or the connection must wait.

        Commands go in slices (a reply can be 50 times the size of its
        command); message data goes whole, which keeps the hot path fast.
        """
        session = self.session
        assert session is not None
        view = None  # made only when the read goes in slices
        pos, end = 0, len(data)
        while pos < end:
            if self.upgrading:
                if pos < end:
                    self.worker.log(f"{self.peer} dropped {end - pos} bytes sent in the clear after STARTTLS")
                return  # the rest was sent in the clear behind STARTTLS
            state = session.state
            if self.write_paused or state is WAITING:
                self._hold(memoryview(data)[pos:])
                return
            if state is CLOSED:
                return  # closing: the rest is never answered
            # Message data goes whole; so does a BDAT chunk's, but the
            # commands behind it (more chunk lines) go in slices as others.
            span = COMMAND_SLICE if state is not DATA else session.data_due + COMMAND_SLICE
            piece: bytes | bytearray | memoryview
            if pos == 0 and end <= span:
                piece = data  # the usual read, fed whole: no view, no slice
            else:
                if view is None:
                    view = memoryview(data)
                piece = view[pos : pos + span]
            pos += len(piece)
            events = session.feed(piece)
            if events or session.state is not state:
                # Every reply answers a command the client completed: that
                # is progress (so is a BDAT line, answered after its chunk).
                # Our own writes never push the deadline: while they wait
                # unread, nothing more is fed.
                self._renew_deadline()
            self._act(events)
            self._account_data_memory()

    def _renew_deadline(self) -> None:
        worker = self.worker
        assert self.session is not None
        if self.session.state is DATA:
            self.deadline = worker.now + worker.live.data_timeout
        else:
            self.deadline = worker.now + worker.live.timeout

    def _act(self, events: list[Reply | Event]) -> None:
        """Carry out what the session asks for, in order.

        Replies are gathered and written at once: the replies to a run of
        pipelined commands leave in one write. Each 4xx/5xx reply counts
        as a refusal (a Close's last words do not: they refuse nothing).
        """
        session = self.session
        transport = self.transport
        assert session is not None and transport is not None
        worker = self.worker
        reply = events[0] if len(events) == 1 else None
        if type(reply) is Reply and reply[0] < 0x34:
            transport.write(reply)  # the usual: one positive reply to one command, as it is
        else:
            unsent: list[bytes] = []
            refused_4xx = refused_5xx = 0
            for event in events:
                # Told apart by exact type (cheaper than isinstance; type checkers follow it too).
                if type(event) is Reply:
                    unsent.append(event)
                    code = event[0]
                    if code >= 0x34:  # "4" or "5"
                        if code == 0x34:
                            refused_4xx += 1
                        else:
                            refused_5xx += 1
                elif type(event) is LogEvent:
                    worker.log(f"{self.peer} {event.text}")
                elif type(event) is Close:
                    unsent.append(event.reply)
                    transport.write(b"".join(unsent))
                    unsent = []
                    transport.close()
                elif type(event) is Deliver:
                    self._deliver(event.envelope)
                elif type(event) is StartTLS:
                    if unsent:  # the 220 leaves in the clear, before the handshake
                        transport.write(b"".join(unsent))
                        unsent = []
                    self._start_tls()
                elif type(event) is CheckCredentials:
                    self._check_credentials(event)
                elif type(event) is AuthAborted:
                    worker.count_auth(event.mechanism, event.result)
                else:
                    raise TypeError(f"no worker action for {event!r}")
            if unsent:
                transport.write(b"".join(unsent))
            if refused_4xx or refused_5xx:
                worker.slot.add(REPLIES_4XX, refused_4xx)
                worker.slot.add(REPLIES_5XX, refused_5xx)
        if worker.closing_idle and session.state in _IDLE_STATES:
            transport.write(session.shutdown_reply())
            transport.close()

    # ------------------------------------------------------ backpressure
    def pause_writing(self) -> None:
        """The client has more than WRITE_HIGH bytes of replies unread."""
        self.write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._go_on()

    def _pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            assert self.transport is not None
            if not self.stepped_aside:  # else stopped already
                self.transport.pause_reading()

    def _go_on(self) -> None:
        """Feed what was held, then read again, unless a reason to wait remains."""
        if self.closed or self.session is None:
            return
        waiting_verdict = self.session.state is WAITING or self.upgrading
        if self.held and not self.write_paused and not waiting_verdict:
            held, self.held = self.held, NOTHING_HELD
            self._feed(held)
        waiting = self.write_paused or self.session.state is WAITING or self.upgrading or self.held or self.closed
        if self.reading_paused and not waiting:
            self.reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    # ------------------------------------------------------- message data
    def _account_data_memory(self) -> None:
        """Keep the worker's count of message bytes in memory; enforce its limit."""
        session = self.session
        assert session is not None
        held = session.held_bytes
        if self.storing is not None:
            held += self.storing.size
        change = held - self.data_held
        if not change:
            return
        self.data_held = held
        worker = self.worker
        worker.data_memory += change
        if change > 0 and session.held_bytes and worker.data_memory > worker.data_memory_limit():
            # This message pushed the worker over: refuse it, drop what it holds.
            worker.log(
                f"{self.peer} message refused: the worker holds {worker.data_memory} bytes "
                f"of message data (limit {worker.data_memory_limit()})"
            )
            session.refuse_message(replies.INSUFFICIENT_STORAGE)
            worker.data_memory -= held
            self.data_held = 0

    # ---------------------------------------------------------- delivery
    def _deliver(self, envelope: Envelope) -> None:
        """Store the message off the loop; the session answers once it is on disk."""
        assert self.transport is not None and self.session is not None
        # The client waits for our verdict anyway; what it pipelined behind
        # the message waits in the kernel, and the rest of this read here.
        self.storing = envelope
        self._pause_reading()
        self._hold(self.session.take_unread())
        self.deadline = math.inf
        future = self.worker.store_when_room(envelope, address_literal(self.peer))
        future.add_done_callback(self._delivered)

    def _delivered(self, future: asyncio.Future) -> None:
        worker = self.worker
        session = self.session
        envelope = self.storing
        assert session is not None and envelope is not None
        self.storing = None
        try:
            queue_id = future.result()
        except DeliveryError as exc:
            worker.log(f"{self.peer} delivery failed: {exc}")
            if exc.no_space:
                reply = replies.INSUFFICIENT_STORAGE
            else:
                reply = replies.LOCAL_ERROR
            events = session.message_failed(reply)
        else:
            worker.slot.add(MAILS)
            worker.slot.add(BYTES, envelope.size)
            destinations, queued, dsn_asked = _stored_mail_facts(envelope)
            if queued:
                wake_runner()  # its queue copy is durable: the runner can start on it now
            worker.log(
                f"{self.peer} mail {queue_id} from <{envelope.sender}> to {destinations}"
                f" ({envelope.size} bytes)"
                + (f" {envelope.tls.log_fields()}" if envelope.tls is not None else "")
                + (f" login={envelope.login!r}" if envelope.login else "")
            )
            events = session.message_stored(queue_id)
            if dsn_asked:  # else no NOTIFY=SUCCESS was asked for
                worker.send_success_notice(envelope, queue_id)
        worker.data_memory -= self.data_held  # the store is done with the message
        self.data_held = 0
        if self.closed:
            return  # the client left while we stored; nothing to answer
        self._renew_deadline()  # the client gets its full time for the next command
        self._act(events)
        self._go_on()

    # ---------------------------------------------------------- STARTTLS
    def _start_tls(self) -> None:
        """Hand the transport to TLS; the session resumes once the handshake is done."""
        assert self.transport is not None and self.session is not None
        self.upgrading = True
        self.held = NOTHING_HELD  # sent in the clear behind STARTTLS: dropped
        self.session.take_unread()  # (the session dropped its part already)
        self.deadline = math.inf  # the handshake has its own timeout
        self.worker.loop.create_task(self._upgrade())

    async def _upgrade(self) -> None:
        worker = self.worker
        session = self.session
        assert session is not None and worker.tls_context is not None and self.transport is not None
        try:
            transport = await worker.loop.start_tls(
                self.transport, self, worker.tls_context, server_side=True,
                ssl_handshake_timeout=worker.settings.tls_handshake_timeout,
            )
        except Exception as exc:  # noqa: BLE001: whatever the client did, the connection is over
            worker.tls_failed(self.peer, exc)
            if not self.closed and self.transport is not None:
                self.transport.abort()
            return
        if transport is not None:
            worker.tls_completed(transport)
        if self.closed or transport is None:
            return
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        self.upgrading = False
        self.reading_paused = False  # the TLS transport reads
        info = describe_tls(transport.get_extra_info("ssl_object"))
        assert info is not None
        worker.log(f"{self.peer} STARTTLS {info.log_fields()}")
        events = session.resume(TLSStarted(info))
        self._renew_deadline()
        self._act(events)
        self._go_on()

    # -------------------------------------------------------------- AUTH
    def _check_credentials(self, event: CheckCredentials) -> None:
        """Check the password in the worker's thread pool; a wrong one is answered late."""
        assert self.session is not None
        self._pause_reading()
        self._hold(self.session.take_unread())
        self.deadline = math.inf
        worker = self.worker
        if worker.auth_checks >= worker.settings.max_auth_checks:
            worker.count_auth(event.mechanism, "unavailable")
            # The 454 waits as a 535 does: a retry after it costs a guesser the
            # same time as a wrong password, so guessers cannot take every
            # free check from the users. (The session logs the refusal.)
            worker.loop.call_later(worker.settings.auth_failure_delay, self._auth_verdict, AuthUnavailable())
            return
        worker.auth_checks += 1
        users = worker.users
        assert users is not None
        future = worker.loop.run_in_executor(worker.auth_pool, users.verify, event.username, event.password)
        future.add_done_callback(lambda f: self._checked(f, event.mechanism, event.username))

    def _checked(self, future: asyncio.Future, mechanism: str, username: str) -> None:
        worker = self.worker
        worker.auth_checks -= 1
        try:
            matches = future.result()
        except Exception as exc:  # noqa: BLE001: a broken hash is a failed login, logged
            worker.log(f"{self.peer} password check failed: {exc!r}")
            matches = False
        if matches:
            worker.count_auth(mechanism, "success")
            self._auth_verdict(Authenticated(username))
            return
        worker.count_auth(mechanism, "failure")
        worker.slot.add(AUTH_FAILURES)
        # Slow down guessing: the 535 leaves only after the delay.
        worker.loop.call_later(worker.settings.auth_failure_delay, self._auth_verdict, AuthFailed())

    def _auth_verdict(self, verdict: Authenticated | AuthFailed | AuthUnavailable) -> None:
        if self.closed or self.session is None or self.session.state is CLOSED:
            return
        events = self.session.resume(verdict)
        self._renew_deadline()
        self._act(events)
        self._go_on()

    def timed_out(self) -> None:
        assert self.transport is not None and self.session is not None
        if self.write_paused or self.transport.is_closing():
            # Its replies sit unread: a close would wait for them forever.
            self.worker.log(f"{self.peer} timeout in state {self.session.state.value}; not reading, dropped")
            self.deadline = math.inf
            self.transport.abort()
            return
        self.worker.log(f"{self.peer} timeout in state {self.session.state.value}")
        self.transport.write(self.session.timeout_reply())
        self.transport.close()
        # The close waits until the 421 is sent; a client that never reads
        # gets a last timeout to take it, then is dropped.
        self.deadline = self.worker.now + self.worker.live.timeout


# The protocol that serves each kind of listener: called with the worker and
# the listener's context, it makes the connection's asyncio protocol.
PROTOCOLS: dict[str, Callable[[Worker, ConnectionContext, Conveyed | None], asyncio.Protocol]] = {
    SMTP: SMTPConnection,
    SUBMISSION: SMTPConnection,  # the session refuses MAIL until AUTH (context.require_auth)
    SMTPS: SMTPConnection,  # the worker runs the handshake before the connection is made (context.tls)
}


def _stored_mail_facts(envelope: Envelope) -> tuple[str, bool, bool]:
    """What a stored mail's recipients say, in one walk: where it went, for
    its log line (``bob,carol``, and ``queued for <addresses>`` for outside
    recipients); whether any went to the queue; whether any gave DSN
    parameters (a success notice may be owed)."""
    recipients = envelope.recipients
    if len(recipients) == 1:
        rcpt = recipients[0]
        if not rcpt.outside:  # the usual mail: no set, sort or join to make
            return rcpt.folder, False, rcpt.dsn is not None
    folders: set[str] = set()
    outside: list[str] = []
    dsn_asked = False
    for rcpt in recipients:
        if rcpt.outside:
            outside.append(rcpt.address)
        else:
            folders.add(rcpt.folder)
        if rcpt.dsn is not None:
            dsn_asked = True
    destinations = ",".join(sorted(folders))
    if outside:
        destinations += (" and " if destinations else "") + f"queued for {', '.join(outside)}"
    return destinations, bool(outside), dsn_asked


def _peer_text(sock: socket.socket) -> str:
    """An accepted socket's peer as the log shows it: ``[192.0.2.1]:4711``."""
    try:
        peer = sock.getpeername()
    except OSError:
        return "unknown"
    return f"[{peer[0].removeprefix('::ffff:')}]:{peer[1]}"


@functools.lru_cache(maxsize=256)  # asked once per connection; clients come back (ipaddress: 4-5 us)
def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Worker:
    def __init__(
        self, index: int, listeners: list[Listener], settings: Settings, stats: SharedStats,
        credentials: Credentials | None = None,
    ) -> None:
        self.index = index
        credentials = credentials or Credentials()
        # What the master read at start or at the last reload, inherited in memory.
        self.tls_context: ssl.SSLContext | None = credentials.tls_context
        self.users = credentials.users
        self.auth_pool: ThreadPoolExecutor | None = None  # made after fork, when there are users
        self.auth_checks = 0  # password checks running or queued
        self.listeners = listeners
        self.settings = settings
        self.proxied_kinds = proxy_listeners(settings.proxy_protocol)  # checked at start and on reload
        self.trusted_proxies = parse_networks(settings.trusted_proxies or "")
        self.stats = stats
        # Bound once here: a method bound per session is one more object every idle session keeps.
        self.read_stat = stats.xstat
        self.admit_message = self.message_admission
        self.slot = stats.slot(index)
        self.domains = frozenset(settings.domains)
        self.relay_networks = relay_networks(settings.relay_networks)  # checked at start
        self.live = LiveSettings(stats)  # limits as the config port sets them
        self.space = SpaceGuard(settings.mail_dir, lambda: self.live.min_free_space)
        names = names_from(settings)
        self.policy = ServerPolicy(
            mailbox_check(settings.mailboxes, settings.mail_dir, settings.mailbox_list, names), self.space, names,
            lambda: own_addresses(bound_addresses(listeners)),
        )
        self.connections: set[SMTPConnection] = set()
        # Accepted sockets whose connection is not made yet (its setup, or
        # its TLS handshake, runs in a task): a leaving worker waits for them.
        self.setting_up = 0
        # Implicit-TLS handshakes under way, by client address: counted
        # toward the connection limits before the connection itself is.
        self.handshaking: dict[tuple[int, int], int] = {}
        self.handshakes = 0  # their sum
        self.data_memory = 0  # message bytes held by sessions in DATA and by messages being stored
        self.stopping = False  # no longer accepting
        self._deferred = False  # the last wakeup was passed to the other workers
        self.closing_idle = False  # closing sessions between transactions
        self.sessions_served = 0
        self.recycle_asked = False
        # Recycle after max_requests sessions, plus up to 10% jitter so that
        # workers started together do not all restart together.
        jitter = random.randint(0, settings.max_requests // 10) if settings.max_requests else 0
        self.max_sessions = settings.max_requests + jitter
        self.now = 0.0
        self.master_pid = os.getppid()
        self._logger: logging.Logger | None = None
        self._log_lines: AppendLineHandler | None = None

    # ------------------------------------------------------------ running
    def run(self) -> int:
        """The body of the forked child; returns the exit status."""
        setproctitle(f"prefork-smtpd: worker {self.index} (starting)")
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master decides when we stop
        self.open_log()
        # A fresh loop, built after fork: never one inherited from the master.
        self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        store = MaildirStore(
            self.settings.mail_dir, self.settings.hostname, queue_dir_of(self.settings),
            plus_folders=self.settings.plus_folders, max_plus_folders=self.settings.max_plus_folders,
            note=functools.partial(self.loop.call_soon_threadsafe, self.log),  # it speaks from its thread
            journal_size=self.settings.journal_size,
        )
        self.committer = BatchCommitter(store, self.loop, self.settings.delivery_threads)
        if self.users is not None:
            # Few threads: an argon2id check takes 64 MiB and a core for ~0.1 s.
            self.auth_pool = ThreadPoolExecutor(self.settings.auth_threads, thread_name_prefix="auth")
        try:
            self.loop.run_until_complete(self.serve())
        finally:
            if self.auth_pool is not None:
                self.auth_pool.shutdown(wait=False, cancel_futures=True)
            self.committer.close()
            self.loop.close()
            close_log(self._logger)
        return 0

    async def serve(self) -> None:
        loop = self.loop
        self.now = loop.time()
        self.finished = loop.create_future()
        for listener in self.listeners:
            new_connection = self.connection_factory(listener)
            for sock in listener.sockets:
                loop.add_reader(sock.fileno(), self.accept_one, sock, new_connection)
        loop.add_signal_handler(signal.SIGTERM, self.begin_shutdown)
        loop.add_signal_handler(signal.SIGQUIT, self.stop_now)
        loop.add_signal_handler(signal.SIGHUP, self.retire)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_log)
        # The title first: the master answers a reload once every new worker
        # has set ACCEPTING, and whoever then looks at the titles (ps, a test)
        # must find them saying that this worker accepts.
        self.title()
        self.slot.set(ACCEPTING, 1)
        self.log("accepting connections")
        ticker = loop.create_task(self.housekeeping())
        await self.finished
        ticker.cancel()
        self.stop_accepting()

    async def housekeeping(self) -> None:
        """Every tick: cut timed-out sessions, notice a lost master, retitle."""
        last_count = -1
        while True:
            await asyncio.sleep(TICK)
            self.now = now = self.loop.time()
            if os.getppid() != self.master_pid and not self.stopping:
                self.log("master is gone; stopping")
                self.begin_shutdown()
            for conn in [c for c in self.connections if c.deadline <= now]:
                conn.timed_out()
            if self.stopping:
                if self.closing_idle:
                    self.close_idle_sessions()
                if self.idle() or now >= self.stop_deadline:
                    self.stop_now()
            if len(self.connections) != last_count:
                last_count = len(self.connections)
                self.title()
            self.flush_log()

    # ------------------------------------------------------------ accepting
    # Every worker watches the listening sockets the master bound. Each
    # wakeup accepts a single connection, then the loop serves its sessions
    # before it looks again, so a busy worker takes new clients more slowly
    # than an idle one. On top of that, a worker holding more than its fair
    # share of the server's open connections lets one wakeup pass (for
    # DEFER_ACCEPT seconds) so the others can take the client; the next
    # wakeup accepts regardless, so a stuck neighbour never strands a queued
    # client. (Letting the event loop accept everything queued per wakeup
    # put 34 of 50 burst connections on one of two workers; see bench S6.)
    # The deferral is the worker's, not the socket's: a wakeup passed on one
    # listener lets the next wakeup on any of them accept.
    def accept_one(self, listening: socket.socket, new_connection: Callable[[], asyncio.Protocol]) -> None:
        if not self._deferred and self.over_fair_share():
            self._deferred = True
            self.loop.remove_reader(listening.fileno())
            self.loop.call_later(DEFER_ACCEPT, self._resume_accepting, listening, new_connection)
            return
        self._deferred = False
        try:
            sock, _ = listening.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it
        except OSError as exc:  # out of file descriptors, most likely
            self.log(f"accept failed: {exc}; pausing accepts for 0.1 s")
            self.loop.remove_reader(listening.fileno())
            self.loop.call_later(0.1, self._resume_accepting, listening, new_connection)
            return
        # No setblocking(False) nor TCP_NODELAY here: uvloop's transport sets
        # both on the socket it is given (two system calls per connection saved).
        setup: asyncio.Future[Any]
        if getattr(new_connection, "proxy", False):
            sock.setblocking(False)  # the PROXY header is read before any transport
            # The PROXY header is read first (within --proxy-timeout): the
            # socket is on its way until the connection is made after it.
            setup = self.loop.create_task(self._accept_proxied(new_connection, sock))
        elif getattr(new_connection, "implicit_tls", False):
            setup = self.loop.create_task(self._accept_counted_tls(new_connection, sock))
        else:
            setup = self.loop.create_task(self.loop.connect_accepted_socket(new_connection, sock))
        self.setting_up += 1
        setup.add_done_callback(self._set_up)

    def _set_up(self, _: asyncio.Future) -> None:
        """An accepted socket's setup ended: its connection is made, or it failed."""
        self.setting_up -= 1
        if self.stopping and self.idle():
            self.stop_now()

    def idle(self) -> bool:
        """No connection open or on its way: a leaving worker may go."""
        return not self.connections and not self.setting_up

    async def _accept_proxied(self, new_connection: Callable[..., asyncio.Protocol], sock: socket.socket) -> None:
        """A PROXY listener: only a trusted proxy may connect, and its header
        comes first; then the connection is made as on any listener (TLS
        handshake included), with the client the header names.

        Refused before any session: an untrusted peer gets a 421 (it is a
        client that went around the balancer, or a balancer missing from
        --trusted-proxies: it should retry, not bounce); a bad or late header
        gets no byte at all (anything written would reach an unknown client
        through the proxy, in a stream whose framing is lost)."""
        proxy = _peer_text(sock)
        try:
            proxy_address = sock.getpeername()[0]
        except OSError:
            proxy_address = ""  # gone already: trusts nothing
        if not trusted(proxy_address, self.trusted_proxies):
            self.slot.add(PROXY_FAILURES)
            self.log(f"{proxy} refused: not a trusted proxy (--trusted-proxies) on a PROXY protocol port")
            try:
                sock.send(replies.connection_refused(self.settings.hostname, "this port is for the load balancer"))
            except OSError:
                pass
            sock.close()
            return
        outcome = await read_header(self.loop, sock, self.settings.proxy_timeout)
        if not isinstance(outcome, ProxyResult):
            self.slot.add(PROXY_FAILURES)
            self.log(f"{proxy} PROXY header refused: {outcome}")
            sock.close()
            return
        conveyed_client = conveyed(outcome.header, proxy)

        def make_connection() -> asyncio.Protocol:
            return new_connection(conveyed_client)

        if getattr(new_connection, "implicit_tls", False):
            client = conveyed_client.client
            if client:  # counted as the client it is, as its session will be
                peer_text = f"[{client[0].removeprefix('::ffff:')}]:{client[1]}"
                await self._accept_counted_tls(make_connection, sock, client[0], peer_text)
            else:
                await self._accept_counted_tls(make_connection, sock, proxy_address, proxy)
        else:
            await self.loop.connect_accepted_socket(make_connection, sock)

    async def _accept_counted_tls(
        self, new_connection: Callable[[], asyncio.Protocol], sock: socket.socket,
        host: str | None = None, peer_text: str | None = None,
    ) -> None:
        """Implicit TLS: the handshake counts toward the connection limits
        while it runs (it holds a socket and up to a ClientHello's buffers),
        as a connection from ``host`` (the socket's peer unless a PROXY header
        named the client; an IPv4-mapped address counts as its IPv4 one,
        stats.address_key); past them the socket is closed at once, before
        any handshake."""
        if host is None:
            try:
                host = sock.getpeername()[0]
            except OSError:
                sock.close()  # gone already
                return
        peer_text = peer_text or _peer_text(sock)
        address = shared_address_key(host)
        # Counted as if open: the handshakes under way here, and this one.
        refusal = self.admission_refusal(address, self.handshakes + 1, self.handshaking.get(address, 0) + 1)
        if refusal is not None:
            self.slot.add(REJECTED)
            self.log(f"{peer_text} refused before the TLS handshake: {refusal}")
            sock.close()
            return
        self.handshaking[address] = self.handshaking.get(address, 0) + 1
        self.handshakes += 1
        try:
            await self._accept_tls(new_connection, sock, peer_text)
        finally:
            self.handshakes -= 1
            left = self.handshaking.pop(address) - 1
            if left:
                self.handshaking[address] = left

    async def _accept_tls(
        self, new_connection: Callable[[], asyncio.Protocol], sock: socket.socket, peer_text: str | None = None
    ) -> None:
        """Implicit TLS (RFC 8314): the handshake first; the connection is made
        (counted, greeted) once it succeeds."""
        peer_text = peer_text or _peer_text(sock)
        try:
            transport, _ = await self.loop.connect_accepted_socket(
                new_connection, sock, ssl=self.tls_context,
                ssl_handshake_timeout=self.settings.tls_handshake_timeout,
            )
        except Exception as exc:  # noqa: BLE001: whatever the client did, the connection is over
            self.tls_failed(peer_text, exc)
            sock.close()
        else:
            self.tls_completed(transport)

    def tls_failed(self, peer: str, exc: BaseException) -> None:
        """A handshake that failed: logged with the peer, counted."""
        self.slot.add(TLS_FAILURES)
        reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        self.log(f"{peer} TLS handshake failed: {reason}")

    def tls_completed(self, transport: asyncio.BaseTransport) -> None:
        """A handshake that completed (STARTTLS or implicit TLS): counted by version."""
        ssl_object = transport.get_extra_info("ssl_object")
        version = ssl_object.version() if ssl_object is not None else None
        field = TLS_SESSION_FIELDS.get(version or "")
        if field is not None:  # always, while the context allows only the versions counted
            self.slot.add(field)

    def count_auth(self, mechanism: str, result: str) -> None:
        """One AUTH exchange of ``mechanism`` (PLAIN, LOGIN) ended with ``result``."""
        self.slot.add(AUTH_FIELDS[mechanism, result])

    def connection_factory(self, listener: Listener) -> Callable[[], asyncio.Protocol]:
        """What makes a connection on ``listener``: its kind's protocol, given its context."""
        protocol = PROTOCOLS[listener.kind]
        context = listener.context

        def new_connection(conveyed: Conveyed | None = None) -> asyncio.Protocol:
            return protocol(self, context, conveyed)

        # Read by the accept loop (getattr): a PROXY header and a handshake come
        # before the connection.
        setattr(new_connection, "implicit_tls", context.tls == TLS_IMPLICIT)
        setattr(new_connection, "proxy", listener.kind in self.proxied_kinds)
        return new_connection

    def over_fair_share(self) -> bool:
        """More open connections than the server-wide average, plus one.

        (Allowing 20% over the average left S6 at max/min 1.3 to 2.0 with
        4 workers; the plain average keeps it at 1.3 to 1.4.)
        """
        workers = max(self.stats.get("workers"), 1)
        fair = self.stats.xstat("CURRENT") / workers
        return len(self.connections) > fair + 1

    def _resume_accepting(self, listening: socket.socket, new_connection: Callable[[], asyncio.Protocol]) -> None:
        if not self.stopping:
            self.loop.add_reader(listening.fileno(), self.accept_one, listening, new_connection)

    def stop_accepting(self) -> None:
        """Stop listening: close this process's copies of the listening
        sockets, so that once every process has, new clients are refused
        rather than queued for a worker that will never greet them."""
        for listener in self.listeners:
            for sock in listener.sockets:
                if sock.fileno() >= 0:
                    self.loop.remove_reader(sock.fileno())
                    sock.close()
        self.slot.set(ACCEPTING, 0)  # the master answers a reload only once this is 0

    def admit(self, conn: SMTPConnection, address: tuple[int, int]) -> str | None:
        """Count a new connection's address; why it must be turned away, or None.

        A full address table refuses the client (logged): an uncounted
        connection would slip past max_connections_per_ip.
        """
        if not self.stats.addresses.open(self.index, address):
            self.log(f"address table full ({AddressTables.MAX_ENTRIES} client addresses in this worker)")
            return "too many connections"
        conn.address = address
        return self.admission_refusal(address)

    def admission_refusal(self, address: tuple[int, int], uncounted: int = 0, uncounted_here: int = 0) -> str | None:
        """Why a new connection must be turned away, or None to serve it.

        The shared counts include a connection once it is made; ``uncounted``
        (``uncounted_here`` from ``address``) are those not in them yet
        that count all the same (implicit-TLS handshakes, the new one among them).
        """
        live = self.live
        if self.stats.xstat("CURRENT") + uncounted > live.max_connections:
            return "too many connections"
        per_ip = live.max_connections_per_ip
        if per_ip and self.stats.addresses.connections(address) + uncounted_here > per_ip:
            return "too many connections from your address"
        return None

    def store_when_room(self, envelope: Envelope, peer_address: str) -> asyncio.Future:
        """Hand a message to the store if the disk keeps its reserve after it.

        Checked before anything is written: every copy of the message plus
        the reserve must fit. If not, the future fails as a full disk would
        (452), and nothing is written.
        """
        needed = bytes_to_store(envelope)
        shortage = self.space.claim(needed)
        if shortage is not None:
            future = self.loop.create_future()
            future.set_exception(DeliveryError(shortage, no_space=True))
            return future
        future = self.committer.submit(envelope, peer_address)
        future.add_done_callback(lambda _: self.space.release(needed))
        return future

    def send_success_notice(self, envelope: Envelope, queue_id: str) -> None:
        """A "delivered" DSN to a local sender whose recipients asked for one (NOTIFY=SUCCESS).

        Stored after the 250, like any mail; a failure is logged (the mail
        itself is delivered: nothing to retry for the client).
        """
        notice = success_notice(
            envelope, queue_id, self.settings.hostname, self.domains, self.policy.recipient_refusal,
            names=self.policy.names,
        )
        if notice is None:
            return

        def stored(future: asyncio.Future) -> None:
            try:
                self.log(f"delivery notice {future.result()} for mail {queue_id} to <{envelope.sender}>")
            except DeliveryError as exc:
                self.log(f"delivery notice for mail {queue_id} to <{envelope.sender}> failed: {exc}")

        self.committer.submit(notice, "local").add_done_callback(stored)

    def data_memory_limit(self) -> int:
        """max_data_memory, but never less than one message of the maximum size."""
        live = self.live
        return max(live.max_data_memory, live.max_message_size)

    def message_admission(self) -> Reply | None:
        """Asked at DATA: refuse a new message unless one of the maximum size still fits."""
        if self.data_memory + self.live.max_message_size > self.data_memory_limit():
            return replies.INSUFFICIENT_STORAGE
        return None

    def session_ended(self) -> None:
        self.sessions_served += 1
        if self.max_sessions and self.sessions_served >= self.max_sessions and not self.recycle_asked:
            self.ask_to_be_recycled()

    def ask_to_be_recycled(self) -> None:
        """Quota served: the master forks a replacement first and retires us
        (HUP) once it accepts; meanwhile we keep serving."""
        self.recycle_asked = True
        if self.stopping:
            return
        if os.getppid() != self.master_pid:
            self.retire()  # no master to replace us
            return
        self.log(f"served {self.sessions_served} sessions; asking to be recycled")
        self.slot.set(RECYCLE, 1)
        os.kill(self.master_pid, signal.SIGUSR2)  # wakes the master

    # ------------------------------------------------------------ stopping
    # Two ways to leave, both bounded by graceful_timeout, then 421 4.3.2:
    # stop (TERM): sessions finish their current transaction and are closed;
    # retire (HUP: reload, fewer workers, recycling): sessions run to their end.
    def begin_shutdown(self) -> None:
        """Stop: no new connections; sessions end after their transaction."""
        self._leave(close_idle=True)

    def retire(self) -> None:
        """Retire: no new connections; sessions end when their clients quit."""
        self._leave(close_idle=False)

    def _leave(self, close_idle: bool) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_deadline = self.now + self.settings.graceful_timeout
            self.stop_accepting()
            self.title()
            self.log("stopping: no new connections")
        self.closing_idle = self.closing_idle or close_idle
        if self.closing_idle:
            self.close_idle_sessions()
        if self.idle():
            self.stop_now()

    def close_idle_sessions(self) -> None:
        for conn in list(self.connections):
            session = conn.session
            if session is not None and session.state in _IDLE_STATES and conn.transport is not None:
                conn.transport.write(session.shutdown_reply())
                conn.transport.close()

    def stop_now(self) -> None:
        for conn in list(self.connections):
            if conn.transport is not None:
                if conn.session is not None and conn.session.state is not CLOSED:
                    conn.transport.write(conn.session.shutdown_reply())
                conn.transport.close()
        if not self.finished.done():
            self.finished.set_result(None)

    # ------------------------------------------------------------- helpers
    def title(self) -> None:
        if self.stopping:
            setproctitle(f"prefork-smtpd: worker {self.index} (leaving, {len(self.connections)} open)")
        else:
            setproctitle(f"prefork-smtpd: worker {self.index} [{len(self.connections)} connections]")

    def open_log(self) -> None:
        """Open this process's own log (at start)."""
        self._logger = open_log(
            self.settings.log_file, self.stats, f"worker {self.index}", buffered=True,
            max_backlog=self.settings.max_log_backlog, slot=self.slot,
        )
        self._log_lines = line_writer(self._logger)

    def reopen_log(self) -> None:
        """USR1, after logrotate moved the file: open it anew, on a thread
        (an open() that hangs must not hang the loop); the tick's
        flush_log swaps to it once it is open, or at once when woken."""
        reopen_log(self._logger, on_open=lambda: self.loop.call_soon_threadsafe(self.flush_log))

    def flush_log(self) -> None:
        self._log_lines = flush_log(self._logger)

    def log(self, message: str) -> None:
        if self._log_lines is not None and self.stats.get("logging"):
            self._log_lines.add_line(message)


def run_worker(
    index: int, listeners: list[Listener], settings: Settings, stats: SharedStats,
    credentials: Credentials | None = None,
) -> int:
    return Worker(index, listeners, settings, stats, credentials).run()

