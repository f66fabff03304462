"""The queue runner: a process of its own that delivers queued mail onward.

The master forks it like a worker (runner.py's ``run_queue_runner``), in
shared-memory slot 0, watches it, restarts it after a crash and stops it
with the workers. It owns an asyncio loop (uvloop) and an SMTP client
(aiosmtplib: asyncio-native, so many deliveries share one thread, with
STARTTLS, AUTH and EHLO-extension parsing done and kept up to date; the
standard library's smtplib would need a thread per connection). aiosmtplib
opens each connection; a small reply reader (ReplyReader) then carries the
mails over it, so a transaction's commands can go in one write.

It keeps an index of the queue (queue.py): a full look at start and every
``--queue-scan-interval``, and a look for new files whenever a worker
writes to the wake-up pipe (queue.Wakeup) after queueing a mail. Every mail
that is due starts a delivery, at most ``--relay-max-connections`` at once;
retries are planned from the index; SIGUSR2 (``flush=1`` on the config
port) makes every mail due now. A delivery sends the mail's unfinished
recipients, grouped by domain, to ``--relay-host`` or to the domain's MX
hosts in order (no MX: the domain itself, RFC 5321 5.1), over a kept
connection (ConnectionPool: at most ``--relay-connections`` per next hop,
``--relay-mails-per-connection`` mails each, closed after
``--relay-idle-time`` unused; PIPELINING when offered), then records each
recipient's outcome durably before that connection carries another mail:

* ``2xx`` (after the end of DATA): sent;
* ``5xx``, or ``4xx``/no connection past ``--queue-lifetime``: a failure
  notice (report.py) to the envelope sender, when NOTIFY asks for one and
  the sender is not ``<>``; then bounced;
* ``4xx`` or no connection: deferred; the next attempt waits
  ``--queue-retry-min`` seconds, doubling at each failure up to
  ``--queue-retry-max``.

A mail all of whose recipients are finished is removed. DSN parameters go
on to a next hop that offers DSN; one that does not gets the mail plain, and
recipients with NOTIFY=SUCCESS get a "relayed" notice.
A mail that needs SMTPUTF8 (RFC 6531) goes with it to a next hop that
offers it; one that does not never gets a UTF-8 address (those recipients
bounce, 5.6.7), see ``smtputf8_terms``.

Signals: TERM and QUIT stop it (deliveries in flight are cut; their
recipients stay unfinished and are retried), USR2 flushes, USR1 reopens the
log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import signal
import ssl
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.resolver
import uvloop
from setproctitle import setproctitle

from .delivery import DeliveryError, MaildirStore
from .downgrade import NotConvertible, crlf_lines, seven_bit_form
from .dsn import xtext_encode
from .log import AppendLineHandler, close_log, flush_log, line_writer, open_log, reopen_log
from .notices import is_local_sender, local_sender_folder
from .policy import listen_addresses, mailbox_check, names_from, own_addresses, reaches_this_server
from .queue import BOUNCED, DEFERRED, DELAY_WARNED, SENT, Queue, QueuedMail, inherited_wakeup, queue_dir_of
from .report import DELAYED, FAILED, RELAYED, RecipientStatus, build_report, transfer_encoding
from .session import Envelope, Recipient
from .smtputf8 import ascii_domain
from .stats import FIELD, SharedStats
from .textfile import read_regular_file

RUNNER_SLOT = 0  # the shared-memory slot no worker uses
TICK = 1.0  # seconds between checks that the master lives (no look at the queue)
HOUSEKEEPING = 0.5  # seconds between publishing the queue's figures and writing out log lines
WAKE_GAP = 0.005  # seconds between looks prompted by wake-ups: a burst of new mail is one look
QUIT_WAIT = 10.0  # seconds a closing connection waits for the reply to QUIT
# Bytes of one reply, its lines together (aiosmtplib allows 32 KiB for the
# greeting and EHLO): more is no SMTP server's reply, and a reply is kept,
# quoted in notices, recorded and logged.
MAX_REPLY = 64 * 1024
MAX_REPLY_LINES = 1000
REPLY_KEPT = 600  # characters of a reply kept in the queue's state and the log (notices quote 500)
STALE_RETRIES = 3  # a kept connection found dead before RCPT: this many more tries on others
NOTICE_PEER = "local"
# class "." subject "." detail (RFC 3463 2), ASCII digits only (re's \d takes any digit).
_ENHANCED_CODE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z")
# Line breaks and other controls in a log line, shown escaped (as repr does).
_LOG_ESCAPES = str.maketrans(
    {chr(c): f"\\x{c:02x}" for c in (*range(32), 0x7F, 0x85)}
    | {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


class TemporaryFailure(Exception):
    """Try again later (a 4xx, no connection, a DNS failure)."""


class PermanentFailure(Exception):
    """Give up: bounce (a 5xx, a domain that takes no mail)."""

    def __init__(self, reply: str, status: str = "5.0.0") -> None:
        super().__init__(reply)
        self.status = status


# ------------------------------------------------------------------ next hops
def parse_host_port(text: str, default_port: int = 25) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``host`` -> (host, port); ValueError if not."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"no host in {text!r}")
    number = int(port) if port else default_port
    if not 1 <= number <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, number


def make_resolver(nameserver: str | None) -> dns.asyncresolver.Resolver:
    """The system's resolver, or one that asks only ``nameserver`` (host:port)."""
    if nameserver is None:
        return dns.asyncresolver.Resolver()
    host, port = parse_host_port(nameserver, 53)
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = port
    return resolver


async def mx_levels(domain: str, resolver: Any, port: int = 25) -> list[list[tuple[str, int]]]:
    """Where mail for ``domain`` goes: its MX hosts grouped by preference, the
    best first, else the domain itself (RFC 5321 5.1 drops a
    whole level: the one this server is in, and every level after it).

    RFC 5321 5.1: no MX records, the domain's own A/AAAA (the "implicit
    MX"); RFC 7505: a null MX (".") means the domain takes no mail.
    A DNS failure is temporary; a domain that does not exist is permanent.
    """
    try:
        answer = await resolver.resolve(domain, "MX")
    except dns.resolver.NXDOMAIN:
        raise PermanentFailure(f"domain {domain} does not exist", "5.1.2") from None
    except dns.resolver.NoAnswer:
        try:
            await resolver.resolve(domain, "A")
        except dns.resolver.NoAnswer:
            try:
                await resolver.resolve(domain, "AAAA")
            except dns.resolver.NoAnswer:
                raise PermanentFailure(f"domain {domain} has no MX, A or AAAA record", "5.1.2") from None
        except dns.resolver.NXDOMAIN:
            raise PermanentFailure(f"domain {domain} does not exist", "5.1.2") from None
        except dns.exception.DNSException as exc:
            raise TemporaryFailure(f"DNS lookup for {domain} failed: {exc}") from None
        return [[(domain, port)]]
    except dns.exception.DNSException as exc:
        raise TemporaryFailure(f"MX lookup for {domain} failed: {exc}") from None
    records = sorted(answer, key=lambda r: r.preference)
    if [str(r.exchange).rstrip(".") for r in records] == [""]:
        raise PermanentFailure(f"domain {domain} accepts no mail (null MX)", "5.1.10")
    levels: dict[int, list[tuple[str, int]]] = {}
    for record in records:
        host = str(record.exchange).rstrip(".")
        if host:
            levels.setdefault(record.preference, []).append((host, port))
    return list(levels.values())


