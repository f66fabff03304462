"""``prefork-smtpd-queue``: list, show and delete queued outbound mail.

Reads the queue directory itself (queue.py), as ``mailq`` does; the server
need not run. ``delete`` removes a mail and its progress log for good (as
``postsuper -d``): no bounce is sent. A mail being delivered while it is
deleted may still reach its next hop once; the runner then finds it gone
and records nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from prefork_smtpd import __version__
from prefork_smtpd.queue import Queue, default_queue_dir, is_queue_id


def shown(text: str) -> str:
    """``text`` safe for a terminal: a next hop's reply (or a damaged queue
    file) may hold escape sequences that would drive it, line breaks that
    would forge a line, or octets that are no UTF-8 (read back as
    surrogates, which a UTF-8 stdout cannot write). Each becomes \\xNN or
    \\uNNNN; printable text, UTF-8 addresses included, stays as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" for c in text)


def describe(mail, now: float) -> list[str]:
    age = int(now - mail.arrival)
    rows = [f"{shown(mail.id)}  {mail.size} bytes  {age} s old  from <{shown(mail.sender)}>"]
    if mail.attempts:
        wait = max(int(mail.next_attempt - now), 0)
        rows.append(f"    {mail.attempts} failed attempts, next in {wait} s: {shown(mail.last_reply)}")
    for index, rcpt in enumerate(mail.recipients):
        entry = mail.results.get(index, {})
        state = shown(str(entry.get("result", "waiting")))
        detail = f": {shown(str(entry['reply']))}" if entry.get("reply") else ""
        rows.append(f"    <{shown(rcpt.address)}> {state}{detail}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prefork-smtpd-queue", description="List, show and delete queued outbound mail.")
    p.add_argument("-v", "--version", action="version", version=f"prefork-smtpd-queue {__version__}")
    p.add_argument("--queue-dir", metavar="DIR", help="the server's --queue-dir (default: queue beside --mail-dir)")
    p.add_argument("--mail-dir", metavar="DIR", default="mail_dir", help="the server's --mail-dir (default mail_dir)")
    p.add_argument("--json", action="store_true", help="list as one JSON object per mail")
    sub = p.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="every queued mail and its recipients' state")
    # "list --json", as the README writes it, as well as "--json list"
    listing.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one JSON object per mail")
    show = sub.add_parser("show", help="one mail: its recipients' state and the message")
    show.add_argument("id")
    delete = sub.add_parser("delete", help="remove mails from the queue (no bounce)")
    delete.add_argument("ids", nargs="*", metavar="ID")
    delete.add_argument("--all", action="store_true", help="every queued mail")
    args = p.parse_args(argv)
    queue = Queue(args.queue_dir or default_queue_dir(args.mail_dir))
    if os.path.exists(queue.root) and not os.path.isdir(queue.msg_dir):
        print(f"prefork-smtpd-queue: {queue.root} is not a queue directory (no msg folder in it)", file=sys.stderr)
        return 1
    now = time.time()
    if args.command == "list":
        mails = [m for m in (queue.load(i) for i in queue.ids()) if m is not None]
        for mail in mails:
            if args.json:
                print(json.dumps({
                    "id": mail.id, "sender": mail.sender, "size": mail.size, "age": int(now - mail.arrival),
                    "attempts": mail.attempts, "recipients": [
                        {"address": r.address, "state": mail.results.get(i, {}).get("result", "waiting")}
                        for i, r in enumerate(mail.recipients)
                    ],
                }))
            else:
                print("\n".join(describe(mail, now)))
        if not args.json:
            print(f"{len(mails)} mail{'s' if len(mails) != 1 else ''} in the queue")
        return 0
    if args.command == "show":
        found = queue.load(args.id)
        if found is None:
            print(f"prefork-smtpd-queue: no queued mail {shown(args.id)}", file=sys.stderr)
            return 1
        print("\n".join(describe(found, now)))
        print()
        sys.stdout.flush()
        sys.stdout.buffer.write(queue.message(args.id))
        return 0
    if not args.ids and not args.all:
        p.error("delete needs IDs or --all")
    status = 0
    for queue_id in (queue.ids() if args.all else args.ids):
        if not is_queue_id(queue_id):
            print(f"prefork-smtpd-queue: not a queue id: {shown(queue_id)}", file=sys.stderr)
            status = 1
        elif queue.remove(queue_id):
            print(f"deleted {shown(queue_id)}")
        else:
            print(f"prefork-smtpd-queue: no queued mail {shown(queue_id)}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
