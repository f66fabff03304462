"""Time the sans-IO session's hot paths, as the worker drives them (not part of CI).

    python bench/session_feed.py [--repeat 15]

* 60,000 pipelined commands (MAIL, RCPT, RSET), fed in the worker's 1 KiB
  slices and in one piece, their replies gathered as the worker writes them;
* an 8 MiB message of 78-octet lines, fed in 64 KiB reads, then stored.

Prints the best and the median CPU time of the runs (CPU time, not wall
time, so that other processes on a shared machine count less; the best
is the figure to compare).
"""

from __future__ import annotations

import argparse
import time

from prefork_smtpd.events import Deliver, Reply
from prefork_smtpd.session import Limits, Session

COMMANDS = b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nRSET\r\n" * 20_000
LINE = b"x" * 76 + b"\r\n"
MESSAGE = LINE * ((8 << 20) // len(LINE)) + b".\r\n"
SLICE = 1024  # worker.COMMAND_SLICE
READ = 65536


def new_session() -> Session:
    s = Session("mx.test", frozenset({"smtpd.com"}), Limits(max_message_size=64 << 20), lambda key: 0)
    s.feed(b"EHLO client.example\r\n")
    return s


def written(events: list) -> bytes:
    """The worker's gathering: consecutive replies become one write."""
    return b"".join([e for e in events if type(e) is Reply])


def commands_in_slices() -> int:
    s, n = new_session(), 0
    for i in range(0, len(COMMANDS), SLICE):
        n += len(written(s.feed(COMMANDS[i : i + SLICE])))
    return n


def commands_at_once() -> int:
    return len(written(new_session().feed(COMMANDS)))


def message() -> int:
    s = new_session()
    s.feed(b"MAIL FROM:<a@smtpd.com>\r\nRCPT TO:<b@smtpd.com>\r\nDATA\r\n")
    for i in range(0, len(MESSAGE), READ):
        events = s.feed(MESSAGE[i : i + READ])
    assert type(events[-1]) is Deliver and events[-1].envelope.size == len(MESSAGE) - 3
    return len(written(s.message_stored("Q")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args()
    for name, run in [
        ("60,000 commands, 1 KiB slices", commands_in_slices),
        ("60,000 commands, one feed", commands_at_once),
        ("8 MiB message, 64 KiB reads", message),
    ]:
        times = []
        for _ in range(args.repeat):
            start = time.process_time()
            run()
            times.append(time.process_time() - start)
        times.sort()
        print(f"{name:32s} best {times[0] * 1000:7.1f} ms   median {times[len(times) // 2] * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
