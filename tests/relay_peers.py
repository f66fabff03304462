"""Real neighbours for the relay tests: a scripted SMTP receiver (aiosmtpd)
and a tiny DNS server (dnspython's wire format over a UDP socket)."""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from harness import free_port


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    mail_options: list[str]
    rcpt_options: list[list[str]]
    session: tuple = ()  # the sending side's (address, port): one per connection


@dataclass
class Script:
    """What the receiver answers: per recipient, a list of RCPT replies used in
    turn (the last one repeats); DATA held while ``hold`` is set for a recipient."""

    rcpt: dict[str, list[str]] = field(default_factory=dict)
    hold_data_for: set[str] = field(default_factory=set)
    held: threading.Event = field(default_factory=threading.Event)  # a DATA is being held
    release: threading.Event = field(default_factory=threading.Event)
    release_reply: str = "451 4.3.0 try again"  # what a held DATA gets once released
    # When given, every DATA waits until it is set: the test sees how many
    # deliveries the sender runs at once, then opens it.
    gate: threading.Event | None = None
    # After the 250 for a mail to one of these, the receiver hangs up (once per recipient).
    cut_after_data_for: set[str] = field(default_factory=set)


class ScriptedHandler:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.received: list[Received] = []
        self.rcpt_calls: dict[str, int] = {}
        self.lock = threading.Lock()
        self.active = 0  # transactions between MAIL and the end of DATA
        self.max_active = 0

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.lock:
            n = self.rcpt_calls.get(address, 0)
            self.rcpt_calls[address] = n + 1
        replies = self.script.rcpt.get(address)
        if replies:
            reply = replies[min(n, len(replies) - 1)]
            if not reply.startswith("250"):
                return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(list(rcpt_options))
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        try:
            reply = await self._data(envelope, session)
            cut = self.script.cut_after_data_for & set(envelope.rcpt_tos)
            if cut and reply.startswith("250"):
                self.script.cut_after_data_for -= cut
                # After the reply is written (close() flushes it first).
                asyncio.get_running_loop().call_soon(server.transport.close)
            return reply
        finally:
            with self.lock:
                self.active -= 1

    async def _data(self, envelope, session):
        while self.script.gate is not None and not self.script.gate.is_set():
            await asyncio.sleep(0.05)
        if self.script.hold_data_for & set(envelope.rcpt_tos):
            self.script.held.set()
            while not self.script.release.is_set():
                await asyncio.sleep(0.05)
            return self.script.release_reply
        with self.lock:
            self.received.append(Received(
                envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content or envelope.content,
                list(envelope.mail_options), list(envelope.rcpt_options), tuple(session.peer),
            ))
        return "250 2.0.0 accepted"

    def sessions(self) -> set[tuple]:
        """The connections that carried a stored mail."""
        with self.lock:
            return {r.session for r in self.received}

    def copies_for(self, address: str) -> int:
        with self.lock:
            return sum(r.recipients.count(address) for r in self.received)


class _WireTap(SMTP):
    """aiosmtpd's SMTP server, keeping every octet the sending side wrote."""

    def __init__(self, handler, wire: list[bytes], **options) -> None:
        super().__init__(handler, **options)
        self._wire = wire

    def data_received(self, data: bytes) -> None:
        self._wire.append(bytes(data))  # list.append: safe from the controller's thread
        super().data_received(data)


class _TappedController(Controller):
    def __init__(self, handler, wire: list[bytes], **options) -> None:
        super().__init__(handler, **options)
        self._wire = wire

    def factory(self):
        return _WireTap(self.handler, self._wire, **self.SMTP_kwargs)


class Receiver:
    """An aiosmtpd server on a free port, answering as its script says.

    It offers SMTPUTF8 and 8BITMIME unless told otherwise
    (``enable_SMTPUTF8=False``; ``decode_data=True`` drops 8BITMIME);
    ``wire()`` is every octet it was sent."""

    def __init__(self, script: Script | None = None, **controller_options) -> None:
        self.script = script or Script()
        self.handler = ScriptedHandler(self.script)
        self.port = free_port()
        self._wire: list[bytes] = []
        controller_options.setdefault("decode_data", False)
        self.controller = _TappedController(
            self.handler, self._wire, hostname="127.0.0.1", port=self.port, **controller_options
        )
        self.controller.start()

    def wire(self) -> bytes:
        """What the sending side wrote, all connections in the order it arrived."""
        return b"".join(list(self._wire))

    def stop(self) -> None:
        self.script.release.set()
        if self.script.gate is not None:
            self.script.gate.set()
        self.controller.stop()


class TinyDNS:
    """Answers A, AAAA and MX questions from a table, records in the order given; any other name: NXDOMAIN."""

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        self.records = {(name.lower().rstrip(".") + ".", rdtype): values for (name, rdtype), values in records.items()}
        self.names = {name for name, _ in self.records}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.questions: list[tuple[str, str]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text().lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.questions.append((name, rdtype))
            values = self.records.get((name, rdtype))
            if values:
                response.answer.append(dns.rrset.from_text(question.name, 60, "IN", rdtype, *values))
            elif name not in self.names:
                response.set_rcode(dns.rcode.NXDOMAIN)
            # In the order given (dnspython shuffles a record set by default): tests pick the order.
            self.sock.sendto(response.to_wire(want_shuffle=False), peer)

    def close(self) -> None:
        self.sock.close()
