"""``prefork-smtpd-metrics``: watch a running server's figures live.

Talks SMTP to the server: NOOP for the round-trip delay (wall clock), XSTAT
for the counters. Replies are read line by line, never by read chunk. With
``-n`` it also counts, with psutil, the ESTABLISHED TCP sockets whose local
port is the server's SMTP port (the server's side of each connection) and
shows that beside XSTAT CURRENT. The monitor's own connection is in both
figures, so they should be equal; ``clients`` is that count less one.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from dataclasses import asdict, dataclass

import psutil

from prefork_smtpd import __version__

XSTAT_KEYS = ("BYTES", "MAILS", "CURRENT", "TOTAL", "QUEUE", "QUEUEAGE")


@dataclass
class Sample:
    status: str  # "Online" or "Unreachable"
    time: float
    delay_ms: float | None = None
    bytes: int | None = None
    mails: int | None = None
    current: int | None = None
    total: int | None = None
    mails_per_s: float | None = None
    bytes_per_s: float | None = None
    queued: int | None = None  # mails in the outbound queue
    queue_age: int | None = None  # seconds the oldest has waited
    os_established: int | None = None  # with -n
    difference: int | None = None  # os_established - current
    clients: int | None = None  # connections other than the monitor's own
    error: str | None = None


class SMTPProbe:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        code, _ = self.reply()
        if code != 220:
            raise ConnectionError(f"greeting {code}")

    def reply(self) -> tuple[int, str]:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("connection closed by the server")
            if line[3:4] != b"-":
                return int(line[:3]), line[4:].decode("utf-8", "replace").strip()

    def noop_ms(self) -> float:
        start = time.perf_counter()
        self.sock.sendall(b"NOOP\r\n")
        code, text = self.reply()
        if code != 250:
            raise ConnectionError(f"NOOP answered {code} {text}")
        return (time.perf_counter() - start) * 1000

    def xstat(self) -> dict[str, int]:
        self.sock.sendall(b"".join(b"XSTAT %s\r\n" % k.encode() for k in XSTAT_KEYS))  # pipelined
        values = {}
        for key in XSTAT_KEYS:
            code, text = self.reply()
            if code != 250:
                raise ConnectionError(f"XSTAT {key} answered {code} {text}")
            values[key] = int(text.rsplit(":", 1)[1])
        return values

    def quit(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        except OSError:
            pass
        self.sock.close()


def established_on_port(port: int) -> int:
    """ESTABLISHED TCP sockets whose local port is ``port`` (server sides)."""
    return sum(
        1
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
    )


class Monitor:
    def __init__(self, host: str, port: int, count_sockets: bool, timeout: float = 5.0) -> None:
        self.host, self.port, self.count_sockets, self.timeout = host, port, count_sockets, timeout
        self.probe: SMTPProbe | None = None
        self.last: Sample | None = None

    def sample(self) -> Sample:
        now = time.time()
        try:
            if self.probe is None:
                self.probe = SMTPProbe(self.host, self.port, self.timeout)  # (re)connect
            delay = self.probe.noop_ms()
            x = self.probe.xstat()
        except (OSError, ValueError) as exc:
            if self.probe is not None:
                self.probe.sock.close()
            self.probe = None
            self.last = None
            return Sample(status="Unreachable", time=now, error=str(exc))
        s = Sample(
            status="Online", time=now, delay_ms=round(delay, 3),
            bytes=x["BYTES"], mails=x["MAILS"], current=x["CURRENT"], total=x["TOTAL"],
            queued=x["QUEUE"], queue_age=x["QUEUEAGE"],
        )
        if self.last is not None and now > self.last.time:
            span = now - self.last.time
            s.mails_per_s = round((s.mails - self.last.mails) / span, 2)
            s.bytes_per_s = round((s.bytes - self.last.bytes) / span, 1)
        if self.count_sockets:
            s.os_established = established_on_port(self.port)
            s.difference = s.os_established - s.current
            s.clients = s.os_established - 1
        self.last = s
        return s

    def close(self) -> None:
        if self.probe is not None:
            self.probe.quit()


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
        f"  mails/s              {show(s.mails_per_s)}",
        f"  bytes/s              {show(s.bytes_per_s)}",
        f"  queued mails         {show(s.queued)}",
        f"  oldest queued        {show(s.queue_age, ' s')}",
    ]
    if s.os_established is not None:
        rows += [
            f"  OS ESTABLISHED       {s.os_established} (server side, port {port}; this monitor included)",
            f"  difference           {s.difference:+d} (OS - XSTAT CURRENT)",
        ]
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
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    p.add_argument("--once", action="store_true", help="one sample, then exit (1 if unreachable)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample")
    args = p.parse_args(argv)
    if args.interval <= 0:
        p.error("--interval must be positive")
    monitor = Monitor(args.address, args.port, args.netstat)
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
