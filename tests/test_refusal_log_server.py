"""A staging user reads in the log why each mail or command bounced."""

from __future__ import annotations

from harness import wait_until

SECRET = "AHVzZXIAaHVudGVyMg=="  # base64 of "\0user\0hunter2"


def test_every_refusal_is_in_the_log_with_peer_command_and_reply(start_server):
    server = start_server("--max-message-size", "2048")
    c = server.client()
    peer = "[127.0.0.1]:%d" % c.sock.getsockname()[1]
    assert c.cmd("EHLO app.staging")[0] == 250
    assert c.cmd("MAIL FROM:<app@smtpd.com>")[0] == 250
    assert c.cmd("RCPT TO:<someone@customer.example>")[0] == 550
    assert c.cmd("RCPT TO:<../etc>")[0] == 553
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("MAIL FROM:<app@smtpd.com> SIZE=2049")[0] == 552
    assert c.cmd("NOOP " + "x" * 600)[0] == 500
    assert c.cmd(f"AUTH PLAIN {SECRET}")[0] == 502
    assert c.cmd("dXNlcg==")[0] == 500  # a client answering a challenge it never got
    assert c.cmd("MAIL FROM:<app@smtpd.com>")[0] == 250
    assert c.cmd("RCPT TO:<qa@smtpd.com>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: report\n\nmade on a unix box\n.\r\n\r\n.\r\n")
    assert c.reply()[0] == 550
    assert c.cmd("QUIT")[0] == 221

    expected = [
        f'{peer} refused "RCPT TO:<someone@customer.example>": 550 5.7.1 Error: relay access denied',
        f'{peer} refused "RCPT TO:<../etc>": 553 5.1.3 Error: mailbox name not allowed',
        f'{peer} refused "MAIL FROM:<app@smtpd.com> SIZE=2049": 552 5.3.4 Error: message size exceeds',
        f'{peer} refused "NOOP xxxxxxxx',
        f'{peer} refused "AUTH [arguments hidden]": 502 5.5.1',
        f"{peer} refused [a line after AUTH, hidden]: 500 5.5.2",
        f"{peer} refused message from <app@smtpd.com> to qa: 550 5.6.0 Error: bare CR or LF in message data",
    ]
    # The worker writes its log lines twice a second.
    wait_until(lambda: f"{peer} closed" in server.log_text(), what="the session's log lines")
    log = server.log_text()
    for needle in expected:
        assert needle in log, needle
    assert "500 5.5.6 Error: command line too long" in log.split(expected[3])[1].splitlines()[0]
    assert SECRET not in log and "dXNlcg" not in log
    assert len(server.stored("qa")) == 0