async def host_addresses(host: str, resolver: Any) -> list[str]:
    """An MX host's IPv4 then IPv6 addresses, looked up with the same resolver as the MX."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    found: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            found += [r.address for r in await resolver.resolve(host, rdtype)]
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            continue
        except dns.exception.DNSException as exc:
            raise TemporaryFailure(f"address lookup for {host} failed: {exc}") from None
    if not found:
        raise TemporaryFailure(f"MX host {host} has no address")
    return found


# ------------------------------------------------------------------ outcomes
@dataclass
class Outcome:
    """One recipient's result of one attempt."""

    index: int
    result: str  # SENT, BOUNCED (permanent), DEFERRED
    reply: str = ""  # the next hop's reply, or why there was none
    status: str = ""  # an RFC 3463 code for the notice
    remote: str = ""  # the host that answered
    dsn_passed: bool = False  # the next hop offered DSN and got the parameters

    def __post_init__(self) -> None:
        # A next hop's reply may be 64 KiB (MAX_REPLY), and it is kept for
        # every recipient at every attempt (state file, log line): only its
        # start is worth keeping, more than a notice quotes (DIAGNOSTIC_MAX).
        if len(self.reply) > REPLY_KEPT:
            self.reply = self.reply[: REPLY_KEPT - 3] + "..."


def _status_of(reply: str, fallback: str) -> str:
    """The enhanced code of a reply ("550 5.1.1 ..."), else a fallback.

    Only a code as RFC 3463 writes it, of the fallback's class (a refusal's
    5, a deferral's 4; RFC 2034 4 has the reply's class agree): it goes
    into the Status field of a notice as it is.
    """
    words = reply.split(maxsplit=2)
    if len(words) > 1 and _ENHANCED_CODE.match(words[1]) and words[1][0] == fallback[0]:
        return words[1]
    return fallback


# ---------------------------------------------------------- kept connections
_REPLY_CODE = re.compile(rb"[2-5][0-9][0-9](?:[ -]|\r?\n|\Z)")


def reply_code(line: bytes) -> int | None:
    """A reply line's code (RFC 5321 4.2: three digits, the first 2 to 5, then
    a space, a hyphen or the line's end), or None. Not int(): it takes " 25",
    "+25", "-25" and "2_5" as numbers."""
    return int(line[:3]) if _REPLY_CODE.match(line) else None


