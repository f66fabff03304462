"""Limits at their exact boundaries against the real server, XSTAT BYTES included."""

from __future__ import annotations

from test_session_limits import command_of, stuffed_message


def test_limits_at_their_boundaries(start_server):
    server = start_server("--max-message-size", "1024")
    c = server.client()
    assert c.cmd("EHLO client.example")[0] == 250
    # Command line: 512 octets with CRLF pass, 513 do not.
    c.send(command_of(512))
    assert c.reply()[0] == 250
    c.send(command_of(513))
    assert c.reply() == (500, "5.5.6 Error: command line too long")
    # SIZE= equal to the maximum passes, one more does not.
    assert c.cmd("MAIL FROM:<a@smtpd.com> SIZE=1024")[0] == 250
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("MAIL FROM:<a@smtpd.com> SIZE=1025")[0] == 552
    # Message size is counted after dot-unstuffing, and so is XSTAT BYTES.
    before = c.xstat("BYTES")
    sent, stored = stuffed_message(1024)
    assert len(sent) > 1024
    assert c.cmd("MAIL FROM:<a@smtpd.com>")[0] == 250
    assert c.cmd("RCPT TO:<b@SMTPD.Com>")[0] == 250  # the served domain, in mixed case
    assert c.cmd("DATA")[0] == 354
    c.send(sent + b".\r\n")
    assert c.reply()[0] == 250
    assert c.xstat("BYTES") == before + 1024
    (path,) = server.stored("b")
    assert path.read_bytes().endswith(stored.replace(b"\r\n", b"\n"))
    sent, _ = stuffed_message(1025)
    assert c.cmd("MAIL FROM:<a@smtpd.com>")[0] == 250
    assert c.cmd("RCPT TO:<b@smtpd.com>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(sent + b".\r\n")
    assert c.reply()[0] == 552
    assert c.xstat("BYTES") == before + 1024
    # Message line: 1000 octets with CRLF pass, 1001 do not.
    for octets, code in ((1000, 250), (1001, 500)):
        assert c.cmd("MAIL FROM:<a@smtpd.com>")[0] == 250
        assert c.cmd("RCPT TO:<lines@smtpd.com>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"x" * (octets - 2) + b"\r\n.\r\n")
        assert c.reply()[0] == code, octets
    assert len(server.stored("lines")) == 1
