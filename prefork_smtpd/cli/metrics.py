"""``prefork-smtpd-metrics``: watch a running server's figures live.

Talks SMTP to the server: NOOP for the round-trip delay (wall clock), XSTAT
for the counters; the share of encrypted sessions is XSTAT TLS (sessions
whose TLS handshake completed) over XSTAT TOTAL. Replies are read line by line, never by read chunk. With
``-n`` it also counts, with psutil, the ESTABLISHED TCP sockets whose local
port is the server's SMTP port (the server's side of each connection) and
shows that beside XSTAT CURRENT. The monitor's own connection is in both
figures, so they should be equal; ``clients`` is that count less one.

Behind a load balancer speaking the PROXY protocol, each session is still
one TCP connection to the port, so the two figures stay equal, but the
socket table names the balancer as the peer of every proxied session.
``--trusted-proxies`` (the server's value) splits the socket count by
peer: ``os_from_proxies`` beside XSTAT PROXIED (sessions whose client came
from a PROXY header, health checks included), the rest beside the direct
sessions. A connection whose header is not yet read is in the socket table
but not yet a session. ``--send-proxy`` lets the monitor itself in on a
PROXY port (from a trusted address): it sends a v2 LOCAL header first, as
a balancer's health check does.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import time
from dataclasses import asdict, dataclass

import psutil

from prefork_smtpd import __version__
from prefork_smtpd.cli.lines import LineReader
from prefork_smtpd.proxy import IPNetwork, encode_v2, parse_networks, trusted

XSTAT_KEYS = ("BYTES", "MAILS", "CURRENT", "TOTAL", "QUEUE", "QUEUEAGE", "TLS")
# Keys a server older than this monitor may not know (501): shown as "-".
OPTIONAL_KEYS = frozenset({"TLS"})


@dataclass
class Sample:
    status: str  # "Online" or "Unreachable"
    time: float
    delay_ms: float | None = None
    bytes: int | None = None
    mails: int | None = None
    current: int | None = None
    total: int | None = None
    tls: int | None = None  # sessions that completed a TLS handshake
    encrypted_share: float | None = None  # tls / total, 0..1
    mails_per_s: float | None = None
    bytes_per_s: float | None = None
    queued: int | None = None  # mails in the outbound queue
    queue_age: int | None = None  # seconds the oldest has waited
    os_established: int | None = None  # with -n
    difference: int | None = None  # os_established - current
    clients: int | None = None  # connections other than the monitor's own
    proxied: int | None = None  # with -n: XSTAT PROXIED, sessions through a trusted proxy
    os_from_proxies: int | None = None  # with -n and --trusted-proxies: sockets whose peer is a proxy
    error: str | None = None


MAX_REPLY_LINE = 4096  # octets; RFC 5321 4.5.3.1.5 allows 512


class SMTPProbe:
    """The monitor's own SMTP session. Whatever the peer sends (a wrong
    port, a stalled or hostile server), each reply ends within ``timeout``
    seconds as a reply, or as an OSError or ValueError saying why."""

    def __init__(self, host: str, port: int, timeout: float, send_proxy: bool = False) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.lines = LineReader(self.sock, MAX_REPLY_LINE)
        if send_proxy:  # the monitor speaks for itself, as a balancer's health check does
            self.sock.sendall(encode_v2(command="LOCAL"))
        code, _ = self.reply()
        if code != 220:
            raise ConnectionError(f"greeting {code}")

    def reply(self) -> tuple[int, str]:
        deadline = time.monotonic() + self.timeout  # for the whole reply, however it trickles
        while True:
            try:
                line = self.lines.line(deadline)
            except TimeoutError:
                raise TimeoutError(f"no complete reply within {self.timeout:g} s") from None
            if len(line) < 3 or not line[:3].isdigit():
                raise ValueError(f"not an SMTP reply: {line[:60]!r}")
            if line[3:4] != b"-":
                return int(line[:3]), line[4:].decode("utf-8", "replace").strip()

    def noop_ms(self) -> float:
        start = time.perf_counter()
        self.sock.sendall(b"NOOP\r\n")
        code, text = self.reply()
        if code != 250:
            raise ConnectionError(f"NOOP answered {code} {text}")
        return (time.perf_counter() - start) * 1000

    def xstat(self, keys: tuple[str, ...] = XSTAT_KEYS) -> dict[str, int | None]:
        self.sock.sendall(b"".join(b"XSTAT %s\r\n" % k.encode() for k in keys))  # pipelined
        values: dict[str, int | None] = {}
        for key in keys:
            code, text = self.reply()
            if code == 501 and key in OPTIONAL_KEYS:
                values[key] = None
            elif code != 250:
                raise ConnectionError(f"XSTAT {key} answered {code} {text}")
            else:
                _, colon, number = text.rpartition(":")
                if not colon or not number.strip().isdigit():
                    raise ValueError(f"XSTAT {key} answered without a count: {text[:60]!r}")
                values[key] = int(number)
        return values

    def quit(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        except (OSError, ValueError):
            pass  # leaving anyway
        self.sock.close()


def established_on_port(port: int) -> list[str]:
    """The peer addresses of the ESTABLISHED TCP sockets whose local port
    is ``port`` (server sides), one per socket."""
    return [
        c.raddr.ip if c.raddr else ""
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
    ]


class Monitor:
    def __init__(
        self, host: str, port: int, count_sockets: bool, timeout: float = 5.0, *, send_proxy: bool = False,
        proxies: tuple[IPNetwork, ...] = (),
    ) -> None:
        self.host, self.port, self.count_sockets, self.timeout = host, port, count_sockets, timeout
        self.send_proxy, self.proxies = send_proxy, proxies
        self.probe: SMTPProbe | None = None
        self.last: Sample | None = None

    def sample(self) -> Sample:
        now = time.time()
        try:
            if self.probe is None:
                self.probe = SMTPProbe(self.host, self.port, self.timeout, self.send_proxy)  # (re)connect
            delay = self.probe.noop_ms()
            x = self.probe.xstat(XSTAT_KEYS + ("PROXIED",) if self.count_sockets else XSTAT_KEYS)
        except (OSError, ValueError) as exc:
            if self.probe is not None:
                self.probe.sock.close()
            self.probe = None
            self.last = None
            return Sample(status="Unreachable", time=now, error=str(exc))
        s = Sample(
            status="Online", time=now, delay_ms=round(delay, 3),
            bytes=x["BYTES"], mails=x["MAILS"], current=x["CURRENT"], total=x["TOTAL"],
            queued=x["QUEUE"], queue_age=x["QUEUEAGE"], tls=x["TLS"],
        )
        if s.tls is not None and s.total:
            s.encrypted_share = round(s.tls / s.total, 4)
        last = self.last  # an Online sample (an Unreachable one resets it): its counts are there
        if (
            last is not None and last.mails is not None and last.bytes is not None
            and s.mails is not None and s.bytes is not None and now > last.time
        ):
            span = now - last.time
            s.mails_per_s = round((s.mails - last.mails) / span, 2)
            s.bytes_per_s = round((s.bytes - last.bytes) / span, 1)
        if self.count_sockets:
            peers = established_on_port(self.port)
            established = s.os_established = len(peers)
            if s.current is not None:
                s.difference = established - s.current
            s.clients = established - 1
            s.proxied = x["PROXIED"]
            if self.proxies:
                s.os_from_proxies = sum(1 for peer in peers if trusted(peer, self.proxies))
        self.last = s
        return s

    def close(self) -> None:
        if self.probe is not None:
            self.probe.quit()


def encrypted(s: Sample) -> str:
    """'3 of 4 (75.0%)': sessions that completed TLS, of all sessions."""
    if s.tls is None:
        return "-"
    if s.encrypted_share is None:
        return f"{s.tls} of {s.total}"
    return f"{s.tls} of {s.total} ({s.encrypted_share * 100:.1f}%)"


def render(s: Sample, host: str, port: int) -> str:
    def show(value, unit=""):
        return "-" if value is None else f"{value}{unit}"

    rows = [
        f"prefork-smtpd at {host}:{port}   {time.strftime('%H:%M:%S', time.localtime(s.time))}",
        f"  status               {s.status}" + (f" ({s.error})" if s.error else ""),
        f"  delay (NOOP)         {show(s.delay_ms, ' ms')}",
        f"  bytes received       {show(s.bytes)}",
        f"  mails                {show(s.mails)}",
        f"  current connections  {show(s.current)}",
        f"  total connections    {show(s.total)}",
        f"  encrypted sessions   {encrypted(s)}",
        f"  mails/s              {show(s.mails_per_s)}",
        f"  bytes/s              {show(s.bytes_per_s)}",
        f"  queued mails         {show(s.queued)}",
        f"  oldest queued        {show(s.queue_age, ' s')}",
    ]
    if s.os_established is not None:
        rows += [
            f"  OS ESTABLISHED       {s.os_established} (server side, port {port}; this monitor included)",
            f"  difference           {s.difference:+d} (OS - XSTAT CURRENT)",
            f"  through a proxy      {s.proxied} (XSTAT PROXIED: their sockets' peer is the balancer)",
        ]
    if s.os_from_proxies is not None:
        rows.append(f"  OS from proxies      {s.os_from_proxies} (peer in --trusted-proxies; header-phase ones too)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prefork-smtpd-metrics", description="Watch a running prefork-smtpd.")
    p.add_argument("-v", "--version", action="version", version=f"prefork-smtpd-metrics {__version__}")
    p.add_argument("-i", "--address", default="127.0.0.1", help="server address (default 127.0.0.1)")
    p.add_argument("-P", "--port", type=int, default=2525, help="SMTP port (default 2525)")
    p.add_argument(
        "-n", "--netstat", action="store_true",
        help="compare XSTAT CURRENT with the OS socket table (server on this host)",
    )
    p.add_argument(
        "--send-proxy", action="store_true",
        help="begin with a PROXY v2 LOCAL header (a port with --proxy-protocol that trusts this host)",
    )
    p.add_argument(
        "--trusted-proxies", metavar="CIDR,...", default="",
        help="with -n: count the sockets whose peer is one of these balancers apart (the server's value)",
    )
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    p.add_argument("--once", action="store_true", help="one sample, then exit (1 if unreachable)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample")
    args = p.parse_args(argv)
    if not (math.isfinite(args.interval) and 0 < args.interval <= 86400):
        p.error("--interval must be a number of seconds above 0, at most 86400")
    try:
        proxies = parse_networks(args.trusted_proxies)
    except ValueError as exc:
        p.error(f"--trusted-proxies: {exc}")
    monitor = Monitor(args.address, args.port, args.netstat, send_proxy=args.send_proxy, proxies=proxies)
    live = sys.stdout.isatty() and not args.json
    try:
        while True:
            s = monitor.sample()
            if args.json:
                print(json.dumps({k: v for k, v in asdict(s).items() if v is not None}), flush=True)
            elif live:
                print("\x1b[H\x1b[2J" + render(s, args.address, args.port), flush=True)  # redraw in place
            else:
                print(render(s, args.address, args.port) + "\n", flush=True)
            if args.once:
                return 0 if s.status == "Online" else 1
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        monitor.close()


if __name__ == "__main__":
    sys.exit(main())
