"""Address forms and where their mail goes, without a network.

Source routes, address literals and postmaster (RFC 5321 4.1.2, 4.1.3,
4.5.1) in the sans-IO session; the folder naming of policy.MailboxNames
(--folders, --recipient-delimiter) as properties: any input maps to a safe
name or is refused, and two different mailboxes never share a folder.
"""

from __future__ import annotations

import base64
import collections
import ipaddress
import os
import re
import shutil
import socket
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sansio import Wired

from prefork_smtpd import policy
from prefork_smtpd.diskspace import SpaceGuard
from prefork_smtpd.policy import MailboxNames, ServerPolicy, domain_folder, modified_utf7, own_addresses, subfolder_for
from prefork_smtpd.session import Limits, Session, State, strip_source_route
from prefork_smtpd.settings import Settings

OURS = ipaddress.ip_address("192.0.2.1")
OURS_V6 = ipaddress.ip_address("2001:db8::25")


def session(domains=("smtpd.com",), mailboxes=None, names=None) -> Wired:
    server_policy = ServerPolicy(
        mailboxes, SpaceGuard("/", lambda: 0), names or MailboxNames(), lambda: frozenset({OURS, OURS_V6})
    )
    s = Wired(Session("mx.test", frozenset(domains), Limits(), {}.__getitem__, server_policy))
    assert s.feed(b"EHLO client.example\r\n").startswith(b"250")
    return s


def answer(s: Wired, line: str) -> str:
    return s.feed(line.encode() + b"\r\n").decode()


def rcpt(s: Wired, path: str) -> str:
    if s.state is State.READY:
        assert answer(s, "MAIL FROM:<>").startswith("250")
    return answer(s, f"RCPT TO:{path}")


# ----------------------------------------------------------- source routes
@pytest.mark.parametrize(
    "path, mailbox",
    [
        ("anne@smtpd.com", "anne@smtpd.com"),
        ("@a.example:anne@smtpd.com", "anne@smtpd.com"),
        ("@a.example,@b.example:anne@smtpd.com", "anne@smtpd.com"),
        ("@[192.0.2.9],@[IPv6:2001:db8::1]:anne@smtpd.com", "anne@smtpd.com"),
        ('@a.example:"x:y"@smtpd.com', '"x:y"@smtpd.com'),
        ("@a.example:", None),  # a route to nothing
        ("@:anne@smtpd.com", None),
        ("@a.example;@b.example:anne@smtpd.com", None),
        ("@a.example,b.example:anne@smtpd.com", None),  # each hop has its "@"
        ("@a..example:anne@smtpd.com", None),
        ("@a.example anne@smtpd.com", None),
    ],
)
def test_source_route_is_dropped_or_refused(path, mailbox):
    assert strip_source_route(path) == mailbox


def test_source_routes_are_accepted_and_ignored_on_mail_and_rcpt():
    s = session()
    assert answer(s, "MAIL FROM:<@a.example,@b.example:anne@smtpd.com>").startswith("250 2.1.0")
    assert answer(s, "RCPT TO:<@a.example,@b.example:bob@smtpd.com>").startswith("250 2.1.5")
    # The route never decides: the mailbox's domain does.
    assert answer(s, "RCPT TO:<@smtpd.com:bob@elsewhere.example>").startswith("550 5.7.1")
    assert answer(s, "RCPT TO:<@bad_route!:bob@smtpd.com>").startswith("501 5.1.3")
    assert answer(s, "DATA").startswith("354")
    s.feed(b"hi\r\n.\r\n")
    assert s.pending.sender == "anne@smtpd.com"
    assert [(r.address, r.folder) for r in s.pending.recipients] == [("bob@smtpd.com", "bob")]
    s = session()
    assert answer(s, "MAIL FROM:<@a.example:>").startswith("501 5.1.7")


