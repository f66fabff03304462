"""Where a notice to a sender goes: the sender's own folder when it is a
mailbox here, however its domain is written (A-labels or U-labels)."""

from __future__ import annotations

import smtplib

import pytest
from harness import wait_until

from prefork_smtpd.notices import is_local_sender, local_sender_folder
from prefork_smtpd.policy import MailboxNames

SERVED = frozenset({"xn--bcher-kva.example", "smtpd.com"})


@pytest.mark.parametrize("sender, local", [
    ("a@xn--bcher-kva.example", True),
    ("a@b\u00fccher.example", True),  # the U-label form of a served domain: RCPT takes it as local too
    ("a@B\u00dcCHER.example", True),
    ("a@bucher.example", False),
    ("a@b\u00fccher\u00ad.example", False),  # a soft hyphen: refused by IDNA 2008, no domain of ours
    ("a@smtpd.com", True),
    ("", False),
])
def test_a_sender_is_local_in_either_form_of_a_served_domain(sender, local):
    assert is_local_sender(sender, SERVED) is local


@pytest.mark.parametrize("names, folder", [
    (MailboxNames(), "j\u00f6rg"),
    (MailboxNames("address", "smtpd.com", ""), "xn--bcher-kva.example/j\u00f6rg"),
])
def test_a_u_label_sender_gets_the_folder_its_mail_gets(names, folder):
    assert local_sender_folder("J\u00f6rg@b\u00fccher.example", SERVED, lambda folder: None, names) == folder


def test_a_success_notice_to_a_u_label_sender_lands_in_its_folder(start_server):
    server = start_server("--domain", "xn--bcher-kva.example")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo()
        assert client.sendmail("a@b\u00fccher.example", ["bob@xn--bcher-kva.example"], b"Subject: x\r\n\r\nhi\r\n",
                               mail_options=["SMTPUTF8"], rcpt_options=["NOTIFY=SUCCESS"]) == {}
    assert len(server.stored("bob")) == 1
    (notice,) = wait_until(lambda: server.stored("a"), what="the delivered notice")
    assert b"Action: delivered" in notice.read_bytes()
