"""Time the event loop's Python per mail on S2, without sockets or disk (not part of CI).

    python bench/mail_loop.py [--mails 20000] [--repeat 9]

A real worker's ``SMTPConnection`` (built in this process, never forked)
gets what smtp-source sends on a kept connection, one read per command as
S2 sends them: MAIL, RCPT, DATA, then the 1 KiB message and its dot in one
read. Its replies go to a transport that only counts them, its messages to
a store that settles each at once (as the store thread does, through the
loop), its log lines to a real log file. What is left is the Python the
event loop runs per mail: session, connection, counters, log line.

Prints the best and the median CPU time per mail of the runs: the CPU time
of the loop's thread alone (the log's writer thread is apart, as in a
worker), so other processes on a shared machine count less.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from typing import Any

import uvloop

from prefork_smtpd.listeners import SMTP_CONTEXT
from prefork_smtpd.settings import Settings
from prefork_smtpd.stats import CONTROL, SharedStats
from prefork_smtpd.worker import SMTPConnection, Worker

HEADER = (
    b"From: <a@smtpd.com>\r\nTo: <b@smtpd.com>\r\nDate: Fri, 27 Nov 2026 13:37:50 +0000 (UTC)\r\n"
    b"Message-Id: <2852.0003.00be@client.example>\r\n\r\n"
)
BODY = b"".join(b"%dX" % (i % 10) + b"X" * 77 + b"\r\n" for i in range(1, 13)) + b"X" * 64 + b"\r\n"
READS = [
    b"MAIL FROM:<a@smtpd.com>\r\n",
    b"RCPT TO:<b@smtpd.com>\r\n",
    b"DATA\r\n",
    HEADER + BODY + b".\r\n",
]


class CountingTransport(asyncio.Transport):
    """Takes the replies and counts them; a peer at 127.0.0.1."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: Any) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class SettlingCommitter:
    """Settles every message at once, through the loop, as the store thread's batch does."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ids = itertools.count()

    def submit(self, envelope: Any, peer_address: str) -> asyncio.Future:
        future = self.loop.create_future()
        self.loop.call_soon(future.set_result, f"1795786670.M830597P1Q{next(self.ids)}.host")
        return future


async def run_mails(worker: Worker, mails: int) -> float:
    conn = SMTPConnection(worker, SMTP_CONTEXT)
    conn.connection_made(CountingTransport())
    conn.data_received(b"EHLO client.example\r\n")
    reads = READS
    received = conn.data_received
    start = time.thread_time()
    for _ in range(mails):
        for data in reads:
            received(data)
        await asyncio.sleep(0)  # the store's verdict: submit's call_soon
        await asyncio.sleep(0)  # the future's callback: the 250
    elapsed = time.thread_time() - start
    conn.data_received(b"QUIT\r\n")
    conn.connection_lost(None)
    return elapsed / mails


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="mail-loop-")
    settings = Settings(mail_dir=folder, log_file=f"{folder}/log.txt", domains=["smtpd.com"], min_free_space=0)
    stats = SharedStats()
    for name in CONTROL:  # as the master publishes them
        stats.set(name, getattr(settings, name))
    worker = Worker(1, [], settings, stats)
    worker.reopen_log()
    loop = uvloop.new_event_loop()
    worker.loop = loop
    worker.committer = SettlingCommitter(loop)  # type: ignore[assignment]
    worker.now = loop.time()
    runs = [loop.run_until_complete(run_mails(worker, args.mails)) * 1e6 for _ in range(args.repeat)]
    runs.sort()
    print(f"per mail: best {runs[0]:.1f} us, median {statistics.median(runs):.1f} us, worst {runs[-1]:.1f} us")


if __name__ == "__main__":
    main()
