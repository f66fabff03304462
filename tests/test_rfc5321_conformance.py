"""RFC 5321 conformance, reply codes only, against a real server on real sockets.

One table: each case names the state the connection is brought to, the
command sent, and the reply code (and enhanced status code, RFC 3463)
expected. The server runs as a staging catch-all (``--domain '*'
--folders address``), so policy refuses nothing that RFC 5321 says must
be accepted. Where the server answers differently from what RFC 5321
asks or a strict reading expects, on purpose, the case says why
(``deviation``), and README.md's list of deliberate differences must name
it (checked below).
"""

from __future__ import annotations

import email
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import Server, wait_until

README = Path(__file__).resolve().parent.parent / "README.md"

# How far a case's connection gets before its command: each step must succeed.
BRING_TO = {
    "connected": [],
    "ready": ["EHLO client.example"],
    "mail": ["EHLO client.example", "MAIL FROM:<anne@client.example>"],
    "rcpt": ["EHLO client.example", "MAIL FROM:<anne@client.example>", "RCPT TO:<bob@any.example>"],
}


@dataclass(frozen=True)
class Case:
    state: str
    command: str
    code: int
    status: str | None = None  # the enhanced status code, where it matters
    deviation: str = ""  # the README's name for a deliberate difference


CASES = [
    # ---------------------------------------------------------- 4.1.1.1 HELO/EHLO
    Case("connected", "EHLO client.example", 250),
    Case("connected", "HELO client.example", 250),
    Case("connected", "ehlo client.example", 250),  # verbs are case-insensitive (2.4)
    Case("connected", "EHLO [192.0.2.1]", 250),  # address literals (4.1.3)
    Case("connected", "EHLO [IPv6:2001:db8::1]", 250),
    Case("connected", "EHLO", 501, "5.5.4"),
    Case("ready", "EHLO client.example", 250),  # a second EHLO resets, never 503 (4.1.4)
    Case("mail", "HELO client.example", 250),
    # --------------------------------------------------- 3.3 and 4.1.4: order
    Case("connected", "MAIL FROM:<anne@client.example>", 503, "5.5.1"),
    Case("connected", "RCPT TO:<bob@any.example>", 503, "5.5.1"),
    Case("connected", "DATA", 503, "5.5.1"),
    Case("ready", "RCPT TO:<bob@any.example>", 503, "5.5.1"),
    Case("ready", "DATA", 503, "5.5.1"),
    Case("mail", "MAIL FROM:<anne@client.example>", 503, "5.5.1"),
    Case("mail", "DATA", 503, "5.5.1"),
    # --------------------------------------------------------- 4.1.1.2 MAIL
    Case("ready", "MAIL FROM:<>", 250, "2.1.0"),  # the null reverse-path
    Case("ready", "MAIL FROM:<anne@b.example>", 250, "2.1.0"),
    Case("ready", "mail from:<anne@b.example>", 250, "2.1.0"),
    Case("ready", "MAIL FROM:<Anne@B.EXAMPLE>", 250, "2.1.0"),
    Case("ready", "MAIL FROM:<@a.example,@b.example:anne@smtpd.com>", 250, "2.1.0"),  # source route (4.1.2)
    Case("ready", "MAIL FROM:<@[192.0.2.9]:anne@smtpd.com>", 250, "2.1.0"),
    Case("ready", 'MAIL FROM:<"anne smith"@b.example>', 250, "2.1.0"),  # quoted local part
    Case("ready", r'MAIL FROM:<"a\"b"@b.example>', 250, "2.1.0"),  # a quoted-pair in it
    Case("ready", "MAIL FROM:<anne@[192.0.2.1]>", 250, "2.1.0"),
    Case("ready", "MAIL FROM:<anne@[IPv6:2001:db8::1]>", 250, "2.1.0"),
    Case("ready", "MAIL FROM:<a.b.c@b.example>", 250, "2.1.0"),
    Case("ready", "MAIL FROM:<anne@b.example> SIZE=1000", 250, "2.1.0"),  # RFC 1870
    Case("ready", "MAIL FROM:<anne@b.example> BODY=8BITMIME", 250, "2.1.0"),  # RFC 6152
    Case("ready", "MAIL FROM:<anne@b.example> SIZE=99999999999", 552, "5.3.4"),
    Case("ready", "MAIL FROM:<anne@b.example> XYZZY=1", 555, "5.5.4"),  # 4.1.1.11: unknown parameter
    Case("ready", "MAIL FROM:<a b@b.example>", 501, "5.1.7"),
    Case("ready", "MAIL FROM:<anne@b..example>", 501, "5.1.7"),
    Case("ready", "MAIL FROM:<@a.example:>", 501, "5.1.7"),  # a route to nothing
    Case("ready", "MAIL FROM:<anne@b.example", 501, "5.5.4"),
    Case("ready", "MAIL <anne@b.example>", 501, "5.5.4"),
    Case("ready", "MAIL FROM:anne@b.example", 250, "2.1.0", deviation="paths without angle brackets"),
    # ---------------------------------------------------------- 4.1.1.3 RCPT
    Case("mail", "RCPT TO:<bob@any.example>", 250, "2.1.5"),
    Case("mail", "RCPT TO:<Bob@ANY.Example>", 250, "2.1.5"),
    Case("rcpt", "RCPT TO:<carol@other.example>", 250, "2.1.5"),
    Case("mail", "RCPT TO:<@a.example,@b.example:bob@any.example>", 250, "2.1.5"),  # 4.1.2
    Case("mail", "RCPT TO:<Postmaster>", 250, "2.1.5"),  # 4.5.1, no domain
    Case("mail", "RCPT TO:<postmaster>", 250, "2.1.5"),
    Case("mail", "RCPT TO:<POSTMASTER@any.example>", 250, "2.1.5"),
    Case("mail", "RCPT TO:<postmaster@[127.0.0.1]>", 250, "2.1.5"),  # 4.1.3: our own address
    Case("mail", "RCPT TO:<bob@[127.0.0.1]>", 250, "2.1.5"),
    Case("mail", "RCPT TO:<bob@[IPv6:::ffff:127.0.0.1]>", 250, "2.1.5"),
    Case("mail", "RCPT TO:<bob@[192.0.2.1]>", 550, "5.7.1", deviation="address literals not ours"),
    Case("mail", "RCPT TO:<bob@[IPv6:2001:db8::1]>", 550, "5.7.1", deviation="address literals not ours"),
    Case("mail", "RCPT TO:<" + "b" * 64 + "@any.example>", 250, "2.1.5"),  # 4.5.3.1.1: 64 octets
    Case("mail", "RCPT TO:<" + "b" * 65 + "@any.example>", 553, "5.1.3"),
    Case("mail", "RCPT TO:<>", 501, "5.5.4"),
    Case("mail", "RCPT TO:<bob@bad_domain!>", 501, "5.1.3"),
    Case("mail", "RCPT TO:<@bad_route!:bob@any.example>", 501, "5.1.3"),
    Case("mail", "RCPT TO:<bob@any.example> XYZZY=1", 555, "5.5.4"),
    Case("mail", 'RCPT TO:<"bob smith"@any.example>', 553, "5.1.3", deviation="local parts that make no safe folder"),
    Case("mail", "RCPT TO:<a/b@any.example>", 553, "5.1.3", deviation="local parts that make no safe folder"),
    Case("mail", "RCPT TO:<bob>", 250, "2.1.5", deviation="bare local parts"),
    # ---------------------------------------------------------- 4.1.1.4 DATA
    Case("rcpt", "DATA", 354),
    Case("rcpt", "DATA now", 501, "5.5.4"),
    # -------------------------------------------- 4.1.1.5-10: the other verbs
    Case("connected", "RSET", 250, "2.0.0"),
    Case("rcpt", "RSET", 250, "2.0.0"),
    Case("rcpt", "NOOP", 250, "2.0.0"),
    Case("ready", "NOOP any string at all", 250, "2.0.0"),
    Case("connected", "NOOP", 250, "2.0.0"),
    Case("ready", "QUIT", 221, "2.0.0"),
    Case("connected", "QUIT", 221, "2.0.0"),
    Case("ready", "VRFY bob", 252, "2.5.0", deviation="VRFY 252"),
    Case("ready", "VRFY", 501, "5.5.4"),
    Case("ready", "EXPN staff", 502, "5.5.1", deviation="EXPN 502"),
    Case("ready", "HELP", 214, deviation="HELP 214"),
    Case("ready", "HELP MAIL", 214, deviation="HELP 214"),
    Case("ready", "TURN", 502, "5.5.1"),
    # ------------------------------------------------- 4.2.4, 4.5.3.1.4: errors
    Case("ready", "XYZZY", 500, "5.5.2"),
    Case("ready", "NOOP " + "x" * 600, 500, "5.5.6"),  # over 512 octets
    Case("ready", "NOOP\n", 500, "5.5.2", deviation="bare CR or LF"),
]