# ---------------------------------------------------------- address literals
@pytest.mark.parametrize(
    "path, reply",
    [
        ("<postmaster@[192.0.2.1]>", "250 2.1.5"),
        ("<Bob@[192.0.2.1]>", "250 2.1.5"),
        ("<bob@[IPv6:2001:db8::25]>", "250 2.1.5"),
        ("<bob@[IPv6:2001:DB8:0:0:0:0:0:25]>", "250 2.1.5"),  # the same address, written out
        ("<bob@[IPv6:::ffff:192.0.2.1]>", "250 2.1.5"),  # IPv4-mapped: the same host
        ("<bob@[192.0.2.2]>", "550 5.7.1"),  # not ours: a relay attempt
        ("<bob@[IPv6:2001:db8::26]>", "550 5.7.1"),
        ("<bob@[Tag:content]>", "550 5.7.1"),  # a General-address-literal: well formed, not ours
        ("<bob@[x-400:c=gb;a= ;p=x]>", "501 5.1.3"),  # a space is no dcontent
        # Malformed literals: a syntax error, not a relay attempt (RFC 5321 4.1.3).
        ("<bob@[IPv6:192.0.2.1]>", "501 5.1.3"),
        ("<bob@[192.0.2.999]>", "501 5.1.3"),
        ("<bob@[192.0.2]>", "501 5.1.3"),
        ("<bob@[IPv6:1:2:3:4:5:6:7:8:9]>", "501 5.1.3"),
        ("<bob@[IPv6:zz]>", "501 5.1.3"),
        ("<bob@[::1]>", "501 5.1.3"),  # no tag
        ("<bob@[ta_g:x]>", "501 5.1.3"),  # a tag is letters, digits and hyphens
        ("<bob@[tag:]>", "501 5.1.3"),
        ("<bob@[host.example]>", "501 5.1.3"),
    ],
)
def test_address_literals_are_ours_or_a_relay_attempt(path, reply):
    assert rcpt(session(), path).startswith(reply)


@pytest.mark.parametrize("literal", ["[IPv6:192.0.2.1]", "[192.0.2.999]", "[::1]", "[tag:]"])
def test_a_sender_with_a_malformed_literal_is_a_syntax_error(literal):
    s = session()
    assert answer(s, f"MAIL FROM:<anne@{literal}>").startswith("501 5.1.7")
    assert answer(s, "MAIL FROM:<anne@[192.0.2.2]>").startswith("550")  # well formed, not ours


def test_an_address_literal_goes_to_the_folder_of_its_local_part():
    s = session()
    for path in ("<Bob@[192.0.2.1]>", "<carol@[IPv6:2001:db8::25]>"):
        assert rcpt(s, path).startswith("250")
    assert [r.folder for r in s._envelope.recipients] == ["bob", "carol"]
    s = session(names=MailboxNames("address", "smtpd.com"))
    assert rcpt(s, "<Bob@[192.0.2.1]>").startswith("250")
    assert s._envelope.recipients[0].folder == "smtpd.com/bob"


def test_the_catch_all_does_not_make_every_literal_ours():
    s = session(domains=("*",))
    assert rcpt(s, "<bob@[192.0.2.1]>").startswith("250")
    assert rcpt(s, "<bob@[198.51.100.7]>").startswith("550 5.7.1")


def test_own_addresses_of_a_wildcard_listener_are_the_hosts(monkeypatch):
    import psutil

    # psutil's own entries are named tuples of these fields.
    Addr = collections.namedtuple("Addr", "family address netmask broadcast ptp")

    def entry(family, address):
        return Addr(family, address, None, None, None)

    monkeypatch.setattr(psutil, "net_if_addrs", lambda: {
        "lo": [entry(socket.AF_INET, "127.0.0.1"), entry(socket.AF_INET6, "::1")],
        "eth0": [entry(socket.AF_INET, "192.0.2.1"), entry(socket.AF_INET6, "fe80::1%eth0"), entry(17, "aa:bb")],
    })
    found = own_addresses(["::"])
    assert found == {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "192.0.2.1", "fe80::1")}
    # A listener on one address answers only there.
    assert own_addresses(["192.0.2.7", "::ffff:198.51.100.1"]) == {
        ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("198.51.100.1")
    }


