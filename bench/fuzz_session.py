"""Fuzz the sans-IO SMTP session with random inputs (not part of CI).

    python bench/fuzz_session.py [--runs 1000000] [--seed 1]

Each run is a random mix of valid commands, broken commands, message data
and raw random bytes, fed in random splits to a fresh session, storing each
complete message as a worker would. Any exception, malformed reply or
broken invariant stops the run and prints the input that caused it.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time

from prefork_smtpd.events import Close, Deliver, LogEvent, Reply, Wait
from prefork_smtpd.replies import LOCAL_ERROR
from prefork_smtpd.session import Limits, Session, State

REPLY_LINE = re.compile(rb"\d{3}[ -][^\r\n]*\r\n")
PIECES = [
    b"EHLO c\r\n", b"HELO c\r\n", b"MAIL FROM:<a@smtpd.com>\r\n", b"MAIL FROM:<>\r\n", b"RCPT TO:<b>\r\n",
    b"RCPT TO:<b@smtpd.com>\r\n", b"RCPT TO:<../x>\r\n", b"DATA\r\n", b".\r\n", b"\r\n.\r\n", b"RSET\r\n",
    b"NOOP\r\n", b"QUIT\r\n", b"XSTAT MAILS\r\n", b"HELP\r\n", b"VRFY x\r\n", b"\n", b"\r", b".", b"..",
    b"hello world\r\n", b"\x00", b"\xff\xfe", b"x" * 700, b"y" * 1100 + b"\r\n", b"MAIL FROM:<a@smtpd.com> SIZE=5\r\n",
]


def one_input(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 30)):
        if rng.random() < 0.15:
            parts.append(rng.randbytes(rng.randint(1, 64)))
        else:
            parts.append(rng.choice(PIECES))
    return b"".join(parts)


def run_one(data: bytes, rng: random.Random) -> None:
    s = Session("mx.test", frozenset({"smtpd.com"}), Limits(max_recipients=5, max_message_size=4096), lambda k: 0)
    out = []
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 200)
        events = s.feed(data[pos : pos + step])
        pos += step
        while events:
            check_order(events)
            out += events
            last = events[-1]
            if not isinstance(last, Deliver):
                break
            assert s.state is State.WAITING and s.awaiting is last
            events = s.message_stored("Q") if rng.random() < 0.8 else s.message_failed(LOCAL_ERROR)
        assert s.state is not State.WAITING
        assert len(s._buf) <= 4096 or s.state is State.CLOSED
    wire = b"".join(e if isinstance(e, Reply) else e.reply for e in out if isinstance(e, (Reply, Close)))
    assert REPLY_LINE.sub(b"", wire) == b"", wire[:200]


def check_order(events: list) -> None:
    """Only known events; a Close or a Wait comes last, if at all."""
    for i, event in enumerate(events):
        assert isinstance(event, (Reply, LogEvent, Close, Deliver)), event
        if isinstance(event, (Close, Wait)):
            assert i == len(events) - 1, events


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    rng = random.Random(args.seed)
    start = time.perf_counter()
    total_bytes = 0
    for i in range(args.runs):
        data = one_input(rng)
        total_bytes += len(data)
        try:
            run_one(data, rng)
        except Exception:
            print(f"run {i} failed on input {data!r}", file=sys.stderr)
            raise
    elapsed = time.perf_counter() - start
    print(f"{args.runs} inputs ({total_bytes / 1e6:.1f} MB) without a fault in {elapsed:.0f} s "
          f"({args.runs / elapsed:.0f} inputs/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
