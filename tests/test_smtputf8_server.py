"""SMTPUTF8 (RFC 6531, 6532) against the real server: smtplib, curl, swaks.

swaks (20201014) cannot send the SMTPUTF8 parameter: with a UTF-8 address
it gets the refusal a client without SMTPUTF8 must get (553 5.6.7).
"""

from __future__ import annotations

import email
import re
import email.policy
import smtplib
import subprocess
from email.message import EmailMessage

from harness import DOMAIN
from test_tls_auth_server import PASSWORD, ca, client_context, files, tls_server  # noqa: F401 (fixtures)

JOERG = "J\u00f6rg"  # Jörg
USER = "\u7528\u6237"  # 用户
IDN = "\u4f8b\u3048.jp"  # 例え.jp
IDN_ACE = "xn--r8jz45g.jp"


def utf8_message(sender: str, recipient: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"] = sender, recipient
    msg["Subject"] = "Gr\u00fc\u00dfe aus K\u00f6ln"
    msg.set_content("Hall\u00f6chen \u2713\n", cte="8bit")
    return msg


def parsed(path) -> email.message.EmailMessage:
    return email.message_from_bytes(path.read_bytes(), policy=email.policy.SMTPUTF8)


def test_smtplib_send_message_with_smtputf8(start_server):
    server = start_server("--domain", DOMAIN, "--domain", IDN_ACE)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo()
        assert s.has_extn("smtputf8")
        msg = utf8_message(f"{JOERG}@{DOMAIN}", f"{USER}@{IDN}")
        assert s.send_message(msg, mail_options=["SMTPUTF8"]) == {}
        # composed and decomposed, upper and lower case: one mailbox, one folder
        for rcpt in (f"J\u00d6RG@{DOMAIN}", f"Jo\u0308rg@{DOMAIN}"):
            assert s.send_message(utf8_message(f"a@{DOMAIN}", rcpt), mail_options=["SMTPUTF8"]) == {}
    (path,) = server.stored(USER)
    stored = parsed(path)
    assert stored["Subject"] == "Gr\u00fc\u00dfe aus K\u00f6ln"
    assert stored["From"] == f"{JOERG}@{DOMAIN}" and stored["To"] == f"{USER}@{IDN}"
    assert stored["Return-Path"] == f"<{JOERG}@{DOMAIN}>" and stored["Delivered-To"] == f"{USER}@{IDN}"
    assert " with UTF8SMTP id " in stored["Received"] and f"for <{USER}@{IDN}>" in stored["Received"]
    assert stored.get_content() == "Hall\u00f6chen \u2713\n"
    assert len(server.stored("j\u00f6rg")) == 2
    assert not (server.mail_dir / "Jo\u0308rg").exists()


def test_a_utf8_address_without_smtputf8_gets_553_5_6_7(server):
    c = server.client()
    c.cmd("EHLO c")
    assert c.cmd(f"MAIL FROM:<{JOERG}@{DOMAIN}>") == (553, "5.6.7 Error: a UTF-8 address needs MAIL FROM:<...> SMTPUTF8")
    assert c.cmd(f"MAIL FROM:<a@{DOMAIN}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{JOERG}@{DOMAIN}>")[0] == 553
    assert c.cmd("RSET")[0] == 250
    # ASCII addresses are as before: the folder is the local part, lowercased
    assert c.mail(f"a@{DOMAIN}", ["Bob.Smith"], b"Subject: x\r\n\r\nhi")[0] == 250
    assert len(server.stored("bob.smith")) == 1
    assert "with ESMTP id" in server.stored("bob.smith")[0].read_text()


def test_curl_with_utf8_addresses(start_server, tmp_path):
    server = start_server("--domain", DOMAIN, "--domain", IDN_ACE)
    mail = tmp_path / "mail.eml"
    mail.write_bytes(f"From: {JOERG}@{DOMAIN}\r\nTo: {USER}@{IDN}\r\nSubject: \u00fcber\r\n\r\nhi\r\n".encode())
    run = subprocess.run(
        ["curl", "-sS", "--url", f"smtp://127.0.0.1:{server.port}", "--mail-from", f"{JOERG}@{DOMAIN}",
         "--mail-rcpt", f"{USER}@{IDN}", "--mail-rcpt", f"{JOERG}@{DOMAIN}", "--upload-file", str(mail)],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    for folder in (USER, "j\u00f6rg"):
        (path,) = server.stored(folder)
        stored = parsed(path)
        assert stored["Subject"] == "\u00fcber" and stored["Return-Path"] == f"<{JOERG}@{DOMAIN}>"
        assert " with UTF8SMTP id " in stored["Received"]
    # curl sends the domain as its A-labels (IDNA), the local part as UTF-8
    assert parsed(server.stored(USER)[0])["Delivered-To"] == f"{USER}@{IDN_ACE}"


def test_swaks_cannot_send_smtputf8_and_is_refused_553(server):
    run = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.port}", "--from", f"{JOERG}@{DOMAIN}", "--to", f"bob@{DOMAIN}"],
        capture_output=True, timeout=60,
    )
    assert run.returncode != 0
    assert "<** 553 5.6.7 Error: a UTF-8 address needs MAIL FROM:<...> SMTPUTF8".encode() in run.stdout
    assert server.stored("bob") == []