class ReplyReader(asyncio.Protocol):
    """A kept connection's replies, once aiosmtplib has done the greeting, EHLO,
    STARTTLS and AUTH and handed the transport over.

    aiosmtplib reads one reply per command written; with PIPELINING (RFC 2920)
    several replies come in one read, so they queue up here. A reply is
    ``(code, text)``, the text's lines joined by newlines as aiosmtplib does.
    """

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buffer = bytearray()
        self.lines: list[bytes] = []  # the lines of a reply still coming
        self.lines_size = 0  # their bytes
        self.replies: deque[tuple[int, str]] = deque()
        # Replies the commands sent so far call for and not yet taken: a reply
        # beyond them was never asked for, and a next hop sending them without
        # end would grow ``replies`` without end.
        self.awaited = 0
        self.waiter: asyncio.Future | None = None
        self.lost: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self.lost is None and not self.transport.is_closing()

    def send(self, data: bytes, replies: int = 1) -> None:
        """Write ``data``: commands (or a message) that call for ``replies`` replies."""
        if not self.alive:
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        self.awaited += replies
        self.transport.write(data)

    async def reply(self, timeout: float) -> tuple[int, str]:
        """The next reply, within ``timeout`` in all: each read wakes us,
        and a next hop sending an octet at a time must not start the clock again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.replies:
            if self.lost is not None:
                raise self.lost
            self.waiter = loop.create_future()
            try:
                async with asyncio.timeout_at(deadline):
                    await self.waiter
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError("timed out waiting for the next hop's reply") from None
            finally:
                self.waiter = None
        self.awaited -= 1
        return self.replies.popleft()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        start = 0
        while (end := self.buffer.find(b"\n", start)) >= 0:
            line = bytes(self.buffer[start : end + 1])
            start = end + 1
            self.lines.append(line)
            self.lines_size += len(line)
            if self.lines_size > MAX_REPLY or len(self.lines) > MAX_REPLY_LINES:
                break  # however short each line, the reply is too long
            if line[3:4] != b"-":  # the last line of a reply
                self._reply_done()
                if self.lost is not None:  # refused: nothing more is read from it
                    self.buffer.clear()
                    return
        del self.buffer[:start]
        if self.lines_size + len(self.buffer) > MAX_REPLY or len(self.lines) > MAX_REPLY_LINES:
            self.buffer.clear()
            self.lines, self.lines_size = [], 0
            self._fail(aiosmtplib.SMTPResponseException(500, "reply too long"))
            self.transport.close()
        self._wake()

    def _reply_done(self) -> None:
        lines, self.lines = self.lines, []
        self.lines_size = 0
        code = reply_code(lines[0])
        if code is None:
            self._fail(aiosmtplib.SMTPResponseException(500, f"malformed reply {lines[0][:80]!r}"))
            self.transport.close()
            return
        if len(self.replies) >= self.awaited:
            self._fail(aiosmtplib.SMTPResponseException(500, f"a reply nobody asked for: {lines[0][:80]!r}"))
            self.transport.close()
            return
        text = "\n".join(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape") for line in lines)
        self.replies.append((code, text))

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("the next hop closed the connection"))
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected(f"connection lost: {exc}" if exc else "connection lost"))

    def _fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


@dataclass(eq=False)
class Connection:
    """One SMTP session to a next hop, kept open between mails."""

    key: tuple[str, int]  # (address, port)
    reader: ReplyReader
    pipelining: bool  # the next hop offers PIPELINING: a transaction's commands go in one write
    dsn: bool  # the next hop offers DSN
    smtputf8: bool = False  # the next hop offers SMTPUTF8 (RFC 6531): UTF-8 addresses and headers
    eightbitmime: bool = False  # the next hop offers 8BITMIME (RFC 6152)
    binarymime: bool = False  # the next hop offers BINARYMIME and CHUNKING (RFC 3030): BDAT for binary mail
    mails: int = 0  # transactions started on it
    dirty: bool = False  # a transaction may still be open: RSET before the next MAIL
    broken: bool = False  # the next hop broke the protocol: closed, never reused
    idle_timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Destination:
    idle: list[Connection] = field(default_factory=list)  # the most recently used last
    count: int = 0  # open or being opened, busy or idle
    waiters: deque = field(default_factory=deque)  # futures of deliveries waiting for a connection


class ConnectionPool:
    """Kept SMTP connections, at most ``per_destination`` to one (address, port)
    and ``total`` in all, each closed after ``mails_per_connection`` mails or
    ``idle_time`` seconds unused. A delivery borrows one (``acquire``), runs
    one transaction, and gives it back (``release``), reusable or not."""

    def __init__(self, open_client, per_destination: int, total: int, mails_per_connection: int,
                 idle_time: float) -> None:
        self.open_client = open_client  # async (key) -> a ready Connection
        self.per_destination = per_destination
        self.total = total
        self.mails_per_connection = mails_per_connection
        self.idle_time = idle_time
        self.destinations: dict[tuple[str, int], _Destination] = {}
        self.count = 0
        self.opened = 0  # connections opened so far (for the log and tests)

    async def acquire(self, key: tuple[str, int]) -> Connection:
        while True:
            # Looked up on each turn: a destination left with nothing is dropped (see _forget).
            dest = self.destinations.setdefault(key, _Destination())
            while dest.idle:
                conn = dest.idle.pop()
                self._stop_timer(conn)
                if conn.reader.alive:
                    return conn
                self._forget(dest, conn.key)  # the next hop hung up while it was idle
            if dest.count < self.per_destination:
                return await self._open(key, dest)
            waiter = asyncio.get_running_loop().create_future()
            dest.waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in dest.waiters:
                    dest.waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake(dest)  # pass the turn on
                raise

    async def _open(self, key: tuple[str, int], dest: _Destination) -> Connection:
        self.destinations.setdefault(key, dest)  # back in, if a dead idle one just emptied it
        dest.count += 1
        self.count += 1
        if self.count > self.total:
            self._evict_one_idle(dest)
        try:
            conn = await self.open_client(key)
        except BaseException:
            self._forget(dest, key)
            self._wake(dest)
            raise
        self.opened += 1
        return conn

    def release(self, conn: Connection, reusable: bool) -> None:
        dest = self.destinations[conn.key]
        if reusable and conn.mails < self.mails_per_connection and conn.reader.alive:
            dest.idle.append(conn)
            conn.idle_timer = asyncio.get_running_loop().call_later(self.idle_time, self._expire, conn)
        else:
            self._forget(dest, conn.key)
            _close_soon(conn, polite=reusable)
        self._wake(dest)

    def close_all(self) -> None:
        for dest in self.destinations.values():
            for conn in dest.idle:
                self._stop_timer(conn)
                conn.reader.transport.close()
            dest.idle.clear()

    def _expire(self, conn: Connection) -> None:
        conn.idle_timer = None
        dest = self.destinations.get(conn.key)
        if dest is not None and conn in dest.idle:
            dest.idle.remove(conn)
            self._forget(dest, conn.key)
            _close_soon(conn, polite=True)
            self._wake(dest)

    def _evict_one_idle(self, needing: _Destination) -> None:
        """Room for one more under ``total``: close the idle connection unused longest elsewhere."""
        for dest in self.destinations.values():
            if dest is not needing and dest.idle:
                conn = dest.idle.pop(0)
                self._stop_timer(conn)
                self._forget(dest, conn.key)
                _close_soon(conn, polite=True)
                return

    def _forget(self, dest: _Destination, key: tuple[str, int]) -> None:
        """One connection fewer (closed, or never opened)."""
        dest.count -= 1
        self.count -= 1
        if not dest.count and not dest.waiters and self.destinations.get(key) is dest:
            del self.destinations[key]  # MX delivery meets many next hops: keep only those in use

    @staticmethod
    def _stop_timer(conn: Connection) -> None:
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
            conn.idle_timer = None

    @staticmethod
    def _wake(dest: _Destination) -> None:
        while dest.waiters:
            waiter = dest.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _close_soon(conn: Connection, polite: bool) -> None:
    """QUIT and its reply in the background (a goodbye nobody waits for), or just close."""
    reader = conn.reader
    if not polite or not reader.alive:
        reader.transport.close()
        return

    async def goodbye() -> None:
        try:
            reader.send(b"QUIT\r\n")
            await reader.reply(QUIT_WAIT)
        except Exception:  # noqa: BLE001: the outcomes are recorded; the goodbye does not matter
            pass
        finally:
            reader.transport.close()

    task = asyncio.get_running_loop().create_task(goodbye())
    _goodbyes.add(task)
    task.add_done_callback(_goodbyes.discard)


_goodbyes: set[asyncio.Task] = set()


_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)


def _command(verb_and_address: bytes, options: list[str]) -> bytes:
    """One command line; a CR or LF inside (never from our sessions) would smuggle another."""
    line = b" ".join([verb_and_address, *(o.encode("ascii") for o in options)])
    if b"\r" in line or b"\n" in line:
        raise ValueError(f"line break inside an SMTP command: {line[:80]!r}")
    return line + b"\r\n"


def _mail_options(mail: QueuedMail, dsn: bool) -> list[str]:
    options = []
    if dsn:
        if mail.ret:
            options.append(f"RET={mail.ret}")
        if mail.envid:
            options.append(f"ENVID={xtext_encode(mail.envid)}")
    return options


def _body_option(mail: QueuedMail, message: bytes, conn: "Connection") -> str | None:
    """BODY= for MAIL: BINARYMIME for a binary mail, 8BITMIME for 8-bit octets
    when the next hop offers it (RFC 6152). To one that does not, the message
    is 7-bit by now (_transaction converts it)."""
    if mail.binary:
        return "BODY=BINARYMIME"
    if conn.eightbitmime and not message.isascii():
        return "BODY=8BITMIME"
    return None


def _with_body(options: list[str], body: str | None) -> list[str]:
    """MAIL's options with ``body`` first and no other BODY=: BINARYMIME
    outranks the 8BITMIME smtputf8_terms may have asked for."""
    if body is None:
        return options
    return [body] + [option for option in options if not option.startswith("BODY=")]


def _rcpt_options(mail: QueuedMail, index: int, dsn: bool) -> list[str]:
    rcpt_dsn = mail.recipients[index].dsn
    options = []
    if dsn and rcpt_dsn is not None:
        if rcpt_dsn.notify_text:
            options.append(f"NOTIFY={rcpt_dsn.notify_text}")
        if rcpt_dsn.orcpt_text:
            options.append(f"ORCPT={rcpt_dsn.orcpt_text}")
    return options


def smtputf8_terms(
    mail: QueuedMail, message: bytes, indices: list[int], smtputf8_offered: bool, eightbitmime_offered: bool
) -> tuple[list[int], list[tuple[int, str, str]], list[str]]:
    """How a mail that needs SMTPUTF8 goes to a next hop with this offer:
    (the recipients it can go to, (recipient, status, reason) for each it
    cannot, the MAIL parameters to add).

    * SMTPUTF8 offered: every recipient, with ``SMTPUTF8`` (RFC 6531 3.4);
      the addresses go as UTF-8.
    * Not offered: a non-ASCII local part must not be sent nor downgraded
      (RFC 6531 3.2), so a recipient whose local part, or the sender's, is
      non-ASCII fails for good, ``5.6.7``. A domain in U-labels is no such
      obstacle: it goes in its A-labels (``_a_label_form``; RFC 5890 names
      the same domain either way). The others (the mail flagged for its
      headers, or for such a domain) go on if their header block is ASCII after
      all (nothing needs SMTPUTF8, and RFC 6531 3.4 says not to ask for it),
      or with ``BODY=8BITMIME`` when the next hop offers 8BITMIME: UTF-8
      header values are 8-bit text, which such a next hop takes, and mail
      with a raw UTF-8 Subject but no SMTPUTF8 is accepted and relayed so
      today. A next hop offering neither would get octets it said it cannot
      take: those recipients fail, ``5.6.9`` ("UTF-8 header message cannot
      be transferred", IANA's enhanced status codes).
    """
    if smtputf8_offered:
        return indices, [], ["SMTPUTF8"]
    sender_ascii = _a_label_form(mail.sender) is not None
    refusals = [
        (i, "5.6.7", "non-ASCII addresses not permitted by the next hop (it does not offer SMTPUTF8)")
        for i in indices
        if not (sender_ascii and _a_label_form(mail.recipients[i].address) is not None)
    ]
    if len(refusals) == len(indices):
        return [], refusals, []
    refused = {i for i, _, _ in refusals}
    sendable = [i for i in indices if i not in refused]
    end = message.find(b"\r\n\r\n")
    if (message if end < 0 else message[:end]).isascii():
        return sendable, refusals, []
    if eightbitmime_offered:
        return sendable, refusals, ["BODY=8BITMIME"]
    reason = "UTF-8 header message not permitted by the next hop (it offers neither SMTPUTF8 nor 8BITMIME)"
    return [], refusals + [(i, "5.6.9", reason) for i in sendable], []


def _a_label_form(address: str) -> str | None:
    """The address in ASCII, a U-label domain in its A-labels; None if its local part is UTF-8."""
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return None
    ace = ascii_domain(domain)
    return None if ace is None else f"{local}@{ace}"


def _ascii_form(address: str) -> bytes:
    return address.encode("ascii")


def _utf8_form(address: str) -> bytes:
    return address.encode("utf-8")


def _as_a_labels(address: str) -> bytes:
    """For a next hop without SMTPUTF8 (smtputf8_terms let only such addresses through)."""
    form = _a_label_form(address)
    if form is None:
        raise ValueError(f"a UTF-8 local part for a next hop without SMTPUTF8: {address!r}")
    return form.encode("ascii")


def _data_block(message: bytes) -> bytes:
    """The message as DATA sends it: CRLF lines, leading dots doubled, the final dot."""
    message = crlf_lines(message)  # not a regex substitution: a piece per line, 60 times the message
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return _LEADING_DOT.sub(b"..", message) + b".\r\n"


class _StaleConnection(Exception):
    """A kept connection turned out dead before this mail's first RCPT."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class RecordFailed(Exception):
    """Outcomes could not be made durable: the mail is retried, the connection dropped."""


class Settler:
    """Makes one transaction's outcomes durable while its connection waits.

    A mail sent whole in one go simply leaves the queue (the unlinked queue
    file is the durable record, its directory flush shared with the other
    mails finishing at once); otherwise each sent recipient gets its line in
    the progress log. Either way it is on disk before the connection carries
    the next mail, so a runner killed at any point resends at most the mail
    whose 250 it had not yet recorded.
    """

    def __init__(self, runner: "Runner", mail: QueuedMail, last: bool, group_size: int) -> None:
        self.runner = runner
        self.mail = mail
        self.last = last
        self.group_size = group_size
        self.removed = False

    async def __call__(self, outcomes: list[Outcome]) -> None:
        sent = [o for o in outcomes if o.result == SENT]
        if not sent:
            return
        runner, mail = self.runner, self.mail
        notice_due = any(not o.dsn_passed and _wants(mail, o.index, "SUCCESS", default=False) for o in sent)
        if self.last and len(sent) == self.group_size and not (notice_due and mail.sender):
            await runner.removals.remove(mail.id)
            self.removed = True
            runner._count_sent(mail, sent, "; removed from the queue, every recipient done")
        else:
            await runner._record_sent(mail, sent)


class BatchedRemovals:
    """Finished mails leave the queue together: one thread's unlinks and one
    directory flush for all that finished while the previous flush ran."""

    def __init__(self, queue: Queue, loop: asyncio.AbstractEventLoop) -> None:
        self.queue = queue
        self.loop = loop
        self.pending: list[tuple[str, asyncio.Future]] = []
        self.drainer: asyncio.Task | None = None

    async def remove(self, queue_id: str) -> None:
        future = self.loop.create_future()
        self.pending.append((queue_id, future))
        if self.drainer is None:
            self.drainer = self.loop.create_task(self._drain())
        await asyncio.shield(future)  # a cancelled delivery still sees its mail removed durably or not at all

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    await self.loop.run_in_executor(None, self.queue.remove_many, [q for q, _ in batch])
                except Exception as exc:  # noqa: BLE001: each waiter retries its mail
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
        finally:
            self.drainer = None


class Runner:
    def __init__(self, settings: Any, stats: SharedStats, resolver: Any = None) -> None:
        self.settings = settings
        self.stats = stats
        self.slot = stats.slot(RUNNER_SLOT)
        self.queue = Queue(queue_dir_of(settings))
        self.resolver = resolver
        self.domains = frozenset(settings.domains)
        self.names = names_from(settings)  # where mail to a local sender goes
        self.mailbox_exists = mailbox_check(settings.mailboxes, settings.mail_dir, settings.mailbox_list, self.names)
        self.in_flight: set[str] = set()
        self.index: dict[str, QueuedMail] = {}  # the queue as last read: id -> envelope and progress
        self.new_mail = False  # a wake-up came: look for new queue files
        self.stopping = False
        self.flush_requested = False
        self._logger: logging.Logger | None = None
        self._log_lines: AppendLineHandler | None = None
        self.auth = _read_auth(settings.relay_auth_file) if settings.relay_auth_file else None
        self._own: tuple | None = None  # (listen_addresses, this host's addresses), looked up once

    def is_this_server(self, addresses: list[str], port: int) -> bool:
        """Whether an MX host is this server: one of its addresses reaches our SMTP listener."""
        if port != self.settings.port:
            return False
        if self._own is None:
            try:
                bound = listen_addresses(self.settings.listen)
            except OSError:
                bound = frozenset()  # unresolvable now: only the interfaces' own addresses tell
            self._own = (bound, own_addresses(["::"]))
        for text in addresses:
            try:
                address = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                continue
            if reaches_this_server(address, *self._own):
                return True
        return False

    # ------------------------------------------------------------ process
    def run(self) -> int:
        setproctitle("prefork-smtpd: queue runner (starting)")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # A flush before the loop's handler is in place must not end the process.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        self.open_log()
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        if self.resolver is None:
            self.resolver = make_resolver(self.settings.relay_nameserver)
        self.store = MaildirStore(self.settings.mail_dir, self.settings.hostname, self.queue.root)
        try:
            self.loop.run_until_complete(self.serve())
        finally:
            self.loop.close()
            flush_log(self._logger)
            close_log(self._logger)
        return 0

    async def serve(self) -> None:
        loop = self.loop
        settings = self.settings
        self.wake = asyncio.Event()
        self.master_pid = os.getppid()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGQUIT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.stop)
        loop.add_signal_handler(signal.SIGUSR2, self.flush)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_log)
        self.limit = asyncio.Semaphore(settings.relay_max_connections)
        self.pool = ConnectionPool(
            self._open_client, settings.relay_connections, settings.relay_max_connections,
            settings.relay_mails_per_connection, settings.relay_idle_time,
        )
        self.removals = BatchedRemovals(self.queue, loop)
        self.tasks: set[asyncio.Task] = set()
        wakeup = inherited_wakeup()
        if wakeup is not None:
            wakeup.drain()  # what a previous runner left unread is covered by the first look
            loop.add_reader(wakeup.read_fd, self._woken, wakeup)
        self.log("queue runner started")
        next_full = next_housekeeping = 0.0
        try:
            while not self.stopping:
                if os.getppid() != self.master_pid:
                    self.log("master is gone; stopping")
                    break
                if time.monotonic() >= next_full or self.flush_requested:
                    self.scan(full=True)
                    next_full = time.monotonic() + settings.queue_scan_interval
                elif self.new_mail:
                    self.scan(full=False)
                self.new_mail = False
                self.start_due()
                if time.monotonic() >= next_housekeeping:
                    self.publish()
                    self.flush_log()
                    next_housekeeping = time.monotonic() + HOUSEKEEPING
                await self._sleep(min(TICK, next_full - time.monotonic(), self._until_due()))
        finally:
            if wakeup is not None:
                loop.remove_reader(wakeup.read_fd)
        for task in list(self.tasks):
            task.cancel()  # unfinished recipients stay in the queue
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.pool.close_all()
        self.log("queue runner stopped")

    async def _sleep(self, seconds: float) -> None:
        """Until a wake-up (new mail, flush, a delivery done, stop) or ``seconds``."""
        if not self.wake.is_set():
            try:
                await asyncio.wait_for(self.wake.wait(), max(seconds, 0.0))
            except asyncio.TimeoutError:
                pass
        if self.new_mail and not self.stopping:
            await asyncio.sleep(WAKE_GAP)  # the rest of a burst joins this look
        self.wake.clear()

    def _woken(self, wakeup) -> None:
        wakeup.drain()
        self.new_mail = True
        self.wake.set()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()

    def flush(self) -> None:
        """Retry every queued mail now, whatever its backoff says."""
        self.flush_requested = True
        self.log("flush: retrying every queued mail now")
        self.wake.set()

    # ---------------------------------------------------------------- scan
    def scan(self, full: bool) -> None:
        """Bring the index up to the queue on disk: every mail again (full), or only the new ones."""
        ids = self.queue.ids()
        present = set(ids)
        for gone in [queue_id for queue_id in self.index if queue_id not in present]:
            del self.index[gone]
        for queue_id in ids:
            if queue_id in self.in_flight or (not full and queue_id in self.index):
                continue
            mail = self.queue.load(queue_id)
            if mail is None:
                self.index.pop(queue_id, None)
            else:
                self.index[queue_id] = mail

    def start_due(self) -> None:
        """A delivery for every indexed mail that is due and not under way."""
        now = time.time()
        flush, self.flush_requested = self.flush_requested, False
        for queue_id, mail in self.index.items():
            if queue_id in self.in_flight or (mail.next_attempt > now and not flush):
                continue
            self.in_flight.add(queue_id)
            task = self.loop.create_task(self.deliver(mail))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _until_due(self) -> float:
        """Seconds until the next deferred mail is due (TICK when none waits)."""
        now = time.time()
        waits = [mail.next_attempt - now for queue_id, mail in self.index.items() if queue_id not in self.in_flight]
        return min(waits, default=TICK)

    def publish(self) -> None:
        """The queue's size and age in the shared counters and the title."""
        count = len(self.index)
        oldest = min((mail.arrival for mail in self.index.values()), default=0.0)
        self.slot.set(FIELD["queue_messages"], count)
        self.slot.set(FIELD["queue_oldest_seconds"], int(max(time.time() - oldest, 0)) if count else 0)
        setproctitle(f"prefork-smtpd: queue runner [{count} queued, {len(self.in_flight)} in delivery]")

    # ------------------------------------------------------------ delivery
    async def deliver(self, mail: QueuedMail) -> None:
        gone = False
        try:
            async with self.limit:
                gone = await self._deliver(mail)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001: a bug defers the mail, never loses it
            self.log(f"{mail.id}: retried later: {exc!r}")
            fresh = self.queue.load(mail.id)  # what is recorded so far stays recorded
            if fresh is not None and fresh.pending():
                await self._after_error(fresh, exc)
        finally:
            self.in_flight.discard(mail.id)
            fresh = None if gone else self.queue.load(mail.id)
            if fresh is None:
                self.index.pop(mail.id, None)
            else:
                self.index[mail.id] = fresh
                self.wake.set()  # the loop plans its next attempt

    async def _after_error(self, mail: QueuedMail, exc: Exception) -> None:
        """An attempt that ended in an error of ours: deferred, but only within
        --queue-lifetime, as any deferral is. Past it the recipients bounce
        (4.4.7): a mail that meets the same error at every attempt would
        otherwise stay queued for ever, neither sent nor returned."""
        reason = repr(exc)
        if time.time() - mail.arrival < self.settings.queue_lifetime:
            self._record_deferred(mail, [Outcome(i, DEFERRED, reason) for i in mail.pending()])
            return
        reply = f"gave up after {self.settings.queue_lifetime} s in the queue; last error: {reason}"
        try:
            await self._bounce(mail, self.queue.message(mail.id), [Outcome(i, BOUNCED, reply, "4.4.7") for i in mail.pending()])
        except Exception as again:  # noqa: BLE001: even the bounce fails: deferred, tried again
            self.log(f"{mail.id}: its expiry bounce failed: {again!r}")
            self._record_deferred(mail, [Outcome(i, DEFERRED, reason) for i in mail.pending()])

    async def _deliver(self, mail: QueuedMail) -> bool:
        """One attempt at every unfinished recipient; True if the mail left the queue."""
        try:
            message = self.queue.message(mail.id)
        except FileNotFoundError:
            return True  # deleted meanwhile (prefork-smtpd-queue delete)
        groups: dict[str, list[int]] = defaultdict(list)
        for index in mail.pending():
            domain = mail.recipients[index].address.rpartition("@")[2].lower()
            groups["" if self.settings.relay_host else domain].append(index)
        outcomes: list[Outcome] = []
        sent: list[Outcome] = []
        for number, (domain, indices) in enumerate(groups.items()):
            if number and not self.queue.exists(mail.id):
                return True  # deleted meanwhile: the transaction under way was the last one
            # The mail can leave the queue with this group's transaction when every
            # group before it was sent and this is the last one.
            last = number == len(groups) - 1 and len(sent) == len(outcomes)
            settle = self._settler(mail, last, len(indices))
            group = await self._send_group(mail, message, domain, indices, settle)
            if settle.removed:
                return True
            outcomes += group
            sent += [o for o in group if o.result == SENT]
        if sent:
            await self._relayed_notice(mail, message, [o for o in sent if not o.dsn_passed])
        now = time.time()
        failed = [o for o in outcomes if o.result == BOUNCED]
        deferred = [o for o in outcomes if o.result == DEFERRED]
        if deferred and now - mail.arrival >= self.settings.queue_lifetime:
            for o in deferred:
                o.result, o.status = BOUNCED, "4.4.7"  # RFC 3463: delivery time expired
                o.reply = f"gave up after {self.settings.queue_lifetime} s in the queue; last reply: {o.reply}"
            failed, deferred = failed + deferred, []
        if failed:
            await self._bounce(mail, message, failed)
        if deferred:
            self._record_deferred(mail, deferred)
            await self._delay_notice(mail, message, deferred)
        fresh = self.queue.load(mail.id)
        if fresh is not None and not fresh.pending():
            await self.removals.remove(mail.id)
            self.log(f"{mail.id}: removed from the queue, every recipient done")
            return True
        return fresh is None

    def _settler(self, mail: QueuedMail, last: bool, group_size: int) -> "Settler":
        """What makes a transaction's outcomes durable, before its connection carries another mail."""
        return Settler(self, mail, last, group_size)

    async def _record_sent(self, mail: QueuedMail, sent: list[Outcome]) -> None:
        entries = [{"r": o.index, "result": SENT, "reply": o.reply, "host": o.remote} for o in sent]
        await self.loop.run_in_executor(None, self.queue.record, mail.id, entries)
        self._count_sent(mail, sent)

    def _count_sent(self, mail: QueuedMail, sent: list[Outcome], last_words: str = "") -> None:
        """Counted and logged, a line per recipient (``last_words`` ends the last one)."""
        self.slot.add(FIELD["deliveries_sent"], len(sent))
        for n, o in enumerate(sent, 1):
            ending = last_words if n == len(sent) else ""
            self.log(f"{mail.id}: <{mail.recipients[o.index].address}> sent via {o.remote}: {o.reply}{ending}")

    def _record_deferred(self, mail: QueuedMail, deferred: list[Outcome]) -> None:
        attempts = mail.attempts + 1
        wait = min(self.settings.queue_retry_min * 2 ** (attempts - 1), self.settings.queue_retry_max)
        next_attempt = time.time() + wait
        reply = deferred[0].reply
        entries = [{"r": o.index, "result": DEFERRED, "reply": o.reply} for o in deferred]
        entries.append({"result": DEFERRED, "attempts": attempts, "next": next_attempt, "reply": reply})
        try:
            self.queue.record(mail.id, entries)
        except FileNotFoundError:
            return  # deleted meanwhile
        self.slot.add(FIELD["deliveries_deferred"], len(deferred))
        for o in deferred:
            self.log(f"{mail.id}: <{mail.recipients[o.index].address}> deferred, retry in {wait} s: {o.reply}")

    async def _send_group(
        self, mail: QueuedMail, message: bytes, domain: str, indices: list[int], settle: "Settler"
    ) -> list[Outcome]:
        """Deliver to one domain's recipients (or all, to the relay host): an outcome for each."""
        try:
            levels = await self._next_hops(domain)
        except PermanentFailure as exc:
            return [Outcome(i, BOUNCED, str(exc), exc.status) for i in indices]
        except TemporaryFailure as exc:
            return [Outcome(i, DEFERRED, str(exc), "4.4.3") for i in indices]
        # A domain may list any number of MX hosts, each with any number of
        # addresses, each lookup and each try taking up to a timeout: a few
        # such mails would hold every delivery slot for hours. So at most
        # relay_max_addresses hosts are looked up and as many addresses tried
        # (an address listed twice is tried once).
        budget = self.settings.relay_max_addresses
        looked_up = 0
        tried: set[tuple[str, int]] = set()
        last_error = "no next hop"
        relay_host = bool(self.settings.relay_host)
        cut = False  # the budget left next hops untried
        for rank, level in enumerate(levels):
            if cut or budget in (looked_up, len(tried)):
                cut = True
                break
            # A whole level is looked up before any of it is tried: RFC 5321 5.1
            # leaves out this server and every MX host of its preference or worse.
            found: list[tuple[str, str, int]] = []
            for host, port in level:
                if looked_up >= budget:
                    cut = True
                    break
                looked_up += 1
                try:
                    addresses = [host] if relay_host else await host_addresses(host, self.resolver)
                except TemporaryFailure as exc:
                    last_error = str(exc)
                    continue
                if not relay_host and self.is_this_server(addresses, port):
                    if rank == 0:  # the best MX: the mail would only come round again (Postfix bounces too)
                        reason = f"mail for {domain} loops back to myself: its MX host {host} is this server"
                        return [Outcome(i, BOUNCED, reason, "5.4.6") for i in indices]
                    return [Outcome(i, DEFERRED, last_error, "4.4.1") for i in indices]  # the better ones later
                found += [(host, address, port) for address in addresses]
            for host, address, port in found:
                if (address, port) in tried:
                    continue
                if len(tried) >= budget:
                    cut = True
                    break
                tried.add((address, port))
                try:
                    return await self._converse(mail, message, address, port, indices, host, settle)
                except (OSError, asyncio.TimeoutError, aiosmtplib.SMTPException) as exc:
                    # No answer from this address (or it went away): the next
                    # one, else the whole group is retried later.
                    last_error = f"{host} [{address}]:{port}: {type(exc).__name__}: {exc}"
                    self.log(f"{mail.id}: {last_error}")
        if cut:
            last_error += f" (stopped after {budget} next hops: --relay-max-addresses)"
        return [Outcome(i, DEFERRED, last_error, "4.4.1") for i in indices]

    async def _next_hops(self, domain: str) -> list[list[tuple[str, int]]]:
        """The next hops by preference level: the relay host alone, or the domain's MX hosts."""
        if self.settings.relay_host:
            return [[parse_host_port(self.settings.relay_host)]]
        return await mx_levels(domain, self.resolver, self.settings.relay_port)

    def _client(self, host: str, port: int) -> aiosmtplib.SMTP:
        settings = self.settings
        options: dict[str, Any] = dict(
            hostname=host, port=port, local_hostname=settings.hostname, timeout=settings.relay_timeout,
        )
        if settings.relay_host and settings.relay_starttls:
            options.update(start_tls=True, validate_certs=True, cert_bundle=settings.relay_ca_file)
        else:
            # Opportunistic, as MTAs do between each other: STARTTLS when offered, unchecked.
            options.update(start_tls=None, validate_certs=False)
        if settings.relay_host and self.auth is not None:
            options.update(username=self.auth[0], password=self.auth[1])
        return aiosmtplib.SMTP(**options)

    async def _open_client(self, key: tuple[str, int]) -> Connection:
        """A new connection to the next hop at ``key``: aiosmtplib does the greeting, EHLO,
        STARTTLS and AUTH as configured, then our reader takes the transport for the mails."""
        client = self._client(*key)
        await client.connect()
        transport = client.transport
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("connection lost after the greeting")
        reader = ReplyReader(transport)
        transport.set_protocol(reader)
        return Connection(
            key, reader, client.supports_extension("pipelining"), client.supports_extension("dsn"),
            smtputf8=client.supports_extension("smtputf8"), eightbitmime=client.supports_extension("8bitmime"),
            binarymime=client.supports_extension("binarymime") and client.supports_extension("chunking"),
        )

    async def _converse(
        self, mail: QueuedMail, message: bytes, address: str, port: int, indices: list[int], host: str,
        settle: "Settler",
    ) -> list[Outcome]:
        """One SMTP transaction with the next hop at ``address`` (``host``'s) over a kept
        connection: an outcome per recipient, made durable (``settle``) before the
        connection carries another mail."""
        for tries_left in range(STALE_RETRIES, -1, -1):
            conn = await self.pool.acquire((address, port))
            try:
                outcomes = await self._transaction(conn, mail, message, indices, host)
            except _StaleConnection as exc:
                # A kept connection the next hop had closed: nothing of this mail was
                # sent over it, so another connection may carry it at once.
                self.pool.release(conn, reusable=False)
                if not tries_left:
                    raise exc.cause from None
                continue
            except BaseException:
                self.pool.release(conn, reusable=False)
                raise
            try:
                await settle(outcomes)
            except BaseException as exc:
                self.pool.release(conn, reusable=False)
                if isinstance(exc, Exception):  # not a lost connection: never tried on another address
                    raise RecordFailed(f"outcomes not recorded: {exc!r}") from exc
                raise
            self.pool.release(conn, reusable=not conn.broken)
            return outcomes
        raise AssertionError("unreachable")

    async def _transaction(
        self, conn: Connection, mail: QueuedMail, message: bytes, indices: list[int], host: str,
        utf8_options: list[str] | None = None,
    ) -> list[Outcome]:
        """MAIL, RCPT..., DATA: in one write when the next hop offers PIPELINING
        (RFC 2920), else one command at a time; then the message.

        A mail that needs SMTPUTF8 first meets the next hop's offer
        (``smtputf8_terms``): the recipients it cannot take are refused here,
        nothing sent; the others go with ``utf8_options`` on MAIL."""
        if mail.smtputf8 and utf8_options is None:
            sendable, refusals, utf8_options = smtputf8_terms(mail, message, indices, conn.smtputf8, conn.eightbitmime)
            refused = [Outcome(i, BOUNCED, reason, status, host) for i, status, reason in refusals]
            if not sendable:
                return refused
            return refused + await self._transaction(conn, mail, message, sendable, host, utf8_options)
        if mail.binary and not conn.binarymime:
            # RFC 3030 3: binary content must not go as DATA (its bare CR and LF
            # would be rewritten); converting it is beyond us: returned, 5.6.3.
            reason = "binary message not permitted by the next hop (it offers no BINARYMIME with CHUNKING)"
            return [Outcome(i, BOUNCED, reason, "5.6.3", host) for i in indices]
        if not conn.eightbitmime and not (utf8_options and "SMTPUTF8" in utf8_options) and not message.isascii():
            # RFC 6152 3: no 8-bit octets to a next hop without 8BITMIME;
            # converted to 7 bits (RFC 2045), else returned, 5.6.3.
            try:
                # A hostile message may cost seconds of CPU (bounded by
                # downgrade's limits): in a thread, not on the loop every other
                # delivery runs on.
                message = await asyncio.to_thread(seven_bit_form, message)
            except NotConvertible as exc:
                reason = f"8-bit message not permitted by the next hop (it offers no 8BITMIME) and not convertible: {exc}"
                return [Outcome(i, BOUNCED, reason, "5.6.3", host) for i in indices]
        # Addresses go as UTF-8, or with A-label domains, only in a mail that met the next hop's offer above.
        encode = _ascii_form if utf8_options is None else _utf8_form if "SMTPUTF8" in utf8_options else _as_a_labels
        reader, timeout = conn.reader, self.settings.relay_timeout
        reused = conn.mails > 0
        conn.mails += 1
        commands = [b"RSET\r\n"] if conn.dirty else []  # a transaction left open on this kept connection
        mail_options = _mail_options(mail, conn.dsn)
        if utf8_options:
            mail_options[:0] = utf8_options
        mail_options = _with_body(mail_options, _body_option(mail, message, conn))
        commands.append(_command(b"MAIL FROM:<" + encode(mail.sender) + b">", mail_options))
        recipients = mail.recipients
        commands += [
            _command(b"RCPT TO:<" + encode(recipients[i].address) + b">", _rcpt_options(mail, i, conn.dsn))
            for i in indices
        ]
        if not mail.binary:
            commands.append(b"DATA\r\n")  # a binary mail's BDAT goes once a recipient is taken
        conn.dirty = True  # until this transaction is seen to end
        try:
            if conn.pipelining:
                reader.send(b"".join(commands), replies=len(commands))
            replies = [await self._step(reader, None if conn.pipelining else commands[0], timeout)]
            if commands[0] == b"RSET\r\n":
                rset = replies.pop()
                if rset[0] != 250:
                    raise aiosmtplib.SMTPResponseException(*rset)
                replies.append(await self._step(reader, None if conn.pipelining else commands[1], timeout))
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPResponseException, ConnectionError) as exc:
            if reused:  # dead before this mail began: nothing of it was sent
                raise _StaleConnection(exc) from None
            raise
        code, text = replies[0]
        if reused and code == 421:  # closing the kept session: not this mail's fault
            raise _StaleConnection(aiosmtplib.SMTPResponseException(code, text))
        mail_refused = code != 250
        rcpt_commands = commands[-len(indices):] if mail.binary else commands[-1 - len(indices) : -1]
        accepted: list[int] = []
        outcomes: list[Outcome] = []
        for index, command in zip(indices, rcpt_commands):
            if mail_refused and not conn.pipelining:
                outcomes.append(self._refused(index, code, text, host))
                continue
            rcpt_code, rcpt_text = await self._step(reader, None if conn.pipelining else command, timeout)
            if mail_refused:
                outcomes.append(self._refused(index, code, text, host))
            elif rcpt_code in (250, 251):
                accepted.append(index)
            else:
                outcomes.append(self._refused(index, rcpt_code, rcpt_text, host))
        if (mail.binary or not conn.pipelining) and not accepted:
            return outcomes  # DATA (BDAT) never sent; RSET before the next mail
        if mail.binary:
            reader.send(b"BDAT %d LAST\r\n" % len(message) + message)  # the octets as received, in one chunk
            final_code, final_text = await reader.reply(timeout)
            return outcomes + self._message_outcomes(conn, accepted, final_code, final_text, host)
        data_code, data_text = await self._step(reader, None if conn.pipelining else b"DATA\r\n", timeout)
        if data_code != 354:
            return outcomes + [self._refused(i, data_code, data_text, host) for i in accepted]
        reader.send(_data_block(message) if accepted else b".\r\n")  # 354 with nobody to send to: end it empty
        final_code, final_text = await reader.reply(timeout)
        if not accepted:
            return outcomes
        return outcomes + self._message_outcomes(conn, accepted, final_code, final_text, host)

    def _message_outcomes(self, conn: Connection, accepted: list[int], code: int, text: str, host: str) -> list[Outcome]:
        """The accepted recipients' outcomes from the reply to the end of the message.

        Any 2yz is a positive completion (RFC 5321 4.2.1: a 251 there is no
        refusal, and retrying it would send the mail twice). A 3yz breaks
        the protocol: where the next hop stands (still reading message
        data?) is unknown, so the mail is deferred and the connection never
        carries another.
        """
        if 200 <= code < 300:
            conn.dirty = False
            reply = f"{code} {text}"
            return [Outcome(i, SENT, reply, "2.0.0", host, conn.dsn) for i in accepted]
        if code < 400:
            conn.broken = True
        else:
            conn.dirty = False
        return [self._refused(i, code, text, host) for i in accepted]

    @staticmethod
    async def _step(reader: ReplyReader, command: bytes | None, timeout: float) -> tuple[int, str]:
        """The next reply; ``command`` is written first (None: it went with the pipelined group)."""
        if command is not None:
            reader.send(command)
        return await reader.reply(timeout)

    @staticmethod
    def _refused(index: int, code: int, text: str, host: str) -> Outcome:
        reply = f"{code} {text}"
        if 500 <= code < 600:
            return Outcome(index, BOUNCED, reply, _status_of(reply, "5.0.0"), host)
        return Outcome(index, DEFERRED, reply, _status_of(reply, "4.0.0"), host)

    # -------------------------------------------------------------- notices
    async def _bounce(self, mail: QueuedMail, message: bytes, failed: list[Outcome]) -> None:
        """A failure notice (when asked for), durable first; then the recipients are bounced."""
        if not self.queue.exists(mail.id):
            return  # deleted meanwhile (prefork-smtpd-queue delete): no bounce is sent
        wanted = [o for o in failed if _wants(mail, o.index, "FAILURE")]
        if wanted and mail.sender:
            try:
                await self._send_notice(mail, message, wanted, FAILED)
            except TemporaryFailure as exc:
                # Not stored (a full disk, the sender's mailbox a file or a
                # link): the recipients stay unfinished and the mail is tried
                # again, within its lifetime. Past it, the notice is given up
                # (as a double bounce is), said so in the log, and the mail
                # leaves the queue rather than stay there, retried, for ever.
                if time.time() - mail.arrival < self.settings.queue_lifetime:
                    raise
                self.log(f"{mail.id}: {exc}; given up after {self.settings.queue_lifetime} s in the queue")
        try:
            self.queue.record(mail.id, [{"r": o.index, "result": BOUNCED, "reply": o.reply} for o in failed])
        except FileNotFoundError:
            return
        self.slot.add(FIELD["deliveries_bounced"], len(failed))
        for o in failed:
            self.log(f"{mail.id}: <{mail.recipients[o.index].address}> bounced: {o.reply}")

    async def _delay_notice(self, mail: QueuedMail, message: bytes, deferred: list[Outcome]) -> None:
        """One "delayed" notice per recipient (RFC 3461 4.1, NOTIFY=DELAY or no NOTIFY) once it has
        waited --delay-warning-time; made durable first, then recorded, so it is sent only once
        (a crash in between sends it again rather than never)."""
        threshold = self.settings.delay_warning_time
        if not threshold or not mail.sender or time.time() - mail.arrival < threshold:
            return
        wanted = [o for o in deferred if o.index not in mail.delay_warned and _wants(mail, o.index, "DELAY")]
        if not wanted:
            return
        try:
            await self._send_notice(mail, message, wanted, DELAYED)
        except TemporaryFailure as exc:  # tried again at the next deferral
            self.log(f"{mail.id}: {exc}")
            return
        try:
            self.queue.record(mail.id, [{DELAY_WARNED: [o.index for o in wanted]}])
        except FileNotFoundError:
            return  # deleted meanwhile
        mail.delay_warned.update(o.index for o in wanted)

    async def _relayed_notice(self, mail: QueuedMail, message: bytes, plain: list[Outcome]) -> None:
        """NOTIFY=SUCCESS to a next hop without DSN: say so now (RFC 3461 5.2.2, "relayed")."""
        wanted = [o for o in plain if _wants(mail, o.index, "SUCCESS", default=False)]
        if wanted and mail.sender:
            try:
                await self._send_notice(mail, message, wanted, RELAYED)
            except TemporaryFailure as exc:  # the mail went on; only the courtesy notice is lost
                self.log(f"{mail.id}: {exc}")

    async def _send_notice(self, mail: QueuedMail, message: bytes, outcomes: list[Outcome], action: str) -> None:
        now = time.time()
        statuses = [
            RecipientStatus(
                final_recipient=mail.recipients[o.index].address, action=action,
                status=o.status or {RELAYED: "2.0.0", DELAYED: "4.0.0"}.get(action, "5.0.0"),
                original_recipient=_orcpt(mail, o.index), remote_mta=o.remote or None,
                diagnostic=o.reply or None, last_attempt=now,
            )
            for o in outcomes
        ]
        folder = local_sender_folder(mail.sender, self.domains, self._mailbox_refusal, self.names)
        if folder is not None:
            to = Recipient(address=mail.sender, folder=folder)
        elif is_local_sender(mail.sender, self.domains):  # never queued: it would come back here, or to a literal
            self.log(f"{mail.id}: no mailbox for <{mail.sender}>; the {action} notice is dropped")
            return
        else:
            to = Recipient(address=mail.sender, folder="", outside=True)  # queued: relayed like any mail
        # A binary original quoted whole would make a relayed notice binary, and
        # one to a next hop without BINARYMIME would be lost (a notice is never
        # bounced): it goes out quoting the headers only.
        ret = "HDRS" if mail.binary and to.outside else mail.ret
        content = build_report(
            reporting_mta=self.settings.hostname, recipient=mail.sender, statuses=statuses, original=message,
            ret=ret, envid=mail.envid, arrival=mail.arrival, queue_id=mail.id, now=now, utf8=mail.smtputf8,
        )
        notice = Envelope(helo="localhost", sender="", recipients=[to], chunks=[content], size=len(content))
        # A binary original (BINARYMIME) quoted whole makes the notice binary too: stored
        # as it is, and relayed only with BDAT.
        notice.binary = transfer_encoding(content) == "binary"
        notice.smtputf8 = mail.smtputf8  # RFC 6533: the notice of an SMTPUTF8 mail is one too
        try:
            notice_id = await self.loop.run_in_executor(None, self.store.deliver, notice, NOTICE_PEER)
        except DeliveryError as exc:
            # Not durable: the recipients stay unfinished, and the notice is tried again next pass.
            raise TemporaryFailure(f"the {action} notice could not be stored: {exc}") from None
        self.log(f"{mail.id}: {action} notice {notice_id} to <{mail.sender}>")
        if to.outside:  # queued: deliver it without waiting for the next full look
            self.new_mail = True
            self.wake.set()

    def _mailbox_refusal(self, folder: str) -> object | None:
        if self.mailbox_exists is None or self.mailbox_exists(folder):
            return None
        return "no such mailbox"

    # -------------------------------------------------------------- helpers
    def open_log(self) -> None:
        """Open this process's own log (at start)."""
        self._logger = open_log(
            self.settings.log_file, self.stats, "queue runner", buffered=True,
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
            # A next hop's words (its replies, a reply's lines joined by LF)
            # are logged: escaped, they cannot start a line of their own.
            self._log_lines.add_line(message.translate(_LOG_ESCAPES))


def _wants(mail: QueuedMail, index: int, what: str, default: bool | None = None) -> bool:
    rcpt_dsn = mail.recipients[index].dsn
    if rcpt_dsn is None or rcpt_dsn.notify is None:
        return default if default is not None else what in ("FAILURE", "DELAY")
    return what in rcpt_dsn.notify


def _orcpt(mail: QueuedMail, index: int) -> tuple[str, str] | None:
    rcpt_dsn = mail.recipients[index].dsn
    return rcpt_dsn.orcpt if rcpt_dsn is not None else None


def _read_auth(path: str) -> tuple[str, str]:
    """``user:password`` on the first line of the relay auth file."""
    try:
        line = read_regular_file(path, 64 * 1024).decode("utf-8").partition("\n")[0].rstrip("\r")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    user, colon, password = line.partition(":")
    if not colon or not user:
        raise ValueError(f"{path}: expected user:password on its first line")
    return user, password


def run_queue_runner(settings: Any, stats: SharedStats) -> int:
    return Runner(settings, stats).run()

