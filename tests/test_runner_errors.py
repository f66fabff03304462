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


def queued(tmp_path, queue_id: str, recipients: list[str]) -> None:
    header = {"v": 1, "id": queue_id, "sender": "alice@smtpd.com", "arrival": time.time(),
              "rcpts": [{"a": a} for a in recipients]}
    (tmp_path / "queue" / "msg" / queue_id).write_bytes(json.dumps(header).encode() + b"\nSubject: x\r\n\r\nx\r\n")


def test_a_mail_deleted_during_its_delivery_goes_to_no_other_domain_and_bounces_to_nobody(tmp_path):
    """prefork-smtpd-queue delete while the first domain's transaction runs:
    the README allows that one to reach its next hop; the others were started
    afterwards all the same, and a refusal still made a bounce."""
    from prefork_smtpd.runner import BOUNCED, Outcome

    settings = Settings(mail_dir=str(tmp_path / "mail"), queue_dir=str(tmp_path / "queue"))
    runner = Runner(settings, SharedStats())
    runner.queue.make()
    queued(tmp_path, "q1", ["a@one.example", "b@two.example", "c@three.example"])
    queued(tmp_path, "q2", ["d@one.example"])
    tried, notices = [], []

    async def send_group(mail, message, domain, indices, settle):
        tried.append((mail.id, domain))
        runner.queue.remove(mail.id)  # deleted while this transaction runs; the next hop then refuses
        return [Outcome(i, BOUNCED, "550 5.1.1 no such user", "5.1.1", "mx.one.example") for i in indices]

    async def send_notice(mail, message, outcomes, action):
        notices.append((mail.id, action))

    runner._send_group = send_group
    runner._send_notice = send_notice

    async def attempt():
        runner.limit = asyncio.Semaphore(1)
        runner.wake = asyncio.Event()
        runner.loop = asyncio.get_running_loop()
        for queue_id in ("q1", "q2"):
            await runner.deliver(runner.queue.load(queue_id))

    asyncio.run(attempt())
    assert tried == [("q1", "one.example"), ("q2", "one.example")]  # q1's other domains never tried
    assert notices == []  # q2's refusal made no bounce
    assert not runner.queue.ids() and not list((tmp_path / "queue" / "state").iterdir())