def test_mailboxes_file_lists_utf8_local_parts_mapped_the_same_way(start_server, tmp_path):
    listed = tmp_path / "mailboxes"
    listed.write_text("# people\nJo\u0308rg\nbob\n", encoding="utf-8")
    server = start_server("--mailboxes", str(listed))
    c = server.client()
    c.cmd("EHLO c")
    assert c.cmd(f"MAIL FROM:<a@{DOMAIN}> SMTPUTF8")[0] == 250
    assert c.cmd(f"RCPT TO:<J\u00d6RG@{DOMAIN}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{USER}@{DOMAIN}>") == (550, "5.1.1 Error: mailbox unavailable")
    assert c.cmd("RCPT TO:<BOB>")[0] == 250


def test_received_says_utf8smtps_and_utf8smtpsa(tls_server, files):  # noqa: F811
    server = tls_server()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.starttls(context=client_context(files))
        s.send_message(utf8_message(f"a@{DOMAIN}", f"{USER}@{DOMAIN}"), mail_options=["SMTPUTF8"])
    with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=30) as s:
        s.starttls(context=client_context(files))
        s.login("alice", PASSWORD)
        s.send_message(utf8_message(f"alice@{DOMAIN}", f"{USER}@{DOMAIN}"), mail_options=["SMTPUTF8"])
    protocols = sorted(
        re.search(r"by mx\.test \(prefork-smtpd\) with (\S+) id", parsed(p)["Received"]).group(1)
        for p in server.stored(USER)
    )
    assert protocols == ["UTF8SMTPS", "UTF8SMTPSA"]


def test_a_utf8_domain_counts_octets_as_written_not_its_a_labels(start_server):
    """IDNA maps U+200B (and U+FEFF, U+00AD...) to nothing: "b\u00fc" + 300 of them
    + "cher.example" is xn--bcher-kva.example in A-labels, 20 characters, yet
    900 octets as written, and as written it would be relayed and quoted in
    notices. RFC 5321's 255 octets count the domain as written (RFC 6531 3.3)."""
    server = start_server("--relay-networks", "127.0.0.0/8")
    labels = ".".join(["\u00fc" * 10] * 11) + ".example"  # 238 octets of UTF-8
    at_limit = labels + ".abcdefghijklmnop"
    assert len(at_limit.encode()) == 255
    c = server.client()
    c.cmd("EHLO client.example")
    assert c.cmd(f"MAIL FROM:<alice@{DOMAIN}> SMTPUTF8")[0] == 250
    assert c.cmd(f"RCPT TO:<bob@{at_limit}>".encode())[0] == 250
    for domain in (at_limit + "q", "b\u00fc" + "\u200b" * 300 + "cher.example"):
        code, text = c.cmd(f"RCPT TO:<bob@{domain}>".encode())
        assert (code, text[:5]) == (501, "5.1.3")
    assert c.cmd("RSET")[0] == 250
    code, text = c.cmd(f"MAIL FROM:<alice@{labels}.{'q' * 20}> SMTPUTF8".encode())  # 259 octets
    assert (code, text[:5]) == (501, "5.1.7")
    c.close()


def test_a_u_label_domain_flag_serves_that_domain_and_no_other(start_server):
    server = start_server("--domain", "Stra\u00dfe.de")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as s:
        s.ehlo()
        s.mail("a@xn--strae-oqa.de", ["SMTPUTF8"])
        assert s.rcpt("bob@stra\u00dfe.de")[0] == 250
        assert s.rcpt("bob@strasse.de")[0] == 550  # IDNA 2003's reading of the flag: another domain
        assert s.data(b"Subject: x\r\n\r\nhi\r\n")[0] == 250
    assert len(server.stored("bob")) == 1


def test_a_domain_flag_idna_2008_refuses_stops_the_start(start_server):
    server = start_server("--domain", "ex\u00adample.\u00e9x", wait=False)
    assert server.proc.wait(timeout=60) == 2
    assert "is not a domain name in IDNA 2008 U-labels" in server.output()