def case_id(case: Case) -> str:
    return f"{case.state}: {case.command[:60]!r}"


@pytest.fixture(scope="module")
def catch_all(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    server = Server(root, "--domain", "*", "--folders", "address", workers=1)
    yield server
    server.stop()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reply(catch_all, case):
    client = catch_all.client()
    try:
        assert client.greeting[0] == 220
        for line in BRING_TO[case.state]:
            code, text = client.cmd(line)
            assert 200 <= code < 300, f"{line!r} got {code} {text}"
        command = case.command.encode()
        client.send(command if command.endswith(b"\n") else command + b"\r\n")
        code, text = client.reply()
        assert code == case.code, f"{case.command!r}: {code} {text}"
        if case.status is not None:
            assert text.split("\n")[-1].split(" ", 1)[0] == case.status, text
    finally:
        client.close()


def test_a_whole_transaction_with_every_address_form_is_stored(catch_all):
    client = catch_all.client()
    steps = [
        "EHLO client.example",
        "MAIL FROM:<@relay.example:anne@client.example>",
        "RCPT TO:<@relay.example,@hop.example:bob@Shop.Example>",
        "RCPT TO:<Postmaster>",
        "RCPT TO:<postmaster@[127.0.0.1]>",
        "RCPT TO:<carol@[IPv6:::ffff:127.0.0.1]>",
    ]
    for line in steps:
        assert client.cmd(line)[0] == 250, line
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: forms\r\n\r\n..dot\r\n.\r\n")
    assert client.reply()[0] == 250
    client.close()
    wait_until(lambda: catch_all.stored("shop.example/bob"), what="bob's copy")
    (path,) = catch_all.stored("shop.example/bob")
    mail = email.message_from_bytes(path.read_bytes())
    assert mail["Return-Path"] == "<anne@client.example>"  # the route is ignored
    assert mail["Delivered-To"] == "bob@Shop.Example"
    # Postmaster and our literals belong to this host: the --hostname's folder.
    wait_until(lambda: catch_all.stored("mx.test/postmaster") and catch_all.stored("mx.test/carol"))
    assert len(catch_all.stored("mx.test/postmaster")) >= 1


def test_ehlo_lists_the_extensions_as_a_multiline_250(catch_all):
    client = catch_all.client()
    code, text = client.cmd("EHLO client.example")
    assert code == 250
    lines = text.split("\n")
    assert lines[0].startswith("mx.test") and {"PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"} <= set(lines)
    client.close()


def test_pipelined_commands_get_their_replies_in_order(catch_all):
    """RFC 2920: a group of commands in one write, one reply each, in order."""
    client = catch_all.client()
    client.send(
        b"EHLO client.example\r\nMAIL FROM:<>\r\nRCPT TO:<a@x.example>\r\nRCPT TO:<b@[192.0.2.1]>\r\n"
        b"RCPT TO:<Postmaster>\r\nDATA\r\n"
    )
    assert [client.reply()[0] for _ in range(6)] == [250, 250, 250, 550, 250, 354]
    client.send(b"hi\r\n.\r\nQUIT\r\n")
    assert [client.reply()[0] for _ in range(2)] == [250, 221]
    client.close()


def test_the_readme_lists_every_deliberate_difference():
    text = README.read_text()
    section = re.search(r"### Deliberate differences from RFC 5321\n(.*?)\n#", text, re.DOTALL)
    assert section, "README.md lost its list of deliberate differences"
    for deviation in sorted({c.deviation for c in CASES if c.deviation}):
        assert f"**{deviation}**" in section.group(1), deviation