def test_the_addresses_are_looked_up_once_at_the_first_literal():
    calls = []
    server_policy = ServerPolicy(None, SpaceGuard("/", lambda: 0), addresses=lambda: calls.append(1) or frozenset())
    s = Wired(Session("mx.test", frozenset({"smtpd.com"}), Limits(), {}.__getitem__, server_policy))
    s.feed(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@smtpd.com>\r\n")
    assert calls == []
    s.feed(b"RCPT TO:<a@[192.0.2.1]>\r\nRCPT TO:<a@[192.0.2.2]>\r\n")
    assert calls == [1]


# ---------------------------------------------------------------- postmaster
@pytest.mark.parametrize(
    "path", ["<Postmaster>", "<postmaster>", "<POSTMASTER>", "<PostMaster@smtpd.com>", "<postmaster@[192.0.2.1]>"]
)
def test_postmaster_is_accepted_whatever_the_mailbox_policy(path):
    s = session(mailboxes=set().__contains__)  # no mailbox exists at all
    assert rcpt(s, "<bob@smtpd.com>").startswith("550 5.1.1")
    assert rcpt(s, path).startswith("250 2.1.5")
    assert s._envelope.recipients[0].folder == "postmaster"


def test_postmaster_of_a_domain_not_served_is_still_relaying():
    s = session(mailboxes=set().__contains__)
    assert rcpt(s, "<postmaster@elsewhere.example>").startswith("550 5.7.1")
    assert rcpt(s, "<postmasters@smtpd.com>").startswith("550 5.1.1")


def test_postmaster_under_folders_address_is_the_domains():
    s = session(domains=("smtpd.com", "b.example"), names=MailboxNames("address", "smtpd.com"))
    for path in ("<Postmaster>", "<postmaster@B.example>"):
        assert rcpt(s, path).startswith("250")
    assert [r.folder for r in s._envelope.recipients] == ["smtpd.com/postmaster", "b.example/postmaster"]


# ---------------------------------------------------------------- catch-all
def test_the_catch_all_serves_every_domain_for_senders_and_recipients():
    s = session(domains=("*",), names=MailboxNames("address", "mx.test"))
    assert answer(s, "MAIL FROM:<app@Staging.Example>").startswith("250")
    for path in ("<bob@A.example>", "<bob@b.example>", "<@relay.example:carol@c.example>", "<dave>"):
        assert answer(s, f"RCPT TO:{path}").startswith("250"), path
    assert [r.folder for r in s._envelope.recipients] == ["a.example/bob", "b.example/bob", "c.example/carol", "mx.test/dave"]
    assert answer(s, "RCPT TO:<bob@bad_domain!>").startswith("501")


def test_without_the_catch_all_domains_still_compare_case_insensitively():
    s = session(domains=("smtpd.com",))
    assert rcpt(s, "<bob@SMTPD.Com>").startswith("250")
    assert rcpt(s, "<bob@a.example>").startswith("550 5.7.1")
    assert answer(session(), "MAIL FROM:<x@a.example>").startswith("550 5.7.1")


# ---------------------------------------------------------- plus-addressing
def test_plus_addresses_go_to_the_base_mailbox_with_their_subfolder():
    s = session(mailboxes={"bob"}.__contains__, names=MailboxNames("local", "smtpd.com", "+-"))
    for path in ("<Bob+Invoices@smtpd.com>", "<bob-lists.python@smtpd.com>", "<bob+@smtpd.com>", "<bob+.x@smtpd.com>"):
        assert rcpt(s, path).startswith("250"), path
    got = [(r.address, r.folder, r.subfolder) for r in s._envelope.recipients]
    assert got == [
        ("Bob+Invoices@smtpd.com", "bob", ".invoices"),
        ("bob-lists.python@smtpd.com", "bob", ".lists.python"),
        ("bob+@smtpd.com", "bob", ""),
        ("bob+.x@smtpd.com", "bob", ""),  # a detail that is no dot-atom makes no subfolder
    ]
    # The mailbox policy judges the base mailbox: carol has none.
    assert rcpt(s, "<carol+bob@smtpd.com>").startswith("550 5.1.1")
    # A leading delimiter is part of the name, not a split.
    assert MailboxNames("local", "", "+").split_detail("+bob") == ("+bob", "")


def test_without_a_delimiter_plus_is_part_of_the_name():
    s = session()
    assert rcpt(s, "<bob+invoices@smtpd.com>").startswith("250")
    assert (s._envelope.recipients[0].folder, s._envelope.recipients[0].subfolder) == ("bob+invoices", "")


# ------------------------------------------------------- properties of names
ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-=?^_`{|}~"
local_parts = st.one_of(
    st.text(max_size=80),  # anything at all
    st.text(alphabet=ATEXT + ".", min_size=1, max_size=70),  # near-valid dot-atoms
    st.sampled_from(["..", ".", "a..b", ".hidden", "a.", "a/b", "x\x00", "tmp", "new", "POSTMASTER", "a+b.c"]),
)
domains = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"[A-Za-z0-9-]{1,12}(\.[A-Za-z0-9-]{1,12}){0,3}", fullmatch=True),
    st.sampled_from(["", "..", "a..b", "-a.example", "a.example.", "[192.0.2.1]", "a/b", "A.EXAMPLE"]),
)
layouts = st.builds(MailboxNames, st.sampled_from(["local", "address"]), st.sampled_from(["smtpd.com", "mx.test"]),
                    st.sampled_from(["", "+", "+-", "-_="]))


def safe_part(part: str) -> bool:
    return (
        0 < len(part.encode()) <= 255
        and part not in (".", "..")
        and not part.startswith(".")
        and "/" not in part
        # UTF-8 local parts (SMTPUTF8) map to UTF-8 folder names: printable, no
        # spaces; ZWNJ and ZWJ (needed by some scripts) are the only format characters.
        and all((c.isprintable() and not c.isspace()) or c in "\u200c\u200d" for c in part)
    )


@settings(max_examples=600, deadline=None)
@given(names=layouts, local=local_parts, domain=domains)
def test_any_mailbox_maps_to_safe_folders_or_is_refused(names, local, domain):
    mailbox = names.mailbox(local, domain)
    if mailbox is None:
        return
    folder, sub = mailbox
    parts = folder.split("/")
    assert len(parts) == (2 if names.by_address else 1)
    assert all(safe_part(p) for p in parts), mailbox
    assert len(parts[-1].encode()) <= 64  # octets, as RFC 5321 counts a local part
    if sub:
        assert sub.startswith(".") and safe_part(sub[1:]) and ".." not in sub and not sub.endswith(".")


@settings(max_examples=600, deadline=None)
@given(names=layouts, a=st.tuples(local_parts, domains), b=st.tuples(local_parts, domains))
def test_different_mailboxes_never_share_a_folder(names, a, b):
    """The folder determines the mailbox: lowercased local part (before any
    delimiter), and under --folders address the lowercased domain too."""
    fa, fb = names.folder(*a), names.folder(*b)
    if fa is None or fa != fb:
        return
    assert a[0].lower() == b[0].lower()
    if names.by_address:
        assert (a[1] or names.home_domain).lower() == (b[1] or names.home_domain).lower()


@settings(max_examples=300, deadline=None)
@given(detail=st.text(max_size=70))
def test_a_detail_gives_a_safe_maildir_subfolder_or_none(detail):
    sub = subfolder_for(detail)
    assert sub == "" or (sub.startswith(".") and safe_part(sub[1:]) and ".." not in sub and sub.isascii())


def decoded_utf7(name: str) -> str:
    """RFC 3501 5.1.3, read back: the reader Dovecot is, written independently."""
    def run(match: re.Match) -> str:
        if not match.group(1):
            return "&"
        text = match.group(1).replace(",", "/")
        return base64.b64decode(text + "=" * (-len(text) % 4)).decode("utf-16-be")
    return re.sub(r"&([^-]*)-", run, name)


@pytest.mark.parametrize("name, on_disk", [
    ("invoices", "invoices"),
    ("a&b", "a&-b"),
    ("rechnungen-m\u00e4rz", "rechnungen-m&AOQ-rz"),
    ("~peter/mail/\u53f0\u5317/\u65e5\u672c\u8a9e", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),  # RFC 3501's own example
    ("\U0001f600", "&2D3eAA-"),  # outside the BMP: a surrogate pair
])
def test_plus_folder_names_are_in_modified_utf7_as_dovecot_reads_them(name, on_disk):
    assert modified_utf7(name) == on_disk
    assert subfolder_for(name.replace("/", "_")) in ("." + on_disk.replace("/", "_"), "")


@pytest.mark.parametrize("detail, folder", [
    ("inbox", ""), ("INBOX", ""), ("Inbox.Sub", ""), ("~x", ""), ("a.~b", ""),  # Dovecot would not show them
    ("inboxes", ".inboxes"), ("my.inbox", ".my.inbox"), ("a~b", ".a~b"),
])
def test_a_detail_naming_no_folder_dovecot_shows_goes_to_the_inbox(detail, folder):
    assert subfolder_for(detail) == folder


@settings(max_examples=300, deadline=None)
@given(name=st.text(st.characters(exclude_categories=("Cs",)), max_size=40))
def test_modified_utf7_is_printable_ascii_and_reads_back(name):
    encoded = modified_utf7(name)
    assert encoded.isascii() and all(" " <= c <= "~" for c in encoded)
    assert decoded_utf7(encoded) == name


@pytest.mark.parametrize("domain", ["", "a..b", "-a.example", "a.example.", "[192.0.2.1]", "a/b", "a_b.example", "é.example"])
def test_domain_folder_refuses_what_is_no_plain_domain(domain):
    assert domain_folder(domain) is None
    assert domain_folder("Mail.A-1.Example") == "mail.a-1.example"


@given(path=st.text(max_size=60))
@settings(deadline=None)
def test_a_stripped_route_leaves_a_suffix_never_a_new_route(path):
    out = strip_source_route(path)
    if out is None:
        assert path.startswith("@")
    else:
        assert path.endswith(out) and (out == path or (out and ":" in path[: len(path) - len(out)]))


# --------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "values, problem",
    [
        ({"folders": "domain"}, "--folders must be local or address"),
        ({"recipient_delimiter": "."}, "--recipient-delimiter takes"),
        ({"recipient_delimiter": "/"}, "--recipient-delimiter takes"),
        ({"recipient_delimiter": ""}, "--recipient-delimiter takes"),
        ({"folders": "address", "domains": ["a_b.example"]}, "is not a domain name"),
        ({"folders": "address", "domains": ["*"], "hostname": "my_host"}, "needs a --domain other than *"),
        ({"folders": "address", "domains": ["*"], "hostname": "mx.test"}, None),
        ({"folders": "local", "domains": ["a_b.example"]}, None),
        ({"recipient_delimiter": "+-"}, None),
        ({"domains": ["ex\u00adample.\u00e9x"]}, "is not a domain name in IDNA 2008 U-labels"),
        ({"folders": "address", "domains": ["Stra\u00dfe.de"]}, None),
        ({"domains": ["."]}, "is not a domain name"),
        ({"domains": ["a..example"]}, "is not a domain name"),
    ],
)
def test_address_settings_are_checked(values, problem):
    found = policy.settings_problem(Settings(**values))
    assert found == problem if problem is None else problem in found


def test_a_mailboxes_file_may_name_a_u_label_domain(tmp_path):
    listed = tmp_path / "mailboxes"
    listed.write_text("bob@b\u00fccher.example\ncarol@xn--bcher-kva.example\n")
    names = MailboxNames("address", "smtpd.com", "")
    assert policy.load_mailbox_list(str(listed), names) == {"xn--bcher-kva.example/bob", "xn--bcher-kva.example/carol"}


def test_u_label_domains_are_served_as_their_a_labels():
    settings = Settings(domains=["Stra\u00dfe.DE", "\u4f8b\u3048.jp", "MX.Example", "ex\u00adample.\u00e9x", "smtpd.com.",
                                 "b\u00fccher.example."])
    assert settings.domains == ["xn--strae-oqa.de", "xn--r8jz45g.jp", "mx.example", "ex\u00adample.\u00e9x", "smtpd.com",
                                "xn--bcher-kva.example"]  # a final dot names the same domain


def test_the_home_domain_is_the_first_real_domain_else_the_host_name():
    assert policy.names_from(Settings(domains=["*", "A.example"], hostname="mx")).home_domain == "a.example"
    assert policy.names_from(Settings(domains=["*"], hostname="MX.test")).home_domain == "mx.test"


def test_a_mailboxes_file_names_addresses_under_folders_address(tmp_path):
    listed = tmp_path / "boxes"
    listed.write_text("# staff\nBob@A.example\ncarol\n")
    assert policy.load_mailbox_list(str(listed), MailboxNames("address", "smtpd.com")) == {
        "a.example/bob", "smtpd.com/carol"
    }
    assert policy.load_mailbox_list(str(listed)) == {"bob", "carol"}
    listed.write_text("bob@bad_domain\n")
    with pytest.raises(policy.MailboxListError, match="boxes:1: not a valid address"):
        policy.load_mailbox_list(str(listed), MailboxNames("address", "smtpd.com"))


def test_existing_folders_under_folders_address_follow_no_link(tmp_path):
    (tmp_path / "a.example" / "bob").mkdir(parents=True)
    (tmp_path / "elsewhere" / "carol").mkdir(parents=True)
    (tmp_path / "b.example").symlink_to(tmp_path / "elsewhere")
    exists = policy.existing_folder(str(tmp_path))
    assert exists("a.example/bob")
    assert not exists("a.example/carol") and not exists("b.example/carol")


# ------------------------------------------------------------------- the store
def store_envelope(*recipients: tuple[str, str, str]):
    from prefork_smtpd.session import Envelope, Recipient

    body = b"Subject: t\r\n\r\nhello\r\n"
    return Envelope("client", "a@smtpd.com", [Recipient(*r) for r in recipients], chunks=[body], size=len(body))


def new_files(path) -> list[str]:
    new = path / "new"
    return sorted(os.listdir(new)) if new.is_dir() else []


def test_the_store_writes_domain_folders_and_existing_plus_subfolders(tmp_path):
    import email

    from prefork_smtpd.delivery import MaildirStore

    (tmp_path / "a.example" / "bob" / ".invoices").mkdir(parents=True)
    store = MaildirStore(str(tmp_path), "mx.test")
    qid = store.deliver(store_envelope(
        ("bob+invoices@A.example", "a.example/bob", ".invoices"),
        ("bob+receipts@a.example", "a.example/bob", ".receipts"),  # no such subfolder: bob's own new/
        ("bob@b.example", "b.example/bob", ""),
    ), "[192.0.2.9]")
    assert new_files(tmp_path / "a.example" / "bob" / ".invoices") == [qid]
    assert new_files(tmp_path / "a.example" / "bob") == [qid]
    assert new_files(tmp_path / "b.example" / "bob") == [qid]
    assert not (tmp_path / "a.example" / "bob" / ".receipts").exists()
    # Delivered-To keeps the address as written, plus part and all.
    mail = email.message_from_bytes((tmp_path / "a.example/bob/.invoices/new" / qid).read_bytes())
    assert mail["Delivered-To"] == "bob+invoices@A.example"
    mail = email.message_from_bytes((tmp_path / "a.example/bob/new" / qid).read_bytes())
    assert mail["Delivered-To"] == "bob+receipts@a.example"
    for folder in ("b.example", "b.example/bob"):  # made by the store
        assert (tmp_path / folder).stat().st_mode & 0o777 == 0o700


def test_two_plus_addresses_landing_in_one_folder_make_one_copy(tmp_path):
    from prefork_smtpd.delivery import MaildirStore

    store = MaildirStore(str(tmp_path), "mx.test")
    qid = store.deliver(store_envelope(("bob+a", "bob", ".a"), ("bob+b", "bob", ".b"), ("bob", "bob", "")), "[x]")
    assert new_files(tmp_path / "bob") == [qid]


def test_plus_folders_makes_the_maildir_plus_plus_subfolder(tmp_path):
    import mailbox

    from prefork_smtpd.delivery import MAILDIRFOLDER, MaildirStore

    store = MaildirStore(str(tmp_path), "mx.test", plus_folders=True)
    qid = store.deliver(store_envelope(("bob+Lists.Python", "bob", ".lists.python")), "[x]")
    sub = tmp_path / "bob" / ".lists.python"
    assert new_files(sub) == [qid] and (sub / MAILDIRFOLDER).is_file()
    assert sorted(p.name for p in sub.iterdir()) == ["cur", MAILDIRFOLDER, "new", "tmp"]
    # Python's Maildir++ reader sees the subfolder and the message in it.
    box = mailbox.Maildir(str(tmp_path / "bob"), create=False)
    assert box.list_folders() == ["lists.python"] and box.get_folder("lists.python").keys() == [qid]


def test_a_mailbox_found_full_is_counted_again_only_after_plus_full_recheck(tmp_path, monkeypatch):
    """A mailbox counted at --max-plus-folders is taken as full, without a new
    listing, for PLUS_FULL_RECHECK seconds: a folder the user removes frees a
    slot only after that; then a new tag gets its folder again."""
    from prefork_smtpd.delivery import PLUS_FULL_RECHECK, MaildirStore

    now = [1000.0]
    monkeypatch.setattr("prefork_smtpd.delivery.time.monotonic", lambda: now[0])
    notes: list[str] = []
    store = MaildirStore(str(tmp_path), "mx.test", plus_folders=True, max_plus_folders=2, note=notes.append)
    bob = tmp_path / "bob"

    def deliver_tag(tag: str) -> str:
        return store.deliver(store_envelope((f"bob+{tag}", "bob", f".{tag}")), "[x]")

    deliver_tag("a"), deliver_tag("b")
    full = deliver_tag("c")  # bob holds 2: counted full at 1000
    assert new_files(bob) == [full] and store.full_mailboxes == {"bob": 1000.0}
    shutil.rmtree(bob / ".b")  # the user deletes a folder in a mail reader

    now[0] = 1000.0 + PLUS_FULL_RECHECK - 0.5  # still within the window: no new count
    inside = deliver_tag("d")
    assert not (bob / ".d").exists() and sorted(new_files(bob)) == sorted([full, inside])
    assert notes[-1] == "bob: plus-folder .d not made, bob has 2 (--max-plus-folders): stored in its inbox"

    now[0] = 1000.0 + PLUS_FULL_RECHECK + 0.5  # past it: counted again, one slot is free
    after = deliver_tag("e")
    assert new_files(bob / ".e") == [after] and sorted(new_files(bob)) == sorted([full, inside])
    assert sorted(p.name for p in bob.iterdir() if p.name.startswith(".")) == [".a", ".e"]
    deliver_tag("f")  # counted again (bob was not found full since): full, a new window from now
    assert not (bob / ".f").exists() and store.full_mailboxes == {"bob": now[0]}
    assert len(notes) == 3  # c, d, f


def test_a_link_on_the_way_to_a_folder_is_refused(tmp_path):
    from prefork_smtpd.delivery import DeliveryError, MaildirStore

    (tmp_path / "elsewhere" / "bob").mkdir(parents=True)
    (tmp_path / "a.example").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "carol").mkdir()
    (tmp_path / "carol" / ".in").symlink_to(tmp_path / "elsewhere")
    store = MaildirStore(str(tmp_path), "mx.test")
    for rcpt in (("bob@a.example", "a.example/bob", ""), ("carol+in", "carol", ".in")):
        with pytest.raises(DeliveryError, match="symbolic link"):
            store.deliver(store_envelope(rcpt), "[x]")
    assert not (tmp_path / "elsewhere" / "bob" / "new").exists()
    assert os.listdir(tmp_path / ".tmp") == []


def test_the_disk_reserve_counts_a_copy_per_subfolder():
    from prefork_smtpd.diskspace import HEADROOM_PER_COPY, bytes_to_store

    env = store_envelope(("bob+a", "bob", ".a"), ("bob+b", "bob", ".b"), ("Bob", "bob", ""), ("bob", "bob", ""))
    assert bytes_to_store(env) == 3 * (env.size + HEADROOM_PER_COPY)  # at most three files: .a, .b, bob


def test_the_mailboxes_remembered_as_full_are_bounded(tmp_path, monkeypatch):
    """A sender filling one mailbox after another cannot grow the store's
    memory of full mailboxes: expired entries go first, then the oldest."""
    from prefork_smtpd import delivery
    from prefork_smtpd.delivery import PLUS_FULL_RECHECK, MaildirStore

    monkeypatch.setattr(delivery, "MAX_FULL_MAILBOXES", 4)
    store = MaildirStore(str(tmp_path), "mx.test")
    for i in range(4):
        store.note_full(f"m{i}", 1000.0 + i)
    store.note_full("m0", 1010.0)  # counted full again: now the newest
    store.note_full("m4", 1011.0)  # one too many: the oldest goes
    assert list(store.full_mailboxes) == ["m2", "m3", "m0", "m4"]
    later = 1002.0 + PLUS_FULL_RECHECK + 0.5  # m2 expired, m3 still within its window
    store.note_full("m5", later)
    assert list(store.full_mailboxes) == ["m3", "m0", "m4", "m5"]
    for i in range(6, 100):
        store.note_full(f"m{i}", later + i)
    assert len(store.full_mailboxes) == 4 and list(store.full_mailboxes)[-1] == "m99"
