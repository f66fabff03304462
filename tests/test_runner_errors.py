"""An attempt that ends in an error of the runner's own (a bug, a message the
conversion cannot handle in a way nobody foresaw): the mail is deferred, never
lost, and like any deferral only within --queue-lifetime."""

from __future__ import annotations

import asyncio
import json
import time

from prefork_smtpd.runner import Runner
from prefork_smtpd.settings import Settings
from prefork_smtpd.stats import SharedStats


def test_an_error_of_ours_defers_within_the_lifetime_and_bounces_past_it(tmp_path):
    settings = Settings(mail_dir=str(tmp_path / "mail"), queue_dir=str(tmp_path / "queue"), queue_lifetime=3600)
    runner = Runner(settings, SharedStats())
    runner.queue.make()
    for queue_id, age in (("old", 7200), ("new", 10)):
        header = {"v": 1, "id": queue_id, "sender": "alice@smtpd.com", "arrival": time.time() - age,
                  "rcpts": [{"a": "bob@example.org"}]}
        (tmp_path / "queue" / "msg" / queue_id).write_bytes(json.dumps(header).encode() + b"\nSubject: x\r\n\r\nx\r\n")
    bounced = []

    async def fails(mail):
        raise RuntimeError("an error of ours")

    async def bounce(mail, message, failed):
        bounced.append((mail.id, message, [(o.index, o.result, o.status, o.reply) for o in failed]))

    runner._deliver = fails
    runner._bounce = bounce

    async def attempts():
        runner.limit = asyncio.Semaphore(1)
        runner.wake = asyncio.Event()
        for queue_id in ("old", "new"):
            await runner.deliver(runner.queue.load(queue_id))

    asyncio.run(attempts())
    # Past its lifetime: returned (it was deferred for ever, attempt after attempt).
    assert bounced == [("old", b"Subject: x\r\n\r\nx\r\n", [
        (0, "bounced", "4.4.7", "gave up after 3600 s in the queue; last error: RuntimeError('an error of ours')"),
    ])]
    # Within it: deferred, its attempt counted, tried again later.
    fresh = runner.queue.load("new")
    assert fresh.attempts == 1 and fresh.pending() == [0] and "an error of ours" in fresh.last_reply
